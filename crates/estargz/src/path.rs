//! Path normalization shared by the writer and the reader.
//!
//! Tar and TOC names come in many spellings (`./etc/`, `etc`, `etc/`). Both sides reduce them to
//! one canonical relative form, and both refuse names that could escape the layer root: a layer
//! is untrusted input, and a `../` that survives into a mount or an extraction is a host write.

use crate::error::{Error, Result};

/// Canonical relative form of a tar/TOC name: no leading `./`, no `.` components, no trailing
/// slash, no duplicate slashes; the root is `""`. `what` names the field for the error.
pub fn normalize(name: &str, what: &'static str) -> Result<String> {
    let unsafe_path = |reason| Error::UnsafePath {
        what,
        path: name.to_string(),
        reason,
    };
    if name.contains('\0') {
        return Err(unsafe_path("contains a NUL byte"));
    }
    let is_root = name.trim_matches('/').trim_start_matches("./").trim_matches('/').is_empty() || name == ".";
    if name.starts_with('/') && !is_root {
        return Err(unsafe_path("absolute path"));
    }
    let mut out = String::with_capacity(name.len());
    for comp in name.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(unsafe_path("parent directory (..) component")),
            c => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    Ok(out)
}

/// Parent of a normalized path (`None` for the root).
pub fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    Some(path.rfind('/').map_or("", |i| &path[..i]))
}

/// Last component of a normalized path.
pub fn base(path: &str) -> &str {
    path.rfind('/').map_or(path, |i| &path[i + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(normalize("./etc//passwd", "name").unwrap(), "etc/passwd");
        assert_eq!(normalize("etc/", "name").unwrap(), "etc");
        assert_eq!(normalize("./", "name").unwrap(), "");
        assert_eq!(normalize("/", "name").unwrap(), "");
        assert_eq!(normalize(".", "name").unwrap(), "");
        assert!(normalize("../x", "name").is_err());
        assert!(normalize("a/../../x", "name").is_err());
        assert!(normalize("/etc/passwd", "name").is_err());
        assert_eq!(parent("a/b/c"), Some("a/b"));
        assert_eq!(parent("a"), Some(""));
        assert_eq!(parent(""), None);
        assert_eq!(base("a/b"), "b");
    }
}
