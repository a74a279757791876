//! Integration tests of the registry client against Debian's real `docker-registry`
//! (distribution 2.8, see tests/support/registry.rs), directly and through the fault-injecting
//! proxy (tests/support/fault_proxy.rs). Public API only.

mod support;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use registry::manifest::{OCI_CONFIG, OCI_INDEX, OCI_LAYER_TAR, OCI_MANIFEST};
use registry::push::Pushed;
use registry::{Client, Credential, Credentials, Error, ManifestKind, Reference, RegistryConfig, RetryPolicy};
use sha2::{Digest as _, Sha256};
use support::fault_proxy::{Fault, FaultProxy};
use support::registry::{Auth, TestRegistry};

// ---------------------------------------------------------------------------------------------
// Helpers

/// Deterministic pseudo-random bytes (xorshift64*), different per seed.
fn pseudo_random(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out
}

fn digest_of(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A blob on disk (for `push_blob_file`) plus its bytes and digest.
struct BlobFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
    data: Vec<u8>,
    digest: String,
}

impl BlobFile {
    fn new(data: Vec<u8>) -> BlobFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, &data).unwrap();
        let digest = digest_of(&data);
        BlobFile { _dir: dir, path, data, digest }
    }
    fn random(seed: u64, n: usize) -> BlobFile {
        BlobFile::new(pseudo_random(seed, n))
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn slice(&self, off: u64, len: u64) -> &[u8] {
        &self.data[off as usize..(off + len) as usize]
    }
    async fn push(&self, c: &Client, r: &Reference) -> Pushed {
        c.push_blob_file(r, &self.digest, self.size(), &self.path, None).await.unwrap_or_else(|e| panic!("pushing {} to {r}: {e}", self.digest))
    }
}

fn reference(host: &str, repo: &str, tag: &str) -> Reference {
    Reference::parse(&format!("{host}/{repo}:{tag}")).unwrap()
}

fn creds_for(reg: &TestRegistry, user: &str, pass: &str) -> Credentials {
    Credentials::anonymous().with(&reg.host, Credential::Basic { username: user.into(), password: pass.into() })
}

fn client(config: RegistryConfig, creds: Credentials) -> Client {
    Client::new(config, creds).unwrap()
}

/// Small, fast retries so failure paths finish quickly.
fn fast_retry(max_retries: u32) -> RegistryConfig {
    RegistryConfig {
        retry: RetryPolicy { max_retries, min_wait_ms: 5, max_wait_ms: 50 },
        ..Default::default()
    }
}

async fn get_blob(c: &Client, r: &Reference, digest: &str) -> registry::Result<Vec<u8>> {
    let mut out = Vec::new();
    let n = c.get_blob_to(r, digest, &mut out, None).await?;
    assert_eq!(n as usize, out.len(), "get_blob_to's byte count matches what it wrote");
    Ok(out)
}

/// Ranges exercising first byte, last byte, adjacent, overlapping and interior reads.
fn interesting_ranges(size: u64) -> Vec<(u64, u64)> {
    vec![
        (0, 1),
        (size - 1, 1),
        (100, 50),
        (150, 50), // adjacent to the previous one
        (120, 60), // overlaps both previous ones
        (size / 2, 4096),
        (size - 300, 300), // up to the last byte
        (7, 1),
    ]
}

async fn assert_ranges(c: &Client, r: &Reference, blob: &BlobFile, ranges: &[(u64, u64)]) {
    let got = c.read_ranges(r, &blob.digest, ranges).await.unwrap_or_else(|e| panic!("read_ranges {ranges:?}: {e}"));
    assert_eq!(got.len(), ranges.len());
    for (&(o, l), b) in ranges.iter().zip(&got) {
        assert_eq!(b.len() as u64, l, "range {o}+{l} length");
        assert!(b[..] == *blob.slice(o, l), "range {o}+{l} bytes differ");
    }
}

/// Pushes a config, an image manifest with `layer` and returns (manifest bytes, digest).
async fn push_image(c: &Client, r: &Reference, layer: &BlobFile, seed: u64) -> (Bytes, String) {
    let config = BlobFile::new(
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
            "config": {"Env": [format!("SEED={seed}")]},
        }))
        .unwrap(),
    );
    config.push(c, r).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size()},
        "layers": [{"mediaType": OCI_LAYER_TAR, "digest": layer.digest, "size": layer.size()}],
        "annotations": {"org.example.seed": seed.to_string()},
    }))
    .unwrap();
    let manifest = Bytes::from(manifest);
    let d = c.put_manifest(r, manifest.clone(), OCI_MANIFEST).await.unwrap_or_else(|e| panic!("put_manifest {r}: {e}"));
    assert_eq!(d, digest_of(&manifest), "put_manifest returns the manifest's digest");
    (manifest, d)
}

// ---------------------------------------------------------------------------------------------
// 1. Every operation under each authentication mode

async fn roundtrip(reg: &TestRegistry, c: &Client) {
    let r = reference(&reg.host, "lazypull/roundtrip", "v1");
    let blob = BlobFile::random(1, 300_000 + 17);
    let size = blob.size();

    assert!(!c.blob_exists(&r, &blob.digest).await.unwrap(), "fresh registry has no blob");
    assert!(matches!(c.blob_size(&r, &blob.digest).await, Err(Error::NotFound { .. })), "size of a missing blob is NotFound");
    assert_eq!(blob.push(c, &r).await, Pushed::Uploaded);
    assert!(c.blob_exists(&r, &blob.digest).await.unwrap());
    assert_eq!(c.blob_size(&r, &blob.digest).await.unwrap(), size);
    assert_eq!(blob.push(c, &r).await, Pushed::AlreadyThere);

    // Whole blob, verified.
    let got = get_blob(c, &r, &blob.digest).await.unwrap();
    assert!(got == blob.data, "get_blob_to returned different bytes");
    let small = c.get_blob_bytes(&r, &blob.digest, size).await.unwrap();
    assert!(small[..] == blob.data[..]);
    assert!(c.get_blob_bytes(&r, &blob.digest, size - 1).await.is_err(), "the size limit is enforced");

    // Single ranges.
    for (o, l) in [(0, 1), (size - 1, 1), (12_345, 54_321), (0, size)] {
        let b = c.read_range(&r, &blob.digest, o, l).await.unwrap_or_else(|e| panic!("read_range {o}+{l}: {e}"));
        assert!(b[..] == *blob.slice(o, l), "read_range {o}+{l}");
    }
    // A range past the end must fail rather than return short data.
    assert!(c.read_range(&r, &blob.digest, size - 10, 20).await.is_err(), "range past the end");
    // Multi-range.
    assert_ranges(c, &r, &blob, &interesting_ranges(size)).await;
    assert_ranges(c, &r, &blob, &[(size - 1, 1), (0, 1)]).await; // out of order

    // Image manifest by tag and by digest.
    let (manifest, mdigest) = push_image(c, &r, &blob, 1).await;
    let fetched = c.get_manifest(&r).await.unwrap();
    assert_eq!(fetched.bytes, manifest);
    assert_eq!(fetched.digest, mdigest);
    assert_eq!(fetched.media_type, OCI_MANIFEST);
    let ManifestKind::Image(m) = &fetched.manifest else { panic!("expected an image manifest, got {:?}", fetched.manifest) };
    assert_eq!(m.layers.len(), 1);
    assert_eq!(m.layers[0].digest, blob.digest);
    assert_eq!(m.annotations.get("org.example.seed").map(String::as_str), Some("1"));
    let by_digest = c.get_manifest(&Reference::parse(&format!("{}/lazypull/roundtrip@{mdigest}", reg.host)).unwrap()).await.unwrap();
    assert_eq!(by_digest.bytes, manifest);
    assert_eq!(by_digest.digest, mdigest);
    assert!(matches!(c.get_manifest(&r.with_tag("nope")).await, Err(Error::NotFound { .. })), "unknown tag is NotFound");

    // Index by tag and digest.
    let index = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": mdigest, "size": manifest.len(),
                           "platform": {"architecture": "amd64", "os": "linux"}}],
        }))
        .unwrap(),
    );
    let ir = r.with_tag("multi");
    let idigest = c.put_manifest(&ir, index.clone(), OCI_INDEX).await.unwrap();
    assert_eq!(idigest, digest_of(&index));
    for fetched in [c.get_manifest(&ir).await.unwrap(), c.get_manifest(&ir.with_digest(&idigest)).await.unwrap()] {
        assert_eq!(fetched.bytes, index);
        assert_eq!(fetched.digest, idigest);
        assert_eq!(fetched.media_type, OCI_INDEX);
        let ManifestKind::Index(i) = &fetched.manifest else { panic!("expected an index") };
        assert_eq!(i.manifests.len(), 1);
        assert_eq!(i.manifests[0].digest, mdigest);
        assert_eq!(i.manifests[0].platform.as_ref().unwrap().architecture, "amd64");
    }
}

#[tokio::test]
async fn roundtrip_without_auth() {
    let reg = TestRegistry::start(Auth::None);
    roundtrip(&reg, &client(RegistryConfig::default(), Credentials::anonymous())).await;
}

#[tokio::test]
async fn roundtrip_with_basic_auth() {
    let reg = TestRegistry::start(Auth::Basic { user: "alice".into(), pass: "s3cret".into() });
    roundtrip(&reg, &client(RegistryConfig::default(), creds_for(&reg, "alice", "s3cret"))).await;
}

#[tokio::test]
async fn roundtrip_with_token_auth() {
    let reg = TestRegistry::start(Auth::Token { user: "bob".into(), pass: "t0ken".into(), ttl_secs: 300 });
    roundtrip(&reg, &client(RegistryConfig::default(), creds_for(&reg, "bob", "t0ken"))).await;
    let issued = reg.token_requests.load(Ordering::SeqCst);
    assert!(issued >= 1, "token mode must have fetched tokens");
    // Tokens are cached per scope: a whole round trip needs only a handful, not one per request.
    assert!(issued <= 6, "{issued} tokens issued; tokens are not being cached");
}

async fn assert_unauthorized(c: &Client, reg: &TestRegistry, expect_in_message: &str) {
    let r = reference(&reg.host, "lazypull/denied", "v1");
    let start = Instant::now();
    let blob = BlobFile::random(2, 1000);
    for e in [
        c.get_manifest(&r).await.unwrap_err(),
        c.blob_exists(&r, &blob.digest).await.unwrap_err(),
        c.push_blob_file(&r, &blob.digest, blob.size(), &blob.path, None).await.unwrap_err(),
    ] {
        let msg = e.to_string();
        assert!(matches!(e, Error::Unauthorized { .. }), "expected Unauthorized, got {e:?}");
        assert!(msg.contains("authentication failed") && msg.contains(expect_in_message), "unclear message: {msg}");
        assert!(!msg.contains("wrong-pass"), "the password leaks into the message: {msg}");
    }
    assert!(start.elapsed() < Duration::from_secs(5), "auth failures must not be retried with backoff");
}

#[tokio::test]
async fn wrong_credentials_basic() {
    let reg = TestRegistry::start(Auth::Basic { user: "alice".into(), pass: "s3cret".into() });
    let c = client(RegistryConfig::default(), creds_for(&reg, "alice", "wrong-pass"));
    assert_unauthorized(&c, &reg, "rejected").await;
    // No credentials at all: also Unauthorized, naming the host.
    let anon = client(RegistryConfig::default(), Credentials::anonymous());
    let e = anon.get_manifest(&reference(&reg.host, "lazypull/denied", "v1")).await.unwrap_err();
    assert!(matches!(e, Error::Unauthorized { .. }) && e.to_string().contains(&reg.host), "{e}");
}

#[tokio::test]
async fn wrong_credentials_token() {
    let reg = TestRegistry::start(Auth::Token { user: "bob".into(), pass: "t0ken".into(), ttl_secs: 300 });
    let c = client(RegistryConfig::default(), creds_for(&reg, "bob", "wrong-pass"));
    assert_unauthorized(&c, &reg, "401").await;
    assert_eq!(reg.token_requests.load(Ordering::SeqCst), 0, "no token may be issued for wrong credentials");
}

// ---------------------------------------------------------------------------------------------
// 2. Mounts and chunked uploads

#[tokio::test]
async fn cross_repo_mount_then_already_there() {
    let reg = TestRegistry::start(Auth::Token { user: "bob".into(), pass: "t0ken".into(), ttl_secs: 300 });
    let c = client(RegistryConfig::default(), creds_for(&reg, "bob", "t0ken"));
    let src = reference(&reg.host, "lazypull/source", "v1");
    let dst = reference(&reg.host, "lazypull/dest", "v1");
    let blob = BlobFile::random(3, 50_000);
    assert_eq!(blob.push(&c, &src).await, Pushed::Uploaded);
    assert!(!c.blob_exists(&dst, &blob.digest).await.unwrap());
    let p = c.push_blob_file(&dst, &blob.digest, blob.size(), &blob.path, Some("lazypull/source")).await.unwrap();
    assert_eq!(p, Pushed::Mounted);
    assert!(c.blob_exists(&dst, &blob.digest).await.unwrap());
    let p = c.push_blob_file(&dst, &blob.digest, blob.size(), &blob.path, Some("lazypull/source")).await.unwrap();
    assert_eq!(p, Pushed::AlreadyThere);
    assert!(get_blob(&c, &dst, &blob.digest).await.unwrap() == blob.data);

    // Mounting from a repository that lacks the blob falls back to an upload.
    let other = BlobFile::random(4, 10_000);
    let p = c.push_blob_file(&dst, &other.digest, other.size(), &other.path, Some("lazypull/source")).await.unwrap();
    assert_eq!(p, Pushed::Uploaded);
    assert!(get_blob(&c, &dst, &other.digest).await.unwrap() == other.data);
}

#[tokio::test]
async fn chunked_upload_of_a_large_blob() {
    let reg = TestRegistry::start(Auth::Token { user: "bob".into(), pass: "t0ken".into(), ttl_secs: 300 });
    // Push through a fault-free proxy to see the requests the upload makes.
    let proxy = FaultProxy::start(&reg.host);
    let host = proxy.addr.to_string();
    let creds = Credentials::anonymous().with(&host, Credential::Basic { username: "bob".into(), password: "t0ken".into() });
    let c = client(RegistryConfig::default(), creds);
    let r = reference(&host, "lazypull/big", "v1");
    let blob = BlobFile::random(5, (17 << 20) + 321);
    assert_eq!(blob.push(&c, &r).await, Pushed::Uploaded);
    assert_eq!(proxy.count("PATCH", "/blobs/uploads/"), 2, "a 17 MiB blob goes up in two PATCH pieces");
    assert_eq!(proxy.count("PUT", "/blobs/uploads/"), 1);
    assert!(proxy.requests().iter().all(|q| q.status != 401 || q.method == "HEAD"), "only the first request is challenged");
    // Read back from the registry directly.
    let c = client(RegistryConfig::default(), creds_for(&reg, "bob", "t0ken"));
    let direct = reference(&reg.host, "lazypull/big", "v1");
    assert_eq!(c.blob_size(&direct, &blob.digest).await.unwrap(), blob.size());
    assert!(get_blob(&c, &direct, &blob.digest).await.unwrap() == blob.data, "large blob differs");
    let boundary = 16u64 << 20;
    assert_ranges(&c, &direct, &blob, &[(boundary - 10, 20), (blob.size() - 1, 1), (0, 1), (boundary, 1)]).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Token refresh

#[tokio::test]
async fn token_refresh_after_expiry() {
    let reg = TestRegistry::start(Auth::Token { user: "bob".into(), pass: "t0ken".into(), ttl_secs: 2 });
    let c = client(RegistryConfig::default(), creds_for(&reg, "bob", "t0ken"));
    let r = reference(&reg.host, "lazypull/refresh", "v1");
    let blob = BlobFile::random(6, 20_000);
    blob.push(&c, &r).await;
    assert!(c.read_range(&r, &blob.digest, 0, 100).await.unwrap()[..] == *blob.slice(0, 100));
    let before = reg.token_requests.load(Ordering::SeqCst);
    assert!(before >= 1);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // The registry now rejects every token issued before the sleep.
    assert!(c.read_range(&r, &blob.digest, 500, 100).await.unwrap()[..] == *blob.slice(500, 100));
    assert!(get_blob(&c, &r, &blob.digest).await.unwrap() == blob.data);
    let after = reg.token_requests.load(Ordering::SeqCst);
    assert!(after > before, "no new token after expiry ({before} -> {after})");
}

// ---------------------------------------------------------------------------------------------
// 4. Faults

/// A no-auth registry holding one blob, a proxy in front of it, and references naming each.
struct Faulty {
    reg: TestRegistry,
    proxy: FaultProxy,
    blob: BlobFile,
    /// Names the proxy (what the client under test uses).
    via_proxy: Reference,
    /// Names the registry itself.
    direct: Reference,
    /// `/blobs/<digest>`, to match the blob's requests.
    blob_path: String,
}

async fn faulty(seed: u64, size: usize) -> Faulty {
    let reg = TestRegistry::start(Auth::None);
    let proxy = FaultProxy::start(&reg.host);
    let blob = BlobFile::random(seed, size);
    let direct = reference(&reg.host, "lazypull/faults", "v1");
    blob.push(&client(RegistryConfig::default(), Credentials::anonymous()), &direct).await;
    let via_proxy = reference(&proxy.addr.to_string(), "lazypull/faults", "v1");
    let blob_path = format!("/blobs/{}", blob.digest);
    Faulty { reg, proxy, blob, via_proxy, direct, blob_path }
}

#[tokio::test]
async fn fault_drop_mid_body_resumes() {
    let f = faulty(10, 1 << 20).await;
    let c = client(fast_retry(3), Credentials::anonymous());
    f.proxy.inject(Some("GET"), &f.blob_path, Fault::DropMidBody { after: 300_000 }, 1);
    f.proxy.inject(Some("GET"), &f.blob_path, Fault::DropMidBody { after: 200_000 }, 1);
    let got = get_blob(&c, &f.via_proxy, &f.blob.digest).await.unwrap();
    assert!(got == f.blob.data, "resumed download differs");
    let gets: Vec<_> = f.proxy.requests().into_iter().filter(|q| q.method == "GET" && q.path.contains(&f.blob_path)).collect();
    assert_eq!(gets.len(), 3, "one GET and two resumes: {gets:?}");
    assert!(gets[0].header("range").is_none());
    let resume_from = |q: &support::fault_proxy::RecordedRequest| -> u64 {
        let r = q.header("range").expect("resume uses Range");
        r.strip_prefix("bytes=").and_then(|s| s.strip_suffix('-')).unwrap().parse().unwrap()
    };
    let (a, b) = (resume_from(&gets[1]), resume_from(&gets[2]));
    assert!(a > 0 && a <= 300_000, "first resume from {a}");
    assert!(b > a && b <= a + 200_000, "second resume from {b}");

    // A resume answered with the whole blob (200, Range ignored) skips what was already written.
    f.proxy.clear_requests();
    f.proxy.inject(Some("GET"), &f.blob_path, Fault::DropMidBody { after: 100_000 }, 1);
    f.proxy.inject(Some("GET"), &f.blob_path, Fault::IgnoreRange, 1);
    assert!(get_blob(&c, &f.via_proxy, &f.blob.digest).await.unwrap() == f.blob.data, "resume over a 200 differs");
    let statuses: Vec<_> = f.proxy.requests().iter().map(|q| q.status).collect();
    assert_eq!(statuses, vec![200, 200], "the resume really got a whole-blob 200");

    // Range reads retry a dropped body too, single and multi-range.
    f.proxy.inject(Some("GET"), &f.blob_path, Fault::DropMidBody { after: 10 }, 1);
    let b = c.read_range(&f.via_proxy, &f.blob.digest, 1000, 50_000).await.unwrap();
    assert!(b[..] == *f.blob.slice(1000, 50_000));
    f.proxy.clear_requests();
    f.proxy.inject(Some("GET"), &f.blob_path, Fault::DropMidBody { after: 100 }, 1);
    assert_ranges(&c, &f.via_proxy, &f.blob, &interesting_ranges(f.blob.size())).await;
    let statuses: Vec<_> = f.proxy.requests().iter().map(|q| (q.header("range").is_some_and(|r| r.contains(',')), q.status)).collect();
    assert_eq!(statuses, vec![(true, 206), (true, 206)], "a dropped multi-range body is retried once");
}

#[tokio::test]
async fn fault_500_twice_then_ok() {
    let f = faulty(11, 100_000).await;
    let c = client(fast_retry(3), Credentials::anonymous());
    f.proxy.inject(Some("GET"), &f.blob_path, Fault::Status(500), 2);
    assert!(get_blob(&c, &f.via_proxy, &f.blob.digest).await.unwrap() == f.blob.data);
    assert_eq!(f.proxy.count("GET", &f.blob_path), 3);
    f.proxy.inject(None, "/manifests/", Fault::Status(502), 2);
    f.proxy.inject(Some("GET"), &f.blob_path, Fault::Status(500), 2);
    // Push something to read a manifest back.
    let (manifest, _) = push_image(&client(RegistryConfig::default(), Credentials::anonymous()), &f.direct, &f.blob, 11).await;
    assert_eq!(c.get_manifest(&f.via_proxy).await.unwrap().bytes, manifest);
    assert!(c.read_range(&f.via_proxy, &f.blob.digest, 5, 10).await.unwrap()[..] == *f.blob.slice(5, 10));
}

#[tokio::test]
async fn fault_503_forever_is_a_clear_error() {
    let f = faulty(12, 10_000).await;
    let retries = 2;
    let c = client(fast_retry(retries), Credentials::anonymous());
    f.proxy.inject_always(None, &f.blob_path, Fault::Status(503));
    let start = Instant::now();
    let check = |what: &str, e: Error| {
        assert!(matches!(e, Error::Status { status: 503, .. }), "{what}: expected a 503 status error, got {e:?}");
        let msg = e.to_string();
        assert!(msg.contains("503") && msg.contains(&f.blob.digest), "{what}: unclear message {msg}");
    };
    check("get_blob_to", get_blob(&c, &f.via_proxy, &f.blob.digest).await.unwrap_err());
    assert_eq!(f.proxy.count("GET", &f.blob_path), retries as usize + 1, "get_blob_to: 1 try + {retries} retries");
    f.proxy.clear_requests();
    check("read_range", c.read_range(&f.via_proxy, &f.blob.digest, 0, 10).await.unwrap_err());
    assert_eq!(f.proxy.count("GET", &f.blob_path), retries as usize + 1, "read_range: 1 try + {retries} retries");
    f.proxy.clear_requests();
    check("blob_size", c.blob_size(&f.via_proxy, &f.blob.digest).await.unwrap_err());
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}

#[tokio::test]
async fn fault_429_honours_retry_after() {
    let f = faulty(13, 10_000).await;
    let c = client(fast_retry(3), Credentials::anonymous());
    f.proxy.inject(Some("GET"), &f.blob_path, Fault::TooManyRequests { retry_after_secs: 1 }, 1);
    let start = Instant::now();
    assert!(get_blob(&c, &f.via_proxy, &f.blob.digest).await.unwrap() == f.blob.data);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(950), "Retry-After: 1 not honoured (took {took:?})");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(f.proxy.count("GET", &f.blob_path), 2);
}

#[tokio::test]
async fn fault_ignore_range_is_sliced() {
    let f = faulty(14, 200_000).await;
    let c = client(fast_retry(3), Credentials::anonymous());
    f.proxy.inject(Some("GET"), &f.blob_path, Fault::IgnoreRange, 1);
    let b = c.read_range(&f.via_proxy, &f.blob.digest, 12_345, 777).await.unwrap();
    assert!(b[..] == *f.blob.slice(12_345, 777), "single range over a 200 response");
    assert_eq!(f.proxy.requests().last().unwrap().status, 200, "the fault really produced a 200");
    f.proxy.inject(Some("GET"), &f.blob_path, Fault::IgnoreRange, 1);
    assert_ranges(&c, &f.via_proxy, &f.blob, &interesting_ranges(f.blob.size())).await;
    assert_eq!(f.proxy.requests().last().unwrap().status, 200);
}

#[tokio::test]
async fn fault_reject_multi_range_falls_back_for_good() {
    let f = faulty(15, 200_000).await;
    let c = client(fast_retry(3), Credentials::anonymous());
    let ranges = interesting_ranges(f.blob.size());
    // Without the fault, several ranges go in one multi-range request answered with 206.
    assert_ranges(&c, &f.via_proxy, &f.blob, &ranges).await;
    let reqs = f.proxy.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert!(reqs[0].header("range").unwrap().contains(',') && reqs[0].status == 206);

    f.proxy.clear_requests();
    f.proxy.inject_always(Some("GET"), &f.blob_path, Fault::RejectMultiRange);
    assert_ranges(&c, &f.via_proxy, &f.blob, &ranges).await;
    assert_ranges(&c, &f.via_proxy, &f.blob, &[(0, 10), (1000, 10), (f.blob.size() - 5, 5)]).await;
    let multi = f.proxy.requests().iter().filter(|q| q.header("range").is_some_and(|r| r.contains(','))).count();
    assert_eq!(multi, 1, "after a 400 the client must stop sending multi-range requests");
    assert_eq!(f.proxy.count("GET", &f.blob_path), 1 + ranges.len() + 3);
}

#[tokio::test]
async fn fault_refuse_head_falls_back_to_ranged_get() {
    let f = faulty(16, 123_457).await;
    let c = client(fast_retry(3), Credentials::anonymous());
    f.proxy.inject_always(None, &f.blob_path, Fault::RefuseHead);
    assert_eq!(c.blob_size(&f.via_proxy, &f.blob.digest).await.unwrap(), 123_457);
    let reqs = f.proxy.requests();
    assert_eq!(reqs.iter().map(|q| (q.method.as_str(), q.status)).collect::<Vec<_>>(), vec![("HEAD", 405), ("GET", 206)]);
}

#[tokio::test]
async fn fault_corrupt_body_is_a_digest_mismatch() {
    let f = faulty(17, 100_000).await;
    let c = client(fast_retry(3), Credentials::anonymous());
    f.proxy.inject(Some("GET"), &f.blob_path, Fault::CorruptBody { offset: 54_321 }, 1);
    let e = get_blob(&c, &f.via_proxy, &f.blob.digest).await.unwrap_err();
    match &e {
        Error::DigestMismatch { expected, actual, .. } => {
            assert_eq!(expected, &f.blob.digest);
            assert_ne!(actual, &f.blob.digest);
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    f.proxy.inject(Some("GET"), &f.blob_path, Fault::CorruptBody { offset: 3 }, 1);
    let e = c.get_blob_bytes(&f.via_proxy, &f.blob.digest, 1 << 20).await.unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "get_blob_bytes must not return corrupt bytes: {e:?}");
    // Clean afterwards.
    assert!(get_blob(&c, &f.via_proxy, &f.blob.digest).await.unwrap() == f.blob.data);
}

#[tokio::test]
async fn fault_slow_body_times_out() {
    let f = faulty(18, 256 << 10).await;
    let cfg = RegistryConfig { fetch_timeout_secs: 1, ..fast_retry(1) };
    let c = client(cfg, Credentials::anonymous());
    f.proxy.inject_always(Some("GET"), &f.blob_path, Fault::SlowBody { bytes_per_sec: 20_000 });
    let is_timeout = |e: &Error| matches!(e, Error::Http { source, .. } if source.is_timeout());
    let start = Instant::now();
    let e = get_blob(&c, &f.via_proxy, &f.blob.digest).await.unwrap_err();
    assert!(is_timeout(&e), "expected a timeout, got {e:?}");
    let e = c.read_range(&f.via_proxy, &f.blob.digest, 0, 200_000).await.unwrap_err();
    assert!(is_timeout(&e), "expected a timeout, got {e:?}");
    // The whole body would take ~13 s each; with 1 s timeouts and one retry each this is ~4 s.
    assert!(start.elapsed() < Duration::from_secs(8), "took {:?}", start.elapsed());
    // A small range still arrives well within the timeout.
    assert!(c.read_range(&f.via_proxy, &f.blob.digest, 10, 100).await.unwrap()[..] == *f.blob.slice(10, 100));
}

#[tokio::test]
async fn fault_redirect_is_followed_and_cached() {
    let f = faulty(19, 300_000).await;
    let c = client(fast_retry(3), Credentials::anonymous());
    let upstream = format!("{}/v2/{}/blobs/{}", f.reg.url, f.direct.repository, f.blob.digest);
    f.proxy.inject_always(Some("GET"), &f.blob_path, Fault::Redirect { location: upstream });

    assert!(get_blob(&c, &f.via_proxy, &f.blob.digest).await.unwrap() == f.blob.data, "whole blob through a redirect");
    assert_eq!(f.proxy.count("GET", &f.blob_path), 1);

    let b = c.read_range(&f.via_proxy, &f.blob.digest, 100, 1000).await.unwrap();
    assert!(b[..] == *f.blob.slice(100, 1000));
    assert_eq!(f.proxy.count("GET", &f.blob_path), 2, "the first range read asks the registry");
    for (o, l) in [(0, 1), (299_999, 1), (150_000, 20_000)] {
        let b = c.read_range(&f.via_proxy, &f.blob.digest, o, l).await.unwrap();
        assert!(b[..] == *f.blob.slice(o, l));
    }
    assert_ranges(&c, &f.via_proxy, &f.blob, &interesting_ranges(f.blob.size())).await;
    assert_eq!(f.proxy.count("GET", &f.blob_path), 2, "later range reads go straight to the cached URL");
}

#[tokio::test]
async fn fault_expired_redirect_url_is_refreshed() {
    let f = faulty(23, 100_000).await;
    let c = client(fast_retry(3), Credentials::anonymous());
    // Blob storage is a second proxy, so the cached URL can "expire" (answer 403).
    let storage = FaultProxy::start(&f.reg.host);
    let location = format!("{}/v2/{}/blobs/{}", storage.url, f.direct.repository, f.blob.digest);
    f.proxy.inject_always(Some("GET"), &f.blob_path, Fault::Redirect { location });
    for (o, l) in [(0, 10), (50_000, 10)] {
        assert!(c.read_range(&f.via_proxy, &f.blob.digest, o, l).await.unwrap()[..] == *f.blob.slice(o, l));
    }
    assert_eq!((f.proxy.count("GET", &f.blob_path), storage.count("GET", &f.blob_path)), (1, 2));
    storage.inject(Some("GET"), &f.blob_path, Fault::Status(403), 1);
    assert!(c.read_range(&f.via_proxy, &f.blob.digest, 99_990, 10).await.unwrap()[..] == *f.blob.slice(99_990, 10));
    assert_eq!(f.proxy.count("GET", &f.blob_path), 2, "a refused cached URL sends the client back to the registry");
    assert_eq!(storage.count("GET", &f.blob_path), 4);
    assert!(storage.requests().iter().all(|q| q.header("authorization").is_none()));
}

// ---------------------------------------------------------------------------------------------
// 5. Mirrors

fn mirror_config(registry_host: &str, mirror_host: &str) -> RegistryConfig {
    RegistryConfig::from_toml(&format!(
        "[retry]\nmax_retries = 1\nmin_wait_ms = 5\nmax_wait_ms = 20\n\
         [host.\"{registry_host}\"]\nmirrors = [{{ host = \"{mirror_host}\", plain_http = true }}]\n"
    ))
    .unwrap()
}

#[tokio::test]
async fn mirror_serves_pulls() {
    let f = faulty(20, 100_000).await;
    let plain = client(RegistryConfig::default(), Credentials::anonymous());
    let (manifest, mdigest) = push_image(&plain, &f.direct, &f.blob, 20).await;
    // The reference names the proxy; the mirror is the registry itself: the proxy must see nothing.
    let proxy_host = f.proxy.addr.to_string();
    let c = client(mirror_config(&proxy_host, &f.reg.host), Credentials::anonymous());
    assert_eq!(c.pull_endpoints(&f.via_proxy).len(), 2);
    let m = c.get_manifest(&f.via_proxy).await.unwrap();
    assert_eq!((m.bytes.clone(), m.digest.clone()), (manifest, mdigest));
    assert!(get_blob(&c, &f.via_proxy, &f.blob.digest).await.unwrap() == f.blob.data);
    assert_eq!(c.blob_size(&f.via_proxy, &f.blob.digest).await.unwrap(), f.blob.size());
    assert_ranges(&c, &f.via_proxy, &f.blob, &interesting_ranges(f.blob.size())).await;
    assert!(f.proxy.requests().is_empty(), "pulls went to the registry, not the mirror: {:?}", f.proxy.requests());

    // A registry name that does not answer at all: still served by the mirror.
    let refusing = support::registry::RefusingAddr::new();
    let dead = refusing.addr.to_string();
    let c = client(mirror_config(&dead, &f.reg.host), Credentials::anonymous());
    let r = reference(&dead, "lazypull/faults", "v1");
    assert_eq!(c.get_manifest(&r).await.unwrap().digest, m.digest);
    assert!(c.read_range(&r, &f.blob.digest, 99_999, 1).await.unwrap()[..] == *f.blob.slice(99_999, 1));
}

#[tokio::test]
async fn failing_mirror_falls_back_to_the_registry() {
    let f = faulty(21, 100_000).await;
    let plain = client(RegistryConfig::default(), Credentials::anonymous());
    let (manifest, _) = push_image(&plain, &f.direct, &f.blob, 21).await;
    // The reference names the registry; the mirror (the proxy) answers 500 to everything.
    f.proxy.inject_always(None, "/v2/", Fault::Status(500));
    let c = client(mirror_config(&f.reg.host, &f.proxy.addr.to_string()), Credentials::anonymous());
    assert_eq!(c.get_manifest(&f.direct).await.unwrap().bytes, manifest);
    assert!(get_blob(&c, &f.direct, &f.blob.digest).await.unwrap() == f.blob.data);
    assert_eq!(c.blob_size(&f.direct, &f.blob.digest).await.unwrap(), f.blob.size());
    assert_ranges(&c, &f.direct, &f.blob, &interesting_ranges(f.blob.size())).await;
    assert!(c.read_range(&f.direct, &f.blob.digest, 0, 10).await.unwrap()[..] == *f.blob.slice(0, 10));
    // The mirror was tried (with containerd's ?ns=) before each fallback.
    let reqs = f.proxy.requests();
    assert!(reqs.len() >= 5, "the mirror was not tried: {reqs:?}");
    let ns = format!("ns={}", f.reg.host);
    assert!(reqs.iter().all(|q| q.status == 500 && q.path.contains(&ns)), "{reqs:?}");
}

#[tokio::test]
async fn mirror_dropping_mid_body_hands_over_without_duplicating_bytes() {
    let f = faulty(22, 400_000).await;
    // The mirror (the proxy) cuts every blob body short; resumes there run out, then the
    // registry itself must continue where the mirror stopped.
    f.proxy.inject_always(Some("GET"), &f.blob_path, Fault::DropMidBody { after: 30_000 });
    let c = client(mirror_config(&f.reg.host, &f.proxy.addr.to_string()), Credentials::anonymous());
    let got = get_blob(&c, &f.direct, &f.blob.digest).await.unwrap();
    assert_eq!(got.len(), f.blob.data.len(), "bytes written twice or lost across endpoints");
    assert!(got == f.blob.data);
    assert_eq!(f.proxy.count("GET", &f.blob_path), 2, "one GET and one resume on the mirror (max_retries = 1)");
}

// ---------------------------------------------------------------------------------------------
// 6. Referrers (tag-schema fallback on distribution 2.8)

#[tokio::test]
async fn referrers_via_tag_schema() {
    let reg = TestRegistry::start(Auth::None);
    let c = client(RegistryConfig::default(), Credentials::anonymous());
    let r = reference(&reg.host, "lazypull/refs", "v1");
    let layer = BlobFile::random(30, 5000);
    layer.push(&c, &r).await;
    let (subject, subject_digest) = push_image(&c, &r, &layer, 30).await;
    assert!(c.referrers(&r, &subject_digest, None).await.unwrap().manifests.is_empty(), "no referrers yet");

    // An artifact (an SBOM) whose subject is the image.
    let empty = BlobFile::new(b"{}".to_vec());
    empty.push(&c, &r).await;
    let sbom = BlobFile::new(br#"{"sbom":"example"}"#.to_vec());
    sbom.push(&c, &r).await;
    let sbom_type = "application/vnd.example.sbom.v1+json";
    let artifact = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": sbom_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.digest, "size": 2},
            "layers": [{"mediaType": "application/json", "digest": sbom.digest, "size": sbom.size()}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": subject.len()},
        }))
        .unwrap(),
    );
    // Pushed by digest, untagged, as artifacts are.
    let untagged = Reference { tag: None, ..r.clone() };
    let adigest = c.put_manifest(&untagged, artifact.clone(), OCI_MANIFEST).await.unwrap();
    assert_eq!(adigest, digest_of(&artifact));
    let fetched = c.get_manifest(&r.with_digest(&adigest)).await.unwrap();
    let ManifestKind::Image(m) = fetched.manifest else { panic!() };
    assert_eq!(m.subject.as_ref().map(|s| s.digest.as_str()), Some(subject_digest.as_str()));

    // What a pushing client does where the referrers API is missing: the sha256-<hex> tag.
    let tag = subject_digest.replace(':', "-");
    let index = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": adigest, "size": artifact.len(), "artifactType": sbom_type}],
        }))
        .unwrap(),
    );
    c.put_manifest(&r.with_tag(&tag), index, OCI_INDEX).await.unwrap();

    let found = c.referrers(&r, &subject_digest, None).await.unwrap();
    assert_eq!(found.manifests.len(), 1, "{found:?}");
    assert_eq!(found.manifests[0].digest, adigest);
    assert_eq!(found.manifests[0].artifact_type.as_deref(), Some(sbom_type));
    assert_eq!(c.referrers(&r, &subject_digest, Some(sbom_type)).await.unwrap().manifests.len(), 1);
    assert!(c.referrers(&r, &subject_digest, Some("application/vnd.example.other")).await.unwrap().manifests.is_empty());
    // The artifact itself has no referrers.
    assert!(c.referrers(&r, &adigest, None).await.unwrap().manifests.is_empty());

    // Through a proxy: the referrers API is asked first, with the artifact type encoded (a raw
    // `+` would reach a server as a space).
    let proxy = FaultProxy::start(&reg.host);
    let via = reference(&proxy.addr.to_string(), "lazypull/refs", "v1");
    assert_eq!(c.referrers(&via, &subject_digest, Some(sbom_type)).await.unwrap().manifests.len(), 1);
    let reqs = proxy.requests();
    let api = reqs.iter().find(|q| q.path.contains("/referrers/")).expect("the referrers API was not tried");
    assert_eq!(api.status, 404);
    assert!(api.path.ends_with("?artifactType=application%2Fvnd.example.sbom.v1%2Bjson"), "{}", api.path);
    assert!(reqs.iter().any(|q| q.path.ends_with(&format!("/manifests/{tag}"))), "no tag-schema fallback: {reqs:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. Docker config.json

#[tokio::test]
async fn docker_config_json_credentials() {
    use base64::Engine as _;
    let reg = TestRegistry::start(Auth::Basic { user: "carol".into(), pass: "pa55".into() });
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("carol:pa55");
    std::fs::write(
        &cfg,
        serde_json::to_vec(&serde_json::json!({"auths": {
            reg.host.clone(): {"auth": auth},
            "other.example": {"auth": base64::engine::general_purpose::STANDARD.encode("x:y")},
        }}))
        .unwrap(),
    )
    .unwrap();
    let c = client(RegistryConfig::default(), Credentials::from_docker_config(&cfg));
    let r = reference(&reg.host, "lazypull/dockercfg", "v1");
    let blob = BlobFile::random(40, 30_000);
    assert_eq!(blob.push(&c, &r).await, Pushed::Uploaded);
    assert!(get_blob(&c, &r, &blob.digest).await.unwrap() == blob.data);
    let (manifest, _) = push_image(&c, &r, &blob, 40).await;
    assert_eq!(c.get_manifest(&r).await.unwrap().bytes, manifest);

    // The `http://host` key form works too; a wrong password in config.json is Unauthorized.
    let wrong = base64::engine::general_purpose::STANDARD.encode("carol:nope");
    std::fs::write(&cfg, serde_json::to_vec(&serde_json::json!({"auths": {format!("http://{}", reg.host): {"auth": wrong}}})).unwrap()).unwrap();
    let c = client(RegistryConfig::default(), Credentials::from_docker_config(&cfg));
    assert!(matches!(c.get_manifest(&r).await, Err(Error::Unauthorized { .. })));
    std::fs::write(&cfg, serde_json::to_vec(&serde_json::json!({"auths": {format!("http://{}", reg.host): {"username": "carol", "password": "pa55"}}})).unwrap()).unwrap();
    let c = client(RegistryConfig::default(), Credentials::from_docker_config(&cfg));
    assert_eq!(c.get_manifest(&r).await.unwrap().bytes, manifest);
}
