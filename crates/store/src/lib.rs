//! Chunk storage and fetching for lazily mounted layers.
//!
//! This crate knows *chunks* — a digest, a compressed byte range of a blob, an uncompressed
//! size — not files or inodes (that is the `fs` crate's job) and not HTTP (the `registry`
//! crate's). Two pieces:
//!
//! - [`ChunkStore`]: verified, uncompressed chunks on disk, content-addressed so that a chunk
//!   shared by layers or images is stored once, with atomic writes, an LRU size limit and a
//!   bounded memory cache in front.
//! - [`LayerFetcher`]: the per-layer scheduler that turns chunk requests into as few verified
//!   range requests as possible (single flight, coalescing, readahead, parallel decode,
//!   prioritized prefetch, a polite background fill).
//!
//! Everything is synchronous: the callers are FUSE worker threads, and the registry source
//! bridges to the async client itself (see [`source`]).

pub mod chunks;
pub mod error;
pub mod fetcher;
pub mod link;
mod lru;
pub mod source;
pub mod tails;
pub mod verify;

pub use chunks::{file_identity, ChunkStore, FileIdentity, FileSlot, StoreConfig, StoreStats, StoreUsage};
pub use error::{Error, Result};
pub use link::LinkActivity;
pub use fetcher::{chunk_refs, object_key, ChunkRef, Codec, FetchConfig, LayerFetcher, LayerStats, LATENCY_BUCKETS_MS};
pub use source::{BlobSourceAdapter, FileRangeSource, RangeSource, RegistryRangeSource};
pub use tails::{TailCache, TailSource};
