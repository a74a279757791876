//! Hostile input: a corrupt span, a truncated or bit-flipped zTOC, a zTOC that lies about
//! offsets, sizes or checkpoints, a short layer blob. Each must give a typed error naming
//! what is wrong — never a panic, a hang, or bytes other than the layer's.
//!
//! The layers are built here (tar + gzip, 16 KiB spans so there are several checkpoints).
//! With `LAZYPULL_FUZZ_SEEDS=DIR` the zTOCs made here are also written to DIR, which is how
//! `make fuzz` seeds its `ztoc_read` target (scripts/fuzz.sh).

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

use soci::{build_ztoc, inflate_at, read_entry, verify_span, BuildOptions, EntryKind, ExtractError, SpanTable, Ztoc, ZtocError};

const SPAN: u64 = 16 << 10;
const WINDOW: usize = 32 << 10;

/// xorshift64: deterministic randomness without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

struct Layer {
    tar: Vec<u8>,
    gz: Vec<u8>,
    ztoc: Ztoc,
    tar_ztoc: Ztoc,
}

/// Text (back-references into the window), random letters (Huffman blocks ending mid-byte),
/// noise (stored blocks), links, dirs, empties; `files` regular files of growing size.
fn build_layer(files: usize, name: &str) -> Layer {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let words = ["layer", "span", "window", "checkpoint", "inflate", "digest", "tar", "gzip", "lazy", "pull"];
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        b.append_data(&mut h, path, data).unwrap();
    };
    add("etc/", tar::EntryType::Directory, b"", None);
    add("etc/hostname", tar::EntryType::Regular, b"hostile\n", None);
    add("usr/lib/", tar::EntryType::Directory, b"", None);
    let sizes = [0usize, 1, 511, 512, 513, 3000, 9000, 20_000, 40_000, 700, 17_000, 5, 30_000, 45_000, 25_000, 60_000];
    for (i, size) in sizes.into_iter().take(files).enumerate() {
        let data: Vec<u8> = match i % 3 {
            2 => (0..size).map(|_| rng.next() as u8).collect(),
            1 => (0..size).map(|_| b"abcdefghijklmnopqrstuvwxyz \n"[rng.below(28)]).collect(),
            _ => {
                let mut t = Vec::new();
                while t.len() < size {
                    t.extend_from_slice(words[rng.below(words.len())].as_bytes());
                    t.push(if rng.below(8) == 0 { b'\n' } else { b' ' });
                }
                t.truncate(size);
                t
            }
        };
        add(&format!("usr/lib/f{i}"), tar::EntryType::Regular, &data, None);
    }
    add("usr/lib/link", tar::EntryType::Symlink, b"", Some("f1"));
    add("usr/lib/hard", tar::EntryType::Link, b"", Some("usr/lib/f6"));
    let tar = b.into_inner().unwrap();
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(&tar).unwrap();
    let gz = e.finish().unwrap();
    let opts = BuildOptions { span_size: SPAN, ..Default::default() };
    let ztoc = build_ztoc(&gz[..], &opts).unwrap();
    let tar_ztoc = build_ztoc(&tar[..], &opts).unwrap();
    seed(&format!("{name}.gzip.ztoc"), &ztoc.to_bytes());
    seed(&format!("{name}.tar.ztoc"), &tar_ztoc.to_bytes());
    Layer { tar, gz, ztoc, tar_ztoc }
}

/// 9 gzip spans, 6 of them resuming mid-byte; 17 tar spans (see `layer_shapes`).
fn layer() -> &'static Layer {
    static L: OnceLock<Layer> = OnceLock::new();
    L.get_or_init(|| build_layer(16, "layer"))
}

/// A layer with few checkpoints: debug-build zTOC parsing costs ~30 ns per byte, and a
/// checkpoint is 32 KiB, so the bit-flip test runs on this one.
fn small_layer() -> &'static Layer {
    static L: OnceLock<Layer> = OnceLock::new();
    L.get_or_init(|| build_layer(8, "small"))
}

fn seed(name: &str, bytes: &[u8]) {
    if let Some(dir) = std::env::var_os("LAZYPULL_FUZZ_SEEDS") {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(std::path::Path::new(&dir).join(name), bytes);
    }
}

fn slug(what: &str) -> String {
    what.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).unwrap()
}

/// The file bytes a read of `e` must return: the layer's, at the place the entry claims.
fn expected<'a>(l: &'a Layer, e: &soci::Entry) -> Option<&'a [u8]> {
    l.tar.get(e.offset as usize..(e.offset + e.size) as usize)
}

/// Runs `f` on a worker thread: a panic or a run longer than `limit` fails the test, naming
/// the case `f` was on (it records it in `current`).
fn bounded(limit: Duration, f: impl FnOnce(&Mutex<String>) + Send + 'static) {
    static CURRENT: Mutex<String> = Mutex::new(String::new());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = catch_unwind(AssertUnwindSafe(|| f(&CURRENT)));
        let _ = tx.send(r.is_ok());
    });
    match rx.recv_timeout(limit) {
        Ok(true) => {}
        Ok(false) | Err(mpsc::RecvTimeoutError::Disconnected) => panic!("panicked on {}", CURRENT.lock().unwrap_or_else(|e| e.into_inner())),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("no answer in {limit:?} (hang?) on {}", CURRENT.lock().unwrap()),
    }
}

fn checkpoints(z: &mut Ztoc) -> &mut Vec<soci::Checkpoint> {
    let SpanTable::Gzip { checkpoints, .. } = &mut z.spans else { panic!("not a gzip zTOC") };
    checkpoints
}

#[test]
fn layer_shapes() {
    // The tests below rely on several spans, some resuming mid-byte, and on a small zTOC.
    let shape = |l: &Layer| match &l.ztoc.spans {
        SpanTable::Gzip { checkpoints, .. } => (checkpoints.len(), checkpoints.iter().filter(|c| c.bits != 0).count()),
        SpanTable::Tar { .. } => panic!(),
    };
    let (spans, mid_byte) = shape(layer());
    assert!(spans >= 6 && mid_byte >= 3 && layer().tar_ztoc.spans.span_count() > 10, "{spans} {mid_byte}");
    assert!(matches!(shape(small_layer()), (2..=3, 1..)) && small_layer().ztoc.to_bytes().len() < 110_000);
}

#[test]
fn a_flipped_byte_in_a_span_is_a_digest_error_naming_that_span() {
    let l = layer();
    let z = &l.ztoc;
    for span in 0..z.spans.span_count() {
        let (start, end) = z.spans.compressed_range(span, z.compressed_size);
        let mut bad = l.gz.clone();
        bad[((start + end) / 2) as usize] ^= 0x20;
        let err = verify_span(z, span, &bad[start as usize..end as usize]).unwrap_err();
        assert!(matches!(err, ExtractError::Digest { span: s, .. } if s == span), "{err}");
        let mut read = 0;
        for e in z.entries.iter().filter(|e| e.size > 0) {
            let (first, last) = z.spans_of(e);
            if !(first..=last).contains(&span) {
                continue;
            }
            match read_entry(z, &bad[..], e) {
                Err(ExtractError::Digest { span: s, expected, actual }) if s == span => {
                    assert_eq!(expected, z.span_digests[span]);
                    assert_ne!(actual, expected);
                }
                other => panic!("span {span}, {}: {:?}", e.name, other.map(|b| b.len())),
            }
            read += 1;
        }
        assert!(read > 0, "no file lies in span {span}");
    }
}

#[test]
fn a_truncated_ztoc_is_an_error_at_every_length() {
    let l = layer();
    let blobs = [l.ztoc.to_bytes(), l.tar_ztoc.to_bytes(), fixture("small.65536.ztoc"), fixture("plain.1048576.ztoc")];
    for (i, blob) in blobs.iter().enumerate() {
        Ztoc::from_bytes(blob).unwrap();
        for len in (0..200).chain((0..blob.len()).step_by(997)).chain([blob.len() - 1]) {
            let r = catch_unwind(|| Ztoc::from_bytes(&blob[..len]));
            assert!(matches!(r, Ok(Err(_))), "zTOC {i} cut to {len} of {} bytes: {:?}", blob.len(), r.map(|r| r.map(|_| ())));
        }
    }
}

/// Where the checkpoint blob sits in a serialised gzip zTOC.
fn checkpoint_blob_at(z: &Ztoc, bytes: &[u8]) -> std::ops::Range<usize> {
    let blob = z.spans.to_bytes();
    let at = bytes.windows(64).position(|w| w == &blob[..64]).unwrap();
    at..at + blob.len()
}

#[test]
fn flipped_ztoc_bytes_give_an_error_or_a_valid_ztoc_that_reads_the_layers_bytes() {
    bounded(Duration::from_secs(60), |current| {
        let l = small_layer();
        for (z, blob, flips) in [(&l.ztoc, &l.gz, 2500), (&l.tar_ztoc, &l.tar, 1000)] {
            let bytes = z.to_bytes();
            let mut rng = Rng(0x5eed ^ flips as u64);
            // Checkpoint windows are most of a gzip zTOC: two flips in three go elsewhere.
            let cps = if z.compression == soci::Compression::Gzip { checkpoint_blob_at(z, &bytes) } else { 0..0 };
            let in_window = |p: usize| cps.contains(&p) && p >= cps.start + 12 && (p - cps.start - 12) % (17 + WINDOW) >= 17;
            let (mut parsed, mut errors, mut gap) = (0, 0, 0);
            for i in 0..flips {
                let pos = loop {
                    let p = rng.below(bytes.len());
                    if i % 3 != 0 && in_window(p) {
                        continue;
                    }
                    break p;
                };
                let xor = (1 + rng.below(255)) as u8;
                *current.lock().unwrap() = format!("flip {i}: byte {pos} ^= {xor:#04x} of a {}-byte zTOC", bytes.len());
                let mut bad = bytes.clone();
                bad[pos] ^= xor;
                let Ok(m) = Ztoc::from_bytes(&bad) else {
                    errors += 1;
                    continue;
                };
                parsed += 1;
                m.validate().unwrap();
                if !in_window(pos) {
                    assert!(Ztoc::from_bytes(&m.to_bytes()).unwrap() == m, "round trip");
                }
                if m == *z {
                    continue;
                }
                for e in &m.entries {
                    let Ok(got) = read_entry(&m, &blob[..], e) else { continue };
                    if e.kind != EntryKind::Reg || expected(l, e) == Some(&got[..]) {
                        continue;
                    }
                    // KNOWN GAP: a checkpoint's uncompressed offset, leftover bits and window are
                    // not covered by any span digest: only the zTOC's own digest protects them.
                    assert!(cps.contains(&pos), "{} read {} wrong bytes", e.name, got.len());
                    gap += 1;
                }
            }
            println!("{:?}: {flips} flips: {parsed} parsed, {errors} errors, {gap} wrong reads via checkpoint fields", z.compression);
        }
    });
}

#[test]
fn a_lying_ztoc_is_rejected_naming_the_entry_or_checkpoint() {
    let l = layer();
    let z = &l.ztoc;
    let index = |name: &str| z.entries.iter().position(|e| e.name == name).unwrap();
    let entry_err = |m: Ztoc, want: &str, what: &str| {
        let err = m.validate().unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ZtocError::BadEntry { .. }) && msg.contains(want) && msg.contains(what), "{msg}");
        assert_eq!(Ztoc::from_bytes(&m.to_bytes()).unwrap_err().to_string(), msg);
        seed(&format!("lying-{}", slug(what)), &m.to_bytes());
    };
    let edit = |f: &dyn Fn(&mut Ztoc)| {
        let mut m = z.clone();
        f(&mut m);
        m
    };
    let (f8, f9, dir) = (index("usr/lib/f8"), index("usr/lib/f9"), index("usr/lib/"));
    entry_err(edit(&|m| m.entries[f8].offset = z.uncompressed_size + 512), "usr/lib/f8", "runs past");
    entry_err(edit(&|m| m.entries[f8].size = z.uncompressed_size), "usr/lib/f8", "runs past");
    entry_err(edit(&|m| m.entries[f9].offset = z.entries[f8].offset + 512), "usr/lib/f9", "overlaps");
    entry_err(edit(&|m| m.entries[f9].offset += 1), "usr/lib/f9", "not block aligned");
    entry_err(edit(&|m| m.entries[dir].size = 1), "usr/lib/", "a dir with 1 data bytes");
    entry_err(edit(&|m| m.entries[dir].name = "a\0b".into()), "entry 2", "NUL");

    let spans = z.spans.span_count();
    let m = edit(&|m| drop(m.span_digests.pop()));
    assert!(matches!(m.validate(), Err(ZtocError::SpanDigests { digests, spans: s }) if digests == spans - 1 && s == spans));
    assert!(Ztoc::from_bytes(&m.to_bytes()).is_err());
    let m = edit(&|m| m.span_digests[3] = "sha256:nothex".into());
    assert!(m.validate().unwrap_err().to_string().contains("span digest 3"));
    let m = edit(&|m| m.compressed_size = checkpoints(m)[spans - 1].compressed - 1);
    assert!(matches!(m.validate(), Err(ZtocError::SpanTableSize { .. })));

    // Checkpoint lies: caught when the span table is parsed (from_bytes).
    let checkpoint_err = |m: Ztoc, want: &str| {
        let msg = Ztoc::from_bytes(&m.to_bytes()).unwrap_err().to_string();
        assert!(msg.contains(want), "{msg}");
        seed(&format!("lying-{}", slug(want)), &m.to_bytes());
        // validate() re-checks the span table too, so an edited Ztoc is refused as well.
        assert!(m.validate().unwrap_err().to_string().contains(want), "{want}");
    };
    let e = z.entries.iter().find(|e| e.size > 0 && z.spans_of(e).0 > 0).unwrap();
    let k = z.spans_of(e).0;
    let m = edit(&|m| checkpoints(m)[k].bits = 9);
    checkpoint_err(m.clone(), &format!("checkpoint {k}: 9 leftover bits"));
    // ... and read_entry through it anyway is an error, not a shift overflow.
    let r = catch_unwind(AssertUnwindSafe(|| read_entry(&m, &l.gz[..], e)));
    assert!(matches!(r, Ok(Err(_))), "{:?}", r.map(|r| r.map(|b| b.len())));
    checkpoint_err(edit(&|m| { let c = checkpoints(m); c[3].uncompressed = c[2].uncompressed }), "checkpoint 3: offsets");
    checkpoint_err(edit(&|m| { let c = checkpoints(m); c[1].compressed = c[2].compressed + 1 }), "checkpoint 2: offsets");
    checkpoint_err(edit(&|m| checkpoints(m)[0].uncompressed = 7), "checkpoint 0: starts at uncompressed 7");
    // With no checkpoints at all, both refuse it.
    let mut m = z.clone();
    checkpoints(&mut m).clear();
    m.span_digests.clear();
    assert!(Ztoc::from_bytes(&m.to_bytes()).unwrap_err().to_string().contains("no checkpoints"));
    assert!(m.validate().unwrap_err().to_string().contains("no checkpoints"));
}

#[test]
fn a_wrong_checkpoint_window_reads_wrong_bytes_through_read_entry() {
    // Span digests cover the span's compressed bytes only, not the checkpoint (its window,
    // uncompressed offset, leftover bits). A zTOC whose windows were altered parses, validates,
    // passes every span digest and inflates back-references into the bad window: this crate's
    // own fixture reader (`read_entry`, which stops at the entry's last byte) returns wrong bytes.
    // The serving path checks each span that is inflated to its end against the next window
    // (`a_wrong_window_is_an_error_where_a_span_is_inflated_to_its_end`).
    let l = layer();
    let mut m = l.ztoc.clone();
    for c in checkpoints(&mut m).iter_mut().skip(1) {
        c.window.iter_mut().for_each(|b| *b ^= 0x55);
    }
    let m = Ztoc::from_bytes(&m.to_bytes()).unwrap();
    let (mut right, mut wrong, mut errors) = (0, 0, 0);
    for e in m.entries.iter().filter(|e| e.size > 0 && m.spans_of(e).0 > 0) {
        match read_entry(&m, &l.gz[..], e) {
            Ok(got) if expected(l, e) == Some(&got[..]) => right += 1,
            Ok(_) => wrong += 1,
            Err(err) => {
                assert!(matches!(err, ExtractError::Inflate { .. }), "{err}");
                errors += 1
            }
        }
    }
    println!("bad windows: {right} right, {wrong} wrong (silently), {errors} inflate errors");
    assert!(wrong > 0, "the gap is closed: make this test assert an error instead");
}

#[test]
fn a_wrong_window_is_an_error_where_a_span_is_inflated_to_its_end() {
    let l = layer();
    let spans_of = |z: &Ztoc| {
        let idx = soci::layer_model::layer_index(z).unwrap();
        let mut by_offset = std::collections::BTreeMap::new();
        for c in idx.chunks() {
            if let Some(end) = c.resume.as_ref().and_then(|r| r.span_end.as_ref()) {
                by_offset.insert(c.offset, (c.end, c.resume.clone().unwrap(), end.len));
            }
        }
        by_offset
    };
    let inflate = |z: &Ztoc| -> Vec<Result<Vec<u8>, String>> {
        spans_of(z)
            .into_iter()
            .map(|(start, (end, r, len))| index::decode_resumed(&r, &l.gz[start as usize..end as usize], 0, len as usize).map_err(|e| e.to_string()))
            .collect()
    };
    let good = inflate(&l.ztoc);
    assert!(good.len() >= 3 && good.iter().all(|r| r.is_ok()), "the true windows pass");
    // One wrong window (checkpoint k): the span before it (whose output no longer ends with
    // it) fails naming the windows; the span from it fails too unless it never refers back into
    // the window (then its bytes are right); no other span changes.
    let k = 2;
    let mut m = l.ztoc.clone();
    checkpoints(&mut m)[k].window.iter_mut().for_each(|b| *b ^= 0x55);
    let m = Ztoc::from_bytes(&m.to_bytes()).unwrap();
    let got = inflate(&m);
    let (mut failed, mut right) = (0, 0);
    for (i, r) in got.iter().enumerate() {
        match r {
            Err(err) if i == k - 1 || i == k => {
                assert!(err.contains("checkpoint windows are wrong"), "span {i}: {err}");
                failed += 1;
            }
            r => {
                assert!(i != k - 1, "span {i} ends with the wrong window {k} and passed");
                assert!(r == &good[i], "span {i} gave wrong bytes without an error");
                right += 1;
            }
        }
    }
    println!("wrong window {k}: {failed} spans refused, {right} right");
}

#[test]
fn a_tar_that_ends_right_after_its_last_files_data_is_indexed_but_cut_data_is_an_error() {
    // Seen in the peers' test/big:1 (written by umoci): no padding after the last file, no
    // zero blocks. Go's archive/tar reads it to the end, and so must the zTOC builder.
    let mut b = tar::Builder::new(Vec::new());
    let files: Vec<(String, Vec<u8>)> = (0..5).map(|i| (format!("app/f{i}.txt"), format!("{i} ").repeat(100 + 77 * i).into_bytes())).collect();
    for (name, data) in &files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let full = b.into_inner().unwrap();
    let (_, last) = files.last().unwrap();
    let mut archive = tar::Archive::new(&full[..]);
    let data_end = archive.entries().unwrap().last().unwrap().unwrap().raw_file_position() as usize + last.len();
    assert_ne!(data_end % 512, 0, "the cut must drop padding too");
    let gz = |tar: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(tar).unwrap();
        e.finish().unwrap()
    };
    let opts = BuildOptions { span_size: 1024, ..Default::default() };
    for (what, blob) in [("gzip", gz(&full[..data_end])), ("tar", full[..data_end].to_vec())] {
        let z = build_ztoc(&blob[..], &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(z.uncompressed_size, data_end as u64, "{what}");
        for (name, data) in &files {
            let e = z.entries.iter().find(|e| &e.name == name).unwrap();
            assert_eq!(&read_entry(&z, &blob[..], e).unwrap(), data, "{what}: {name}");
        }
    }
    for (what, blob) in [("gzip", gz(&full[..data_end - 1])), ("tar", full[..data_end - 1].to_vec())] {
        let err = build_ztoc(&blob[..], &opts).unwrap_err().to_string();
        assert!(err.contains("EOF") || err.contains("end"), "{what}: {err}");
    }
}

#[test]
fn a_truncated_layer_blob_is_an_error() {
    let l = layer();
    for (z, blob) in [(&l.ztoc, &l.gz), (&l.tar_ztoc, &l.tar)] {
        for cut in [0, 1, 10, blob.len() / 3, blob.len() / 2, blob.len() - 9, blob.len() - 1] {
            for e in z.entries.iter().filter(|e| e.size > 0) {
                let (_, last) = z.spans_of(e);
                let needed = z.spans.compressed_range(last, z.compressed_size).1 as usize;
                match read_entry(z, &blob[..cut], e) {
                    Ok(got) => assert!(needed <= cut && expected(l, e) == Some(&got[..]), "{}", e.name),
                    Err(err) => assert!(needed > cut && matches!(err, ExtractError::Source(_)), "{}: {err}", e.name),
                }
            }
            // The inflater itself, fed a span cut short, says so.
            for span in 0..z.spans.span_count() {
                let (start, end) = z.spans.compressed_range(span, z.compressed_size);
                let len = z.spans.uncompressed_end(span, z.uncompressed_size) - z.spans.uncompressed_start(span);
                let mut out = vec![0; len as usize];
                let data = &blob[start as usize..(end as usize).min(start as usize + cut / 4)];
                if let Err(err) = inflate_at(&z.spans, span, data, 0, &mut out) {
                    assert!(matches!(err, ExtractError::Truncated { span: s, .. } | ExtractError::Inflate { span: s, .. } if s == span), "{err}");
                } else {
                    let at = z.spans.uncompressed_start(span) as usize;
                    assert_eq!(&out[..], &l.tar[at..at + out.len()], "span {span} from {} bytes", data.len());
                }
            }
        }
    }
}

/// A range source that, like a server asked for bytes past the end, returns fewer bytes.
struct ShortReads<'a>(&'a [u8]);
impl soci::BlobRange for ShortReads<'_> {
    fn read_range(&self, start: u64, end: u64) -> Result<Vec<u8>, String> {
        let len = self.0.len() as u64;
        Ok(self.0[start.min(len) as usize..end.min(len) as usize].to_vec())
    }
}

#[test]
fn a_short_range_read_is_an_error_not_a_panic() {
    let l = layer();
    for (z, blob) in [(&l.ztoc, &l.gz), (&l.tar_ztoc, &l.tar)] {
        let short = ShortReads(&blob[..blob.len() / 2]);
        for e in z.entries.iter().filter(|e| e.size > 0) {
            let r = catch_unwind(AssertUnwindSafe(|| read_entry(z, &short, e)));
            let r = r.unwrap_or_else(|_| panic!("{}: read_entry panicked on a short range read", e.name));
            assert!(r.is_err() || expected(l, e) == r.as_deref().ok(), "{}", e.name);
        }
    }
}

#[test]
fn a_huge_checkpoint_count_is_an_error_not_an_abort() {
    let l = layer();
    let mut bytes = l.ztoc.to_bytes();
    let at = checkpoint_blob_at(&l.ztoc, &bytes).start;
    bytes[at + 3] ^= 0xf0;
    assert!(Ztoc::from_bytes(&bytes).unwrap_err().to_string().contains("does not hold"));
}

#[test]
fn a_huge_claimed_file_is_an_error_not_an_abort() {
    let l = layer();
    let mut m = l.ztoc.clone();
    let last = m.entries.iter().rposition(|e| e.kind == EntryKind::Reg).unwrap();
    m.entries.truncate(last + 1);
    m.uncompressed_size = m.entries[last].offset + (1 << 40);
    m.entries[last].size = 1 << 40;
    // Refused when parsed: deflate cannot expand the blob that much.
    let err = Ztoc::from_bytes(&m.to_bytes()).unwrap_err().to_string();
    assert!(err.contains("cannot come out of"), "{err}");
    // A reader handed such a Ztoc anyway gets an error, not an abort.
    assert!(read_entry(&m, &l.gz[..], &m.entries[last]).is_err());
}

#[test]
fn a_ztoc_that_parses_writes_back_to_one_that_parses() {
    let mut m = layer().ztoc.clone();
    m.entries[1].mtime = soci::time::Mtime { secs: 1_700_000_000, nanos: 123_400_000 };
    let mut bytes = m.to_bytes();
    let (from, to): (&[u8], &[u8]) = (b"2023-11-14T22:13:20.1234Z", b"0000-01-01T00:00:00+01:00");
    let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
    bytes[at..at + from.len()].copy_from_slice(to);
    seed("mtime-year-0-with-offset", &bytes);
    // 1 h before 0000-01-01 is year -1, which could not be written back: refused, as Go does.
    let err = Ztoc::from_bytes(&bytes).unwrap_err().to_string();
    assert!(err.contains("unreadable mod_time"), "{err}");
    // Every zTOC that does parse writes back to itself.
    let z = layer().ztoc.clone();
    assert_eq!(Ztoc::from_bytes(&z.to_bytes()).unwrap(), z);
}
