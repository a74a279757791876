//! `lazypull snapshotter`: the containerd proxy plugin daemon.
//!
//! Wiring only: chunk store, registry client and lazy-mount settings go into a
//! `RegistryRemote`, that into the `Snapshotter`, and that behind the gRPC service on a unix
//! socket. On start, remote snapshots recorded before a restart are mounted again before the
//! socket is served (containerd's first call after a restart must succeed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde::Deserialize;
use snapshotter::remote::{RegistryRemote, RemoteConfig};
use snapshotter::{Remote, Snapshotter};
use store::{ChunkStore, StoreConfig};
use tracing::{info, warn};

use crate::image::RegistryArgs;

#[derive(Args)]
pub struct SnapshotterArgs {
    /// TOML configuration file (keys as the long options, with underscores).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (snapshots, metadata, chunk cache).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Unix socket containerd connects to.
    #[arg(long, value_name = "SOCKET")]
    address: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// The configuration file; every key is optional and defaults as documented in the README.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    root: Option<PathBuf>,
    address: Option<PathBuf>,
    /// Disk cache limit in bytes (0 = unlimited).
    cache_size: Option<u64>,
    memory_cache_mib: Option<u64>,
    fetch_timeout_secs: Option<u64>,
    background_fetch: Option<bool>,
    background_delay_secs: Option<f64>,
    prefetch: Option<bool>,
    passthrough: Option<bool>,
    fuse_threads: Option<usize>,
    parallel_fetches: Option<usize>,
}

pub fn run(args: SnapshotterArgs) -> Result<()> {
    let file: FileConfig = match &args.config {
        Some(p) => toml::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?).with_context(|| format!("parsing {}", p.display()))?,
        None => FileConfig::default(),
    };
    let root = args.root.or(file.root).unwrap_or_else(|| PathBuf::from("/var/lib/lazypull/snapshotter"));
    let address = args.address.or(file.address).unwrap_or_else(|| PathBuf::from("/run/lazypull/lazypull.sock"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut store_cfg = StoreConfig::new(root.join("cache"));
    store_cfg.disk_limit = file.cache_size.unwrap_or(0);
    store_cfg.memory_limit = file.memory_cache_mib.unwrap_or(256) << 20;
    let store = ChunkStore::open(store_cfg)?;
    let mut cfg = RemoteConfig {
        fetch_timeout: Duration::from_secs(file.fetch_timeout_secs.unwrap_or(30)),
        background: file.background_fetch.unwrap_or(true),
        background_delay: Duration::from_secs_f64(file.background_delay_secs.unwrap_or(5.0).max(0.0)),
        prefetch: file.prefetch.unwrap_or(true),
        threads: file.fuse_threads.unwrap_or(8),
        ..RemoteConfig::default()
    };
    cfg.fs.passthrough = file.passthrough.unwrap_or(true);
    cfg.fetch.parallel = file.parallel_fetches.unwrap_or(4);
    cfg.fetch.wait_timeout = cfg.fetch_timeout * 2;
    let remote = Arc::new(RegistryRemote::new(args.registry.client()?, rt.handle().clone(), store, cfg));
    let snap = Arc::new(Snapshotter::open(&root, Some(remote.clone() as Arc<dyn Remote>))?);

    // Remount remote snapshots from before a restart, before serving.
    for (name, dir, layer) in snap.remote_snapshots()? {
        if snapshotter::snapshots::is_mountpoint(&dir) {
            let _ = lazyfs::detach(&dir);
        }
        match remote.mount(&layer, &dir) {
            Ok(()) => info!(%name, "remote snapshot mounted again"),
            Err(e) => warn!(%name, error = %e, "cannot mount remote snapshot again; its containers will fail to read"),
        }
    }
    info!(socket = %address.display(), root = %root.display(), "serving containerd snapshots API");
    rt.block_on(async {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            info!("shutting down");
        };
        snapshotter::service::serve(snap.clone(), &address, shutdown).await
    })?;
    Ok(())
}
