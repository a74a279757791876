//! Mounting a layer filesystem: the privileged side effect, kept to two functions.

use std::path::{Path, PathBuf};

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;

use fuser::{BackgroundSession, Config, SessionACL};
use nix::mount::MsFlags;

use crate::error::{Error, Result};
use crate::fs::LayerFs;

/// A mounted layer; dropping it unmounts *this* mount (and nothing that replaced it).
///
/// Why we mount ourselves instead of letting fuser do it: fuser unmounts by path when its
/// session ends. After a node reboot or a snapshotter restart, an old daemon whose mount was
/// detached (`umount -l`) can still be on its way out while a new daemon has mounted the same
/// layer at the same path; an unmount by path then removes the *new* mount and containerd gets
/// an empty lower directory. So the mount is made here with mount(2), its identity (the device
/// number of the mounted FUSE superblock) is recorded, and every unmount checks that identity
/// first ([`MountedLayer::detach_own`]).
///
/// The device number alone is not an identity: it is an anonymous device freed when the
/// superblock dies and handed out again, lowest first, to the next mount — typically the
/// replacement at the same path. So the identity is "our FUSE connection is still up *and* the
/// path's device is the one it got": while our connection lives, its superblock (and device
/// number) cannot belong to anyone else.
pub struct MountedLayer {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    /// `st_dev` of the mount's root.
    dev: u64,
    /// A second descriptor of our /dev/fuse connection, to ask whether it is still up.
    conn: std::fs::File,
}

impl MountedLayer {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Device number of the mounted file system (its identity).
    pub fn dev(&self) -> u64 {
        self.dev
    }

    /// Unmounts and waits for the session thread.
    pub fn unmount(mut self) -> Result<()> {
        self.finish()
    }

    /// Lazily detaches the mount at our mount point if it is still ours; `Ok(false)` when the
    /// path holds something else (already detached, or another daemon's newer mount).
    pub fn detach_own(&self) -> Result<bool> {
        if !connection_alive(&self.conn) {
            return Ok(false);
        }
        detach_if(&self.mountpoint, self.dev)
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(s) = self.session.take() {
            // Lazy detach first: a busy mount (a shell cd'ed into it) must not keep us alive.
            let _ = self.detach_own();
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

    /// Whether the session thread has ended (the kernel closed the connection: the mount is
    /// gone and nothing references it any more).
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Whether our mount is still attached at the mount point (not detached or replaced).
    pub fn is_attached(&self) -> bool {
        connection_alive(&self.conn) && carries(&self.mountpoint, self.dev)
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Whether set-user-ID bits, file capabilities and device nodes of a layer take effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privileges {
    /// `nosuid,nodev` (the default for mounts a user asks for): an image's setuid binaries
    /// and device nodes are inert, so a hostile image gives no local user anything.
    Ignore,
    /// `suid,dev`: a container root filesystem's lower layer, where setuid binaries must work
    /// as on any rootfs. Only for mounts below a root-only directory (the snapshotter's), so
    /// only the container sees them.
    Honour,
}

/// Mounts `fs` read-only at `mountpoint`, served by `threads` worker threads.
///
/// Options: `allow_other` (containers run as other users), `default_permissions` (the kernel
/// checks modes, as on a local file system), `nosuid,nodev` unless `privileges` is
/// [`Privileges::Honour`]. No `auto_unmount`: it needs `fusermount3` and hung in trials here.
pub fn mount_layer(fs: LayerFs, mountpoint: &Path, fsname: &str, threads: usize, privileges: Privileges) -> Result<MountedLayer> {
    let err = |reason: String| Error::Mount { path: mountpoint.to_path_buf(), reason };
    let dev_fuse = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").map_err(|e| err(format!("opening /dev/fuse: {e} (is the fuse module loaded?)")))?;
    let root_mode = std::fs::metadata(mountpoint).map_err(|e| err(format!("stat: {e}")))?.permissions().mode() & libc::S_IFMT;
    let data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},allow_other,default_permissions",
        dev_fuse.as_raw_fd(),
        root_mode,
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    let mut flags = MsFlags::MS_RDONLY;
    if privileges == Privileges::Ignore {
        flags |= MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    }
    nix::mount::mount(Some(fsname), mountpoint, Some("fuse.lazypull"), flags, Some(data.as_str())).map_err(|e| err(format!("mount(2): {e}")))?;
    let mut config = Config::default();
    config.acl = SessionACL::All;
    config.n_threads = Some(threads.max(1));
    config.clone_fd = true;
    let conn = match dev_fuse.try_clone() {
        Ok(c) => c,
        Err(e) => {
            let _ = detach(mountpoint);
            return Err(err(format!("duplicating the /dev/fuse descriptor: {e}")));
        }
    };
    // From here on the mount exists: any failure must take it away again.
    let started = fuser::Session::from_fd(fs, OwnedFd::from(dev_fuse), SessionACL::All, config).and_then(|s| s.spawn());
    let session = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = detach(mountpoint);
            return Err(err(format!("starting the FUSE session: {e}")));
        }
    };
    // The root's attributes come from our session, which now runs.
    let dev = match std::fs::symlink_metadata(mountpoint) {
        Ok(m) => std::os::unix::fs::MetadataExt::dev(&m),
        Err(e) => {
            let _ = detach(mountpoint);
            return Err(err(format!("stat after mount: {e}")));
        }
    };
    Ok(MountedLayer { session: Some(session), mountpoint: mountpoint.to_path_buf(), dev, conn })
}

/// Whether the FUSE connection behind `dev_fuse` is up: the kernel reports POLLERR on the
/// device once the connection is aborted, which happens when its superblock is destroyed.
fn connection_alive(dev_fuse: &std::fs::File) -> bool {
    use std::os::fd::AsFd;
    loop {
        let mut fds = [nix::poll::PollFd::new(dev_fuse.as_fd(), nix::poll::PollFlags::empty())];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
            Ok(0) => return true,
            Ok(_) => return !fds[0].revents().is_some_and(|r| r.intersects(nix::poll::PollFlags::POLLERR | nix::poll::PollFlags::POLLHUP | nix::poll::PollFlags::POLLNVAL)),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Detaches the mount at `path` only if its root is device `dev` (the identity recorded when
/// it was mounted); `Ok(false)` if `path` holds something else.
pub fn detach_if(path: &Path, dev: u64) -> Result<bool> {
    if carries(path, dev) {
        detach(path).map(|()| true)
    } else {
        Ok(false)
    }
}

/// Whether `path` is a mount point whose root is device `dev`. An identity only while the
/// caller keeps that device's superblock alive (a FUSE connection, an open descriptor): a freed
/// device number goes to the next mount.
pub fn carries(path: &Path, dev: u64) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::MetadataExt::dev(&m) == dev) && is_mountpoint(path)
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
    // The parent, not the path itself: canonicalizing a dead FUSE mount's root fails (ENOTCONN),
    // and a dead mount is exactly what callers look for.
    let canon = match (path.parent().filter(|p| !p.as_os_str().is_empty()), path.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent).map(|p| p.join(name)).unwrap_or_else(|_| path.to_path_buf()),
        _ => std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| unescape_mountinfo(m) == canon.as_os_str().to_string_lossy()))
}

/// A mount point as `/proc/self/mountinfo` writes it (space, tab, newline and backslash as
/// `\ooo` octal escapes), unescaped.
pub fn unescape_mountinfo(s: &str) -> String {
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
