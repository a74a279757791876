//! Errors of the chunk store and fetcher. Each names what failed: the chunk digest, the blob
//! range, the directory.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Local file system trouble in the cache directory.
    #[error("chunk store {path}: {what}: {reason}")]
    Io { path: PathBuf, what: String, reason: String },
    /// The source (registry, file) could not deliver a byte range.
    #[error("fetching blob {blob} bytes {offset}..{end}: {reason}")]
    Fetch { blob: String, offset: u64, end: u64, reason: String },
    /// A fetch did not finish in time.
    #[error("fetching blob {blob} bytes {offset}..{end}: no answer within {secs:.1} s")]
    Timeout { blob: String, offset: u64, end: u64, secs: f64 },
    /// Fetched bytes do not decompress to the chunk the TOC promises.
    #[error("chunk {digest} (blob {blob} offset {offset}) is corrupt: {reason}")]
    Corrupt { digest: String, blob: String, offset: u64, reason: String },
    /// The chunk has no digest in the TOC, so it cannot be verified and is refused.
    #[error("chunk at blob {blob} offset {offset} has no chunkDigest in the TOC; lazypull refuses unverifiable chunks")]
    Unverifiable { blob: String, offset: u64 },
    /// The fetcher was shut down.
    #[error("layer {blob}: the fetcher is shut down")]
    Closed { blob: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, what: impl Into<String>, e: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            what: what.into(),
            reason: e.to_string(),
        }
    }
}
