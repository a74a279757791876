//! The lazy filesystem end to end, as root with real FUSE and overlayfs mounts, against
//! Debian's registry behind a fault-injecting, request-recording proxy:
//!
//! - identity: the tar corpus of the format tests (each layer mounted alone) and a two-layer
//!   image made of this machine's Debian files plus random data (mounted whole, under
//!   overlayfs) equal their extraction: type, mode, owner, size, mtime, symlink target, nlink,
//!   xattrs and sha256 of every file;
//! - laziness: reading one small file of a ≥ 200 MB layer fetches < 1% of the blob;
//! - integrity: a flipped byte → EIO and a log line naming the chunk digest, never wrong bytes;
//!   registry gone → cached files still read, uncached ones fail with EIO within the timeout;
//! - concurrency: 64 parallel readers of random files all read correct content.
//!
//! Skipped without root, /dev/fuse or the registry, unless `LAZYPULL_INTEROP=required`.

#[path = "../../registry/tests/support/registry.rs"]
mod test_registry;
#[path = "../../registry/tests/support/fault_proxy.rs"]
mod fault_proxy;
#[path = "../../estargz/tests/support/mod.rs"]
#[allow(dead_code)]
mod corpus;
mod support {
    pub mod cli;
    pub mod tree;
}

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fault_proxy::{Fault, FaultProxy};
use support::cli::{lazypull, prerequisites, BIN};
use support::tree::{assert_same, sha_hex, snapshot};
use test_registry::{Auth, TestRegistry};

/// A daemonized mount, unmounted on drop.
struct Mounted {
    mountpoint: PathBuf,
    state: PathBuf,
}

impl Mounted {
    fn image(reference: &str, mountpoint: &Path, state: &Path, extra: &[&str]) -> Mounted {
        std::fs::create_dir_all(mountpoint).unwrap();
        let mut args = vec!["mount", reference, mountpoint.to_str().unwrap(), "--state-dir", state.to_str().unwrap()];
        args.extend_from_slice(extra);
        lazypull(&args);
        Mounted {
            mountpoint: mountpoint.to_path_buf(),
            state: state.to_path_buf(),
        }
    }

    fn layer(blob: &Path, mountpoint: &Path, state: &Path) -> Mounted {
        std::fs::create_dir_all(mountpoint).unwrap();
        lazypull(&["layer", "mount", blob.to_str().unwrap(), mountpoint.to_str().unwrap(), "--state-dir", state.to_str().unwrap()]);
        Mounted {
            mountpoint: mountpoint.to_path_buf(),
            state: state.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        let mut all = String::new();
        for e in std::fs::read_dir(self.state.join("mounts")).unwrap().flatten() {
            all += &std::fs::read_to_string(e.path().join("daemon.log")).unwrap_or_default();
        }
        all
    }

    fn status(&self) -> serde_json::Value {
        let out = lazypull(&["status", self.mountpoint.to_str().unwrap(), "--state-dir", self.state.to_str().unwrap(), "--json"]);
        serde_json::from_str(&out).unwrap()
    }

    /// A status the daemon wrote after this call began (it rewrites status.json periodically).
    fn fresh_status(&self) -> serde_json::Value {
        let before: f64 = self.status()["mounted_secs"].as_f64().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = self.status();
            if st["mounted_secs"].as_f64().unwrap() > before {
                return st;
            }
            assert!(Instant::now() < deadline, "status.json not rewritten within 10 s:\n{}", tail(&self.log(), 20));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new(BIN).args(["umount", self.mountpoint.to_str().unwrap(), "--state-dir", self.state.to_str().unwrap()]).output();
    }
}

// ---------------------------------------------------------------------------------------------
// Tree comparison

// ---------------------------------------------------------------------------------------------
// Identity of the format corpus, one layer at a time from local blobs

#[test]
fn corpus_layers_mount_identical_to_their_extraction() {
    if !prerequisites(&[]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut checked = 0;
    for (name, items) in corpus::corpora() {
        let tar = corpus::write_tar(&items);
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let tar_path = dir.join("layer.tar");
        std::fs::write(&tar_path, &tar).unwrap();
        let blob = dir.join("layer.stargz");
        lazypull(&["layer", "convert", tar_path.to_str().unwrap(), blob.to_str().unwrap(), "--chunk-size", "65536"]);
        let extracted = dir.join("extracted");
        lazypull(&["layer", "extract", blob.to_str().unwrap(), extracted.to_str().unwrap(), "--overlay-whiteouts"]);
        let mnt = dir.join("mnt");
        let m = Mounted::layer(&blob, &mnt, &state);
        // The landmark files are eStargz bookkeeping that a plain extraction materializes and
        // the mount hides (as stargz-snapshotter does); they are not in the input tar.
        let mut want = snapshot(&extracted);
        want.remove(".prefetch.landmark");
        want.remove(".no.prefetch.landmark");
        assert_same(&format!("corpus {name}"), &want, &snapshot(&mnt));
        if checked == 0 {
            // `status` and `umount` find a mount made with any --state-dir (the node-wide index).
            let other = tmp.path().join("other-state");
            let st: serde_json::Value = serde_json::from_str(&lazypull(&["status", mnt.to_str().unwrap(), "--state-dir", other.to_str().unwrap(), "--json"])).unwrap();
            assert_eq!(st["running"], true, "{st}");
            lazypull(&["umount", mnt.to_str().unwrap(), "--state-dir", other.to_str().unwrap()]);
            assert!(!lazyfs::is_mountpoint(&mnt), "umount through the index left the mount attached");
            let gone = Command::new(BIN).args(["status", mnt.to_str().unwrap()]).output().unwrap();
            assert!(!gone.status.success(), "status of an unmounted mountpoint succeeded");
        }
        drop(m);
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} corpora");
}

/// Issue 16 (parts 3 and 4) on a real mount: a layer mount a user asks for is `nosuid,nodev`
/// (a setuid-root file and a 0666 char device from the image give nobody anything), unless
/// `--allow-setuid`; and a hostile chunk (its compressed bytes damaged) fails its reads with EIO
/// at once while the daemon survives and serves the honest files.
#[test]
fn user_mounts_ignore_setuid_and_devices_and_survive_hostile_chunks() {
    if !prerequisites(&[]) {
        return;
    }
    use corpus::Item;
    let tmp = tempfile::tempdir().unwrap();
    let bad = pseudo(200_000, 3);
    let items = vec![
        Item::dir("bin"),
        Item::file("bin/su", b"#!/bin/sh\nid -u\n".to_vec()).mode(0o4755),
        Item::dir("dev"),
        Item::device("dev/mem2", b'3', 1, 1).mode(0o666),
        Item::dir("etc"),
        Item::file("etc/ok", b"honest\n".to_vec()),
        Item::dir("data"),
        Item::file("data/bad", bad.clone()),
    ];
    let tar_path = tmp.path().join("layer.tar");
    std::fs::write(&tar_path, corpus::write_tar(&items)).unwrap();
    let blob = tmp.path().join("layer.stargz");
    lazypull(&["layer", "convert", tar_path.to_str().unwrap(), blob.to_str().unwrap(), "--chunk-size", "65536"]);
    // Damage the middle chunk of data/bad: a byte inside its gzip member.
    let reader = estargz::Reader::open(estargz::FileSource::open(&blob).unwrap()).unwrap();
    let node = reader.lookup("data/bad").unwrap();
    let victim = &node.chunks[1];
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[(victim.offset + (victim.next_offset - victim.offset) / 2) as usize] ^= 0x5a;
    let hostile = tmp.path().join("hostile.stargz");
    std::fs::write(&hostile, &bytes).unwrap();

    let options = |mnt: &Path| -> String {
        let canon = std::fs::canonicalize(mnt).unwrap();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info.lines().find(|l| l.split(' ').nth(4) == canon.to_str()).unwrap_or_else(|| panic!("{} not mounted", mnt.display()));
        line.split(' ').nth(5).unwrap().to_string()
    };
    let m = Mounted::layer(&hostile, &tmp.path().join("mnt"), &tmp.path().join("state"));
    let opts = options(&m.mountpoint);
    assert!(opts.split(',').any(|o| o == "nosuid") && opts.split(',').any(|o| o == "nodev"), "user mount options: {opts}");
    // The image's metadata is shown as it is, but it grants nothing.
    assert_eq!(std::fs::metadata(m.mountpoint.join("bin/su")).unwrap().mode() & 0o7777, 0o4755);
    let dev = std::fs::OpenOptions::new().read(true).open(m.mountpoint.join("dev/mem2"));
    assert_eq!(dev.map(drop).unwrap_err().raw_os_error(), Some(libc::EACCES), "a device node of the image must not open on a nodev mount");
    // Hostile chunk: EIO, quickly, every time; honest files keep reading; the daemon lives.
    for _ in 0..3 {
        let t = Instant::now();
        let err = std::fs::read(m.mountpoint.join("data/bad")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10), "a hostile read took {:?}", t.elapsed());
        assert_eq!(std::fs::read(m.mountpoint.join("etc/ok")).unwrap(), b"honest\n");
    }
    let mut head = vec![0u8; 4096];
    std::fs::File::open(m.mountpoint.join("data/bad")).unwrap().read_exact(&mut head).unwrap();
    assert!(head == bad[..4096], "the intact first chunk of the damaged file still reads");
    let st = m.fresh_status();
    assert_eq!(st["running"], true, "{st}");
    assert!(st["layers"][0]["errors"].as_u64().unwrap() >= 1, "{st}");
    drop(m);

    // --allow-setuid: the image's privileges are honoured (for mounts no untrusted user reaches).
    let mnt = tmp.path().join("mnt-suid");
    std::fs::create_dir_all(&mnt).unwrap();
    lazypull(&["layer", "mount", blob.to_str().unwrap(), mnt.to_str().unwrap(), "--state-dir", tmp.path().join("state").to_str().unwrap(), "--allow-setuid"]);
    let m = Mounted { mountpoint: mnt.clone(), state: tmp.path().join("state") };
    let opts = options(&mnt);
    assert!(!opts.split(',').any(|o| o == "nosuid" || o == "nodev"), "--allow-setuid mount options: {opts}");
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// The registry image

fn pseudo(n: usize, seed: u64) -> Vec<u8> {
    corpus::noise(n, seed)
}

/// tar + gzip of `files` (name → bytes), ustar with fixed metadata.
fn tar_gz(files: &[(String, Vec<u8>)]) -> (Vec<u8>, String) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    let tar = b.into_inner().unwrap();
    gzip(tar)
}

fn gzip(tar: Vec<u8>) -> (Vec<u8>, String) {
    let diff = format!("sha256:{}", sha_hex(&tar));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), diff)
}

/// This machine's Debian files as a rootfs layer (GNU tar, with xattrs and owners).
fn debian_rootfs_tar(dir: &Path) -> Vec<u8> {
    let out = dir.join("rootfs.tar");
    // Whole-second times: the TOC keeps seconds (rounded, like the reference), GNU tar would
    // otherwise keep nanoseconds in PAX headers and the two would differ by design.
    let st = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "--pax-option=delete=mtime,delete=atime,delete=ctime", "-C", "/", "-cf"])
        .arg(&out)
        .args(["etc", "usr/sbin", "usr/share/doc/apt", "usr/share/doc/tar", "usr/lib/os-release", "usr/bin/tar", "usr/bin/gzip", "usr/bin/ls"])
        .args(ls_libraries())
        .status()
        .unwrap();
    // GNU tar exits 1 when a file changed while read (e.g. /etc/mtab); the archive is complete.
    assert!(st.code().is_some_and(|c| c <= 1), "tar failed: {st}");
    std::fs::read(out).unwrap()
}

/// The shared libraries `ls` loads on Debian (names and the links to them), relative to `/`.
fn ls_libraries() -> Vec<String> {
    let dir = "usr/lib/x86_64-linux-gnu";
    let mut out: Vec<String> = std::fs::read_dir(Path::new("/").join(dir))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| ["libc.so.", "libselinux.so.", "libpcre2-8.so."].iter().any(|p| n.starts_with(p)))
        .map(|n| format!("{dir}/{n}"))
        .collect();
    out.sort();
    out
}

fn write_layout(dir: &Path, layers: &[(Vec<u8>, String)]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let h = sha_hex(b);
        std::fs::write(blobs.join(&h), b).unwrap();
        format!("sha256:{h}")
    };
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.1.clone()).collect::<Vec<_>>()},
    }))
    .unwrap();
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|(b, _)| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(b), "size": b.len()}))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config), "size": config.len()},
        "layers": layer_descs,
    }))
    .unwrap();
    let md = put(&manifest);
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn cache_usage(state: &Path) -> serde_json::Value {
    serde_json::from_str(&lazypull(&["cache", "usage", "--state-dir", state.to_str().unwrap(), "--json"])).unwrap()
}

fn read_timed(p: &Path) -> (std::io::Result<Vec<u8>>, Duration) {
    let t = Instant::now();
    let r = std::fs::File::open(p).and_then(|mut f| {
        let mut v = Vec::new();
        f.read_to_end(&mut v).map(|_| v)
    });
    (r, t.elapsed())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn drop_page_cache() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

#[test]
fn registry_image_identity_laziness_integrity_concurrency() {
    if !prerequisites(&[]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();

    // Layer 0: Debian files. Layer 1: 220 MB of random data in big files plus small files.
    let rootfs = debian_rootfs_tar(t);
    let mut data_files: Vec<(String, Vec<u8>)> = (0..11).map(|i| (format!("data/big{i:02}.bin"), pseudo(20 << 20, 100 + i))).collect();
    for i in 0..300u64 {
        data_files.push((format!("data/small/s{i:03}.txt"), pseudo(500 + (i as usize * 997) % 40_000, i)));
    }
    let layers = vec![gzip(rootfs.clone()), tar_gz(&data_files)];
    let layout = t.join("layout");
    write_layout(&layout, &layers);

    let reg = TestRegistry::start(Auth::None);
    let proxy = FaultProxy::start(&reg.host);
    let host = proxy.addr.to_string();
    let reference = format!("{host}/lazy/test:v1");
    lazypull(&["image", "convert", &format!("oci:{}:v1", layout.display()), &reference, "--level", "1"]);
    let inspect = lazypull(&["image", "inspect", &reference]);
    assert!(inspect.contains("2 lazily pullable"), "{inspect}");
    let blob_digests: Vec<(String, u64)> = inspect
        .lines()
        .filter(|l| l.contains("lazy: eStargz"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1].to_string(), f[2].parse().unwrap())
        })
        .collect();
    assert_eq!(blob_digests.len(), 2);
    let (data_digest, data_size) = blob_digests[1].clone();
    assert!(data_size >= 200 << 20, "data layer is only {data_size} bytes");

    // Expected tree: both layers extracted in order by GNU tar.
    let expected = t.join("expected");
    std::fs::create_dir_all(&expected).unwrap();
    std::fs::write(t.join("rootfs.tar"), &rootfs).unwrap();
    let st = Command::new("tar").args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-p", "-C"]).arg(&expected).arg("-xf").arg(t.join("rootfs.tar")).status().unwrap();
    assert!(st.success());
    for (name, data) in &data_files {
        let p = expected.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        std::os::unix::fs::chown(&p, Some(1000), Some(1000)).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let tv = [libc::timespec { tv_sec: 1_700_000_000, tv_nsec: 0 }; 2];
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path and times.
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), tv.as_ptr(), 0) };
    }
    let mut want = snapshot(&expected);
    // Directories that are in no tar (parents of what was archived) get the TOC's defaults in
    // the mount and the extraction time on disk: compare them by type only.
    const IMPLICIT: [&str; 8] = ["usr", "usr/bin", "usr/lib", "usr/lib/x86_64-linux-gnu", "usr/share", "usr/share/doc", "data", "data/small"];
    for d in IMPLICIT {
        want.remove(d);
    }

    // --- Laziness: one small file of the 220 MB layer.
    {
        proxy.clear_requests();
        let m = Mounted::image(&reference, &t.join("lazy-mnt"), &t.join("lazy-state"), &["--layer", "1", "--no-background"]);
        let got = std::fs::read(m.mountpoint.join("data/small/s007.txt")).unwrap();
        assert_eq!(got, data_files.iter().find(|f| f.0 == "data/small/s007.txt").unwrap().1);
        let fetched = proxy.blob_bytes_requested(&data_digest, data_size);
        let pct = fetched as f64 * 100.0 / data_size as f64;
        eprintln!("laziness: {fetched} of {data_size} bytes fetched ({pct:.3}%)");
        assert!(pct < 1.0, "fetched {pct:.3}% of the blob for one small file");
        let st = m.status();
        assert_eq!(st["layers"][0]["errors"], 0);
        // The daemon records what was opened (the input of a prioritized rebuild); status.json
        // is rewritten every second.
        let deadline = Instant::now() + Duration::from_secs(5);
        let opened = loop {
            let opened = m.status()["layers"][0]["opened_files"].clone();
            if !opened.is_null() || Instant::now() > deadline {
                break opened;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(opened, serde_json::json!(["data/small/s007.txt"]), "opened files of the layer");
    }

    // --- A program's first read brings its libraries along (fs::deps): after reading the
    // header of `ls`, reading the libraries it loads needs no request of its own.
    {
        let m = Mounted::image(&reference, &t.join("deps-mnt"), &t.join("deps-state"), &["--layer", "0", "--no-background"]);
        let mut head = [0u8; 64];
        std::fs::File::open(m.mountpoint.join("usr/bin/ls")).unwrap().read_exact(&mut head).unwrap();
        assert_eq!(&head[..4], b"\x7fELF");
        let deadline = Instant::now() + Duration::from_secs(10);
        let libraries = loop {
            let n = m.status()["layers"][0]["libraries_prefetched"].as_u64().unwrap_or(0);
            if n >= 3 || Instant::now() > deadline {
                break n;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(libraries >= 3, "libc, libselinux and (through it) libpcre2 prefetched, got {libraries}:\n{}", tail(&m.log(), 20));
        // Those requests settle: two fresh statuses in a row count the same.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut requests = m.fresh_status()["layers"][0]["requests"].as_u64().unwrap();
        loop {
            let now = m.fresh_status()["layers"][0]["requests"].as_u64().unwrap();
            if now == requests {
                break;
            }
            assert!(Instant::now() < deadline, "the library prefetch's requests did not settle");
            requests = now;
        }
        for lib in ls_libraries() {
            let got = std::fs::read(m.mountpoint.join(&lib)).unwrap();
            assert_eq!(got, std::fs::read(Path::new("/").join(&lib)).unwrap(), "{lib}");
        }
        assert_eq!(m.fresh_status()["layers"][0]["requests"].as_u64().unwrap(), requests, "the libraries were already fetched or in flight");

        // A daemon that dies leaves its record: `status` says it is not running, and `umount`
        // cleans up without signalling whatever process may have its pid now.
        let st = m.status();
        assert_eq!(st["running"], true, "{st}");
        let pid = st["pid"].as_i64().unwrap() as i32;
        // SAFETY: the daemon this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while m.status()["running"] == true {
            assert!(Instant::now() < deadline, "status still reports the killed daemon as running");
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = lazypull(&["status", m.mountpoint.to_str().unwrap(), "--state-dir", m.state.to_str().unwrap()]);
        assert!(text.contains("NOT RUNNING"), "{text}");
        lazypull(&["umount", m.mountpoint.to_str().unwrap(), "--state-dir", m.state.to_str().unwrap()]);
        assert!(!lazyfs::is_mountpoint(&m.mountpoint), "the dead daemon's mount is still attached");
    }

    // --- Identity and concurrency on the whole image (overlayfs over two FUSE layers), cold.
    {
        let m = Mounted::image(&reference, &t.join("img-mnt"), &t.join("img-state"), &["--no-background"]);
        // 64 readers over random files, cold cache.
        let files: Vec<(String, String)> = want.iter().filter(|(_, v)| v.starts_with("file ")).map(|(k, v)| (k.clone(), v.clone())).collect();
        let mnt = m.mountpoint.clone();
        let failures = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for r in 0..64u64 {
                let (files, mnt, failures) = (&files, &mnt, &failures);
                s.spawn(move || {
                    let mut x = r.wrapping_mul(0x9e3779b97f4a7c15) | 1;
                    for _ in 0..12 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let (name, line) = &files[(x % files.len() as u64) as usize];
                        match std::fs::read(mnt.join(name)) {
                            Ok(data) if line.contains(&format!("sha256={}", sha_hex(&data))) => {}
                            Ok(_) => failures.lock().unwrap().push(format!("reader {r}: {name} has wrong content")),
                            Err(e) => failures.lock().unwrap().push(format!("reader {r}: {name}: {e}")),
                        }
                    }
                });
            }
        });
        let failures = failures.into_inner().unwrap();
        assert!(failures.is_empty(), "{} failed reads:\n{}\ndaemon log:\n{}", failures.len(), failures[..failures.len().min(10)].join("\n"), tail(&m.log(), 40));
        let mut got = snapshot(&m.mountpoint);
        for d in IMPLICIT {
            assert!(got.remove(d).is_some_and(|l| l.starts_with("dir ")), "{d} missing in mount");
        }
        assert_same("registry image under overlayfs", &want, &got);
        let st = m.status();
        for l in st["layers"].as_array().unwrap() {
            assert_eq!(l["errors"], 0, "{l}");
            assert_eq!(l["lazy"], true);
        }

        // `lazypull cache`: usage per image and layer while mounted; prune keeps what a running
        // mount uses.
        let u = cache_usage(&m.state);
        let layers = st["layers"].as_array().unwrap().len();
        assert!(u["store_bytes"].as_u64().unwrap() > 0, "{u}");
        let images = u["images"].as_array().unwrap();
        assert_eq!(images.len(), 1, "{u}");
        assert_eq!(images[0]["layers"].as_u64().unwrap() as usize, layers, "{u}");
        assert!(images[0]["bytes"].as_u64().unwrap() > 0, "{u}");
        assert!(u["layers"].as_array().unwrap().iter().all(|l| l["images"].as_array().unwrap().len() == 1 && l["items_present"].as_u64() > Some(0)), "{u}");
        lazypull(&["cache", "prune", "--state-dir", m.state.to_str().unwrap()]);
        assert_eq!(cache_usage(&m.state)["store_bytes"], u["store_bytes"], "prune removed chunks of a running mount");
    }
    // Unmounted: nothing is in use, prune empties the store, the layers stay listed with 0 bytes.
    {
        let state = t.join("img-state");
        lazypull(&["cache", "prune", "--state-dir", state.to_str().unwrap()]);
        let u = cache_usage(&state);
        assert_eq!(u["store_bytes"], 0, "{u}");
        assert!(u["images"].as_array().unwrap().is_empty(), "{u}");
        assert!(u["layers"].as_array().unwrap().iter().all(|l| l["bytes"] == 0), "{u}");
    }

    // --- zstd:chunked (`image convert --zstdchunked`) mounts lazily too, with the same tree;
    // `image inspect` and the mount agree on every layer.
    {
        let zstd_ref = format!("{host}/lazy/test:zstd");
        lazypull(&["image", "convert", &format!("oci:{}:v1", layout.display()), &zstd_ref, "--zstdchunked", "--level", "1"]);
        let inspect = lazypull(&["image", "inspect", &zstd_ref]);
        assert!(inspect.contains("2 lazily pullable") && inspect.contains("zstd:chunked"), "{inspect}");
        let m = Mounted::image(&zstd_ref, &t.join("zstd-mnt"), &t.join("zstd-state"), &["--no-background", "--no-prefetch"]);
        let name = "data/small/s007.txt";
        let content = &data_files.iter().find(|f| f.0 == name).unwrap().1;
        assert_eq!(&std::fs::read(m.mountpoint.join(name)).unwrap(), content);
        let st = m.fresh_status();
        let layers = st["layers"].as_array().unwrap();
        assert!(layers.iter().all(|l| l["lazy"] == true), "{st}");
        let fetched: u64 = layers.iter().map(|l| l["fetched_bytes"].as_u64().unwrap()).sum();
        let total: u64 = layers.iter().map(|l| l["blob_bytes"].as_u64().unwrap()).sum();
        let pct = fetched as f64 * 100.0 / total as f64;
        eprintln!("zstd:chunked mount: reading one small file fetched {fetched} of {total} bytes ({pct:.2}%)");
        assert!(pct < 5.0, "zstd:chunked mount fetched {pct:.2}% for one small file");
        let mut got = snapshot(&m.mountpoint);
        for d in IMPLICIT {
            assert!(got.remove(d).is_some_and(|l| l.starts_with("dir ")), "{d} missing in the zstd:chunked mount");
        }
        assert_same("zstd:chunked registry image under overlayfs", &want, &got);
    }

    // --- Integrity: one flipped byte in a chunk → EIO naming the chunk, then a clean refetch.
    {
        let m = Mounted::image(&reference, &t.join("bad-mnt"), &t.join("bad-state"), &["--layer", "1", "--no-background", "--no-passthrough"]);
        let name = "data/small/s123.txt";
        let content = &data_files.iter().find(|f| f.0 == name).unwrap().1;
        // Every answer corrupted (a one-shot fault is healed by the kernel's own retry of a
        // failed readahead, which refetches).
        proxy.inject_always(Some("GET"), &data_digest, Fault::CorruptBody { offset: 200 });
        proxy.clear_requests();
        let (res, _) = read_timed(&m.mountpoint.join(name));
        let Err(err) = res else {
            let reqs: Vec<String> = proxy.requests().iter().map(|r| format!("{} {} {:?} -> {}", r.method, r.path, r.header("range"), r.status)).collect();
            panic!("a corrupt chunk was returned; requests:\n{}\nlog:\n{}", reqs.join("\n"), tail(&m.log(), 20));
        };
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        let chunk_digest = format!("sha256:{}", sha_hex(content));
        let log = m.log();
        assert!(log.contains(&chunk_digest) && log.contains("corrupt"), "log does not name chunk {chunk_digest}:\n{log}");
        // Once the proxy behaves, the next read fetches again and returns the right bytes.
        proxy.clear();
        let (res, _) = read_timed(&m.mountpoint.join(name));
        assert_eq!(&res.unwrap(), content);
    }

    // --- Registry gone after mount: cached files read, uncached fail with EIO in time.
    {
        let m = Mounted::image(&reference, &t.join("gone-mnt"), &t.join("gone-state"), &["--layer", "1", "--no-background", "--fetch-timeout", "3"]);
        let cached = "data/small/s200.txt";
        let (res, _) = read_timed(&m.mountpoint.join(cached));
        let cached_content = res.unwrap();
        proxy.inject_always(None, "/v2/", Fault::Status(503));
        drop_page_cache();
        let (res, _) = read_timed(&m.mountpoint.join(cached));
        assert_eq!(res.unwrap(), cached_content, "cached file must still read");
        let (res, took) = read_timed(&m.mountpoint.join("data/big07.bin"));
        let err = res.expect_err("uncached read with the registry gone");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        assert!(took < Duration::from_secs(20), "EIO took {took:?}");
        eprintln!("registry gone: uncached read failed with EIO after {took:?}");
        proxy.clear();
    }
    drop(reg);
}
