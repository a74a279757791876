//! `lazypull mount`, `lazypull layer mount`, `lazypull umount`, `lazypull status`: lazily
//! mounted images and layers without containerd.
//!
//! A mount is served by a daemon process: `mount` starts itself again with `--foreground` in a
//! new session, waits until the child reports that every layer is mounted (or prints the
//! child's log and fails), and returns. The daemon keeps a record (`record.json`: pid,
//! mountpoint, layer mounts) and a status file (`status.json`, rewritten every second) under
//! `STATE/mounts/<name>/`; `umount` and `status` find them from the mountpoint.
//! Images mount as one FUSE mount per eStargz layer under a read-only overlayfs; layers that
//! are not eStargz are downloaded and extracted once (logged, with the reason) so that any
//! image mounts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use estargz::Digest;
use lazyfs::{is_mountpoint, FsOptions, LayerServer, MountedLayer, ServeOptions};
use store::{ChunkStore, FetchConfig, FileRangeSource, LayerFetcher, RangeSource, StoreConfig};
use tracing::{info, warn};

use crate::image::RegistryArgs;

/// Default bound of `lazypull mount`'s chunk cache: without one, `/var/lib/lazypull` kept every
/// chunk forever.
pub const DEFAULT_CACHE_BYTES: u64 = 10 << 30;

/// Options shared by every lazy mount. Also the typed configuration the snapshotter hands its
/// layer daemons (`--serve-config FILE`, JSON), so that no setting is re-encoded as a flag.
#[derive(Args, Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ServeArgs {
    /// State directory: chunk cache, extracted fallback layers, mount records.
    #[arg(long, default_value = "/var/lib/lazypull", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Disk cache limit in bytes for the whole state directory (every mount's daemons
    /// together; 0: unlimited); least recently used chunks are evicted and fetched again when
    /// read. Default 10 GiB.
    #[arg(long, default_value_t = DEFAULT_CACHE_BYTES, value_name = "BYTES")]
    pub cache_size: u64,
    /// In-memory chunk cache in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub memory_cache: u64,
    /// Deadline of one fetch from the registry, retries included, in seconds.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub fetch_timeout: u64,
    /// Do not fetch the rest of each layer in the background.
    #[arg(long)]
    pub no_background: bool,
    /// Background fetch rate limit in bytes/s (0: unlimited; on-demand reads always go first).
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    pub background_rate: u64,
    /// Seconds to wait before the background fetch starts.
    #[arg(long, default_value_t = 0.0, value_name = "SECS")]
    pub background_delay: f64,
    /// Do not prefetch the prioritized files at mount.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Fetch each whole layer at mount, before reporting ready.
    #[arg(long)]
    pub fetch_all: bool,
    /// Layers without prioritized files and at most this many compressed bytes are fetched
    /// whole right after mount, in the background (0: never).
    #[arg(long, default_value_t = lazyfs::SMALL_LAYER_BYTES, value_name = "BYTES")]
    pub prefetch_small_layers: u64,
    /// Never use FUSE passthrough.
    #[arg(long)]
    pub no_passthrough: bool,
    /// FUSE worker threads per layer.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Concurrent range requests per layer.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Compressed bytes fetched beyond a missed chunk, in the same request.
    #[arg(long, default_value_t = store::FetchConfig::default().readahead, value_name = "BYTES")]
    pub readahead: u64,
    /// Stay in the foreground (serve until unmounted or signalled).
    #[arg(long)]
    #[serde(skip)]
    pub foreground: bool,
    /// Honour the image's setuid/setgid bits, file capabilities and device nodes (mount with
    /// `suid,dev`). Off by default: any local user could otherwise gain what a hostile image
    /// grants. The snapshotter sets it for its layers, which sit below a root-only directory.
    #[arg(long)]
    pub allow_setuid: bool,
    /// The snapshotter's credential broker (the CRI pull credentials it keeps), asked whenever
    /// a registry answers 401. Set by the snapshotter in the daemons' settings file only.
    #[arg(skip)]
    #[serde(default)]
    pub credentials_socket: Option<PathBuf>,
}

impl ServeArgs {
    /// Reads the options from a `--serve-config` file (every field; `foreground` stays as given).
    pub fn load(path: &Path, foreground: bool) -> Result<ServeArgs> {
        let bytes = std::fs::read(path).with_context(|| format!("reading the serve config {}", path.display()))?;
        let mut s: ServeArgs = serde_json::from_slice(&bytes).with_context(|| format!("parsing the serve config {}", path.display()))?;
        s.foreground = foreground;
        Ok(s)
    }

    /// Writes the options for [`ServeArgs::load`] (atomically: daemons may be reading it).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    pub fn privileges(&self) -> lazyfs::Privileges {
        if self.allow_setuid {
            lazyfs::Privileges::Honour
        } else {
            lazyfs::Privileges::Ignore
        }
    }
}

#[derive(Args)]
pub struct MountArgs {
    /// Image reference in a registry.
    pub reference: String,
    pub mountpoint: PathBuf,
    /// Mount only layer N (0 = bottom) instead of the whole image.
    #[arg(long, value_name = "N", conflicts_with = "layer_digest")]
    pub layer: Option<usize>,
    /// Mount only the layer with this blob digest.
    #[arg(long, value_name = "DIGEST")]
    pub layer_digest: Option<String>,
    /// With `--layer-digest` and `--index-check`: the blob's size, so that the image manifest
    /// need not be fetched (the snapshotter knows both).
    #[arg(long, value_name = "BYTES", requires_all = ["layer_digest", "index_check"])]
    pub layer_size: Option<u64>,
    /// What authenticates the layer's index (with `--layer-size`): its TOC digest
    /// (`sha256:…`), `zstd-manifest-checksum:sha256:…`, or `soci-ztoc:sha256:…` (a SOCI
    /// zTOC, fetched from the same repository).
    #[arg(long, alias = "toc-digest", value_name = "CHECK", requires = "layer_size")]
    pub index_check: Option<String>,
    /// Platform to pick from a multi-platform image (default: this host's).
    #[arg(long)]
    pub platform: Option<String>,
    /// Use this SOCI index (digest) for layers that are not eStargz, instead of looking for
    /// one (manifest annotation, then referrers).
    #[arg(long, value_name = "DIGEST")]
    pub soci_index: Option<String>,
    /// Take every serving option from this JSON file (as the snapshotter writes it for its
    /// layer daemons) instead of the flags.
    #[arg(long, value_name = "FILE")]
    pub serve_config: Option<PathBuf>,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Args)]
pub struct LayerMountArgs {
    /// A local eStargz blob.
    pub blob: PathBuf,
    pub mountpoint: PathBuf,
    /// Expected TOC digest.
    #[arg(long)]
    pub toc_digest: Option<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

use node::{LayerStatus, MountIndex, MountStatus, Record, StateDir, StoredItem};

fn mount_dir(state: &Path, mountpoint: &Path) -> PathBuf {
    StateDir::new(state).mount_dir(mountpoint)
}

/// Starts the daemon (`--foreground` child) and waits for it to report ready.
fn daemonize(serve: &ServeArgs, mountpoint: &Path) -> Result<()> {
    let dir = mount_dir(&serve.state_dir, mountpoint);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join("daemon.log");
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--foreground".into());
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(&args).env("LAZYPULL_DAEMON", "1");
    if std::env::var_os("LAZYPULL_LOG").is_none() {
        cmd.env("LAZYPULL_LOG", "info");
    }
    let started = node::spawn_daemon(cmd, &log_path, |line| println!("{line}"))?;
    println!("{}", started.ready);
    Ok(())
}

pub(crate) fn open_store(serve: &ServeArgs) -> Result<Arc<ChunkStore>> {
    let state = StateDir::new(&serve.state_dir);
    let mut cfg = StoreConfig::new(state.cache_dir());
    cfg.disk_limit = serve.cache_size;
    cfg.memory_limit = serve.memory_cache << 20;
    Ok(ChunkStore::open(cfg)?)
}

pub(crate) fn fetch_config(serve: &ServeArgs) -> FetchConfig {
    FetchConfig {
        parallel: serve.parallel.max(1),
        readahead: serve.readahead,
        background_rate: serve.background_rate,
        wait_timeout: Duration::from_secs(serve.fetch_timeout.max(1) * 2),
        // Every daemon of this state directory shares the link: their demand quiets our fill.
        link: store::LinkActivity::open(&StateDir::new(&serve.state_dir).link_demand()).ok().map(Arc::new),
        ..FetchConfig::default()
    }
}

/// A layer being served.
struct ServedLayer {
    index: usize,
    digest: String,
    blob_bytes: u64,
    /// The lazily served layer (`None`: extracted, see `fallback_reason`).
    server: Option<LayerServer>,
    fallback_reason: Option<String>,
}

impl ServedLayer {
    fn status(&self) -> LayerStatus {
        let mut s = LayerStatus {
            index: self.index,
            digest: self.digest.clone(),
            lazy: self.server.is_some(),
            fallback_reason: self.fallback_reason.clone(),
            blob_bytes: self.blob_bytes,
            fetched_bytes: 0,
            present_percent: 100.0,
            requests: 0,
            chunks_fetched: 0,
            cache_hits: 0,
            errors: 0,
            last_error: None,
            prefetch_done: true,
            complete: true,
            reads: 0,
            read_errors: 0,
            passthrough_opens: 0,
            libraries_prefetched: 0,
            opened_files: Vec::new(),
            fetch_latency_buckets: Vec::new(),
            fetch_latency_sum_secs: 0.0,
        };
        if let Some(f) = self.server.as_ref().map(LayerServer::fetcher) {
            let st = &f.stats;
            s.fetched_bytes = st.fetched_bytes.load(Ordering::Relaxed);
            s.present_percent = (f.percent_present() * 100.0).round() / 100.0;
            s.requests = st.requests.load(Ordering::Relaxed);
            s.chunks_fetched = st.chunks_fetched.load(Ordering::Relaxed);
            s.cache_hits = st.cache_hits.load(Ordering::Relaxed);
            s.errors = st.errors.load(Ordering::Relaxed);
            s.last_error = st.last_error.lock().unwrap().clone();
            s.prefetch_done = st.prefetch_done.load(Ordering::Relaxed);
            s.complete = st.complete.load(Ordering::Relaxed);
            s.fetch_latency_buckets = st.latency_buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
            s.fetch_latency_sum_secs = st.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        }
        if let Some(fs) = self.server.as_ref().map(LayerServer::fs_stats) {
            s.reads = fs.reads.load(Ordering::Relaxed);
            s.read_errors = fs.read_errors.load(Ordering::Relaxed);
            s.passthrough_opens = fs.passthrough_opens.load(Ordering::Relaxed);
            s.libraries_prefetched = fs.libraries_prefetched.load(Ordering::Relaxed);
            s.opened_files = fs.opened.lock().unwrap().paths.clone();
        }
        s
    }
}

/// Everything a running mount owns.
struct Served {
    source: String,
    mountpoint: PathBuf,
    dir: PathBuf,
    layers: Vec<ServedLayer>,
    /// Device number of our overlay at `mountpoint` (image mounts); its identity, so that only
    /// our own overlay is ever unmounted.
    overlay: Option<u64>,
    /// An open descriptor of our overlay's root: it pins the overlay's superblock, so its device
    /// number cannot be handed to another mount while we live (which makes `overlay` an identity).
    _overlay_pin: Option<std::fs::File>,
    store: Arc<ChunkStore>,
    started: Instant,
}

impl Served {
    fn write_status(&self) {
        let st = MountStatus {
            source: self.source.clone(),
            mountpoint: self.mountpoint.clone(),
            pid: std::process::id(),
            mounted_secs: self.started.elapsed().as_secs_f64(),
            cache_disk_bytes: self.store.usage().disk_bytes,
            layers: self.layers.iter().map(ServedLayer::status).collect(),
        };
        let _ = st.save(&self.dir);
    }

    /// Starts prefetch and background fill for every lazy layer. The prefetch runs while the
    /// mount is already in use: it fetches in first-open order, and a read of a file it has not
    /// reached yet joins the fetch in flight or fetches on demand, so waiting for it before
    /// reporting ready would only delay the container's start.
    fn start_fill(&self) {
        for s in self.servers() {
            s.start_fill().expect("spawning a thread");
        }
    }

    /// The lazily served layers.
    fn servers(&self) -> impl Iterator<Item = &LayerServer> {
        self.layers.iter().filter_map(|l| l.server.as_ref())
    }

    /// The layer mounts still attached.
    fn mounts(&self) -> impl Iterator<Item = &MountedLayer> {
        self.servers().filter_map(LayerServer::mounted)
    }

    /// Unmounts everything and stops background work.
    fn shutdown(mut self) {
        if let Some(dev) = self.overlay {
            let _ = lazyfs::detach_if(&self.mountpoint, dev);
        }
        // The pin keeps the detached overlay's superblock, and with it every layer mount below
        // it, alive: release it first, or a layer's detach leaves it mounted.
        self._overlay_pin = None;
        // Every layer's waiting readers fail fast before any mount is waited for.
        for s in self.servers() {
            s.close();
        }
        for s in self.layers.iter_mut().filter_map(|l| l.server.as_mut()) {
            if let Err(e) = s.unmount() {
                warn!(error = %e, "unmount");
            }
        }
        // A newer daemon for the same mount point (after a restart) owns the record now.
        if self.owns_record() {
            self.write_status();
            let _ = std::fs::remove_file(self.dir.join("record.json"));
            MountIndex::default().unregister(&self.mountpoint, &self.dir);
        }
    }

    /// Whether `record.json` is this process's (not a newer daemon's at the same path).
    fn owns_record(&self) -> bool {
        Record::is_mine(&self.dir)
    }
}

/// Where layers' footers and TOCs are cached (see [`node::StateDir::tails_dir`]).
pub fn tails_dir(state: &Path) -> PathBuf {
    StateDir::new(state).tails_dir()
}

/// Records what layer `blob_digest` keeps in the store (see [`node::refs`]).
pub(crate) fn write_refs(state: &Path, blob_digest: &str, fetcher: &LayerFetcher) -> Result<()> {
    let pieces = fetcher.chunks().iter().filter_map(|c| match (&c.slot, c.digest) {
        (Some(slot), _) => Some(StoredItem::Object(slot.file)),
        (None, Some(d)) => Some(StoredItem::Chunk(d)),
        _ => None,
    });
    // SOCI spans stored whole (store::fetcher::spans) belong to the layer too.
    let spans = fetcher.chunks().iter().filter_map(|c| c.compressed_digest.map(StoredItem::Chunk));
    let items = pieces.chain(spans);
    node::write_refs(&StateDir::new(state), blob_digest, items).with_context(|| format!("recording the store references of {blob_digest}"))
}

/// Mounts one opened layer with FUSE at `at` (its prefetch starts with the fill, after every
/// layer of the mount is mounted).
fn serve_layer(opened: lazyfs::OpenedLayer, at: &Path, serve: &ServeArgs, index: usize, digest: &str, blob_bytes: u64) -> Result<ServedLayer> {
    let options = ServeOptions {
        fs: FsOptions {
            passthrough: !serve.no_passthrough,
            ..FsOptions::default()
        },
        threads: serve.threads,
        privileges: serve.privileges(),
        prefetch: !serve.no_prefetch,
        small_layer: serve.prefetch_small_layers,
        fetch_all: serve.fetch_all,
        background: !serve.no_background,
        background_delay: Duration::from_secs_f64(serve.background_delay.max(0.0)),
    };
    let server = LayerServer::mount(opened, at, &format!("lazypull:{digest}"), options)?;
    Ok(ServedLayer {
        index,
        digest: digest.to_string(),
        blob_bytes,
        server: Some(server),
        fallback_reason: None,
    })
}

/// Serves until unmounted or signalled.
fn run_served(served: Served, ready_line: String) -> Result<()> {
    let record = Record {
        pid: std::process::id(),
        mountpoint: served.mountpoint.clone(),
        source: served.source.clone(),
        layer_mounts: served.mounts().map(|m| m.mountpoint().to_path_buf()).filter(|p| *p != served.mountpoint).collect(),
        overlay: served.overlay.is_some(),
        dev: served.overlay.or_else(|| served.mounts().find(|m| m.mountpoint() == served.mountpoint).map(|m| m.dev())),
        start_ticks: node::start_ticks(std::process::id()),
    };
    record.save(&served.dir).with_context(|| format!("writing the mount record in {}", served.dir.display()))?;
    // Node-wide, so `status` and `umount` find this mount whatever --state-dir they are given.
    if let Err(e) = MountIndex::default().register(&served.mountpoint, &served.dir) {
        warn!(error = %e, "cannot register the mount in the node-wide index");
    }
    served.write_status();
    served.start_fill();
    let term = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        signal_flag(sig, &term);
    }
    info!(ready_ms = served.started.elapsed().as_millis() as u64, "serving");
    println!("READY {ready_line}");
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        if term.load(Ordering::SeqCst) {
            info!("signalled; unmounting");
            break;
        }
        // A layer session ends when the kernel drops the connection: its mount was detached
        // and nothing (no container's overlay) holds it any more. Until then a detached mount
        // is still served. Only our own overlay counts: a newer mount at the same path is not
        // ours to watch or to take down.
        let overlay_gone = served.overlay.is_some_and(|dev| !lazyfs::carries(&served.mountpoint, dev));
        if served.mounts().any(|m| m.is_finished()) || overlay_gone {
            info!("mount went away; shutting down");
            break;
        }
        if served.owns_record() {
            served.write_status();
        }
    }
    served.shutdown();
    Ok(())
}

static SIGNALLED: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

extern "C" fn on_signal(_: libc::c_int) {
    if let Some(f) = SIGNALLED.get() {
        f.store(true, Ordering::SeqCst);
    }
}

fn signal_flag(sig: libc::c_int, flag: &Arc<AtomicBool>) {
    let _ = SIGNALLED.set(flag.clone());
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(sig, on_signal as *const () as libc::sighandler_t);
    }
}

/// `lazypull layer mount BLOB MOUNTPOINT`.
pub fn layer_mount(args: LayerMountArgs) -> Result<()> {
    if !args.serve.foreground {
        return daemonize(&args.serve, &args.mountpoint);
    }
    let store = open_store(&args.serve)?;
    let source: Arc<dyn RangeSource> = Arc::new(FileRangeSource::open(&args.blob)?);
    let expected = args.toc_digest.as_deref().map(|d| d.parse::<Digest>().map(lazyfs::IndexCheck::TocDigest)).transpose()?;
    let size = source.size();
    let opened = lazyfs::open_layer(source, expected.as_ref(), store.clone(), fetch_config(&args.serve))?;
    let name = args.blob.display().to_string();
    let layer = serve_layer(opened, &args.mountpoint, &args.serve, 0, &name, size)?;
    let served = Served {
        source: name.clone(),
        mountpoint: args.mountpoint.clone(),
        dir: mount_dir(&args.serve.state_dir, &args.mountpoint),
        layers: vec![layer],
        overlay: None,
        _overlay_pin: None,
        store,
        started: Instant::now(),
    };
    std::fs::create_dir_all(&served.dir)?;
    run_served(served, format!("mounted {name} at {}", args.mountpoint.display()))
}

/// `lazypull mount REF MOUNTPOINT`.
pub fn image_mount(mut args: MountArgs) -> Result<()> {
    if let Some(p) = &args.serve_config {
        args.serve = ServeArgs::load(p, args.serve.foreground)?;
    }
    if !args.serve.foreground {
        return daemonize(&args.serve, &args.mountpoint);
    }
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let broker = args.serve.credentials_socket.as_ref().map(|p| Arc::new(cri_proxy::BrokerClient::new(p)) as Arc<dyn registry::CredentialSource>);
    let client = args.registry.client_with(broker)?;
    let location = convert::parse_location(&args.reference, &client)?;
    let convert::Store::Registry { reference, .. } = &location else { bail!("mount needs a registry reference, not an OCI layout") };
    // Everything needed is known (the snapshotter's daemons): a one-layer manifest and its
    // check, no round trip to the registry for the manifest.
    let known = match (&args.layer_digest, args.layer_size, &args.index_check) {
        (Some(digest), Some(size), Some(check)) => Some((digest.clone(), size, layer::IndexCheck::parse(check)?)),
        _ => None,
    };
    let (manifest, manifest_digest) = match &known {
        Some((digest, size, _)) => {
            let layer = registry::Descriptor::new(registry::manifest::OCI_LAYER_GZIP, digest.clone(), *size);
            let m = registry::Manifest {
                schema_version: 2,
                media_type: None,
                artifact_type: None,
                config: registry::Descriptor::new(registry::manifest::DOCKER_CONFIG, String::new(), 0),
                layers: vec![layer],
                subject: None,
                annotations: Default::default(),
                extra: Default::default(),
            };
            (m, String::new())
        }
        None => rt.block_on(async {
            let (_, root, digest) = location.root().await?;
            crate::image::select_manifest_with_digest(&location, root, &digest, args.platform.as_deref()).await
        })?,
    };
    // The SOCI index, looked up once, the first time a layer is not eStargz.
    let mut image = crate::image_layers::ImageLayers::new(&location, &manifest, &manifest_digest, args.soci_index.as_deref());
    let mut decide = |d: &registry::Descriptor| -> Result<layer::IndexCheck, layer::NotLazy> {
        match &known {
            Some((_, _, check)) => Ok(*check),
            None => image.check(&rt, d),
        }
    };
    let by_digest = match &args.layer_digest {
        Some(d) => Some(manifest.layers.iter().position(|l| &l.digest == d).with_context(|| format!("layer {d} is not in {}", args.reference))?),
        None => None,
    };
    let indices: Vec<usize> = match args.layer.or(by_digest) {
        Some(n) if n >= manifest.layers.len() => bail!("the image has {} layers; there is no layer {n}", manifest.layers.len()),
        Some(n) => vec![n],
        None => (0..manifest.layers.len()).collect(),
    };
    let setup_ms = started.elapsed().as_millis() as u64;
    let store = open_store(&args.serve)?;
    let dir = mount_dir(&args.serve.state_dir, &args.mountpoint);
    std::fs::create_dir_all(&dir)?;
    let single = indices.len() == 1;
    let (mut open_ms, mut serve_ms) = (0u64, 0u64);
    let mut layers = Vec::new();
    let mut lowers = Vec::new();
    for &i in &indices {
        let d = &manifest.layers[i];
        // The one decision every caller shares (layer crate): lazy, and checked how, or why not.
        let open_at = crate::image_layers::OpenAt {
            rt: &rt,
            client: &client,
            reference,
            store: &store,
            fetch: fetch_config(&args.serve),
            state_dir: &args.serve.state_dir,
            fetch_timeout: Duration::from_secs(args.serve.fetch_timeout.max(1)),
        };
        let opening = Instant::now();
        let lazy = decide(d).and_then(|check| crate::image_layers::open_lazy(&open_at, &location, d, check));
        open_ms += opening.elapsed().as_millis() as u64;
        match lazy {
            Ok(opened) => {
                let serving = Instant::now();
                let at = if single { args.mountpoint.clone() } else { dir.join("layers").join(i.to_string()) };
                // Registry layers only: a local blob has no digest to key its references by.
                if let Err(e) = write_refs(&args.serve.state_dir, &d.digest, &opened.fetcher) {
                    warn!(layer = i, error = %e, "cannot record the layer's chunk references (cache GC will not see them)");
                }
                layers.push(serve_layer(opened, &at, &args.serve, i, &d.digest, d.size)?);
                serve_ms += serving.elapsed().as_millis() as u64;
                lowers.push(at);
            }
            Err(reason) => {
                if single {
                    bail!("layer {i} ({}) cannot be mounted lazily: {reason}", d.digest);
                }
                warn!(layer = i, digest = %d.digest, %reason, "layer is not lazy; downloading and extracting it");
                let at = rt.block_on(crate::fallback::extract_layer(&location, d, &args.serve.state_dir))?;
                layers.push(ServedLayer {
                    index: i,
                    digest: d.digest.clone(),
                    blob_bytes: d.size,
                    server: None,
                    fallback_reason: Some(reason.to_string()),
                });
                lowers.push(at);
            }
        }
    }
    let overlay = if single { None } else { Some(crate::fallback::mount_overlay(&lowers, &args.mountpoint, args.serve.privileges())?) };
    let overlay_pin = match overlay {
        Some(_) => Some(std::fs::File::open(&args.mountpoint).with_context(|| format!("opening the overlay at {}", args.mountpoint.display()))?),
        None => None,
    };
    let served = Served {
        source: args.reference.clone(),
        mountpoint: args.mountpoint.clone(),
        dir,
        layers,
        overlay,
        _overlay_pin: overlay_pin,
        store,
        started,
    };
    let line = format!(
        "mounted {} ({} layer{}, {} lazy) at {} in {:.2} s",
        args.reference,
        indices.len(),
        if single { "" } else { "s" },
        served.layers.iter().filter(|l| l.server.is_some()).count(),
        args.mountpoint.display(),
        started.elapsed().as_secs_f64()
    );
    // Where a mount's start goes (a layer daemon's start is on the pull's critical path).
    info!(setup_ms, open_ms, serve_ms, total_ms = started.elapsed().as_millis() as u64, "layers opened and mounted");
    let res = run_served(served, line);
    drop(rt);
    res
}

/// The files of the mount at `mountpoint`: under `state`, or wherever the node-wide index says
/// (a mount made with another `--state-dir`).
fn locate(state: &Path, mountpoint: &Path) -> PathBuf {
    MountIndex::default().locate(&StateDir::new(state), mountpoint)
}

fn read_record(state: &Path, mountpoint: &Path) -> Result<(PathBuf, Record)> {
    let dir = locate(state, mountpoint);
    let rec = Record::load(&dir).with_context(|| format!("no lazypull mount recorded at {} ({} unreadable)", mountpoint.display(), dir.join("record.json").display()))?;
    Ok((dir, rec))
}

/// `lazypull umount MOUNTPOINT`.
pub fn umount(mountpoint: &Path, state: &Path) -> Result<()> {
    stop(mountpoint, state)?;
    println!("unmounted {}", mountpoint.display());
    Ok(())
}

/// Stops the mount at `mountpoint` (found under `state` or through the node-wide index).
pub fn stop(mountpoint: &Path, state: &Path) -> Result<node::Stopped> {
    let (dir, rec) = read_record(state, mountpoint)?;
    let stopped = node::stop_mount(&Host, &dir, &rec, &MountIndex::default(), node::StopDeadlines::default()).with_context(|| format!("unmounting {}", rec.mountpoint.display()))?;
    if stopped.killed {
        warn!(pid = rec.pid, "daemon did not exit on SIGTERM; killed it");
    }
    Ok(stopped)
}

/// The real privileged effects of stopping a mount (the logic is `node::stop_mount`).
struct Host;

impl node::Effects for Host {
    fn is_mountpoint(&self, path: &Path) -> bool {
        is_mountpoint(path)
    }
    fn is_dead_mount(&self, path: &Path) -> bool {
        // A FUSE mount whose daemon died answers ENOTCONN.
        is_mountpoint(path) && std::fs::symlink_metadata(path).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
    }
    fn detach_if(&self, path: &Path, dev: u64) -> std::io::Result<bool> {
        lazyfs::detach_if(path, dev).map_err(std::io::Error::other)
    }
    fn detach(&self, path: &Path) -> std::io::Result<()> {
        lazyfs::detach(path).map_err(std::io::Error::other)
    }
    fn alive(&self, rec: &Record) -> bool {
        rec.daemon_alive()
    }
    fn signal(&self, rec: &Record, signal: node::Signal) {
        let sig = match signal {
            node::Signal::Term => libc::SIGTERM,
            node::Signal::Kill => libc::SIGKILL,
        };
        // SAFETY: plain signal delivery to the daemon we started (pid and start time were
        // checked by `alive` just before).
        unsafe { libc::kill(rec.pid as libc::pid_t, sig) };
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// `lazypull status MOUNTPOINT`.
pub fn status(mountpoint: &Path, state: &Path, json: bool) -> Result<()> {
    let dir = locate(state, mountpoint);
    let p = dir.join("status.json");
    let bytes = std::fs::read(&p).with_context(|| format!("no status for {} ({} missing)", mountpoint.display(), p.display()))?;
    let st: MountStatus = serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display()))?;
    // A daemon that crashed leaves its files behind: say so instead of showing it as running.
    let running = Record::load(&dir).is_ok_and(|r| r.pid == st.pid && r.daemon_alive());
    if json {
        let mut v: serde_json::Value = serde_json::from_slice(&bytes)?;
        v["running"] = running.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let state = if running { format!("pid {}, up {:.0} s", st.pid, st.mounted_secs) } else { format!("daemon pid {} NOT RUNNING; last status after {:.0} s", st.pid, st.mounted_secs) };
    println!("{} at {} ({state}, cache {:.1} MB)", st.source, st.mountpoint.display(), st.cache_disk_bytes as f64 / 1e6);
    for l in &st.layers {
        let mode = if l.lazy { "lazy" } else { "extracted" };
        println!(
            "  {:>2} {} {mode:9} {:>6.2}% present, {:>10} of {:>10} bytes fetched, {} requests, {} errors{}",
            l.index,
            l.digest.chars().take(19).collect::<String>(),
            l.present_percent,
            l.fetched_bytes,
            l.blob_bytes,
            l.requests,
            l.errors,
            l.last_error.as_deref().map(|e| format!(" (last: {e})")).unwrap_or_default()
        );
        if let Some(r) = &l.fallback_reason {
            println!("     not lazy: {r}");
        }
    }
    Ok(())
}
