//! The fetch scheduler over real eStargz blobs (built by our writer) in local files: single
//! flight, coalescing, verification, prefetch, background fill and the store's dedup.

use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use estargz::{build, BuildOptions, Reader};
use store::{ChunkRef, ChunkStore, Error, FetchConfig, FileRangeSource, LayerFetcher, RangeSource, StoreConfig};

/// Counts requests and bytes, optionally flips one byte at a blob offset.
struct Counting {
    inner: FileRangeSource,
    requests: AtomicU64,
    bytes: AtomicU64,
    flip_at: Option<u64>,
    ranges: Mutex<Vec<(u64, u64)>>,
}

impl RangeSource for Counting {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_ranges(&self, ranges: &[(u64, u64)]) -> store::Result<Vec<Vec<u8>>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.ranges.lock().unwrap().extend_from_slice(ranges);
        let mut parts = self.inner.read_ranges(ranges)?;
        for (p, &(o, l)) in parts.iter_mut().zip(ranges) {
            self.bytes.fetch_add(l, Ordering::SeqCst);
            if let Some(f) = self.flip_at.filter(|f| *f >= o && *f < o + l) {
                p[(f - o) as usize] ^= 0x55;
            }
        }
        Ok(parts)
    }
}

fn pseudo(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Layer {
    _dir: tempfile::TempDir,
    blob: std::path::PathBuf,
    reader: Reader<estargz::FileSource>,
}

/// 40 files of 3000..60000 random bytes, two duplicates, one multi-chunk file; 16 KiB chunks.
fn layer() -> Layer {
    layer_with_big_seed(7)
}

/// [`layer`] with `big`'s bytes drawn from `seed`.
fn layer_with_big_seed(seed: u64) -> Layer {
    let dir = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    for i in 0..40u64 {
        add(&format!("f{i:02}"), &pseudo(3000 + (i as usize * 1447) % 57000, i));
    }
    add("dup-a", &pseudo(5000, 99));
    add("dup-b", &pseudo(5000, 99));
    add("big", &pseudo(200_000, seed));
    let tar = b.into_inner().unwrap();
    let blob = dir.path().join("layer.stargz");
    let mut out = std::fs::File::create(&blob).unwrap();
    let opts = BuildOptions {
        chunk_size: 16 << 10,
        ..Default::default()
    };
    let mut buf = Vec::new();
    build(std::io::Cursor::new(tar), &mut buf, &opts).unwrap();
    out.write_all(&buf).unwrap();
    drop(out);
    let reader = Reader::open(estargz::FileSource::open(&blob).unwrap()).unwrap();
    Layer { _dir: dir, blob, reader }
}

fn refs(r: &Reader<estargz::FileSource>) -> Vec<ChunkRef> {
    store::chunk_refs(&estargz::layer_model::layer_index(r.tree(), r.compression()).unwrap())
}

/// The store object of a multi-chunk file.
fn object_of(n: &estargz::Node) -> Option<index::Digest> {
    of_file(n).first()?.slot.map(|s| s.file)
}

/// The references of one file's chunks as the layer model gives them to the fetcher (including
/// its object slot), for a TOC node a test may have tampered with.
fn of_file(n: &estargz::Node) -> Vec<ChunkRef> {
    use index::{Chunk, Extent, Inode, NodeKind, Verify};
    let chunks: Vec<Chunk> = n
        .chunks
        .iter()
        .map(|c| Chunk {
            offset: c.offset,
            end: c.next_offset,
            codec: store::Codec::GzipMembers,
            inner_offset: c.inner_offset,
            size: c.size,
            verify: c.digest.map_or(Verify::Unverifiable, Verify::Uncompressed),
            resume: None,
        })
        .collect();
    let mut ino = Inode::new(NodeKind::Reg, n.path.clone(), 1);
    ino.size = n.size;
    ino.extents = n.chunks.iter().enumerate().map(|(i, c)| Extent { file_offset: c.chunk_offset, len: c.size, chunk: i, chunk_offset: 0 }).collect();
    let key = if chunks.len() > 1 { store::object_key(&ino, &chunks) } else { None };
    chunks
        .iter()
        .zip(&n.chunks)
        .map(|(c, tc)| ChunkRef::of_chunk(c, key.map(|file| store::FileSlot { file, file_size: n.size, offset: tc.chunk_offset })))
        .collect()
}

fn fetcher(l: &Layer, store_dir: &std::path::Path, flip_at: Option<u64>, cfg: FetchConfig) -> (Arc<LayerFetcher>, Arc<Counting>) {
    let src = Arc::new(Counting {
        inner: FileRangeSource::open(&l.blob).unwrap(),
        requests: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        flip_at,
        ranges: Mutex::new(Vec::new()),
    });
    let store = ChunkStore::open(StoreConfig::new(store_dir)).unwrap();
    let f = LayerFetcher::new("layer", refs(&l.reader), src.clone(), store, cfg);
    f.scan_store();
    (Arc::new(f), src)
}

fn file_chunks(l: &Layer, f: &LayerFetcher, path: &str) -> Vec<usize> {
    let n = l.reader.lookup(path).unwrap();
    of_file(n).iter().map(|r| f.chunk_index(r).unwrap()).collect()
}

#[test]
fn reads_are_exact_and_verified() {
    let l = layer();
    let store = tempfile::tempdir().unwrap();
    let (f, _) = fetcher(&l, store.path(), None, FetchConfig::default());
    for name in ["f00", "f17", "big", "dup-b"] {
        let node = l.reader.lookup(name).unwrap();
        let mut want = vec![0u8; node.size as usize];
        l.reader.read_file_at(l.reader.tree().lookup(name).unwrap(), 0, &mut want, true).unwrap();
        let got: Vec<u8> = f.get_many(&file_chunks(&l, &f, name), true).unwrap().iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn whole_layer_fetch_completes_and_fetches_each_byte_once() {
    let l = layer();
    let store = tempfile::tempdir().unwrap();
    let (f, src) = fetcher(&l, store.path(), None, FetchConfig::default());
    // A few on-demand reads first, then the background pass.
    f.get(file_chunks(&l, &f, "f05")[0]).unwrap();
    f.get(file_chunks(&l, &f, "big")[3]).unwrap();
    f.run_background(&AtomicBool::new(false)).unwrap();
    assert!(f.stats.complete.load(Ordering::Relaxed), "present {}%", f.percent_present());
    assert!((f.percent_present() - 100.0).abs() < 1e-9);
    // No range was fetched twice, and no more than the chunk members were fetched.
    let ranges = src.ranges.lock().unwrap().clone();
    let mut seen = HashSet::new();
    for (o, l) in &ranges {
        for b in *o..o + l {
            assert!(seen.insert(b), "byte {b} fetched twice");
        }
    }
    assert!(src.bytes.load(Ordering::SeqCst) <= f.total_bytes());
    // The duplicate file is stored once (dup-b's chunk is dup-a's); the multi-chunk file is one
    // complete object whose bytes are the file.
    let single = f.chunks().iter().filter(|c| c.slot.is_none()).filter_map(|c| c.digest).collect::<HashSet<_>>().len();
    let objects = f.chunks().iter().filter_map(|c| c.slot.map(|s| s.file)).collect::<HashSet<_>>().len();
    assert!(objects >= 1);
    assert_eq!(f.store().usage().disk_chunks, single + objects);
    let big = l.reader.lookup("big").unwrap();
    let object = f.store().complete_object(&object_of(big).unwrap()).expect("big is complete");
    let mut want = vec![0u8; big.size as usize];
    l.reader.read_file_at(l.reader.tree().lookup("big").unwrap(), 0, &mut want, true).unwrap();
    assert_eq!(std::fs::read(object).unwrap(), want);
    // A second fetcher over the same store fetches nothing.
    let (f2, src2) = fetcher(&l, store.path(), None, FetchConfig::default());
    assert!(f2.stats.complete.load(Ordering::Relaxed));
    f2.fetch_all().unwrap();
    f2.get(file_chunks(&l, &f2, "f39")[0]).unwrap();
    assert_eq!(src2.requests.load(Ordering::SeqCst), 0);
}

#[test]
fn concurrent_readers_of_one_chunk_cause_one_fetch() {
    let l = layer();
    let store = tempfile::tempdir().unwrap();
    let cfg = FetchConfig {
        readahead: 0,
        ..Default::default()
    };
    let (f, src) = fetcher(&l, store.path(), None, cfg);
    let idx = file_chunks(&l, &f, "big")[5];
    std::thread::scope(|s| {
        for _ in 0..16 {
            let f = f.clone();
            s.spawn(move || f.get(idx).unwrap());
        }
    });
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
}

#[test]
fn adjacent_misses_coalesce_into_one_range() {
    let l = layer();
    let store = tempfile::tempdir().unwrap();
    let cfg = FetchConfig {
        readahead: 0,
        parallel: 1,
        ..Default::default()
    };
    let (f, src) = fetcher(&l, store.path(), None, cfg);
    let idxs = file_chunks(&l, &f, "big");
    assert!(idxs.len() >= 10);
    f.get_many(&idxs, false).unwrap();
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
    assert_eq!(src.ranges.lock().unwrap().len(), 1);
}

#[test]
fn a_flipped_byte_fails_with_the_chunk_digest_and_is_not_cached() {
    let l = layer();
    let store = tempfile::tempdir().unwrap();
    let idx_probe = {
        let (f, _) = fetcher(&l, tempfile::tempdir().unwrap().path(), None, FetchConfig::default());
        let i = file_chunks(&l, &f, "f10")[0];
        f.chunks()[i].clone()
    };
    let flip = idx_probe.offset + (idx_probe.next_offset - idx_probe.offset) / 2;
    let cfg = FetchConfig {
        readahead: 0,
        ..Default::default()
    };
    let (f, _) = fetcher(&l, store.path(), Some(flip), cfg);
    let i = f.chunk_index(&idx_probe).unwrap();
    match f.get(i) {
        Err(Error::Corrupt { digest, .. }) => assert_eq!(digest, idx_probe.digest.unwrap().to_string()),
        other => panic!("expected a corrupt-chunk error, got {:?}", other.map(|v| v.len())),
    }
    assert!(!f.store().contains(&idx_probe.digest.unwrap()));
    assert_eq!(f.stats.errors.load(Ordering::Relaxed), 1);
    // Other chunks still read.
    f.get(file_chunks(&l, &f, "f11")[0]).unwrap();
}

#[test]
fn prefetch_fetches_a_prefix_in_few_requests() {
    let l = layer();
    let store = tempfile::tempdir().unwrap();
    let (f, src) = fetcher(&l, store.path(), None, FetchConfig::default());
    let end = f.chunks()[f.chunks().len() / 2].offset;
    f.prefetch_until(end).unwrap();
    assert!(src.requests.load(Ordering::SeqCst) <= 4);
    for (i, c) in f.chunks().iter().enumerate() {
        if c.next_offset <= end {
            assert!(f.store().contains(&c.digest.unwrap()), "chunk {i} not prefetched");
        }
    }
}

#[test]
fn prefetch_of_ranges_takes_exactly_the_chunks_inside_them() {
    let l = layer();
    let store = tempfile::tempdir().unwrap();
    let (f, _) = fetcher(&l, store.path(), None, FetchConfig::default());
    let c = f.chunks().to_vec();
    let n = c.len();
    assert!(n >= 8, "{n} chunks");
    // Two ranges, the later one first: chunks [n/2, n/2 + 2) and [1, 3); a range that ends one
    // byte short of a chunk's end leaves that chunk out.
    let ranges = [c[n / 2].offset..c[n / 2 + 1].next_offset, c[1].offset..c[3].next_offset - 1];
    f.prefetch_ranges(&ranges).unwrap();
    let inside = |i: usize| (n / 2..n / 2 + 2).contains(&i) || (1..3).contains(&i);
    for (i, chunk) in c.iter().enumerate() {
        assert_eq!(f.store().contains(&chunk.digest.unwrap()), inside(i), "chunk {i}");
    }
}

#[test]
fn background_fill_waits_for_a_quiet_link_and_then_completes() {
    let l = layer();
    let store = tempfile::tempdir().unwrap();
    let cfg = FetchConfig {
        background_silence: std::time::Duration::from_millis(600),
        ..Default::default()
    };
    let (f, src) = fetcher(&l, store.path(), None, cfg);
    f.get(file_chunks(&l, &f, "f03")[0]).unwrap();
    let after_demand = src.requests.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    let bg = {
        let f = f.clone();
        std::thread::spawn(move || f.run_background(&AtomicBool::new(false)))
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(src.requests.load(Ordering::SeqCst), after_demand, "the fill must not start within the quiet period");
    bg.join().unwrap().unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(550));
    assert!(f.stats.complete.load(Ordering::Relaxed));
    assert!(src.requests.load(Ordering::SeqCst) > after_demand);
}

#[test]
fn readers_join_a_fetch_ahead_instead_of_fetching_again() {
    let l = layer();
    let store = tempfile::tempdir().unwrap();
    let (f, src) = fetcher(&l, store.path(), None, FetchConfig::default());
    let idxs = file_chunks(&l, &f, "big");
    f.fetch_ahead(&idxs);
    // Read the file chunk by chunk, as a streaming reader would, while the fetch is in flight.
    let node = l.reader.lookup("big").unwrap();
    let mut want = vec![0u8; node.size as usize];
    l.reader.read_file_at(l.reader.tree().lookup("big").unwrap(), 0, &mut want, true).unwrap();
    let got: Vec<u8> = idxs.iter().flat_map(|&i| f.get_many(&[i], false).unwrap().pop().unwrap().to_vec()).collect();
    assert_eq!(got, want);
    let blob_bytes: u64 = idxs.iter().map(|&i| f.chunks()[i].next_offset - f.chunks()[i].offset).sum();
    assert_eq!(src.bytes.load(Ordering::SeqCst), blob_bytes, "every chunk fetched exactly once");
    // Nothing was left claimed: a second pass is served by the store alone.
    let before = src.requests.load(Ordering::SeqCst);
    f.get_many(&idxs, true).unwrap();
    assert_eq!(src.requests.load(Ordering::SeqCst), before);
}

#[test]
fn readahead_chunks_reach_the_store_after_the_reader_is_served() {
    let l = layer();
    let store = tempfile::tempdir().unwrap();
    let (f, src) = fetcher(&l, store.path(), None, FetchConfig::default());
    let idxs = file_chunks(&l, &f, "big");
    f.get(idxs[0]).unwrap();
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
    // The readahead that came with the miss is settled on a helper thread; wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while f.stats.chunks_fetched.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(f.stats.chunks_fetched.load(Ordering::SeqCst) >= 2, "readahead chunks settled");
    f.get_many(&idxs[1..3], false).unwrap();
    assert_eq!(src.requests.load(Ordering::SeqCst), 1, "the following chunks came with the first miss");
}

/// Issue 16 (cache poisoning): a hostile layer whose multi-chunk file claims the victim file's
/// size, chunking and whole-file `digest` — with other bytes and correct chunk digests of its
/// own — must not make the victim read those bytes through the shared store, in either order,
/// neither chunk by chunk nor through the complete object that passthrough would hand out.
#[test]
fn a_claimed_whole_file_digest_cannot_poison_another_layer() {
    let victim = layer_with_big_seed(7);
    let attacker = layer_with_big_seed(8);
    let store_dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(StoreConfig::new(store_dir.path())).unwrap();
    let v_big = victim.reader.lookup("big").unwrap().clone();
    let mut lie = attacker.reader.lookup("big").unwrap().clone();
    assert_eq!((lie.size, lie.chunks.len()), (v_big.size, v_big.chunks.len()));
    lie.digest = v_big.digest;
    // The attacker's chunk list, with the lying node in place of its own `big`.
    let big_id = attacker.reader.tree().lookup("big").unwrap();
    let attacker_refs: Vec<ChunkRef> = attacker.reader.tree().nodes.iter().enumerate().flat_map(|(i, n)| if i == big_id { of_file(&lie) } else { of_file(n) }).collect();
    assert_ne!(object_of(&lie), object_of(&v_big), "objects are keyed by the verified chunk list");
    let open = |l: &Layer, refs: Vec<ChunkRef>| {
        let src = Arc::new(FileRangeSource::open(&l.blob).unwrap());
        let f = LayerFetcher::new("layer", refs, src, store.clone(), FetchConfig::default());
        f.scan_store();
        Arc::new(f)
    };
    let mut want = vec![0u8; v_big.size as usize];
    victim.reader.read_file_at(victim.reader.tree().lookup("big").unwrap(), 0, &mut want, true).unwrap();
    let read_big = |f: &Arc<LayerFetcher>| -> Vec<u8> { of_file(&v_big).iter().flat_map(|r| f.get(f.chunk_index(r).unwrap()).unwrap().to_vec()).collect() };
    // Victim first, then the attacker fills the store, then the victim reads again.
    let v = open(&victim, refs(&victim.reader));
    v.fetch_all().unwrap();
    let a = open(&attacker, attacker_refs.clone());
    a.fetch_all().unwrap();
    let v2 = open(&victim, refs(&victim.reader));
    assert!(read_big(&v2) == want, "victim read the attacker's bytes");
    let object = store.complete_object(&object_of(&v_big).unwrap()).expect("victim's object complete");
    assert!(std::fs::read(object).unwrap() == want, "victim's passthrough object holds other bytes");
    // Attacker first on a fresh store.
    let store_dir2 = tempfile::tempdir().unwrap();
    let store2 = ChunkStore::open(StoreConfig::new(store_dir2.path())).unwrap();
    let src = Arc::new(FileRangeSource::open(&attacker.blob).unwrap());
    LayerFetcher::new("attacker", attacker_refs, src, store2.clone(), FetchConfig::default()).fetch_all().unwrap();
    assert!(store2.complete_object(&object_of(&v_big).unwrap()).is_none(), "the attacker completed the victim's object");
    let src = Arc::new(FileRangeSource::open(&victim.blob).unwrap());
    let v3 = Arc::new(LayerFetcher::new("victim", refs(&victim.reader), src, store2, FetchConfig::default()));
    v3.scan_store();
    assert!(read_big(&v3) == want, "victim read the attacker's bytes (attacker first)");
}

/// Found by `make fuzz` (layer_read): a TOC chunk whose `chunkDigest` names its real content but
/// whose declared size is larger decoded "successfully" to fewer bytes, and the filesystem
/// panicked slicing it. Now the chunk is an error naming both sizes.
#[test]
fn a_chunk_declared_longer_than_its_content_is_an_error() {
    let l = layer();
    let mut all = refs(&l.reader);
    let n = l.reader.lookup("f03").unwrap();
    let want = of_file(n)[0].clone();
    let at = all.iter().position(|r| *r == want).unwrap();
    all[at].size += 1;
    let lying = all[at].clone();
    let store = tempfile::tempdir().unwrap();
    let src = Arc::new(FileRangeSource::open(&l.blob).unwrap());
    let f = Arc::new(LayerFetcher::new("layer", all, src, ChunkStore::open(StoreConfig::new(store.path())).unwrap(), FetchConfig::default()));
    let idx = f.chunk_index(&lying).unwrap();
    match f.get(idx) {
        // Either the member ends early ("decoded to N bytes, the TOC declares M") or the extra
        // byte breaks the digest; both are this chunk's error, never a short chunk.
        Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("declares") || reason.contains("hashes to"), "{reason}"),
        other => panic!("expected a corrupt-chunk error, got {:?}", other.map(|d| d.len())),
    }
}

/// Found by `make fuzz` (layer_read, a stack overflow): with the honest chunk already stored,
/// an entry naming its digest with another size counted as "stored" but was never returned,
/// and the read went round in circles. Now it is fetched and fails verification.
#[test]
fn a_stored_digest_with_another_size_is_not_taken_as_present() {
    let l = layer();
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(StoreConfig::new(dir.path())).unwrap();
    let n = l.reader.lookup("f03").unwrap();
    let honest = of_file(n)[0].clone();
    let src = Arc::new(FileRangeSource::open(&l.blob).unwrap());
    let f = Arc::new(LayerFetcher::new("honest", refs(&l.reader), src.clone(), store.clone(), FetchConfig::default()));
    f.get(f.chunk_index(&honest).unwrap()).unwrap();
    let mut lying = honest.clone();
    lying.size -= 1;
    let g = Arc::new(LayerFetcher::new("lying", vec![lying.clone()], src, store, FetchConfig::default()));
    g.scan_store();
    assert!(g.percent_present() < 100.0, "a chunk of another size counted as present");
    assert!(matches!(g.get(g.chunk_index(&lying).unwrap()), Err(Error::Corrupt { .. })));
}
