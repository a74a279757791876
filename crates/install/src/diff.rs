//! A line-based unified diff (`diff -u` format) for `--dry-run`.
//!
//! Configs are a few hundred lines and the changes few, so a plain LCS table over the lines
//! between the common prefix and suffix is fast enough; beyond 4 Mi table cells the middle is
//! shown as replaced wholesale (still a correct diff, just not a minimal one).

const MAX_CELLS: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Equal,
    Delete,
    Insert,
}

/// The unified diff from `old` to `new` with `context` lines around each change, headed
/// `--- old_name` / `+++ new_name`; empty when the texts are equal.
pub fn unified_diff(old: &str, new: &str, old_name: &str, new_name: &str, context: usize) -> String {
    if old == new {
        return String::new();
    }
    let a: Vec<&str> = old.split_inclusive('\n').collect();
    let b: Vec<&str> = new.split_inclusive('\n').collect();
    let ops = edit_script(&a, &b);
    let mut out = format!("--- {old_name}\n+++ {new_name}\n");
    // Each op with the positions (in a and b) it starts at.
    let mut at = Vec::with_capacity(ops.len());
    let (mut i, mut j) = (0, 0);
    for &op in &ops {
        at.push((op, i, j));
        match op {
            Op::Equal => (i, j) = (i + 1, j + 1),
            Op::Delete => i += 1,
            Op::Insert => j += 1,
        }
    }
    let changes: Vec<usize> = (0..at.len()).filter(|&k| at[k].0 != Op::Equal).collect();
    let mut k = 0;
    while k < changes.len() {
        // Grow a hunk while the next change is within 2 * context equal lines.
        let first = changes[k];
        let mut last = first;
        while k + 1 < changes.len() && changes[k + 1] - last <= 2 * context + 1 {
            k += 1;
            last = changes[k];
        }
        k += 1;
        let start = first.saturating_sub(context);
        let end = (last + context + 1).min(at.len());
        let hunk = &at[start..end];
        let old_len = hunk.iter().filter(|h| h.0 != Op::Insert).count();
        let new_len = hunk.iter().filter(|h| h.0 != Op::Delete).count();
        let (_, i0, j0) = hunk[0];
        out.push_str(&format!("@@ -{} +{} @@\n", range(i0, old_len), range(j0, new_len)));
        for &(op, i, j) in hunk {
            let (mark, line) = match op {
                Op::Equal => (' ', a[i]),
                Op::Delete => ('-', a[i]),
                Op::Insert => ('+', b[j]),
            };
            out.push(mark);
            out.push_str(line);
            if !line.ends_with('\n') {
                out.push_str("\n\\ No newline at end of file\n");
            }
        }
    }
    out
}

/// `start,len` as `diff -u` prints it (1-based; an empty range names the line before it).
fn range(start: usize, len: usize) -> String {
    match len {
        0 => format!("{start},0"),
        1 => format!("{}", start + 1),
        _ => format!("{},{len}", start + 1),
    }
}

fn edit_script(a: &[&str], b: &[&str]) -> Vec<Op> {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..].iter().rev().zip(b[prefix..].iter().rev()).take_while(|(x, y)| x == y).count();
    let (ma, mb) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    let mut ops = vec![Op::Equal; prefix];
    if (ma.len() + 1).saturating_mul(mb.len() + 1) > MAX_CELLS {
        ops.extend(std::iter::repeat_n(Op::Delete, ma.len()));
        ops.extend(std::iter::repeat_n(Op::Insert, mb.len()));
    } else {
        ops.extend(lcs_script(ma, mb));
    }
    ops.extend(std::iter::repeat_n(Op::Equal, suffix));
    ops
}

/// The edit script of a longest common subsequence (deletions before insertions in a change).
fn lcs_script(a: &[&str], b: &[&str]) -> Vec<Op> {
    let w = b.len() + 1;
    // len[i * w + j] = LCS length of a[i..] and b[j..].
    let mut len = vec![0u32; (a.len() + 1) * w];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            len[i * w + j] = if a[i] == b[j] { len[(i + 1) * w + j + 1] + 1 } else { len[(i + 1) * w + j].max(len[i * w + j + 1]) };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut ops = Vec::with_capacity(a.len() + b.len());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push(Op::Equal);
            (i, j) = (i + 1, j + 1);
        } else if j == b.len() || (i < a.len() && len[(i + 1) * w + j] >= len[i * w + j + 1]) {
            ops.push(Op::Delete);
            i += 1;
        } else {
            ops.push(Op::Insert);
            j += 1;
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_give_no_diff() {
        assert_eq!(unified_diff("a\nb\n", "a\nb\n", "a", "b", 3), "");
    }

    #[test]
    fn small_change_matches_diff_u() {
        let old = "1\n2\n3\n4\n5\n6\n7\n8\n9\n";
        let new = "1\n2\n3\n4\nfive\n6\n7\n8\n9\nten\n";
        let want = "--- a\n+++ b\n@@ -2,8 +2,9 @@\n 2\n 3\n 4\n-5\n+five\n 6\n 7\n 8\n 9\n+ten\n";
        assert_eq!(unified_diff(old, new, "a", "b", 3), want);
        let want1 = "--- a\n+++ b\n@@ -4,3 +4,3 @@\n 4\n-5\n+five\n 6\n@@ -9 +9,2 @@\n 9\n+ten\n";
        assert_eq!(unified_diff(old, new, "a", "b", 1), want1);
    }

    #[test]
    fn new_file_and_missing_newline() {
        assert_eq!(unified_diff("", "x\ny\n", "/dev/null", "f", 3), "--- /dev/null\n+++ f\n@@ -0,0 +1,2 @@\n+x\n+y\n");
        assert_eq!(unified_diff("x", "x\n", "a", "b", 3), "--- a\n+++ b\n@@ -1 +1 @@\n-x\n\\ No newline at end of file\n+x\n");
    }
}
