//! `lazypull rpull`: pull an image *through containerd* so that its eStargz layers become remote
//! snapshots instead of downloads, the way `ctr-remote image rpull` does for stargz-snapshotter.
//!
//! Why a pull of our own rather than `ctr pull`: containerd's unpacker only forwards layer
//! annotations under `containerd.io/snapshot/` to the snapshotter. The labels a remote
//! snapshotter needs to find a layer (`containerd.io/snapshot/remote/stargz.reference`,
//! `.digest`, `.layers`) are not in any manifest; a puller has to add them. This crate does what
//! containerd's client does during `Pull` + unpack, with those labels added:
//!
//! 1. resolve the reference in the registry (index → platform manifest → config);
//! 2. under a lease (so containerd's garbage collector leaves half-pulled content alone), store
//!    the index, manifest and config in containerd's content store with the
//!    `containerd.io/gc.ref.content.*` labels that make the image own its children;
//! 3. for every layer, `Snapshots.Prepare` with the labels; the snapshotter either answers
//!    `AlreadyExists` (it mounted the layer lazily and committed it under the chain ID) or gives
//!    mounts, in which case the blob is fetched into the content store, `Diff.Apply`'d onto them
//!    and committed: the normal-pull fallback, so any image can be rpulled;
//! 4. label the config with `containerd.io/gc.ref.snapshot.<snapshotter>` = top chain ID, create
//!    (or update) the image record, and release the lease.
//!
//! The registry side uses the `registry` crate (auth, mirrors, retries); the containerd side is
//! [`containerd::Containerd`], a thin typed wrapper over the generated gRPC clients. What is pure
//! (chain IDs, labels, timestamps) lives in [`labels`] and is unit-tested without a daemon.

pub mod containerd;
pub mod error;
pub mod labels;
pub mod pull;

pub use error::{Error, Result};
pub use pull::{pull, LayerOutcome, PullOptions, PullReport, UNPACKED_BY_SNAPSHOTTER_LABEL};
