//! The snapshotter proper: containerd's overlayfs snapshotter semantics over our metadata store,
//! plus remote snapshots for lazily mountable layers. gRPC lives in [`crate::service`]; this
//! module is plain synchronous logic so it can be tested without containerd.
//!
//! Layout: `ROOT/snapshots/<id>/fs` (the layer or upper directory) and `ROOT/snapshots/<id>/work`
//! (overlayfs work directory of active snapshots); `ROOT/metadata.redb`.
//!
//! Remote snapshots follow the protocol containerd's unpacker and CRI speak with a remote
//! snapshotter: `Prepare` of an extraction key carrying `containerd.io/snapshot.ref` (the name
//! the layer will be committed under) and labels naming the image and layer. If the layer can be
//! mounted lazily, it is mounted, committed under that name, and `Prepare` answers
//! AlreadyExists so containerd skips download and extraction. Otherwise the snapshot is prepared
//! normally and the reason is logged and counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::filter::Filters;
use crate::meta::{now, Kind, Meta, Record, RemoteLayer};
pub use layer::NotLazy;

/// Label naming the snapshot a layer is to be committed as.
pub const TARGET_REF_LABEL: &str = "containerd.io/snapshot.ref";
/// Label set on remote snapshots.
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/remote";
/// Label set on snapshots the snapshotter fetched and unpacked itself (a layer of a SOCI
/// image without a zTOC); its value is why the layer was not lazy ([`NotLazy::label`]).
pub const UNPACKED_LABEL: &str = "lazypull.io/unpacked-by-snapshotter";

/// A mount as containerd wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Information about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub parent: String,
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    pub created: (i64, u32),
    pub updated: (i64, u32),
}

/// Lazily mounted layers: what the snapshotter needs from the lazy filesystem, behind a trait
/// so the snapshot logic is testable without FUSE or a registry.
pub trait Remote: Send + Sync {
    /// The remote layer the labels describe: `Ok(None)` when they name no image layer (a plain
    /// prepare), `Err(reason)` when they do but the layer cannot be mounted lazily.
    fn resolve(&self, labels: &BTreeMap<String, String>) -> std::result::Result<Option<RemoteLayer>, NotLazy>;
    /// Mounts the layer read-only at `dir`.
    fn mount(&self, layer: &RemoteLayer, dir: &Path) -> std::result::Result<(), NotLazy>;
    /// Unmounts what `mount` mounted at `dir`.
    fn unmount(&self, dir: &Path);
    /// Whether the layer mounted at `dir` is served right now: a mount point whose file system
    /// answers (a FUSE mount whose daemon died fails with ENOTCONN; a detached one is no mount
    /// point any more and would leave containerd an empty lower directory).
    fn is_live(&self, dir: &Path) -> bool {
        lazyfs::is_mountpoint(dir) && answers_within(dir, std::time::Duration::from_secs(2))
    }
    /// [`Remote::is_live`] of each of `dirs`, asked at once: every Prepare and Mounts of a
    /// container checks its whole chain, and one by one each FUSE round trip added up (~9 ms
    /// for 4 layers on a container's start path).
    fn are_live(&self, dirs: &[PathBuf]) -> Vec<bool> {
        if dirs.len() < 2 {
            return dirs.iter().map(|d| self.is_live(d)).collect();
        }
        std::thread::scope(|s| {
            let asked: Vec<_> = dirs.iter().map(|d| s.spawn(move || self.is_live(d))).collect();
            asked.into_iter().map(|h| h.join().unwrap_or(false)).collect()
        })
    }
    /// Frees cached data of layers no longer in `live` (called after a remote snapshot is
    /// removed, e.g. because its image was).
    fn collect_garbage(&self, _live: &[RemoteLayer]) {}
    /// Fetches the (small) layer the labels name and unpacks it into `dir`, for a layer that is
    /// not lazy only because its SOCI index has no zTOC for it (upstream SOCI unpacks those in
    /// the snapshotter too). Returns the blob's size; `Err` leaves it to containerd.
    fn unpack(&self, _labels: &BTreeMap<String, String>, _dir: &Path) -> std::result::Result<u64, String> {
        Err("this snapshotter does not unpack layers itself".into())
    }
}

/// Whether listing `dir` succeeds within `limit`. A daemon that is alive but stuck must not hang
/// the caller (Prepare holds the snapshotter's lock): past the limit it counts as alive — it is
/// not dead, and mounting a second daemon over it would not help — and the listing thread is
/// left to finish on its own.
pub fn answers_within(dir: &Path, limit: std::time::Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read_dir(&dir).is_ok());
    });
    rx.recv_timeout(limit).unwrap_or(true)
}

/// Counters exported as metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub remote_snapshots: std::sync::atomic::AtomicU64,
    /// Layers fetched and unpacked by the snapshotter itself ([`Remote::unpack`]).
    pub unpacked_snapshots: std::sync::atomic::AtomicU64,
    /// Fallbacks by [`NotLazy::label`] (a fixed set of labels).
    pub fallbacks: Mutex<BTreeMap<&'static str, u64>>,
}

pub struct Snapshotter {
    root: PathBuf,
    meta: Meta,
    remote: Option<Arc<dyn Remote>>,
    /// containerd calls concurrently; snapshot operations are short and serialized.
    lock: Mutex<()>,
    /// Serializes mounting remote snapshots again (see [`Snapshotter::ensure_served`]).
    remount: Mutex<()>,
    pub stats: Stats,
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::View => "view",
        Kind::Active => "active",
        Kind::Committed => "committed",
    }
}

impl Snapshotter {
    pub fn open(root: &Path, remote: Option<Arc<dyn Remote>>) -> Result<Snapshotter> {
        std::fs::create_dir_all(root.join("snapshots")).map_err(|e| Error::io("creating", root, e))?;
        // Remote snapshots are mounted with suid,dev (they are container root filesystems):
        // only root may reach them, as with containerd's own snapshotters.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).map_err(|e| Error::io("restricting", root, e))?;
        let meta = Meta::open(&root.join("metadata.redb"))?;
        Ok(Snapshotter {
            root: root.to_path_buf(),
            meta,
            remote,
            lock: Mutex::new(()),
            remount: Mutex::new(()),
            stats: Stats::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// The `fs` directory of snapshot `id`.
    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn info(name: &str, r: &Record) -> Info {
        Info {
            name: name.to_string(),
            parent: r.parent.clone(),
            kind: r.kind,
            labels: r.labels.clone(),
            created: r.created,
            updated: r.updated,
        }
    }

    fn fallback(&self, reason: &NotLazy, key: &str) {
        warn!(key, reason = %reason, label = reason.label(), "layer is not mounted lazily; falling back to a normal snapshot");
        *self.stats.fallbacks.lock().unwrap().entry(reason.label()).or_default() += 1;
    }

    /// `Prepare` (active, writable) or `View` (read-only).
    pub fn prepare(&self, key: &str, parent: &str, labels: BTreeMap<String, String>, kind: Kind) -> Result<Vec<Mount>> {
        let _g = self.lock.lock().unwrap();
        if kind == Kind::Active {
            if let (Some(target), Some(remote)) = (labels.get(TARGET_REF_LABEL).cloned(), self.remote.clone()) {
                if self.meta.get(&target)?.is_some() {
                    return Err(Error::AlreadyExists(target));
                }
                let resolving = std::time::Instant::now();
                match remote.resolve(&labels) {
                    Ok(None) => {}
                    Err(reason @ NotLazy::NoZtoc { .. }) => {
                        self.fallback(&reason, key);
                        if self.create_unpacked(&target, parent, &labels, &reason, remote.as_ref(), resolving) {
                            return Err(Error::AlreadyExists(target));
                        }
                    }
                    Err(reason) => self.fallback(&reason, key),
                    Ok(Some(layer)) => match self.create_remote(&target, parent, &labels, layer, remote.as_ref(), resolving) {
                        Ok(()) => return Err(Error::AlreadyExists(target)),
                        Err(reason) => self.fallback(&reason, key),
                    },
                }
            }
        }
        // Remote parents must be served before the snapshot is recorded: a Prepare that fails
        // with Unavailable must leave nothing behind for containerd's retry to trip over.
        if !parent.is_empty() {
            self.lowers(parent)?;
        }
        let tx = self.meta.write()?;
        if tx.get(key)?.is_some() {
            return Err(Error::AlreadyExists(key.to_string()));
        }
        if !parent.is_empty() {
            match tx.get(parent)? {
                None => return Err(Error::NotFound(parent.to_string())),
                Some(p) if p.kind != Kind::Committed => return Err(Error::FailedPrecondition(format!("parent {parent} is not a committed snapshot"))),
                Some(_) => {}
            }
        }
        let id = tx.next_id()?;
        let dir = self.dir(id);
        let mk = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir.join("fs"))?;
            if kind == Kind::Active {
                std::fs::create_dir_all(dir.join("work"))?;
            }
            Ok(())
        };
        mk().map_err(|e| Error::io("creating", &dir, e))?;
        let rec = Record::new(id, kind, parent, labels, None);
        if let Err(e) = tx.put(key, &rec).and_then(|_| tx.commit()) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.mounts_of(key, &rec)
    }

    /// `started`: when resolving began, for the log's timings (Prepare is on the pull's path).
    fn create_remote(&self, target: &str, parent: &str, labels: &BTreeMap<String, String>, layer: RemoteLayer, remote: &dyn Remote, started: std::time::Instant) -> std::result::Result<(), NotLazy> {
        let resolve_ms = started.elapsed().as_millis() as u64;
        let failed = |e: String| NotLazy::MountFailed(e);
        let tx = self.meta.write().map_err(|e| failed(e.to_string()))?;
        if !parent.is_empty() && tx.get(parent).map_err(|e| failed(e.to_string()))?.is_none() {
            return Err(failed(format!("parent {parent} does not exist")));
        }
        let id = tx.next_id().map_err(|e| failed(e.to_string()))?;
        let dir = self.dir(id);
        std::fs::create_dir_all(dir.join("fs")).map_err(|e| failed(format!("creating {}: {e}", dir.display())))?;
        let mounting = std::time::Instant::now();
        if let Err(reason) = remote.mount(&layer, &dir.join("fs")) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(reason);
        }
        let mount_ms = mounting.elapsed().as_millis() as u64;
        let mut labels = labels.clone();
        labels.insert(REMOTE_LABEL.to_string(), "remote snapshot".to_string());
        let rec = Record::new(id, Kind::Committed, parent, labels, Some(layer.clone()));
        if let Err(e) = tx.put(target, &rec).and_then(|_| tx.commit()) {
            remote.unmount(&dir.join("fs"));
            let _ = std::fs::remove_dir_all(&dir);
            return Err(failed(e.to_string()));
        }
        self.stats.remote_snapshots.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(name = target, image = %layer.image_ref, layer = %layer.digest, resolve_ms, mount_ms, total_ms = started.elapsed().as_millis() as u64, "remote snapshot mounted lazily");
        Ok(())
    }

    /// Commits `target` with the layer the labels name fetched and unpacked by `remote` (see
    /// [`Remote::unpack`]); false, with nothing left behind, if it could not (containerd then
    /// fetches and unpacks the layer as for any other fallback).
    ///
    /// Why here rather than in containerd: containerd unpacks into an overlay of the lazy layers
    /// below (each new file a lookup through their FUSE daemons) and hashes the tar for its
    /// DiffID, one more round trip of the pull each; 1022 small files took 135 ms that way and
    /// far less straight into the snapshot's directory. The blob is checked against its digest
    /// as it is fetched.
    fn create_unpacked(&self, target: &str, parent: &str, labels: &BTreeMap<String, String>, reason: &NotLazy, remote: &dyn Remote, started: std::time::Instant) -> bool {
        let attempt = || -> std::result::Result<u64, String> {
            let tx = self.meta.write().map_err(|e| e.to_string())?;
            if !parent.is_empty() && tx.get(parent).map_err(|e| e.to_string())?.is_none() {
                return Err(format!("parent {parent} does not exist"));
            }
            let id = tx.next_id().map_err(|e| e.to_string())?;
            let dir = self.dir(id);
            let done = (|| {
                std::fs::create_dir_all(dir.join("fs")).map_err(|e| format!("creating {}: {e}", dir.display()))?;
                let bytes = remote.unpack(labels, &dir.join("fs"))?;
                let mut labels = labels.clone();
                labels.insert(UNPACKED_LABEL.to_string(), reason.label().to_string());
                let rec = Record::new(id, Kind::Committed, parent, labels, None);
                tx.put(target, &rec).and_then(|_| tx.commit()).map_err(|e| e.to_string())?;
                Ok(bytes)
            })();
            if done.is_err() {
                let _ = std::fs::remove_dir_all(&dir);
            }
            done
        };
        match attempt() {
            Ok(bytes) => {
                self.stats.unpacked_snapshots.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                info!(name = target, bytes, reason = %reason, total_ms = started.elapsed().as_millis() as u64, "layer fetched and unpacked by the snapshotter");
                true
            }
            Err(e) => {
                warn!(name = target, error = %e, "the snapshotter did not unpack the layer itself; containerd will");
                false
            }
        }
    }

    /// Committed ancestors' `fs` directories, nearest first. Remote ancestors are checked to be
    /// served (all at once), and mounted again if not: containerd must never get an empty
    /// lower directory.
    fn lowers(&self, parent: &str) -> Result<Vec<PathBuf>> {
        let mut chain = Vec::new();
        let mut p = parent.to_string();
        while !p.is_empty() {
            let r = self.meta.get(&p)?.ok_or_else(|| Error::NotFound(p.clone()))?;
            let next = r.parent.clone();
            chain.push((p, r));
            p = next;
        }
        if let Some(remote) = &self.remote {
            let served: Vec<(&str, &RemoteLayer, PathBuf)> = chain.iter().filter_map(|(name, r)| r.remote.as_ref().map(|l| (name.as_str(), l, self.fs_dir(r.id)))).collect();
            let dirs: Vec<PathBuf> = served.iter().map(|s| s.2.clone()).collect();
            for ((name, layer, dir), live) in served.iter().zip(remote.are_live(&dirs)) {
                if !live {
                    self.ensure_served(name, layer, dir)?;
                }
            }
        }
        Ok(chain.iter().map(|(_, r)| self.fs_dir(r.id)).collect())
    }

    /// Mounts remote snapshot `name` at `dir` again unless its mount is live (its daemon died,
    /// or the node rebooted and something detached it).
    pub fn ensure_served(&self, name: &str, layer: &RemoteLayer, dir: &Path) -> Result<()> {
        let Some(remote) = &self.remote else { return Ok(()) };
        if remote.is_live(dir) {
            return Ok(());
        }
        let _g = self.remount.lock().unwrap();
        if remote.is_live(dir) {
            return Ok(());
        }
        if lazyfs::is_mountpoint(dir) {
            let _ = lazyfs::detach(dir);
        }
        match remote.mount(layer, dir) {
            Ok(()) => {
                info!(name, layer = %layer.digest, "remote snapshot mounted again");
                Ok(())
            }
            Err(reason) => {
                warn!(name, layer = %layer.digest, %reason, "cannot mount remote snapshot again");
                Err(Error::Unavailable(format!("remote snapshot {name} (layer {}) is not served and cannot be mounted again: {reason}", layer.digest)))
            }
        }
    }

    fn mounts_of(&self, _key: &str, r: &Record) -> Result<Vec<Mount>> {
        let lowers = self.lowers(&r.parent)?;
        let path = |p: &Path| p.display().to_string();
        let fs = self.fs_dir(r.id);
        let m = match (r.kind, lowers.len()) {
            (Kind::Active, 0) => Mount {
                kind: "bind".into(),
                source: path(&fs),
                options: vec!["rw".into(), "rbind".into()],
            },
            (Kind::Active, _) => Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    "index=off".into(),
                    format!("workdir={}", path(&self.dir(r.id).join("work"))),
                    format!("upperdir={}", path(&fs)),
                    format!("lowerdir={}", lowers.iter().map(|l| path(l)).collect::<Vec<_>>().join(":")),
                ],
            },
            (_, 0) => Mount {
                kind: "bind".into(),
                source: path(&fs),
                options: vec!["ro".into(), "rbind".into()],
            },
            (_, 1) => Mount {
                kind: "bind".into(),
                source: path(&lowers[0]),
                options: vec!["ro".into(), "rbind".into()],
            },
            (_, _) => Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![format!("lowerdir={}", lowers.iter().map(|l| path(l)).collect::<Vec<_>>().join(":"))],
            },
        };
        Ok(vec![m])
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let r = self.meta.get(key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
        if r.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!("snapshot {key} is committed; mounts are for active snapshots and views")));
        }
        self.mounts_of(key, &r)
    }

    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        let _g = self.lock.lock().unwrap();
        let tx = self.meta.write()?;
        let r = tx.get(key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
        if r.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!("snapshot {key} is not active")));
        }
        if tx.get(name)?.is_some() {
            return Err(Error::AlreadyExists(name.to_string()));
        }
        let (size, inodes) = disk_usage(&self.fs_dir(r.id));
        let t = now();
        let rec = Record {
            kind: Kind::Committed,
            labels,
            created: t,
            updated: t,
            size,
            inodes,
            ..r
        };
        tx.delete(key)?;
        tx.put(name, &rec)?;
        tx.commit()?;
        let _ = std::fs::remove_dir_all(self.dir(rec.id).join("work"));
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        let _g = self.lock.lock().unwrap();
        let tx = self.meta.write()?;
        let r = tx.get(key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
        if let Some((child, _)) = tx.all()?.into_iter().find(|(_, c)| c.parent == key) {
            return Err(Error::FailedPrecondition(format!("snapshot {key} has a child ({child}); remove it first")));
        }
        tx.delete(key)?;
        tx.commit()?;
        self.remove_dir(r.id, r.remote.is_some());
        if r.remote.is_some() {
            if let Some(rm) = &self.remote {
                let live: Vec<RemoteLayer> = self.meta.all()?.into_iter().filter_map(|(_, r)| r.remote).collect();
                rm.collect_garbage(&live);
            }
        }
        Ok(())
    }

    fn remove_dir(&self, id: u64, remote: bool) {
        let dir = self.dir(id);
        if remote {
            if let Some(rm) = &self.remote {
                rm.unmount(&dir.join("fs"));
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %dir.display(), error = %e, "removing snapshot directory (Cleanup will retry)");
            }
        }
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        let r = self.meta.get(key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
        Ok(Self::info(key, &r))
    }

    /// Updates labels: `paths` empty or `labels` replaces them all; `labels.KEY` sets or (when
    /// absent from `labels`) removes one.
    pub fn update(&self, key: &str, labels: BTreeMap<String, String>, paths: &[String]) -> Result<Info> {
        let _g = self.lock.lock().unwrap();
        let tx = self.meta.write()?;
        let mut r = tx.get(key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
        if paths.is_empty() {
            r.labels = labels;
        } else {
            for p in paths {
                if p == "labels" {
                    r.labels = labels.clone();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) => {
                            r.labels.insert(k.to_string(), v.clone());
                        }
                        None => {
                            r.labels.remove(k);
                        }
                    }
                } else {
                    return Err(Error::InvalidArgument(format!("cannot update field {p:?} of a snapshot (only labels)")));
                }
            }
        }
        r.updated = now();
        tx.put(key, &r)?;
        tx.commit()?;
        Ok(Self::info(key, &r))
    }

    /// (bytes, inodes) used by the snapshot's own directory.
    pub fn usage(&self, key: &str) -> Result<(i64, i64)> {
        let r = self.meta.get(key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
        Ok(match r.kind {
            Kind::Committed => (r.size, r.inodes),
            _ => disk_usage(&self.fs_dir(r.id)),
        })
    }

    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let f = Filters::parse(filters)?;
        Ok(self
            .meta
            .all()?
            .into_iter()
            .filter(|(k, r)| f.matches(k, &r.parent, kind_name(r.kind), &r.labels))
            .map(|(k, r)| Self::info(&k, &r))
            .collect())
    }

    /// Removes snapshot directories no record refers to (left by crashes or failed removals).
    pub fn cleanup(&self) -> Result<()> {
        let _g = self.lock.lock().unwrap();
        let ids: std::collections::HashSet<u64> = self.meta.all()?.into_iter().map(|(_, r)| r.id).collect();
        let dir = self.root.join("snapshots");
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io("listing", &dir, e))?.flatten() {
            let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else { continue };
            if !ids.contains(&id) {
                info!(id, "cleanup: removing orphaned snapshot directory");
                let fs = e.path().join("fs");
                if lazyfs::is_mountpoint(&fs) {
                    let _ = nix::mount::umount2(&fs, nix::mount::MntFlags::MNT_DETACH);
                }
                self.remove_dir(id, false);
            }
        }
        Ok(())
    }

    /// Every committed remote snapshot: (name, fs dir, layer), for remounting after a restart.
    pub fn remote_snapshots(&self) -> Result<Vec<(String, PathBuf, RemoteLayer)>> {
        Ok(self.meta.all()?.into_iter().filter_map(|(k, r)| r.remote.clone().map(|l| (k, self.fs_dir(r.id), l))).collect())
    }
}

/// Bytes (allocated blocks) and inodes under `dir`, each inode counted once.
fn disk_usage(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let (mut size, mut inodes) = (0i64, 0i64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if seen.insert((m.dev(), m.ino())) {
                inodes += 1;
                size += (m.blocks() * 512) as i64;
            }
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (size, inodes)
}
