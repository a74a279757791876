//! Bounds on what a layer may declare.
//!
//! A layer's index (an eStargz TOC, a zTOC) is untrusted input: every number in it ends up in
//! an allocation, a slice index or a sum, and every name in a path a mount serves or an
//! extraction writes. Each format checks them once when it builds its tree; the decoders
//! ([`crate::codec`], [`crate::Chunk::check`]) re-check the few values they allocate from,
//! because the model's fields are public and may come from elsewhere. The limits live here, not
//! in one format, so that every format promises the same bounds to the store and the mount.
//!
//! The limits are far above what real producers write (the reference writer's default chunk is
//! 4 MiB; Linux's `NAME_MAX` is 255 and its `PATH_MAX` 4096 bytes) and low enough that the worst
//! hostile blob costs a bounded amount of memory and stack:
//!
//! * one chunk decode holds at most [`MAX_MEMBER_SIZE`] compressed bytes plus
//!   [`MAX_CHUNK_SIZE`] + [`DECODE_SLACK`] decompressed bytes (≈ 96 MiB), so even the fetcher's
//!   default four parallel requests stay under 512 MiB for one blob;
//! * no path is deeper than [`MAX_PATH_DEPTH`] components, and nothing walks a path recursively.

/// Longest path component (bytes), as Linux's `NAME_MAX`.
pub const MAX_NAME_LEN: usize = 255;

/// Most components of one path. A deeper path cannot be created on Linux anyway (each component
/// needs at least two bytes of `PATH_MAX`); a TOC with 20 000 of them used to overflow the stack.
pub const MAX_PATH_DEPTH: usize = 4096;

/// Largest regular file (1 PiB). Keeps every sum of offsets and sizes in a file far from
/// wrapping a `u64`.
pub const MAX_FILE_SIZE: u64 = 1 << 50;

/// Largest uncompressed prefix of a member that decoding one chunk may inflate:
/// `innerOffset + chunkSize` (32 MiB, 8× the reference writer's default chunk). The writer
/// refuses larger chunk sizes, so whatever it writes, it reads back.
pub const MAX_CHUNK_SIZE: u64 = 32 << 20;

/// Largest compressed member range (`offset` to the next member) fetched for one chunk. A
/// member holds its chunk (at worst incompressible, so about [`MAX_CHUNK_SIZE`]) plus the tar
/// headers of the payload-less entries that follow it; 32 MiB of compressed headers is over a
/// million entries.
pub const MAX_MEMBER_SIZE: u64 = 64 << 20;

/// How much more than the chunk a gzip member may inflate to and still take the fast,
/// whole-member decode path (the padding and headers after a chunk are usually a few KiB).
/// Larger members are decoded by streaming only the declared prefix.
pub const DECODE_SLACK: u64 = 256 << 10;
