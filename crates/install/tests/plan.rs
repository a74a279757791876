//! Install/uninstall plans applied to an in-memory host.

use std::path::Path;

use install::{apply, plan_install, plan_uninstall, Error, Event, MemoryHost, Options, Step};

const V17: &str = include_str!("data/containerd-1.7-default.toml");
const PEER: &str = include_str!("data/peer-containerd.toml");

const RESTART: &str = "systemctl restart containerd";
const ENABLE: &str = "systemctl enable --now lazypull-snapshotter.socket lazypull-snapshotter.service";

fn opts() -> Options {
    Options::default()
}

fn install(host: &MemoryHost, opts: &Options) -> install::Plan {
    let plan = plan_install(opts, host).unwrap();
    let applied = apply(&plan, host).unwrap();
    assert!(applied.warnings.is_empty(), "{:?}", applied.warnings);
    plan
}

fn writes(host: &MemoryHost) -> Vec<String> {
    host.events().into_iter().filter_map(|e| if let Event::Write(p) = e { Some(p.display().to_string()) } else { None }).collect()
}

#[test]
fn install_writes_everything_and_restarts_containerd_last() {
    let host = MemoryHost::new().with_file("/etc/containerd/config.toml", V17);
    let o = opts();
    install(&host, &o);
    assert_eq!(
        writes(&host),
        [
            "/etc/modules-load.d/lazypull.conf",
            "/etc/lazypull/snapshotter.toml",
            "/etc/systemd/system/lazypull-snapshotter.socket",
            "/etc/systemd/system/lazypull-snapshotter.service",
            "/etc/containerd/config.toml.lazypull-backup",
            "/etc/containerd/config.toml",
        ]
    );
    assert_eq!(host.commands(), ["modprobe fuse", "systemctl daemon-reload", ENABLE, RESTART]);
    assert_eq!(host.events().last(), Some(&Event::Run(RESTART.into())));
    assert_eq!(host.file(o.backup_path()).unwrap(), V17.as_bytes());
    assert_eq!(host.mode(o.backup_path()), Some(0o600));
    let config = String::from_utf8(host.file(&o.containerd_config).unwrap()).unwrap();
    assert!(config.contains("[proxy_plugins.lazypull]") && config.contains("snapshotter = \"lazypull\""));
    assert_eq!(host.file(o.modules_load_path()).unwrap(), install::modules_load_conf().as_bytes());
    let service = String::from_utf8(host.file(o.service_path()).unwrap()).unwrap();
    assert!(service.contains("ExecStart=/usr/local/bin/lazypull snapshotter --config /etc/lazypull/snapshotter.toml --root /var/lib/lazypull/snapshotter --address /run/lazypull/lazypull.sock\n"));
}

#[test]
fn second_install_writes_nothing_and_restarts_nothing() {
    let host = MemoryHost::new().with_file("/etc/containerd/config.toml", V17);
    let o = opts();
    install(&host, &o);
    let before: Vec<_> = host.paths().into_iter().map(|p| (host.file(&p), p)).collect();
    host.clear_events();

    let plan = plan_install(&o, &host).unwrap();
    assert!(!plan.touches_files(), "{plan}");
    assert!(!plan.changes_containerd_config());
    assert!(plan.containerd_diff().is_empty());
    assert!(host.events().is_empty(), "planning touched the host");
    apply(&plan, &host).unwrap();
    assert_eq!(host.events(), [Event::Run(ENABLE.into())]);
    let after: Vec<_> = host.paths().into_iter().map(|p| (host.file(&p), p)).collect();
    assert_eq!(before, after);
}

#[test]
fn uninstall_restores_the_original_byte_for_byte() {
    let host = MemoryHost::new().with_file("/etc/containerd/config.toml", V17);
    let o = opts();
    install(&host, &o);
    host.clear_events();
    let plan = plan_uninstall(&o, &host).unwrap();
    apply(&plan, &host).unwrap();
    assert_eq!(host.file(&o.containerd_config).unwrap(), V17.as_bytes());
    // containerd stops using the plugin before the snapshotter is stopped.
    assert_eq!(host.commands(), [RESTART, "systemctl disable --now lazypull-snapshotter.socket lazypull-snapshotter.service", "systemctl daemon-reload"]);
    // Nothing of ours is left; the original config is all there is.
    assert_eq!(host.paths(), [Path::new("/etc/containerd/config.toml")]);
    // Uninstalling again does nothing.
    let again = plan_uninstall(&o, &host).unwrap();
    assert!(again.steps.is_empty(), "{again}");
    assert_eq!(again.to_string(), "nothing to do\n");
}

#[test]
fn reinstall_with_new_settings_keeps_the_first_backup() {
    let host = MemoryHost::new().with_file("/etc/containerd/config.toml", PEER);
    let mut o = opts();
    install(&host, &o);
    host.clear_events();
    o.socket = "/run/lazypull-2/lazypull.sock".into();
    let plan = plan_install(&o, &host).unwrap();
    assert!(plan.changes_containerd_config());
    let diff = plan.containerd_diff();
    assert!(diff.contains("\n-    address = \"/run/lazypull/lazypull.sock\"\n+    address = \"/run/lazypull-2/lazypull.sock\"\n"), "{diff}");
    apply(&plan, &host).unwrap();
    assert!(!writes(&host).iter().any(|w| w.ends_with(".lazypull-backup")), "backup overwritten");
    assert_eq!(host.file(o.backup_path()).unwrap(), PEER.as_bytes());
    assert_eq!(
        host.commands(),
        ["systemctl daemon-reload", ENABLE, "systemctl restart lazypull-snapshotter.socket lazypull-snapshotter.service", RESTART]
    );
    apply(&plan_uninstall(&o, &host).unwrap(), &host).unwrap();
    assert_eq!(host.file(&o.containerd_config).unwrap(), PEER.as_bytes());
}

#[test]
fn a_config_install_created_is_removed_again() {
    let host = MemoryHost::new();
    let o = opts();
    install(&host, &o);
    assert!(host.file(o.created_marker_path()).is_some());
    assert!(host.file(o.backup_path()).is_none());
    let config = String::from_utf8(host.file(&o.containerd_config).unwrap()).unwrap();
    assert!(config.starts_with("version = 2\n"));
    apply(&plan_uninstall(&o, &host).unwrap(), &host).unwrap();
    assert!(host.paths().is_empty(), "{:?}", host.paths());
}

#[test]
fn uninstall_without_backup_takes_out_our_settings() {
    let host = MemoryHost::new().with_file("/etc/containerd/config.toml", V17);
    let o = opts();
    install(&host, &o);
    host.remove_silently(o.backup_path());
    let plan = plan_uninstall(&o, &host).unwrap();
    assert!(plan.changes_containerd_config());
    apply(&plan, &host).unwrap();
    let config = String::from_utf8(host.file(&o.containerd_config).unwrap()).unwrap();
    assert!(!config.contains("lazypull"), "{config}");
    assert!(config.contains("snapshotter = \"overlayfs\" # the default snapshotter for CRI pulls"));
}

#[test]
fn missing_systemctl_fails_before_anything_changes() {
    let host = MemoryHost::new().with_file("/etc/containerd/config.toml", V17).without_program("systemctl");
    let plan = plan_install(&opts(), &host).unwrap();
    let err = apply(&plan, &host).unwrap_err();
    assert!(matches!(&err, Error::ProgramNotFound { program } if program == "systemctl"), "{err:?}");
    assert!(err.to_string().contains("`systemctl` not found"), "{err}");
    assert!(host.events().is_empty(), "{:?}", host.events());
    assert_eq!(host.file("/etc/containerd/config.toml").unwrap(), V17.as_bytes());
}

#[test]
fn modprobe_failure_is_only_a_warning() {
    let host = MemoryHost::new().without_program("modprobe");
    let applied = apply(&plan_install(&opts(), &host).unwrap(), &host).unwrap();
    assert!(matches!(&applied.warnings[..], [Error::ProgramNotFound { program }] if program == "modprobe"), "{:?}", applied.warnings);
    let host = MemoryHost::new().failing("modprobe");
    let applied = apply(&plan_install(&opts(), &host).unwrap(), &host).unwrap();
    assert!(matches!(&applied.warnings[..], [Error::CommandFailed { .. }]), "{:?}", applied.warnings);
    assert!(host.commands().contains(&RESTART.to_string()));
}

#[test]
fn failing_restart_is_an_error() {
    let host = MemoryHost::new().failing(RESTART);
    let err = apply(&plan_install(&opts(), &host).unwrap(), &host).unwrap_err();
    assert!(err.to_string().contains("`systemctl restart containerd` failed (exit status 1)"), "{err}");
}

#[test]
fn dry_run_shows_diffs_and_commands() {
    let host = MemoryHost::new().with_file("/etc/containerd/config.toml", V17);
    let o = opts();
    let text = plan_install(&o, &host).unwrap().to_string();
    assert!(text.contains("update /etc/containerd/config.toml\n--- /etc/containerd/config.toml\n+++ /etc/containerd/config.toml\n@@ "), "{text}");
    assert!(text.contains("\n-      snapshotter = \"overlayfs\" # the default snapshotter for CRI pulls\n+      snapshotter = \"lazypull\" # the default snapshotter for CRI pulls\n"));
    assert!(text.contains("create (mode 0644) /etc/systemd/system/lazypull-snapshotter.service\n--- /dev/null\n+++ /etc/systemd/system/lazypull-snapshotter.service\n"));
    assert!(text.contains("create (mode 0600) /etc/containerd/config.toml.lazypull-backup\n  (a copy of the current containerd config)\n"));
    assert!(text.contains("run modprobe fuse (a failure is only warned about)\n"));
    assert!(text.ends_with("run systemctl restart containerd\n"), "{text}");
    assert!(host.events().is_empty());
}

#[test]
fn bad_config_and_bad_options_are_errors_with_the_path() {
    let host = MemoryHost::new().with_file("/etc/containerd/config.toml", "version = 2\n[grpc\n");
    let err = plan_install(&opts(), &host).unwrap_err();
    assert!(matches!(err, Error::Config { .. }));
    assert!(err.to_string().starts_with("/etc/containerd/config.toml: invalid TOML at line 2"), "{err}");
    let host = MemoryHost::new().with_file("/etc/containerd/config.toml", "version = 1\n");
    let err = plan_install(&opts(), &host).unwrap_err();
    assert!(err.to_string().contains("version 1 is not supported"), "{err}");
    let host = MemoryHost::new().with_file("/etc/containerd/config.toml", vec![0xff, 0xfe]);
    assert!(matches!(plan_install(&opts(), &host).unwrap_err(), Error::NotUtf8 { .. }));
    let o = Options { socket: "lazypull.sock".into(), ..opts() };
    assert!(matches!(plan_install(&o, &MemoryHost::new()).unwrap_err(), Error::BadPath { what: "socket", .. }));
    let o = Options { root: "/var/lib/lazy\npull".into(), ..opts() };
    assert!(matches!(plan_uninstall(&o, &MemoryHost::new()).unwrap_err(), Error::BadPath { what: "root", .. }));
}

#[test]
fn existing_snapshotter_config_is_kept() {
    let host = MemoryHost::new().with_file("/etc/lazypull/snapshotter.toml", "cache_size = 1\n");
    let plan = plan_install(&opts(), &host).unwrap();
    assert!(!plan.steps.iter().any(|s| matches!(s, Step::Write { path, .. } if path.ends_with("snapshotter.toml"))));
    apply(&plan, &host).unwrap();
    apply(&plan_uninstall(&opts(), &host).unwrap(), &host).unwrap();
    assert_eq!(host.file("/etc/lazypull/snapshotter.toml").unwrap(), b"cache_size = 1\n");
}
