//! `lazypull rpull`: pull an image through containerd with the remote-snapshot labels, so a
//! lazy snapshotter mounts its eStargz layers (the `rpull` crate does the work).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use rpull::{LayerOutcome, PullOptions};

use crate::image::RegistryArgs;

#[derive(Args)]
pub struct RpullArgs {
    /// Image reference, e.g. 127.0.0.1:5000/app:1.
    reference: String,
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock", value_name = "SOCKET")]
    address: PathBuf,
    /// containerd namespace (Kubernetes uses k8s.io).
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Snapshotter (proxy plugin name) that mounts layers lazily.
    #[arg(long, default_value = "lazypull")]
    snapshotter: String,
    /// Platform to pull from an index (os/arch[/variant]); default: this machine's.
    #[arg(long)]
    platform: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub fn run(a: RpullArgs) -> Result<()> {
    let client = a.registry.client()?;
    let mut opts = PullOptions { snapshotter: a.snapshotter.clone(), ..Default::default() };
    if let Some(p) = &a.platform {
        opts.platform = registry::Platform::parse(p)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(async {
        let ctd = rpull::containerd::Containerd::new(containerd_api::unix_channel(&a.address), &a.namespace);
        rpull::pull(&client, &ctd, &a.reference, &opts).await
    });
    let report = report.with_context(|| format!("rpull {} through containerd at {}", a.reference, a.address.display()))?;
    for (digest, outcome) in &report.layers {
        match outcome {
            LayerOutcome::Remote => println!("{digest}: remote snapshot (lazily mounted by {})", a.snapshotter),
            LayerOutcome::Present => println!("{digest}: already present"),
            LayerOutcome::UnpackedBySnapshotter { reason } => println!("{digest}: fetched and unpacked by {} (not lazy: {reason})", a.snapshotter),
            LayerOutcome::Unpacked { bytes } => println!("{digest}: fetched and unpacked ({bytes} bytes; see the snapshotter's log for why it was not lazy)"),
        }
    }
    println!(
        "{} -> {}: {} of {} layers remote, {} bytes downloaded, {:.2} s",
        report.image,
        report.target,
        report.remote_layers(),
        report.layers.len(),
        report.bytes_downloaded,
        report.elapsed.as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn rpull_reads_the_label_the_snapshotter_writes_on_layers_it_unpacked() {
        assert_eq!(rpull::UNPACKED_BY_SNAPSHOTTER_LABEL, snapshotter::snapshots::UNPACKED_LABEL);
    }
}
