//! The layer model: inodes in overlayfs form, file extents, and the chunk table they point into.
//!
//! ```text
//!   inode (dir/reg/symlink/dev/fifo, metadata, xattrs, children)
//!     └─ extents: file bytes [file_offset, +len) = chunk c's bytes [chunk_offset, +len)
//!          └─ chunk c: compressed range [offset, end) of the blob
//!               ├─ codec: how the range decodes (gzip members, zstd frames, stored)
//!               ├─ inner_offset/size: which decoded bytes are the chunk
//!               └─ verify: what the chunk must hash to before anyone sees it
//! ```
//!
//! Why this shape: the store fetches, verifies and caches *chunks* and knows nothing of files;
//! the mount serves *inodes* and asks for chunks by id. A format (eStargz, zstd:chunked, SOCI)
//! only has to say where each chunk's bytes are and how to decode and verify them. Extents carry
//! a `chunk_offset` because in SOCI one chunk (a span of the gzip stream) holds many files and
//! one file may cross spans; in eStargz every extent is a whole chunk.
//!
//! The tree is already in the form overlayfs wants for a lower layer: whiteouts are 0/0
//! character devices, opaque directories carry `trusted.overlay.opaque=y`, and format
//! bookkeeping entries (eStargz's landmarks and TOC) are not in it. Inode numbers are stable:
//! the same index always yields the same numbers (NFS-style handles, daemon restarts).
//!
//! [`LayerIndex::new`] checks the invariants the mount and the store rely on (every extent
//! inside its chunk and its file, extents in order, chunk ids in range, chunks in blob order,
//! children sorted and unique, parents and children in range), so a format's bug or a hostile
//! index is an error at open time, never a panic or a wrong byte at read time.

use std::collections::BTreeMap;

use crate::codec::Codec;
use crate::digest::Digest;
use crate::limits::{MAX_CHUNK_SIZE, MAX_MEMBER_SIZE};

/// File type of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    Reg,
    Symlink,
    Char,
    Block,
    Fifo,
}

impl NodeKind {
    /// The TOC's name for this type (`dir`, `reg`, `symlink`, `char`, `block`, `fifo`).
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Dir => "dir",
            NodeKind::Reg => "reg",
            NodeKind::Symlink => "symlink",
            NodeKind::Char => "char",
            NodeKind::Block => "block",
            NodeKind::Fifo => "fifo",
        }
    }
}

/// Index of a chunk in [`LayerIndex::chunks`].
pub type ChunkId = usize;

/// How a chunk is verified before its bytes are served or cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verify {
    /// sha256 of the chunk's uncompressed bytes (eStargz `chunkDigest`). The digest is also the
    /// chunk's identity in the node's store, which is what dedups chunks across layers.
    Uncompressed(Digest),
    /// Nothing to verify against (legacy stargz without chunk digests): such chunks are refused
    /// when read, never served unverified.
    Unverifiable,
    /// sha256 of the chunk's *compressed* range (SOCI's span digest: a zTOC has no digest of
    /// uncompressed bytes). The range is checked before it is decoded; the decoded bytes are then
    /// trusted as far as the index's checkpoint is.
    Compressed(Digest),
}

impl Verify {
    /// The digest of the uncompressed bytes, when that is how the chunk is verified.
    pub fn content_digest(&self) -> Option<Digest> {
        match self {
            Verify::Uncompressed(d) => Some(*d),
            Verify::Unverifiable | Verify::Compressed(_) => None,
        }
    }
}

/// One chunk: where its compressed bytes are, how to decode them, how to verify the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Blob offset where the compressed range holding the chunk starts.
    pub offset: u64,
    /// Blob offset where that range ends (exclusive).
    pub end: u64,
    pub codec: Codec,
    /// Offset of the chunk's first byte in what the range decodes to.
    pub inner_offset: u64,
    /// Uncompressed length.
    pub size: u64,
    pub verify: Verify,
    /// Where a [`Codec::GzipResume`] chunk's stream resumes (shared by every chunk of a span).
    pub resume: Option<std::sync::Arc<crate::zran::Resume>>,
}

/// A chunk whose numbers a decoder must not allocate from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chunk at blob offset {offset}: {reason}")]
pub struct ChunkBoundsError {
    pub offset: u64,
    pub reason: String,
}

impl Chunk {
    /// Identity of a chunk in a layer and the order of the chunk table: blob position first,
    /// then the promise, because two index entries may name the same bytes and promise different
    /// contents — each must be verified against its own promise.
    pub fn key(&self) -> (u64, u64, u64, Verify) {
        (self.offset, self.inner_offset, self.size, self.verify)
    }

    /// Checks what decoding this chunk allocates from: a compressed range of 1 to
    /// [`MAX_MEMBER_SIZE`] bytes and `inner_offset + size` of at most [`MAX_CHUNK_SIZE`].
    pub fn check(&self) -> Result<(), ChunkBoundsError> {
        let bad = |reason: String| Err(ChunkBoundsError { offset: self.offset, reason });
        match self.end.checked_sub(self.offset) {
            Some(len) if len > 0 && len <= MAX_MEMBER_SIZE => {}
            _ => return bad(format!("compressed range ends at {}, not 1..={MAX_MEMBER_SIZE} bytes later", self.end)),
        }
        if self.size > MAX_CHUNK_SIZE {
            return bad(format!("size {} exceeds the {MAX_CHUNK_SIZE}-byte chunk limit", self.size));
        }
        match (&self.resume, self.codec == Codec::GzipResume) {
            (None, false) => {}
            (Some(r), true) if r.bits <= 7 && r.window.len() == crate::zran::WINDOW_SIZE => {}
            (Some(_), true) => return bad("its checkpoint has more than 7 bits or a window other than 32 KiB".into()),
            _ => return bad(format!("codec {} with{} a checkpoint", self.codec.name(), if self.resume.is_some() { "" } else { "out" })),
        }
        match self.inner_offset.checked_add(self.size) {
            Some(end) if end <= MAX_CHUNK_SIZE => Ok(()),
            _ => bad(format!("inner offset {} plus size {} exceeds the {MAX_CHUNK_SIZE}-byte decode limit", self.inner_offset, self.size)),
        }
    }
}

/// Bytes `[file_offset, file_offset + len)` of a file are bytes `[chunk_offset, chunk_offset +
/// len)` of chunk `chunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub file_offset: u64,
    pub len: u64,
    pub chunk: ChunkId,
    pub chunk_offset: u64,
}

/// Attributes and contents of one inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub kind: NodeKind,
    /// Permission bits plus setuid/setgid/sticky.
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub nlink: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub link_target: Vec<u8>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Children sorted by name (directories only), as (name, inode number).
    pub children: Vec<(String, u64)>,
    /// The parent directory's inode number (the root is its own parent).
    pub parent: u64,
    /// The file's bytes, in file order (regular files only).
    pub extents: Vec<Extent>,
    /// Path inside the layer, for logs.
    pub path: String,
}

impl Inode {
    /// An inode of `kind` with no metadata yet.
    pub fn new(kind: NodeKind, path: String, parent: u64) -> Inode {
        Inode {
            kind,
            perm: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            nlink: 1,
            rdev_major: 0,
            rdev_minor: 0,
            link_target: Vec::new(),
            xattrs: BTreeMap::new(),
            children: Vec::new(),
            parent,
            extents: Vec::new(),
            path,
        }
    }
}

/// What a layer asks to be fetched right after it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prefetch {
    /// The layer says nothing; the mount decides (small layers are fetched whole).
    Unspecified,
    /// The layer asks for no prefetch (eStargz `.no.prefetch.landmark`).
    Nothing,
    /// Every chunk whose compressed range starts before this blob offset (eStargz's
    /// prioritized files, ending at `.prefetch.landmark`).
    UpTo(u64),
    /// Every chunk whose compressed range lies inside one of these blob ranges (a SOCI
    /// prefetch artifact's spans), in this order.
    Ranges(std::sync::Arc<[std::ops::Range<u64>]>),
}

impl Prefetch {
    /// The blob ranges a mount-time prefetch covers (`UpTo(end)` is `0..end`).
    pub fn blob_ranges(&self) -> Vec<std::ops::Range<u64>> {
        match self {
            Prefetch::UpTo(end) => vec![std::ops::Range { start: 0, end: *end }],
            Prefetch::Ranges(r) => r.to_vec(),
            Prefetch::Unspecified | Prefetch::Nothing => Vec::new(),
        }
    }
}

/// Why an index breaks the model's invariants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("layer index: {0}")]
pub struct IndexError(pub String);

/// A layer, opened: the inode table and the chunk table. Inode *n* is `inodes[n - 1]`; the root
/// is inode 1. Unreachable slots are `None`.
#[derive(Debug, Clone)]
pub struct LayerIndex {
    inodes: Vec<Option<Inode>>,
    chunks: Vec<Chunk>,
    prefetch: Prefetch,
    total_file_bytes: u64,
}

impl LayerIndex {
    /// Checks the invariants (module docs) and builds the index. `chunks` must be sorted by
    /// [`Chunk::key`] without duplicates: the store keeps its chunk list in that order, so chunk
    /// ids are the same on both sides of the seam.
    pub fn new(inodes: Vec<Option<Inode>>, chunks: Vec<Chunk>, prefetch: Prefetch) -> Result<LayerIndex, IndexError> {
        let bad = |m: String| Err(IndexError(m));
        if !matches!(inodes.first(), Some(Some(root)) if root.kind == NodeKind::Dir) {
            return bad("the root (inode 1) is missing or not a directory".into());
        }
        if let Some(i) = chunks.windows(2).position(|w| w[0].key() >= w[1].key()) {
            return bad(format!("chunk table not in blob order at chunk {}", i + 1));
        }
        for c in &chunks {
            c.check().map_err(|e| IndexError(e.to_string()))?;
        }
        let max = inodes.len() as u64;
        let mut total_file_bytes = 0u64;
        for ino in inodes.iter().flatten() {
            let p = &ino.path;
            if ino.parent == 0 || ino.parent > max {
                return bad(format!("{p:?}: parent inode {} out of range", ino.parent));
            }
            if ino.children.windows(2).any(|w| w[0].0 >= w[1].0) {
                return bad(format!("{p:?}: children not sorted or not unique"));
            }
            if let Some((name, _)) = ino.children.iter().find(|(n, k)| *k == 0 || *k > max || crate::names::component_problem(n).is_some()) {
                return bad(format!("{p:?}: child {name:?} has a bad name or inode number"));
            }
            if !ino.children.is_empty() && ino.kind != NodeKind::Dir {
                return bad(format!("{p:?}: a {} with children", ino.kind.as_str()));
            }
            if !ino.extents.is_empty() && ino.kind != NodeKind::Reg {
                return bad(format!("{p:?}: a {} with contents", ino.kind.as_str()));
            }
            let mut at = 0u64;
            for e in &ino.extents {
                let Some(c) = chunks.get(e.chunk) else {
                    return bad(format!("{p:?}: extent names chunk {} of {}", e.chunk, chunks.len()));
                };
                let fits_chunk = e.chunk_offset.checked_add(e.len).is_some_and(|end| end <= c.size);
                let file_end = e.file_offset.checked_add(e.len);
                if e.len == 0 || e.file_offset < at || !fits_chunk || file_end.is_none_or(|end| end > ino.size) {
                    return bad(format!("{p:?}: extent at file offset {} (length {}) is empty, out of order, or outside its chunk or file", e.file_offset, e.len));
                }
                at = e.file_offset + e.len;
            }
            if ino.kind == NodeKind::Reg {
                total_file_bytes = total_file_bytes.saturating_add(ino.size);
            }
        }
        for (n, ino) in inodes.iter().enumerate() {
            if let Some(ino) = ino {
                if let Some((name, _)) = ino.children.iter().find(|(_, k)| inodes[(*k - 1) as usize].is_none()) {
                    return bad(format!("{:?} (inode {}): child {name:?} is an empty slot", ino.path, n + 1));
                }
            }
        }
        Ok(LayerIndex { inodes, chunks, prefetch, total_file_bytes })
    }

    /// The inode `ino`, if it exists and is reachable.
    pub fn get(&self, ino: u64) -> Option<&Inode> {
        let i = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.inodes.get(i)?.as_ref()
    }

    /// Every inode slot, by inode number minus one.
    pub fn inodes(&self) -> &[Option<Inode>] {
        &self.inodes
    }

    /// The chunk table, in [`Chunk::key`] order.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    pub fn prefetch(&self) -> &Prefetch {
        &self.prefetch
    }

    /// Replaces what the layer asks to prefetch (a format whose prefetch set lives outside
    /// its index, as SOCI's prefetch artifacts do).
    pub fn set_prefetch(&mut self, prefetch: Prefetch) {
        self.prefetch = prefetch;
    }

    /// Sum of regular file sizes.
    pub fn total_file_bytes(&self) -> u64 {
        self.total_file_bytes
    }

    /// Looks a name up in directory `dir`.
    pub fn lookup(&self, dir: u64, name: &[u8]) -> Option<u64> {
        let d = self.get(dir)?;
        d.children.binary_search_by(|(n, _)| n.as_bytes().cmp(name)).ok().map(|i| d.children[i].1)
    }

    /// Inode of a path ("" or "/" for the root), following directories only.
    pub fn resolve(&self, path: &str) -> Option<u64> {
        let mut ino = 1;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = self.lookup(ino, part.as_bytes())?;
        }
        Some(ino)
    }

    /// Inode of an absolute path, following symbolic links on the way as the kernel would if
    /// this layer were the whole file system (at most 40 links).
    pub fn resolve_following(&self, path: &str) -> Option<u64> {
        let mut todo: Vec<String> = path.split('/').filter(|p| !p.is_empty()).rev().map(str::to_string).collect();
        let (mut ino, mut links) = (1, 0);
        while let Some(part) = todo.pop() {
            match part.as_str() {
                "." => continue,
                ".." => {
                    ino = self.get(ino)?.parent;
                    continue;
                }
                _ => {}
            }
            let next = self.lookup(ino, part.as_bytes())?;
            let node = self.get(next)?;
            if node.kind != NodeKind::Symlink {
                ino = next;
                continue;
            }
            links += 1;
            if links > 40 {
                return None;
            }
            let target = std::str::from_utf8(&node.link_target).ok()?;
            if target.starts_with('/') {
                ino = 1;
            }
            todo.extend(target.split('/').filter(|p| !p.is_empty()).rev().map(str::to_string));
        }
        Some(ino)
    }

    /// Number of inode slots (the largest inode number).
    pub fn max_ino(&self) -> u64 {
        self.inodes.len() as u64
    }

    /// Number of reachable inodes.
    pub fn count(&self) -> usize {
        self.inodes.iter().filter(|i| i.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64, size: u64) -> Chunk {
        Chunk {
            offset,
            end: offset + 10,
            codec: Codec::GzipMembers,
            inner_offset: 0,
            size,
            verify: Verify::Uncompressed(Digest::of(&offset.to_le_bytes())),
            resume: None,
        }
    }

    fn small() -> (Vec<Option<Inode>>, Vec<Chunk>) {
        let mut root = Inode::new(NodeKind::Dir, String::new(), 1);
        root.children = vec![("a".into(), 2)];
        let mut a = Inode::new(NodeKind::Reg, "a".into(), 1);
        a.size = 150;
        a.extents = vec![
            Extent { file_offset: 0, len: 100, chunk: 0, chunk_offset: 0 },
            Extent { file_offset: 100, len: 50, chunk: 1, chunk_offset: 10 },
        ];
        (vec![Some(root), Some(a)], vec![chunk(0, 100), chunk(10, 60)])
    }

    #[test]
    fn a_consistent_index_is_accepted_and_resolves() {
        let (inodes, chunks) = small();
        let idx = LayerIndex::new(inodes, chunks, Prefetch::Unspecified).unwrap();
        assert_eq!(idx.resolve("/a"), Some(2));
        assert_eq!(idx.resolve_following("/a"), Some(2));
        assert_eq!(idx.lookup(1, b"b"), None);
        assert_eq!(idx.total_file_bytes(), 150);
        assert_eq!(idx.count(), 2);
    }

    #[test]
    fn broken_invariants_are_refused() {
        let cases: Vec<(&str, Box<dyn Fn(&mut Vec<Option<Inode>>, &mut Vec<Chunk>)>)> = vec![
            ("extent past its chunk", Box::new(|i, _| i[1].as_mut().unwrap().extents[1].chunk_offset = 11)),
            ("extent past its file", Box::new(|i, _| i[1].as_mut().unwrap().size = 149)),
            ("unknown chunk", Box::new(|i, _| i[1].as_mut().unwrap().extents[1].chunk = 2)),
            ("overlapping extents", Box::new(|i, _| i[1].as_mut().unwrap().extents[1].file_offset = 99)),
            ("unsorted chunk table", Box::new(|_, c| c.swap(0, 1))),
            ("oversized chunk", Box::new(|_, c| c[1].size = MAX_CHUNK_SIZE + 1)),
            ("child out of range", Box::new(|i, _| i[0].as_mut().unwrap().children[0].1 = 3)),
            ("dot-dot child", Box::new(|i, _| i[0].as_mut().unwrap().children[0].0 = "..".into())),
            ("root not a directory", Box::new(|i, _| i[0].as_mut().unwrap().kind = NodeKind::Reg)),
            ("child is an empty slot", Box::new(|i, _| i[1] = None)),
            ("contents on a symlink", Box::new(|i, _| i[1].as_mut().unwrap().kind = NodeKind::Symlink)),
        ];
        for (what, break_it) in cases {
            let (mut inodes, mut chunks) = small();
            break_it(&mut inodes, &mut chunks);
            assert!(LayerIndex::new(inodes, chunks, Prefetch::Unspecified).is_err(), "{what} accepted");
        }
    }
}
