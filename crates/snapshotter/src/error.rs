//! Errors of the snapshotter, mapped to the gRPC codes containerd's errdefs expects.

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    #[error("snapshot {0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("metadata store: {0}")]
    Meta(String),
    /// A remote snapshot's layer is not served and could not be mounted again.
    #[error("{0}")]
    Unavailable(String),
    #[error("{what} {path}: {reason}")]
    Io { what: String, path: String, reason: String },
}

impl Error {
    pub fn io(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> Error {
        Error::Io {
            what: what.to_string(),
            path: path.display().to_string(),
            reason: e.to_string(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        let msg = e.to_string();
        match e {
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::Unavailable(_) => tonic::Status::unavailable(msg),
            Error::Meta(_) | Error::Io { .. } => tonic::Status::internal(msg),
        }
    }
}
