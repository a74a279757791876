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
    /// Also serve a CRI image service here (kubelet's `--image-service-endpoint`): every call
    /// goes on to `--cri-backend` unchanged, and each pull's credentials serve its lazy mounts.
    #[arg(long, value_name = "SOCKET")]
    cri_listen: Option<PathBuf>,
    /// containerd's CRI socket (default /run/containerd/containerd.sock).
    #[arg(long, value_name = "SOCKET")]
    cri_backend: Option<PathBuf>,
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
    /// CRI image service proxy socket (see `--cri-listen`); unset: no proxy.
    cri_listen: Option<PathBuf>,
    /// containerd's CRI socket the proxy forwards to.
    cri_backend: Option<PathBuf>,
    /// How long kept pull credentials stay usable without a new pull, in seconds.
    cri_credential_ttl_secs: Option<u64>,
    /// kubelet's credential provider config (JSON `CredentialProviderConfig`): its plugins give
    /// the lazy mounts credentials for the images they match.
    credential_provider_config: Option<PathBuf>,
    /// Where the plugins are (kubelet's `--image-credential-provider-bin-dir`).
    credential_provider_bin_dir: Option<PathBuf>,
}

pub fn run(args: SnapshotterArgs) -> Result<()> {
    let file: FileConfig = match &args.config {
        Some(p) => toml::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?).with_context(|| format!("parsing {}", p.display()))?,
        None => FileConfig::default(),
    };
    let root = args.root.or(file.root.clone()).unwrap_or_else(|| PathBuf::from("/var/lib/lazypull/snapshotter"));
    let address = args.address.or(file.address.clone()).unwrap_or_else(|| PathBuf::from("/run/lazypull/lazypull.sock"));
    // The socket first, before any thread exists (activation edits the environment) and before
    // the slow recovery below.
    let (sock, origin) = listener::listen(&address).with_context(|| format!("listening on {}", address.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (store_cfg, cfg, mut daemon_args) = settings(&file, &root, args.registry.to_args());
    let store = ChunkStore::open(store_cfg)?;
    let daemons = file.layer_daemons.unwrap_or(true);
    let tails = store::TailCache::new(crate::mount::tails_dir(&daemon_args.state));
    // CRI pull credentials: kept by the proxy, read by our own registry client directly and by
    // the layer daemons through the broker socket. Both sockets are up before any daemon starts.
    let mut sources: Vec<Arc<dyn registry::CredentialSource>> = Vec::new();
    if let Some(listen) = args.cri_listen.clone().or(file.cri_listen.clone()) {
        let backend = args.cri_backend.clone().or(file.cri_backend.clone()).unwrap_or_else(|| PathBuf::from("/run/containerd/containerd.sock"));
        let ttl = Duration::from_secs(file.cri_credential_ttl_secs.unwrap_or(cri_proxy::store::DEFAULT_TTL.as_secs()));
        let creds = cri_proxy::CredentialStore::new(cri_proxy::StoreConfig { ttl, ..Default::default() });
        start_cri_proxy(&rt, &listen, &backend, &creds)?;
        sources.push(cri_proxy::broker::source(&creds));
    }
    if let Some(path) = &file.credential_provider_config {
        let bin_dir = file.credential_provider_bin_dir.clone().with_context(|| "credential_provider_config needs credential_provider_bin_dir")?;
        let providers = cri_proxy::Providers::load(path, cri_proxy::ProviderOptions::new(&bin_dir)).with_context(|| format!("loading {}", path.display()))?;
        info!(config = %path.display(), bin_dir = %bin_dir.display(), "credential provider plugins configured");
        sources.push(Arc::new(providers));
    }
    let source: Option<Arc<dyn registry::CredentialSource>> = match sources.len() {
        0 => None,
        1 => sources.pop(),
        _ => Some(Arc::new(cri_proxy::Chain(sources))),
    };
    if let Some(source) = &source {
        let broker = daemon_args.state.join("credentials.sock");
        start_broker(&rt, &broker, source.clone())?;
        daemon_args.serve.credentials_socket = Some(broker);
    }
    let client = args.registry.client_with(source)?;
    let resolver = Arc::new(RegistryRemote::new(client, rt.handle().clone(), store, cfg).with_tail_cache(tails));
    if daemons {
        daemon_args.write_serve_config()?;
    }
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

/// Binds a unix socket only root can connect to (it carries pull secrets), replacing a stale one.
fn bind_private(path: &std::path::Path) -> Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("removing the old socket {}", path.display())),
        _ => {}
    }
    let l = std::os::unix::net::UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).with_context(|| format!("restricting {}", path.display()))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The CRI image service proxy on `listen` (forwarding to `backend`), keeping pull credentials
/// in `creds`.
fn start_cri_proxy(rt: &tokio::runtime::Runtime, listen: &std::path::Path, backend: &std::path::Path, creds: &cri_proxy::CredentialStore) -> Result<()> {
    let cri = bind_private(listen)?;
    let _enter = rt.enter();
    let proxy = cri_proxy::ImageServiceProxy::new(cri_proxy::ProxyConfig::new(backend), creds.clone());
    let listen_s = listen.display().to_string();
    rt.spawn(async move {
        if let Err(e) = cri_proxy::serve(proxy, cri, std::future::pending()).await {
            warn!(socket = %listen_s, error = %e, "CRI image service proxy stopped");
        }
    });
    info!(socket = %listen.display(), backend = %backend.display(), "serving the CRI image service (pull credentials kept for lazy mounts)");
    Ok(())
}

/// The credential broker the layer daemons ask (see `cri_proxy::broker`).
fn start_broker(rt: &tokio::runtime::Runtime, path: &std::path::Path, source: Arc<dyn registry::CredentialSource>) -> Result<()> {
    let l = bind_private(path)?;
    let _enter = rt.enter();
    let l = tokio::net::UnixListener::from_std(l)?;
    rt.spawn(cri_proxy::serve_broker(l, source));
    Ok(())
}

/// The serving settings of the config file, for both modes: the in-process store and
/// [`RemoteConfig`], and the layer daemons' [`DaemonArgs`] (a test checks they agree on every key).
fn settings(file: &FileConfig, root: &std::path::Path, registry: Vec<std::ffi::OsString>) -> (StoreConfig, RemoteConfig, DaemonArgs) {
    let mut store_cfg = StoreConfig::new(root.join("cache"));
    store_cfg.disk_limit = file.cache_size.unwrap_or(0);
    let memory_cache_mib = file.memory_cache_mib.unwrap_or(256);
    store_cfg.memory_limit = memory_cache_mib << 20;
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
    let state = root.join("layers");
    let serve = crate::mount::ServeArgs {
        state_dir: state.clone(),
        cache_size: store_cfg.disk_limit,
        memory_cache: memory_cache_mib,
        fetch_timeout: cfg.fetch_timeout.as_secs().max(1),
        no_background: !cfg.background,
        background_rate: 0,
        background_delay: cfg.background_delay.as_secs_f64(),
        no_prefetch: !cfg.prefetch,
        fetch_all: false,
        prefetch_small_layers: cfg.small_layer_prefetch,
        no_passthrough: !cfg.fs.passthrough,
        threads: cfg.threads,
        parallel: cfg.fetch.parallel,
        readahead: cfg.fetch.readahead,
        foreground: false,
        // Container rootfs layers: setuid binaries must work; the snapshotter's root is
        // root-only (0700), so no other user reaches these mounts.
        allow_setuid: true,
        // Set by `run` when the CRI proxy (and its broker) is on.
        credentials_socket: None,
    };
    let daemon_args = DaemonArgs { serve_config: state.join("serve.json"), state, serve, registry };
    (store_cfg, cfg, daemon_args)
}

/// How layer daemons are started: the serving settings of the config file go to every daemon
/// as one typed file (`STATE/serve.json`, a [`crate::mount::ServeArgs`]), written at start, so
/// both modes honour the same keys and no setting is re-encoded as a flag.
struct DaemonArgs {
    state: PathBuf,
    serve: crate::mount::ServeArgs,
    serve_config: PathBuf,
    registry: Vec<std::ffi::OsString>,
}

impl DaemonArgs {
    /// Writes the daemons' serving settings (before any daemon is started).
    fn write_serve_config(&self) -> Result<()> {
        std::fs::create_dir_all(&self.state).with_context(|| format!("creating {}", self.state.display()))?;
        self.serve.save(&self.serve_config)
    }

    /// The arguments of the `lazypull mount --layer-digest` daemon serving `layer` at `dir`.
    fn daemon_command(&self, layer: &snapshotter::meta::RemoteLayer, dir: &std::path::Path) -> Vec<std::ffi::OsString> {
        let mut out: Vec<std::ffi::OsString> = vec!["mount".into(), layer.image_ref.clone().into(), dir.into()];
        for (k, v) in [("--layer-digest", layer.digest.clone()), ("--layer-size", layer.size.to_string()), ("--index-check", layer.index_check.clone())] {
            out.push(k.into());
            out.push(v.into());
        }
        out.push("--serve-config".into());
        out.push(self.serve_config.clone().into());
        out.extend(self.registry.iter().cloned());
        out
    }
}

/// Serves each remote layer with a `lazypull mount --layer-digest` daemon.
struct DaemonRemote {
    resolver: Arc<RegistryRemote>,
    args: DaemonArgs,
}

impl Remote for DaemonRemote {
    fn resolve(&self, labels: &std::collections::BTreeMap<String, String>) -> std::result::Result<Option<snapshotter::meta::RemoteLayer>, layer::NotLazy> {
        self.resolver.resolve(labels)
    }

    fn mount(&self, layer: &snapshotter::meta::RemoteLayer, dir: &std::path::Path) -> std::result::Result<(), layer::NotLazy> {
        use layer::NotLazy;
        // Labels come from containerd's callers: a value that looks like an option must not
        // become one on the daemon's command line.
        if layer.image_ref.starts_with('-') || layer.digest.starts_with('-') {
            return Err(NotLazy::BadAnnotation { key: "image reference".into(), value: layer.image_ref.clone() });
        }
        let exe = std::env::current_exe().map_err(|e| NotLazy::MountFailed(format!("finding our executable: {e}")))?;
        // Started as the daemon itself (`--foreground`, its own session), not through
        // `lazypull mount`'s own daemonizing: one process start per layer instead of two.
        let mut cmd = std::process::Command::new(exe);
        cmd.args(self.args.daemon_command(layer, dir)).arg("--foreground").env("LAZYPULL_DAEMON", "1");
        if std::env::var_os("LAZYPULL_LOG").is_none() {
            cmd.env("LAZYPULL_LOG", "info");
        }
        let mount_dir = node::StateDir::new(&self.args.state).mount_dir(dir);
        std::fs::create_dir_all(&mount_dir).map_err(|e| NotLazy::MountFailed(format!("creating {}: {e}", mount_dir.display())))?;
        if let Err(e) = node::spawn_daemon(cmd, &mount_dir.join("daemon.log"), |_| {}) {
            // The daemon's own words (it names the entry and field of a refused index).
            let said = e.to_string();
            // `… cannot be mounted lazily: index unusable: WHY (…)` → IndexUnusable(WHY (…)).
            return Err(match said.split_once("index unusable: ") {
                Some((_, why)) => NotLazy::IndexUnusable(why.to_string()),
                None => NotLazy::MountFailed(said),
            });
        }
        Ok(())
    }

    fn unpack(&self, labels: &std::collections::BTreeMap<String, String>, dir: &std::path::Path) -> std::result::Result<u64, String> {
        self.resolver.unpack(labels, dir)
    }

    fn collect_garbage(&self, live: &[snapshotter::meta::RemoteLayer]) {
        let mut keep_chunks = std::collections::HashSet::new();
        let mut keep_objects = std::collections::HashSet::new();
        for l in live {
            match node::read_refs(&node::StateDir::new(&self.args.state), &l.digest) {
                Some(refs) => {
                    for item in refs {
                        match item {
                            node::StoredItem::Object(d) => keep_objects.insert(d),
                            node::StoredItem::Chunk(d) => keep_chunks.insert(d),
                        };
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
        // Layers' tails, and the zTOCs and prefetch artifacts of live SOCI layers (cached
        // under their own digests).
        let side_blobs = |l: &snapshotter::meta::RemoteLayer| layer::IndexCheck::parse(&l.index_check).map(|c| c.side_blobs()).unwrap_or_default();
        let live_digests: std::collections::HashSet<String> = live.iter().flat_map(|l| std::iter::once(l.digest.clone()).chain(side_blobs(l).into_iter().map(|d| d.to_string()))).collect();
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
        // In process: the same decisions as `lazypull umount` (node::stop_mount).
        if crate::mount::stop(dir, &self.args.state).is_err() && lazyfs::is_mountpoint(dir) {
            let _ = lazyfs::detach(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;
    use std::path::Path;

    /// Every key of `contrib/snapshotter.toml`, set to a value that is not its default, reaches
    /// the in-process settings and the layer daemons' command line alike: the daemon's command
    /// line is parsed back with the real CLI and compared field by field.
    #[test]
    fn layer_daemons_get_every_serving_setting() {
        let toml = r#"
            root = "/r"
            address = "/a.sock"
            cache_size = 123456789
            memory_cache_mib = 7
            fetch_timeout_secs = 11
            background_fetch = false
            background_delay_secs = 2.5
            prefetch = false
            passthrough = false
            fuse_threads = 3
            parallel_fetches = 5
            readahead_bytes = 4096
            small_layer_prefetch_bytes = 999
            layer_daemons = false
            metrics_address = "127.0.0.1:0"
            cri_listen = "/c.sock"
            cri_backend = "/b.sock"
            cri_credential_ttl_secs = 60
            credential_provider_config = "/p.json"
            credential_provider_bin_dir = "/bin"
        "#;
        // The test covers the shipped file: a key added there must be added here.
        let shipped = include_str!("../../../contrib/snapshotter.toml");
        for line in shipped.lines() {
            let key = line.trim_start_matches('#').trim().split(['=', ' ']).next().unwrap_or("");
            if !key.is_empty() && line.contains('=') && line.trim_start_matches('#').trim_start().starts_with(key) && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                assert!(toml.contains(&format!("{key} =")), "contrib/snapshotter.toml key {key} is not covered by this test");
            }
        }
        let file: FileConfig = toml::from_str(toml).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let (store_cfg, cfg, daemon) = settings(&file, tmp.path(), vec![]);
        daemon.write_serve_config().unwrap();
        assert_eq!((store_cfg.disk_limit, store_cfg.memory_limit), (123456789, 7 << 20));
        assert_eq!((cfg.fetch_timeout, cfg.background, cfg.prefetch, cfg.threads, cfg.small_layer_prefetch), (Duration::from_secs(11), false, false, 3, 999));
        assert_eq!((cfg.fs.passthrough, cfg.fetch.parallel, cfg.fetch.readahead), (false, 5, 4096));
        let layer = snapshotter::meta::RemoteLayer { image_ref: "reg/x:1".into(), digest: "sha256:aa".into(), size: 10, index_check: "sha256:bb".into() };
        let mut argv = vec![std::ffi::OsString::from("lazypull")];
        argv.extend(daemon.daemon_command(&layer, Path::new("/r/snapshots/1/fs")));
        let crate::Cli { command: crate::Command::Mount(m) } = crate::Cli::try_parse_from(argv).unwrap() else { panic!("not a mount command") };
        // The daemon takes its settings from the typed file the snapshotter wrote.
        let s = &crate::mount::ServeArgs::load(m.serve_config.as_deref().expect("a serve config"), false).unwrap();
        assert_eq!(s.state_dir, tmp.path().join("layers"));
        assert_eq!((s.cache_size, s.memory_cache, s.threads, s.fetch_timeout), (123456789, 7, 3, 11));
        assert_eq!((s.no_background, s.background_delay, s.no_prefetch, s.no_passthrough), (true, 2.5, true, true));
        assert_eq!((s.parallel, s.readahead, s.prefetch_small_layers, s.allow_setuid), (5, 4096, 999, true));
        assert_eq!((m.layer_digest.as_deref(), m.layer_size, m.index_check.as_deref()), (Some("sha256:aa"), Some(10), Some("sha256:bb")));
    }
}
