//! `lazypull image …`: whole-image conversion and inspection (registry or `oci:DIR[:TAG]`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use convert::{ConvertOptions, Event, Store};
use estargz::Compression;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use registry::manifest::{self, ManifestKind, Platform};
use registry::{Client, Credentials, RegistryConfig};

#[derive(Args, Clone)]
pub struct RegistryArgs {
    /// Registry hosts to reach over plain HTTP (loopback hosts always are).
    #[arg(long = "plain-http", value_name = "HOST")]
    plain_http: Vec<String>,
    /// Registry configuration (mirrors, retries, timeouts; TOML).
    #[arg(long, value_name = "FILE")]
    registry_config: Option<PathBuf>,
    /// Docker config.json to take credentials from (default: $DOCKER_CONFIG or ~/.docker).
    #[arg(long, value_name = "FILE")]
    docker_config: Option<PathBuf>,
}

impl RegistryArgs {
    /// The same options as command-line arguments (for daemons started by the snapshotter).
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut out: Vec<std::ffi::OsString> = Vec::new();
        for h in &self.plain_http {
            out.push("--plain-http".into());
            out.push(h.into());
        }
        if let Some(p) = &self.registry_config {
            out.push("--registry-config".into());
            out.push(p.into());
        }
        if let Some(p) = &self.docker_config {
            out.push("--docker-config".into());
            out.push(p.into());
        }
        out
    }

    pub fn client(&self) -> Result<Client> {
        self.client_with(None)
    }

    /// The client, asking `source` first for each repository's credentials (the CRI pull
    /// credentials the snapshotter keeps, directly or through its broker socket).
    pub fn client_with(&self, source: Option<std::sync::Arc<dyn registry::CredentialSource>>) -> Result<Client> {
        let mut cfg = match &self.registry_config {
            Some(p) => RegistryConfig::load(p)?,
            None => RegistryConfig::default(),
        };
        for h in &self.plain_http {
            cfg = cfg.plain_http(h);
        }
        let mut creds = match &self.docker_config {
            Some(p) => Credentials::from_docker_config(p),
            None => Credentials::from_environment(),
        };
        if let Some(source) = source {
            creds = creds.with_source(source);
        }
        Ok(Client::new(cfg, creds)?)
    }
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Convert an image to eStargz (default) or zstd:chunked; SRC/DST are references or oci:DIR[:TAG].
    Convert {
        src: String,
        dst: String,
        #[arg(long, conflicts_with = "zstdchunked")]
        estargz: bool,
        #[arg(long)]
        zstdchunked: bool,
        /// Files to place first (JSON lines {"path": ...} or one path per line).
        #[arg(long)]
        prioritize: Option<PathBuf>,
        /// Platform(s) to convert from an index (os/arch[/variant]); default: this machine's.
        #[arg(long = "platform")]
        platforms: Vec<String>,
        #[arg(long)]
        all_platforms: bool,
        #[arg(long, default_value_t = estargz::toc::DEFAULT_CHUNK_SIZE)]
        chunk_size: u64,
        #[arg(long)]
        level: Option<u32>,
        /// Layers processed at once.
        #[arg(long, default_value_t = 2)]
        parallel_layers: usize,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Copy an image unchanged (same digests) between registries and OCI layouts.
    Copy {
        src: String,
        dst: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Show an image's manifest, config and layers, and whether each layer can be lazily pulled.
    Inspect {
        reference: String,
        #[arg(long = "platform")]
        platform: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

pub fn run(cmd: ImageCommand) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        match cmd {
            ImageCommand::Copy { src, dst, registry } => {
                let client = registry.client()?;
                let (src, dst) = (convert::parse_location(&src, &client)?, convert::parse_location(&dst, &client)?);
                let digest = convert::copy_image(&src, &dst).await?;
                println!("copied {src} -> {dst} ({digest})");
                Ok(())
            }
            ImageCommand::Convert {
                src,
                dst,
                estargz: _,
                zstdchunked,
                prioritize,
                platforms,
                all_platforms,
                chunk_size,
                level,
                parallel_layers,
                registry,
            } => {
                let client = registry.client()?;
                let src = convert::parse_location(&src, &client)?;
                let dst = convert::parse_location(&dst, &client)?;
                let opts = ConvertOptions {
                    compression: if zstdchunked { Compression::Zstd } else { Compression::Gzip },
                    chunk_size,
                    level,
                    prioritized: match prioritize {
                        Some(p) => crate::layer::read_prioritized(&p)?,
                        None => Vec::new(),
                    },
                    platforms: platforms.iter().map(|p| Platform::parse(p)).collect::<Result<_, _>>()?,
                    all_platforms,
                    parallel_layers,
                };
                convert_cmd(&src, &dst, &opts).await
            }
            ImageCommand::Inspect { reference, platform, registry } => {
                let client = registry.client()?;
                let store = convert::parse_location(&reference, &client)?;
                inspect(&store, platform.as_deref()).await
            }
        }
    })
}

fn short(d: &str) -> &str {
    d.strip_prefix("sha256:").map_or(d, |h| &h[..12.min(h.len())])
}

async fn convert_cmd(src: &Store, dst: &Store, opts: &ConvertOptions) -> Result<()> {
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let bars: Arc<Mutex<std::collections::HashMap<String, ProgressBar>>> = Arc::default();
    let progress: convert::Progress = Arc::new(move |e: Event| {
        if !tty {
            match &e {
                Event::LayerStart { digest, size } => eprintln!("layer {} ({size} bytes): fetching", short(digest)),
                Event::LayerFetched { digest } => eprintln!("layer {}: converting", short(digest)),
                Event::LayerConverted { digest, new_digest, uncompressed, size, seconds } => eprintln!(
                    "layer {}: converted to {} ({uncompressed} bytes uncompressed, {size} bytes, {seconds:.2}s, {:.1} MB/s)",
                    short(digest),
                    short(new_digest),
                    *uncompressed as f64 / 1e6 / seconds.max(1e-9)
                ),
                Event::LayerKept { digest, reason } => eprintln!("layer {}: kept ({reason})", short(digest)),
                Event::LayerStored { digest } => eprintln!("blob {}: stored", short(digest)),
                Event::ManifestStored { digest, platform } => {
                    eprintln!("manifest {}{}: stored", short(digest), platform.as_ref().map(|p| format!(" ({p})")).unwrap_or_default())
                }
            }
            return;
        }
        let mut bars = bars.lock().expect("progress bars");
        let style = ProgressStyle::with_template("{spinner} {prefix} {elapsed:>4} {msg}").expect("template");
        match e {
            Event::LayerStart { digest, size } => {
                let b = multi.add(ProgressBar::new_spinner().with_style(style).with_prefix(short(&digest).to_string()));
                b.set_message(format!("fetching {:.1} MB", size as f64 / 1e6));
                b.enable_steady_tick(std::time::Duration::from_millis(120));
                bars.insert(digest, b);
            }
            Event::LayerFetched { digest } => {
                if let Some(b) = bars.get(&digest) {
                    b.set_message("converting");
                }
            }
            Event::LayerConverted { digest, new_digest, uncompressed, size, seconds } => {
                if let Some(b) = bars.get(&digest) {
                    b.set_message(format!("-> {} {:.1} MB ({:.1} MB/s), storing", short(&new_digest), size as f64 / 1e6, uncompressed as f64 / 1e6 / seconds.max(1e-9)));
                }
            }
            Event::LayerKept { digest, reason } => {
                if let Some(b) = bars.get(&digest) {
                    b.finish_with_message(format!("kept: {reason}"));
                }
            }
            Event::LayerStored { digest } => {
                if let Some((_, b)) = bars.iter().find(|(k, b)| **k == digest || b.message().contains(short(&digest))) {
                    b.finish_with_message(format!("{} stored", b.message().trim_end_matches(", storing")));
                }
            }
            Event::ManifestStored { .. } => {}
        }
    });
    let report = convert::convert_image(src, dst, opts, progress).await.with_context(|| format!("converting {src} to {dst}"))?;
    println!(
        "{dst}@{}: {} manifest(s), {} layer(s) converted, {} kept; {:.1} MB in, {:.1} MB out; {:.2}s",
        report.digest,
        report.manifests,
        report.layers_converted,
        report.layers_kept,
        report.bytes_in as f64 / 1e6,
        report.bytes_out as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The image manifest of `root` for `platform` (default: this host's), following an index.
pub async fn select_manifest(store: &Store, root: ManifestKind, platform: Option<&str>) -> Result<registry::Manifest> {
    Ok(select_manifest_with_digest(store, root, "", platform).await?.0)
}

/// [`select_manifest`] and the selected manifest's digest (`root_digest` when the root is one).
pub async fn select_manifest_with_digest(store: &Store, root: ManifestKind, root_digest: &str, platform: Option<&str>) -> Result<(registry::Manifest, String)> {
    match root {
        ManifestKind::Image(m) => Ok((m, root_digest.to_owned())),
        ManifestKind::Index(i) => {
            let want = match platform {
                Some(p) => Platform::parse(p)?,
                None => Platform::host(),
            };
            let d = manifest::select_platform(&i, &want, &store.to_string())?;
            match store.manifest(&d.digest).await?.1 {
                ManifestKind::Image(m) => Ok((m, d.digest.clone())),
                ManifestKind::Index(_) => anyhow::bail!("nested index {} is not supported", d.digest),
            }
        }
    }
}

async fn inspect(store: &Store, platform: Option<&str>) -> Result<()> {
    let (_, root, digest) = store.root().await?;
    println!("image:    {store}");
    println!("digest:   {digest}");
    if let ManifestKind::Index(i) = &root {
        println!("index:    {} ({} manifests)", i.media_type.as_deref().unwrap_or(manifest::OCI_INDEX), i.manifests.len());
        for d in &i.manifests {
            println!("  {} {}", d.digest, d.platform.as_ref().map(|p| p.to_string()).unwrap_or_else(|| "(no platform)".into()));
        }
    }
    let m = select_manifest(store, root, platform).await?;
    println!("manifest: {}", m.media_type.as_deref().unwrap_or(manifest::OCI_MANIFEST));
    println!("config:   {} ({} bytes)", m.config.digest, m.config.size);
    let lazy = m.layers.iter().filter(|l| convert::is_lazy_layer(l)).count();
    println!("layers:   {} ({} lazily pullable)", m.layers.len(), lazy);
    for (i, l) in m.layers.iter().enumerate() {
        let verdict = match layer::detect(&l.media_type, &l.annotations) {
            Ok(found) => match found.check {
                layer::IndexCheck::TocDigest(t) => format!("lazy: {}, toc {}", found.format, short(&t.to_string())),
                layer::IndexCheck::ZstdManifestChecksum(t) => format!("lazy: {}, manifest checksum {}", found.format, short(&t.to_string())),
                layer::IndexCheck::SociZtoc(t, _) => format!("lazy: {}, zTOC {}", found.format, short(&t.to_string())),
            },
            Err(reason) => format!("not lazy: {reason}"),
        };
        println!("  {i:>2} {} {:>12} {verdict}", l.digest, l.size);
    }
    Ok(())
}
