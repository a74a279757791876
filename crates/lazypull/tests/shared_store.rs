//! Issue 17 ("one store for the node"), on real mounts: eight layer daemons share one chunk
//! store, start and fetch at once (four layers, each mounted twice, half of their files the
//! same bytes, so the daemons race for the same chunk files), one is `kill -9`ed while reading
//! and restarted. Afterwards every file of every mount has the right content, every chunk file
//! in the store hashes to its name, every recorded piece of every file object hashes to the
//! chunk digest it is recorded under, and no temporary file of a dead writer (or older than the
//! store's age limit) is left. Then a fifth layer repeating the shared files under another digest
//! fetches at most 5% of their bytes (dedup across daemons).
//!
//! Needs root and /dev/fuse (skipped otherwise, unless `LAZYPULL_INTEROP=required`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_lazypull");
const DAEMONS: usize = 8;
const LAYERS: usize = 4;
const VICTIM: usize = 3;

fn runnable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root && Path::new("/dev/fuse").exists() {
        return true;
    }
    assert!(std::env::var("LAZYPULL_INTEROP").as_deref() != Ok("required"), "LAZYPULL_INTEROP=required but not root or no /dev/fuse");
    eprintln!("skipping: needs root and /dev/fuse");
    false
}

fn lazypull(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("running lazypull");
    assert!(out.status.success(), "lazypull {args:?}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn pseudo(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Files of layer `l`: the shared ones (same bytes in every layer) and its own.
fn layer_files(l: usize) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for i in 0..3 {
        files.push((format!("shared/big{i}"), pseudo(1_500_000 + i * 4_096, 1000 + i as u64)));
    }
    for i in 0..24 {
        files.push((format!("shared/small{i}"), pseudo(9_000 + i * 100, 2000 + i as u64)));
    }
    for i in 0..2 {
        files.push((format!("own/big{i}"), pseudo(1_200_000, 3000 + (l * 10 + i) as u64)));
    }
    for i in 0..16 {
        files.push((format!("own/small{i}"), pseudo(7_000, 4000 + (l * 100 + i) as u64)));
    }
    files
}

fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn mount(blob: &Path, mnt: &Path, state: &Path) {
    std::fs::create_dir_all(mnt).unwrap();
    lazypull(&["layer", "mount", blob.to_str().unwrap(), mnt.to_str().unwrap(), "--state-dir", state.to_str().unwrap(), "--no-passthrough"]);
}

/// Reads every file under `mnt` and returns the paths whose content differs (or fails).
fn wrong_files(mnt: &Path, want: &BTreeMap<String, String>) -> Vec<String> {
    want.iter()
        .filter(|(name, sha)| std::fs::read(mnt.join(name)).map(|d| sha_hex(&d) != **sha).unwrap_or(true))
        .map(|(name, _)| name.clone())
        .collect()
}

fn pid_of(mnt: &Path) -> i32 {
    let st: serde_json::Value = serde_json::from_str(&lazypull(&["status", mnt.to_str().unwrap(), "--json"])).unwrap();
    st["pid"].as_i64().unwrap() as i32
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn eight_daemons_share_one_store_and_survive_a_kill() {
    if !runnable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut blobs = Vec::new();
    let mut wants = Vec::new();
    for l in 0..LAYERS {
        let files = layer_files(l);
        let tar_path = tmp.path().join(format!("layer{l}.tar"));
        std::fs::File::create(&tar_path).unwrap().write_all(&tar_of(&files)).unwrap();
        let blob = tmp.path().join(format!("layer{l}.esgz"));
        lazypull(&["layer", "convert", tar_path.to_str().unwrap(), blob.to_str().unwrap(), "--chunk-size", "65536"]);
        blobs.push(blob);
        wants.push(files.iter().map(|(n, d)| (n.clone(), sha_hex(d))).collect::<BTreeMap<_, _>>());
    }
    let mnts: Vec<PathBuf> = (0..DAEMONS).map(|i| tmp.path().join(format!("mnt{i}"))).collect();

    // All eight start at once on one (empty) store.
    std::thread::scope(|s| {
        for (i, mnt) in mnts.iter().enumerate() {
            let (blob, state) = (&blobs[i % LAYERS], &state);
            s.spawn(move || mount(blob, mnt, state));
        }
    });
    let victim_pid = pid_of(&mnts[VICTIM]);

    // All read at once; the victim's daemon is killed once its reader is under way.
    let started = AtomicUsize::new(0);
    let killed = AtomicBool::new(false);
    let wrong: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = mnts
            .iter()
            .enumerate()
            .map(|(i, mnt)| {
                let (want, started, killed) = (&wants[i % LAYERS], &started, &killed);
                s.spawn(move || {
                    let mut wrong = Vec::new();
                    for (n, (name, sha)) in want.iter().enumerate() {
                        if i == VICTIM && n == 2 {
                            started.fetch_add(1, Ordering::SeqCst);
                            while !killed.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        }
                        if !(i == VICTIM && killed.load(Ordering::SeqCst)) && std::fs::read(mnt.join(name)).map(|d| sha_hex(&d) != *sha).unwrap_or(true) {
                            wrong.push(name.clone());
                        }
                    }
                    wrong
                })
            })
            .collect();
        while started.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // SAFETY: the daemon this test started (pid from its status).
        unsafe { libc::kill(victim_pid, libc::SIGKILL) };
        killed.store(true, Ordering::SeqCst);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, w) in wrong.iter().enumerate() {
        assert!(w.is_empty(), "mount {i}: {} wrong or failed reads while another daemon was killed: {:?}", w.len(), &w[..w.len().min(5)]);
    }

    // A leftover of the dead writer and one past the age limit; restarting the victim (which
    // opens the store) removes both, while the files of live writers stay.
    let tmp_dir = state.join("cache/tmp");
    let dead_leftover = tmp_dir.join(format!("{victim_pid}-0-deadbeefdeadbeef"));
    std::fs::write(&dead_leftover, b"partial").unwrap();
    let old_leftover = tmp_dir.join(format!("{}-0-0123456789abcdef", std::process::id()));
    std::fs::write(&old_leftover, b"partial").unwrap();
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options().write(true).open(&old_leftover).unwrap().set_modified(two_hours_ago).unwrap();
    let live_write = tmp_dir.join(format!("{}-1-fedcba9876543210", std::process::id()));
    std::fs::write(&live_write, b"in flight").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while unsafe { libc::kill(victim_pid, 0) } == 0 {
        assert!(Instant::now() < deadline, "killed daemon still running");
        std::thread::sleep(Duration::from_millis(10));
    }
    lazypull(&["umount", mnts[VICTIM].to_str().unwrap(), "--state-dir", state.to_str().unwrap()]);
    mount(&blobs[VICTIM % LAYERS], &mnts[VICTIM], &state);
    assert!(!dead_leftover.exists(), "a dead writer's temp file survived a store open");
    assert!(!old_leftover.exists(), "a temp file older than the age limit survived a store open");
    assert!(live_write.exists(), "a live writer's temp file was removed");
    std::fs::remove_file(&live_write).unwrap();

    // Every mount, the restarted one included, reads every file right.
    for (i, mnt) in mnts.iter().enumerate() {
        let w = wrong_files(mnt, &wants[i % LAYERS]);
        assert!(w.is_empty(), "mount {i} after the restart: {w:?}");
    }

    // Dedup across daemons: a new layer (another digest) holding the same shared files fetches
    // almost none of their bytes — the other daemons' chunks are found in the store.
    let l = LAYERS;
    let files = layer_files(l);
    let tar_path = tmp.path().join(format!("layer{l}.tar"));
    std::fs::write(&tar_path, tar_of(&files)).unwrap();
    let blob = tmp.path().join(format!("layer{l}.esgz"));
    lazypull(&["layer", "convert", tar_path.to_str().unwrap(), blob.to_str().unwrap(), "--chunk-size", "65536"]);
    let mnt = tmp.path().join("mnt-dedup");
    std::fs::create_dir_all(&mnt).unwrap();
    lazypull(&["layer", "mount", blob.to_str().unwrap(), mnt.to_str().unwrap(), "--state-dir", state.to_str().unwrap(), "--no-passthrough", "--no-background", "--no-prefetch"]);
    let shared: BTreeMap<String, String> = files.iter().filter(|(n, _)| n.starts_with("shared/")).map(|(n, d)| (n.clone(), sha_hex(d))).collect();
    let shared_bytes: usize = files.iter().filter(|(n, _)| n.starts_with("shared/")).map(|(_, d)| d.len()).sum();
    assert!(wrong_files(&mnt, &shared).is_empty());
    let st: serde_json::Value = serde_json::from_str(&lazypull(&["status", mnt.to_str().unwrap(), "--json"])).unwrap();
    let fetched = st["layers"][0]["fetched_bytes"].as_u64().unwrap();
    let pct = fetched as f64 * 100.0 / shared_bytes as f64;
    eprintln!("dedup across daemons: reading {shared_bytes} bytes of shared files through a new layer fetched {fetched} bytes ({pct:.2}%)");
    assert!(pct <= 5.0, "a layer repeating stored files fetched {pct:.2}% of their bytes");
    // The counter does count: the first layers' daemons fetched from their blobs.
    let first: u64 = mnts[..LAYERS]
        .iter()
        .map(|m| serde_json::from_str::<serde_json::Value>(&lazypull(&["status", m.to_str().unwrap(), "--json"])).unwrap()["layers"][0]["fetched_bytes"].as_u64().unwrap())
        .sum();
    assert!(first as usize >= shared_bytes, "the first daemons fetched only {first} bytes");
    lazypull(&["umount", mnt.to_str().unwrap(), "--state-dir", state.to_str().unwrap()]);

    for mnt in &mnts {
        lazypull(&["umount", mnt.to_str().unwrap(), "--state-dir", state.to_str().unwrap()]);
    }

    // Every chunk in the store is intact, and so is every recorded piece of every file object.
    let (mut chunks, mut pieces) = (0, 0);
    for f in files_under(&state.join("cache/chunks")) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(sha_hex(&std::fs::read(&f).unwrap()), name, "chunk file {} is corrupt", f.display());
        chunks += 1;
    }
    for f in files_under(&state.join("cache/objects")).into_iter().filter(|p| p.extension().is_some_and(|e| e == "chunks")) {
        let object = std::fs::read(f.with_extension("")).unwrap();
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [offset, len, hex] = parts[..] else { panic!("bad index line {line:?} in {}", f.display()) };
            let (offset, len): (usize, usize) = (offset.parse().unwrap(), len.parse().unwrap());
            assert_eq!(sha_hex(&object[offset..offset + len]), hex, "object {} is corrupt at {offset}", f.display());
            pieces += 1;
        }
    }
    let left: Vec<PathBuf> = files_under(&tmp_dir);
    assert!(left.is_empty(), "temporary files left after every daemon exited: {left:?}");
    eprintln!("{DAEMONS} daemons on one store, one killed and restarted: {chunks} chunk files and {pieces} object pieces verified, no temp files left");
    assert!(chunks > 0 && pieces > 0, "the store holds {chunks} chunks and {pieces} object pieces");
}
