//! The normalized file tree of a layer, built from its TOC.
//!
//! TOC entries are a flat, order-dependent list (chunks follow their file, names repeat, parents
//! may be missing, hardlinks point by name, user names are written only when they change). A
//! filesystem and an extractor need the opposite: one node per inode, children per directory,
//! resolved hardlinks, link counts and each chunk's compressed byte range. This module does the
//! conversion once, rejecting what a mount must never see (unsafe names and whiteouts, see
//! [`crate::path`]; chunks that do not tile the file or go backwards in the blob; offsets outside
//! the blob; sizes beyond [`crate::limits`]). Every sum of TOC numbers is checked, so no value a
//! TOC can hold makes building, reading or fetching wrap, panic or allocate without bound, and
//! nothing here recurses over a path.

use std::collections::{BTreeMap, HashMap};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::limits::{MAX_CHUNK_SIZE, MAX_FILE_SIZE, MAX_MEMBER_SIZE};
use crate::path::{base, normalize, parent};
use crate::toc::{EntryType, Toc, TocEntry};

/// Index of a node in [`Tree::nodes`].
pub type NodeId = usize;
/// The root directory's node id.
pub const ROOT: NodeId = 0;

pub use index::NodeKind;

/// One chunk of a regular file and where its bytes are in the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Blob offset of the member holding this chunk.
    pub offset: u64,
    /// Blob offset where the next member starts (end of the compressed range to fetch).
    pub next_offset: u64,
    /// Uncompressed offset of the chunk inside its member (`innerOffset`).
    pub inner_offset: u64,
    /// Offset of the chunk in the file.
    pub chunk_offset: u64,
    /// Uncompressed length.
    pub size: u64,
    /// Expected sha256 of the chunk (absent only in legacy, unverifiable blobs).
    pub digest: Option<Digest>,
}

impl Chunk {
    /// Checks what decoding this chunk allocates from: a member range of at most
    /// [`MAX_MEMBER_SIZE`] bytes and `inner_offset + size` of at most [`MAX_CHUNK_SIZE`]. Trees
    /// built by [`Tree::build`] always pass; decoders call it because the fields are public.
    pub fn check(&self, path: &str) -> Result<()> {
        let field = |field, value, reason: String| Error::TocField {
            entry: path.to_string(),
            field,
            value,
            reason,
        };
        match self.next_offset.checked_sub(self.offset) {
            Some(len) if len > 0 && len <= MAX_MEMBER_SIZE => {}
            _ => {
                return Err(field(
                    "offset",
                    self.offset,
                    format!("starts a member ending at {}, not 1..={MAX_MEMBER_SIZE} compressed bytes later", self.next_offset),
                ))
            }
        }
        if self.size > MAX_CHUNK_SIZE {
            return Err(field("chunkSize", self.size, format!("exceeds the {MAX_CHUNK_SIZE}-byte chunk limit")));
        }
        match self.inner_offset.checked_add(self.size) {
            Some(end) if end <= MAX_CHUNK_SIZE => Ok(()),
            _ => Err(field(
                "innerOffset",
                self.inner_offset,
                format!("plus chunk size {} exceeds the {MAX_CHUNK_SIZE}-byte member prefix limit", self.size),
            )),
        }
    }
}

/// One inode.
#[derive(Debug, Clone)]
pub struct Node {
    /// Normalized path of the name that created the node ("" for the root).
    pub path: String,
    pub kind: NodeKind,
    /// Index of the TOC entry holding the metadata (`None` for implicit directories).
    pub entry: Option<usize>,
    /// Permission and setuid/setgid/sticky bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub user_name: String,
    pub group_name: String,
    pub mtime: i64,
    pub size: u64,
    pub link_target: String,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// sha256 of the whole file, when the TOC gives it.
    pub digest: Option<Digest>,
    pub chunks: Vec<Chunk>,
    pub children: BTreeMap<String, NodeId>,
    pub nlink: u32,
}

impl Node {
    fn new(path: String, kind: NodeKind) -> Self {
        Node {
            path,
            kind,
            entry: None,
            mode: if kind == NodeKind::Dir { 0o755 } else { 0 },
            uid: 0,
            gid: 0,
            user_name: String::new(),
            group_name: String::new(),
            mtime: 0,
            size: 0,
            link_target: String::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            digest: None,
            chunks: Vec::new(),
            children: BTreeMap::new(),
            nlink: 0,
        }
    }
}

/// The whole tree.
#[derive(Debug, Clone)]
pub struct Tree {
    pub nodes: Vec<Node>,
    by_path: HashMap<String, NodeId>,
}

fn bad(msg: String) -> Error {
    Error::InvalidToc(msg)
}

/// The id the kernel shows for ids it cannot represent (`overflowuid`/`overflowgid`).
pub const OVERFLOW_ID: u32 = 65534;

/// A uid/gid of the TOC. 4294967295 is `(uid_t)-1`, which chown(2) takes as "leave unchanged"
/// (an extraction would stay root-owned) and stat(2) of a FUSE file shows as 65534: it is
/// mapped to 65534 here, once, so that every consumer (mount, extraction) agrees.
fn id32(v: i64, what: &str, name: &str) -> Result<u32> {
    match u32::try_from(v) {
        Ok(u32::MAX) => Ok(OVERFLOW_ID),
        Ok(id) => Ok(id),
        Err(_) => Err(bad(format!("entry {name:?}: {what} {v} out of range"))),
    }
}

impl Tree {
    /// Builds the tree. `toc_offset` bounds the payload: every chunk must lie before the TOC.
    pub fn build(toc: &Toc, toc_offset: u64) -> Result<Tree> {
        let mut t = Tree {
            nodes: vec![Node::new(String::new(), NodeKind::Dir)],
            by_path: HashMap::from([(String::new(), ROOT)]),
        };
        // Member starts, to find where each chunk's compressed range ends.
        let mut starts: Vec<u64> = toc
            .entries
            .iter()
            .filter(|e| e.has_payload() && e.inner_offset == 0)
            .map(|e| e.offset)
            .collect();
        starts.push(toc_offset);
        starts.sort_unstable();
        starts.dedup();

        let mut users: HashMap<u32, String> = HashMap::new();
        let mut groups: HashMap<u32, String> = HashMap::new();
        let mut last_reg: Option<NodeId> = None;
        let mut hardlinks: Vec<(String, String, usize)> = Vec::new();
        for (i, e) in toc.entries.iter().enumerate() {
            let path = normalize(&e.name, "TOC entry name")?;
            if e.kind == EntryType::Chunk {
                let id = last_reg.ok_or_else(|| bad(format!("chunk entry {:?} does not follow a regular file", e.name)))?;
                if t.nodes[id].path != path {
                    return Err(bad(format!("chunk entry {:?} follows file {:?}", e.name, t.nodes[id].path)));
                }
                let c = chunk_of(e, &starts, toc_offset)?;
                t.nodes[id].chunks.push(c);
                continue;
            }
            last_reg = None;
            let uid = id32(e.uid, "uid", &e.name)?;
            let gid = id32(e.gid, "gid", &e.name)?;
            if !e.user_name.is_empty() {
                users.insert(uid, e.user_name.clone());
            }
            if !e.group_name.is_empty() {
                groups.insert(gid, e.group_name.clone());
            }
            if e.kind == EntryType::Hardlink {
                let target = normalize(&e.link_name, "hardlink target")?;
                hardlinks.push((path, target, i));
                continue;
            }
            let kind = match e.kind {
                EntryType::Dir => NodeKind::Dir,
                EntryType::Reg => NodeKind::Reg,
                EntryType::Symlink => NodeKind::Symlink,
                EntryType::Char => NodeKind::Char,
                EntryType::Block => NodeKind::Block,
                EntryType::Fifo => NodeKind::Fifo,
                EntryType::Chunk | EntryType::Hardlink => unreachable!("handled above"),
            };
            let mut n = Node::new(path.clone(), kind);
            n.entry = Some(i);
            n.mode = (e.mode & 0o7777) as u32;
            n.uid = uid;
            n.gid = gid;
            n.user_name = users.get(&uid).cloned().unwrap_or_default();
            n.group_name = groups.get(&gid).cloned().unwrap_or_default();
            n.mtime = e.mtime()?;
            n.xattrs = e.xattrs.clone();
            match kind {
                NodeKind::Reg => {
                    if e.size > MAX_FILE_SIZE {
                        return Err(Error::TocField {
                            entry: e.name.clone(),
                            field: "size",
                            value: e.size,
                            reason: format!("exceeds the {MAX_FILE_SIZE}-byte file size limit"),
                        });
                    }
                    n.size = e.size;
                    n.digest = if e.digest.is_empty() { None } else { Some(e.digest.parse()?) };
                    if e.size > 0 {
                        n.chunks.push(chunk_of(e, &starts, toc_offset)?);
                    }
                }
                NodeKind::Symlink => {
                    n.link_target = e.link_name.clone();
                    n.size = e.link_name.len() as u64;
                }
                NodeKind::Char | NodeKind::Block => {
                    n.dev_major = id32(e.dev_major, "devMajor", &e.name)?;
                    n.dev_minor = id32(e.dev_minor, "devMinor", &e.name)?;
                }
                _ => {}
            }
            let id = t.insert(n)?;
            if kind == NodeKind::Reg {
                last_reg = Some(id);
            }
        }
        for (path, target, i) in hardlinks {
            let tid = *t
                .by_path
                .get(&target)
                .ok_or_else(|| bad(format!("hardlink {:?} points at {:?}, which is not in the layer", toc.entries[i].name, target)))?;
            if t.nodes[tid].kind == NodeKind::Dir {
                return Err(bad(format!("hardlink {:?} points at directory {target:?}", toc.entries[i].name)));
            }
            if path.is_empty() {
                return Err(bad("hardlink named as the root directory".into()));
            }
            t.link(&path, tid)?;
        }
        for n in &mut t.nodes {
            finish_chunks(n)?;
        }
        t.count_links();
        Ok(t)
    }

    /// Ensures the parent directories of `path` exist; returns the parent's id. Iterative: a
    /// path may have thousands of components.
    fn parent_dir(&mut self, path: &str) -> Result<NodeId> {
        let Some(p) = parent(path) else { return Ok(ROOT) };
        // The deepest ancestor that exists (the root always does), then the missing ones below it.
        let mut missing = Vec::new();
        let mut cur = p;
        let mut id = loop {
            if let Some(&id) = self.by_path.get(cur) {
                break id;
            }
            missing.push(cur);
            cur = parent(cur).expect("the root is in by_path, so the walk ends there");
        };
        if self.nodes[id].kind != NodeKind::Dir {
            return Err(bad(format!("{path:?} is inside {cur:?}, which is not a directory")));
        }
        for dir in missing.into_iter().rev() {
            let new = self.nodes.len();
            self.nodes.push(Node::new(dir.to_string(), NodeKind::Dir));
            self.by_path.insert(dir.to_string(), new);
            self.nodes[id].children.insert(base(dir).to_string(), new);
            id = new;
        }
        Ok(id)
    }

    fn insert(&mut self, n: Node) -> Result<NodeId> {
        if n.path.is_empty() {
            if n.kind != NodeKind::Dir {
                return Err(bad("the layer root is not a directory".into()));
            }
            let children = std::mem::take(&mut self.nodes[ROOT].children);
            self.nodes[ROOT] = n;
            self.nodes[ROOT].children = children;
            return Ok(ROOT);
        }
        let path = n.path.clone();
        if let Some(&old) = self.by_path.get(&path) {
            // A directory seen again (often implicitly first) keeps its children.
            if self.nodes[old].kind == NodeKind::Dir && n.kind == NodeKind::Dir {
                let children = std::mem::take(&mut self.nodes[old].children);
                self.nodes[old] = n;
                self.nodes[old].children = children;
                return Ok(old);
            }
        }
        let id = self.nodes.len();
        self.nodes.push(n);
        self.link(&path, id)?;
        Ok(id)
    }

    fn link(&mut self, path: &str, id: NodeId) -> Result<()> {
        let pid = self.parent_dir(path)?;
        self.by_path.insert(path.to_string(), id);
        self.nodes[pid].children.insert(base(path).to_string(), id);
        Ok(())
    }

    fn count_links(&mut self) {
        for n in &mut self.nodes {
            n.nlink = if n.kind == NodeKind::Dir { 2 } else { 0 };
        }
        // Walk only what is reachable from the root: replaced duplicates are not inodes.
        let mut stack = vec![ROOT];
        let mut seen = vec![false; self.nodes.len()];
        seen[ROOT] = true;
        while let Some(d) = stack.pop() {
            let kids: Vec<NodeId> = self.nodes[d].children.values().copied().collect();
            for k in kids {
                if self.nodes[k].kind == NodeKind::Dir {
                    self.nodes[d].nlink += 1;
                } else {
                    self.nodes[k].nlink += 1;
                }
                if !seen[k] {
                    seen[k] = true;
                    if self.nodes[k].kind == NodeKind::Dir {
                        stack.push(k);
                    }
                }
            }
        }
    }

    /// Node at a path (any spelling; hardlinks resolve to their target).
    pub fn lookup(&self, path: &str) -> Option<NodeId> {
        let p = normalize(path, "path").ok()?;
        self.by_path.get(&p).copied()
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// Every reachable (path, node) pair in depth-first, name order; the root first as "".
    pub fn walk(&self) -> Vec<(String, NodeId)> {
        let mut out = vec![(String::new(), ROOT)];
        let mut stack: Vec<(String, NodeId)> = vec![(String::new(), ROOT)];
        while let Some((p, d)) = stack.pop() {
            let mut dirs = Vec::new();
            for (name, &k) in &self.nodes[d].children {
                let cp = if p.is_empty() { name.clone() } else { format!("{p}/{name}") };
                out.push((cp.clone(), k));
                if self.nodes[k].kind == NodeKind::Dir {
                    dirs.push((cp, k));
                }
            }
            stack.extend(dirs.into_iter().rev());
        }
        out
    }
}

fn chunk_of(e: &TocEntry, starts: &[u64], toc_offset: u64) -> Result<Chunk> {
    let field = |field, value, reason: String| Error::TocField {
        entry: e.name.clone(),
        field,
        value,
        reason,
    };
    if e.offset >= toc_offset || e.offset == 0 {
        return Err(field("offset", e.offset, format!("is outside the blob payload (TOC at {toc_offset})")));
    }
    let next = match starts.binary_search(&e.offset) {
        Ok(i) => starts.get(i + 1),
        Err(i) => starts.get(i),
    };
    let next_offset = *next.ok_or_else(|| bad(format!("entry {:?}: no member end after offset {}", e.name, e.offset)))?;
    if e.chunk_offset > MAX_FILE_SIZE {
        return Err(field("chunkOffset", e.chunk_offset, format!("exceeds the {MAX_FILE_SIZE}-byte file size limit")));
    }
    let digest = if e.chunk_digest.is_empty() { None } else { Some(e.chunk_digest.parse()?) };
    let c = Chunk {
        offset: e.offset,
        next_offset,
        inner_offset: e.inner_offset,
        chunk_offset: e.chunk_offset,
        size: e.chunk_size,
        digest,
    };
    // chunkSize 0 ("to the end of the file") is resolved and checked again in `finish_chunks`.
    c.check(&e.name)?;
    Ok(c)
}

/// Resolves "to end of file" chunk sizes and checks that the chunks tile the file exactly and
/// follow each other in the blob.
fn finish_chunks(n: &mut Node) -> Result<()> {
    if n.kind != NodeKind::Reg || n.chunks.is_empty() {
        return Ok(());
    }
    n.chunks.sort_by_key(|c| c.chunk_offset);
    let count = n.chunks.len();
    let mut pos = 0u64;
    let mut prev: Option<(u64, u64)> = None;
    for (i, c) in n.chunks.iter_mut().enumerate() {
        if c.chunk_offset != pos {
            return Err(bad(format!("{:?}: chunk at file offset {} leaves a gap or overlap at {pos}", n.path, c.chunk_offset)));
        }
        if c.size == 0 {
            if i + 1 != count {
                return Err(bad(format!("{:?}: only the last chunk may run to the end of the file", n.path)));
            }
            c.size = n.size.checked_sub(c.chunk_offset).filter(|s| *s > 0).ok_or_else(|| {
                bad(format!("{:?}: chunk at {} is beyond the file size {}", n.path, c.chunk_offset, n.size))
            })?;
            c.check(&n.path)?;
        }
        // The next chunk of a file comes later in the blob: in a later member, or further into
        // the same one. (`check` bounded both terms, so the sum cannot wrap.)
        if let Some((offset, inner_end)) = prev {
            if c.offset < offset || (c.offset == offset && c.inner_offset < inner_end) {
                return Err(Error::TocField {
                    entry: n.path.clone(),
                    field: "offset",
                    value: c.offset,
                    reason: format!("(innerOffset {}) of the chunk at file offset {} overlaps or precedes the file's previous chunk", c.inner_offset, c.chunk_offset),
                });
            }
        }
        prev = Some((c.offset, c.inner_offset + c.size));
        pos = pos.checked_add(c.size).filter(|&p| p <= n.size).ok_or_else(|| Error::TocField {
            entry: n.path.clone(),
            field: "chunkSize",
            value: c.size,
            reason: format!("of the chunk at file offset {} runs past the {}-byte file", c.chunk_offset, n.size),
        })?;
    }
    if pos != n.size {
        return Err(bad(format!("{:?}: chunks cover {pos} bytes of a {}-byte file", n.path, n.size)));
    }
    // Legacy blobs: a single-chunk file without chunkDigest is checked against its file digest.
    if count == 1 && n.chunks[0].digest.is_none() {
        n.chunks[0].digest = n.digest;
    }
    Ok(())
}
