//! Path normalization shared by the writer and the reader.
//!
//! Tar and TOC names come in many spellings (`./etc/`, `etc`, `etc/`). Both sides reduce them to
//! one canonical relative form, and both refuse names that could escape the layer root: a layer
//! is untrusted input, and a `../` that survives into a mount or an extraction is a host write.
//!
//! The rules are containerd's unpacker's, applied once, when the tree is built (and by the
//! writer, so a converted layer never carries such a name further): after the harmless spellings
//! (`./`, `//`, a trailing `/`) are folded away, every component is non-empty, not `.` or `..`,
//! free of NUL and at most [`MAX_NAME_LEN`] bytes, and a path has at most [`MAX_PATH_DEPTH`]
//! components. A whiteout `.wh.X` must hide a valid name `X`: `.wh...` (X = `..`) would make an
//! overlay-style extraction remove the *parent* of the directory it extracts into. `.wh..wh..opq`
//! is the opaque-directory marker. The same checks are exported for the layers above
//! ([`component_problem`], [`whiteout`]), which re-apply them as a second line of defense.

use crate::error::{Error, Result};
use crate::limits::MAX_PATH_DEPTH;

pub use index::names::{component_problem, whiteout, Whiteout, OPAQUE_MARKER, WHITEOUT_PREFIX};

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
    let mut depth = 0usize;
    for comp in name.split('/') {
        match comp {
            "" | "." => {}
            c => {
                if let Some(reason) = component_problem(c) {
                    return Err(unsafe_path(reason));
                }
                depth += 1;
                if depth > MAX_PATH_DEPTH {
                    return Err(unsafe_path("more than 4096 path components"));
                }
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    whiteout(base(&out)).map_err(unsafe_path)?;
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
        assert!(normalize(&"x".repeat(256), "name").is_err());
        assert!(normalize(&"x".repeat(255), "name").is_ok());
        assert!(normalize(&"a/".repeat(MAX_PATH_DEPTH + 1), "name").is_err());
        assert!(normalize(&"a/".repeat(MAX_PATH_DEPTH), "name").is_ok());
        assert_eq!(parent("a/b/c"), Some("a/b"));
        assert_eq!(parent("a"), Some(""));
        assert_eq!(parent(""), None);
        assert_eq!(base("a/b"), "b");
    }

    #[test]
    fn whiteouts() {
        for bad in [".wh.", ".wh..", ".wh...", "sub/.wh..", "sub/.wh...", "a/b/.wh."] {
            let e = normalize(bad, "name").unwrap_err().to_string();
            assert!(e.contains("whiteout") && e.contains(bad), "{bad}: {e}");
        }
        assert_eq!(whiteout(".wh..wh..opq"), Ok(Whiteout::Opaque));
        assert_eq!(whiteout(".wh.x"), Ok(Whiteout::Hides("x")));
        assert_eq!(whiteout(".wh..x"), Ok(Whiteout::Hides(".x")));
        assert_eq!(whiteout("x"), Ok(Whiteout::No));
        assert!(normalize("sub/.wh.gone", "name").is_ok());
    }
}
