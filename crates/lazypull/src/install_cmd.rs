//! `lazypull install` / `lazypull uninstall`: set a containerd node up for the lazypull
//! snapshotter (containerd's config, systemd units, FUSE at boot), idempotently, and undo it.
//! Glue only: what changes and in which order is `crates/install`'s plan, carried out through
//! its real host; `--dry-run` prints the plan (with diffs) and changes nothing.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct InstallArgs {
    /// Print what would change (files with diffs, commands) and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// containerd's configuration file.
    #[arg(long, default_value = "/etc/containerd/config.toml", value_name = "FILE")]
    containerd_config: PathBuf,
    /// containerd's systemd unit (restarted only when its configuration changed).
    #[arg(long, default_value = "containerd", value_name = "UNIT")]
    containerd_service: String,
    /// The snapshotter's socket.
    #[arg(long, default_value = "/run/lazypull/lazypull.sock", value_name = "SOCKET")]
    socket: PathBuf,
    /// The snapshotter's root.
    #[arg(long, default_value = "/var/lib/lazypull/snapshotter", value_name = "DIR")]
    root: PathBuf,
    /// The lazypull binary the service runs (default: this one).
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// The snapshotter's settings file (created without settings if missing).
    #[arg(long, default_value = "/etc/lazypull/snapshotter.toml", value_name = "FILE")]
    config: PathBuf,
    /// Where the systemd units go.
    #[arg(long, default_value = "/etc/systemd/system", value_name = "DIR")]
    unit_dir: PathBuf,
}

impl InstallArgs {
    fn options(&self) -> Result<install::Options> {
        let binary = match &self.binary {
            Some(b) => b.clone(),
            None => std::env::current_exe().and_then(|p| p.canonicalize()).context("locating the lazypull binary (give --binary)")?,
        };
        Ok(install::Options {
            containerd_config: self.containerd_config.clone(),
            containerd_service: self.containerd_service.clone(),
            socket: self.socket.clone(),
            root: self.root.clone(),
            binary,
            snapshotter_config: self.config.clone(),
            unit_dir: self.unit_dir.clone(),
            ..install::Options::default()
        })
    }
}

pub fn run(a: InstallArgs, uninstall: bool) -> Result<()> {
    let opts = a.options()?;
    let host = install::SystemHost;
    let plan = if uninstall { install::plan_uninstall(&opts, &host)? } else { install::plan_install(&opts, &host)? };
    let what = if uninstall { "uninstall" } else { "install" };
    if a.dry_run {
        print!("{plan}");
        return Ok(());
    }
    if plan.steps.is_empty() {
        println!("lazypull {what}: nothing to change");
        return Ok(());
    }
    let applied = install::apply(&plan, &host)?;
    for w in &applied.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "lazypull {what}: done ({} step{}{})",
        plan.steps.len(),
        if plan.steps.len() == 1 { "" } else { "s" },
        if plan.changes_containerd_config() { ", containerd restarted" } else { ", containerd config unchanged" }
    );
    Ok(())
}
