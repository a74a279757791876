//! Reader behaviour the writer alone does not exercise: read counts when opening, blobs from
//! other writers (legacy footer, chunks sharing a member via `innerOffset`, external TOC).

mod support;

use std::io::Write;

use estargz::footer::{estargz_footer, external_toc_footer, legacy_footer};
use estargz::tar::ustar_header;
use estargz::{build, BuildOptions, Digest, EntryType, Error, FooterKind, OpenOptions, Reader, Toc, TocEntry};
use support::*;

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn toc_member(toc: &Toc) -> Vec<u8> {
    let json = toc.to_json();
    let mut m = ustar_header("stargz.index.json", json.len() as u64, 0o644).to_vec();
    m.extend_from_slice(&json);
    m.resize(m.len().next_multiple_of(512) + 1024, 0);
    gz(&m)
}

fn padded(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(v.len().next_multiple_of(512), 0);
    v
}

#[test]
fn opening_takes_one_read_or_two_for_a_large_toc() {
    let small = {
        let mut out = Vec::new();
        build(write_tar(&[Item::file("a", b"a".to_vec())]).as_slice(), &mut out, &BuildOptions::default()).unwrap();
        out
    };
    let r = Reader::open(small.clone()).unwrap();
    assert_eq!(r.open_reads(), 1, "a small blob's TOC is in the tail read");
    let r = Reader::open_with(small, &OpenOptions { tail_size: 64, ..Default::default() }).unwrap();
    assert_eq!(r.open_reads(), 2);

    // 30 000 entries: a TOC JSON of several MB, compressed beyond the 1 MiB tail.
    let items: Vec<Item> = (0..30_000).map(|i| Item::file(&format!("dir{}/file-with-a-longish-name-{i}", i % 100), noise(8, i))).collect();
    let mut out = Vec::new();
    build(write_tar(&items).as_slice(), &mut out, &BuildOptions::default()).unwrap();
    let r = Reader::open(out).unwrap();
    assert!(r.footer().toc_compressed_len > 1 << 20, "TOC too small for this test: {}", r.footer().toc_compressed_len);
    assert_eq!(r.open_reads(), 2);
    assert_eq!(r.tree().walk().len(), 1 + 100 + 30_000 + 1, "root, dirs, files, landmark");
}

/// Hand-made blob: two files whose chunks share one gzip member, addressed by `innerOffset`
/// (what writers with a minimum chunk size produce), plus a TOC with no `chunkSize` on
/// single-chunk files (= to end of file).
fn inner_offset_blob() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let a = noise(700, 1);
    let b = b"second file".to_vec();
    let hdr = |name: &str, len: usize| ustar_header(name, len as u64, 0o644).to_vec();
    let mut blob = gz(&hdr("a", a.len()));
    let shared_at = blob.len() as u64;
    let mut shared = padded(&a);
    let b_inner = shared.len() as u64 + 512;
    shared.extend(hdr("b", b.len()));
    shared.extend(padded(&b));
    blob.extend(gz(&shared));
    let toc_at = blob.len() as u64;
    let mut toc = Toc { version: 1, entries: Vec::new() };
    for (name, data, inner) in [("a", &a, 0u64), ("b", &b, b_inner)] {
        let mut e = TocEntry::new(name, EntryType::Reg);
        e.size = data.len() as u64;
        e.offset = shared_at;
        e.inner_offset = inner;
        e.mode = 0o644;
        e.digest = Digest::of(data).to_string();
        e.chunk_digest = Digest::of(data).to_string();
        toc.entries.push(e);
    }
    blob.extend(toc_member(&toc));
    blob.extend_from_slice(&estargz_footer(toc_at));
    (blob, a, b)
}

#[test]
fn chunks_sharing_a_member_read_and_verify() {
    let (blob, a, b) = inner_offset_blob();
    let r = Reader::open(blob.clone()).unwrap();
    let stats = estargz::verify_chunks(&r).unwrap();
    assert_eq!((stats.files, stats.chunks), (2, 2));
    for (name, want) in [("a", &a), ("b", &b)] {
        let id = r.tree().lookup(name).unwrap();
        let mut buf = vec![0u8; want.len()];
        r.read_file_at(id, 0, &mut buf, true).unwrap();
        assert_eq!(&buf, want, "{name}");
    }
    // Plain gzip still sees a valid tar with both files.
    let plain = pipe("gzip", &["-dc"], &blob);
    let names: Vec<String> = parse_tar(&plain).into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["a", "b", "stargz.index.json"]);
    // A wrong chunk digest on the second (inner) chunk is reported for that file.
    let mut toc = r.toc().clone();
    toc.entries[1].chunk_digest = Digest::of(b"other").to_string();
    let off = r.footer().toc_offset as usize;
    let mut bad = blob[..off].to_vec();
    bad.extend(toc_member(&toc));
    bad.extend_from_slice(&estargz_footer(off as u64));
    let err = estargz::verify_chunks(&Reader::open(bad).unwrap()).unwrap_err();
    assert!(matches!(&err, Error::ChunkDigestMismatch { path, .. } if path == "b"), "{err}");
}

#[test]
fn legacy_47_byte_footer_is_read() {
    let mut out = Vec::new();
    build(write_tar(&[Item::file("x/y", noise(10_000, 9))]).as_slice(), &mut out, &BuildOptions::default()).unwrap();
    let toc_at = Reader::open(out.clone()).unwrap().footer().toc_offset;
    out.truncate(out.len() - 51);
    out.extend_from_slice(&legacy_footer(toc_at));
    let r = Reader::open(out).unwrap();
    assert_eq!(r.footer().kind, FooterKind::LegacyStargz);
    estargz::verify_chunks(&r).unwrap();
}

#[test]
fn external_toc_footer_is_a_clear_error() {
    let mut out = Vec::new();
    build(write_tar(&[Item::file("f", b"f".to_vec())]).as_slice(), &mut out, &BuildOptions::default()).unwrap();
    out.truncate(out.len() - 51);
    out.extend_from_slice(&external_toc_footer());
    let err = Reader::open(out).err().expect("external TOC cannot open alone");
    assert!(matches!(err, Error::ExternalToc), "{err}");
    assert!(err.to_string().contains("external"), "{err}");
}

#[test]
fn user_and_group_names_carry_forward_per_id() {
    let (blob, _, _) = inner_offset_blob();
    let r = Reader::open(blob.clone()).unwrap();
    let mut toc = r.toc().clone();
    for (i, e) in toc.entries.iter_mut().enumerate() {
        e.uid = 7;
        e.gid = 9;
        if i == 0 {
            e.user_name = "seven".into();
            e.group_name = "nine".into();
        }
    }
    let off = r.footer().toc_offset as usize;
    let mut b = blob[..off].to_vec();
    b.extend(toc_member(&toc));
    b.extend_from_slice(&estargz_footer(off as u64));
    let r = Reader::open(b).unwrap();
    let n = r.lookup("b").unwrap();
    assert_eq!((n.user_name.as_str(), n.group_name.as_str()), ("seven", "nine"));
}
