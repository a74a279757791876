//! The per-layer fetch scheduler: turns "I need these chunks" into as few verified range
//! requests as possible.
//!
//! Design points, each answering a measured weakness of the Go peer (which fetches 1.2–1.35×
//! the blob and reads a whole image at ~60 MB/s):
//! - **Single flight per chunk digest.** A chunk is fetched once however many readers want it;
//!   late comers wait for the fetch in progress instead of issuing their own, so no byte is
//!   fetched twice.
//! - **Coalescing.** Missing chunks whose members are adjacent in the blob become one range;
//!   several ranges go out as one multi-range request per worker.
//! - **Readahead on demand.** A miss also claims the following uncached chunks up to
//!   `readahead` compressed bytes: files are read in layer order far more often than not, and
//!   one 1 MiB request costs about what one 4 KiB request does on any real link.
//! - **Parallel decode.** Each worker decompresses and hashes the chunks of its own ranges, so
//!   both cores work while bytes stream in.
//! - **Verification before anything else sees the bytes.** A chunk whose sha256 differs from
//!   its `chunkDigest` fails its readers with [`Error::Corrupt`] naming the digest, and is
//!   neither cached nor returned.
//! - **Background fill yields.** The background pass (see [`fill`]) waits for a quiet link
//!   and keeps each of its requests short, so on-demand reads never queue behind it.
//! - **Every claim is released.** Chunk references come from an untrusted TOC; decoding
//!   re-checks their bounds ([`index::Chunk::check`]) and uses checked arithmetic, and should a
//!   worker panic anyway, its claims are failed with an [`Error::Fetch`] naming the panic and leave the in-flight
//!   table, so no reader waits out `wait_timeout` for a fetch that is no longer running.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use index::{Chunk, Digest, Inode, LayerIndex, Verify};
pub use index::Codec;
use tracing::{debug, warn};

use crate::chunks::ChunkStore;
use crate::error::{Error, Result};
use crate::source::RangeSource;

mod ahead;
mod decode;
mod fill;
mod release;
mod spans;

/// One chunk of the layer, as the fetcher keeps it: the model's chunk (where, how to decode,
/// what it must hash to) plus the file object it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef {
    /// sha256 of the uncompressed chunk (required: unverifiable chunks are refused).
    pub digest: Option<Digest>,
    /// Blob offset of the compressed range holding the chunk.
    pub offset: u64,
    /// Blob offset where that range ends.
    pub next_offset: u64,
    /// Offset of the chunk inside the decoded range.
    pub inner_offset: u64,
    /// Uncompressed size.
    pub size: u64,
    /// How the range decodes.
    pub codec: Codec,
    /// When set, the compressed range `[offset, next_offset)` must hash to this before it is
    /// decoded (SOCI spans), and `digest` is a promise key ([`span_chunk_key`]), not a hash of
    /// the chunk's bytes.
    pub compressed_digest: Option<Digest>,
    /// Where a [`Codec::GzipResume`] range resumes.
    pub resume: Option<Arc<index::zran::Resume>>,
    /// For a chunk of a multi-chunk file: its place in the file's object in the store, so that
    /// the complete file can later be handed to the kernel (FUSE passthrough).
    pub slot: Option<crate::chunks::FileSlot>,
}

impl ChunkRef {
    /// Identity of a chunk in a layer, and the order of [`LayerFetcher::chunks`]: blob position
    /// first, then the digest, because two index entries may name the same bytes and promise
    /// different contents — each must be verified against its own promise. The same order as
    /// the model's chunk table ([`index::Chunk::key`]), so chunk ids agree on both sides.
    pub fn key(&self) -> (u64, u64, u64, Option<Digest>) {
        (self.offset, self.inner_offset, self.size, self.digest)
    }

    /// The reference of the model's chunk `c`, stored in file object `slot` if it has one.
    pub fn of_chunk(c: &Chunk, slot: Option<crate::chunks::FileSlot>) -> ChunkRef {
        let (digest, compressed_digest) = match c.verify {
            Verify::Uncompressed(d) => (Some(d), None),
            Verify::Compressed(d) => (Some(span_chunk_key(&d, c)), Some(d)),
            Verify::Unverifiable => (None, None),
        };
        ChunkRef {
            digest,
            offset: c.offset,
            next_offset: c.end,
            inner_offset: c.inner_offset,
            size: c.size,
            codec: c.codec,
            compressed_digest,
            resume: c.resume.clone(),
            slot,
        }
    }
}

/// The store key of a chunk verified through its compressed range: a digest of everything
/// that determines its bytes (the range's digest, the checkpoint, the slice taken). Chunks of
/// the same span of the same blob share it across layers and images; a zTOC with another
/// checkpoint window gets other keys, so it cannot poison what a correct one reads.
pub fn span_chunk_key(range_digest: &Digest, c: &Chunk) -> Digest {
    let window = c.resume.as_ref().map(|r| (r.bits, r.window_digest().to_string()));
    let text = format!(
        "lazypull span chunk v1\nrange {range_digest}\ncodec {}\nresume {window:?}\ninner {} size {}\n",
        c.codec.name(),
        c.inner_offset,
        c.size
    );
    Digest::of(text.as_bytes())
}

/// The fetcher's chunk list of a layer: one reference per chunk of the index's table, in its
/// order (so extent chunk ids index it directly).
///
/// Chunks of multi-chunk files are stored inside one object per file, so that a fully fetched
/// file can be passed through to the kernel as one backing file. The object is keyed by
/// [`object_key`] — a digest of the file's size and extent list (offset, length and chunk digest
/// of every extent) — and not by a whole-file digest an index may state, which nothing
/// verifies: a hostile layer could otherwise claim a victim's whole-file digest with other bytes
/// and have the victim read them through the shared store. Every chunk written into an object
/// was verified against its digest in the list the key commits to, so a complete object holds
/// exactly the bytes any layer with the same key expects. A chunk shared by several multi-chunk
/// files belongs to the first one's object (the mount re-verifies a backing file against its
/// own extents before passing it through).
pub fn chunk_refs(index: &LayerIndex) -> Vec<ChunkRef> {
    let mut slots: Vec<Option<crate::chunks::FileSlot>> = vec![None; index.chunks().len()];
    for ino in index.inodes().iter().flatten() {
        if ino.extents.len() < 2 || ino.extents.iter().any(|e| e.chunk_offset != 0 || e.len != index.chunks()[e.chunk].size) {
            continue;
        }
        let Some(file) = object_key(ino, index.chunks()) else { continue };
        for e in &ino.extents {
            slots[e.chunk].get_or_insert(crate::chunks::FileSlot { file, file_size: ino.size, offset: e.file_offset });
        }
    }
    index.chunks().iter().zip(slots).map(|(c, slot)| ChunkRef::of_chunk(c, slot)).collect()
}

/// The store object of a multi-chunk file: sha256 of its size and of every extent's offset,
/// length and chunk digest; `None` if a chunk has no digest (then nothing could verify the
/// object).
pub fn object_key(ino: &Inode, chunks: &[Chunk]) -> Option<Digest> {
    let mut list = format!("lazypull file object v1\nsize {}\n", ino.size);
    for e in &ino.extents {
        list.push_str(&format!("{} {} {}\n", e.file_offset, e.len, chunks.get(e.chunk)?.verify.content_digest()?));
    }
    Some(Digest::of(list.as_bytes()))
}

/// Knobs of the scheduler.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Largest single coalesced range.
    pub max_range: u64,
    /// Compressed bytes of following chunks fetched along with an on-demand miss.
    pub readahead: u64,
    /// Concurrent range requests per layer.
    pub parallel: usize,
    /// Longest wait for a fetch started by another reader.
    pub wait_timeout: Duration,
    /// Background fill rate in bytes/s (0 = unlimited).
    pub background_rate: u64,
    /// Largest batch of the prefetch and background passes, in compressed bytes.
    pub background_batch: u64,
    /// The background pass runs only after this long without on-demand fetches.
    pub background_silence: Duration,
    /// Demand shared with the other layers on the same link (their reads count as ours for
    /// the background pass's quiet period).
    pub link: Option<Arc<crate::link::LinkActivity>>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            max_range: 8 << 20,
            readahead: 256 << 10,
            parallel: 4,
            wait_timeout: Duration::from_secs(60),
            background_rate: 0,
            background_batch: 16 << 20,
            background_silence: Duration::from_secs(1),
            link: None,
        }
    }
}

/// Counters of one layer, readable while it is mounted.
#[derive(Debug, Default)]
pub struct LayerStats {
    /// Compressed bytes received from the source.
    pub fetched_bytes: AtomicU64,
    /// Range requests made (a multi-range request counts once).
    pub requests: AtomicU64,
    /// Chunks fetched and verified.
    pub chunks_fetched: AtomicU64,
    /// Chunk lookups answered by the store.
    pub cache_hits: AtomicU64,
    /// Failed fetches (network, corruption).
    pub errors: AtomicU64,
    /// Compressed bytes of the layer's chunks known to be in the store.
    pub present_bytes: AtomicU64,
    /// Set when the prioritized-files prefetch finished.
    pub prefetch_done: AtomicBool,
    /// Set when every chunk is in the store.
    pub complete: AtomicBool,
    /// Total time spent waiting for on-demand fetches, in microseconds.
    pub demand_wait_us: AtomicU64,
    /// Histogram of range-request latencies: counts per bucket of [`LATENCY_BUCKETS_MS`]
    /// (the last counts everything slower), and their sum in microseconds.
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    pub latency_sum_us: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// Upper bounds (ms) of the request-latency histogram buckets.
pub const LATENCY_BUCKETS_MS: [u64; 11] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500];

impl LayerStats {
    fn observe_latency(&self, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        let i = LATENCY_BUCKETS_MS.iter().position(|&b| ms <= b as f64).unwrap_or(LATENCY_BUCKETS_MS.len());
        self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

struct Flight {
    result: Mutex<Option<Result<Arc<Vec<u8>>>>>,
    done: Condvar,
    /// Readers that joined this flight (counted under the in-flight lock): an optional claim
    /// nobody joined is dropped instead of decoded ([`Claim::optional`]).
    waiters: AtomicUsize,
}

impl Flight {
    fn new() -> Arc<Flight> {
        Arc::new(Flight {
            result: Mutex::new(None),
            done: Condvar::new(),
            waiters: AtomicUsize::new(0),
        })
    }

    /// Hands the result to the waiters (again, harmlessly, if it was published before).
    fn publish(&self, res: Result<Arc<Vec<u8>>>) {
        *self.result.lock().unwrap() = Some(res);
        self.done.notify_all();
    }

    fn wait(&self, timeout: Duration) -> Option<Result<Arc<Vec<u8>>>> {
        let guard = self.result.lock().unwrap();
        let (guard, _) = self.done.wait_timeout_while(guard, timeout, |r| r.is_none()).unwrap();
        guard.clone()
    }
}

/// A counting semaphore for range requests.
struct Permits {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Permits {
    fn acquire(&self) -> PermitGuard<'_> {
        let mut f = self.free.lock().unwrap();
        while *f == 0 {
            f = self.cv.wait(f).unwrap();
        }
        *f -= 1;
        PermitGuard(self)
    }
}

struct PermitGuard<'a>(&'a Permits);

impl Drop for PermitGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap() += 1;
        self.0.cv.notify_one();
    }
}

/// Decrements a counter when dropped.
struct CountGuard<'a>(&'a AtomicUsize);

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Fetches the chunks of one layer blob into a [`ChunkStore`].
pub struct LayerFetcher {
    blob: String,
    chunks: Vec<ChunkRef>,
    present: Vec<AtomicBool>,
    /// Positions of each digest (a layer may hold the same content more than once).
    by_digest: HashMap<Digest, Vec<usize>>,
    total_bytes: u64,
    source: Arc<dyn RangeSource>,
    store: Arc<ChunkStore>,
    config: FetchConfig,
    inflight: Mutex<HashMap<Digest, Arc<Flight>>>,
    permits: Permits,
    /// On-demand reads in progress.
    demand: AtomicUsize,
    /// When (µs after `epoch`) the last on-demand read that needed the network ended.
    last_network_demand_us: AtomicU64,
    epoch: Instant,
    closed: AtomicBool,
    /// Resumed-stream ranges (SOCI spans): how far into its output the layer's chunks reach,
    /// and the last few inflated outputs, so that the many files of one span cost one
    /// inflation of it, not one each from its checkpoint.
    resumed_need: HashMap<(u64, u64), u64>,
    resumed: Mutex<std::collections::VecDeque<ResumedSpan>>,
    pub stats: LayerStats,
}

/// The verified, inflated output of one resumed range.
struct ResumedSpan {
    offset: u64,
    end: u64,
    data: Arc<Vec<u8>>,
}

/// Bytes of inflated spans kept per layer, most recently used first (at least one span). Since
/// a span's other files are no longer decoded into the store when it is fetched, a later read
/// of one of them re-inflates the stored span unless it is still here: with four 4 MiB spans
/// kept, a quarter of the inflations of `debian-script` were such repeats.
const RESUMED_BYTES_KEPT: usize = 32 << 20;

/// How a set of claims is turned into requests.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Concurrent requests (each a multi-range request over contiguous runs).
    workers: usize,
    /// Largest coalesced range.
    max_range: u64,
}

/// A chunk claimed by this thread for fetching.
#[derive(Clone)]
struct Claim {
    idx: usize,
    digest: Digest,
    flight: Arc<Flight>,
    /// A reader is blocked on this chunk: it is decoded and handed out before anything else
    /// the same request brought (readahead), and its disk write happens after the hand-out.
    urgent: bool,
    /// Claimed only because it shares a span with a chunk being read (SOCI): claiming it makes
    /// a concurrent reader of it wait for this fetch instead of fetching the span again, but
    /// if nobody did, it is released undecoded and the verified span is stored whole instead
    /// ([`LayerFetcher::keep_spans`]), so that a 4 MiB span of many files costs one disk object
    /// rather than one per file nobody read.
    optional: bool,
}

impl LayerFetcher {
    /// `chunks` in any order; they are kept sorted by blob position (duplicates removed).
    pub fn new(blob: impl Into<String>, mut chunks: Vec<ChunkRef>, source: Arc<dyn RangeSource>, store: Arc<ChunkStore>, config: FetchConfig) -> LayerFetcher {
        chunks.sort_by_key(ChunkRef::key);
        chunks.dedup();
        let total_bytes = member_bytes(&chunks, 0..chunks.len());
        let present = chunks.iter().map(|_| AtomicBool::new(false)).collect();
        let mut by_digest: HashMap<Digest, Vec<usize>> = HashMap::new();
        for (i, c) in chunks.iter().enumerate() {
            if let Some(d) = c.digest {
                by_digest.entry(d).or_default().push(i);
            }
        }
        let parallel = config.parallel.max(1);
        let mut resumed_need: HashMap<(u64, u64), u64> = HashMap::new();
        for c in chunks.iter().filter(|c| c.resume.is_some()) {
            let need = resumed_need.entry((c.offset, c.next_offset)).or_default();
            *need = (*need).max(c.inner_offset.saturating_add(c.size));
        }
        LayerFetcher {
            blob: blob.into(),
            present,
            by_digest,
            total_bytes,
            chunks,
            source,
            store,
            permits: Permits {
                free: Mutex::new(parallel),
                cv: Condvar::new(),
            },
            config,
            inflight: Mutex::new(HashMap::new()),
            demand: AtomicUsize::new(0),
            last_network_demand_us: AtomicU64::new(0),
            epoch: Instant::now(),
            closed: AtomicBool::new(false),
            resumed_need,
            resumed: Mutex::new(std::collections::VecDeque::new()),
            stats: LayerStats::default(),
        }
    }

    pub fn blob(&self) -> &str {
        &self.blob
    }

    /// The layer's chunks in blob order; [`Self::chunk_index`] maps a chunk to its position.
    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// Position of a chunk in [`Self::chunks`].
    pub fn chunk_index(&self, c: &ChunkRef) -> Option<usize> {
        self.chunks.binary_search_by_key(&c.key(), ChunkRef::key).ok()
    }

    /// Compressed size of all the layer's chunk members.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn store(&self) -> &Arc<ChunkStore> {
        &self.store
    }

    /// Stops background work; later fetches fail with [`Error::Closed`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Marks every chunk already in the store as present (call once after creating the
    /// fetcher over a warm store, so status and background fill skip them cheaply).
    pub fn scan_store(&self) {
        for (i, c) in self.chunks.iter().enumerate() {
            if c.digest.is_some_and(|d| self.store_contains(i, &d)) {
                self.mark_present(i);
            }
        }
    }

    fn store_get(&self, idx: usize, d: &Digest) -> Option<Arc<Vec<u8>>> {
        let c = &self.chunks[idx];
        let data = match &c.slot {
            Some(slot) => self.store.get_slot(d, slot, c.size),
            None => self.store.get(d),
        }?;
        // Content with this digest but another length than this entry declares (two TOC
        // entries disagreeing about one digest): not this chunk; decoding it will say why.
        (data.len() as u64 == c.size).then_some(data)
    }

    /// Whether chunk `idx` is stored as this layer declares it (digest *and* size), consistent
    /// with [`LayerFetcher::store_get`]: otherwise a chunk "present" but never returned would
    /// send a reader round in circles (found by `make fuzz`: a stack overflow).
    fn store_contains(&self, idx: usize, d: &Digest) -> bool {
        let c = &self.chunks[idx];
        match &c.slot {
            Some(slot) => self.store.contains_slot(d, slot, c.size),
            None => self.store.contains_len(d, c.size),
        }
    }

    /// Stores a verified chunk at every place of this layer that holds the same content.
    fn store_put(&self, idx: usize, d: &Digest, data: &Arc<Vec<u8>>) -> Result<()> {
        let mut done: Vec<Option<crate::chunks::FileSlot>> = Vec::new();
        let positions = self.by_digest.get(d).map(Vec::as_slice).unwrap_or(std::slice::from_ref(&idx));
        for &j in positions {
            let slot = self.chunks[j].slot;
            if done.contains(&slot) {
                continue;
            }
            done.push(slot);
            match &slot {
                Some(s) => self.store.put_slot(d, s, data)?,
                None => self.store.put(d, data)?,
            }
        }
        Ok(())
    }

    /// Marks chunk `i` and every other position holding the same content as present.
    fn mark_present(&self, i: usize) {
        match self.chunks[i].digest.and_then(|d| self.by_digest.get(&d)) {
            Some(all) => all.iter().for_each(|&j| self.mark_one(j)),
            None => self.mark_one(i),
        }
    }

    fn mark_one(&self, i: usize) {
        if !self.present[i].swap(true, Ordering::Relaxed) {
            let c = &self.chunks[i];
            // Chunks sharing a member (innerOffset) count the member once, at its first chunk.
            let first_of_member = i == 0 || self.chunks[i - 1].offset != c.offset;
            if first_of_member {
                let len = c.next_offset.saturating_sub(c.offset);
                let now = self.stats.present_bytes.fetch_add(len, Ordering::Relaxed).saturating_add(len);
                if now >= self.total_bytes {
                    self.stats.complete.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// How on-demand misses are fetched: as few ranges as possible, split among the workers.
    fn demand_shape(&self) -> Shape {
        Shape {
            workers: self.config.parallel,
            max_range: self.config.max_range,
        }
    }

    /// The verified bytes of chunk `idx`, fetching it (and, on a miss, up to `readahead`
    /// following bytes) if needed.
    pub fn get(self: &Arc<Self>, idx: usize) -> Result<Arc<Vec<u8>>> {
        Ok(self.get_many(&[idx], true)?.pop().expect("one chunk asked, one returned"))
    }

    /// The verified bytes of several chunks (one coalesced fetch for the missing ones).
    ///
    /// Returns as soon as *these* chunks are verified: the readahead chunks that came with them
    /// are decoded, and all of them written to the store, on a helper thread meanwhile (a
    /// reader that wants one of those in between joins its flight).
    pub fn get_many(self: &Arc<Self>, idxs: &[usize], readahead: bool) -> Result<Vec<Arc<Vec<u8>>>> {
        self.demand.fetch_add(1, Ordering::SeqCst);
        let _demand = CountGuard(&self.demand);
        let started = Instant::now();
        let mut out: Vec<Option<Arc<Vec<u8>>>> = vec![None; idxs.len()];
        let mut claims = Vec::new();
        let mut waits = Vec::new();
        for (k, &idx) in idxs.iter().enumerate() {
            let d = self.digest_of(idx)?;
            if let Some(v) = self.store_get(idx, &d) {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                self.mark_present(idx);
                out[k] = Some(v);
                continue;
            }
            match self.claim(idx, d) {
                Ok(Some(mut c)) => {
                    c.urgent = true;
                    claims.push((k, c))
                }
                Ok(None) => {
                    // Stored between our lookup and the claim.
                    self.mark_present(idx);
                    out[k] = Some(self.get_stored(idx, d)?);
                }
                Err(f) => waits.push((k, f)),
            }
        }
        let network = !claims.is_empty() || !waits.is_empty();
        if !claims.is_empty() {
            let mut all: Vec<Claim> = Vec::new();
            let mut mine: Vec<(usize, usize)> = Vec::new();
            for (k, c) in claims {
                mine.push((k, c.idx));
                all.push(c);
            }
            let mut extra = Vec::new();
            if readahead && self.config.readahead > 0 {
                let last = all.iter().map(|c| c.idx).max().expect("non-empty");
                extra.extend(self.claim_following(last, self.config.readahead));
            }
            let siblings = self.claim_range_siblings(all.iter().chain(&extra));
            extra.extend(siblings);
            for c in &mut extra {
                c.optional = self.chunks[c.idx].compressed_digest.is_some();
            }
            all.extend(extra);
            let fetched = self.fetch_claims(all, self.demand_shape(), Some(self));
            for (k, idx) in mine {
                match fetched.get(&idx) {
                    Some(Ok(v)) => out[k] = Some(v.clone()),
                    Some(Err(e)) => return Err(e.clone()),
                    None => unreachable!("every claim is completed"),
                }
            }
        }
        for (k, f) in waits {
            match f.wait(self.config.wait_timeout) {
                Some(Ok(v)) => out[k] = Some(v),
                Some(Err(e)) => return Err(e),
                None => {
                    let c = &self.chunks[idxs[k]];
                    return Err(Error::Timeout {
                        blob: self.blob.clone(),
                        offset: c.offset,
                        end: c.next_offset,
                        secs: self.config.wait_timeout.as_secs_f64(),
                    });
                }
            }
        }
        self.stats.demand_wait_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if network {
            self.note_network_demand();
        }
        Ok(out.into_iter().map(|v| v.expect("every chunk resolved")).collect())
    }

    /// Records that a reader needed the network just now (here and on the shared link).
    fn note_network_demand(&self) {
        self.last_network_demand_us.store(self.epoch.elapsed().as_micros() as u64, Ordering::SeqCst);
        if let Some(link) = &self.config.link {
            link.note_demand();
        }
    }

    fn digest_of(&self, idx: usize) -> Result<Digest> {
        let c = &self.chunks[idx];
        c.digest.ok_or_else(|| Error::Unverifiable {
            blob: self.blob.clone(),
            offset: c.offset,
        })
    }

    fn get_stored(self: &Arc<Self>, idx: usize, d: Digest) -> Result<Arc<Vec<u8>>> {
        match self.store_get(idx, &d) {
            Some(v) => Ok(v),
            // Evicted in between: fetch it ourselves, without readahead.
            None => self.get_many(&[idx], false).map(|mut v| v.pop().expect("one")),
        }
    }

    /// Claims chunk `idx` for fetching: `Ok(Some)` if this thread must fetch it, `Ok(None)` if it
    /// is already stored, `Err(flight)` if another thread is fetching it.
    fn claim(&self, idx: usize, d: Digest) -> std::result::Result<Option<Claim>, Arc<Flight>> {
        let mut inflight = self.inflight.lock().unwrap();
        if let Some(f) = inflight.get(&d) {
            f.waiters.fetch_add(1, Ordering::Relaxed);
            return Err(f.clone());
        }
        // Checked under the lock: completions store before they leave the map.
        if self.store_contains(idx, &d) {
            return Ok(None);
        }
        let flight = Flight::new();
        inflight.insert(d, flight.clone());
        Ok(Some(Claim {
            idx,
            digest: d,
            flight,
            urgent: false,
            optional: false,
        }))
    }

    /// Claims those of `idxs` that are neither stored nor in flight (a chunk without a digest is
    /// left to its reader, who gets the error).
    fn claim_missing(&self, idxs: &[usize]) -> Vec<Claim> {
        let mut claims = Vec::new();
        for &i in idxs {
            if self.present[i].load(Ordering::Relaxed) {
                continue;
            }
            let Some(d) = self.chunks[i].digest else { continue };
            match self.claim(i, d) {
                Ok(Some(c)) => claims.push(c),
                Ok(None) => self.mark_present(i),
                Err(_) => {}
            }
        }
        claims
    }

    /// Claims the uncached, unclaimed chunks after `last`, stopping at the first one that is
    /// stored or in flight, or when `budget` compressed bytes are covered.
    /// The other chunks decoded from the same resumed range (a SOCI span) as one of `claimed`:
    /// the whole span is fetched and verified for any piece of it, so its other files' pieces
    /// come along (decoded and stored after the urgent ones) instead of costing the span again
    /// when they are read. Measured before: reading all of test/big:1 through SOCI fetched
    /// 613 MB of its 576 MB (a span shared by two files was fetched for each).
    fn claim_range_siblings<'a>(&self, claimed: impl Iterator<Item = &'a Claim> + Clone) -> Vec<Claim> {
        let mut out = Vec::new();
        let mut ranges = std::collections::HashSet::new();
        let taken: std::collections::HashSet<usize> = claimed.clone().map(|c| c.idx).collect();
        let same = |a: usize, b: usize| self.chunks[a].offset == self.chunks[b].offset && self.chunks[a].next_offset == self.chunks[b].next_offset;
        for cl in claimed {
            let c = &self.chunks[cl.idx];
            if c.compressed_digest.is_none() || !ranges.insert((c.offset, c.next_offset)) {
                continue;
            }
            let (mut lo, mut hi) = (cl.idx, cl.idx);
            while lo > 0 && same(lo - 1, cl.idx) {
                lo -= 1;
            }
            while hi + 1 < self.chunks.len() && same(hi + 1, cl.idx) {
                hi += 1;
            }
            for j in lo..=hi {
                if taken.contains(&j) || self.present[j].load(Ordering::Relaxed) {
                    continue;
                }
                let Some(d) = self.chunks[j].digest else { continue };
                match self.claim(j, d) {
                    Ok(Some(c)) => out.push(c),
                    Ok(None) => self.mark_present(j),
                    Err(_) => {}
                }
            }
        }
        out
    }

    fn claim_following(&self, last: usize, budget: u64) -> Vec<Claim> {
        let mut out = Vec::new();
        let start = self.chunks[last].next_offset;
        for idx in last + 1..self.chunks.len() {
            let c = &self.chunks[idx];
            if c.next_offset.saturating_sub(start) > budget || self.present[idx].load(Ordering::Relaxed) {
                break;
            }
            let Some(d) = c.digest else { break };
            match self.claim(idx, d) {
                Ok(Some(cl)) => out.push(cl),
                Ok(None) => {
                    self.mark_present(idx);
                    break;
                }
                Err(_) => break,
            }
        }
        out
    }

    /// Fetches claimed chunks: groups them into coalesced ranges, splits the ranges among up to
    /// `parallel` workers, verifies, stores, and completes every claim.
    ///
    /// With `defer_to`, only the urgent claims are settled before this returns (and only they
    /// are in the result); the rest of the work continues on a helper thread.
    fn fetch_claims(&self, claims: Vec<Claim>, shape: Shape, defer_to: Option<&Arc<LayerFetcher>>) -> HashMap<usize, Result<Arc<Vec<u8>>>> {
        let all = claims.clone();
        match catch_unwind(AssertUnwindSafe(|| self.fetch_claims_inner(claims, shape, defer_to))) {
            Ok(done) => done,
            Err(panic) => self.abandon(&all, "fetch", panic.as_ref()).into_iter().collect(),
        }
    }

    fn fetch_claims_inner(&self, mut claims: Vec<Claim>, shape: Shape, defer_to: Option<&Arc<LayerFetcher>>) -> HashMap<usize, Result<Arc<Vec<u8>>>> {
        // Pieces of a span already here (inflated in memory, or stored whole) need no request.
        let mut local = HashMap::new();
        claims.retain(|cl| {
            if cl.optional && self.span_is_local(cl) && self.drop_unwanted(cl) {
                return false;
            }
            match self.decode_local(cl) {
                Some(res) => {
                    local.insert(cl.idx, self.complete(cl, res));
                    false
                }
                None => true,
            }
        });
        if claims.is_empty() {
            return local;
        }
        claims.sort_by_key(|c| c.idx);
        let ranges = self.coalesce(&claims, shape.max_range);
        let workers = shape.workers.max(1).min(ranges.len());
        // Contiguous runs of ranges per worker, balanced by bytes.
        let total: u64 = ranges.iter().map(|r| r.end.saturating_sub(r.start)).fold(0, u64::saturating_add);
        let per_worker = total.div_ceil(workers as u64).max(1);
        let mut batches: Vec<Vec<Span>> = vec![Vec::new()];
        let mut acc = 0;
        for r in ranges {
            if acc >= per_worker && batches.len() < workers {
                batches.push(Vec::new());
                acc = 0;
            }
            acc += r.end.saturating_sub(r.start);
            batches.last_mut().expect("non-empty").push(r);
        }
        let claims = &claims;
        let results: Vec<Vec<(usize, Result<Arc<Vec<u8>>>)>> = if batches.len() == 1 {
            vec![self.fetch_batch(&batches[0], claims, defer_to)]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = batches.iter().map(|b| s.spawn(move || self.fetch_batch(b, claims, defer_to))).collect();
                handles.into_iter().map(|h| h.join().expect("fetch worker panicked")).collect()
            })
        };
        local.extend(results.into_iter().flatten());
        local
    }

    /// Coalesces the members of the claimed chunks into ranges of at most `max_range` bytes.
    fn coalesce(&self, claims: &[Claim], max_range: u64) -> Vec<Span> {
        let mut spans: Vec<Span> = Vec::new();
        for (ci, cl) in claims.iter().enumerate() {
            let c = &self.chunks[cl.idx];
            if let Some(last) = spans.last_mut() {
                let same_member = last.start <= c.offset && c.next_offset <= last.end;
                let adjacent = last.end == c.offset && c.next_offset.saturating_sub(last.start) <= max_range.max(1);
                if same_member || adjacent {
                    last.end = last.end.max(c.next_offset);
                    last.claims.push(ci);
                    continue;
                }
            }
            spans.push(Span {
                start: c.offset,
                end: c.next_offset,
                claims: vec![ci],
            });
        }
        spans
    }

    fn fetch_batch(&self, batch: &[Span], claims: &[Claim], defer_to: Option<&Arc<LayerFetcher>>) -> Vec<(usize, Result<Arc<Vec<u8>>>)> {
        let ranges: Vec<(u64, u64)> = batch.iter().map(|s| (s.start, s.end.saturating_sub(s.start))).collect();
        let fetched = if self.closed.load(Ordering::SeqCst) {
            Err(Error::Closed { blob: self.blob.clone() })
        } else {
            let _permit = self.permits.acquire();
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            debug!(blob = %self.blob, ranges = ranges.len(), bytes = ranges.iter().map(|r| r.1).sum::<u64>(), "fetching");
            let t = Instant::now();
            let res = self.source.read_ranges(&ranges);
            self.stats.observe_latency(t.elapsed());
            debug!(blob = %self.blob, ms = t.elapsed().as_millis() as u64, ok = res.is_ok(), "fetched");
            res
        };
        let parts = match fetched {
            Ok(parts) => parts,
            Err(e) => {
                let all = batch.iter().flat_map(|s| &s.claims).map(|&ci| &claims[ci]);
                return all.map(|cl| (cl.idx, self.complete(cl, Err(e.clone())))).collect();
            }
        };
        let mut out = Vec::new();
        // Work left for after the hand-out: urgent chunks to store, other claims to decode.
        let mut later = Later::default();
        for (span, bytes) in batch.iter().zip(parts) {
            self.stats.fetched_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            if bytes.len() as u64 != span.end.saturating_sub(span.start) {
                let e = Error::Fetch {
                    blob: self.blob.clone(),
                    offset: span.start,
                    end: span.end,
                    reason: format!("got {} bytes, asked for {}", bytes.len(), span.end.saturating_sub(span.start)),
                };
                out.extend(span.claims.iter().map(|&ci| (claims[ci].idx, self.complete(&claims[ci], Err(e.clone())))));
                continue;
            }
            let mut rest = Vec::new();
            for &ci in &span.claims {
                let cl = &claims[ci];
                if !(cl.urgent && defer_to.is_some()) {
                    rest.push(cl.clone());
                    continue;
                }
                match self.decode(cl, &bytes, span.start) {
                    Ok(v) => {
                        cl.flight.publish(Ok(v.clone()));
                        later.store.push((cl.clone(), v.clone()));
                        out.push((cl.idx, Ok(v)));
                    }
                    Err(e) => out.push((cl.idx, self.complete(cl, Err(e)))),
                }
            }
            if !rest.is_empty() {
                later.decode.push((bytes, span.start, rest));
            }
        }
        match defer_to {
            Some(me) if !later.is_empty() => {
                let me = me.clone();
                run_detached("settle", move || {
                    let claims: Vec<Claim> = later.claims().cloned().collect();
                    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| me.settle(later))) {
                        me.abandon(&claims, "settle", panic.as_ref());
                    }
                });
            }
            _ => out.extend(self.settle(later)),
        }
        out
    }

    /// Finishes what [`Self::fetch_batch`] left for later: stores the urgent chunks already
    /// handed out, and decodes, stores and completes the others.
    fn settle(&self, later: Later) -> Vec<(usize, Result<Arc<Vec<u8>>>)> {
        let mut out = Vec::new();
        for (cl, v) in later.store {
            let _ = self.complete(&cl, Ok(v));
        }
        for (bytes, start, claims) in later.decode {
            // Stored before the optional claims are released: once nothing is in flight, what
            // was fetched is in the store (`wait_settled`).
            let optional: Vec<usize> = claims.iter().filter(|c| c.optional).map(|c| c.idx).collect();
            self.keep_spans(&optional, &bytes, start);
            for cl in claims {
                if cl.optional && self.drop_unwanted(&cl) {
                    continue;
                }
                let res = self.decode(&cl, &bytes, start);
                out.push((cl.idx, self.complete(&cl, res)));
            }
        }
        out
    }

    /// Stores a result, wakes waiters and releases the claim.
    fn complete(&self, cl: &Claim, res: Result<Arc<Vec<u8>>>) -> Result<Arc<Vec<u8>>> {
        match &res {
            Ok(v) => {
                self.stats.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = self.store_put(cl.idx, &cl.digest, v) {
                    warn!(error = %e, "chunk not written to the disk cache; serving it from memory");
                }
                self.mark_present(cl.idx);
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                warn!(blob = %self.blob, chunk = %cl.digest, error = %e, "chunk fetch failed");
                *self.stats.last_error.lock().unwrap() = Some(e.to_string());
            }
        }
        self.release(cl);
        cl.flight.publish(res.clone());
        res
    }

    /// Percent of the layer's compressed bytes present in the store.
    pub fn percent_present(&self) -> f64 {
        if self.total_bytes == 0 {
            return 100.0;
        }
        self.stats.present_bytes.load(Ordering::Relaxed) as f64 * 100.0 / self.total_bytes as f64
    }
}

/// Runs `job` on a new helper thread, or on this one if no thread can be had: the jobs complete
/// claims that readers wait on, so they must run somewhere.
fn run_detached<F: FnOnce() + Send + 'static>(name: &str, job: F) {
    let slot = Arc::new(Mutex::new(Some(job)));
    let handed = slot.clone();
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        if let Some(job) = handed.lock().unwrap().take() {
            job();
        }
    });
    if let Err(e) = spawned {
        warn!(error = %e, thread = name, "no helper thread; doing its work here");
        if let Some(job) = slot.lock().unwrap().take() {
            job();
        }
    }
}

/// Work [`LayerFetcher::fetch_batch`] leaves for after the urgent chunks are handed out.
#[derive(Default)]
struct Later {
    /// Urgent chunks, verified and published, still to be stored.
    store: Vec<(Claim, Arc<Vec<u8>>)>,
    /// Range bytes (and where they start) with the claims still to decode from them.
    decode: Vec<(Vec<u8>, u64, Vec<Claim>)>,
}

impl Later {
    fn is_empty(&self) -> bool {
        self.store.is_empty() && self.decode.is_empty()
    }

    /// Every claim this work still has to complete.
    fn claims(&self) -> impl Iterator<Item = &Claim> {
        self.store.iter().map(|(c, _)| c).chain(self.decode.iter().flat_map(|(_, _, cs)| cs))
    }
}

/// A coalesced blob range and the claims (indices into the claim list) it serves.
struct Span {
    start: u64,
    end: u64,
    claims: Vec<usize>,
}

/// Compressed bytes of the distinct members among `chunks[range]`.
fn member_bytes(chunks: &[ChunkRef], range: std::ops::Range<usize>) -> u64 {
    let mut total = 0;
    let mut last = None;
    for c in &chunks[range] {
        if last != Some(c.offset) {
            total += c.next_offset.saturating_sub(c.offset);
            last = Some(c.offset);
        }
    }
    total
}
