//! Install and uninstall as a [`Plan`]: computed from what is on the host without changing
//! anything (so `--dry-run` prints exactly what would happen), then carried out by [`apply`].
//!
//! # Why a backup, written once
//!
//! The first install that changes containerd's config copies the original next to it
//! (`config.toml.lazypull-backup`, mode 0600: it may hold registry credentials). Later installs
//! (a new socket path, an upgrade) never overwrite it, because by then the file already holds
//! our edits: overwriting would lose the only copy of the user's original. Uninstall writes it
//! back byte for byte and removes it. If the config did not exist, an empty marker
//! (`config.toml.lazypull-created`) records that, and uninstall removes the config instead.
//! Without either (the backup was deleted, or lazypull was configured by hand), uninstall takes
//! out only what install adds, see [`crate::config::unmerge`]. Edits made to the config after
//! install are lost when the backup is restored; the dry run shows that diff.
//!
//! # Why restart containerd only on change
//!
//! Restarting containerd on a Kubernetes node interrupts image pulls and CRI calls (kubelet
//! sees the runtime go away for a moment), so an idempotent re-run — from a DaemonSet, a
//! config management loop — must not do it. Containerd is restarted exactly when its config
//! file is rewritten, and last: the snapshotter's socket is up (socket activation) before
//! containerd looks for the plugin. Uninstall restarts containerd first, so it stops using
//! lazypull before the snapshotter is stopped. A repeated install writes nothing and runs only
//! `systemctl enable --now`, which starts the units if someone stopped them and is a no-op
//! otherwise; a changed unit file is followed by `daemon-reload` and a restart of that unit.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::{self, Settings};
use crate::diff::unified_diff;
use crate::host::{Command, Host};
use crate::units::{self, UnitParams};
use crate::Error;

/// Where everything goes. [`Options::default`] is the standard layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// containerd's config (`/etc/containerd/config.toml`).
    pub containerd_config: PathBuf,
    /// containerd's systemd unit, restarted when its config changes (`containerd`).
    pub containerd_service: String,
    /// The snapshotter's socket (`/run/lazypull/lazypull.sock`).
    pub socket: PathBuf,
    /// The snapshotter's state directory (`/var/lib/lazypull/snapshotter`, the snapshotter's own
    /// default), also containerd's `exports.root`.
    pub root: PathBuf,
    /// The `lazypull` binary (`/usr/local/bin/lazypull`).
    pub binary: PathBuf,
    /// The snapshotter's config, created (empty of settings) if missing
    /// (`/etc/lazypull/snapshotter.toml`).
    pub snapshotter_config: PathBuf,
    /// Where the units go (`/etc/systemd/system`).
    pub unit_dir: PathBuf,
    /// Where the FUSE module file goes (`/etc/modules-load.d`).
    pub modules_load_dir: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            containerd_config: "/etc/containerd/config.toml".into(),
            containerd_service: "containerd".into(),
            socket: "/run/lazypull/lazypull.sock".into(),
            root: "/var/lib/lazypull/snapshotter".into(),
            binary: "/usr/local/bin/lazypull".into(),
            snapshotter_config: "/etc/lazypull/snapshotter.toml".into(),
            unit_dir: "/etc/systemd/system".into(),
            modules_load_dir: "/etc/modules-load.d".into(),
        }
    }
}

impl Options {
    /// The copy of the original containerd config.
    pub fn backup_path(&self) -> PathBuf {
        suffixed(&self.containerd_config, ".lazypull-backup")
    }

    /// The marker saying install created the containerd config.
    pub fn created_marker_path(&self) -> PathBuf {
        suffixed(&self.containerd_config, ".lazypull-created")
    }

    pub fn service_path(&self) -> PathBuf {
        self.unit_dir.join(units::SERVICE)
    }

    pub fn socket_unit_path(&self) -> PathBuf {
        self.unit_dir.join(units::SOCKET)
    }

    pub fn modules_load_path(&self) -> PathBuf {
        self.modules_load_dir.join(units::MODULES_LOAD_FILE)
    }

    fn check(&self) -> Result<(), Error> {
        let paths = [
            ("containerd config", &self.containerd_config),
            ("socket", &self.socket),
            ("root", &self.root),
            ("binary", &self.binary),
            ("snapshotter config", &self.snapshotter_config),
            ("unit directory", &self.unit_dir),
            ("modules-load directory", &self.modules_load_dir),
        ];
        for (what, path) in paths {
            let ok = path.is_absolute() && path.to_str().is_some_and(|s| !s.chars().any(char::is_control));
            if !ok {
                return Err(Error::BadPath { what, path: path.clone() });
            }
        }
        Ok(())
    }
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// What a file write is for (the dry run shows diffs of the text files, not of the backup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    ContainerdConfig,
    Backup,
    CreatedMarker,
    Unit,
    ModulesLoad,
    SnapshotterConfig,
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write `new` over `old` (`None`: the file does not exist yet; it gets `mode`).
    Write { path: PathBuf, old: Option<Vec<u8>>, new: Vec<u8>, mode: u32, purpose: Purpose },
    Remove { path: PathBuf },
    Run(Command),
}

/// Every change of an install or uninstall, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// containerd's config file ([`Options::containerd_config`]).
    pub containerd_config: PathBuf,
}

impl Plan {
    /// Whether containerd's config is rewritten or removed (and containerd restarted).
    pub fn changes_containerd_config(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::Write { path, .. } | Step::Remove { path } if *path == self.containerd_config))
    }

    /// Whether any file is written or removed.
    pub fn touches_files(&self) -> bool {
        self.steps.iter().any(|s| !matches!(s, Step::Run(_)))
    }

    /// The commands, in order.
    pub fn commands(&self) -> impl Iterator<Item = &Command> {
        self.steps.iter().filter_map(|s| if let Step::Run(c) = s { Some(c) } else { None })
    }

    /// The unified diff of containerd's config (empty if it does not change).
    pub fn containerd_diff(&self) -> String {
        self.steps
            .iter()
            .find_map(|s| match s {
                Step::Write { path, old, new, .. } if *path == self.containerd_config => Some(file_diff(path, old.as_deref(), Some(new))),
                _ => None,
            })
            .unwrap_or_default()
    }
}

fn file_diff(path: &Path, old: Option<&[u8]>, new: Option<&[u8]>) -> String {
    let name = path.display().to_string();
    let old_name = if old.is_some() { name.clone() } else { "/dev/null".to_string() };
    let new_name = if new.is_some() { name } else { "/dev/null".to_string() };
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    unified_diff(&text(old), &text(new), &old_name, &new_name, 3)
}

/// The dry run's text: one line per step, with the diff of each text file written.
impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.steps.is_empty() {
            return writeln!(f, "nothing to do");
        }
        for step in &self.steps {
            match step {
                Step::Write { path, old, new, mode, purpose } => {
                    let what = if old.is_some() { "update".to_string() } else { format!("create (mode {mode:04o})") };
                    writeln!(f, "{what} {}", path.display())?;
                    match purpose {
                        Purpose::Backup => writeln!(f, "  (a copy of the current containerd config)")?,
                        Purpose::CreatedMarker => writeln!(f, "  (records that install created the containerd config)")?,
                        _ => f.write_str(&file_diff(path, old.as_deref(), Some(new)))?,
                    }
                }
                Step::Remove { path } => writeln!(f, "remove {}", path.display())?,
                Step::Run(c) if c.required => writeln!(f, "run {c}")?,
                Step::Run(c) => writeln!(f, "run {c} (a failure is only warned about)")?,
            }
        }
        Ok(())
    }
}

fn read(host: &dyn Host, path: &Path) -> Result<Option<Vec<u8>>, Error> {
    host.read(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })
}

fn read_text(host: &dyn Host, path: &Path) -> Result<Option<String>, Error> {
    read(host, path)?.map(|b| String::from_utf8(b).map_err(|_| Error::NotUtf8 { path: path.to_path_buf() })).transpose()
}

fn settings(opts: &Options) -> Settings {
    // `check` made sure both are UTF-8.
    Settings { address: opts.socket.to_string_lossy().into_owned(), root: opts.root.to_string_lossy().into_owned() }
}

fn systemctl(args: &[&str]) -> Step {
    Step::Run(Command::new("systemctl", args))
}

/// A write of `new` if the file does not hold exactly that; returns whether it existed before.
fn write_if_changed(steps: &mut Vec<Step>, host: &dyn Host, path: PathBuf, new: String, purpose: Purpose) -> Result<Option<bool>, Error> {
    let old = read(host, &path)?;
    if old.as_deref() == Some(new.as_bytes()) {
        return Ok(None);
    }
    let existed = old.is_some();
    steps.push(Step::Write { path, old, new: new.into_bytes(), mode: 0o644, purpose });
    Ok(Some(existed))
}

/// The install: FUSE module, snapshotter config (if missing), units, containerd config.
pub fn plan_install(opts: &Options, host: &dyn Host) -> Result<Plan, Error> {
    opts.check()?;
    let mut steps = Vec::new();

    if write_if_changed(&mut steps, host, opts.modules_load_path(), units::modules_load_conf(), Purpose::ModulesLoad)?.is_some() {
        steps.push(Step::Run(Command::new("modprobe", &["fuse"]).optional()));
    }
    if read(host, &opts.snapshotter_config)?.is_none() {
        let new = units::default_snapshotter_config().into_bytes();
        steps.push(Step::Write { path: opts.snapshotter_config.clone(), old: None, new, mode: 0o644, purpose: Purpose::SnapshotterConfig });
    }

    let params = UnitParams { binary: &opts.binary, socket: &opts.socket, root: &opts.root, config: &opts.snapshotter_config };
    let socket = write_if_changed(&mut steps, host, opts.socket_unit_path(), units::socket_unit(&params), Purpose::Unit)?;
    let service = write_if_changed(&mut steps, host, opts.service_path(), units::service_unit(&params), Purpose::Unit)?;
    if socket.is_some() || service.is_some() {
        steps.push(systemctl(&["daemon-reload"]));
    }
    steps.push(systemctl(&["enable", "--now", units::SOCKET, units::SERVICE]));
    // A running unit whose file changed: restart it (the service too when its socket changed,
    // so that it takes over the new one).
    let restart: Vec<&str> = match (socket == Some(true), service == Some(true)) {
        (true, _) => vec![units::SOCKET, units::SERVICE],
        (false, true) => vec![units::SERVICE],
        (false, false) => vec![],
    };
    if !restart.is_empty() {
        steps.push(systemctl(&[&["restart"][..], &restart].concat()));
    }

    let path = &opts.containerd_config;
    let old = read_text(host, path)?;
    let text = old.as_deref().unwrap_or_default();
    let merged = config::merge(text, &settings(opts)).map_err(|source| Error::Config { path: path.clone(), source })?;
    if merged.changed {
        let backup = opts.backup_path();
        let marker = opts.created_marker_path();
        if read(host, &backup)?.is_none() && read(host, &marker)?.is_none() {
            steps.push(match &old {
                Some(text) => Step::Write { path: backup, old: None, new: text.as_bytes().to_vec(), mode: 0o600, purpose: Purpose::Backup },
                None => Step::Write { path: marker, old: None, new: Vec::new(), mode: 0o600, purpose: Purpose::CreatedMarker },
            });
        }
        let old = old.map(String::into_bytes);
        steps.push(Step::Write { path: path.clone(), old, new: merged.text.into_bytes(), mode: 0o644, purpose: Purpose::ContainerdConfig });
        steps.push(systemctl(&["restart", &opts.containerd_service]));
    }
    Ok(Plan { steps, containerd_config: opts.containerd_config.clone() })
}

/// The uninstall: containerd config back (and containerd restarted), then the units stopped and
/// removed, the FUSE module file removed, and the snapshotter config if it is still the one
/// install wrote. State under the root directory is left alone.
pub fn plan_uninstall(opts: &Options, host: &dyn Host) -> Result<Plan, Error> {
    opts.check()?;
    let mut steps = Vec::new();
    let path = &opts.containerd_config;
    let current = read(host, path)?;
    let backup_path = opts.backup_path();
    let marker = opts.created_marker_path();
    let backup = read(host, &backup_path)?;
    let created = read(host, &marker)?.is_some();
    let mut changed = false;
    if let Some(original) = backup {
        if current.as_deref() != Some(&original[..]) {
            steps.push(Step::Write { path: path.clone(), old: current, new: original, mode: 0o644, purpose: Purpose::ContainerdConfig });
            changed = true;
        }
        steps.push(Step::Remove { path: backup_path });
        if created {
            steps.push(Step::Remove { path: marker });
        }
    } else if created {
        if current.is_some() {
            steps.push(Step::Remove { path: path.clone() });
            changed = true;
        }
        steps.push(Step::Remove { path: marker });
    } else if let Some(text) = read_text(host, path)? {
        let out = config::unmerge(&text).map_err(|source| Error::Config { path: path.clone(), source })?;
        if out.changed {
            steps.push(Step::Write { path: path.clone(), old: Some(text.into_bytes()), new: out.text.into_bytes(), mode: 0o644, purpose: Purpose::ContainerdConfig });
            changed = true;
        }
    }
    if changed {
        steps.push(systemctl(&["restart", &opts.containerd_service]));
    }

    let unit_files = [opts.socket_unit_path(), opts.service_path()];
    let mut present = Vec::new();
    for p in unit_files {
        if read(host, &p)?.is_some() {
            present.push(p);
        }
    }
    if !present.is_empty() {
        steps.push(systemctl(&["disable", "--now", units::SOCKET, units::SERVICE]));
        steps.extend(present.into_iter().map(|path| Step::Remove { path }));
        steps.push(systemctl(&["daemon-reload"]));
    }
    if read(host, &opts.modules_load_path())?.is_some() {
        steps.push(Step::Remove { path: opts.modules_load_path() });
    }
    if read(host, &opts.snapshotter_config)?.as_deref() == Some(units::default_snapshotter_config().as_bytes()) {
        steps.push(Step::Remove { path: opts.snapshotter_config.clone() });
    }
    Ok(Plan { steps, containerd_config: opts.containerd_config.clone() })
}

/// What [`apply`] did besides succeeding.
#[derive(Debug, Default)]
pub struct Applied {
    /// Optional commands that failed (e.g. `modprobe fuse` in a container without modules).
    pub warnings: Vec<Error>,
}

/// Carries out the plan in order. Every required program is checked for first, so a host
/// without `systemctl` fails before anything is changed; after that the first failing step
/// stops the apply (the steps before it stay done, and a re-run of install finishes the job).
pub fn apply(plan: &Plan, host: &dyn Host) -> Result<Applied, Error> {
    for c in plan.commands().filter(|c| c.required) {
        if !host.has_program(&c.program) {
            return Err(Error::ProgramNotFound { program: c.program.clone() });
        }
    }
    let mut applied = Applied::default();
    for step in &plan.steps {
        match step {
            Step::Write { path, new, mode, .. } => host.write_atomic(path, new, *mode).map_err(|source| Error::Write { path: path.clone(), source })?,
            Step::Remove { path } => host.remove(path).map_err(|source| Error::Remove { path: path.clone(), source })?,
            Step::Run(c) if c.required => host.run(c)?,
            Step::Run(c) if !host.has_program(&c.program) => applied.warnings.push(Error::ProgramNotFound { program: c.program.clone() }),
            Step::Run(c) => {
                if let Err(e) = host.run(c) {
                    applied.warnings.push(e);
                }
            }
        }
    }
    Ok(applied)
}
