//! `lazypull bake`: build a portable node cache volume, and `lazypull bake verify` it.
//!
//! The volume is what a node's disks would hold after `lazypull warm`: containerd's root
//! (`containerd/`: content, metadata) and lazypull's snapshotter root (`lazypull/`: snapshots,
//! chunk store, refs, cached TOCs), plus `lazypull-volume.json` saying what is inside. It is made
//! by running `warm` against a private containerd and snapshotter whose roots *are* those
//! directories ([`crate::bake_node`]), so the volume holds exactly what that containerd and
//! lazypull write on a node, and a node that mounts it (or points its roots at it) starts with
//! the images present and their warmed chunks local. As an ext4 image (`FILE.img`, made with
//! `mkfs.ext4 -d`) it can be written to a block device or an EBS snapshot as is.
//!
//! Why the chunk store and not just unpacked layers (the Bottlerocket recipe): chunks are the
//! lazy layers' own cache, so a volume may hold only the hot part of many images (`--budget`)
//! and the node fetches the rest lazily; and every chunk carries its digest, so `bake verify`
//! (and the node on every read) can tell a damaged volume from a good one.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use sha2::Digest as _;
use warm::volume::{self, VolumeManifest};

use crate::bake_node::{BakeNode, NodeSpec};
use crate::image::RegistryArgs;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BakeCommand {
    #[command(subcommand)]
    sub: Option<BakeSub>,
    #[command(flatten)]
    bake: BakeArgs,
}

#[derive(Subcommand)]
enum BakeSub {
    /// Re-check every content blob and chunk of a volume (directory or ext4 image) against its
    /// digest and name each one that is wrong.
    Verify {
        volume: PathBuf,
    },
}

#[derive(Args)]
pub struct BakeArgs {
    /// Image references to put into the volume.
    references: Vec<String>,
    /// The volume: a directory, or an ext4 image file if the name ends in `.img`.
    #[arg(long, short = 'o', value_name = "DIR|FILE.img")]
    output: Option<PathBuf>,
    /// Every chunk of every lazy layer (the default).
    #[arg(long, conflicts_with_all = ["prioritized", "budget"])]
    full: bool,
    /// Only the chunks of prioritized files (eStargz `.prefetch.landmark`) and of `--files`.
    #[arg(long, conflicts_with = "budget")]
    prioritized: bool,
    /// At most this many chunk bytes over all images: prioritized and recorded files first, then
    /// in image order. The rest stays lazy (fetched from the registry on the node).
    #[arg(long, value_name = "BYTES")]
    budget: Option<u64>,
    /// Paths a recording run opened (one per line), counted as prioritized.
    #[arg(long, value_name = "FILE")]
    files: Option<PathBuf>,
    /// Snapshotter settings (the node's `snapshotter.toml`); bake turns background fill and
    /// prefetch off so that the volume holds exactly what the mode asks for.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// containerd namespace (CRI's is k8s.io).
    #[arg(long, short = 'n', default_value = "k8s.io")]
    namespace: String,
    /// The containerd binary to bake with (use the version the nodes run).
    #[arg(long, default_value = "containerd", value_name = "PATH")]
    containerd: PathBuf,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub fn run(c: BakeCommand) -> Result<()> {
    match c.sub {
        Some(BakeSub::Verify { volume }) => crate::bake_verify::verify(&volume),
        None => bake(c.bake),
    }
}

fn bake(a: BakeArgs) -> Result<()> {
    let Some(output) = a.output.clone() else { bail!("--output DIR|FILE.img is required") };
    if a.references.is_empty() {
        bail!("no image to bake: give one or more references");
    }
    let started = Instant::now();
    let image_file = output.extension().is_some_and(|e| e == "img");
    let dir = if image_file { staging_dir(&output) } else { output.clone() };
    let previous = prepare_dir(&dir, image_file)?;
    let containerd_root = dir.join(volume::CONTAINERD_DIR);
    let lazypull_root = dir.join(volume::LAZYPULL_DIR);
    std::fs::create_dir_all(&containerd_root)?;
    std::fs::create_dir_all(&lazypull_root)?;
    let node = BakeNode::start(&NodeSpec {
        containerd_bin: &a.containerd,
        containerd_root: &containerd_root,
        lazypull_root: &lazypull_root,
        snapshotter_config: &snapshotter_config(a.config.as_deref())?,
        registry_args: a.registry.to_args(),
    })?;
    let warm_args = crate::warm_cmd::WarmArgs {
        references: a.references.clone(),
        full: a.full,
        prioritized: a.prioritized,
        budget: a.budget,
        files: a.files.clone(),
        address: node.containerd_socket.clone(),
        namespace: a.namespace.clone(),
        snapshotter: "lazypull".into(),
        root: node.lazypull_root.clone(),
        no_cri_labels: false,
        registry: a.registry.clone(),
    };
    let warmed = crate::warm_cmd::warm_images(&warm_args);
    // Stopped whether or not warming worked: a half-baked volume is still left consistent.
    node.stop(&dir)?;
    let warmed = warmed?;
    let _ = std::fs::remove_dir_all(lazypull_root.join("cache").join("tmp"));

    let mode = match (a.prioritized, a.budget) {
        (true, _) => "prioritized",
        (_, Some(_)) => "budget",
        _ => "full",
    };
    let mut images: Vec<volume::VolumeImage> = previous.map(|m| m.images).unwrap_or_default();
    for w in warmed {
        images.retain(|i| i.reference != w.reference);
        images.push(volume::VolumeImage { reference: w.reference, manifest_digest: w.manifest_digest, lazy_layers: w.lazy_layers, unpacked_layers: w.unpacked_layers });
    }
    // What was written is checked before it is described: a volume never claims a bad chunk.
    let check = crate::bake_verify::check_dir(&dir)?;
    if !check.damaged.is_empty() {
        bail!("the baked volume {} failed its own check:\n{}", dir.display(), check.damaged.join("\n"));
    }
    let manifest = VolumeManifest {
        format: volume::FORMAT.into(),
        format_version: volume::FORMAT_VERSION,
        lazypull_version: env!("CARGO_PKG_VERSION").into(),
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        mode: mode.into(),
        budget_bytes: a.budget,
        namespace: a.namespace.clone(),
        images,
        chunks: check.chunks,
        chunk_bytes: check.chunk_bytes,
        blobs: check.blobs,
        blob_bytes: check.blob_bytes,
    };
    let manifest_path = dir.join(volume::MANIFEST_FILE);
    std::fs::write(&manifest_path, manifest.to_json()).with_context(|| format!("writing {}", manifest_path.display()))?;
    if image_file {
        crate::bake_verify::make_ext4(&dir, &output)?;
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing the staging directory {}", dir.display()))?;
    }
    let stored: u64 = manifest.images.iter().flat_map(|i| &i.lazy_layers).map(|l| l.stored_bytes).sum();
    let lazy: u64 = manifest.images.iter().flat_map(|i| &i.lazy_layers).map(|l| l.bytes).sum();
    println!(
        "baked {} ({} image{}, {} chunks / {} bytes of {} lazy bytes, {} content blobs / {} bytes{}) in {:.1} s",
        output.display(),
        manifest.images.len(),
        if manifest.images.len() == 1 { "" } else { "s" },
        manifest.chunks,
        stored,
        lazy,
        manifest.blobs,
        manifest.blob_bytes,
        a.budget.map(|b| format!(", budget {b} bytes")).unwrap_or_default(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Where an image file's contents are assembled before `mkfs.ext4 -d` copies them.
fn staging_dir(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".staging");
    PathBuf::from(s)
}

/// Makes `dir` ready to bake into: new, empty, or a volume baked before (whose manifest is
/// returned: baking adds images to it). Anything else is refused rather than mixed in.
fn prepare_dir(dir: &Path, staging: bool) -> Result<Option<VolumeManifest>> {
    if staging {
        // An image file is baked from scratch each time; a leftover staging directory of an
        // interrupted run is not trusted.
        if dir.exists() {
            if !crate::bake_node::mounts_under(dir)?.is_empty() {
                bail!("{} has mounts below it (an interrupted bake?): unmount them first", dir.display());
            }
            std::fs::remove_dir_all(dir).with_context(|| format!("removing the old staging directory {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        return Ok(None);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let manifest_path = dir.join(volume::MANIFEST_FILE);
    if manifest_path.exists() {
        let text = std::fs::read(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
        return Ok(Some(VolumeManifest::parse(&manifest_path.display().to_string(), &text, env!("CARGO_PKG_VERSION"))?));
    }
    if std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} is neither empty nor a lazypull volume: refusing to bake into it", dir.display());
    }
    Ok(None)
}

/// The snapshotter settings to bake with: the node's file, with background fill, prefetch and
/// the whole-small-layer fetch turned off (they would put chunks the mode did not ask for into
/// the volume), no metrics endpoint and no CRI proxy (they would clash with the node's own
/// sockets and ports; credential provider plugins stay, for private images).
fn snapshotter_config(path: Option<&Path>) -> Result<String> {
    let mut table: toml::Table = match path {
        Some(p) => toml::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?).with_context(|| format!("parsing {}", p.display()))?,
        None => toml::Table::new(),
    };
    for key in ["root", "address", "metrics_address", "cri_listen", "cri_backend"] {
        table.remove(key);
    }
    table.insert("background_fetch".into(), false.into());
    table.insert("prefetch".into(), false.into());
    table.insert("small_layer_prefetch_bytes".into(), 0.into());
    Ok(toml::to_string(&table)?)
}

/// sha256 of a file's contents, streamed.
pub(crate) fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(h.finalize()), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bake_config_turns_off_what_would_exceed_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "cache_size = 1000\nbackground_fetch = true\nmetrics_address = \"127.0.0.1:9\"\nroot = \"/x\"\ncri_listen = \"/run/lazypull/cri.sock\"\n").unwrap();
        let t: toml::Table = toml::from_str(&snapshotter_config(Some(&p)).unwrap()).unwrap();
        assert_eq!(t.get("cache_size").and_then(|v| v.as_integer()), Some(1000));
        assert_eq!(t.get("background_fetch").and_then(|v| v.as_bool()), Some(false));
        assert_eq!(t.get("prefetch").and_then(|v| v.as_bool()), Some(false));
        assert!(t.get("metrics_address").is_none() && t.get("root").is_none() && t.get("cri_listen").is_none());
    }

    #[test]
    fn a_directory_with_other_files_is_not_baked_into() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("precious"), "x").unwrap();
        let e = prepare_dir(dir.path(), false).unwrap_err().to_string();
        assert!(e.contains("neither empty nor a lazypull volume"), "{e}");
        assert!(dir.path().join("precious").exists());
    }
}
