//! The format-neutral layer model: what every lazy format opens into, and all that the chunk
//! store and the lazy filesystem know about a layer.
//!
//! eStargz and zstd:chunked (crate `estargz`) build a [`LayerIndex`] from their TOC; SOCI will
//! build one from a zTOC. The store fetches and verifies [`Chunk`]s, the mount serves
//! [`Inode`]s; neither names a format type, so a new format is a new crate that produces this
//! model, and a fix to decoding ([`codec`]) or to the bounds ([`limits`]) holds for all formats.
//!
//! Pure: no I/O except through the [`BlobSource`] trait, no global state.

pub mod codec;
pub mod digest;
pub mod limits;
pub mod model;
pub mod names;
pub mod source;
pub mod zran;

pub use codec::{decode, decode_resumed, Codec, DecodeError};
pub use digest::{Digest, Hasher, InvalidDigest};
pub use model::{Chunk, ChunkBoundsError, ChunkId, Extent, Inode, IndexError, LayerIndex, NodeKind, Prefetch, Verify};
pub use source::BlobSource;
