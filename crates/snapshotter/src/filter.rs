//! containerd's filter syntax for `Walk`/`List`, the subset snapshots use.
//!
//! A filter string is a comma-separated conjunction of selectors; several filter strings are
//! a disjunction. A selector is `field`, `field==value`, `field!=value` or `field~=regexp`
//! (regexps are matched as literal substrings here: containerd's own callers use `==`,
//! `!=` and presence). Fields: `name`, `parent`, `kind`, `labels.KEY` or `labels."KEY"`.
//! Values may be quoted.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Contains(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Selector {
    field: Vec<String>,
    op: Op,
}

/// A parsed set of filters.
#[derive(Debug, Clone, Default)]
pub struct Filters(Vec<Vec<Selector>>);

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2 && (s.starts_with('"') && s.ends_with('"') || s.starts_with('\'') && s.ends_with('\'')) {
        s[1..s.len() - 1].replace("\\\"", "\"")
    } else {
        s.to_string()
    }
}

/// Splits on `sep` outside double quotes.
fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        if c == '"' {
            quoted = !quoted;
        }
        if c == sep && !quoted {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn parse_field(s: &str) -> Vec<String> {
    split_outside_quotes(s.trim(), '.').into_iter().map(|p| unquote(&p)).collect()
}

fn parse_selector(s: &str) -> Result<Selector> {
    for (tok, mk) in [("==", Op::Eq as fn(String) -> Op), ("!=", Op::Ne), ("~=", Op::Contains)] {
        // Find the operator outside quotes.
        let mut quoted = false;
        let b = s.as_bytes();
        for i in 0..b.len().saturating_sub(1) {
            if b[i] == b'"' {
                quoted = !quoted;
            }
            if !quoted && &s[i..i + 2] == tok {
                return Ok(Selector {
                    field: parse_field(&s[..i]),
                    op: mk(unquote(&s[i + 2..])),
                });
            }
        }
    }
    if s.contains('=') || s.contains('<') || s.contains('>') {
        return Err(Error::InvalidArgument(format!("unsupported filter selector {s:?}")));
    }
    Ok(Selector { field: parse_field(s), op: Op::Present })
}

impl Filters {
    pub fn parse(filters: &[String]) -> Result<Filters> {
        let mut out = Vec::new();
        for f in filters.iter().filter(|f| !f.trim().is_empty()) {
            out.push(split_outside_quotes(f, ',').iter().map(|s| parse_selector(s)).collect::<Result<Vec<_>>>()?);
        }
        Ok(Filters(out))
    }

    /// Whether a snapshot with these fields matches (no filters match everything).
    pub fn matches(&self, name: &str, parent: &str, kind: &str, labels: &BTreeMap<String, String>) -> bool {
        if self.0.is_empty() {
            return true;
        }
        self.0.iter().any(|conj| {
            conj.iter().all(|sel| {
                let value: Option<&str> = match sel.field.first().map(String::as_str) {
                    Some("name") if sel.field.len() == 1 => Some(name),
                    Some("parent") if sel.field.len() == 1 => Some(parent),
                    Some("kind") if sel.field.len() == 1 => Some(kind),
                    Some("labels") if sel.field.len() >= 2 => labels.get(&sel.field[1..].join(".")).map(String::as_str),
                    _ => None,
                };
                match (&sel.op, value) {
                    (Op::Present, v) => v.is_some_and(|v| !v.is_empty()),
                    (Op::Eq(want), v) => v == Some(want.as_str()),
                    (Op::Ne(want), v) => v != Some(want.as_str()),
                    (Op::Contains(want), v) => v.is_some_and(|v| v.contains(want.as_str())),
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selectors() {
        let l = labels(&[("containerd.io/gc.root", "x"), ("a", "1")]);
        let f = |s: &[&str]| Filters::parse(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>()).unwrap();
        assert!(f(&[]).matches("n", "", "committed", &l));
        assert!(f(&["kind==committed"]).matches("n", "", "committed", &l));
        assert!(!f(&["kind==active"]).matches("n", "", "committed", &l));
        assert!(f(&[r#"labels."containerd.io/gc.root""#]).matches("n", "", "active", &l));
        assert!(f(&["labels.a==1,name==n"]).matches("n", "", "active", &l));
        assert!(!f(&["labels.a==1,name==m"]).matches("n", "", "active", &l));
        assert!(f(&["name==m", "parent!=p"]).matches("n", "", "active", &l));
        assert!(!f(&["labels.b"]).matches("n", "", "active", &l));
        assert!(Filters::parse(&["a>=b".to_string()]).is_err());
    }
}
