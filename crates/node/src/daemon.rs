//! Starting a mount daemon: a child in its own session that reports `READY …` on stdout once
//! it serves, and logs to a file.
//!
//! `lazypull mount` re-executes itself with `--foreground` so that the mount outlives the
//! command (and a terminal hang-up) while the command still fails with the daemon's own reason
//! when mounting fails. The protocol is one line: everything the child prints before `READY `
//! is passed on, the rest of the `READY` line is what the command prints, and a child that
//! exits first fails the start with the last lines of *its* part of the log (the file is
//! shared by the daemons of one mountpoint across restarts).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The log is rotated once past this size when a daemon starts.
const LOG_ROTATE_BYTES: u64 = 8 << 20;

/// Why a daemon did not come up.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the mount daemon: {0}")]
    Spawn(#[source] std::io::Error),
    /// The daemon said why it failed (its last log line).
    #[error("{reason} (mount daemon exited with {status}; log: {})", log.display())]
    Failed { reason: String, status: String, log: PathBuf },
    /// The daemon exited without a reason of its own: the tail of its log.
    #[error("mount daemon exited ({status}) before the mount was ready; its log ({}):\n{tail}", log.display())]
    Exited { status: String, log: PathBuf, tail: String },
}

/// A daemon that reported ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The rest of its `READY` line.
    pub ready: String,
    pub pid: u32,
}

/// Starts `cmd` as a daemon logging (stderr) to `log_path`, passes each line it prints before
/// `READY ` to `on_line`, and returns once it is ready. The daemon is reaped when it exits.
pub fn spawn_daemon(mut cmd: Command, log_path: &Path, mut on_line: impl FnMut(&str)) -> Result<Started, DaemonError> {
    let io = |what, source| DaemonError::Io { what, path: log_path.to_path_buf(), source };
    if std::fs::metadata(log_path).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let _ = std::fs::rename(log_path, log_path.with_extension("log.1"));
    }
    // Appended to: after a restart an old daemon on its way out and the new one share the path.
    let log = std::fs::File::options().create(true).append(true).open(log_path).map_err(|e| io("opening", e))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
    // Its own process group, so that a terminal hang-up (SIGHUP to the foreground group) does
    // not take the mount down. Not `setsid` in a `pre_exec` hook: any hook makes std fork the
    // whole parent instead of using posix_spawn (vfork), and forking the snapshotter — a large,
    // many-threaded process — cost ~30 ms per layer, on every pod's PullImage.
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().map_err(DaemonError::Spawn)?;
    let out = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(out).lines() {
        let line = line.map_err(|e| io("reading the daemon's output for", e))?;
        if let Some(rest) = line.strip_prefix("READY ") {
            // The daemon is our child until it exits: reap it then, or a long-lived starter
            // (the snapshotter) keeps a zombie that still answers kill(pid, 0) — and every
            // stop would wait out the SIGTERM and SIGKILL deadlines for a process long gone.
            let pid = child.id();
            std::thread::Builder::new().name(format!("reap-{pid}")).spawn(move || drop(child.wait())).map_err(DaemonError::Spawn)?;
            return Ok(Started { ready: rest.to_string(), pid });
        }
        on_line(&line);
    }
    let status = child.wait().map_err(DaemonError::Spawn)?.to_string();
    let log = std::fs::read(log_path).unwrap_or_default();
    let ours = String::from_utf8_lossy(log.get(log_start as usize..).unwrap_or_default()).into_owned();
    let tail: Vec<&str> = ours.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
    // The daemon's own last line is the reason; say it once, not as "error: … error: …".
    let reason = tail.iter().rev().find_map(|l| l.strip_prefix("lazypull: error: ")).map(str::to_string);
    match reason {
        Some(reason) if tail.len() == 1 => Err(DaemonError::Failed { reason, status, log: log_path.to_path_buf() }),
        _ => Err(DaemonError::Exited { status, log: log_path.to_path_buf(), tail: tail.join("\n") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn the_ready_line_is_returned_and_earlier_lines_passed_on() {
        let tmp = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        let started = spawn_daemon(sh("echo hello; echo 'READY mounted at /x'; sleep 0"), &tmp.path().join("d.log"), |l| seen.push(l.to_string())).unwrap();
        assert_eq!((started.ready.as_str(), seen), ("mounted at /x", vec!["hello".to_string()]));
    }

    #[test]
    fn an_exited_daemon_is_reaped_not_left_a_zombie() {
        let tmp = tempfile::tempdir().unwrap();
        let started = spawn_daemon(sh("echo 'READY up'; exec sleep 0.2"), &tmp.path().join("d.log"), |_| {}).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // A zombie keeps its /proc entry (and answers kill(pid, 0)) until reaped.
        while Path::new(&format!("/proc/{}", started.pid)).exists() {
            assert!(std::time::Instant::now() < deadline, "daemon {} not reaped after it exited", started.pid);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn a_failing_daemon_reports_its_own_reason_from_its_part_of_the_log() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("d.log");
        std::fs::write(&log, "lazypull: error: an older daemon's failure\n").unwrap();
        let e = spawn_daemon(sh("echo 'lazypull: error: no such image' >&2; exit 3"), &log, |_| {}).unwrap_err();
        assert!(matches!(&e, DaemonError::Failed { reason, .. } if reason == "no such image"), "{e}");
        let e = spawn_daemon(sh("echo one >&2; echo two >&2; exit 1"), &log, |_| {}).unwrap_err();
        assert!(matches!(&e, DaemonError::Exited { tail, .. } if tail == "one\ntwo"), "{e}");
    }
}
