//! `lazypull soci …`: SOCI indexes for unmodified images (create v1, convert v2, inspect).

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use convert::Store;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use registry::manifest::Platform;
use soci_image::{CreateOptions, Event};

use crate::image::RegistryArgs;

#[derive(Args, Clone)]
pub struct IndexArgs {
    /// Uncompressed bytes between checkpoints (each span is fetched and verified as a unit).
    #[arg(long, default_value_t = soci::DEFAULT_SPAN_SIZE)]
    span_size: u64,
    /// Layers smaller than this get no zTOC (the snapshotter fetches them whole and indexes them itself).
    #[arg(long, default_value_t = soci_image::create::DEFAULT_MIN_LAYER_SIZE)]
    min_layer_size: u64,
    /// Platform(s) to index from an image index (os/arch[/variant]); default: this machine's.
    #[arg(long = "platform")]
    platforms: Vec<String>,
    #[arg(long)]
    all_platforms: bool,
    /// Layers indexed at once.
    #[arg(long, default_value_t = 2)]
    parallel_layers: usize,
    /// A file to prefetch when the image is mounted (repeatable): its spans go into a prefetch
    /// artifact of the topmost indexed layer holding it (upstream's experimental format).
    #[arg(long = "prefetch-file", value_name = "PATH")]
    prefetch_files: Vec<String>,
    /// A JSON array of paths to prefetch, as `--prefetch-file` each.
    #[arg(long, value_name = "FILE")]
    prefetch_files_json: Option<std::path::PathBuf>,
}

impl IndexArgs {
    fn options(&self) -> Result<CreateOptions> {
        if self.span_size == 0 {
            bail!("--span-size must be positive");
        }
        Ok(CreateOptions {
            span_size: self.span_size,
            min_layer_size: self.min_layer_size,
            platforms: self.platforms.iter().map(|p| Platform::parse(p)).collect::<Result<_, _>>()?,
            all_platforms: self.all_platforms,
            parallel_layers: self.parallel_layers,
            prefetch_files: self.prefetch_files()?,
            ..Default::default()
        })
    }

    fn prefetch_files(&self) -> Result<Vec<String>> {
        let mut files = self.prefetch_files.clone();
        if let Some(p) = &self.prefetch_files_json {
            let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let listed: Vec<String> = serde_json::from_slice(&text).with_context(|| format!("{}: not a JSON array of paths", p.display()))?;
            files.extend(listed);
        }
        Ok(files)
    }
}

#[derive(Subcommand)]
pub enum SociCommand {
    /// Build a SOCI index (v1) for an image and store it beside the image, found through the
    /// referrers API or its fallback tag; the image itself is not changed.
    Create {
        reference: String,
        #[command(flatten)]
        index: IndexArgs,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Copy an image to DST with a SOCI index v2 (annotated manifest under a new image index).
    Convert {
        src: String,
        dst: String,
        #[command(flatten)]
        index: IndexArgs,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Build the zTOC of local layer blobs (gzip or tar) into DIR/<layer file name>.ztoc, in
    /// parallel; prints each zTOC's digest, spans and files and the time taken.
    Ztoc {
        #[arg(required = true)]
        layers: Vec<std::path::PathBuf>,
        #[arg(long, short = 'o', value_name = "DIR")]
        output: std::path::PathBuf,
        #[arg(long, default_value_t = soci::DEFAULT_SPAN_SIZE)]
        span_size: u64,
    },
    /// Show the SOCI index of an image (how it was found) and each layer's zTOC.
    Inspect {
        reference: String,
        #[arg(long = "platform")]
        platform: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

pub fn run(cmd: SociCommand) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        match cmd {
            SociCommand::Create { reference, index, registry } => {
                let store = convert::parse_location(&reference, &registry.client()?)?;
                let started = Instant::now();
                let report = soci_image::create_v1(&store, &index.options()?, progress()).await?;
                for (manifest, idx) in &report.indexes {
                    println!("{manifest} -> SOCI index {idx}");
                }
                println!(
                    "indexed {} layers ({} skipped) of {store} in {:.1} s",
                    report.layers_indexed,
                    report.layers_skipped,
                    started.elapsed().as_secs_f64()
                );
            }
            SociCommand::Convert { src, dst, index, registry } => {
                let client = registry.client()?;
                let (src, dst) = (convert::parse_location(&src, &client)?, convert::parse_location(&dst, &client)?);
                let started = Instant::now();
                let report = soci_image::convert_v2(&src, &dst, &index.options()?, progress()).await?;
                println!(
                    "converted {src} -> {dst} ({}, {} layers indexed, {} skipped) in {:.1} s",
                    report.root.as_deref().unwrap_or("?"),
                    report.layers_indexed,
                    report.layers_skipped,
                    started.elapsed().as_secs_f64()
                );
            }
            SociCommand::Ztoc { layers, output, span_size } => build_local(&layers, &output, span_size)?,
            SociCommand::Inspect { reference, platform, registry } => {
                let store = convert::parse_location(&reference, &registry.client()?)?;
                inspect(&store, platform.as_deref()).await?;
            }
        }
        Ok(())
    })
}

async fn inspect(store: &Store, platform: Option<&str>) -> Result<()> {
    let (_, root, root_digest) = store.root().await?;
    let (m, digest) = crate::image::select_manifest_with_digest(store, root, &root_digest, platform).await?;
    println!("image:    {store}");
    println!("manifest: {digest}");
    let Some(found) = soci_image::discover(store, &digest, &m, None).await? else {
        println!("no SOCI index (none named by the manifest, none among its referrers)");
        return Ok(());
    };
    println!("index:    {} (v{}, found via {})", found.digest, if found.index.version == soci_image::IndexVersion::V1 { 1 } else { 2 }, found.via.as_str());
    for (i, l) in m.layers.iter().enumerate() {
        match found.index.ztoc_for(&l.digest) {
            None => println!("  layer {i} {} {:>11}  no zTOC (fetched whole; the snapshotter indexes it itself up to 16 MiB)", l.digest, l.size),
            Some(z) => {
                let bytes = store.blob_bytes(&z.ztoc_digest).await?;
                match soci::Ztoc::from_bytes(&bytes) {
                    Ok(ztoc) => {
                        println!(
                            "  layer {i} {} {:>11}  zTOC {} {} spans of {} B, {} files",
                            l.digest,
                            l.size,
                            z.ztoc_digest,
                            ztoc.spans.span_count(),
                            z.span_size,
                            ztoc.entries.len()
                        );
                        if let Some(p) = &z.prefetch {
                            println!("          prefetch {} {}", p.digest, describe_prefetch(store, &p.digest, &ztoc).await);
                        }
                    }
                    Err(e) => println!("  layer {i} {} {:>11}  zTOC {} unusable: {e}", l.digest, l.size, z.ztoc_digest),
                }
            }
        }
    }
    Ok(())
}

/// A prefetch artifact's span ranges, or why it is unusable.
async fn describe_prefetch(store: &Store, digest: &str, ztoc: &soci::Ztoc) -> String {
    let bytes = match store.blob_bytes(digest).await {
        Ok(b) => b,
        Err(e) => return format!("not fetched: {e}"),
    };
    match soci::PrefetchArtifact::parse(&bytes).and_then(|a| a.check(ztoc).map(|()| a)) {
        Ok(a) => {
            let ranges: Vec<String> = a.prefetch_spans.iter().map(|s| if s.start_span == s.end_span { s.start_span.to_string() } else { format!("{}-{}", s.start_span, s.end_span) }).collect();
            format!("spans {}", ranges.join(","))
        }
        Err(e) => format!("unusable: {e}"),
    }
}

fn build_local(layers: &[std::path::PathBuf], output: &std::path::Path, span_size: u64) -> Result<()> {
    std::fs::create_dir_all(output)?;
    let started = Instant::now();
    let opts = soci::BuildOptions { span_size, ..Default::default() };
    let results: Vec<Result<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = layers
            .iter()
            .map(|path| {
                let opts = opts.clone();
                s.spawn(move || -> Result<String> {
                    let t = Instant::now();
                    let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
                    let z = soci::build_ztoc(f, &opts).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    let bytes = z.to_bytes();
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "layer".into());
                    std::fs::write(output.join(format!("{name}.ztoc")), &bytes)?;
                    Ok(format!(
                        "{} -> {} ({} spans, {} files, {} B) in {:.2} s",
                        path.display(),
                        soci_image::manifest::sha256_digest(&bytes),
                        z.spans.span_count(),
                        z.entries.len(),
                        bytes.len(),
                        t.elapsed().as_secs_f64()
                    ))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("zTOC builder thread")).collect()
    });
    for r in results {
        println!("{}", r?);
    }
    println!("built {} zTOCs in {:.2} s", layers.len(), started.elapsed().as_secs_f64());
    Ok(())
}

/// A bar per layer on a terminal, one line per event otherwise.
fn progress() -> soci_image::Progress {
    let tty = std::io::stderr().is_terminal();
    let bars = MultiProgress::new();
    let active: Mutex<Vec<(String, ProgressBar)>> = Mutex::new(Vec::new());
    Arc::new(move |e: Event| match e {
        Event::LayerStart { digest, size } => {
            if tty {
                let pb = bars.add(ProgressBar::new_spinner());
                pb.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("template"));
                pb.set_message(format!("indexing {} ({size} B)", short(&digest)));
                pb.enable_steady_tick(std::time::Duration::from_millis(120));
                active.lock().unwrap().push((digest, pb));
            } else {
                eprintln!("indexing {digest} ({size} B)");
            }
        }
        Event::LayerIndexed { digest, ztoc, spans, files, seconds } => {
            let line = format!("{} -> zTOC {} ({spans} spans, {files} files) in {seconds:.1} s", short(&digest), short(&ztoc));
            let mut a = active.lock().unwrap();
            match a.iter().position(|(d, _)| *d == digest) {
                Some(i) => a.remove(i).1.finish_with_message(line),
                None => eprintln!("{line}"),
            }
        }
        Event::LayerSkipped { digest, reason } => eprintln!("{} skipped: {}", short(&digest), reason.as_str()),
        Event::PrefetchStored { digest, artifact, files, spans } => eprintln!("{} prefetch artifact {} ({files} files, {spans} spans)", short(&digest), short(&artifact)),
        Event::IndexStored { manifest, index, platform } => {
            eprintln!("SOCI index {} for {}{}", short(&index), short(&manifest), platform.map(|p| format!(" ({p})")).unwrap_or_default())
        }
    })
}

fn short(d: &str) -> String {
    d.chars().take(19).collect()
}
