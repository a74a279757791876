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

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use estargz::Digest;
use lazyfs::{is_mountpoint, FsOptions, LayerFs, MountedLayer};
use serde::{Deserialize, Serialize};
use store::{ChunkStore, FetchConfig, FileRangeSource, LayerFetcher, RangeSource, RegistryRangeSource, StoreConfig};
use tracing::{info, warn};

use crate::image::RegistryArgs;

/// Default bound of `lazypull mount`'s chunk cache: without one, `/var/lib/lazypull` kept every
/// chunk forever.
pub const DEFAULT_CACHE_BYTES: u64 = 10 << 30;

/// Options shared by every lazy mount.
#[derive(Args, Clone)]
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
    pub foreground: bool,
    /// Honour the image's setuid/setgid bits, file capabilities and device nodes (mount with
    /// `suid,dev`). Off by default: any local user could otherwise gain what a hostile image
    /// grants. The snapshotter sets it for its layers, which sit below a root-only directory.
    #[arg(long)]
    pub allow_setuid: bool,
}

impl ServeArgs {
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
    /// (`sha256:…`) or `zstd-manifest-checksum:sha256:…`.
    #[arg(long, alias = "toc-digest", value_name = "CHECK", requires = "layer_size")]
    pub index_check: Option<String>,
    /// Platform to pick from a multi-platform image (default: this host's).
    #[arg(long)]
    pub platform: Option<String>,
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

/// What `umount` needs to find a mount's parts.
#[derive(Serialize, Deserialize)]
struct Record {
    pid: u32,
    mountpoint: PathBuf,
    source: String,
    /// FUSE layer mounts (below an overlay) in layer order; empty when the mountpoint is the layer.
    layer_mounts: Vec<PathBuf>,
    overlay: bool,
    /// Device number of the mount at `mountpoint` (its identity): `umount` detaches only this
    /// mount, never a newer one at the same path.
    #[serde(default)]
    dev: Option<u64>,
    /// The daemon's start time (clock ticks after boot, /proc/PID/stat field 22): together
    /// with `pid` it names the process, so a reused pid is never signalled.
    #[serde(default)]
    start_ticks: Option<u64>,
}

/// Start time of process `pid` in clock ticks after boot (`/proc/PID/stat` field 22).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Record {
    /// Whether the recorded daemon is still the process with that pid.
    fn daemon_alive(&self) -> bool {
        alive(self.pid) && (self.start_ticks.is_none() || start_ticks(self.pid) == self.start_ticks)
    }
}

/// One layer's line in `status.json`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LayerStatus {
    pub index: usize,
    pub digest: String,
    pub lazy: bool,
    /// Why a layer is not lazy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
    pub blob_bytes: u64,
    pub fetched_bytes: u64,
    pub present_percent: f64,
    pub requests: u64,
    pub chunks_fetched: u64,
    pub cache_hits: u64,
    pub errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub prefetch_done: bool,
    pub complete: bool,
    pub reads: u64,
    pub read_errors: u64,
    pub passthrough_opens: u64,
    /// Shared libraries prefetched because a program that needs them was read (`fs::deps`).
    #[serde(default)]
    pub libraries_prefetched: u64,
    /// Regular files in first-open order (paths in the layer): the workload's reads, usable as
    /// `image convert --prioritize` input.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opened_files: Vec<String>,
    /// Range-request latency histogram: counts per bucket (upper bounds in ms:
    /// `store::LATENCY_BUCKETS_MS`, then +Inf) and the sum in seconds.
    #[serde(default)]
    pub fetch_latency_buckets: Vec<u64>,
    #[serde(default)]
    pub fetch_latency_sum_secs: f64,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct MountStatus {
    pub source: String,
    pub mountpoint: PathBuf,
    pub pid: u32,
    pub mounted_secs: f64,
    pub cache_disk_bytes: u64,
    pub layers: Vec<LayerStatus>,
}

fn mount_dir(state: &Path, mountpoint: &Path) -> PathBuf {
    let canon = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let d = Digest::of(canon.as_os_str().as_encoded_bytes()).hex();
    state.join("mounts").join(&d[..16])
}

/// Starts the daemon (`--foreground` child) and waits for it to report ready.
fn daemonize(serve: &ServeArgs, mountpoint: &Path) -> Result<()> {
    let dir = mount_dir(&serve.state_dir, mountpoint);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join("daemon.log");
    // Appended to: after a restart an old daemon on its way out and the new one share the path.
    // Kept small: the log of the previous daemons at this path is rotated once it passes 8 MiB.
    if std::fs::metadata(&log_path).is_ok_and(|m| m.len() > 8 << 20) {
        let _ = std::fs::rename(&log_path, log_path.with_extension("log.1"));
    }
    let log = std::fs::File::options().create(true).append(true).open(&log_path).with_context(|| format!("opening {}", log_path.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--foreground".into());
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log).env("LAZYPULL_DAEMON", "1");
    if std::env::var_os("LAZYPULL_LOG").is_none() {
        cmd.env("LAZYPULL_LOG", "info");
    }
    // SAFETY: setsid is async-signal-safe; the child leaves our session so that a terminal
    // hang-up does not take the mount down.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    let out = child.stdout.take().expect("piped");
    for line in BufReader::new(out).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("READY ") {
            println!("{rest}");
            return Ok(());
        }
        println!("{line}");
    }
    let status = child.wait()?;
    // This daemon's part of the log only (the file is shared across restarts).
    let log = std::fs::read(&log_path).unwrap_or_default();
    let ours = String::from_utf8_lossy(log.get(log_start as usize..).unwrap_or_default()).into_owned();
    let tail: Vec<&str> = ours.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
    // The daemon's own last line is the reason; say it once, not as "error: … error: …".
    let reason = tail.iter().rev().find_map(|l| l.strip_prefix("lazypull: error: ")).map(str::to_string);
    match reason {
        Some(r) if tail.len() == 1 => bail!("{r} (mount daemon exited with {status}; log: {})", log_path.display()),
        _ => bail!("mount daemon exited ({status}) before the mount was ready; its log ({}):\n{}", log_path.display(), tail.join("\n")),
    }
}

fn open_store(serve: &ServeArgs) -> Result<Arc<ChunkStore>> {
    let mut cfg = StoreConfig::new(serve.state_dir.join("cache"));
    cfg.disk_limit = serve.cache_size;
    cfg.memory_limit = serve.memory_cache << 20;
    Ok(ChunkStore::open(cfg)?)
}

fn fetch_config(serve: &ServeArgs) -> FetchConfig {
    FetchConfig {
        parallel: serve.parallel.max(1),
        readahead: serve.readahead,
        background_rate: serve.background_rate,
        wait_timeout: Duration::from_secs(serve.fetch_timeout.max(1) * 2),
        // Every daemon of this state directory shares the link: their demand quiets our fill.
        link: store::LinkActivity::open(&serve.state_dir.join("link-demand")).ok().map(Arc::new),
        ..FetchConfig::default()
    }
}

/// A layer being served.
struct ServedLayer {
    index: usize,
    digest: String,
    blob_bytes: u64,
    fetcher: Option<Arc<LayerFetcher>>,
    /// Where the mount-time prefetch ends (`lazyfs::prefetch_end`: the prioritized files, or
    /// all of a small layer), if there is one.
    prefetch_end: Option<u64>,
    fs_stats: Option<Arc<lazyfs::FsStats>>,
    fallback_reason: Option<String>,
}

impl ServedLayer {
    fn status(&self) -> LayerStatus {
        let mut s = LayerStatus {
            index: self.index,
            digest: self.digest.clone(),
            lazy: self.fetcher.is_some(),
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
        if let Some(f) = &self.fetcher {
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
        if let Some(fs) = &self.fs_stats {
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
    mounts: Vec<MountedLayer>,
    /// Device number of our overlay at `mountpoint` (image mounts); its identity, so that only
    /// our own overlay is ever unmounted.
    overlay: Option<u64>,
    /// An open descriptor of our overlay's root: it pins the overlay's superblock, so its device
    /// number cannot be handed to another mount while we live (which makes `overlay` an identity).
    _overlay_pin: Option<std::fs::File>,
    store: Arc<ChunkStore>,
    stop: Arc<AtomicBool>,
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
        let tmp = self.dir.join("status.json.tmp");
        if std::fs::write(&tmp, serde_json::to_vec_pretty(&st).expect("serializable")).is_ok() {
            let _ = std::fs::rename(&tmp, self.dir.join("status.json"));
        }
    }

    /// Starts prefetch and background fill for every lazy layer. The prefetch runs while the
    /// mount is already in use: it fetches in first-open order, and a read of a file it has not
    /// reached yet joins the fetch in flight or fetches on demand, so waiting for it before
    /// reporting ready would only delay the container's start.
    fn start_fill(&self, serve: &ServeArgs) {
        let delay = Duration::from_secs_f64(serve.background_delay.max(0.0));
        for l in &self.layers {
            if let Some(f) = &l.fetcher {
                f.spawn_fill(l.prefetch_end, !serve.no_background, delay, self.stop.clone()).expect("spawning a thread");
            }
        }
    }

    /// Unmounts everything and stops background work.
    fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(dev) = self.overlay {
            let _ = lazyfs::detach_if(&self.mountpoint, dev);
        }
        for l in &self.layers {
            if let Some(f) = &l.fetcher {
                f.close();
            }
        }
        for m in self.mounts.drain(..) {
            if let Err(e) = m.unmount() {
                warn!(error = %e, "unmount");
            }
        }
        // A newer daemon for the same mount point (after a restart) owns the record now.
        if self.owns_record() {
            self.write_status();
            let _ = std::fs::remove_file(self.dir.join("record.json"));
        }
    }

    /// Whether `record.json` is this process's (not a newer daemon's at the same path).
    fn owns_record(&self) -> bool {
        let me = std::process::id();
        std::fs::read(self.dir.join("record.json")).ok().and_then(|b| serde_json::from_slice::<Record>(&b).ok()).is_some_and(|r| r.pid == me && (r.start_ticks.is_none() || r.start_ticks == start_ticks(me)))
    }
}

/// Where layers' footers and TOCs are cached (`store::tails`), shared by the snapshotter, which
/// reads them ahead, and the layer daemons.
pub fn tails_dir(state: &Path) -> PathBuf {
    state.join("tails")
}

/// Where a layer's chunk references live (`STATE/refs/<blob hex>`): one line per stored item,
/// `c <digest>` for a chunk, `o <digest>` for a file object. The snapshotter's cache GC keeps
/// exactly what the layers still in use reference.
pub fn refs_path(state: &Path, blob_digest: &str) -> PathBuf {
    state.join("refs").join(blob_digest.trim_start_matches("sha256:"))
}

/// Reads a layer's chunk references.
pub fn read_refs(state: &Path, blob_digest: &str) -> Option<Vec<(bool, Digest)>> {
    let text = std::fs::read_to_string(refs_path(state, blob_digest)).ok()?;
    Some(
        text.lines()
            .filter_map(|l| {
                let (kind, d) = l.split_once(' ')?;
                Some((kind == "o", d.parse().ok()?))
            })
            .collect(),
    )
}

fn write_refs(state: &Path, blob_digest: &str, fetcher: &LayerFetcher) -> Result<()> {
    let p = refs_path(state, blob_digest);
    if p.exists() {
        return Ok(());
    }
    let mut lines: Vec<String> = fetcher
        .chunks()
        .iter()
        .filter_map(|c| match (&c.slot, c.digest) {
            (Some(slot), _) => Some(format!("o {}", slot.file)),
            (None, Some(d)) => Some(format!("c {d}")),
            _ => None,
        })
        .collect();
    lines.sort();
    lines.dedup();
    std::fs::create_dir_all(p.parent().expect("has a parent"))?;
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, lines.join("\n") + "\n")?;
    std::fs::rename(&tmp, &p)?;
    Ok(())
}

/// Mounts one opened layer with FUSE at `at` (its prefetch starts with the fill, after the mount).
fn serve_layer(opened: lazyfs::OpenedLayer, at: &Path, serve: &ServeArgs, index: usize, digest: &str, blob_bytes: u64) -> Result<(ServedLayer, MountedLayer)> {
    let fetcher = opened.fetcher.clone();
    let mut prefetch_end = None;
    if serve.fetch_all {
        fetcher.fetch_all()?;
    } else if !serve.no_prefetch {
        prefetch_end = lazyfs::prefetch_end(&opened.view, &fetcher, serve.prefetch_small_layers);
    }
    let fs = LayerFs::new(opened.view.clone(), fetcher.clone(), FsOptions {
        passthrough: !serve.no_passthrough,
        ..FsOptions::default()
    });
    let fs_stats = fs.stats.clone();
    std::fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
    let mounted = lazyfs::mount_layer(fs, at, &format!("lazypull:{digest}"), serve.threads, serve.privileges())?;
    Ok((
        ServedLayer {
            index,
            digest: digest.to_string(),
            blob_bytes,
            fetcher: Some(fetcher),
            prefetch_end,
            fs_stats: Some(fs_stats),
            fallback_reason: None,
        },
        mounted,
    ))
}

/// Serves until unmounted or signalled.
fn run_served(served: Served, serve: &ServeArgs, ready_line: String) -> Result<()> {
    let record = Record {
        pid: std::process::id(),
        mountpoint: served.mountpoint.clone(),
        source: served.source.clone(),
        layer_mounts: served.mounts.iter().map(|m| m.mountpoint().to_path_buf()).filter(|p| *p != served.mountpoint).collect(),
        overlay: served.overlay.is_some(),
        dev: served.overlay.or_else(|| served.mounts.iter().find(|m| m.mountpoint() == served.mountpoint).map(|m| m.dev())),
        start_ticks: start_ticks(std::process::id()),
    };
    // Atomically: `status`, `umount` and an old daemon on its way out read it concurrently.
    let tmp = served.dir.join(format!("record.json.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&record)?)?;
    std::fs::rename(&tmp, served.dir.join("record.json"))?;
    served.write_status();
    served.start_fill(serve);
    let term = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        signal_flag(sig, &term);
    }
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
        if served.mounts.iter().any(|m| m.is_finished()) || overlay_gone {
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
    let (layer, mounted) = serve_layer(opened, &args.mountpoint, &args.serve, 0, &name, size)?;
    let served = Served {
        source: name.clone(),
        mountpoint: args.mountpoint.clone(),
        dir: mount_dir(&args.serve.state_dir, &args.mountpoint),
        layers: vec![layer],
        mounts: vec![mounted],
        overlay: None,
        _overlay_pin: None,
        store,
        stop: Arc::new(AtomicBool::new(false)),
        started: Instant::now(),
    };
    std::fs::create_dir_all(&served.dir)?;
    run_served(served, &args.serve, format!("mounted {name} at {}", args.mountpoint.display()))
}

/// `lazypull mount REF MOUNTPOINT`.
pub fn image_mount(args: MountArgs) -> Result<()> {
    if !args.serve.foreground {
        return daemonize(&args.serve, &args.mountpoint);
    }
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let client = args.registry.client()?;
    let location = convert::parse_location(&args.reference, &client)?;
    let convert::Store::Registry { reference, .. } = &location else { bail!("mount needs a registry reference, not an OCI layout") };
    let manifest = match (&args.layer_digest, args.layer_size, &args.index_check) {
        // Everything needed is known: a one-layer manifest, no round trip to the registry.
        (Some(digest), Some(size), Some(check)) => {
            let mut layer = registry::Descriptor::new(registry::manifest::OCI_LAYER_GZIP, digest.clone(), size);
            let (key, value) = match layer::IndexCheck::parse(check)? {
                layer::IndexCheck::TocDigest(d) => (estargz::toc::TOC_DIGEST_ANNOTATION, d),
                layer::IndexCheck::ZstdManifestChecksum(d) => (estargz::toc::ZSTD_MANIFEST_CHECKSUM_ANNOTATION, d),
            };
            layer.annotations.insert(key.to_string(), value.to_string());
            registry::Manifest {
                schema_version: 2,
                media_type: None,
                artifact_type: None,
                config: registry::Descriptor::new(registry::manifest::DOCKER_CONFIG, String::new(), 0),
                layers: vec![layer],
                subject: None,
                annotations: Default::default(),
                extra: Default::default(),
            }
        }
        _ => rt.block_on(async {
            let (_, root, _) = location.root().await?;
            crate::image::select_manifest(&location, root, args.platform.as_deref()).await
        })?,
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
    let store = open_store(&args.serve)?;
    let dir = mount_dir(&args.serve.state_dir, &args.mountpoint);
    std::fs::create_dir_all(&dir)?;
    let single = indices.len() == 1;
    let mut layers = Vec::new();
    let mut mounts = Vec::new();
    let mut lowers = Vec::new();
    for &i in &indices {
        let d = &manifest.layers[i];
        // The one decision every caller shares (layer crate): lazy, and checked how, or why not.
        let lazy = match layer::detect(&d.media_type, &d.annotations) {
            Ok(found) => {
                let source: Arc<dyn RangeSource> = Arc::new(RegistryRangeSource::new(
                    client.clone(),
                    reference.clone(),
                    d.digest.clone(),
                    d.size,
                    rt.handle().clone(),
                    Duration::from_secs(args.serve.fetch_timeout.max(1)),
                ));
                let tails = store::TailCache::new(tails_dir(&args.serve.state_dir));
                lazyfs::open_layer_cached(source, Some(&found.check), store.clone(), fetch_config(&args.serve), &tails).map_err(|e| layer::NotLazy::IndexUnusable(format!("{e}")))
            }
            Err(reason) => Err(reason),
        };
        match lazy {
            Ok(opened) => {
                let at = if single { args.mountpoint.clone() } else { dir.join("layers").join(i.to_string()) };
                // Registry layers only: a local blob has no digest to key its references by.
                if let Err(e) = write_refs(&args.serve.state_dir, &d.digest, &opened.fetcher) {
                    warn!(layer = i, error = %e, "cannot record the layer's chunk references (cache GC will not see them)");
                }
                let (l, m) = serve_layer(opened, &at, &args.serve, i, &d.digest, d.size)?;
                layers.push(l);
                lowers.push(at);
                mounts.push(m);
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
                    fetcher: None,
                    prefetch_end: None,
                    fs_stats: None,
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
        mounts,
        overlay,
        _overlay_pin: overlay_pin,
        store,
        stop: Arc::new(AtomicBool::new(false)),
        started,
    };
    let line = format!(
        "mounted {} ({} layer{}, {} lazy) at {} in {:.2} s",
        args.reference,
        indices.len(),
        if single { "" } else { "s" },
        served.layers.iter().filter(|l| l.fetcher.is_some()).count(),
        args.mountpoint.display(),
        started.elapsed().as_secs_f64()
    );
    let res = run_served(served, &args.serve, line);
    drop(rt);
    res
}

fn read_record(state: &Path, mountpoint: &Path) -> Result<(PathBuf, Record)> {
    let dir = mount_dir(state, mountpoint);
    let p = dir.join("record.json");
    let bytes = std::fs::read(&p).with_context(|| format!("no lazypull mount recorded at {} ({} missing)", mountpoint.display(), p.display()))?;
    Ok((dir, serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display()))?))
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// `lazypull umount MOUNTPOINT`.
pub fn umount(mountpoint: &Path, state: &Path) -> Result<()> {
    let (dir, rec) = read_record(state, mountpoint)?;
    // A FUSE mount whose daemon died answers ENOTCONN; with the recorded daemon dead, that
    // dead mount at the recorded path is the one it left.
    let dead_mount = |p: &Path| is_mountpoint(p) && std::fs::symlink_metadata(p).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN));
    match rec.dev {
        Some(dev) => {
            if !lazyfs::detach_if(&rec.mountpoint, dev)? && !rec.daemon_alive() && dead_mount(&rec.mountpoint) {
                lazyfs::detach(&rec.mountpoint)?;
            }
        }
        // A record from before identities were kept.
        None if is_mountpoint(&rec.mountpoint) => lazyfs::detach(&rec.mountpoint)?,
        None => {}
    }
    if rec.daemon_alive() {
        // SAFETY: plain signal delivery to the daemon we started (pid and start time checked).
        unsafe { libc::kill(rec.pid as libc::pid_t, libc::SIGTERM) };
        let t = Instant::now();
        while rec.daemon_alive() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if rec.daemon_alive() {
            warn!(pid = rec.pid, "daemon did not exit; killing it");
            // SAFETY: as above.
            unsafe { libc::kill(rec.pid as libc::pid_t, libc::SIGKILL) };
            let t = Instant::now();
            while rec.daemon_alive() && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    } else {
        // The daemon died without cleaning up: its record is stale.
        let _ = std::fs::remove_file(dir.join("record.json"));
    }
    // Layer mounts of an image's overlay: only while their daemon is gone (it detaches its
    // own on the way out; what is left at those paths of a dead daemon is dead too).
    for m in &rec.layer_mounts {
        if is_mountpoint(m) && std::fs::read_dir(m).is_err() {
            let _ = lazyfs::detach(m);
        }
    }
    println!("unmounted {}", rec.mountpoint.display());
    Ok(())
}

/// `lazypull status MOUNTPOINT`.
pub fn status(mountpoint: &Path, state: &Path, json: bool) -> Result<()> {
    let dir = mount_dir(state, mountpoint);
    let p = dir.join("status.json");
    let bytes = std::fs::read(&p).with_context(|| format!("no status for {} ({} missing)", mountpoint.display(), p.display()))?;
    let st: MountStatus = serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display()))?;
    // A daemon that crashed leaves its files behind: say so instead of showing it as running.
    let running = std::fs::read(dir.join("record.json")).ok().and_then(|b| serde_json::from_slice::<Record>(&b).ok()).is_some_and(|r| r.pid == st.pid && r.daemon_alive());
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
