//! Round trip acceptance: every corpus converted to eStargz (and zstd:chunked) must, when
//! decompressed by the system's plain `gzip`/`zstd` and parsed by an independent tar
//! implementation, yield the input's entries; the DiffID must be the sha256 of that stream; and
//! our own reader must serve every file's bytes and metadata back.

mod support;

use std::collections::BTreeMap;

use estargz::{build, BuildOptions, Compression, Reader};
use support::*;

const TOC_AND_LANDMARKS: [&str; 3] = ["stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"];

fn convert(input: &[u8], compression: Compression, chunk: u64, prioritized: &[&str], threads: usize) -> (Vec<u8>, estargz::BuildResult) {
    let mut out = Vec::new();
    let opts = BuildOptions {
        compression,
        chunk_size: chunk,
        prioritized: prioritized.iter().map(|s| s.to_string()).collect(),
        threads,
        ..Default::default()
    };
    let res = build(input, &mut out, &opts).expect("conversion");
    (out, res)
}

fn payload_entries(parsed: Vec<Parsed>) -> Vec<Parsed> {
    parsed.into_iter().filter(|p| !TOC_AND_LANDMARKS.contains(&p.name.as_str())).collect()
}

fn check_corpus(name: &str, items: &[Item], compression: Compression) {
    let input = write_tar(items);
    let (blob, res) = convert(&input, compression, CHUNK as u64, &[], 2);
    let tool = match compression {
        Compression::Gzip => "gzip",
        Compression::Zstd => "zstd",
    };
    let plain = pipe(tool, &["-dc"], &blob);
    assert_eq!(sha256_hex(&plain), res.diff_id.to_string(), "{name}: DiffID is not the sha256 of the {tool} -dc stream");
    assert_eq!(plain.len() as u64, res.uncompressed_size, "{name}: uncompressed size");
    assert_eq!(sha256_hex(&blob), res.blob_digest.to_string(), "{name}: blob digest");

    // GNU tar must accept the stream as a whole.
    pipe("tar", &["-tf", "-"], &plain);

    let want = last_wins(parse_tar(&input));
    let got_list = payload_entries(parse_tar(&plain));
    let got: BTreeMap<String, Parsed> = got_list.iter().map(|p| (p.name.clone(), p.clone())).collect();
    assert_eq!(got_list.len(), got.len(), "{name}: output has duplicate names");
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>(), "{name}: entry names differ");
    for (k, w) in &want {
        assert_eq!(w, &got[k], "{name}: entry {k:?} differs");
    }

    // Our own reader: TOC, tree and every byte through chunked reads.
    let r = Reader::open(blob.clone()).unwrap_or_else(|e| panic!("{name}: open: {e}"));
    reader_matches(name, &r, &want);
}

#[test]
fn every_corpus_round_trips_gzip() {
    for (name, items) in corpora() {
        check_corpus(name, &items, Compression::Gzip);
    }
}

#[test]
fn every_corpus_round_trips_zstd_chunked() {
    for (name, items) in corpora() {
        check_corpus(name, &items, Compression::Zstd);
    }
}

#[test]
fn all_corpora_in_one_layer_round_trip() {
    // Everything at once, with a prefix per corpus so names stay distinct.
    let mut all = Vec::new();
    for (name, items) in corpora() {
        if name == "duplicates" || name == "empty-layer" {
            continue;
        }
        all.extend(items);
    }
    check_corpus("combined", &all, Compression::Gzip);
}

#[test]
fn zero_byte_input_is_an_empty_layer() {
    let (blob, res) = convert(&[], Compression::Gzip, CHUNK as u64, &[], 1);
    let plain = pipe("gzip", &["-dc"], &blob);
    assert_eq!(sha256_hex(&plain), res.diff_id.to_string());
    assert!(payload_entries(parse_tar(&plain)).is_empty());
    Reader::open(blob).unwrap();
}

#[test]
fn default_chunk_size_boundaries() {
    let c = estargz::toc::DEFAULT_CHUNK_SIZE as usize;
    let items = vec![
        Item::file("minus", noise(c - 1, 11)),
        Item::file("exact", noise(c, 12)),
        Item::file("plus", noise(c + 1, 13)),
    ];
    let input = write_tar(&items);
    let (blob, res) = convert(&input, Compression::Gzip, estargz::toc::DEFAULT_CHUNK_SIZE, &[], 2);
    let r = Reader::open(blob.clone()).unwrap();
    let chunks = |p: &str| r.lookup(p).unwrap().chunks.len();
    assert_eq!((chunks("minus"), chunks("exact"), chunks("plus")), (1, 1, 2));
    let plain = pipe("gzip", &["-dc"], &blob);
    assert_eq!(sha256_hex(&plain), res.diff_id.to_string());
    // Random ranges across the chunk boundary.
    let id = r.tree().lookup("plus").unwrap();
    let mut buf = [0u8; 10];
    assert_eq!(r.read_file_at(id, c as u64 - 5, &mut buf, true).unwrap(), 6);
    assert_eq!(&buf[..6], &noise(c + 1, 13)[c - 5..]);
}

#[test]
fn output_does_not_depend_on_thread_count() {
    let mut items = Vec::new();
    for (_, c) in corpora() {
        items.extend(c.into_iter().filter(|i| i.kind != b'1'));
    }
    for i in 0..40 {
        items.push(Item::file(&format!("bulk/{i}"), noise(1000 + i * 777, i as u64)));
    }
    let input = write_tar(&items);
    for compression in [Compression::Gzip, Compression::Zstd] {
        let (one, r1) = convert(&input, compression, CHUNK as u64, &["bulk/7"], 1);
        let (two, _) = convert(&input, compression, CHUNK as u64, &["bulk/7"], 2);
        let (eight, _) = convert(&input, compression, CHUNK as u64, &["bulk/7"], 8);
        assert!(one == two && two == eight, "{compression:?}: output bytes depend on the thread count");
        assert_eq!(sha256_hex(&one), r1.blob_digest.to_string());
    }
}

#[test]
fn prioritized_files_come_first_with_parents_and_landmark() {
    let items = vec![
        Item::dir("usr"),
        Item::dir("usr/bin"),
        Item::file("usr/bin/other", b"other".to_vec()),
        Item::file("usr/bin/app", noise(3 * CHUNK, 21)),
        Item::hardlink("usr/bin/app-link", "usr/lib/target"),
        Item::dir("usr/lib"),
        Item::file("usr/lib/target", b"hardlink target".to_vec()),
        Item::file("etc/conf", b"conf".to_vec()),
    ];
    let input = write_tar(&items);
    let (blob, res) = convert(&input, Compression::Gzip, CHUNK as u64, &["etc/conf", "/usr/bin/app", "usr/bin/app-link", "not/there"], 2);
    assert_eq!(res.missing_prioritized, vec!["not/there".to_string()]);
    let plain = pipe("gzip", &["-dc"], &blob);
    let names: Vec<String> = parse_tar(&plain).into_iter().map(|p| p.name).collect();
    let pos = |n: &str| names.iter().position(|x| x == n).unwrap_or_else(|| panic!("{n} missing from {names:?}"));
    assert!(pos("etc/conf") < pos("usr/bin/app"));
    assert!(pos("usr") < pos("usr/bin") && pos("usr/bin") < pos("usr/bin/app"), "parents before prioritized file: {names:?}");
    assert!(pos("usr/lib/target") < pos("usr/bin/app-link"), "hardlink target pulled in: {names:?}");
    let lm = pos(".prefetch.landmark");
    assert!(pos("usr/bin/app-link") < lm && lm < pos("usr/bin/other"), "landmark after prioritized: {names:?}");
    assert_eq!(names.last().unwrap(), "stargz.index.json");
    // Every input entry survives the reordering.
    let want = last_wins(parse_tar(&input));
    let got = last_wins(payload_entries(parse_tar(&plain)));
    assert_eq!(want, got);
}

#[test]
fn no_prioritized_files_gets_no_prefetch_landmark_first() {
    let input = write_tar(&[Item::file("a", b"a".to_vec())]);
    let (blob, _) = convert(&input, Compression::Gzip, CHUNK as u64, &[], 1);
    let plain = pipe("gzip", &["-dc"], &blob);
    let names: Vec<String> = parse_tar(&plain).into_iter().map(|p| p.name).collect();
    assert_eq!(names, vec![".no.prefetch.landmark", "a", "stargz.index.json"]);
}

#[test]
fn compressed_inputs_are_sniffed() {
    let items: Vec<Item> = corpora().into_iter().find(|(n, _)| *n == "sizes").unwrap().1;
    let input = write_tar(&items);
    let (plain_blob, _) = convert(&input, Compression::Gzip, CHUNK as u64, &[], 1);
    for (tool, args) in [("gzip", vec!["-c"]), ("zstd", vec!["-c", "-q"])] {
        let compressed = pipe(tool, &args, &input);
        let (blob, _) = convert(&compressed, Compression::Gzip, CHUNK as u64, &[], 1);
        assert!(blob == plain_blob, "{tool}-compressed input must give the same blob as the plain tar");
    }
}
