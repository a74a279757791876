//! eStargz and zstd:chunked behind the layer seam: a TOC's [`Tree`] as a format-neutral
//! [`LayerIndex`].
//!
//! What the conversion does, once per opened layer, so that nothing downstream knows it was a TOC:
//! - tar-form names become overlayfs form: a `.wh.x` entry is a 0/0 character device named `x`
//!   (unless a real `x` sits beside it: the entry wins), `.wh..wh..opq` is the
//!   `trusted.overlay.opaque=y` xattr on its directory;
//! - the format's bookkeeping entries at the root (`.prefetch.landmark`, `.no.prefetch.landmark`,
//!   the TOC itself) leave the tree and become the layer's [`Prefetch`] hint;
//! - each TOC chunk becomes a table chunk (compressed range from its member's offset to the next
//!   member, the blob's codec, `innerOffset`, size, `chunkDigest` as the uncompressed sha256),
//!   deduplicated by position *and* digest — two entries naming the same member range with
//!   different `chunkDigest`s get two chunks, each verified against its own promise — and each
//!   file chunk an extent of one whole table chunk.
//!
//! Inode numbers: node *i* of the tree is inode *i + 1* (the root is 1, as FUSE wants) and the
//! synthetic whiteouts follow the tree's nodes in walk order, so the same TOC always yields the
//! same numbers. Names were validated when the tree was built ([`crate::path`]), but [`Tree`]'s
//! fields are public, so each child name is re-checked and what a listing must never show is
//! dropped instead of trusted.

use index::names::{component_problem, whiteout, Whiteout, OPAQUE_XATTR};
use index::{Chunk, Extent, IndexError, Inode, LayerIndex, NodeKind, Prefetch, Verify};

use crate::compression::Compression;
use crate::toc::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME};
use crate::tree::{Tree, ROOT};

/// Root entries that are format bookkeeping, not layer content.
pub const HIDDEN_ROOT_NAMES: [&str; 3] = [PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME];

/// The layer model of a blob whose TOC built `tree` and whose members use `compression`.
pub fn layer_index(tree: &Tree, compression: Compression) -> Result<LayerIndex, IndexError> {
    let codec = compression.codec();
    layer_index_with(tree, |c| Chunk {
        offset: c.offset,
        end: c.next_offset,
        codec,
        inner_offset: c.inner_offset,
        size: c.size,
        verify: c.digest.map_or(Verify::Unverifiable, Verify::Uncompressed),
        resume: None,
    })
}

/// The layer model of a tree whose file chunks `table_chunk` turns into table chunks: the tar
/// semantics (whiteouts, opaque directories, hardlinks, implicit parents) are the same for
/// every tar-based format, only where a chunk's bytes are and how they verify differ (SOCI
/// builds its tree from a zTOC and maps chunks onto gzip spans).
pub fn layer_index_with(tree: &Tree, table_chunk: impl Fn(&crate::tree::Chunk) -> Chunk) -> Result<LayerIndex, IndexError> {
    let mut chunks: Vec<Chunk> = tree.nodes.iter().flat_map(|n| n.chunks.iter().map(&table_chunk)).collect();
    chunks.sort_by_key(Chunk::key);
    chunks.dedup_by_key(|c| c.key());
    let id_of = |c: &Chunk| chunks.binary_search_by_key(&c.key(), Chunk::key).expect("every chunk is in the table");

    let n = tree.nodes.len();
    let mut inodes: Vec<Option<Inode>> = vec![None; n];
    let mut prefetch = Prefetch::Unspecified;
    let mut extra: Vec<Inode> = Vec::new();
    let mut stack = vec![(ROOT, ROOT)];
    let mut seen = vec![false; n];
    seen[ROOT] = true;
    while let Some((id, parent)) = stack.pop() {
        let node = tree.node(id);
        let mut ino = base_inode(tree, id, parent as u64 + 1);
        if node.kind == NodeKind::Reg {
            ino.extents = node
                .chunks
                .iter()
                .filter(|c| c.size > 0)
                .map(|c| Extent {
                    file_offset: c.chunk_offset,
                    len: c.size,
                    chunk: id_of(&table_chunk(c)),
                    chunk_offset: 0,
                })
                .collect();
        }
        if node.kind == NodeKind::Dir {
            let mut kids: Vec<(String, u64)> = Vec::new();
            for (name, &kid) in &node.children {
                if id == ROOT && HIDDEN_ROOT_NAMES.contains(&name.as_str()) {
                    if name == PREFETCH_LANDMARK && prefetch != Prefetch::Nothing {
                        if let Some(c) = tree.node(kid).chunks.first() {
                            prefetch = Prefetch::UpTo(c.offset);
                        }
                    }
                    if name == NO_PREFETCH_LANDMARK {
                        prefetch = Prefetch::Nothing;
                    }
                    continue;
                }
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
                    // Like overlayfs's own whiteouts (and stargz-snapshotter's): a 0/0
                    // character device owned by root with no permission bits.
                    let mut wh = Inode::new(NodeKind::Char, join(&node.path, hidden), id as u64 + 1);
                    wh.mtime = tree.node(kid).mtime;
                    let whino = (n + extra.len()) as u64 + 1;
                    extra.push(wh);
                    kids.push((hidden.to_string(), whino));
                    continue;
                }
                kids.push((name.clone(), kid as u64 + 1));
                if !seen[kid] {
                    seen[kid] = true;
                    stack.push((kid, id));
                }
            }
            kids.sort();
            ino.children = kids;
        }
        inodes[id] = Some(ino);
    }
    inodes.extend(extra.into_iter().map(Some));
    LayerIndex::new(inodes, chunks, prefetch)
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
        extents: Vec::new(),
        path: n.path.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{build, BuildOptions, Reader};

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

    fn index_of(tree: &Tree) -> LayerIndex {
        layer_index(tree, Compression::Gzip).unwrap()
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
        let v = index_of(r.tree());
        assert!(v.lookup(1, PREFETCH_LANDMARK.as_bytes()).is_none());
        let &Prefetch::UpTo(landmark) = v.prefetch() else { panic!("no landmark: {:?}", v.prefetch()) };
        let etc = v.resolve("etc").unwrap();
        let e = v.get(etc).unwrap();
        assert_eq!(e.xattrs.get(OPAQUE_XATTR).map(Vec::as_slice), Some(&b"y"[..]));
        let names: Vec<&str> = e.children.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["gone", "kept", "link", "prio"]);
        let gone = v.get(v.resolve("etc/gone").unwrap()).unwrap();
        assert_eq!((gone.kind, gone.rdev_major, gone.rdev_minor, gone.perm), (NodeKind::Char, 0, 0, 0));
        // Hardlinks share the inode and count two links.
        assert_eq!(v.resolve("etc/kept"), v.resolve("etc/link"));
        assert_eq!(v.get(v.resolve("etc/kept").unwrap()).unwrap().nlink, 2);
        let prio = v.get(v.resolve("etc/prio").unwrap()).unwrap();
        assert_eq!(prio.extents.len(), 1);
        assert!(v.chunks()[prio.extents[0].chunk].end <= landmark);
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
        let v = index_of(&tree);
        let fa = v.get(v.resolve("a").unwrap()).unwrap().extents[0].chunk;
        let fb = v.get(v.resolve("b").unwrap()).unwrap().extents[0].chunk;
        assert_ne!(fa, fb, "two promises, two chunks");
        assert_eq!(v.chunks()[fa].verify.content_digest(), tree.nodes[a].chunks[0].digest);
        assert_eq!(v.chunks()[fb].verify.content_digest(), tree.nodes[b].chunks[0].digest);
        assert_eq!((v.chunks()[fa].offset, v.chunks()[fa].size), (v.chunks()[fb].offset, v.chunks()[fb].size));
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
            let v = index_of(&tree);
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
        let v = index_of(r.tree());
        let real = v.resolve("usr/lib/x86_64-linux-gnu/libz.so.1.2.13").unwrap();
        assert_eq!(v.resolve_following("/lib/x86_64-linux-gnu/libz.so.1"), Some(real));
        assert_eq!(v.resolve_following("/lib64/libz.so.1"), Some(real));
        assert_eq!(v.resolve_following("/lib/./x86_64-linux-gnu/../x86_64-linux-gnu/libz.so.1"), Some(real));
        assert_eq!(v.resolve_following("/lib/missing.so"), None);
        assert_eq!(v.resolve_following("/loop/x"), None, "a link cycle ends");
    }

    #[test]
    fn no_prefetch_landmark_wins() {
        use tar::EntryType::*;
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(Regular);
        h.set_size(1);
        h.set_cksum();
        tar.append_data(&mut h, "f", &b"x"[..]).unwrap();
        let mut out = Vec::new();
        build(std::io::Cursor::new(tar.into_inner().unwrap()), &mut out, &BuildOptions::default()).unwrap();
        let r = Reader::open(out).unwrap();
        assert_eq!(index_of(r.tree()).prefetch(), &Prefetch::Nothing);
    }
}
