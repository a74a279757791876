//! Typed errors of the format crate.
//!
//! Every variant carries enough context (path, offset, digest) for the message alone to tell an
//! operator what is wrong with which blob, because these errors surface in snapshotter logs far
//! away from the code that produced them.

use std::io;

/// Result alias for the format crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while building, reading or verifying a layer blob.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("not an eStargz/zstd:chunked blob: {0}")]
    NotEstargz(String),
    #[error("TOC is not in this blob (external-TOC footer); fetch the TOC image instead")]
    ExternalToc,
    #[error("invalid footer: {0}")]
    InvalidFooter(String),
    #[error("invalid TOC: {0}")]
    InvalidToc(String),
    /// A numeric TOC field out of range: `field` is its JSON key, `entry` the entry's name.
    #[error("invalid TOC: entry {entry:?}: {field} {value} {reason}")]
    TocField {
        entry: String,
        field: &'static str,
        value: u64,
        reason: String,
    },
    #[error("TOC digest mismatch: expected {expected}, got {actual}")]
    TocDigestMismatch { expected: String, actual: String },
    #[error("chunk digest mismatch for {path} at file offset {chunk_offset} (blob offset {blob_offset}): expected {expected}, got {actual}")]
    ChunkDigestMismatch {
        path: String,
        chunk_offset: u64,
        blob_offset: u64,
        expected: String,
        actual: String,
    },
    #[error("decompression failed for {what} at blob offset {offset}: {reason}")]
    Decompress {
        what: String,
        offset: u64,
        reason: String,
    },
    #[error("invalid tar input at byte {offset}: {reason}")]
    InvalidTar { offset: u64, reason: String },
    #[error("unsafe path in {what} {path:?}: {reason}")]
    UnsafePath {
        what: &'static str,
        path: String,
        reason: &'static str,
    },
    #[error("unsupported tar entry {path:?}: type flag {flag:?}")]
    UnsupportedEntry { path: String, flag: char },
    #[error("no such file in layer: {0}")]
    NotFound(String),
    #[error("{path} is not a regular file")]
    NotRegular { path: String },
    #[error("invalid digest {0:?}")]
    InvalidDigest(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// Wraps an `io::Error` with a short description of what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds context to `io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}
