//! The socket containerd connects to: handed over by the supervisor (systemd socket
//! activation) or bound by us.
//!
//! Why socket activation matters: containerd's proxy-plugin client is a gRPC channel. When the
//! snapshotter restarts and its socket refuses connections for a moment, that channel enters
//! reconnect back-off (containerd caps it at a few seconds), and every call in that window
//! fails at once, even after the new process is up. With a socket held open by systemd, the
//! socket never refuses: connects queue in its backlog while the process restarts and calls
//! wait instead of failing. Without activation we bind at once at start (before any slow
//! recovery work), removing a stale socket file left by a crash, which keeps the window small
//! but cannot close it.
//!
//! The protocol (sd_listen_fds(3)): `LISTEN_PID` is our pid, `LISTEN_FDS` the number of
//! descriptors passed from fd 3 on, `LISTEN_FDNAMES` optional names. We take the one unix
//! stream socket that listens, mark it close-on-exec (layer daemons must not inherit it) and
//! remove the variables so that children do not see them.

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// First descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Where the listening socket came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Passed by the supervisor (socket activation); the bound path, if it has one.
    Activated(Option<PathBuf>),
    /// Bound by us at this path.
    Bound(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("socket activation: {0}")]
    Activation(String),
    #[error("binding {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("{0} is served by another process (another snapshotter is running?)")]
    InUse(PathBuf),
}

/// The listening socket: the activated one if the supervisor passed one, otherwise a fresh
/// socket bound at `path` (a stale file there, left by a crash, is removed first).
pub fn listen(path: &Path) -> Result<(UnixListener, Origin), ListenError> {
    let env = |k: &str| std::env::var(k).ok();
    if let Some(listener) = take_activated(env("LISTEN_PID"), env("LISTEN_FDS"), std::process::id())? {
        for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(k);
        }
        let bound = listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf));
        return Ok((listener, Origin::Activated(bound)));
    }
    let bind_err = |source| ListenError::Bind { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    // A socket file that still answers belongs to a running snapshotter: taking it over would
    // silently cut containerd off from it (and two would share one root).
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ListenError::InUse(path.to_path_buf()));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(bind_err(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    Ok((listener, Origin::Bound(path.to_path_buf())))
}

/// The activated listener, if the variables are for this process. Pure in its inputs but for
/// the descriptors themselves.
fn take_activated(pid: Option<String>, fds: Option<String>, our_pid: u32) -> Result<Option<UnixListener>, ListenError> {
    let (Some(pid), Some(fds)) = (pid, fds) else { return Ok(None) };
    // Variables meant for another process (e.g. inherited through a shell): not ours.
    if pid.trim().parse::<u32>().ok() != Some(our_pid) {
        return Ok(None);
    }
    let n: RawFd = fds.trim().parse().map_err(|_| ListenError::Activation(format!("LISTEN_FDS={fds:?} is not a number")))?;
    if !(1..=64).contains(&n) {
        return Err(ListenError::Activation(format!("LISTEN_FDS={n}: expected at least one descriptor")));
    }
    let mut found = None;
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + n {
        // Every passed descriptor is ours now: none may leak into layer daemons.
        // SAFETY: fcntl on an integer descriptor has no memory effects.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        if found.is_none() && is_listening_unix_stream(fd) {
            found = Some(fd);
        }
    }
    let Some(fd) = found else {
        return Err(ListenError::Activation(format!("none of the {n} passed descriptors is a listening unix stream socket")));
    };
    // SAFETY: the supervisor passed this descriptor to us for our exclusive use, and it was
    // checked to be a listening unix stream socket.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    Ok(Some(listener))
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of the sizes given.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
    (r == 0).then_some(v)
}

fn is_listening_unix_stream(fd: RawFd) -> bool {
    sockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX) && sockopt(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM) && sockopt(fd, libc::SO_ACCEPTCONN) == Some(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_for_another_process_are_ignored() {
        assert!(take_activated(Some("1".into()), Some("1".into()), 2).unwrap().is_none());
        assert!(take_activated(None, Some("1".into()), 2).unwrap().is_none());
        assert!(take_activated(Some("2".into()), None, 2).unwrap().is_none());
    }

    #[test]
    fn bad_counts_are_named() {
        let e = take_activated(Some("7".into()), Some("x".into()), 7).unwrap_err().to_string();
        assert!(e.contains("LISTEN_FDS=\"x\""), "{e}");
        let e = take_activated(Some("7".into()), Some("0".into()), 7).unwrap_err().to_string();
        assert!(e.contains("LISTEN_FDS=0"), "{e}");
    }

    #[test]
    fn binding_replaces_a_stale_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (first, origin) = listen(&path).unwrap();
        assert_eq!(origin, Origin::Bound(path.clone()));
        drop(first); // as after kill -9: the file stays, nobody listens
        assert!(path.exists());
        let (second, _) = listen(&path).unwrap();
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(second.accept().is_ok());
        // While it listens, a second process refuses to take the socket over.
        let e = listen(&path).unwrap_err();
        assert!(matches!(e, ListenError::InUse(_)), "{e}");
    }
}
