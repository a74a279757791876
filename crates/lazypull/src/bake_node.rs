//! The private node `lazypull bake` pulls into: a containerd and a lazypull snapshotter whose
//! roots are the volume's directories, and whose sockets and state live under a run directory
//! of their own, so baking never touches (or needs) the machine's own containerd.
//!
//! Why real daemons and not a writer of containerd's files: containerd's metadata database and
//! content store are its private format; pulling through the real containerd (the same version
//! the nodes run) is the only way the volume's images are exactly what that containerd would
//! have written, labels, leases and GC references included. Stopping is the delicate part: a
//! volume is only complete once containerd has closed its database, the snapshotter has exited
//! and every layer daemon has unmounted its FUSE file system (the snapshotter leaves them
//! running on purpose, and `mkfs.ext4 -d` must copy the directories, not the FUSE views).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a daemon gets to come up or to exit after SIGTERM.
const DAEMON_DEADLINE: Duration = Duration::from_secs(30);

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped, so an error in the
/// middle of a bake leaves no daemon behind.
struct Daemon {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Result<Daemon> {
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).spawn().with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Daemon { name, child: Some(child), log })
    }

    /// Fails (with the end of its log) if the process has exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(c) = &mut self.child {
            if let Some(status) = c.try_wait()? {
                self.child = None;
                bail!("{} exited ({status}):\n{}", self.name, log_tail(&self.log));
            }
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        let Some(mut c) = self.child.take() else { return Ok(()) };
        // SAFETY: signal delivery to our own child, not yet reaped.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + DAEMON_DEADLINE;
        loop {
            if let Some(status) = c.try_wait()? {
                if !status.success() && status.code().is_some() {
                    tracing::warn!(daemon = self.name, %status, "exited with an error on SIGTERM");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("{} did not exit within {} s of SIGTERM; killed it:\n{}", self.name, DAEMON_DEADLINE.as_secs(), log_tail(&self.log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// containerd + snapshotter over a volume's directories.
pub(crate) struct BakeNode {
    /// Dropped first: containerd before the snapshotter it calls.
    containerd: Daemon,
    snapshotter: Daemon,
    pub containerd_socket: PathBuf,
    /// The snapshotter's root (the volume's `lazypull/`).
    pub lazypull_root: PathBuf,
    run_dir: PathBuf,
}

pub(crate) struct NodeSpec<'a> {
    pub containerd_bin: &'a Path,
    pub containerd_root: &'a Path,
    pub lazypull_root: &'a Path,
    /// The snapshotter's TOML settings (the user's, with bake's overrides).
    pub snapshotter_config: &'a str,
    pub registry_args: Vec<std::ffi::OsString>,
}

impl BakeNode {
    pub fn start(spec: &NodeSpec) -> Result<BakeNode> {
        let run_dir = PathBuf::from(format!("/run/lazypull-bake-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let snap_sock = run_dir.join("lazypull.sock");
        let snap_cfg = run_dir.join("snapshotter.toml");
        std::fs::write(&snap_cfg, spec.snapshotter_config)?;
        let mut cmd = Command::new(std::env::current_exe().context("locating the lazypull binary")?);
        cmd.arg("snapshotter").arg("--config").arg(&snap_cfg).arg("--root").arg(spec.lazypull_root).arg("--address").arg(&snap_sock).args(&spec.registry_args);
        let snapshotter = Daemon::spawn("the lazypull snapshotter", cmd, run_dir.join("snapshotter.log"))?;

        let containerd_socket = run_dir.join("containerd.sock");
        let q = |p: &Path| serde_json::to_string(&p.to_string_lossy()).expect("a path serializes");
        let config = format!(
            r#"version = 2
root = {root}
state = {state}
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = {sock}

[ttrpc]
  address = {ttrpc}

[proxy_plugins.lazypull]
  type = "snapshot"
  address = {snap}
"#,
            root = q(spec.containerd_root),
            state = q(&run_dir.join("containerd-state")),
            sock = q(&containerd_socket),
            ttrpc = q(&run_dir.join("containerd.sock.ttrpc")),
            snap = q(&snap_sock),
        );
        let ctd_cfg = run_dir.join("containerd.toml");
        std::fs::write(&ctd_cfg, config)?;
        let mut cmd = Command::new(spec.containerd_bin);
        cmd.arg("--config").arg(&ctd_cfg);
        let containerd = Daemon::spawn("containerd", cmd, run_dir.join("containerd.log"))?;
        let mut node = BakeNode { containerd, snapshotter, containerd_socket, lazypull_root: spec.lazypull_root.to_path_buf(), run_dir };
        node.wait_ready()?;
        Ok(node)
    }

    /// Waits for the real condition: a snapshots call through containerd to our snapshotter
    /// succeeds (containerd serves, and reaches the proxy plugin).
    fn wait_ready(&mut self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let deadline = Instant::now() + DAEMON_DEADLINE;
        loop {
            self.snapshotter.check_running()?;
            self.containerd.check_running()?;
            let res = rt.block_on(async {
                let ctd = rpull::containerd::Containerd::new(containerd_api::unix_channel(&self.containerd_socket), "default");
                tokio::time::timeout(Duration::from_secs(5), ctd.snapshot_exists("lazypull", "lazypull-bake-ready-check")).await
            });
            match res {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if Instant::now() > deadline => {
                    bail!("containerd at {} did not reach the snapshotter within {} s: {e}\ncontainerd:\n{}\nsnapshotter:\n{}", self.containerd_socket.display(), DAEMON_DEADLINE.as_secs(), log_tail(&self.containerd.log), log_tail(&self.snapshotter.log))
                }
                _ if Instant::now() > deadline => bail!("containerd at {} did not answer within {} s", self.containerd_socket.display(), DAEMON_DEADLINE.as_secs()),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Stops containerd, the snapshotter and every layer daemon serving under the volume, and
    /// checks that nothing is mounted under `volume` any more.
    pub fn stop(mut self, volume: &Path) -> Result<()> {
        self.containerd.stop()?;
        self.snapshotter.stop()?;
        let state = self.lazypull_root.join("layers");
        for mp in mounts_under(volume)? {
            if let Err(e) = crate::mount::stop(&mp, &state) {
                tracing::warn!(mountpoint = %mp.display(), error = %format!("{e:#}"), "not a lazypull mount we can stop; detaching it");
                lazyfs::detach(&mp).map_err(std::io::Error::other).with_context(|| format!("detaching {}", mp.display()))?;
            }
        }
        let left = mounts_under(volume)?;
        if !left.is_empty() {
            bail!("still mounted under the volume after stopping its daemons: {}", left.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
        Ok(())
    }
}

/// Mount points at or below `dir`, deepest first (from `/proc/self/mountinfo`).
pub(crate) fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut out: Vec<PathBuf> = info.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| PathBuf::from(lazyfs::unescape_mountinfo(p))).filter(|p| p.starts_with(&dir)).collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(lazyfs::unescape_mountinfo(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(lazyfs::unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(lazyfs::unescape_mountinfo(r"/end\04"), r"/end\04");
    }
}
