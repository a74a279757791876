//! Errors of an rpull, naming the image, layer or containerd call they concern.

use thiserror::Error;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// A containerd call failed; `what` names its subject (digest, snapshot key, image).
    #[error("containerd {call} ({what}): {status}")]
    Containerd {
        call: &'static str,
        what: String,
        status: Box<tonic::Status>,
    },
    /// The image itself is unusable (bad config, layer/diff_id mismatch, unknown media type).
    #[error("image {reference}: {reason}")]
    BadImage { reference: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn containerd(call: &'static str, what: impl Into<String>, status: tonic::Status) -> Error {
        Error::Containerd { call, what: what.into(), status: Box::new(status) }
    }

    /// The gRPC code of a failed containerd call, if that is what this is.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Containerd { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}
