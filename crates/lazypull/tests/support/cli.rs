//! The `lazypull` binary and the prerequisites of the mount tests, shared by `mount.rs` and
//! `soci.rs` (each declares `mod test_registry` at its root).

use std::path::Path;
use std::process::Command;

pub const BIN: &str = env!("CARGO_BIN_EXE_lazypull");

pub fn required() -> bool {
    std::env::var("LAZYPULL_INTEROP").as_deref() == Ok("required")
}

/// Whether a FUSE mount test can run here (root, /dev/fuse, Debian's registry, and `extra`
/// programs that must answer `--version`/`-V`); panics if it must and cannot.
pub fn prerequisites(extra: &[(&'static str, &str)]) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root");
    }
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse");
    }
    if !Path::new(crate::test_registry::REGISTRY_BIN).exists() {
        missing.push("docker-registry");
    }
    for (program, flag) in extra {
        if Command::new(program).arg(flag).output().is_err() {
            missing.push(program);
        }
    }
    if missing.is_empty() {
        return true;
    }
    assert!(!required(), "LAZYPULL_INTEROP=required but missing: {missing:?}");
    eprintln!("skipping: missing {missing:?}");
    false
}

/// Runs `lazypull ARGS`; panics with its output when it fails.
pub fn lazypull(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("running lazypull");
    assert!(
        out.status.success(),
        "lazypull {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
