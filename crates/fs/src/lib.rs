//! The lazy layer filesystem: one read-only FUSE mount per eStargz layer.
//!
//! Opening a layer reads only its footer and TOC (at most two range reads), verifies the TOC
//! digest, and builds the inode table ([`view`]); file contents are read chunk by chunk through
//! the store's [`store::LayerFetcher`] when an application touches them. This crate knows files
//! and inodes; chunk caching, fetching and verification belong to the `store` crate, and
//! whole-image assembly (overlayfs over several layers) to its callers.

pub mod error;
pub mod fs;
pub mod mount;
pub mod view;

use std::sync::Arc;

use estargz::{Digest, OpenOptions, Reader};
use store::{BlobSourceAdapter, ChunkStore, FetchConfig, LayerFetcher, RangeSource};

pub use error::{Error, Result};
pub use fs::{FsOptions, FsStats, LayerFs};
pub use mount::{detach, is_mountpoint, mount_layer, MountedLayer};
pub use view::LayerView;

/// A layer ready to mount: its inode table and its chunk fetcher.
pub struct OpenedLayer {
    pub view: Arc<LayerView>,
    pub fetcher: Arc<LayerFetcher>,
    pub toc_digest: Digest,
}

/// Opens a layer blob through `source`: footer and TOC (≤ 2 reads), TOC digest check against
/// `expected_toc` when given, inode table, fetcher over `store`.
pub fn open_layer(source: Arc<dyn RangeSource>, expected_toc: Option<&Digest>, store: Arc<ChunkStore>, config: FetchConfig) -> Result<OpenedLayer> {
    let blob = source.name().to_string();
    let format = |e: estargz::Error| Error::Format { blob: blob.clone(), source: e };
    // A 256 KiB tail holds the footer and the TOC of most layers (one request); larger TOCs
    // cost a second, exact read. The format's 1 MiB default would spend up to 1 MiB per layer
    // before a container starts.
    let opts = OpenOptions {
        tail_size: 256 << 10,
        ..OpenOptions::default()
    };
    let reader = Reader::open_with(BlobSourceAdapter(source.clone()), &opts).map_err(format)?;
    if let Some(want) = expected_toc {
        reader.verify_toc(want).map_err(format)?;
    }
    let view = Arc::new(LayerView::build(reader.tree()));
    let fetcher = LayerFetcher::new(blob.clone(), reader.compression(), view.chunk_refs.clone(), source, store, config);
    debug_assert_eq!(fetcher.chunks(), view.chunk_refs.as_slice());
    fetcher.scan_store();
    Ok(OpenedLayer {
        view,
        fetcher: Arc::new(fetcher),
        toc_digest: reader.toc_digest(),
    })
}
