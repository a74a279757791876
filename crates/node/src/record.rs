//! `record.json`: what `umount` needs to find and stop a mount's parts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A mount daemon's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub pid: u32,
    pub mountpoint: PathBuf,
    pub source: String,
    /// FUSE layer mounts (below an overlay) in layer order; empty when the mountpoint is the layer.
    pub layer_mounts: Vec<PathBuf>,
    pub overlay: bool,
    /// Device number of the mount at `mountpoint` (its identity): `umount` detaches only this
    /// mount, never a newer one at the same path.
    #[serde(default)]
    pub dev: Option<u64>,
    /// The daemon's start time (clock ticks after boot, /proc/PID/stat field 22): together
    /// with `pid` it names the process, so a reused pid is never signalled.
    #[serde(default)]
    pub start_ticks: Option<u64>,
}

/// Start time of process `pid` in clock ticks after boot (`/proc/PID/stat` field 22).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

impl Record {
    /// Whether the recorded daemon is still the process with that pid.
    pub fn daemon_alive(&self) -> bool {
        alive(self.pid) && (self.start_ticks.is_none() || start_ticks(self.pid) == self.start_ticks)
    }

    /// Reads `DIR/record.json`.
    pub fn load(mount_dir: &Path) -> std::io::Result<Record> {
        crate::files::read_json(&mount_dir.join("record.json"))
    }

    /// Writes `DIR/record.json` atomically: `status`, `umount` and an old daemon on its way out
    /// read it concurrently.
    pub fn save(&self, mount_dir: &Path) -> std::io::Result<()> {
        crate::files::write_json(&mount_dir.join("record.json"), self)
    }

    /// Whether `DIR/record.json` names this process (not a newer daemon at the same path).
    pub fn is_mine(mount_dir: &Path) -> bool {
        let me = std::process::id();
        Record::load(mount_dir).is_ok_and(|r| r.pid == me && (r.start_ticks.is_none() || r.start_ticks == start_ticks(me)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_know_their_process() {
        let tmp = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let r = Record {
            pid: me,
            mountpoint: "/mnt/x".into(),
            source: "img".into(),
            layer_mounts: vec!["/mnt/.x/0".into()],
            overlay: true,
            dev: Some(42),
            start_ticks: start_ticks(me),
        };
        r.save(tmp.path()).unwrap();
        assert_eq!(Record::load(tmp.path()).unwrap(), r);
        assert!(r.daemon_alive() && Record::is_mine(tmp.path()));
        let reused = Record { start_ticks: r.start_ticks.map(|t| t + 1), ..r.clone() };
        assert!(!reused.daemon_alive(), "a reused pid is another process");
        // Records of older versions lack the identity fields.
        let old: Record = serde_json::from_str(r#"{"pid":1,"mountpoint":"/m","source":"s","layer_mounts":[],"overlay":false}"#).unwrap();
        assert_eq!((old.dev, old.start_ticks), (None, None));
    }
}
