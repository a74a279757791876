//! Whole-image conversion against Debian's real registry: OCI layout → registry and
//! registry → registry, multi-platform indexes, kept layers, and every converted layer checked
//! by our reader and by the Go reference library (interop oracle from the format crate).

#[path = "../../registry/tests/support/registry.rs"]
mod test_registry;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use convert::{convert_image, ConvertOptions, Store};
use registry::manifest::{self, ManifestKind, Platform};
use registry::{Client, Credentials, Reference, RegistryConfig};
use sha2::{Digest as _, Sha256};
use test_registry::{Auth, TestRegistry};

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A layer tarball (gzip) with a few files, and its files for later comparison.
fn layer(seed: u8, files: &[(&str, usize)]) -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
    let mut b = tar::Builder::new(Vec::new());
    let mut want = BTreeMap::new();
    for (name, len) in files {
        let data: Vec<u8> = (0..*len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
        want.insert(name.to_string(), data);
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), want)
}

fn put_blob(dir: &Path, bytes: &[u8]) -> (String, u64) {
    let d = sha(bytes);
    let p = dir.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
    (d, bytes.len() as u64)
}

/// Writes an OCI layout with one image per platform (index when more than one).
fn write_layout(dir: &Path, platforms: &[&str]) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    let mut expected = BTreeMap::new();
    let mut descs = Vec::new();
    for (pi, plat) in platforms.iter().enumerate() {
        let (l1, f1) = layer(pi as u8, &[("etc/os-release", 100), ("bin/tool", 300_000)]);
        let (l2, f2) = layer(pi as u8 + 100, &[("app/data.bin", 5_000_000), ("app/small", 3)]);
        let diff = |gz: &[u8]| {
            let mut d = flate2::read::GzDecoder::new(gz);
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut d, &mut out).unwrap();
            sha(&out)
        };
        let (os, arch) = plat.split_once('/').unwrap();
        let config = serde_json::json!({"architecture": arch, "os": os, "config": {"Cmd": ["/bin/tool"]},
            "rootfs": {"type": "layers", "diff_ids": [diff(&l1), diff(&l2)]}, "history": [{"created_by": "test"}]});
        let config = serde_json::to_vec(&config).unwrap();
        let (cd, cs) = put_blob(dir, &config);
        let (d1, s1) = put_blob(dir, &l1);
        let (d2, s2) = put_blob(dir, &l2);
        let m = serde_json::json!({"schemaVersion": 2, "mediaType": manifest::DOCKER_MANIFEST,
            "config": {"mediaType": manifest::DOCKER_CONFIG, "digest": cd, "size": cs},
            "layers": [{"mediaType": manifest::DOCKER_LAYER_GZIP, "digest": d1, "size": s1},
                       {"mediaType": manifest::DOCKER_LAYER_GZIP, "digest": d2, "size": s2}],
            "annotations": {"org.example.keep": "me"}});
        let m = serde_json::to_vec(&m).unwrap();
        let (md, ms) = put_blob(dir, &m);
        descs.push(serde_json::json!({"mediaType": manifest::DOCKER_MANIFEST, "digest": md, "size": ms,
            "platform": {"os": os, "architecture": arch}}));
        let mut files = f1;
        files.extend(f2);
        expected.insert(plat.to_string(), files);
    }
    let top = if descs.len() == 1 {
        let mut d = descs[0].clone();
        d.as_object_mut().unwrap().remove("platform");
        d
    } else {
        let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": manifest::OCI_INDEX, "manifests": descs})).unwrap();
        let (d, s) = put_blob(dir, &index);
        serde_json::json!({"mediaType": manifest::OCI_INDEX, "digest": d, "size": s})
    };
    let mut top = top;
    top["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "v1"});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [top]})).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    expected
}

fn oracle() -> Option<PathBuf> {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("estargz-conformance-convert");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop/estargz-conformance");
    let ok = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(src)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(std::env::var("LAZYPULL_INTEROP").as_deref() != Ok("required"), "Go conformance oracle did not build");
        return None;
    }
    Some(out)
}

/// Checks one converted image manifest: media types, annotations, diff_ids, contents.
async fn check_image(client: &Client, r: &Reference, digest: &str, want: &BTreeMap<String, Vec<u8>>, oracle: Option<&Path>) {
    let m = client.get_manifest(&r.with_digest(digest)).await.unwrap();
    let ManifestKind::Image(m) = m.manifest else { panic!("expected an image manifest") };
    assert_eq!(m.media_type.as_deref(), Some(manifest::OCI_MANIFEST));
    assert_eq!(m.config.media_type, manifest::OCI_CONFIG);
    assert_eq!(m.annotations.get("org.example.keep").map(String::as_str), Some("me"), "manifest annotations kept");
    let config: serde_json::Value = serde_json::from_slice(&client.get_blob_bytes(r, &m.config.digest, 1 << 20).await.unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut seen = BTreeMap::new();
    for (i, l) in m.layers.iter().enumerate() {
        assert_eq!(l.media_type, manifest::OCI_LAYER_GZIP);
        let toc = l.annotations.get(estargz::toc::TOC_DIGEST_ANNOTATION).expect("toc.digest annotation");
        let path = dir.path().join(format!("layer{i}"));
        let mut f = tokio::fs::File::create(&path).await.unwrap();
        client.get_blob_to(r, &l.digest, &mut f, None).await.unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // DiffID in the config = sha256 of the plain gunzip stream; uncompressed-size annotation too.
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(bytes.as_slice()), &mut plain).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][i], sha(&plain), "layer {i} diff_id");
        assert_eq!(l.annotations[estargz::toc::UNCOMPRESSED_SIZE_ANNOTATION], plain.len().to_string());
        let reader = estargz::Reader::open(bytes).unwrap();
        reader.verify_toc(&toc.parse().unwrap()).unwrap();
        estargz::verify_chunks(&reader).unwrap();
        for (p, id) in reader.tree().walk() {
            let n = reader.tree().node(id);
            if n.kind == estargz::NodeKind::Reg && !p.ends_with(".landmark") {
                let mut buf = vec![0u8; n.size as usize];
                reader.read_file_at(id, 0, &mut buf, true).unwrap();
                seen.insert(p, buf);
            }
        }
        if let Some(bin) = oracle {
            let out = Command::new(bin).args(["verify", "-toc-digest", toc]).arg(&path).output().unwrap();
            assert!(out.status.success(), "reference rejects layer {i}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    assert_eq!(&seen, want, "image contents");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layout_to_registry_to_registry() {
    let reg = TestRegistry::start(Auth::None);
    let client = Client::new(RegistryConfig::default(), Credentials::anonymous()).unwrap();
    let layout = tempfile::tempdir().unwrap();
    let expected = write_layout(layout.path(), &["linux/amd64", "linux/arm64"]);
    let oracle = oracle();
    let progress: convert::Progress = Arc::new(|_| {});

    // OCI layout (Docker media types, an index of two platforms) -> registry, all platforms.
    let src = Store::Layout { dir: layout.path().to_path_buf(), tag: "v1".into() };
    let dst_ref = Reference::parse(&format!("{}/app:esgz", reg.host)).unwrap();
    let dst = Store::Registry { client: client.clone(), reference: dst_ref.clone() };
    let opts = ConvertOptions { all_platforms: true, chunk_size: 1 << 20, ..Default::default() };
    let report = convert_image(&src, &dst, &opts, progress.clone()).await.unwrap();
    assert_eq!((report.manifests, report.layers_converted, report.layers_kept), (2, 4, 0));
    let top = client.get_manifest(&dst_ref).await.unwrap();
    assert_eq!(top.digest, report.digest);
    let ManifestKind::Index(index) = top.manifest else { panic!("an index must stay an index") };
    assert_eq!(index.manifests.len(), 2);
    for d in &index.manifests {
        let plat = d.platform.as_ref().unwrap().to_string();
        check_image(&client, &dst_ref, &d.digest, &expected[&plat], oracle.as_deref()).await;
    }

    // Registry -> registry, one platform: the result is an index with that platform only.
    let one_ref = Reference::parse(&format!("{}/other:arm", reg.host)).unwrap();
    let src2 = Store::Registry { client: client.clone(), reference: dst_ref.clone() };
    let dst2 = Store::Registry { client: client.clone(), reference: one_ref.clone() };
    let opts2 = ConvertOptions { platforms: vec![Platform::parse("linux/arm64").unwrap()], ..Default::default() };
    let report = convert_image(&src2, &dst2, &opts2, progress.clone()).await.unwrap();
    // Its layers are already eStargz: kept as they are (copied by cross-repository mount).
    assert_eq!((report.manifests, report.layers_converted, report.layers_kept), (1, 0, 2));
    let ManifestKind::Index(index) = client.get_manifest(&one_ref).await.unwrap().manifest else { panic!() };
    assert_eq!(index.manifests.len(), 1);
    check_image(&client, &one_ref, &index.manifests[0].digest, &expected["linux/arm64"], oracle.as_deref()).await;

    // Registry -> OCI layout round trip, single image.
    let out = tempfile::tempdir().unwrap();
    let dst3 = Store::Layout { dir: out.path().join("img"), tag: "lazy".into() };
    let report = convert_image(&src2, &dst3, &ConvertOptions { platforms: vec![Platform::parse("linux/amd64").unwrap()], ..Default::default() }, progress.clone()).await.unwrap();
    assert_eq!(report.manifests, 1);
    let (_, kind, _) = dst3.root().await.unwrap();
    assert!(matches!(kind, ManifestKind::Index(_)));

    // A platform the image lacks is a clear error.
    let err = convert_image(&src2, &dst2, &ConvertOptions { platforms: vec![Platform::parse("linux/s390x").unwrap()], ..Default::default() }, progress)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("linux/s390x") && err.contains("linux/amd64"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_source_layer_is_refused() {
    let layout = tempfile::tempdir().unwrap();
    write_layout(layout.path(), &["linux/amd64"]);
    // Flip a byte in the biggest blob (a layer): its digest no longer matches.
    let blobs = layout.path().join("blobs/sha256");
    let biggest = std::fs::read_dir(&blobs).unwrap().map(|e| e.unwrap().path()).max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
    let mut b = std::fs::read(&biggest).unwrap();
    b[100] ^= 1;
    std::fs::write(&biggest, b).unwrap();
    let out = tempfile::tempdir().unwrap();
    let src = Store::Layout { dir: layout.path().to_path_buf(), tag: "v1".into() };
    let dst = Store::Layout { dir: out.path().to_path_buf(), tag: "x".into() };
    let err = convert_image(&src, &dst, &ConvertOptions::default(), Arc::new(|_| {})).await.unwrap_err().to_string();
    assert!(err.contains("digest") && err.contains(biggest.file_name().unwrap().to_str().unwrap()), "{err}");
    assert!(!out.path().join("index.json").exists(), "nothing tagged after a failed conversion");
}
