//! SOCI (Seekable OCI) formats: lazily pull *unmodified* gzip and tar layers.
//!
//! SOCI leaves the image alone and stores, next to it in the registry, one zTOC per large
//! layer: the tar entries with their uncompressed offsets, plus checkpoints that let an
//! inflater resume inside the gzip stream, plus a digest per span of compressed bytes. This
//! crate is the pure format side of lazypull's SOCI support, with no network and no FUSE:
//!
//! - [`ztoc`]: the zTOC document, parsed (and checked) from and written to FlatBuffers;
//! - [`zinfo`]: the span table inside it (gzip checkpoints, or fixed tar slices);
//! - [`build`]: the zTOC builder, one streaming pass over a layer blob;
//! - [`extract`]: inflating bytes from a checkpoint, verifying spans, reading files;
//! - [`layer_model`]: a zTOC as the format-neutral layer model (what the mount serves);
//! - [`prefetch`]: prefetch artifacts (span ranges to fetch at mount, kept beside the zTOC);
//! - [`inflate`]: the block-aware raw inflater the two above share (`index::zran`).
//!
//! The reference for every byte is the SOCI project's own builder (v0.15.0); the tests check
//! our parser, reader and builder against zTOCs it produced.

pub mod build;
pub mod extract;
pub mod layer_model;
pub mod prefetch;
mod fbs;
/// The block-aware raw inflater (from the layer model crate, which decodes spans at read time).
pub use index::zran as inflate;
pub mod time;
pub mod zinfo;
pub mod ztoc;

pub use build::{build_ztoc, BuildError, BuildOptions, DEFAULT_SPAN_SIZE};
pub use extract::{inflate_at, read_entry, verify_span, BlobRange, ExtractError};
pub use zinfo::{Checkpoint, SpanTable, ZinfoError};
pub use prefetch::{PrefetchArtifact, PrefetchError, PREFETCH_MEDIA_TYPE};
pub use ztoc::{Compression, Entry, EntryKind, Ztoc, ZtocError};
