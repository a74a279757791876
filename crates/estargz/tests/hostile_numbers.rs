//! Hostile numbers (issue 16, part 2): TOC `size`, `chunkSize`, `chunkOffset`, `innerOffset`
//! and `offset` values that used to wrap sums, panic on `inner_offset + size` or abort on
//! allocation. Each must be an [`Error::TocField`] naming the entry and the field when the tree
//! is built, and the decoders must refuse hand-made out-of-range chunks instead of panicking.

mod support;

use estargz::limits::{MAX_CHUNK_SIZE, MAX_FILE_SIZE, MAX_MEMBER_SIZE};
use estargz::{decode_chunk, Chunk, Compression, Error, Reader, Toc, TocEntry};
use support::*;

fn sample() -> Vec<u8> {
    small_chunk_blob(&[Item::dir("bin"), Item::file("bin/tool", noise(3 * CHUNK + 10, 1)), Item::file("etc/motd", b"hello".to_vec())])
}

/// Opens `sample()` with its TOC edited by `edit`; the error it must fail with.
fn open_edited(edit: impl FnOnce(&mut Vec<TocEntry>)) -> Error {
    let blob = sample();
    let mut toc: Toc = Reader::open(blob.clone()).unwrap().toc().clone();
    edit(&mut toc.entries);
    match Reader::open(swap_toc(&blob, &toc)) {
        Ok(_) => panic!("a hostile TOC opened"),
        Err(e) => e,
    }
}

fn expect_field(e: Error, entry: &str, want_field: &str) {
    match &e {
        Error::TocField { entry: n, field, .. } if n == entry && *field == want_field => {
            let msg = e.to_string();
            assert!(msg.contains(entry) && msg.contains(want_field), "{msg}");
        }
        other => panic!("expected a {want_field} error for {entry:?}, got {other}"),
    }
}

/// The `k`th TOC entry of `name` (0 = the `reg` entry, then its `chunk` entries).
fn nth<'a>(entries: &'a mut [TocEntry], name: &str, k: usize) -> &'a mut TocEntry {
    entries.iter_mut().filter(|e| e.name == name).nth(k).unwrap()
}

#[test]
fn huge_sizes_are_refused_when_the_tree_is_built() {
    // A 2^62-byte file used to reach `vec![0; size]` on read.
    expect_field(open_edited(|es| nth(es, "etc/motd", 0).size = 1 << 62), "etc/motd", "size");
    expect_field(open_edited(|es| nth(es, "etc/motd", 0).size = MAX_FILE_SIZE + 1), "etc/motd", "size");
    // A chunk size far beyond any real chunk (allocation) and one that makes the tiling sum wrap.
    expect_field(open_edited(|es| nth(es, "bin/tool", 0).chunk_size = 1 << 62), "bin/tool", "chunkSize");
    // 4096 + (2^64 - 4096) used to wrap the running sum of chunk sizes to 0.
    expect_field(open_edited(|es| nth(es, "bin/tool", 1).chunk_size = u64::MAX - CHUNK as u64 + 1), "bin/tool", "chunkSize");
    // The last chunk's implicit size ("to the end of the file") is bounded too.
    expect_field(
        open_edited(|es| {
            es.retain(|e| !(e.name == "bin/tool" && e.kind == estargz::EntryType::Chunk));
            let reg = nth(es, "bin/tool", 0);
            reg.chunk_size = 0;
            reg.size = MAX_CHUNK_SIZE + 1;
        }),
        "bin/tool",
        "chunkSize",
    );
}

#[test]
fn inner_offsets_that_overflow_are_refused() {
    // `inner_offset + size` used to panic (debug) or wrap (release) in `decode_chunk`.
    expect_field(open_edited(|es| nth(es, "etc/motd", 0).inner_offset = u64::MAX - 2), "etc/motd", "innerOffset");
    expect_field(open_edited(|es| nth(es, "bin/tool", 2).inner_offset = MAX_CHUNK_SIZE), "bin/tool", "innerOffset");
}

#[test]
fn offsets_outside_the_payload_are_refused() {
    for off in [u64::MAX, 1 << 62] {
        expect_field(open_edited(|es| nth(es, "etc/motd", 0).offset = off), "etc/motd", "offset");
    }
    expect_field(open_edited(|es| nth(es, "bin/tool", 1).chunk_offset = u64::MAX), "bin/tool", "chunkOffset");
}

#[test]
fn chunks_of_a_file_must_move_forward_in_the_blob() {
    // Chunk 2 pointing back at chunk 1's member: it tiles the file, but the ranges overlap.
    let e = open_edited(|es| {
        let first = nth(es, "bin/tool", 1).offset;
        nth(es, "bin/tool", 2).offset = first;
    });
    expect_field(e, "bin/tool", "offset");
}

#[test]
fn decoders_refuse_out_of_range_chunks_without_panicking() {
    let r = Reader::open(sample()).unwrap();
    let node = r.lookup("etc/motd").unwrap().clone();
    let good = node.chunks[0].clone();
    let hostile = [
        Chunk { inner_offset: u64::MAX - 2, ..good.clone() },
        Chunk { size: u64::MAX, ..good.clone() },
        Chunk { size: 1 << 62, ..good.clone() },
        Chunk { next_offset: good.offset, ..good.clone() },
        Chunk { next_offset: good.offset - 1, ..good.clone() },
        Chunk { next_offset: good.offset + MAX_MEMBER_SIZE + 1, ..good.clone() },
    ];
    for c in &hostile {
        let e = r.read_chunk(&node, c, true).expect_err("hostile chunk read");
        assert!(matches!(e, Error::TocField { .. }), "{c:?}: {e}");
        let e = decode_chunk(Compression::Gzip, &[0x1f, 0x8b, 8, 0], &node, c, false).expect_err("hostile chunk decoded");
        assert!(matches!(e, Error::TocField { .. }), "{c:?}: {e}");
    }
    assert_eq!(r.read_chunk(&node, &good, true).unwrap(), b"hello");
}

/// Issue 16 (part 6): uid/gid 4294967295 is `(uid_t)-1`, "unchanged" to chown(2): an
/// extraction stayed root-owned while the mount showed 65534. The tree maps it to 65534 once.
#[test]
fn the_minus_one_id_is_the_overflow_id_everywhere() {
    let blob = sample();
    let mut toc: Toc = Reader::open(blob.clone()).unwrap().toc().clone();
    for e in toc.entries.iter_mut().filter(|e| e.name == "etc/motd") {
        e.uid = u32::MAX as i64;
        e.gid = u32::MAX as i64;
    }
    let r = Reader::open(swap_toc(&blob, &toc)).unwrap();
    let n = r.lookup("etc/motd").unwrap();
    assert_eq!((n.uid, n.gid), (estargz::tree::OVERFLOW_ID, estargz::tree::OVERFLOW_ID));
    // Anything past u32 is refused, naming the entry.
    for e in toc.entries.iter_mut().filter(|e| e.name == "etc/motd") {
        e.uid = 1 << 32;
    }
    let msg = Reader::open(swap_toc(&blob, &toc)).map(drop).unwrap_err().to_string();
    assert!(msg.contains("etc/motd") && msg.contains("uid"), "{msg}");
}
