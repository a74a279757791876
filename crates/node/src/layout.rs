//! Paths of a state directory, and the node-wide index of mounts.

use std::path::{Path, PathBuf};

use index::Digest;

/// A state directory (`--state-dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir(pub PathBuf);

/// The short stable name of a mountpoint: 16 hex digits of the sha256 of its canonical path.
pub fn mount_name(mountpoint: &Path) -> String {
    let canon = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    Digest::of(canon.as_os_str().as_encoded_bytes()).hex()[..16].to_string()
}

impl StateDir {
    pub fn new(path: impl Into<PathBuf>) -> StateDir {
        StateDir(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The chunk store's directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.0.join("cache")
    }

    /// Where layers' footers and indexes are cached (`store::TailCache`), shared by the
    /// snapshotter, which reads them ahead, and the layer daemons.
    pub fn tails_dir(&self) -> PathBuf {
        self.0.join("tails")
    }

    /// The link-demand file the layers on one link share (`store::LinkActivity`).
    pub fn link_demand(&self) -> PathBuf {
        self.0.join("link-demand")
    }

    /// Directory of the chunk-reference files, one per layer blob.
    pub fn refs_dir(&self) -> PathBuf {
        self.0.join("refs")
    }

    /// Where a layer's chunk references live (see [`crate::refs`]).
    pub fn refs_path(&self, blob_digest: &str) -> PathBuf {
        self.refs_dir().join(blob_digest.trim_start_matches("sha256:"))
    }

    /// Directory of the mounts' records, status files and logs.
    pub fn mounts_dir(&self) -> PathBuf {
        self.0.join("mounts")
    }

    /// The directory of the mount at `mountpoint`.
    pub fn mount_dir(&self, mountpoint: &Path) -> PathBuf {
        self.mounts_dir().join(mount_name(mountpoint))
    }
}

/// The node-wide index of mounts: one symlink per mountpoint to its mount directory, so that a
/// mount made with any `--state-dir` is found from its mountpoint alone. It lives under `/run`
/// (a tmpfs: it goes with the mounts at reboot); `LAZYPULL_RUN_DIR` moves it (tests, non-root).
#[derive(Debug, Clone)]
pub struct MountIndex(PathBuf);

impl Default for MountIndex {
    fn default() -> Self {
        let run = std::env::var_os("LAZYPULL_RUN_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/run/lazypull"));
        MountIndex(run.join("mounts"))
    }
}

impl MountIndex {
    pub fn at(dir: impl Into<PathBuf>) -> MountIndex {
        MountIndex(dir.into())
    }

    /// Records that the mount at `mountpoint` keeps its files in `mount_dir`.
    pub fn register(&self, mountpoint: &Path, mount_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.0)?;
        let link = self.0.join(mount_name(mountpoint));
        let target = std::fs::canonicalize(mount_dir)?;
        let tmp = self.0.join(format!(".{}.{}", mount_name(mountpoint), std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp)?;
        std::fs::rename(&tmp, &link)
    }

    /// The mount directory recorded for `mountpoint`, if any.
    pub fn find(&self, mountpoint: &Path) -> Option<PathBuf> {
        std::fs::read_link(self.0.join(mount_name(mountpoint))).ok()
    }

    /// Forgets `mountpoint`, if it still points at `mount_dir`.
    pub fn unregister(&self, mountpoint: &Path, mount_dir: &Path) {
        let link = self.0.join(mount_name(mountpoint));
        let ours = std::fs::read_link(&link).ok().zip(std::fs::canonicalize(mount_dir).ok()).is_some_and(|(a, b)| a == b);
        if ours {
            let _ = std::fs::remove_file(link);
        }
    }

    /// Where the files of the mount at `mountpoint` are: under `state` when it holds them,
    /// otherwise wherever the node-wide index says; `state`'s path when neither knows it.
    pub fn locate(&self, state: &StateDir, mountpoint: &Path) -> PathBuf {
        let here = state.mount_dir(mountpoint);
        if here.join("record.json").exists() || here.join("status.json").exists() {
            return here;
        }
        self.find(mountpoint).filter(|d| d.is_dir()).unwrap_or(here)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_is_found_from_another_state_dir_through_the_index() {
        let tmp = tempfile::tempdir().unwrap();
        let index = MountIndex::at(tmp.path().join("run"));
        let (a, b) = (StateDir::new(tmp.path().join("a")), StateDir::new(tmp.path().join("b")));
        let mp = tmp.path().join("mnt");
        std::fs::create_dir_all(&mp).unwrap();
        let dir = a.mount_dir(&mp);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("record.json"), "{}").unwrap();
        assert_eq!(index.locate(&b, &mp), b.mount_dir(&mp), "unknown before registration");
        index.register(&mp, &dir).unwrap();
        assert_eq!(index.locate(&b, &mp), std::fs::canonicalize(&dir).unwrap());
        assert_eq!(index.locate(&a, &mp), dir, "the given state dir wins when it holds the mount");
        index.unregister(&mp, &b.mount_dir(&mp));
        assert!(index.find(&mp).is_some(), "only the registered directory unregisters");
        index.unregister(&mp, &dir);
        assert!(index.find(&mp).is_none());
    }

    #[test]
    fn paths_follow_the_documented_layout() {
        let s = StateDir::new("/s");
        assert_eq!(s.refs_path("sha256:ab"), Path::new("/s/refs/ab"));
        assert_eq!(s.tails_dir(), Path::new("/s/tails"));
        assert_eq!(s.mount_dir(Path::new("/nonexistent/x")).parent().unwrap(), Path::new("/s/mounts"));
        assert_eq!(mount_name(Path::new("/nonexistent/x")).len(), 16);
    }
}
