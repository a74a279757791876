//! The `lazypull layer` commands end to end, as a user runs them: real files, the real binary,
//! system `tar` as the independent extractor to compare against.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lazypull(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lazypull")).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = lazypull(args);
    assert!(o.status.success(), "lazypull {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// Runs a command expected to fail cleanly: exit status 1 (not a panic's 101) and a message.
fn fails(args: &[&str]) -> String {
    let o = lazypull(args);
    assert_eq!(o.status.code(), Some(1), "lazypull {args:?}: expected a clean failure, got {:?}\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains("lazypull: error:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn sh(script: &str) {
    let s = Command::new("sh").arg("-ec").arg(script).status().unwrap();
    assert!(s.success(), "{script}");
}

/// A small but varied tree made with real syscalls.
fn sample_tree(root: &Path) {
    let r = root.display();
    sh(&format!(
        "mkdir -p {r}/usr/bin {r}/etc/deep/er {r}/dev {r}/opaque
         printf 'config\\n' > {r}/etc/conf
         head -c 300000 /dev/urandom > {r}/usr/bin/big
         ln {r}/usr/bin/big {r}/usr/bin/big-hardlink
         ln -s ../etc/conf {r}/usr/conf-link
         : > {r}/etc/empty
         chmod 4755 {r}/usr/bin/big; chmod 1777 {r}/etc/deep
         mkfifo {r}/dev/fifo
         mknod {r}/dev/null c 1 3 2>/dev/null || true
         chown 123:456 {r}/etc/conf
         : > {r}/etc/.wh.gone; : > {r}/opaque/.wh..wh..opq
         setfattr -n user.note -v hello {r}/etc/conf 2>/dev/null || true
         find {r} -exec touch -h -d '2021-05-06 07:08:09' {{}} +
         touch -d '2020-01-02 03:04:05' {r}/etc/conf {r}/etc"
    ));
}

fn listing(dir: &Path) -> Vec<String> {
    // type, mode, owner, size (for files), link target, inode group for hardlinks.
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = dir.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&full).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let m = std::fs::symlink_metadata(dir.join(&r)).unwrap();
            let link = std::fs::read_link(dir.join(&r)).map(|p| p.display().to_string()).unwrap_or_default();
            let content = if m.is_file() { format!("{:x}", md5ish(&std::fs::read(dir.join(&r)).unwrap())) } else { String::new() };
            out.push(format!(
                "{} {:o} {}:{} {} {} {} nlink={} rdev={} mtime={}",
                r.display(),
                m.mode(),
                m.uid(),
                m.gid(),
                if m.is_dir() { 0 } else { m.size() },
                link,
                content,
                if m.is_dir() { 0 } else { m.nlink() },
                m.rdev(),
                if m.is_dir() { 0 } else { m.mtime() }
            ));
            if m.is_dir() {
                stack.push(r);
            }
        }
    }
    out.sort();
    out
}

fn md5ish(b: &[u8]) -> u64 {
    // FNV-1a: enough to compare contents in a listing.
    b.iter().fold(0xcbf29ce484222325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x100000001b3))
}

#[test]
fn convert_inspect_verify_extract_match_system_tar() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    sample_tree(&src);
    let tar = d.path().join("layer.tar");
    sh(&format!("tar --xattrs -C {} -cf {} .", src.display(), tar.display()));
    let blob = d.path().join("layer.esgz");
    let out = ok(&["layer", "convert", "--json", "--chunk-size", "65536", tar.to_str().unwrap(), blob.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let toc = v["tocDigest"].as_str().unwrap().to_string();
    assert_eq!(v["annotations"]["containerd.io/snapshot/stargz/toc.digest"], toc.as_str());

    let inspect = ok(&["layer", "inspect", blob.to_str().unwrap()]);
    assert!(inspect.contains("eStargz (gzip, 51-byte footer)") && inspect.contains(&toc), "{inspect}");
    let j: serde_json::Value = serde_json::from_str(&ok(&["layer", "inspect", "--json", blob.to_str().unwrap()])).unwrap();
    assert!(j["chunks"].as_u64().unwrap() >= 5, "300 kB at 64 KiB per chunk: {j}");
    assert_eq!(j["landmark"].as_str().unwrap().split(' ').next(), Some("no-prefetch"));

    let verify = ok(&["layer", "verify", "--toc-digest", &toc, blob.to_str().unwrap()]);
    assert!(verify.starts_with("OK:"), "{verify}");

    // Extract with lazypull; extract the input with GNU tar; the trees must be identical.
    let ours = d.path().join("ours");
    ok(&["layer", "extract", blob.to_str().unwrap(), ours.to_str().unwrap()]);
    std::fs::remove_file(ours.join(".no.prefetch.landmark")).unwrap();
    let theirs = d.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    sh(&format!("tar --xattrs --same-owner -C {} -xpf {}", theirs.display(), tar.display()));
    assert_eq!(listing(&ours), listing(&theirs));
    let ours_meta = std::fs::metadata(ours.join("usr/bin/big")).unwrap();
    assert_eq!(ours_meta.ino(), std::fs::metadata(ours.join("usr/bin/big-hardlink")).unwrap().ino());
    if nix_is_root() {
        assert_eq!(xattr_of(&ours.join("etc/conf")), xattr_of(&theirs.join("etc/conf")));
    }

    // Overlay whiteouts on request.
    let ovl = d.path().join("ovl");
    ok(&["layer", "extract", "--overlay-whiteouts", blob.to_str().unwrap(), ovl.to_str().unwrap()]);
    let wh = std::fs::symlink_metadata(ovl.join("etc/gone")).unwrap();
    assert_eq!((wh.mode() & 0o170000, wh.rdev()), (0o020000, 0), "whiteout is a 0/0 char device");
    assert!(!ovl.join("etc/.wh.gone").exists());
}

fn nix_is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false)
}

fn xattr_of(p: &Path) -> String {
    let o = Command::new("getfattr").args(["-d", "--absolute-names"]).arg(p).output();
    o.map(|o| String::from_utf8_lossy(&o.stdout).lines().skip(1).collect::<Vec<_>>().join("\n")).unwrap_or_default()
}

#[test]
fn prioritize_accepts_json_lines_and_plain_lists() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    sample_tree(&src);
    let tar = d.path().join("l.tar");
    sh(&format!("tar -C {} -cf {} etc usr dev", src.display(), tar.display()));
    for (file, body) in [
        ("p.jsonl", "{\"path\":\"/usr/bin/big\",\"manifestDigest\":\"sha256:00\"}\n{\"path\": \"etc/conf\"}\n"),
        ("p.txt", "/usr/bin/big\n\netc/conf\n"),
    ] {
        let list = d.path().join(file);
        std::fs::write(&list, body).unwrap();
        let blob = d.path().join(format!("{file}.esgz"));
        ok(&["layer", "convert", "--prioritize", list.to_str().unwrap(), tar.to_str().unwrap(), blob.to_str().unwrap()]);
        let names = String::from_utf8(Command::new("sh").arg("-c").arg(format!("gzip -dc {} | tar -t", blob.display())).output().unwrap().stdout).unwrap();
        let names: Vec<&str> = names.lines().collect();
        let pos = |n: &str| names.iter().position(|x| x.trim_end_matches('/') == n).unwrap_or_else(|| panic!("{n} in {names:?}"));
        assert!(pos("usr/bin/big") < pos("etc/conf") && pos("etc/conf") < pos(".prefetch.landmark"), "{file}: {names:?}");
        let j: serde_json::Value = serde_json::from_str(&ok(&["layer", "inspect", "--json", blob.to_str().unwrap()])).unwrap();
        assert_eq!(j["prioritizedFiles"], 2, "{file}");
    }
    let bad = d.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"nopath\": 1}\n").unwrap();
    let err = fails(&["layer", "convert", "--prioritize", bad.to_str().unwrap(), tar.to_str().unwrap(), "/dev/null/x"]);
    assert!(err.contains("bad.jsonl:1") && err.contains("path"), "{err}");
}

#[test]
fn zstd_chunked_convert_reports_its_annotations() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    sample_tree(&src);
    let tar = d.path().join("l.tar");
    sh(&format!("tar -C {} -cf {} .", src.display(), tar.display()));
    let blob = d.path().join("l.zst");
    let v: serde_json::Value = serde_json::from_str(&ok(&["layer", "convert", "--zstd", "--json", tar.to_str().unwrap(), blob.to_str().unwrap()])).unwrap();
    let pos = v["annotations"]["io.containers.zstd-chunked.manifest-position"].as_str().unwrap();
    assert_eq!(pos.split(':').count(), 4, "offset:length:uncompressed:type, got {pos}");
    assert!(ok(&["layer", "inspect", blob.to_str().unwrap()]).contains("zstd:chunked (40-byte footer)"));
    ok(&["layer", "verify", blob.to_str().unwrap()]);
}

#[test]
fn bad_input_fails_cleanly_with_a_named_problem() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    sh(&format!("mkdir -p {0}/s && echo hi > {0}/s/f && head -c 200000 /dev/urandom > {0}/s/r && tar -C {0}/s -cf {0}/l.tar . && gzip -kc {0}/l.tar > {0}/l.tar.gz", d.path().display()));
    ok(&["layer", "convert", &p("l.tar"), &p("good.esgz")]);

    let e = fails(&["layer", "verify", &p("l.tar.gz")]);
    assert!(e.contains("not an eStargz"), "{e}");
    let e = fails(&["layer", "verify", "--toc-digest", &format!("sha256:{}", "1".repeat(64)), &p("good.esgz")]);
    assert!(e.contains("TOC digest mismatch"), "{e}");
    let e = fails(&["layer", "verify", "--toc-digest", "md5:xyz", &p("good.esgz")]);
    assert!(e.contains("md5:xyz"), "{e}");
    let e = fails(&["layer", "inspect", &p("missing.esgz")]);
    assert!(e.contains("missing.esgz"), "{e}");

    // One flipped byte in the middle of the random file's data.
    let mut bytes = std::fs::read(p("good.esgz")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(p("flipped.esgz"), &bytes).unwrap();
    let e = fails(&["layer", "verify", &p("flipped.esgz")]);
    assert!(e.contains("./r") || e.contains("r at") || e.contains("\"r\""), "must name the file: {e}");
    let e = fails(&["layer", "extract", &p("flipped.esgz"), &p("out")]);
    assert!(e.contains("digest mismatch") || e.contains("decompression failed"), "{e}");

    // Truncated.
    std::fs::write(p("trunc.esgz"), &std::fs::read(p("good.esgz")).unwrap()[..1000]).unwrap();
    fails(&["layer", "inspect", &p("trunc.esgz")]);

    // Hostile tar input never produces an output file.
    let mut t = std::fs::read(p("l.tar")).unwrap();
    t[..100].fill(0);
    t[..7].copy_from_slice(b"../evil");
    let mut sum: u32 = t[..512].iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { b as u32 }).sum();
    sum &= 0o777777;
    t[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    std::fs::write(p("evil.tar"), &t).unwrap();
    let e = fails(&["layer", "convert", &p("evil.tar"), &p("evil.esgz")]);
    assert!(e.contains("../evil"), "{e}");
    assert!(!Path::new(&p("evil.esgz")).exists() && !Path::new(&p("evil.partial")).exists());
}

/// Writes a one-image OCI layout (one gzip layer) tagged `v1` into `dir`.
fn tiny_layout(dir: &Path, src: &Path) {
    use sha2::Digest as _;
    let sha = |b: &[u8]| format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)));
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let d = sha(b);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), b).unwrap();
        d
    };
    let tar = Command::new("tar").arg("-C").arg(src).args(["-cf", "-", "."]).output().unwrap().stdout;
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    };
    let layer = put(&gz);
    let config = serde_json::to_vec(&serde_json::json!({"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[sha(&tar)]}})).unwrap();
    let cfg = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":cfg,"size":config.len()},
        "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":layer,"size":gz.len()}]})).unwrap();
    let m = put(&manifest);
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "digest":m,"size":manifest.len(),"annotations":{"org.opencontainers.image.ref.name":"v1"}}]}))
        .unwrap(),
    )
    .unwrap();
}

#[test]
fn image_convert_and_inspect_between_oci_layouts() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    sample_tree(&src);
    let layout = d.path().join("layout");
    tiny_layout(&layout, &src);
    let from = format!("oci:{}:v1", layout.display());
    let before = ok(&["image", "inspect", &from]);
    assert!(before.contains("0 lazily pullable") && before.contains("not lazy"), "{before}");
    let to = format!("oci:{}:esgz", d.path().join("out").display());
    let out = ok(&["image", "convert", &from, &to]);
    assert!(out.contains("1 layer(s) converted"), "{out}");
    let after = ok(&["image", "inspect", &to]);
    assert!(after.contains("1 lazily pullable") && after.contains("lazy: eStargz"), "{after}");
    // Converting the converted image keeps its layer.
    let again = ok(&["image", "convert", &to, &format!("oci:{}:again", d.path().join("out").display())]);
    assert!(again.contains("0 layer(s) converted, 1 kept"), "{again}");
    let e = fails(&["image", "inspect", &format!("oci:{}:nope", layout.display())]);
    assert!(e.contains("nope"), "{e}");
    let e = fails(&["image", "convert", "UPPER/Case", &to]);
    assert!(e.contains("UPPER/Case"), "{e}");
}
