//! The logic behind `lazypull install` and `lazypull uninstall`: set up a containerd node
//! (Kubernetes or not) to use the lazypull snapshotter, idempotently, and undo it.
//!
//! * [`config`]: merge `proxy_plugins.lazypull` and the CRI snapshotter settings into
//!   containerd's `config.toml` with `toml_edit`, keeping everything else as written;
//! * [`units`]: the systemd service and socket units and the FUSE modules-load file;
//! * [`plan`]: compute every file change and command ([`plan_install`], [`plan_uninstall`])
//!   without touching the host, print it for `--dry-run` ([`Plan`]'s `Display`, with unified
//!   diffs from [`diff`]), and carry it out ([`apply`]);
//! * [`host`]: the side effects behind the [`Host`] trait, real ([`SystemHost`]) or in memory
//!   ([`MemoryHost`], for tests).
//!
//! The module docs say why it is built this way (why `toml_edit`, why version 2, why the
//! backup is written once, why containerd is restarted only when its config changed).

use std::io;
use std::path::PathBuf;

pub mod config;
pub mod diff;
pub mod host;
pub mod plan;
pub mod units;

pub use config::{merge, unmerge, ConfigError, Merged, Settings, Version};
pub use diff::unified_diff;
pub use host::{Command, Event, Host, MemoryHost, SystemHost};
pub use plan::{apply, plan_install, plan_uninstall, Applied, Options, Plan, Purpose, Step};
pub use units::{default_snapshotter_config, modules_load_conf, service_unit, socket_unit, UnitParams};

/// Everything install and uninstall can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Config { path: PathBuf, source: ConfigError },
    #[error("{} is not UTF-8 text", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("removing {}: {source}", path.display())]
    Remove { path: PathBuf, source: io::Error },
    #[error("{what} must be an absolute UTF-8 path without control characters, got {path:?}")]
    BadPath { what: &'static str, path: PathBuf },
    #[error("`{program}` not found in PATH or the sbin directories: lazypull install needs it (the snapshotter and containerd are managed through systemd); on a host without systemd, set the snapshotter up by hand as docs/snapshotter.md describes")]
    ProgramNotFound { program: String },
    #[error("`{command}` failed ({status}){}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    CommandFailed { command: String, status: String, stderr: String },
    #[error("running `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
}
