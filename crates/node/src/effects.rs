//! Privileged effects (mount table, signals, time) behind a narrow trait, and the logic of
//! stopping a mount written against it.
//!
//! Why: stopping a mount is a sequence of decisions — detach only the mount this daemon made
//! (its device number), never a newer one at the same path; signal only the recorded process
//! (pid *and* start time); escalate from SIGTERM to SIGKILL after a deadline; clean a dead
//! daemon's record without signalling whatever has its pid now; detach layer mounts only once
//! they are dead. Each branch used to need root, a FUSE mount and a daemon to test. With the
//! effects behind [`Effects`] (like youki's `Syscall`), the decisions are unit-tested with a
//! recording fake; the real implementation (`lazypull`'s `Host`) keeps the root tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::layout::MountIndex;
use crate::record::Record;

/// Signals a mount daemon may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

/// What stopping a mount does to the system.
pub trait Effects {
    /// Whether a mount is attached at `path`.
    fn is_mountpoint(&self, path: &Path) -> bool;
    /// Whether the mount at `path` is a FUSE mount whose daemon is gone (it answers ENOTCONN).
    fn is_dead_mount(&self, path: &Path) -> bool;
    /// Detaches the mount at `path` if it is the one with device number `dev`; whether it was.
    fn detach_if(&self, path: &Path, dev: u64) -> std::io::Result<bool>;
    /// Detaches whatever is mounted at `path`.
    fn detach(&self, path: &Path) -> std::io::Result<()>;
    /// Whether the recorded daemon is still that process (pid and start time).
    fn alive(&self, rec: &Record) -> bool;
    /// Sends `signal` to the recorded daemon.
    fn signal(&self, rec: &Record, signal: Signal);
    fn sleep(&self, d: Duration);
}

/// How long a daemon gets to exit after SIGTERM, then after SIGKILL.
#[derive(Debug, Clone, Copy)]
pub struct StopDeadlines {
    pub term: Duration,
    pub kill: Duration,
    pub poll: Duration,
}

impl Default for StopDeadlines {
    fn default() -> Self {
        StopDeadlines { term: Duration::from_secs(10), kill: Duration::from_secs(5), poll: Duration::from_millis(20) }
    }
}

/// What [`stop_mount`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// Mounts detached here (the daemon detaches its own when it exits on SIGTERM).
    pub detached: Vec<PathBuf>,
    /// The daemon had to be killed (it did not exit on SIGTERM in time).
    pub killed: bool,
    /// The daemon was already gone: its stale record was removed.
    pub stale_record: bool,
}

/// Stops the mount recorded in `mount_dir` (its record `rec`): detaches its mount when it is
/// still ours or dead, stops its daemon, removes a dead daemon's record, detaches dead layer
/// mounts.
pub fn stop_mount(fx: &dyn Effects, mount_dir: &Path, rec: &Record, index: &MountIndex, deadlines: StopDeadlines) -> std::io::Result<Stopped> {
    let mut out = Stopped::default();
    let at = &rec.mountpoint;
    match rec.dev {
        Some(dev) => {
            if fx.detach_if(at, dev)? {
                out.detached.push(at.clone());
            } else if !fx.alive(rec) && fx.is_dead_mount(at) {
                // With the recorded daemon dead, the dead FUSE mount at its path is the one it left.
                fx.detach(at)?;
                out.detached.push(at.clone());
            }
        }
        // A record from before identities were kept.
        None if fx.is_mountpoint(at) => {
            fx.detach(at)?;
            out.detached.push(at.clone());
        }
        None => {}
    }
    if fx.alive(rec) {
        fx.signal(rec, Signal::Term);
        if !wait_gone(fx, rec, deadlines.term, deadlines.poll) {
            fx.signal(rec, Signal::Kill);
            out.killed = true;
            wait_gone(fx, rec, deadlines.kill, deadlines.poll);
        }
    } else {
        let _ = std::fs::remove_file(mount_dir.join("record.json"));
        index.unregister(at, mount_dir);
        out.stale_record = true;
    }
    // Layer mounts of an image's overlay: only dead ones (a live daemon detaches its own on the
    // way out; what is left at those paths of a dead daemon is dead too).
    for m in &rec.layer_mounts {
        if fx.is_dead_mount(m) && fx.detach(m).is_ok() {
            out.detached.push(m.clone());
        }
    }
    Ok(out)
}

fn wait_gone(fx: &dyn Effects, rec: &Record, deadline: Duration, poll: Duration) -> bool {
    let mut waited = Duration::ZERO;
    while fx.alive(rec) {
        if waited >= deadline {
            return false;
        }
        fx.sleep(poll);
        waited += poll;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    /// A mount table and one process, recording what is done to them.
    #[derive(Default)]
    struct Fake {
        /// path → (device, daemon answering)
        mounts: RefCell<std::collections::BTreeMap<PathBuf, (u64, bool)>>,
        alive: RefCell<bool>,
        /// The process exits this many polls after SIGTERM (None: ignores it).
        exits_after_term: Option<u32>,
        polls_since_term: RefCell<Option<u32>>,
        signals: RefCell<Vec<Signal>>,
    }

    impl Effects for Fake {
        fn is_mountpoint(&self, p: &Path) -> bool {
            self.mounts.borrow().contains_key(p)
        }
        fn is_dead_mount(&self, p: &Path) -> bool {
            self.mounts.borrow().get(p).is_some_and(|m| !m.1)
        }
        fn detach_if(&self, p: &Path, dev: u64) -> std::io::Result<bool> {
            let ours = self.mounts.borrow().get(p).is_some_and(|m| m.0 == dev);
            if ours {
                self.mounts.borrow_mut().remove(p);
            }
            Ok(ours)
        }
        fn detach(&self, p: &Path) -> std::io::Result<()> {
            self.mounts.borrow_mut().remove(p).map(drop).ok_or_else(|| std::io::Error::other("not mounted"))
        }
        fn alive(&self, _: &Record) -> bool {
            *self.alive.borrow()
        }
        fn signal(&self, _: &Record, s: Signal) {
            self.signals.borrow_mut().push(s);
            match s {
                Signal::Kill => *self.alive.borrow_mut() = false,
                Signal::Term => *self.polls_since_term.borrow_mut() = Some(0),
            }
        }
        fn sleep(&self, _: Duration) {
            let mut polls = self.polls_since_term.borrow_mut();
            if let Some(n) = polls.as_mut() {
                *n += 1;
                if self.exits_after_term.is_some_and(|after| *n >= after) {
                    *self.alive.borrow_mut() = false;
                    // A daemon that exits on SIGTERM detaches its own mounts (devices 77, 78).
                    self.mounts.borrow_mut().retain(|_, m| m.0 != 77 && m.0 != 78);
                }
            }
        }
    }

    fn record(dev: Option<u64>) -> Record {
        Record { pid: 4242, mountpoint: "/mnt/img".into(), source: "img".into(), layer_mounts: vec!["/mnt/.img/0".into()], overlay: true, dev, start_ticks: Some(7) }
    }

    fn setup(alive: bool, exits_after_term: Option<u32>) -> (Fake, tempfile::TempDir, MountIndex) {
        let fake = Fake { exits_after_term, ..Fake::default() };
        *fake.alive.borrow_mut() = alive;
        fake.mounts.borrow_mut().insert("/mnt/img".into(), (77, alive));
        fake.mounts.borrow_mut().insert("/mnt/.img/0".into(), (78, alive));
        let dir = tempfile::tempdir().unwrap();
        let index = MountIndex::at(dir.path().join("index"));
        (fake, dir, index)
    }

    const FAST: StopDeadlines = StopDeadlines { term: Duration::from_secs(1), kill: Duration::from_secs(1), poll: Duration::from_millis(100) };

    #[test]
    fn a_live_daemon_gets_sigterm_and_its_own_mount_is_detached() {
        let (fx, dir, index) = setup(true, Some(3));
        let s = stop_mount(&fx, dir.path(), &record(Some(77)), &index, FAST).unwrap();
        assert_eq!(*fx.signals.borrow(), [Signal::Term]);
        assert_eq!(s, Stopped { detached: vec!["/mnt/img".into()], killed: false, stale_record: false });
    }

    #[test]
    fn a_daemon_that_ignores_sigterm_is_killed_after_the_deadline() {
        let (fx, dir, index) = setup(true, None);
        let s = stop_mount(&fx, dir.path(), &record(Some(77)), &index, FAST).unwrap();
        assert_eq!(*fx.signals.borrow(), [Signal::Term, Signal::Kill]);
        assert!(s.killed);
    }

    #[test]
    fn a_newer_mount_at_the_same_path_is_never_detached() {
        let (fx, dir, index) = setup(true, Some(1));
        // Another mount (device 99) now sits at the path: ours (77) is gone.
        fx.mounts.borrow_mut().insert("/mnt/img".into(), (99, true));
        let s = stop_mount(&fx, dir.path(), &record(Some(77)), &index, FAST).unwrap();
        assert!(!s.detached.contains(&PathBuf::from("/mnt/img")));
        assert_eq!(fx.mounts.borrow().get(Path::new("/mnt/img")), Some(&(99, true)));
    }

    #[test]
    fn a_dead_daemon_is_not_signalled_its_dead_mounts_go_and_its_record_is_removed() {
        let (fx, dir, index) = setup(false, None);
        std::fs::write(dir.path().join("record.json"), "{}").unwrap();
        let mut rec = record(Some(55));
        rec.dev = Some(55); // the device changed (remount), but the mount there is dead
        let s = stop_mount(&fx, dir.path(), &rec, &index, FAST).unwrap();
        assert!(fx.signals.borrow().is_empty(), "a dead daemon's pid was signalled");
        let detached: BTreeSet<_> = s.detached.iter().cloned().collect();
        assert_eq!(detached, ["/mnt/img".into(), "/mnt/.img/0".into()].into());
        assert!(s.stale_record && !dir.path().join("record.json").exists());
    }

    #[test]
    fn records_without_identity_detach_whatever_is_there() {
        let (fx, dir, index) = setup(true, Some(1));
        let s = stop_mount(&fx, dir.path(), &record(None), &index, FAST).unwrap();
        assert_eq!(s.detached, [PathBuf::from("/mnt/img")]);
        assert_eq!(*fx.signals.borrow(), [Signal::Term]);
    }
}
