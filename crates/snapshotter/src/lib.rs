//! lazypull as a containerd snapshotter (proxy plugin).
//!
//! [`snapshots::Snapshotter`] implements the semantics of containerd's overlayfs snapshotter
//! (prepare/view/commit/remove, parent chains, labels, usage, walk filters, cleanup) over an
//! embedded transactional store ([`meta`]), and adds *remote snapshots*: layers that are
//! eStargz are mounted lazily through the `fs` crate instead of being downloaded. gRPC stays at
//! the edge ([`service`]); the lazy mounting sits behind the [`snapshots::Remote`] trait
//! ([`remote`] is the real one), so the snapshot logic is tested without FUSE or a registry.

pub mod error;
pub mod filter;
pub mod listener;
pub mod meta;
pub mod remote;
pub mod service;
pub mod snapshots;

/// Generated code for containerd's API (shared with `lazypull rpull`).
pub mod api {
    pub use containerd_api::{snapshots, types};
}

pub use error::{Error, Result};
pub use snapshots::{Remote, Snapshotter};
