//! Interop both ways with the reference implementation (containerd/stargz-snapshotter's Go
//! `estargz` package, Debian's `golang-github-containerd-stargz-snapshotter-dev`), through the
//! small Go oracle in `interop/estargz-conformance`:
//!
//! * every blob we write (gzip and zstd:chunked) is opened by the reference, its TOC digest and
//!   every chunk verified, every file read — and what it sees must equal what we see;
//! * every blob the reference writes from the same corpus is opened and verified by us, with
//!   contents identical to the input tar.
//!
//! Without Go the tests skip, unless `LAZYPULL_INTEROP=required` (set by `make test`).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use base64::Engine as _;
use estargz::{build, BuildOptions, Compression, FileSource, NodeKind, Reader};
use support::*;

fn oracle() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        let required = std::env::var("LAZYPULL_INTEROP").is_ok_and(|v| v == "required");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop/estargz-conformance");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("estargz-conformance");
        let built = Command::new("go")
            .args(["build", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(&src)
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env_remove("GOFLAGS")
            .output();
        match built {
            Ok(o) if o.status.success() => Some(out),
            Ok(o) => {
                let msg = format!("building the Go conformance oracle failed: {}", String::from_utf8_lossy(&o.stderr));
                assert!(!required, "{msg}");
                eprintln!("SKIP interop: {msg}");
                None
            }
            Err(e) => {
                assert!(!required, "LAZYPULL_INTEROP=required but `go` cannot run: {e} (apt install golang-go golang-github-containerd-stargz-snapshotter-dev)");
                eprintln!("SKIP interop: go not found ({e})");
                None
            }
        }
    })
    .as_deref()
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct GoEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    uname: String,
    mod_time: String,
    link_name: String,
    dev_major: u32,
    dev_minor: u32,
    xattrs: BTreeMap<String, String>,
    sha256: String,
    num_link: u32,
}

fn go_verify(bin: &Path, blob: &Path, toc_digest: &str) -> Vec<GoEntry> {
    let out = Command::new(bin).args(["verify", "-toc-digest", toc_digest]).arg(blob).output().unwrap();
    assert!(
        out.status.success(),
        "reference rejected {}: {}",
        blob.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad oracle line {l}: {e}")))
        .collect()
}

/// What the reference sees must equal what our reader sees, path by path.
fn same_view(name: &str, go: &[GoEntry], ours: &Reader<FileSource>) {
    let tree = ours.tree();
    let walk = tree.walk();
    let go_names: Vec<&str> = go.iter().map(|e| e.name.as_str()).collect();
    let mut our_names: Vec<&str> = walk.iter().map(|(p, _)| p.as_str()).collect();
    our_names.sort_unstable();
    assert_eq!(go_names, our_names, "{name}: the reference and lazypull list different paths");
    for (e, (path, id)) in go.iter().zip({
        let mut w = walk.clone();
        w.sort();
        w
    }) {
        assert_eq!(e.name, path);
        let n = tree.node(id);
        let kind = n.kind.as_str();
        // The reference reports a hardlink path with its target's fields.
        if e.kind != "hardlink" {
            assert_eq!(e.kind, kind, "{name}: {path} type");
        }
        let what = format!("{name}: {path}");
        assert_eq!(e.mode & 0o7777, n.mode, "{what} mode");
        assert_eq!((e.uid, e.gid), (n.uid, n.gid), "{what} owner");
        if !e.uname.is_empty() {
            assert_eq!(e.uname, n.user_name, "{what} user name");
        }
        assert_eq!(e.num_link, n.nlink, "{what} link count");
        if !e.mod_time.is_empty() {
            assert_eq!(e.mod_time, estargz::format_rfc3339(n.mtime), "{what} mtime");
        }
        let xattrs: BTreeMap<String, Vec<u8>> = e
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone(), base64::engine::general_purpose::STANDARD.decode(v).unwrap()))
            .collect();
        assert_eq!(xattrs, n.xattrs, "{what} xattrs");
        match n.kind {
            NodeKind::Reg => {
                assert_eq!(e.size, n.size, "{what} size");
                let mut buf = vec![0u8; n.size as usize];
                ours.read_file_at(id, 0, &mut buf, true).unwrap();
                assert_eq!(sha256_hex(&buf), format!("sha256:{}", e.sha256), "{what} content");
            }
            NodeKind::Symlink => assert_eq!(e.link_name, n.link_target, "{what} link target"),
            NodeKind::Char | NodeKind::Block => assert_eq!((e.dev_major, e.dev_minor), (n.dev_major, n.dev_minor), "{what} device"),
            _ => {}
        }
    }
}

#[test]
fn reference_reads_and_verifies_every_blob_we_write() {
    let Some(bin) = oracle() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut corpora = corpora();
    let mut big = vec![Item::dir("big")];
    for i in 0..8u64 {
        big.push(Item::file(&format!("big/{i}"), noise(i as usize * 5000 + 1, i)));
    }
    big.push(Item::hardlink("big/link-to-3", "big/3"));
    corpora.push(("multi-chunk-and-links", big));
    for (name, items) in corpora {
        for (compression, ext) in [(Compression::Gzip, "esgz"), (Compression::Zstd, "zst")] {
            for prioritized in [vec![], vec!["big/5".to_string(), "etc/big".to_string(), "s/many".to_string()]] {
                let input = write_tar(&items);
                let path = dir.path().join(format!("{name}.{ext}"));
                let opts = BuildOptions {
                    compression,
                    chunk_size: CHUNK as u64,
                    prioritized,
                    ..Default::default()
                };
                let res = build(input.as_slice(), std::fs::File::create(&path).unwrap(), &opts).unwrap();
                let go = go_verify(bin, &path, &res.toc_digest.to_string());
                let ours = Reader::open(FileSource::open(&path).unwrap()).unwrap();
                same_view(&format!("{name} ({ext})"), &go, &ours);
            }
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct GoBuild {
    toc_digest: String,
    #[serde(rename = "diffID")]
    diff_id: String,
}

#[test]
fn we_read_and_verify_every_blob_the_reference_writes() {
    let Some(bin) = oracle() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (name, items) in corpora() {
        let input = write_tar(&items);
        let tar_path = write_file(dir.path(), &format!("{name}.tar"), &input);
        let want = last_wins(parse_tar(&input));
        for (flag, tool) in [(None, "gzip"), (Some("-zstd"), "zstd")] {
            let blob = dir.path().join(format!("{name}.{tool}.blob"));
            let mut cmd = Command::new(bin);
            cmd.args(["build", "-chunk-size", &CHUNK.to_string()]);
            if let Some(f) = flag {
                cmd.arg(f);
            }
            let out = cmd.arg(&tar_path).arg(&blob).output().unwrap();
            assert!(out.status.success(), "{name}: reference build failed: {}", String::from_utf8_lossy(&out.stderr));
            let built: GoBuild = serde_json::from_slice(&out.stdout).unwrap();

            let r = Reader::open(FileSource::open(&blob).unwrap()).unwrap_or_else(|e| panic!("{name} ({tool}): {e}"));
            r.verify_toc(&built.toc_digest.parse().unwrap()).unwrap();
            estargz::verify_chunks(&r).unwrap_or_else(|e| panic!("{name} ({tool}): {e}"));
            reader_matches(&format!("{name} (reference {tool})"), &r, &want);

            // The DiffID the reference reports is the plain decompressed stream's digest.
            let plain = pipe(tool, &["-dc"], &std::fs::read(&blob).unwrap());
            assert_eq!(sha256_hex(&plain), built.diff_id, "{name} ({tool}): reference DiffID");
            // And both implementations agree on what is in it.
            same_view(&format!("{name} (reference {tool})"), &go_verify(bin, &blob, &built.toc_digest), &r);
        }
    }
}
