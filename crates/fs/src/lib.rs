//! The lazy layer filesystem: one read-only FUSE mount per lazy layer, of any format.
//!
//! Opening a layer asks the format seam ([`layer::open`]) for its index — for eStargz and
//! zstd:chunked the footer and TOC, at most two range reads, authenticated by the layer's
//! [`IndexCheck`] — and gets the format-neutral [`index::LayerIndex`]; file contents are read
//! chunk by chunk through the store's [`store::LayerFetcher`] when an application touches them.
//! This crate knows files and inodes and names no format type; chunk caching, fetching and
//! verification belong to the `store` crate, and whole-image assembly (overlayfs over several
//! layers) to its callers.

pub mod deps;
pub mod error;
pub mod fs;
pub mod mount;
pub mod serve;
pub mod view;

use std::sync::Arc;

use index::Digest;
pub use layer::IndexCheck;
use store::{BlobSourceAdapter, ChunkStore, FetchConfig, LayerFetcher, RangeSource, TailCache, TailSource};

pub use error::{Error, Result};
pub use fs::{FsOptions, FsStats, LayerFs};
pub use mount::{carries, detach, detach_if, is_mountpoint, mount_layer, unescape_mountinfo, MountedLayer, Privileges};
pub use serve::{LayerServer, ServeOptions};
pub use view::LayerView;

/// Layers of at most this many compressed bytes are fetched whole right after mount (see
/// [`prefetch_ranges`]).
pub const SMALL_LAYER_BYTES: u64 = 2 << 20;

/// The blob ranges of a layer's mount-time prefetch (empty: none): its prioritized files (up
/// to the `.prefetch.landmark`), the spans its SOCI prefetch artifact names, or, for a layer of
/// at most `small_layer` compressed bytes that says nothing, all of it. Why the second: a small layer (a busybox, a config layer) is
/// usually read at container start anyway, and fetching it whole costs one request's worth of
/// link time, a few tens of milliseconds, while leaving it to on-demand reads costs a round trip
/// for each first read — the `echo` start on 1 Gbit/s + 2 ms spent two such round trips
/// (`/etc/passwd` for runc, then the binary) in its run phase. `.no.prefetch.landmark` (the
/// layer asks for no prefetch) wins over both.
pub fn prefetch_ranges(view: &LayerView, fetcher: &LayerFetcher, small_layer: u64) -> Vec<std::ops::Range<u64>> {
    match view.prefetch() {
        view::Prefetch::Unspecified if fetcher.total_bytes() <= small_layer => vec![0..u64::MAX],
        p => p.blob_ranges(),
    }
}

/// A layer ready to mount: its inode table and its chunk fetcher.
pub struct OpenedLayer {
    pub view: Arc<LayerView>,
    pub fetcher: Arc<LayerFetcher>,
    pub toc_digest: Digest,
}

/// How much of a blob's end to read first: the footer and, in the same request, the TOC of
/// layers with few files. A larger TOC costs a second, exact read. Measured on a 100 Mbit/s +
/// 20 ms link: a 512 KiB tail costs 42 ms per layer in transfer alone, while layers of big files
/// (the usual bulk of large images) have TOCs of a few KiB; a Debian rootfs TOC (300 KB) pays
/// one extra round trip instead. The format's 1 MiB default would spend up to 1 MiB per layer
/// before a container starts.
const TAIL_SIZE: u64 = 64 << 10;

/// Opens a layer blob through `source`: footer and TOC (≤ 2 reads), TOC digest check against
/// `expected` when given (the layer descriptor's [`IndexCheck`]), inode table, fetcher over `store`.
pub fn open_layer(source: Arc<dyn RangeSource>, expected: Option<&IndexCheck>, store: Arc<ChunkStore>, config: FetchConfig) -> Result<OpenedLayer> {
    let opened = read_toc(source.clone(), expected)?;
    Ok(finish_open(opened, source, store, config))
}

/// [`open_layer`] with the footer and TOC taken from `tails` when it holds them for this blob
/// (no network round trip), and saved there when they had to be read from `source`. A cached
/// tail that fails the TOC digest check is dropped and read again from `source`.
pub fn open_layer_cached(source: Arc<dyn RangeSource>, expected: Option<&IndexCheck>, store: Arc<ChunkStore>, config: FetchConfig, tails: &TailCache) -> Result<OpenedLayer> {
    let blob = source.name().to_string();
    if let Some(cached) = tails.load(&blob) {
        let via = Arc::new(TailSource::new(source.clone(), Some(cached)));
        match read_toc(via, expected) {
            Ok(opened) => return Ok(finish_open(opened, source, store, config)),
            Err(e) => {
                tracing::warn!(%blob, error = %e, "cached TOC unusable; reading it from the registry");
                tails.remove(&blob);
            }
        }
    }
    let opened = read_toc_into(source.clone(), expected, tails)?;
    Ok(finish_open(opened, source, store, config))
}

/// Opens a SOCI layer: its zTOC (fetched by the caller by the digest its SOCI index names) is
/// checked against `check` and parsed; the blob behind `source` is read span by span. The
/// layer's prefetch artifact, when `check` names one and the caller has it, sets what the mount
/// prefetches; a bad one is logged and left out ([`layer::open_ztoc`]).
pub fn open_ztoc_layer(source: Arc<dyn RangeSource>, ztoc: &[u8], prefetch: Option<&[u8]>, check: &IndexCheck, store: Arc<ChunkStore>, config: FetchConfig) -> Result<OpenedLayer> {
    let blob = source.name().to_string();
    let opened = layer::open_ztoc(ztoc, check, prefetch).map_err(|source| Error::Open { blob: blob.clone(), source })?;
    if let Some(why) = &opened.prefetch_ignored {
        tracing::warn!(%blob, reason = %why, "SOCI prefetch artifact not used; the layer is served without it");
    }
    Ok(finish_open(opened, source, store, config))
}

/// Reads the footer and TOC of a layer from `source`, checks them, and keeps them in `tails`,
/// so that a later [`open_layer_cached`] of the same blob needs no network.
pub fn cache_toc(source: Arc<dyn RangeSource>, expected: Option<&IndexCheck>, tails: &TailCache) -> Result<()> {
    let blob = source.name().to_string();
    let via = Arc::new(TailSource::new(source, None));
    let opts = layer::OpenOptions { tail_size: TAIL_SIZE };
    // Authenticated but not parsed: the mount parses it (once), from the cache.
    let index_offset = layer::fetch_index(&BlobSourceAdapter(via.clone()), expected, &opts).map_err(|source| Error::Open { blob: blob.clone(), source })?;
    save_tail(&via, index_offset, &blob, tails);
    Ok(())
}

/// Keeps what opening read of `via` (the index and the fixed-size tail read first) in `tails`.
fn save_tail(via: &TailSource, index_offset: u64, blob: &str, tails: &TailCache) {
    let start = index_offset.min(via.size().saturating_sub(TAIL_SIZE));
    if let Some(bytes) = via.passed_tail(start) {
        if let Err(e) = tails.save(blob, start, &bytes) {
            tracing::warn!(%blob, error = %e, "cannot cache the layer's TOC");
        }
    }
}

fn read_toc_into(source: Arc<dyn RangeSource>, expected: Option<&IndexCheck>, tails: &TailCache) -> Result<layer::OpenedIndex> {
    let blob = source.name().to_string();
    let via = Arc::new(TailSource::new(source, None));
    let opened = read_toc(via.clone(), expected)?;
    save_tail(&via, opened.index_offset, &blob, tails);
    Ok(opened)
}

/// Opens and checks the layer's index through `source`.
fn read_toc(source: Arc<dyn RangeSource>, expected: Option<&IndexCheck>) -> Result<layer::OpenedIndex> {
    let blob = source.name().to_string();
    let opts = layer::OpenOptions { tail_size: TAIL_SIZE };
    layer::open(&BlobSourceAdapter(source), expected, &opts).map_err(|source| Error::Open { blob, source })
}

fn finish_open(opened: layer::OpenedIndex, source: Arc<dyn RangeSource>, store: Arc<ChunkStore>, config: FetchConfig) -> OpenedLayer {
    let blob = source.name().to_string();
    let view = Arc::new(LayerView::new(opened.index));
    let fetcher = LayerFetcher::new(blob, view.chunk_refs.clone(), source, store, config);
    debug_assert_eq!(fetcher.chunks(), view.chunk_refs.as_slice());
    // Which chunks the node's store already holds, off the mount's path: a lookup per chunk
    // (13-17 ms for 5216 chunks on an empty store) would delay every cold Prepare, and the
    // bitmap it fills is a shortcut only — every claim asks the store again before fetching.
    let fetcher = Arc::new(fetcher);
    let scanning = fetcher.clone();
    if std::thread::Builder::new().name("scan-store".into()).spawn(move || scanning.scan_store()).is_err() {
        fetcher.scan_store();
    }
    OpenedLayer {
        view,
        fetcher,
        toc_digest: opened.index_digest,
    }
}
