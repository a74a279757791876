//! SOCI at the image level: make SOCI indexes for images in a registry or an OCI layout, and
//! find them again.
//!
//! The format work (zTOCs, checkpoints) is the `soci` crate's; this crate moves blobs and
//! manifests through `convert::Store`, so registry references and `oci:DIR` layouts behave
//! the same: [`create::create_v1`] (`lazypull soci create`), [`create::convert_v2`]
//! (`lazypull soci convert`), [`referrers::discover`] (mount, rpull and `soci inspect`).

pub mod create;
pub mod manifest;
pub mod referrers;

pub use create::{convert_v2, create_v1, indexable, CreateOptions, Event, Progress, Report, SkipReason};
pub use manifest::{Blob, IndexVersion, LayerZtoc, SociIndex};
pub use referrers::{discover, Found, Via};

/// Errors name the image, layer or document involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] convert::Error),
    #[error(transparent)]
    Registry(#[from] registry::Error),
    #[error(transparent)]
    Index(#[from] manifest::BadIndex),
    #[error("layer {index} ({digest}): building its zTOC: {source}")]
    Build {
        index: usize,
        digest: String,
        #[source]
        source: soci::BuildError,
    },
    #[error("I/O error {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("prefetch file {0:?} is not a regular file of any indexed layer")]
    PrefetchFileNotFound(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
