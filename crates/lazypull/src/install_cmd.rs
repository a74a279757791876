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
    /// Where the file loading FUSE at boot goes.
    #[arg(long, default_value = "/etc/modules-load.d", value_name = "DIR")]
    modules_load_dir: PathBuf,
    /// Write the files only; print the commands (systemctl, modprobe) instead of running them:
    /// hosts without systemd, or an image build that starts services later.
    #[arg(long)]
    no_systemd: bool,
}

/// The real host for files, with commands printed instead of run (`--no-systemd`).
struct FilesOnly(install::SystemHost);

impl install::Host for FilesOnly {
    fn read(&self, path: &std::path::Path) -> std::io::Result<Option<Vec<u8>>> {
        self.0.read(path)
    }
    fn write_atomic(&self, path: &std::path::Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
        self.0.write_atomic(path, contents, mode)
    }
    fn remove(&self, path: &std::path::Path) -> std::io::Result<()> {
        self.0.remove(path)
    }
    fn has_program(&self, _program: &str) -> bool {
        true
    }
    fn run(&self, command: &install::Command) -> Result<(), install::Error> {
        println!("not run (--no-systemd): {command}");
        Ok(())
    }
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
            modules_load_dir: self.modules_load_dir.clone(),
        })
    }
}

pub fn run(a: InstallArgs, uninstall: bool) -> Result<()> {
    let opts = a.options()?;
    let files_only = FilesOnly(install::SystemHost);
    let host: &dyn install::Host = if a.no_systemd { &files_only } else { &install::SystemHost };
    let plan = if uninstall { install::plan_uninstall(&opts, host)? } else { install::plan_install(&opts, host)? };
    let what = if uninstall { "uninstall" } else { "install" };
    if a.dry_run {
        print!("{plan}");
        return Ok(());
    }
    if plan.steps.is_empty() {
        println!("lazypull {what}: nothing to change");
        return Ok(());
    }
    let applied = install::apply(&plan, host)?;
    for w in &applied.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "lazypull {what}: done ({} step{}{})",
        plan.steps.len(),
        if plan.steps.len() == 1 { "" } else { "s" },
        match (plan.changes_containerd_config(), a.no_systemd) {
            (true, true) => ", containerd config changed: restart containerd",
            (true, false) => ", containerd restarted",
            (false, _) => ", containerd config unchanged",
        }
    );
    Ok(())
}
