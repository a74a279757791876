//! Errors of opening and mounting a layer.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The layer's index is unreadable, malformed, or does not match the digest its descriptor
    /// names.
    #[error("layer {blob}: {source}")]
    Open {
        blob: String,
        #[source]
        source: layer::OpenError,
    },
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("mount at {path}: {reason}")]
    Mount { path: PathBuf, reason: String },
}
