//! `lazypull` — the command-line entry point.
//!
//! Thin glue: argument parsing and output formatting live here, every piece of logic lives in
//! a library crate (`estargz` for the format, `unpack` for extraction, `registry`, `convert`,
//! `store` for chunks, `fs` for FUSE). Errors are `anyhow`
//! here only; libraries return typed errors that already name the digest, path or offset.

use clap::{Parser, Subcommand};

mod bake_cmd;
mod bake_node;
mod bake_verify;
mod cache;
mod cri_cmd;
mod fallback;
mod image;
mod image_layers;
mod install_cmd;
mod layer;
mod metrics;
mod mount;
mod rpull_cmd;
mod snapshotter;
mod soci_cmd;
mod warm_cmd;

#[derive(Parser)]
#[command(name = "lazypull", version, about = "Lazy-pulling container images (eStargz, zstd:chunked, SOCI)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with single layer blobs: convert, inspect, verify, extract.
    #[command(subcommand)]
    Layer(layer::LayerCommand),
    /// Work with whole images in registries or OCI layouts: convert, inspect.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// SOCI indexes for unmodified images: create (v1), convert (v2), inspect.
    #[command(subcommand)]
    Soci(soci_cmd::SociCommand),
    /// Mount an image (or one layer) from a registry lazily, without containerd.
    Mount(mount::MountArgs),
    /// Pull an image through containerd so a lazy snapshotter mounts its eStargz layers
    /// (like `ctr-remote image rpull`); other layers are fetched and unpacked as usual.
    Rpull(rpull_cmd::RpullArgs),
    /// Pre-pull images into this node (containerd + our snapshotter) and fill its chunk store:
    /// every chunk, the prioritized files only, or the most valuable chunks within a budget.
    Warm(warm_cmd::WarmArgs),
    /// Build a node cache volume (directory or ext4 image) holding images and their chunks,
    /// for new nodes to start from; `bake verify VOLUME` re-checks every digest in one.
    Bake(bake_cmd::BakeCommand),
    /// Set this node's containerd up for the lazypull snapshotter (config.toml merge, systemd
    /// units, FUSE at boot); idempotent, `--dry-run` prints the changes.
    Install(install_cmd::InstallArgs),
    /// Undo `lazypull install` (restores containerd's original config.toml byte for byte).
    Uninstall(install_cmd::InstallArgs),
    /// Serve containerd's snapshots API (proxy plugin) with lazily mounted eStargz layers.
    Snapshotter(snapshotter::SnapshotterArgs),
    /// kubelet's CRI calls from the command line: pull an image, time a pod's start.
    #[command(subcommand)]
    Cri(cri_cmd::CriCommand),
    /// Show and prune the node's chunk store (per image and layer).
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Unmount what `lazypull mount` mounted and stop its daemon.
    Umount {
        mountpoint: std::path::PathBuf,
        #[arg(long, default_value = "/var/lib/lazypull", value_name = "DIR")]
        state_dir: std::path::PathBuf,
    },
    /// Per-layer fetch status of a lazy mount.
    Status {
        mountpoint: std::path::PathBuf,
        #[arg(long, default_value = "/var/lib/lazypull", value_name = "DIR")]
        state_dir: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("LAZYPULL_LOG"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Layer(c) => layer::run(c),
        Command::Image(c) => image::run(c),
        Command::Soci(c) => soci_cmd::run(c),
        Command::Mount(a) => mount::image_mount(a),
        Command::Cache(c) => cache::run(c),
        Command::Cri(c) => cri_cmd::run(c),
        Command::Snapshotter(a) => snapshotter::run(a),
        Command::Rpull(a) => rpull_cmd::run(a),
        Command::Warm(a) => warm_cmd::run(a),
        Command::Bake(c) => bake_cmd::run(c),
        Command::Install(a) => install_cmd::run(a, false),
        Command::Uninstall(a) => install_cmd::run(a, true),
        Command::Umount { mountpoint, state_dir } => mount::umount(&mountpoint, &state_dir),
        Command::Status { mountpoint, state_dir, json } => mount::status(&mountpoint, &state_dir, json),
    };
    if let Err(e) = result {
        eprintln!("lazypull: error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, `: `-separated, leaving out a cause whose text the message already
/// holds (library errors often carry their source in their own message too).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("inner problem")]
        struct Inner;
        #[derive(Debug, thiserror::Error)]
        #[error("layer x: {0}")]
        struct Outer(#[source] Inner);
        let e = anyhow::Error::new(Outer(Inner)).context("mounting");
        assert_eq!(super::error_chain(&e), "mounting: layer x: inner problem");
    }
}
