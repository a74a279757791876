//! Errors of opening and mounting a layer.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("layer {blob}: {source}")]
    Format {
        blob: String,
        #[source]
        source: estargz::Error,
    },
    /// The layer's index does not match the digest its descriptor names.
    #[error("layer {blob}: {reason}")]
    IndexCheck { blob: String, reason: String },
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("mount at {path}: {reason}")]
    Mount { path: PathBuf, reason: String },
}
