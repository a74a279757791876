//! Serving one opened layer: the single recipe every caller uses (the snapshotter's in-process
//! mode, `lazypull mount` and the layer daemons, tests).
//!
//! Why one type: the recipe has an order that matters — decide the mount-time prefetch from
//! the layer's own hint, build the handlers, mount, and only then start prefetch and background
//! fill (so a multi-layer mount gets every layer mounted before any fill competes for the link)
//! — and a shutdown order that matters too (stop the fill, fail waiting readers fast, then
//! detach). Two hand-written copies of it had drifted apart.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use store::LayerFetcher;

use crate::{mount_layer, prefetch_ranges, FsOptions, FsStats, LayerFs, MountedLayer, OpenedLayer, Privileges, Result};

/// How an opened layer is served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub fs: FsOptions,
    /// FUSE worker threads.
    pub threads: usize,
    pub privileges: Privileges,
    /// Prefetch at mount: the prioritized files, or all of a layer of at most `small_layer`
    /// compressed bytes without them (see [`prefetch_ranges`]).
    pub prefetch: bool,
    pub small_layer: u64,
    /// Fetch the whole layer before mounting it.
    pub fetch_all: bool,
    /// Fill the rest of the layer in the background, starting `background_delay` after
    /// [`LayerServer::start_fill`].
    pub background: bool,
    pub background_delay: Duration,
}

/// A mounted layer with its fetcher and counters.
pub struct LayerServer {
    /// `None` once unmounted.
    mount: Option<MountedLayer>,
    fetcher: Arc<LayerFetcher>,
    view: Arc<crate::view::LayerView>,
    fs_stats: Arc<FsStats>,
    prefetch: Vec<std::ops::Range<u64>>,
    stop: Arc<AtomicBool>,
    options: ServeOptions,
}

impl LayerServer {
    /// Mounts `opened` at `at` (FUSE source `fsname`). Prefetch and fill start with
    /// [`LayerServer::start_fill`].
    pub fn mount(opened: OpenedLayer, at: &Path, fsname: &str, options: ServeOptions) -> Result<LayerServer> {
        let fetcher = opened.fetcher.clone();
        let mut prefetch = Vec::new();
        if options.fetch_all {
            fetcher.fetch_all()?;
        } else if options.prefetch {
            prefetch = prefetch_ranges(&opened.view, &fetcher, options.small_layer);
        }
        let fs = LayerFs::new(opened.view.clone(), fetcher.clone(), options.fs.clone());
        let fs_stats = fs.stats.clone();
        std::fs::create_dir_all(at).map_err(|e| crate::Error::Mount { path: at.to_path_buf(), reason: format!("creating the mountpoint: {e}") })?;
        let mount = mount_layer(fs, at, fsname, options.threads, options.privileges)?;
        Ok(LayerServer { mount: Some(mount), fetcher, view: opened.view, fs_stats, prefetch, stop: Arc::new(AtomicBool::new(false)), options })
    }

    /// Starts the mount-time prefetch and the background fill (one thread).
    pub fn start_fill(&self) -> std::io::Result<()> {
        if self.options.prefetch {
            crate::deps::prefetch_start_files(&self.view, &self.fetcher);
        }
        self.fetcher.spawn_fill(self.prefetch.clone(), self.options.background, self.options.background_delay, self.stop.clone()).map(drop)
    }

    pub fn fetcher(&self) -> &Arc<LayerFetcher> {
        &self.fetcher
    }

    pub fn fs_stats(&self) -> &Arc<FsStats> {
        &self.fs_stats
    }

    /// The mount, until [`LayerServer::unmount`].
    pub fn mounted(&self) -> Option<&MountedLayer> {
        self.mount.as_ref()
    }

    /// Stops background work and fails readers waiting for a fetch, without detaching (the
    /// kernel may still be using the mount; dropping or [`LayerServer::unmount`] detaches).
    pub fn close(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.fetcher.close();
    }

    /// [`LayerServer::close`], then detaches the mount and waits for its session to end. The
    /// counters stay readable afterwards.
    pub fn unmount(&mut self) -> Result<()> {
        self.close();
        match self.mount.take() {
            Some(m) => m.unmount(),
            None => Ok(()),
        }
    }
}
