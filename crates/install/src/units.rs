//! The files `lazypull install` puts next to containerd: the systemd units, the FUSE module
//! load file and a default snapshotter config.
//!
//! The units are `contrib/lazypull-snapshotter.{service,socket}` with the paths filled in (a
//! test checks they stay in step). `ExecStart` passes `--root` and `--address` explicitly even
//! though the snapshotter's config file may set them: the flags win over the file, so the
//! daemon always listens where containerd's `proxy_plugins.lazypull.address` points and keeps
//! its state where `exports.root` says, whatever the file is edited to later.

use std::path::Path;

/// The service unit's file name.
pub const SERVICE: &str = "lazypull-snapshotter.service";
/// The socket unit's file name.
pub const SOCKET: &str = "lazypull-snapshotter.socket";
/// The modules-load.d file's name.
pub const MODULES_LOAD_FILE: &str = "lazypull.conf";

/// What the units are generated from. Paths must be absolute, UTF-8 and free of control
/// characters ([`crate::plan_install`] checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitParams<'a> {
    /// The `lazypull` binary (`/usr/local/bin/lazypull`).
    pub binary: &'a Path,
    /// The unix socket (`/run/lazypull/lazypull.sock`).
    pub socket: &'a Path,
    /// The snapshotter's state directory (`/var/lib/lazypull/snapshotter`).
    pub root: &'a Path,
    /// The snapshotter's TOML config (`/etc/lazypull/snapshotter.toml`).
    pub config: &'a Path,
}

const HEADER: &str = "# Written by `lazypull install`; `lazypull uninstall` removes it. Edit the install options\n# (or use a drop-in, `systemctl edit`) rather than this file: install rewrites it.\n";

/// `lazypull-snapshotter.service`.
pub fn service_unit(p: &UnitParams<'_>) -> String {
    let exec = [p.binary.to_string_lossy().as_ref(), "snapshotter", "--config", &p.config.to_string_lossy(), "--root", &p.root.to_string_lossy(), "--address", &p.socket.to_string_lossy()]
        .iter()
        .map(|a| exec_arg(a))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "{HEADER}\
[Unit]
Description=lazypull remote snapshotter for containerd (lazily pulled eStargz layers)
Documentation=https://github.com/lazypull/lazypull/blob/main/docs/snapshotter.md
After=network-online.target local-fs.target {SOCKET}
Before=containerd.service
Wants=network-online.target
# The socket is handed over by systemd (LISTEN_FDS); without the socket unit the daemon binds
# `address` itself.
Requires={SOCKET}

[Service]
Type=simple
ExecStartPre=-/sbin/modprobe fuse
ExecStart={exec}
Environment=LAZYPULL_LOG=info
Restart=always
RestartSec=100ms
# Layer daemons run in their own sessions and must outlive a restart of this service, so that
# running containers keep their files: only the main process is stopped.
KillMode=process
Delegate=yes
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
"
    )
}

/// `lazypull-snapshotter.socket`.
pub fn socket_unit(p: &UnitParams<'_>) -> String {
    let listen = specifiers(&p.socket.to_string_lossy());
    format!(
        "{HEADER}\
# Socket activation for the lazypull snapshotter: systemd holds the listening socket, so it never
# disappears while the service restarts (crash, upgrade): containerd's connects wait in the
# backlog instead of failing and sending its gRPC client into reconnect back-off.
# The path must match containerd's `proxy_plugins.lazypull.address`.
[Unit]
Description=lazypull snapshotter socket (containerd proxy plugin)
Documentation=https://github.com/lazypull/lazypull/blob/main/docs/snapshotter.md
Before=containerd.service

[Socket]
ListenStream={listen}
SocketMode=0600
DirectoryMode=0700
# One service instance owns the socket (not one per connection).
Accept=no
Backlog=1024

[Install]
WantedBy=sockets.target
"
    )
}

/// `/etc/modules-load.d/lazypull.conf`: load `fuse` at boot (layers are FUSE mounts).
pub fn modules_load_conf() -> String {
    "# Written by `lazypull install`: the lazypull snapshotter mounts image layers with FUSE.\nfuse\n".to_string()
}

/// The snapshotter config written when none exists. It sets nothing: every key is optional,
/// and `root`/`address` come from the unit's command line.
pub fn default_snapshotter_config() -> String {
    "# lazypull snapshotter settings, written by `lazypull install` because none existed.\n\
# Every key is optional; contrib/snapshotter.toml lists them all with their defaults.\n\
# `root` and `address` are set on the command line by lazypull-snapshotter.service (they\n\
# must agree with containerd's proxy_plugins.lazypull), so setting them here has no effect.\n"
        .to_string()
}

/// Escapes systemd specifiers (`%`).
fn specifiers(s: &str) -> String {
    s.replace('%', "%%")
}

/// One `ExecStart=` word: specifiers and `$` escaped, quoted if it has blanks or quotes.
fn exec_arg(s: &str) -> String {
    let s = specifiers(s).replace('$', "$$");
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';')) {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_words_are_escaped() {
        assert_eq!(exec_arg("/usr/local/bin/lazypull"), "/usr/local/bin/lazypull");
        assert_eq!(exec_arg("/opt/my dir/lazypull"), "\"/opt/my dir/lazypull\"");
        assert_eq!(exec_arg("/a%b$c"), "/a%%b$$c");
        assert_eq!(exec_arg("a\"b"), "\"a\\\"b\"");
        assert_eq!(exec_arg("x;y"), "\"x;y\"");
    }
}
