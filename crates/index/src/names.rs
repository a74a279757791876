//! What a layer's (tar-form) names mean, shared by every format that lists tar entries.
//!
//! Layer tars name whiteouts in the OCI way (`.wh.X` hides `X`, `.wh..wh..opq` makes its
//! directory opaque); overlayfs wants its own form (a 0/0 character device, an xattr). Every
//! lazy format over a tar (eStargz, zstd:chunked, SOCI's zTOC) meets the same names, so the
//! classification and the component rules are here once: a component is non-empty, not `.` or
//! `..`, free of NUL and `/`, at most [`MAX_NAME_LEN`] bytes; a whiteout must hide a valid
//! name (`.wh...` would make an overlay-style extraction remove the *parent* directory).

use crate::limits::MAX_NAME_LEN;

/// Prefix of overlay whiteout names in a layer tar.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the opaque-directory marker in a layer tar.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The xattr overlayfs reads to treat a lower directory as opaque.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What a (valid) name means to an overlay filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteout<'a> {
    /// An ordinary name.
    No,
    /// `.wh..wh..opq`: the directory holding it is opaque.
    Opaque,
    /// `.wh.X`: hides the name `X` of the lower layers.
    Hides(&'a str),
}

/// Why `comp` is not an acceptable path component, if it is not.
pub fn component_problem(comp: &str) -> Option<&'static str> {
    match comp {
        "" => Some("empty path component"),
        "." => Some("current directory (.) component"),
        ".." => Some("parent directory (..) component"),
        c if c.contains('\0') => Some("contains a NUL byte"),
        c if c.contains('/') => Some("component contains a slash"),
        c if c.len() > MAX_NAME_LEN => Some("component longer than 255 bytes"),
        _ => None,
    }
}

/// Classifies a single component `name`; an error if it is a whiteout of an invalid name
/// (`.wh.`, `.wh..`, `.wh...`, or a hidden name that is itself unacceptable).
pub fn whiteout(name: &str) -> Result<Whiteout<'_>, &'static str> {
    if name == OPAQUE_MARKER {
        return Ok(Whiteout::Opaque);
    }
    match name.strip_prefix(WHITEOUT_PREFIX) {
        None => Ok(Whiteout::No),
        Some(hidden) => match component_problem(hidden) {
            None => Ok(Whiteout::Hides(hidden)),
            Some(_) => Err("whiteout of an empty, \".\" or \"..\" name"),
        },
    }
}
