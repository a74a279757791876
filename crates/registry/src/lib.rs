//! An OCI distribution client for lazy pulling and image conversion.
//!
//! It knows registries, not formats or filesystems: references, manifests and indexes, blobs
//! (whole, streamed and digest-checked; or random ranges, single and multi-range), pushes and
//! referrers, with the authentication, retry, redirect and mirror behaviour real registries need.
//! Async (tokio + reqwest) because a lazy filesystem keeps many range reads in flight.

pub mod auth;
pub mod blobs;
pub mod client;
pub mod config;
pub mod error;
mod http;
pub mod manifest;
pub mod push;
pub mod reference;

pub use auth::{Credential, CredentialSource, Credentials};
pub use blobs::{sha256_digest, FetchedManifest};
pub use client::{Client, Endpoint};
pub use config::{HostConfig, Mirror, RegistryConfig, RetryPolicy};
pub use error::{Error, Result};
pub use manifest::{Descriptor, Index, Manifest, ManifestKind, Platform};
pub use reference::Reference;
