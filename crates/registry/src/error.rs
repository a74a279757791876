//! Typed registry errors. Each names the registry, repository and digest or URL involved, since
//! these surface in snapshotter logs far from the request that failed.

/// Result alias for the registry crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("{method} {url}: {source}")]
    Http {
        method: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {url}: registry answered {status}: {body}")]
    Status {
        method: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error("{method} {url}: authentication failed ({reason})")]
    Unauthorized { method: String, url: String, reason: String },
    #[error("{what} not found: {url}")]
    NotFound { what: String, url: String },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch { what: String, expected: String, actual: String },
    #[error("invalid digest {0:?}")]
    InvalidDigest(String),
    #[error("bad response from {url}: {reason}")]
    BadResponse { url: String, reason: String },
    #[error("credentials for {host}: {reason}")]
    Credentials { host: String, reason: String },
    #[error("configuration: {0}")]
    Config(String),
    #[error("no manifest for platform {platform} in index {reference} (available: {available})")]
    NoMatchingPlatform { reference: String, platform: String, available: String },
    #[error("I/O error {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// Whether retrying the same request may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Http { source, .. } => source.is_timeout() || source.is_connect() || source.is_request() || source.is_body() || source.is_decode(),
            Error::Status { status, .. } => *status == 429 || (*status >= 500 && *status != 501),
            _ => false,
        }
    }
}
