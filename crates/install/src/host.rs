//! Every side effect of install/uninstall goes through [`Host`] (as youki's `Syscall` does for
//! the kernel), so the planning and ordering logic is tested against [`MemoryHost`] without
//! root, systemd or a real `/etc`. [`SystemHost`] is the real thing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process;
use std::sync::Mutex;

use crate::Error;

/// A command [`Host::run`] executes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// A program name, looked up in `PATH` (and the sbin directories).
    pub program: String,
    pub args: Vec<String>,
    /// Whether a failure (or a missing program) aborts the apply; otherwise it is a warning.
    pub required: bool,
}

impl Command {
    pub fn new(program: &str, args: &[&str]) -> Self {
        Command { program: program.to_string(), args: args.iter().map(|a| a.to_string()).collect(), required: true }
    }

    /// The same command, its failure only warned about.
    pub fn optional(mut self) -> Self {
        self.required = false;
        self
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.program)?;
        for a in &self.args {
            write!(f, " {a}")?;
        }
        Ok(())
    }
}

/// The side effects install and uninstall need.
pub trait Host {
    /// The file's contents; `None` if it does not exist.
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>>;
    /// Replaces (or creates) the file atomically: readers see the old or the new contents,
    /// never a mix, even across a crash. An existing file keeps its mode and owner; a new one
    /// gets `mode`, and missing parent directories are created.
    fn write_atomic(&self, path: &Path, contents: &[u8], mode: u32) -> io::Result<()>;
    /// Removes the file; a missing file is not an error.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Whether the program can be run (checked for every required command before anything is
    /// changed, so a node without systemd gets an error, not a half install).
    fn has_program(&self, program: &str) -> bool;
    /// Runs the command to completion; a non-zero exit is [`Error::CommandFailed`], a missing
    /// program [`Error::ProgramNotFound`].
    fn run(&self, command: &Command) -> Result<(), Error>;
}

/// The real host.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemHost;

/// Searched after `PATH`: `sudo` and cron often leave the sbin directories out.
const EXTRA_PATH: [&str; 4] = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin"];

impl SystemHost {
    fn resolve(program: &str) -> Option<PathBuf> {
        let executable = |p: &Path| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if program.contains('/') {
            let p = PathBuf::from(program);
            return executable(&p).then_some(p);
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path).chain(EXTRA_PATH.iter().map(PathBuf::from)).map(|d| d.join(program)).find(|p| executable(p))
    }
}

impl Host for SystemHost {
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_atomic(&self, path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let existing = fs::metadata(path).ok();
        let mode = existing.as_ref().map_or(mode, |m| m.permissions().mode() & 0o7777);
        let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        let tmp = dir.join(format!(".{}.lazypull-tmp.{}", name.to_string_lossy(), process::id()));
        let result = (|| {
            let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
            f.write_all(contents)?;
            // The umask may have narrowed `mode`; an existing file's owner is kept too.
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            if let Some(m) = &existing {
                let mine = f.metadata()?;
                if (mine.uid(), mine.gid()) != (m.uid(), m.gid()) {
                    std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))?;
                }
            }
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        // The rename is durable once the directory is.
        fs::File::open(dir)?.sync_all()
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        match fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn has_program(&self, program: &str) -> bool {
        Self::resolve(program).is_some()
    }

    fn run(&self, command: &Command) -> Result<(), Error> {
        let not_found = || Error::ProgramNotFound { program: command.program.clone() };
        let exe = Self::resolve(&command.program).ok_or_else(not_found)?;
        let out = process::Command::new(exe).args(&command.args).stdin(process::Stdio::null()).output().map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => not_found(),
            _ => Error::Spawn { command: command.to_string(), source },
        })?;
        if out.status.success() {
            return Ok(());
        }
        let status = out.status.code().map_or_else(|| "killed by a signal".to_string(), |c| format!("exit status {c}"));
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(Error::CommandFailed { command: command.to_string(), status, stderr })
    }
}

/// What a [`MemoryHost`] was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Write(PathBuf),
    Remove(PathBuf),
    Run(String),
}

/// An in-memory host for tests: files in a map, commands recorded (and succeeding unless told
/// otherwise). `systemctl` and `modprobe` exist unless [`MemoryHost::without_program`].
#[derive(Debug)]
pub struct MemoryHost {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    files: BTreeMap<PathBuf, (Vec<u8>, u32)>,
    programs: BTreeSet<String>,
    failing: BTreeSet<String>,
    events: Vec<Event>,
}

impl Default for MemoryHost {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryHost {
    pub fn new() -> Self {
        let programs = ["systemctl", "modprobe"].iter().map(|p| p.to_string()).collect();
        MemoryHost { state: Mutex::new(State { programs, ..State::default() }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a file (mode 0644) without recording an event.
    pub fn with_file(self, path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) -> Self {
        self.state().files.insert(path.into(), (contents.into(), 0o644));
        self
    }

    /// Makes the program unavailable.
    pub fn without_program(self, program: &str) -> Self {
        self.state().programs.remove(program);
        self
    }

    /// Makes every command whose text starts with `prefix` fail (exit status 1).
    pub fn failing(self, prefix: &str) -> Self {
        self.state().failing.insert(prefix.to_string());
        self
    }

    /// Removes a file without recording an event (as a user would, outside of install).
    pub fn remove_silently(&self, path: impl AsRef<Path>) {
        self.state().files.remove(path.as_ref());
    }

    /// The file's contents, if it exists.
    pub fn file(&self, path: impl AsRef<Path>) -> Option<Vec<u8>> {
        self.state().files.get(path.as_ref()).map(|f| f.0.clone())
    }

    /// The file's mode, if it exists.
    pub fn mode(&self, path: impl AsRef<Path>) -> Option<u32> {
        self.state().files.get(path.as_ref()).map(|f| f.1)
    }

    /// Every file path.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.state().files.keys().cloned().collect()
    }

    /// What was done so far.
    pub fn events(&self) -> Vec<Event> {
        self.state().events.clone()
    }

    /// The commands run so far, as text.
    pub fn commands(&self) -> Vec<String> {
        self.events().into_iter().filter_map(|e| if let Event::Run(c) = e { Some(c) } else { None }).collect()
    }

    /// Forgets the events.
    pub fn clear_events(&self) {
        self.state().events.clear();
    }
}

impl Host for MemoryHost {
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        Ok(self.file(path))
    }

    fn write_atomic(&self, path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
        let mut s = self.state();
        let mode = s.files.get(path).map_or(mode, |f| f.1);
        s.files.insert(path.to_path_buf(), (contents.to_vec(), mode));
        s.events.push(Event::Write(path.to_path_buf()));
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state();
        s.files.remove(path);
        s.events.push(Event::Remove(path.to_path_buf()));
        Ok(())
    }

    fn has_program(&self, program: &str) -> bool {
        self.state().programs.contains(program)
    }

    fn run(&self, command: &Command) -> Result<(), Error> {
        let mut s = self.state();
        if !s.programs.contains(&command.program) {
            return Err(Error::ProgramNotFound { program: command.program.clone() });
        }
        let text = command.to_string();
        s.events.push(Event::Run(text.clone()));
        if s.failing.iter().any(|p| text.starts_with(p.as_str())) {
            return Err(Error::CommandFailed { command: text, status: "exit status 1".to_string(), stderr: "failing (MemoryHost)".to_string() });
        }
        Ok(())
    }
}
