//! Broken and hostile input: every case must end in an error that names the problem — never a
//! panic, a hang, or bytes that silently differ from what the TOC promises.

mod support;

use std::io::Write;

use estargz::{build, footer::estargz_footer, BuildOptions, Error, Reader, Toc};
use support::*;

fn blob_of(items: &[Item]) -> Vec<u8> {
    let mut out = Vec::new();
    build(write_tar(items).as_slice(), &mut out, &BuildOptions { chunk_size: CHUNK as u64, ..Default::default() }).unwrap();
    out
}

fn sample() -> Vec<u8> {
    blob_of(&[Item::dir("bin"), Item::file("bin/tool", noise(3 * CHUNK + 10, 1)), Item::file("etc/motd", b"hello".to_vec())])
}

/// Replaces a valid blob's TOC member with `member` (gzip-compressed here; payload unchanged)
/// and writes a fresh footer.
fn with_toc_member(blob: &[u8], member: &[u8]) -> Vec<u8> {
    let r = Reader::open(blob.to_vec()).unwrap();
    let off = r.footer().toc_offset as usize;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(member).unwrap();
    let mut out = blob[..off].to_vec();
    out.extend(gz.finish().unwrap());
    out.extend_from_slice(&estargz_footer(off as u64));
    out
}

/// Replaces a valid blob's TOC with `toc`.
fn with_toc(blob: &[u8], toc: &Toc) -> Vec<u8> {
    let json = toc.to_json();
    let mut member = estargz::tar::ustar_header("stargz.index.json", json.len() as u64, 0o644).to_vec();
    member.extend_from_slice(&json);
    member.resize(member.len().next_multiple_of(512) + 1024, 0);
    with_toc_member(blob, &member)
}

fn open_err(blob: Vec<u8>) -> String {
    match Reader::open(blob) {
        Ok(_) => panic!("a broken blob opened without error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn dotdot_and_absolute_names_in_tar_input_are_rejected() {
    for bad in ["../escape", "a/../../escape", "/etc/passwd"] {
        let mut tarball = write_tar(&[Item::file("placeholder-name-of-some-length", b"x".to_vec())]);
        // Patch the raw ustar name field: the tar crate refuses to write such names itself.
        tarball[..100].fill(0);
        tarball[..bad.len()].copy_from_slice(bad.as_bytes());
        let mut h = tar::Header::from_byte_slice(&tarball[..512]).clone();
        h.set_cksum();
        tarball[..512].copy_from_slice(h.as_bytes());
        let err = build(tarball.as_slice(), Vec::new(), &BuildOptions::default()).unwrap_err();
        assert!(matches!(err, Error::UnsafePath { .. }), "{bad}: {err}");
        assert!(err.to_string().contains(bad), "error must name {bad:?}: {err}");
    }
}

#[test]
fn hostile_names_in_toc_are_rejected() {
    let blob = sample();
    let r = Reader::open(blob.clone()).unwrap();
    for (bad, link) in [("../../etc/shadow", false), ("/etc/passwd", false), ("bin/../../x", false), ("../target", true)] {
        let mut toc = r.toc().clone();
        let e = toc.entries.iter_mut().find(|e| e.name == "etc/motd").unwrap();
        if link {
            e.kind = estargz::EntryType::Hardlink;
            e.link_name = bad.into();
            e.size = 0;
        } else {
            e.name = bad.into();
        }
        let msg = open_err(with_toc(&blob, &toc));
        assert!(msg.contains(bad), "error must name {bad:?}: {msg}");
    }
}

#[test]
fn truncated_blobs_are_rejected() {
    let blob = sample();
    for cut in [1, 10, 51, 52, 500, blob.len() / 2, blob.len() - 1] {
        let msg = open_err(blob[..blob.len() - cut].to_vec());
        assert!(msg.contains("footer") || msg.contains("TOC") || msg.contains("eStargz"), "cut {cut}: {msg}");
    }
    // Truncated in the payload but footer intact: the missing chunk is an error on read.
    let r = Reader::open(blob.clone()).unwrap();
    let off = r.footer().toc_offset as usize;
    let mut holed = blob.clone();
    holed.drain(off - 200..off);
    assert!(Reader::open(holed).is_err());
}

#[test]
fn footer_pointing_outside_the_blob() {
    let mut blob = sample();
    let n = blob.len();
    blob.truncate(n - 51);
    blob.extend_from_slice(&estargz_footer(n as u64 * 2));
    let msg = open_err(blob);
    assert!(msg.contains("invalid footer") && msg.contains("outside"), "{msg}");
}

#[test]
fn toc_larger_than_the_blob() {
    let blob = sample();
    // A TOC member whose tar header claims 1 GiB of JSON but ends right away.
    let mut member = estargz::tar::ustar_header("stargz.index.json", 1 << 30, 0o644).to_vec();
    member.extend_from_slice(b"{\"version\":1,\"entries\":[");
    let msg = open_err(with_toc_member(&blob, &member));
    assert!(msg.contains("TOC"), "{msg}");
    // And a hard cap on what we agree to decompress.
    let opts = estargz::OpenOptions { max_toc_size: 100, ..Default::default() };
    let e = Reader::open_with(blob, &opts).err().expect("TOC over the limit").to_string();
    assert!(e.contains("limit"), "{e}");
}

#[test]
fn toc_that_is_not_json() {
    let blob = sample();
    let junk = b"{\"version\": 1, \"entries\": [ {\"name\": 5} ]";
    let mut member = estargz::tar::ustar_header("stargz.index.json", junk.len() as u64, 0o644).to_vec();
    member.extend_from_slice(junk);
    member.resize(2048, 0);
    let msg = open_err(with_toc_member(&blob, &member));
    assert!(msg.contains("invalid TOC"), "{msg}");
}

#[test]
fn toc_digest_mismatch() {
    let r = Reader::open(sample()).unwrap();
    let wrong: estargz::Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
    let msg = r.verify_toc(&wrong).unwrap_err().to_string();
    assert!(msg.contains("TOC digest mismatch") && msg.contains(&"ab".repeat(32)), "{msg}");
    r.verify_toc(&r.toc_digest()).unwrap();
}

#[test]
fn flipped_byte_in_a_chunk_is_caught() {
    let blob = sample();
    let r = Reader::open(blob.clone()).unwrap();
    let node = r.lookup("bin/tool").unwrap();
    // Flip one byte inside each chunk's compressed data in turn. (A member also holds the next
    // entry's tar header after the chunk; damage there is not chunk data and is caught by the
    // layer digest, not by chunk verification.)
    for c in node.chunks.clone() {
        let mut bad = blob.clone();
        let at = if c.size > 1000 { (c.offset + c.next_offset) / 2 } else { c.offset + 12 } as usize;
        bad[at] ^= 0x40;
        let r = Reader::open(bad).unwrap();
        let err = estargz::verify_chunks(&r).unwrap_err().to_string();
        assert!(err.contains("bin/tool"), "error must name the file: {err}");
        assert!(err.contains(&c.offset.to_string()), "error must name the offset {}: {err}", c.offset);
    }
}

#[test]
fn chunk_digest_mismatch_names_file_and_offset() {
    // A blob whose data decompresses fine but whose TOC promises different bytes.
    let blob = sample();
    let r = Reader::open(blob.clone()).unwrap();
    let mut toc = r.toc().clone();
    let victim = toc.entries.iter_mut().filter(|e| e.name == "bin/tool").nth(1).expect("second chunk");
    let chunk_offset = victim.chunk_offset;
    victim.chunk_digest = format!("sha256:{}", "00".repeat(32));
    let r = Reader::open(with_toc(&blob, &toc)).unwrap();
    let err = estargz::verify_chunks(&r).unwrap_err();
    match &err {
        Error::ChunkDigestMismatch { path, chunk_offset: o, .. } => {
            assert_eq!(path, "bin/tool");
            assert_eq!(*o, chunk_offset);
        }
        other => panic!("expected a chunk digest mismatch, got {other}"),
    }
    // Reads through the verifying path fail too; nothing unverified is returned.
    let id = r.tree().lookup("bin/tool").unwrap();
    let mut buf = vec![0u8; 4 * CHUNK];
    assert!(r.read_file_at(id, 0, &mut buf, true).is_err());
}

#[test]
fn plain_gzip_layer_is_not_estargz() {
    let tarball = write_tar(&[Item::file("a", b"a".to_vec())]);
    let gz = pipe("gzip", &["-c"], &tarball);
    let msg = open_err(gz);
    assert!(msg.contains("not an eStargz") && msg.contains("plain tar.gz"), "{msg}");
    let zst = pipe("zstd", &["-c", "-q"], &tarball);
    let msg = open_err(zst);
    assert!(msg.contains("not an eStargz"), "{msg}");
    assert!(open_err(Vec::new()).contains("not an eStargz"));
}

#[test]
fn garbage_tar_input_is_an_error_not_a_panic() {
    for input in [vec![0xffu8; 600], b"not a tar at all".to_vec(), {
        let mut t = write_tar(&[Item::file("f", noise(5000, 3))]);
        t.truncate(1000);
        t
    }] {
        let err = build(input.as_slice(), Vec::new(), &BuildOptions::default()).unwrap_err();
        assert!(err.to_string().contains("tar") || err.to_string().contains("input"), "{err}");
    }
}

#[test]
fn dangling_hardlinks_are_rejected_at_conversion() {
    // Found by the `convert` fuzz target: such a blob was written but could not be opened.
    for (items, needle) in [
        (vec![Item::hardlink("a", "missing")], "not in the layer"),
        (vec![Item::dir("d"), Item::hardlink("l", "d")], "directory"),
        (vec![Item::hardlink("self", "self")], "itself"),
    ] {
        let err = build(write_tar(&items).as_slice(), Vec::new(), &BuildOptions::default()).unwrap_err().to_string();
        assert!(err.contains(needle) && err.contains("hardlink"), "{err}");
    }
    // A hardlink whose target comes later in the archive is fine (the tree resolves it).
    let ok = blob_of(&[Item::hardlink("early", "late"), Item::file("late", b"x".to_vec())]);
    let r = Reader::open(ok).unwrap();
    assert_eq!(r.lookup("early").unwrap().nlink, 2);
}
