//! Hostile names (issue 16, part 1): whiteouts of `.`/`..`/empty names, overlong components
//! and very deep paths. Each must be refused where it enters — the tar indexer of the writer or
//! the tree built from a TOC — with an error naming the entry and the field, so neither a mount
//! nor an extraction ever sees it.

mod support;

use estargz::limits::MAX_PATH_DEPTH;
use estargz::{build, BuildOptions, EntryType, Error, Reader, Toc};
use support::*;

/// Whiteouts whose hidden name is `..`, `.` or empty, at the root and below.
const BAD_WHITEOUTS: [&str; 6] = [".wh...", "sub/.wh..", ".wh..", ".wh.", "sub/.wh...", "a/b/.wh."];

fn sample() -> Vec<u8> {
    small_chunk_blob(&[Item::dir("sub"), Item::file("sub/kept", b"kept".to_vec()), Item::file("victim", b"payload".to_vec())])
}

/// `sample()` with the TOC entry `victim` renamed to `name`.
fn renamed(name: &str) -> Vec<u8> {
    let blob = sample();
    let mut toc: Toc = Reader::open(blob.clone()).unwrap().toc().clone();
    toc.entries.iter_mut().find(|e| e.name == "victim").unwrap().name = name.to_string();
    swap_toc(&blob, &toc)
}

fn expect_unsafe(res: estargz::Result<impl Sized>, name: &str, field: &str, needle: &str) {
    match res {
        Ok(_) => panic!("{name:?} was accepted"),
        Err(Error::UnsafePath { what, path, reason }) => {
            assert_eq!(path, name);
            assert_eq!(what, field, "{name:?}");
            assert!(reason.contains(needle), "{name:?}: {reason}");
        }
        Err(other) => panic!("{name:?}: expected an unsafe-path error, got {other}"),
    }
}

#[test]
fn whiteouts_of_dot_names_in_a_toc_are_rejected_at_open() {
    for bad in BAD_WHITEOUTS {
        expect_unsafe(Reader::open(renamed(bad)), bad, "TOC entry name", "whiteout");
    }
    // As a hardlink target too.
    let blob = sample();
    let mut toc = Reader::open(blob.clone()).unwrap().toc().clone();
    let e = toc.entries.iter_mut().find(|e| e.name == "victim").unwrap();
    e.kind = EntryType::Hardlink;
    e.link_name = "sub/.wh..".into();
    e.size = 0;
    e.offset = 0;
    expect_unsafe(Reader::open(swap_toc(&blob, &toc)), "sub/.wh..", "hardlink target", "whiteout");
}

#[test]
fn whiteouts_of_dot_names_in_tar_input_are_rejected_at_conversion() {
    for bad in BAD_WHITEOUTS {
        let tarball = raw_tar(&[("ok", b"x"), (bad, b"")]);
        expect_unsafe(build(tarball.as_slice(), Vec::new(), &BuildOptions::default()), bad, "tar entry name", "whiteout");
        // Compressed input takes the same path.
        let gz = pipe("gzip", &["-c"], &tarball);
        let err = build(gz.as_slice(), Vec::new(), &BuildOptions::default()).unwrap_err().to_string();
        assert!(err.contains(bad) && err.contains("whiteout"), "{bad}: {err}");
    }
}

#[test]
fn valid_whiteouts_and_opaque_markers_still_convert_and_open() {
    let names = ["d/.wh.gone", "d/.wh..wh..opq", ".wh..hidden-dotfile", ".wh.x..y"];
    let files: Vec<(&str, &[u8])> = names.iter().map(|n| (*n, &b""[..])).collect();
    let mut blob = Vec::new();
    build(raw_tar(&files).as_slice(), &mut blob, &BuildOptions::default()).unwrap();
    let r = Reader::open(blob).unwrap();
    for n in names {
        r.lookup(n).unwrap_or_else(|e| panic!("{n}: {e}"));
    }
}

#[test]
fn overlong_components_are_rejected() {
    let long = format!("sub/{}", "n".repeat(256));
    expect_unsafe(Reader::open(renamed(&long)), &long, "TOC entry name", "255");
    let ok = format!("sub/{}", "n".repeat(255));
    Reader::open(renamed(&ok)).unwrap().lookup(&ok).unwrap();
}

#[test]
fn very_deep_paths_are_rejected_without_overflowing_the_stack() {
    // 20 000 components used to recurse once per component while creating parents.
    let deep = vec!["d"; 20_000].join("/");
    expect_unsafe(Reader::open(renamed(&deep)), &deep, "TOC entry name", "components");
    // The deepest accepted path builds its implicit parents iteratively, on a small stack.
    let deepest = vec!["d"; MAX_PATH_DEPTH].join("/");
    let blob = renamed(&deepest);
    let r = std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || Reader::open(blob).map(|r| r.tree().nodes.len()))
        .unwrap()
        .join()
        .expect("no stack overflow")
        .unwrap();
    assert!(r > MAX_PATH_DEPTH, "{r} nodes");
}

/// Found by `make fuzz` (convert): a non-directory entry naming the root (`./` as a FIFO or a
/// file) was written into a TOC that no reader opens. The writer refuses it, naming the entry.
#[test]
fn a_root_entry_that_is_not_a_directory_is_refused_at_conversion() {
    for name in ["./", ".", "/"] {
        let tarball = raw_tar(&[("ok", b"x"), (name, b"")]);
        let err = build(tarball.as_slice(), Vec::new(), &BuildOptions::default()).unwrap_err().to_string();
        assert!(err.contains("names the layer root") && err.contains(&format!("{name:?}")), "{name}: {err}");
    }
}

/// Found by `make fuzz` (convert): `dir` as a file and then `dir/sub` made a TOC no reader
/// opens. The writer refuses it, naming both entries.
#[test]
fn an_entry_inside_a_non_directory_is_refused_at_conversion() {
    let tarball = raw_tar(&[("dir", b"a file"), ("dir/sub", b"x")]);
    let err = build(tarball.as_slice(), Vec::new(), &BuildOptions::default()).unwrap_err().to_string();
    assert!(err.contains("\"dir/sub\" is inside \"dir\""), "{err}");
}
