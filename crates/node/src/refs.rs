//! A layer's chunk references (`STATE/refs/<blob hex>`): what it keeps in the shared store.
//!
//! One line per stored item: `c <digest>` for a chunk file, `o <digest>` for a file object.
//! Written once per layer by whoever opens it first (a layer daemon, `lazypull mount`), read by
//! the snapshotter's cache GC (it keeps exactly what layers still in use reference) and by
//! `lazypull cache` (usage per image and layer).

use std::path::Path;

use index::Digest;

use crate::layout::StateDir;

/// One item a layer keeps in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StoredItem {
    Chunk(Digest),
    Object(Digest),
}

/// Reads a layer's references (`None` if it has none recorded).
pub fn read_refs(state: &StateDir, blob_digest: &str) -> Option<Vec<StoredItem>> {
    let text = std::fs::read_to_string(state.refs_path(blob_digest)).ok()?;
    Some(
        text.lines()
            .filter_map(|l| {
                let (kind, d) = l.split_once(' ')?;
                let d = d.parse().ok()?;
                match kind {
                    "c" => Some(StoredItem::Chunk(d)),
                    "o" => Some(StoredItem::Object(d)),
                    _ => None,
                }
            })
            .collect(),
    )
}

/// Writes a layer's references unless it has some already (they depend only on the layer).
pub fn write_refs(state: &StateDir, blob_digest: &str, items: impl IntoIterator<Item = StoredItem>) -> std::io::Result<()> {
    let p = state.refs_path(blob_digest);
    if p.exists() {
        return Ok(());
    }
    let mut lines: Vec<String> = items
        .into_iter()
        .map(|i| match i {
            StoredItem::Chunk(d) => format!("c {d}"),
            StoredItem::Object(d) => format!("o {d}"),
        })
        .collect();
    lines.sort();
    lines.dedup();
    std::fs::create_dir_all(p.parent().unwrap_or(Path::new(".")))?;
    crate::files::write_atomic(&p, (lines.join("\n") + "\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_round_trip_and_are_written_once() {
        let tmp = tempfile::tempdir().unwrap();
        let s = StateDir::new(tmp.path());
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        assert_eq!(read_refs(&s, "sha256:ff"), None);
        write_refs(&s, "sha256:ff", [StoredItem::Object(b), StoredItem::Chunk(a), StoredItem::Chunk(a)]).unwrap();
        let got = read_refs(&s, "sha256:ff").unwrap();
        assert_eq!(got, [StoredItem::Chunk(a), StoredItem::Object(b)]);
        write_refs(&s, "sha256:ff", []).unwrap();
        assert_eq!(read_refs(&s, "sha256:ff").unwrap().len(), 2, "first writer wins");
    }
}
