//! The inode table a layer mount serves, built once from the layer's normalized tree.
//!
//! Why a separate view instead of serving [`estargz::Tree`] directly: overlayfs expects a lower
//! layer in its *own* on-disk form, not in tar form. A tar entry `.wh.x` must appear as a 0/0
//! character device named `x`, a `.wh..wh..opq` entry as the `trusted.overlay.opaque=y` xattr on
//! its directory, and the eStargz bookkeeping files (`.prefetch.landmark`,
//! `.no.prefetch.landmark`, the TOC) must not appear at all. Doing the translation here keeps
//! the FUSE handlers trivial and makes it testable without mounting anything.
//!
//! Inode numbers are stable: node *i* of the tree is inode *i + 1* (the root is 1, as FUSE
//! wants) and synthetic whiteouts follow the tree's nodes in walk order, so the same TOC always
//! yields the same numbers — a requirement for NFS-style file handles and for re-serving a layer
//! after a daemon restart.
//!
//! Names were validated when the tree was built ([`estargz::path`]: no `.`/`..`/empty
//! components, no whiteout of such a name), but [`Tree`]'s fields are public, so the view
//! re-checks each child name and drops what a directory listing must never show (a second `..`
//! entry from a `.wh...` whiteout, say) instead of trusting it.
//!
//! Chunks are identified by where they are *and* what they must hash to: two TOC entries naming
//! the same member range with different `chunkDigest`s get two fetcher chunks, each verified
//! against its own digest. Sharing one reference would serve the second file the first file's
//! bytes, verified against the wrong promise.

use std::collections::BTreeMap;

use estargz::path::{component_problem, whiteout, Whiteout};
use estargz::{NodeKind, Tree, ROOT};
use store::ChunkRef;

pub use estargz::path::{OPAQUE_MARKER, WHITEOUT_PREFIX};
/// The xattr overlayfs reads to treat a lower directory as opaque.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Root entries that are format bookkeeping, not layer content.
pub const HIDDEN_ROOT_NAMES: [&str; 3] = [estargz::toc::PREFETCH_LANDMARK, estargz::toc::NO_PREFETCH_LANDMARK, estargz::toc::TOC_TAR_NAME];

/// One chunk of a file: where it sits in the file and which fetcher chunk holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileChunk {
    pub file_offset: u64,
    pub size: u64,
    /// Index into the fetcher's chunk list.
    pub fetch_index: usize,
}

/// Attributes and contents of one inode.
#[derive(Debug, Clone)]
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
    /// Children sorted by name (directories only).
    pub children: Vec<(String, u64)>,
    /// The parent directory's inode (the root is its own parent).
    pub parent: u64,
    pub chunks: Vec<FileChunk>,
    /// Path inside the layer, for logs.
    pub path: String,
}

/// The whole inode table; `inodes[ino - 1]`.
#[derive(Debug)]
pub struct LayerView {
    inodes: Vec<Option<Inode>>,
    /// The chunk list to give the fetcher, in blob order.
    pub chunk_refs: Vec<ChunkRef>,
    /// Blob offset of `.prefetch.landmark`, if the layer has prioritized files.
    pub prefetch_landmark: Option<u64>,
    /// Whether the layer says "prefetch nothing" (`.no.prefetch.landmark`).
    pub no_prefetch: bool,
    /// Sum of regular file sizes.
    pub total_file_bytes: u64,
}

impl LayerView {
    /// Builds the view of a layer tree.
    pub fn build(tree: &Tree) -> LayerView {
        let n = tree.nodes.len();
        let mut inodes: Vec<Option<Inode>> = vec![None; n];
        // Chunk list in blob order, deduplicated, so that file chunks can point into it.
        let mut refs: Vec<ChunkRef> = Vec::new();
        for node in &tree.nodes {
            refs.extend(ChunkRef::of_file(node));
        }
        // The fetcher keeps its list in the same order (`ChunkRef::key`), so indices agree.
        refs.sort_by_key(ChunkRef::key);
        refs.dedup();
        let index_of = |c: &ChunkRef| refs.binary_search_by_key(&c.key(), ChunkRef::key).expect("every chunk is listed");

        let mut total_file_bytes = 0;
        let mut prefetch_landmark = None;
        let mut no_prefetch = false;
        let mut extra: Vec<Inode> = Vec::new();
        // Reachable nodes, each directory's children translated for overlayfs.
        let mut stack = vec![(ROOT, ROOT)];
        let mut seen = vec![false; n];
        seen[ROOT] = true;
        while let Some((id, parent)) = stack.pop() {
            let node = tree.node(id);
            let mut ino = base_inode(tree, id, parent as u64 + 1);
            if node.kind == NodeKind::Reg {
                ino.chunks = node
                    .chunks
                    .iter()
                    .zip(ChunkRef::of_file(node))
                    .map(|(c, r)| FileChunk {
                        file_offset: c.chunk_offset,
                        size: c.size,
                        fetch_index: index_of(&r),
                    })
                    .collect();
            }
            if node.kind == NodeKind::Dir {
                let mut kids: Vec<(String, u64)> = Vec::new();
                for (name, &kid) in &node.children {
                    if id == ROOT && HIDDEN_ROOT_NAMES.contains(&name.as_str()) {
                        let k = tree.node(kid);
                        if name == estargz::toc::PREFETCH_LANDMARK {
                            prefetch_landmark = k.chunks.first().map(|c| c.offset);
                        }
                        if name == estargz::toc::NO_PREFETCH_LANDMARK {
                            no_prefetch = true;
                        }
                        continue;
                    }
                    // Invalid names (and whiteouts of them) are refused by `Tree::build`; a tree
                    // assembled otherwise gets them dropped, never listed.
                    let kind = match whiteout(name) {
                        Ok(k) if component_problem(name).is_none() => k,
                        _ => continue,
                    };
                    if kind == Whiteout::Opaque {
                        ino.xattrs.insert(OPAQUE_XATTR.to_string(), b"y".to_vec());
                        continue;
                    }
                    if let Whiteout::Hides(hidden) = kind {
                        if node.children.contains_key(hidden) {
                            // A whiteout beside a real entry of the same name: the entry wins.
                            continue;
                        }
                        let mut wh = base_inode(tree, kid, id as u64 + 1);
                        // Like overlayfs's own whiteouts (and stargz-snapshotter's): a 0/0
                        // character device owned by root with no permission bits.
                        wh.kind = NodeKind::Char;
                        wh.perm = 0;
                        wh.uid = 0;
                        wh.gid = 0;
                        wh.size = 0;
                        wh.nlink = 1;
                        wh.rdev_major = 0;
                        wh.rdev_minor = 0;
                        wh.link_target.clear();
                        wh.xattrs.clear();
                        wh.path = join(&node.path, hidden);
                        let whino = (n + extra.len()) as u64 + 1;
                        extra.push(wh);
                        kids.push((hidden.to_string(), whino));
                        continue;
                    }
                    kids.push((name.clone(), kid as u64 + 1));
                    if !seen[kid] {
                        seen[kid] = true;
                        stack.push((kid, id));
                        if tree.node(kid).kind == NodeKind::Reg {
                            total_file_bytes += tree.node(kid).size;
                        }
                    }
                }
                kids.sort();
                ino.children = kids;
            }
            inodes[id] = Some(ino);
        }
        inodes.extend(extra.into_iter().map(Some));
        LayerView {
            inodes,
            chunk_refs: refs,
            prefetch_landmark,
            no_prefetch,
            total_file_bytes,
        }
    }

    /// The inode `ino`, if it exists and is reachable.
    pub fn get(&self, ino: u64) -> Option<&Inode> {
        let i = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.inodes.get(i)?.as_ref()
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

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn base_inode(tree: &Tree, id: usize, parent: u64) -> Inode {
    let n = tree.node(id);
    Inode {
        kind: n.kind,
        perm: (n.mode & 0o7777) as u16,
        uid: n.uid,
        gid: n.gid,
        size: n.size,
        mtime: n.mtime,
        nlink: n.nlink.max(1),
        rdev_major: n.dev_major,
        rdev_minor: n.dev_minor,
        link_target: n.link_target.as_bytes().to_vec(),
        xattrs: n.xattrs.clone(),
        children: Vec::new(),
        parent,
        chunks: Vec::new(),
        path: n.path.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use estargz::{build, BuildOptions, Reader};

    fn layer(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> Reader<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if *kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
            h.set_size(data.len() as u64);
            h.set_mtime(1_700_000_000);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let mut out = Vec::new();
        let mut opts = BuildOptions::default();
        opts.prioritized = vec!["etc/prio".to_string()];
        build(std::io::Cursor::new(tar), &mut out, &opts).unwrap();
        Reader::open(out).unwrap()
    }

    #[test]
    fn whiteouts_opaque_dirs_and_landmarks_are_translated() {
        use tar::EntryType::*;
        let r = layer(&[
            ("etc/", Directory, b"", ""),
            ("etc/prio", Regular, b"first", ""),
            ("etc/.wh.gone", Regular, b"", ""),
            ("etc/.wh..wh..opq", Regular, b"", ""),
            ("etc/kept", Regular, b"data", ""),
            ("etc/link", Link, b"", "etc/kept"),
        ]);
        let v = LayerView::build(r.tree());
        assert!(v.lookup(1, estargz::toc::PREFETCH_LANDMARK.as_bytes()).is_none());
        assert!(v.prefetch_landmark.is_some());
        let etc = v.resolve("etc").unwrap();
        let e = v.get(etc).unwrap();
        assert_eq!(e.xattrs.get(OPAQUE_XATTR).map(Vec::as_slice), Some(&b"y"[..]));
        let names: Vec<&str> = e.children.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["gone", "kept", "link", "prio"]);
        let gone = v.get(v.resolve("etc/gone").unwrap()).unwrap();
        assert_eq!((gone.kind, gone.rdev_major, gone.rdev_minor), (NodeKind::Char, 0, 0));
        // Hardlinks share the inode and count two links.
        assert_eq!(v.resolve("etc/kept"), v.resolve("etc/link"));
        assert_eq!(v.get(v.resolve("etc/kept").unwrap()).unwrap().nlink, 2);
        let prio = v.get(v.resolve("etc/prio").unwrap()).unwrap();
        assert_eq!(prio.chunks.len(), 1);
        assert!(v.chunk_refs[prio.chunks[0].fetch_index].next_offset <= v.prefetch_landmark.unwrap());
        assert_eq!(v.get(etc).unwrap().parent, 1);
        assert!(v.get(0).is_none() && v.get(v.max_ino() + 1).is_none());
    }

    #[test]
    fn chunks_naming_the_same_bytes_with_different_digests_stay_apart() {
        use tar::EntryType::*;
        let r = layer(&[("a", Regular, b"first file", ""), ("b", Regular, b"other file", "")]);
        // A TOC whose `b` points at `a`'s member but promises its own digest: `b` must be
        // fetched (and fail verification) on its own, never served `a`'s verified bytes.
        let mut tree = r.tree().clone();
        let (a, b) = (tree.lookup("a").unwrap(), tree.lookup("b").unwrap());
        let mut stolen = tree.nodes[a].chunks[0].clone();
        stolen.digest = tree.nodes[b].chunks[0].digest;
        tree.nodes[b].chunks = vec![stolen];
        let v = LayerView::build(&tree);
        let fa = v.get(v.resolve("a").unwrap()).unwrap().chunks[0].fetch_index;
        let fb = v.get(v.resolve("b").unwrap()).unwrap().chunks[0].fetch_index;
        assert_ne!(fa, fb, "two promises, two chunks");
        assert_eq!(v.chunk_refs[fa].digest, tree.nodes[a].chunks[0].digest);
        assert_eq!(v.chunk_refs[fb].digest, tree.nodes[b].chunks[0].digest);
        assert_eq!((v.chunk_refs[fa].offset, v.chunk_refs[fa].size), (v.chunk_refs[fb].offset, v.chunk_refs[fb].size));
    }

    #[test]
    fn invalid_names_in_a_tree_are_never_listed() {
        use tar::EntryType::*;
        let r = layer(&[("d/", Directory, b"", ""), ("d/.wh.x", Regular, b"", ""), ("d/f", Regular, b"f", "")]);
        for bad in [".wh...", ".wh..", ".wh.", "..", ".", "", "a/b"] {
            // `Tree::build` refuses these; a tree assembled otherwise must not reach a listing.
            let mut tree = r.tree().clone();
            let d = tree.lookup("d").unwrap();
            let id = tree.nodes[d].children.remove(".wh.x").unwrap();
            tree.nodes[d].children.insert(bad.to_string(), id);
            let v = LayerView::build(&tree);
            let names: Vec<&str> = v.get(v.resolve("d").unwrap()).unwrap().children.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["f"], "{bad:?}");
        }
    }

    #[test]
    fn paths_resolve_through_symbolic_links_like_a_loader_would() {
        use tar::EntryType::*;
        let r = layer(&[
            ("usr/", Directory, b"", ""),
            ("usr/lib/", Directory, b"", ""),
            ("usr/lib/x86_64-linux-gnu/", Directory, b"", ""),
            ("usr/lib/x86_64-linux-gnu/libz.so.1.2.13", Regular, b"\x7fELF", ""),
            ("usr/lib/x86_64-linux-gnu/libz.so.1", Symlink, b"", "libz.so.1.2.13"),
            ("lib", Symlink, b"", "usr/lib"),
            ("lib64", Symlink, b"", "/usr/lib/../lib/x86_64-linux-gnu"),
            ("loop", Symlink, b"", "loop"),
        ]);
        let v = LayerView::build(r.tree());
        let real = v.resolve("usr/lib/x86_64-linux-gnu/libz.so.1.2.13").unwrap();
        assert_eq!(v.resolve_following("/lib/x86_64-linux-gnu/libz.so.1"), Some(real));
        assert_eq!(v.resolve_following("/lib64/libz.so.1"), Some(real));
        assert_eq!(v.resolve_following("/lib/./x86_64-linux-gnu/../x86_64-linux-gnu/libz.so.1"), Some(real));
        assert_eq!(v.resolve_following("/lib/missing.so"), None);
        assert_eq!(v.resolve_following("/loop/x"), None, "a link cycle ends");
    }
}
