//! `lazypull snapshotter`: the containerd proxy plugin daemon.
//!
//! Wiring: chunk store, registry client and lazy-mount settings go into a `RegistryRemote`
//! (which resolves labels to layers), that into the `Snapshotter`, and that behind the gRPC
//! service on a unix socket.
//!
//! Restart without breakage: by default every remote layer is served by its own `lazypull
//! mount --layer-digest` daemon in its own session (see docs/design.md), so killing the
//! snapshotter, even with SIGKILL, leaves running containers' layers served. On start, each
//! recorded remote snapshot whose mount still answers is left alone; a dead one is detached and
//! mounted again — all before the socket is served, but after it exists (bound at once, or
//! handed over by systemd socket activation), so containerd's calls wait in the backlog and
//! its first call after a restart succeeds. `Mounts`/`View`/`Prepare` check the remote
//! parents again later (a daemon may die at any time). `layer_daemons = false` serves layers
//! in-process instead.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde::Deserialize;
use snapshotter::remote::{RegistryRemote, RemoteConfig};
use snapshotter::{listener, Remote, Snapshotter};
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
    /// Compressed bytes fetched beyond a missed chunk, in the same request.
    readahead_bytes: Option<u64>,
    /// Layers without prioritized files and at most this big are fetched whole at mount.
    small_layer_prefetch_bytes: Option<u64>,
    /// Serve each remote layer from its own daemon (survives snapshotter restarts).
    layer_daemons: Option<bool>,
    /// `HOST:PORT` of the Prometheus endpoint (`/metrics`); unset: no endpoint.
    metrics_address: Option<String>,
}

pub fn run(args: SnapshotterArgs) -> Result<()> {
    let file: FileConfig = match &args.config {
        Some(p) => toml::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?).with_context(|| format!("parsing {}", p.display()))?,
        None => FileConfig::default(),
    };
    let root = args.root.or(file.root).unwrap_or_else(|| PathBuf::from("/var/lib/lazypull/snapshotter"));
    let address = args.address.or(file.address).unwrap_or_else(|| PathBuf::from("/run/lazypull/lazypull.sock"));
    // The socket first, before any thread exists (activation edits the environment) and before
    // the slow recovery below.
    let (sock, origin) = listener::listen(&address).with_context(|| format!("listening on {}", address.display()))?;
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
        small_layer_prefetch: file.small_layer_prefetch_bytes.unwrap_or(lazyfs::SMALL_LAYER_BYTES),
        ..RemoteConfig::default()
    };
    cfg.fs.passthrough = file.passthrough.unwrap_or(true);
    cfg.fetch.parallel = file.parallel_fetches.unwrap_or(4);
    if let Some(r) = file.readahead_bytes {
        cfg.fetch.readahead = r;
    }
    cfg.fetch.wait_timeout = cfg.fetch_timeout * 2;
    let daemons = file.layer_daemons.unwrap_or(true);
    let daemon_args = DaemonArgs {
        state: root.join("layers"),
        fetch_timeout: cfg.fetch_timeout.as_secs().max(1),
        background: cfg.background,
        background_delay: cfg.background_delay.as_secs_f64(),
        passthrough: cfg.fs.passthrough,
        parallel: cfg.fetch.parallel,
        readahead: cfg.fetch.readahead,
        small_layer_prefetch: cfg.small_layer_prefetch,
        registry: args.registry.to_args(),
    };
    let tails = store::TailCache::new(crate::mount::tails_dir(&daemon_args.state));
    let resolver = Arc::new(RegistryRemote::new(args.registry.client()?, rt.handle().clone(), store, cfg).with_tail_cache(tails));
    let remote: Arc<dyn Remote> = if daemons { Arc::new(DaemonRemote { resolver, args: daemon_args }) } else { resolver };
    let snap = Arc::new(Snapshotter::open(&root, Some(remote.clone()))?);

    // Remote snapshots from before a restart: keep the live ones, remount the dead ones. The
    // socket already exists (bound or handed over above), so containerd's calls queue in its
    // backlog meanwhile instead of being refused.
    for (name, dir, layer) in snap.remote_snapshots()? {
        if remote.is_live(&dir) {
            info!(%name, "remote snapshot still served");
            continue;
        }
        if let Err(e) = snap.ensure_served(&name, &layer, &dir) {
            warn!(%name, error = %e, "its containers will fail to read until it can be mounted");
        }
    }
    match &origin {
        listener::Origin::Activated(path) => {
            info!(socket = %path.as_deref().unwrap_or(&address).display(), root = %root.display(), "serving containerd snapshots API (socket activated)")
        }
        listener::Origin::Bound(path) => info!(socket = %path.display(), root = %root.display(), "serving containerd snapshots API"),
    }
    if let Some(addr) = file.metrics_address.clone() {
        rt.spawn(crate::metrics::serve(addr, snap.clone(), root.join("layers")));
    }
    rt.block_on(async {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            info!("shutting down");
        };
        snapshotter::service::serve(snap.clone(), sock, shutdown).await
    })?;
    Ok(())
}

/// How layer daemons are started.
struct DaemonArgs {
    state: PathBuf,
    fetch_timeout: u64,
    background: bool,
    background_delay: f64,
    passthrough: bool,
    parallel: usize,
    readahead: u64,
    small_layer_prefetch: u64,
    registry: Vec<std::ffi::OsString>,
}

/// Serves each remote layer with a `lazypull mount --layer-digest` daemon.
struct DaemonRemote {
    resolver: Arc<RegistryRemote>,
    args: DaemonArgs,
}

impl Remote for DaemonRemote {
    fn resolve(&self, labels: &std::collections::BTreeMap<String, String>) -> std::result::Result<Option<snapshotter::meta::RemoteLayer>, String> {
        self.resolver.resolve(labels)
    }

    fn mount(&self, layer: &snapshotter::meta::RemoteLayer, dir: &std::path::Path) -> std::result::Result<(), String> {
        let exe = std::env::current_exe().map_err(|e| format!("finding our executable: {e}"))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("mount")
            .arg(&layer.image_ref)
            .arg(dir)
            .args(["--layer-digest", &layer.digest])
            .args(["--layer-size", &layer.size.to_string()])
            .args(["--toc-digest", &layer.toc_digest])
            // Container rootfs layers: setuid binaries must work; the snapshotter's root is
            // root-only (0700), so no other user reaches these mounts.
            .arg("--allow-setuid")
            .arg("--state-dir")
            .arg(&self.args.state)
            .args(["--fetch-timeout", &self.args.fetch_timeout.to_string()])
            .args(["--background-delay", &self.args.background_delay.to_string()])
            .args(["--parallel", &self.args.parallel.to_string()])
            .args(["--readahead", &self.args.readahead.to_string()])
            .args(["--prefetch-small-layers", &self.args.small_layer_prefetch.to_string()])
            .args(&self.args.registry);
        if !self.args.background {
            cmd.arg("--no-background");
        }
        if !self.args.passthrough {
            cmd.arg("--no-passthrough");
        }
        let out = cmd.stdin(std::process::Stdio::null()).output().map_err(|e| format!("starting the layer daemon: {e}"))?;
        if !out.status.success() {
            return Err(format!("layer daemon: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(())
    }

    fn collect_garbage(&self, live: &[snapshotter::meta::RemoteLayer]) {
        let mut keep_chunks = std::collections::HashSet::new();
        let mut keep_objects = std::collections::HashSet::new();
        for l in live {
            match crate::mount::read_refs(&self.args.state, &l.digest) {
                Some(refs) => {
                    for (object, d) in refs {
                        if object {
                            keep_objects.insert(d);
                        } else {
                            keep_chunks.insert(d);
                        }
                    }
                }
                // A live layer whose references are unknown: keep everything this time.
                None => return,
            }
        }
        let mut cfg = StoreConfig::new(self.args.state.join("cache"));
        cfg.memory_limit = 0;
        match ChunkStore::open(cfg) {
            Ok(store) => {
                let (n, bytes) = store.retain(|d, object| if object { keep_objects.contains(d) } else { keep_chunks.contains(d) });
                info!(entries = n, bytes, "cache GC: freed the chunks of removed layers");
            }
            Err(e) => warn!(error = %e, "cache GC skipped"),
        }
        let live_digests: std::collections::HashSet<&str> = live.iter().map(|l| l.digest.as_str()).collect();
        store::TailCache::new(crate::mount::tails_dir(&self.args.state)).retain(|d| live_digests.contains(d));
        // References of layers no longer in use.
        let live_hex: std::collections::HashSet<String> = live.iter().map(|l| l.digest.trim_start_matches("sha256:").to_string()).collect();
        if let Ok(rd) = std::fs::read_dir(self.args.state.join("refs")) {
            for e in rd.flatten() {
                if !live_hex.contains(e.file_name().to_string_lossy().as_ref()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    fn unmount(&self, dir: &std::path::Path) {
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(_) => return,
        };
        let res = std::process::Command::new(exe).arg("umount").arg(dir).arg("--state-dir").arg(&self.args.state).output();
        if !res.as_ref().is_ok_and(|o| o.status.success()) && lazyfs::is_mountpoint(dir) {
            let _ = lazyfs::detach(dir);
        }
    }
}
