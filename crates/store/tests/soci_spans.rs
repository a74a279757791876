//! SOCI spans in the fetcher: one fetch per span, the span stored whole (not every file in it),
//! its other files served from it without a request, and a damaged stored span never served.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use index::{LayerIndex, NodeKind, Verify};
use store::{chunk_refs, ChunkRef, ChunkStore, FetchConfig, FileRangeSource, LayerFetcher, RangeSource, StoreConfig};

struct Counting {
    inner: FileRangeSource,
    requests: AtomicU64,
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
        self.inner.read_ranges(ranges)
    }
}

struct Layer {
    dir: tempfile::TempDir,
    blob: std::path::PathBuf,
    index: LayerIndex,
    files: HashMap<String, Vec<u8>>,
}

/// 80 text files of 1.5 KiB in one gzip stream, indexed with 16 KiB spans (checkpoints fall
/// on deflate block boundaries: a few spans of many files each).
fn layer() -> Layer {
    let mut b = tar::Builder::new(Vec::new());
    let mut files = HashMap::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..80 {
        let data: Vec<u8> = (0..1500)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"lazy pull span window \n"[(x % 23) as usize]
            })
            .collect();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        let name = format!("data/f{i:02}");
        b.append_data(&mut h, &name, &data[..]).unwrap();
        files.insert(name, data);
    }
    let tar = b.into_inner().unwrap();
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(&tar).unwrap();
    let gz = e.finish().unwrap();
    let ztoc = soci::build_ztoc(&gz[..], &soci::BuildOptions { span_size: 16 << 10, ..Default::default() }).unwrap();
    assert!(ztoc.spans.span_count() >= 2, "{} spans", ztoc.spans.span_count());
    let index = soci::layer_model::layer_index(&ztoc).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let blob = dir.path().join("layer.gz");
    std::fs::write(&blob, &gz).unwrap();
    Layer { dir, blob, index, files }
}

fn fetcher(l: &Layer, store: &Arc<ChunkStore>) -> (Arc<LayerFetcher>, Arc<Counting>) {
    let src = Arc::new(Counting { inner: FileRangeSource::open(&l.blob).unwrap(), requests: AtomicU64::new(0) });
    let cfg = FetchConfig { readahead: 0, ..FetchConfig::default() };
    (Arc::new(LayerFetcher::new("layer", chunk_refs(&l.index), src.clone(), store.clone(), cfg)), src)
}

/// (path, fetcher chunk position, span digest) of every file inside one span.
fn file_chunks(l: &Layer, f: &LayerFetcher) -> Vec<(String, usize, index::Digest)> {
    let mut out = Vec::new();
    for ino in l.index.inodes().iter().flatten().filter(|i| i.kind == NodeKind::Reg && i.extents.len() == 1) {
        let c = &l.index.chunks()[ino.extents[0].chunk as usize];
        let Verify::Compressed(span) = c.verify else { panic!("a SOCI chunk is verified by its span") };
        let idx = f.chunk_index(&ChunkRef::of_chunk(c, None)).expect("the fetcher has the chunk");
        out.push((ino.path.trim_start_matches('/').to_string(), idx, span));
    }
    out
}

/// Waits (bounded) until `cond` holds: the span is stored by the settle thread after the read
/// returned.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn one_read_stores_its_span_whole_and_the_spans_other_files_need_no_request() {
    let l = layer();
    let store_dir = l.dir.path().join("store");
    let store = ChunkStore::open(StoreConfig::new(&store_dir)).unwrap();
    let (f, src) = fetcher(&l, &store);
    let files = file_chunks(&l, &f);
    // Three files of one span.
    let mut by_span: HashMap<index::Digest, Vec<&(String, usize, index::Digest)>> = HashMap::new();
    files.iter().for_each(|e| by_span.entry(e.2).or_default().push(e));
    let same = by_span.values().find(|v| v.len() >= 3).expect("a span holding three files");
    let (a, b, c) = (same[0], same[1], same[2]);

    assert_eq!(&f.get(a.1).unwrap()[..], &l.files[&a.0][..], "{}", a.0);
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
    eventually("the span is stored", || store.contains(&a.2));
    assert!(f.wait_settled(Duration::from_secs(10)));
    let piece = |e: &(String, usize, index::Digest)| f.chunks()[e.1].digest.unwrap();
    assert!(store.contains(&piece(a)), "the file read is stored");
    assert!(!store.contains(&piece(b)) && !store.contains(&piece(c)), "files nobody read are not decoded into the store");

    // Another file of the span: from the span inflated in memory, no request.
    assert_eq!(&f.get(b.1).unwrap()[..], &l.files[&b.0][..], "{}", b.0);
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);

    // A new fetcher (a remount, or another layer daemon: nothing in memory): from the stored span.
    let store2 = ChunkStore::open(StoreConfig::new(&store_dir)).unwrap();
    let (f2, src2) = fetcher(&l, &store2);
    assert_eq!(&f2.get(c.1).unwrap()[..], &l.files[&c.0][..], "{}", c.0);
    assert_eq!(src2.requests.load(Ordering::SeqCst), 0, "a stored span is not fetched again");
}

#[test]
fn a_damaged_stored_span_is_fetched_again_never_served() {
    let l = layer();
    let store_dir = l.dir.path().join("store");
    let store = ChunkStore::open(StoreConfig::new(&store_dir)).unwrap();
    let (f, _) = fetcher(&l, &store);
    let files = file_chunks(&l, &f);
    let a = &files[0];
    let b = files.iter().find(|e| e.2 == a.2 && e.0 != a.0).expect("two files in the first span");
    f.get(a.1).unwrap();
    eventually("the span is stored", || store.contains(&a.2));
    assert!(f.wait_settled(Duration::from_secs(10)));
    // Flip a byte of the stored span file.
    let hex = a.2.hex();
    let path = store_dir.join("chunks").join("sha256").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let store2 = ChunkStore::open(StoreConfig::new(&store_dir)).unwrap();
    let (f2, src2) = fetcher(&l, &store2);
    assert_eq!(&f2.get(b.1).unwrap()[..], &l.files[&b.0][..], "{}", b.0);
    assert_eq!(src2.requests.load(Ordering::SeqCst), 1, "the damaged span was fetched again");
}
