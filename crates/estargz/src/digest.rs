//! `sha256:<hex>` digests: the model crate's type, re-exported for this crate's users.

pub use index::digest::{Digest, Hasher, InvalidDigest};

impl From<InvalidDigest> for crate::error::Error {
    fn from(e: InvalidDigest) -> Self {
        crate::error::Error::InvalidDigest(e.0)
    }
}
