//! The real host on a temporary directory, and the generated units against `contrib/`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use install::{service_unit, socket_unit, Command, Error, Host, SystemHost, UnitParams};

#[test]
fn system_host_writes_atomically_and_keeps_the_mode() {
    let dir = tempfile::tempdir().unwrap();
    let h = SystemHost;
    let f = dir.path().join("etc/containerd/config.toml");
    assert_eq!(h.read(&f).unwrap(), None);
    h.write_atomic(&f, b"version = 2\n", 0o640).unwrap();
    assert_eq!(h.read(&f).unwrap().unwrap(), b"version = 2\n");
    assert_eq!(fs::metadata(&f).unwrap().permissions().mode() & 0o7777, 0o640);
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    h.write_atomic(&f, b"version = 3\n", 0o644).unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"version = 3\n");
    assert_eq!(fs::metadata(&f).unwrap().permissions().mode() & 0o7777, 0o600, "existing mode kept");
    let names: Vec<_> = fs::read_dir(f.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["config.toml"], "temporary file left behind");
    h.remove(&f).unwrap();
    h.remove(&f).unwrap();
    assert!(!f.exists());
}

#[test]
fn system_host_runs_commands() {
    let h = SystemHost;
    assert!(h.has_program("sh"));
    assert!(!h.has_program("lazypull-no-such-program"));
    h.run(&Command::new("sh", &["-c", "exit 0"])).unwrap();
    match h.run(&Command::new("sh", &["-c", "echo oops >&2; exit 3"])).unwrap_err() {
        Error::CommandFailed { command, status, stderr } => {
            assert_eq!(command, "sh -c echo oops >&2; exit 3");
            assert_eq!(status, "exit status 3");
            assert_eq!(stderr, "oops");
        }
        e => panic!("{e:?}"),
    }
    let e = h.run(&Command::new("lazypull-no-such-program", &[])).unwrap_err();
    assert!(matches!(e, Error::ProgramNotFound { ref program } if program == "lazypull-no-such-program"), "{e:?}");
}

fn contrib(name: &str) -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib").join(name)).unwrap()
}

fn defaults() -> (&'static Path, &'static Path, &'static Path, &'static Path) {
    (Path::new("/usr/local/bin/lazypull"), Path::new("/run/lazypull/lazypull.sock"), Path::new("/var/lib/lazypull/snapshotter"), Path::new("/etc/lazypull/snapshotter.toml"))
}

/// The generated units are contrib's, line for line, apart from the header and `ExecStart`.
#[test]
fn units_match_contrib() {
    let (binary, socket, root, config) = defaults();
    let p = UnitParams { binary, socket, root, config };
    for (generated, name) in [(service_unit(&p), "lazypull-snapshotter.service"), (socket_unit(&p), "lazypull-snapshotter.socket")] {
        let file = contrib(name);
        let want: Vec<&str> = file.lines().filter(|l| !l.starts_with("ExecStart=")).collect();
        let got: Vec<&str> = generated.lines().skip_while(|l| l.starts_with("# Written by") || l.starts_with("# (or use")).filter(|l| !l.starts_with("ExecStart=")).collect();
        assert_eq!(got, want, "{name} drifted from contrib/");
    }
}

#[test]
fn units_carry_the_parameters() {
    let p = UnitParams {
        binary: Path::new("/opt/lazy pull/bin/lazypull"),
        socket: Path::new("/run/lp%/lp.sock"),
        root: Path::new("/srv/lazypull"),
        config: Path::new("/etc/lp.toml"),
    };
    let service = service_unit(&p);
    assert!(service.contains("\nExecStart=\"/opt/lazy pull/bin/lazypull\" snapshotter --config /etc/lp.toml --root /srv/lazypull --address /run/lp%%/lp.sock\n"), "{service}");
    let socket = socket_unit(&p);
    assert!(socket.contains("\nListenStream=/run/lp%%/lp.sock\n"), "{socket}");
    assert_eq!(install::modules_load_conf().lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>(), ["fuse"]);
    // The default snapshotter config parses and sets nothing.
    let t: toml::Table = toml::from_str(&install::default_snapshotter_config()).unwrap();
    assert!(t.is_empty());
}
