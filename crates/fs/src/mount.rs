//! Mounting a layer filesystem: the privileged side effect, kept to two functions.

use std::path::{Path, PathBuf};

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use crate::error::{Error, Result};
use crate::fs::LayerFs;

/// A mounted layer; dropping it unmounts.
pub struct MountedLayer {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

impl MountedLayer {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts and waits for the session thread.
    pub fn unmount(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(s) = self.session.take() {
            // Lazy detach first: a busy mount (a shell cd'ed into it) must not keep us alive.
            let _ = detach(&self.mountpoint);
            s.join().map_err(|e| Error::Mount {
                path: self.mountpoint.clone(),
                reason: format!("FUSE session ended with an error: {e}"),
            })?;
        }
        Ok(())
    }

    /// Blocks until the mount goes away (e.g. `umount` by someone else).
    pub fn wait(mut self) -> Result<()> {
        if let Some(s) = self.session.take() {
            s.join().map_err(|e| Error::Mount {
                path: self.mountpoint.clone(),
                reason: format!("FUSE session ended with an error: {e}"),
            })?;
        }
        Ok(())
    }

    /// Whether the session thread has ended (the mount is gone).
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Mounts `fs` read-only at `mountpoint`, served by `threads` worker threads.
///
/// Options: `allow_other` (containers run as other users), `suid` and `dev` (a rootfs holds
/// setuid binaries and device nodes), `default_permissions` (the kernel checks modes, as on
/// a local file system). No `auto_unmount`: it needs `fusermount3` and hung in trials here.
pub fn mount_layer(fs: LayerFs, mountpoint: &Path, fsname: &str, threads: usize) -> Result<MountedLayer> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(fsname.to_string()),
        MountOption::Subtype("lazypull".to_string()),
        MountOption::RO,
        MountOption::Suid,
        MountOption::Dev,
        MountOption::DefaultPermissions,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(threads.max(1));
    config.clone_fd = true;
    let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(|e| Error::Mount {
        path: mountpoint.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(MountedLayer {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
    })
}

/// Detaches whatever is mounted at `path` (`umount2(MNT_DETACH)`).
pub fn detach(path: &Path) -> Result<()> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(|e| Error::Mount {
        path: path.to_path_buf(),
        reason: format!("unmount: {e}"),
    })
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mountpoint(path: &Path) -> bool {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| unescape_mountinfo(m) == canon.as_os_str().to_string_lossy()))
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
