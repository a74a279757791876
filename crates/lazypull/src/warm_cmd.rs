//! `lazypull warm`: pre-pull images into a running node and fill its chunk store, so that
//! containers of those images start with no registry request for the warmed bytes.
//!
//! Each image is pulled through containerd with our snapshotter (`rpull`: remote snapshots
//! where a layer is lazy, unpacked otherwise) and labelled for CRI (`io.cri-containerd.image=
//! managed`, so kubelet sees it as present, and `io.cri-containerd.pinned=pinned`, which
//! containerd 1.7+ reports to kubelet as pinned: image GC leaves it alone). Then the chunks the
//! mode asks for ([`warm::plan`]) are fetched into the node's store: the same store, keyed the
//! same way, as the snapshotter's layer daemons use (their settings come from the
//! `serve.json` the snapshotter writes at start), so a warmed chunk is found by every daemon.
//! Already stored chunks are not fetched again: warming is idempotent and resumes where an
//! interrupted run stopped. An image that fails is reported and the others are still warmed.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::image::RegistryArgs;
use crate::image_layers::{open_lazy, ImageLayers, OpenAt};
use crate::mount::ServeArgs;

/// Chunks fetched per request to the fetcher (bounds the memory a fill holds).
const FILL_BATCH: usize = 64;

#[derive(Args)]
pub struct WarmArgs {
    /// Image references, e.g. registry.example.com/app:1.
    #[arg(required = true)]
    pub(crate) references: Vec<String>,
    /// Every chunk of every lazy layer (the default).
    #[arg(long, conflicts_with_all = ["prioritized", "budget"])]
    pub(crate) full: bool,
    /// Only the chunks of prioritized files (eStargz `.prefetch.landmark`) and of `--files`.
    #[arg(long, conflicts_with = "budget")]
    pub(crate) prioritized: bool,
    /// At most this many stored bytes over all images: prioritized and recorded files first,
    /// then in image order.
    #[arg(long, value_name = "BYTES")]
    pub(crate) budget: Option<u64>,
    /// Paths a recording run opened (one per line, e.g. the `opened_files` of `lazypull status`),
    /// counted as prioritized in every layer that has them.
    #[arg(long, value_name = "FILE")]
    pub(crate) files: Option<PathBuf>,
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock", value_name = "SOCKET")]
    pub(crate) address: PathBuf,
    /// containerd namespace (CRI's is k8s.io).
    #[arg(long, short = 'n', default_value = "k8s.io")]
    pub(crate) namespace: String,
    /// Snapshotter (proxy plugin name) that mounts layers lazily.
    #[arg(long, default_value = "lazypull")]
    pub(crate) snapshotter: String,
    /// The snapshotter's root (its `root` setting): where its store and settings are.
    #[arg(long, default_value = "/var/lib/lazypull/snapshotter", value_name = "DIR")]
    pub(crate) root: PathBuf,
    /// Do not label the images for CRI (`io.cri-containerd.image=managed`, `…pinned=pinned`).
    #[arg(long)]
    pub(crate) no_cri_labels: bool,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
}

/// One image's lazy layers, opened over the node's store.
struct Pulled {
    reference: String,
    manifest_digest: String,
    layers: Vec<(String, lazyfs::OpenedLayer)>,
    not_lazy: usize,
}

/// What warming did to one image (what `bake` records in a volume's manifest).
pub(crate) struct Warmed {
    pub reference: String,
    pub manifest_digest: String,
    pub lazy_layers: Vec<warm::VolumeLayer>,
    pub unpacked_layers: usize,
}

pub fn run(a: WarmArgs) -> Result<()> {
    warm_images(&a).map(|_| ())
}

/// Warms every image of `a`, printing one summary line per image; the images warmed, or an
/// error naming the ones that were not (after trying all of them).
pub(crate) fn warm_images(a: &WarmArgs) -> Result<Vec<Warmed>> {
    let mode = match (a.prioritized, a.budget) {
        (true, _) => warm::Mode::Prioritized,
        (_, Some(b)) => warm::Mode::Budget(b),
        _ => warm::Mode::Full,
    };
    let recorded: Vec<String> = match &a.files {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect(),
        None => Vec::new(),
    };
    let serve_json = a.root.join("layers").join("serve.json");
    if !serve_json.exists() {
        bail!("{} does not exist: start `lazypull snapshotter` (with root {}) first; warm fills the store its layer daemons use", serve_json.display(), a.root.display());
    }
    let serve = ServeArgs::load(&serve_json, true)?;
    let store = crate::mount::open_store(&serve)?;
    let client = a.registry.client()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut pulled = Vec::new();
    for reference in &a.references {
        match pull_and_open(a, &rt, &client, &serve, &store, reference) {
            Ok(p) => pulled.push(p),
            Err(e) => {
                eprintln!("{reference}: not warmed: {e:#}");
                failed.push(reference.clone());
            }
        }
    }
    let inputs: Vec<warm::LayerInput> = pulled.iter().flat_map(|p| p.layers.iter()).map(|(_, l)| warm::LayerInput { index: &l.view.index, recorded: &recorded }).collect();
    let plan = warm::plan(&inputs, mode);
    if serve.cache_size != 0 && plan.bytes > serve.cache_size {
        eprintln!(
            "warning: {} bytes to warm exceed the node's cache_size of {} bytes: the least recently used chunks will be evicted again",
            plan.bytes, serve.cache_size
        );
    }
    let bar = if std::io::stderr().is_terminal() { ProgressBar::new(plan.bytes) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})").unwrap_or_else(|_| ProgressStyle::default_bar()));
    let mut planned = plan.layers.iter();
    let settle_timeout = Duration::from_secs(serve.fetch_timeout.max(1) * 2);
    let mut warmed = Vec::new();
    for p in &pulled {
        let t0 = Instant::now();
        let (mut chunks, mut bytes, mut hot, mut errors) = (0usize, 0u64, 0usize, Vec::new());
        let mut layers = Vec::new();
        let lazy_bytes: u64 = p.layers.iter().map(|(_, l)| l.fetcher.chunks().iter().map(|c| c.size).sum::<u64>()).sum();
        for (digest, layer) in &p.layers {
            let want = planned.next().expect("one planned layer per opened layer");
            bar.set_message(format!("{} {}", p.reference, short(digest)));
            for batch in want.chunks.chunks(FILL_BATCH) {
                match layer.fetcher.get_many(batch, false) {
                    Ok(_) => {
                        let b: u64 = batch.iter().map(|&i| layer.fetcher.chunks()[i].size).sum();
                        bar.inc(b);
                    }
                    Err(e) => {
                        errors.push(format!("layer {digest}: {e}"));
                        break;
                    }
                }
            }
            // The last batch's chunks are stored on a helper thread: wait for it.
            if !layer.fetcher.wait_settled(settle_timeout) {
                errors.push(format!("layer {digest}: chunks still being stored after {} s", settle_timeout.as_secs()));
            }
            chunks += want.chunks.len();
            bytes += want.bytes;
            layers.push(warm::VolumeLayer {
                digest: digest.clone(),
                chunks: layer.fetcher.chunks().len(),
                stored_chunks: want.chunks.len(),
                bytes: layer.fetcher.chunks().iter().map(|c| c.size).sum(),
                stored_bytes: want.bytes,
            });
            hot += want.hot_chunks;
            layer.fetcher.close();
        }
        let pct = if lazy_bytes == 0 { 100.0 } else { bytes as f64 * 100.0 / lazy_bytes as f64 };
        let fetched: u64 = p.layers.iter().map(|(_, l)| l.fetcher.stats.fetched_bytes.load(std::sync::atomic::Ordering::Relaxed)).sum();
        bar.suspend(|| {
            println!(
                "{}: {} lazy layer{} ({} unpacked by containerd): {chunks} chunks, {bytes} bytes warmed ({pct:.1}% of the lazy layers; {hot} chunks prioritized or recorded), {fetched} bytes fetched from the registry, in {:.2} s",
                p.reference,
                p.layers.len(),
                if p.layers.len() == 1 { "" } else { "s" },
                p.not_lazy,
                t0.elapsed().as_secs_f64()
            )
        });
        for e in &errors {
            eprintln!("{}: {e}", p.reference);
        }
        if errors.is_empty() {
            warmed.push(Warmed { reference: p.reference.clone(), manifest_digest: p.manifest_digest.clone(), lazy_layers: layers, unpacked_layers: p.not_lazy });
        } else {
            failed.push(p.reference.clone());
        }
    }
    bar.finish_and_clear();
    println!("warmed {} of {} images, {} bytes planned, in {:.2} s", a.references.len() - failed.len(), a.references.len(), plan.bytes, started.elapsed().as_secs_f64());
    if !failed.is_empty() {
        bail!("not warmed: {}", failed.join(", "));
    }
    Ok(warmed)
}

fn short(digest: &str) -> &str {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    &hex[..hex.len().min(12)]
}

/// Pulls `reference` through containerd and opens each of its lazy layers over `store`.
fn pull_and_open(a: &WarmArgs, rt: &tokio::runtime::Runtime, client: &registry::Client, serve: &ServeArgs, store: &Arc<store::ChunkStore>, reference: &str) -> Result<Pulled> {
    let mut opts = rpull::PullOptions { snapshotter: a.snapshotter.clone(), ..Default::default() };
    if !a.no_cri_labels {
        opts.image_labels = HashMap::from([
            ("io.cri-containerd.image".to_string(), "managed".to_string()),
            ("io.cri-containerd.pinned".to_string(), "pinned".to_string()),
        ]);
    }
    let report = rt
        .block_on(async {
            let ctd = rpull::containerd::Containerd::new(containerd_api::unix_channel(&a.address), &a.namespace);
            rpull::pull(client, &ctd, reference, &opts).await
        })
        .with_context(|| format!("pulling through containerd at {}", a.address.display()))?;
    let location = convert::parse_location(reference, client)?;
    let convert::Store::Registry { reference: parsed, .. } = &location else { bail!("warm needs a registry reference, not an OCI layout") };
    let (manifest, digest) = rt.block_on(async {
        let (_, root, digest) = location.root().await?;
        crate::image::select_manifest_with_digest(&location, root, &digest, None).await
    })?;
    let mut image = ImageLayers::new(&location, &manifest, &digest, None);
    let at = OpenAt {
        rt,
        client,
        reference: parsed,
        store,
        fetch: crate::mount::fetch_config(serve),
        state_dir: &serve.state_dir,
        fetch_timeout: Duration::from_secs(serve.fetch_timeout.max(1)),
    };
    let mut layers = Vec::new();
    let mut not_lazy = 0;
    for d in &manifest.layers {
        match image.check(rt, d).and_then(|check| open_lazy(&at, &location, d, check)) {
            Ok(opened) => {
                // The daemons record the same; GC on image removal then sees the warmed chunks.
                crate::mount::write_refs(&serve.state_dir, &d.digest, &opened.fetcher)?;
                layers.push((d.digest.clone(), opened));
            }
            Err(reason) => {
                tracing::info!(image = %reference, layer = %d.digest, %reason, "not lazy: containerd holds it unpacked");
                not_lazy += 1;
            }
        }
    }
    let remote = report.remote_layers();
    if remote < layers.len() {
        tracing::warn!(image = %reference, remote, lazy = layers.len(), "containerd unpacked layers the snapshotter could have served lazily (see its log)");
    }
    Ok(Pulled { reference: reference.to_string(), manifest_digest: digest.clone(), layers, not_lazy })
}
