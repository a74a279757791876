//! The eStargz layer format, and its zstd:chunked sibling.
//!
//! An eStargz blob is a valid `tar.gz` that any runtime can pull normally, plus a table of
//! contents (TOC) at the end that lets a lazy runtime fetch single files: every file payload
//! starts a new gzip member, the TOC lists each file's (chunk's) compressed offset and sha256,
//! and a fixed-size footer points at the TOC. This crate writes, reads and verifies such blobs
//! byte-compatibly with containerd's stargz-snapshotter.
//!
//! It is deliberately pure: no network, no FUSE, no global state. All blob access goes through
//! the [`BlobSource`] positional-read trait so the registry and filesystem layers can plug in
//! HTTP ranges and caches without this crate knowing.
//!
//! * [`build`] — tar / tar.gz / tar.zst → blob; deterministic regardless of thread count.
//! * [`Reader`] — footer + TOC in at most two reads; file reads decompress only touched chunks.
//! * [`verify_chunks`], [`Reader::verify_toc`] — integrity checks.

pub mod compression;
pub mod digest;
pub mod error;
pub mod footer;
pub mod layer_model;
pub use index::limits;
pub mod path;
pub mod reader;
pub mod tar;
pub mod time;
pub mod toc;
pub mod tree;
pub mod verify;
pub mod writer;

pub use compression::Compression;
pub use digest::Digest;
pub use error::{Error, Result};
pub use footer::{Footer, FooterKind};
pub use reader::{decode_chunk, BlobSource, FileSource, OpenOptions, RawToc, Reader};
pub use time::{format_rfc3339, parse_rfc3339};
pub use toc::{EntryType, Toc, TocEntry};
pub use tree::{Chunk, Node, NodeId, NodeKind, Tree, ROOT};
pub use verify::{verify_chunks, VerifyStats};
pub use writer::{build, BuildOptions, BuildResult};
