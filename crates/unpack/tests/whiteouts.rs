//! Hostile whiteouts (issue 16, part 1): `.wh...` hides `..`, so an overlay-style extraction
//! used to `remove_dir_all(DEST/..)` — everything beside the extraction directory. Such names
//! are refused when the layer is opened; and a tree that carries them anyway (its fields are
//! public) is refused by the extractor before anything is removed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use estargz::{build, BuildOptions, Reader};
use unpack::{extract, extract_blob, extract_tree, Error, ExtractOptions};

#[path = "../../estargz/tests/support/mod.rs"]
#[allow(dead_code)]
mod support;
use support::{raw_tar, swap_toc};

/// A scratch directory removed on drop (this crate has no tempfile dependency).
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!("unpack-whiteouts-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `outer/` holding a sentinel file and the (empty) extraction directory `outer/dest`.
fn layout(s: &Scratch) -> (PathBuf, PathBuf) {
    let outer = s.0.join("outer");
    let dest = outer.join("dest");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(outer.join("sentinel"), b"must survive").unwrap();
    (outer, dest)
}

fn blob_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    build(raw_tar(files).as_slice(), &mut out, &BuildOptions::default()).unwrap();
    out
}

fn opts() -> ExtractOptions {
    ExtractOptions {
        verify: true,
        chown: false,
        overlay_whiteouts: true,
        skip_index_files: false,
    }
}

fn assert_intact(outer: &Path, dest: &Path) {
    assert_eq!(std::fs::read(outer.join("sentinel")).unwrap(), b"must survive", "the directory beside dest was removed");
    assert!(dest.is_dir(), "dest itself was removed");
}

#[test]
fn a_layer_with_dotdot_whiteouts_does_not_open_and_removes_nothing() {
    let blob = blob_of(&[("sub/kept", b"kept"), ("sub/.wh.placeholder", b""), (".wh.placeholder", b"")]);
    for (from, bad) in [(".wh.placeholder", ".wh..."), (".wh.placeholder", ".wh.."), ("sub/.wh.placeholder", "sub/.wh.."), ("sub/.wh.placeholder", "sub/.wh...")] {
        let s = Scratch::new();
        let (outer, dest) = layout(&s);
        let mut toc = Reader::open(blob.clone()).unwrap().toc().clone();
        toc.entries.iter_mut().find(|e| e.name == from).unwrap().name = bad.into();
        match Reader::open(swap_toc(&blob, &toc)) {
            Err(e) => assert!(e.to_string().contains(bad) && e.to_string().contains("whiteout"), "{bad}: {e}"),
            Ok(r) => {
                let res = extract(&r, &dest, &opts());
                assert_intact(&outer, &dest);
                panic!("{bad}: the layer opened (extraction: {res:?})");
            }
        }
        assert_intact(&outer, &dest);
    }
}

#[test]
fn a_tree_with_dotdot_whiteouts_is_refused_before_any_removal() {
    let blob = blob_of(&[("sub/kept", b"kept"), ("sub/.wh.placeholder", b""), (".wh.placeholder", b""), ("top", b"top")]);
    let r = Reader::open(blob).unwrap();
    for (dir, bad) in [("", ".wh..."), ("", ".wh.."), ("", ".wh."), ("sub", ".wh.."), ("sub", ".wh..."), ("sub", "..")] {
        let s = Scratch::new();
        let (outer, dest) = layout(&s);
        std::fs::create_dir_all(dest.join("sub")).unwrap();
        std::fs::write(dest.join("sub/existing"), b"lower").unwrap();
        // Rename the placeholder whiteout in `dir` to the hostile name, behind the tree's back.
        let mut tree = r.tree().clone();
        let d = tree.lookup(dir).unwrap();
        let id = tree.nodes[d].children.remove(".wh.placeholder").unwrap();
        tree.nodes[d].children.insert(bad.to_string(), id);
        let res = extract_tree(&tree, |n, c| r.read_chunk(n, c, true), &dest, &opts());
        match res {
            Err(Error::UnsafeName { entry, .. }) => assert!(entry.ends_with(bad), "{bad}: {entry}"),
            other => panic!("{dir}/{bad}: expected a refusal, got {other:?}"),
        }
        assert_intact(&outer, &dest);
        assert_eq!(std::fs::read(dest.join("sub/existing")).unwrap(), b"lower", "{bad}: dest/sub was removed");
    }
}

#[test]
fn valid_whiteouts_still_extract() {
    let blob = blob_of(&[("sub/kept", b"kept"), ("sub/.wh.gone", b""), ("sub/.wh..wh..opq", b"")]);
    let r = Reader::open(blob).unwrap();
    let s = Scratch::new();
    let (outer, dest) = layout(&s);
    std::fs::create_dir_all(dest.join("sub/gone")).unwrap();
    extract(&r, &dest, &opts()).unwrap();
    assert_intact(&outer, &dest);
    let wh = std::fs::symlink_metadata(dest.join("sub/gone")).unwrap();
    use std::os::unix::fs::FileTypeExt;
    assert!(wh.file_type().is_char_device(), "sub/gone is an overlay whiteout");
    assert_eq!(std::fs::read(dest.join("sub/kept")).unwrap(), b"kept");
}

#[test]
fn a_plain_layer_blob_extracts_with_whiteouts_and_without_the_reindexing_files() {
    let s = Scratch::new();
    let (outer, dest) = layout(&s);
    std::fs::create_dir_all(dest.join("sub/gone")).unwrap();
    let tar = raw_tar(&[("etc/a", b"x"), ("sub/.wh.gone", b"")]);
    let stats = extract_blob(&tar, &dest).unwrap();
    assert!(stats.entries >= 2, "{stats:?}");
    assert_intact(&outer, &dest);
    assert_eq!(std::fs::read(dest.join("etc/a")).unwrap(), b"x");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(dest.join("sub/gone")).unwrap().file_type().is_char_device());
    let mut root: Vec<String> = std::fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    root.sort();
    assert_eq!(root, ["etc", "sub"], "only the layer's own files (no landmark, no TOC)");
}

#[test]
fn a_hostile_plain_layer_blob_is_refused_and_writes_nothing_outside() {
    let s = Scratch::new();
    let (outer, dest) = layout(&s);
    let tar = raw_tar(&[("../escaped", b"x")]);
    assert!(extract_blob(&tar, &dest).is_err());
    assert_intact(&outer, &dest);
    assert!(!outer.join("escaped").exists());
}
