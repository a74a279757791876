//! On-demand activity on the link, shared by every layer daemon of one state directory.
//!
//! Each layer's background fill waits until its own readers have been quiet for a while (see
//! [`crate::fetcher`]), but the layers of one image are served by separate daemons over the same
//! link: while a container streams through its data layer, the base layer's daemon saw no reader
//! of its own and filled its 50 MB at full speed beside it. Measured on 100 Mbit/s: reading all
//! 500 MiB of test/big moved 574 MB instead of 526 MB in the same time. So every daemon also
//! marks its on-demand fetches in one small file of the state directory (its modification time,
//! touched at most every [`TOUCH_EVERY`]), and every fill also waits for that to be quiet. A
//! file, not a socket or shared memory: it needs no coordinator, survives any daemon dying, and
//! costs one `futimens` per 100 ms of demand and one `stat` per fill decision.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Demand is marked at most this often.
pub const TOUCH_EVERY: Duration = Duration::from_millis(100);

/// The shared demand marker of one state directory.
#[derive(Debug)]
pub struct LinkActivity {
    path: PathBuf,
    file: std::fs::File,
    /// When (µs after `epoch`) this process last touched the file.
    last_touch_us: AtomicU64,
    epoch: Instant,
}

impl LinkActivity {
    /// Opens (creating if needed) the marker file at `path`.
    pub fn open(path: &Path) -> std::io::Result<LinkActivity> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(LinkActivity {
            path: path.to_path_buf(),
            file,
            last_touch_us: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// Marks on-demand network activity now.
    pub fn note_demand(&self) {
        // Offset by one period, so that the first call always touches.
        let now = self.epoch.elapsed().as_micros() as u64 + TOUCH_EVERY.as_micros() as u64;
        let last = self.last_touch_us.load(Ordering::Relaxed);
        if now.saturating_sub(last) < TOUCH_EVERY.as_micros() as u64 {
            return;
        }
        if self.last_touch_us.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            let _ = self.file.set_modified(SystemTime::now());
        }
    }

    /// How long since any daemon of this state directory last marked demand (zero if unknown).
    pub fn quiet_for(&self) -> Duration {
        let marked = std::fs::metadata(&self.path).and_then(|m| m.modified());
        marked.ok().and_then(|t| SystemTime::now().duration_since(t).ok()).unwrap_or(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_marked_by_one_is_seen_by_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("link-demand");
        let a = LinkActivity::open(&path).unwrap();
        let b = LinkActivity::open(&path).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        assert!(b.quiet_for() >= Duration::from_millis(100));
        a.note_demand();
        assert!(b.quiet_for() < Duration::from_millis(100));
    }
}
