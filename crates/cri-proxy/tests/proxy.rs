//! The proxy between a client (playing kubelet) and an in-process fake containerd
//! ImageService, both on unix sockets in a temporary directory.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cri_proxy::cri::{AuthConfig, ImageSpec, PullImageRequest};
use cri_proxy::{Credential, CredentialStore, ImageServiceProxy, ProxyConfig, RawCodec};
use prost::Message;
use tonic::body::Body;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Response, Status};

/// What the fake backend received.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    message: Bytes,
    metadata: MetadataMap,
}

type Answer = Result<(Bytes, MetadataMap), Status>;
type Answers = Arc<dyn Fn(&str, &Bytes) -> Answer + Send + Sync>;

/// A containerd stand-in: records each call, answers from `answers` (after `delay`).
#[derive(Clone)]
struct Fake {
    received: Arc<Mutex<Vec<Received>>>,
    answers: Answers,
    delay: Duration,
}

impl tonic::server::NamedService for Fake {
    const NAME: &'static str = "runtime.v1.ImageService";
}

impl tower::Service<http::Request<Body>> for Fake {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let fake = self.clone();
        let path = req.uri().path().to_string();
        Box::pin(async move {
            let unary = tower::service_fn(move |r: Request<Bytes>| {
                let fake = fake.clone();
                let path = path.clone();
                async move {
                    let (metadata, _, message) = r.into_parts();
                    fake.received.lock().unwrap().push(Received {
                        path: path.clone(),
                        message: message.clone(),
                        metadata,
                    });
                    tokio::time::sleep(fake.delay).await;
                    let (bytes, metadata) = (fake.answers)(&path, &message)?;
                    Ok::<_, Status>(Response::from_parts(metadata, bytes, Default::default()))
                }
            });
            Ok(tonic::server::Grpc::new(RawCodec).unary(unary, req).await)
        })
    }
}

fn unix_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::from_static("http://[::1]:1").connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
    }))
}

fn start_fake(sock: &Path, answers: Answers, delay: Duration) -> Arc<Mutex<Vec<Received>>> {
    let received = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake {
        received: received.clone(),
        answers,
        delay,
    };
    let listener = tokio::net::UnixListener::bind(sock).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(fake)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    received
}

struct Setup {
    _dir: tempfile::TempDir,
    backend: PathBuf,
    proxy: Channel,
    store: CredentialStore,
    proxy_debug: String,
}

fn start_proxy(dir: tempfile::TempDir, backend: PathBuf) -> Setup {
    let store = CredentialStore::default();
    let proxy = ImageServiceProxy::new(ProxyConfig::new(&backend), store.clone());
    let proxy_debug = format!("{proxy:?}");
    let sock = dir.path().join("proxy.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(cri_proxy::serve(proxy, listener, std::future::pending()));
    Setup {
        proxy: unix_channel(&sock),
        _dir: dir,
        backend,
        store,
        proxy_debug,
    }
}

fn setup(answers: Answers, delay: Duration) -> (Setup, Arc<Mutex<Vec<Received>>>) {
    let dir = tempfile::tempdir().unwrap();
    let backend = dir.path().join("containerd.sock");
    let received = start_fake(&backend, answers, delay);
    (start_proxy(dir, backend), received)
}

async fn call(channel: &Channel, method: &str, message: Bytes, metadata: MetadataMap) -> Result<Response<Bytes>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = format!("/runtime.v1.ImageService/{method}");
    let request = Request::from_parts(metadata, Default::default(), message);
    grpc.unary(request, path.parse().unwrap(), RawCodec).await
}

/// Bytes no protobuf encoder would produce: fields out of order, an unknown field, a field
/// given twice. Re-encoding would change them.
fn odd_bytes(tag: &str) -> Bytes {
    let mut b = vec![0xc2, 0x3e, tag.len() as u8];
    b.extend(tag.as_bytes());
    b.extend([0x08, 0x01, 0x08, 0x02, 0x00]);
    b.extend([0x0a, 0x00]);
    b.into()
}

fn metadata(pairs: &[(&'static str, &str)]) -> MetadataMap {
    let mut m = MetadataMap::new();
    for (k, v) in pairs {
        m.insert(*k, v.parse().unwrap());
    }
    m
}

const METHODS: [&str; 6] = ["ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo", "SomeFutureMethod"];

#[tokio::test]
async fn every_method_is_forwarded_byte_for_byte() {
    let answers: Answers = Arc::new(|path, _| {
        let mut md = metadata(&[("x-answer", path)]);
        md.insert_bin("x-answer-bin", MetadataValue::from_bytes(b"\x00\xffbin"));
        Ok((odd_bytes(&format!("answer {path}")), md))
    });
    let (s, received) = setup(answers, Duration::ZERO);
    for method in METHODS {
        let sent = odd_bytes(&format!("request {method}"));
        let mut md = metadata(&[("x-trace", &format!("id-{method}")), ("containerd-namespace", "k8s.io")]);
        md.insert_bin("x-blob-bin", MetadataValue::from_bytes(b"\x01\x02\xfe"));
        let mut req_md = md.clone();
        req_md.insert("grpc-timeout", "30S".parse().unwrap());
        let resp = call(&s.proxy, method, sent.clone(), req_md).await.unwrap_or_else(|e| panic!("{method}: {e:?}"));

        let path = format!("/runtime.v1.ImageService/{method}");
        let got = received.lock().unwrap().pop().expect("backend was called");
        assert_eq!(got.path, path);
        assert_eq!(got.message, sent, "{method}: request bytes changed");
        for key in ["x-trace", "containerd-namespace"] {
            assert_eq!(got.metadata.get(key), md.get(key), "{method}: {key}");
        }
        assert_eq!(got.metadata.get_bin("x-blob-bin"), md.get_bin("x-blob-bin"), "{method}");
        assert_eq!(got.metadata.get("grpc-timeout").map(|v| v.to_str().unwrap()), Some("30S"), "{method}: deadline not passed on");

        assert_eq!(resp.get_ref(), &odd_bytes(&format!("answer {path}")), "{method}: response bytes changed");
        assert_eq!(resp.metadata().get("x-answer").unwrap(), path.as_str());
        assert_eq!(resp.metadata().get_bin("x-answer-bin").unwrap().to_bytes().unwrap().as_ref(), b"\x00\xffbin");
    }
    assert!(received.lock().unwrap().is_empty());
    // Not this service's path: not forwarded (tonic's router answers).
    let mut grpc = tonic::client::Grpc::new(s.proxy.clone());
    grpc.ready().await.unwrap();
    let r = grpc.unary(Request::new(Bytes::new()), "/runtime.v1.RuntimeService/Version".parse().unwrap(), RawCodec).await;
    assert_eq!(r.unwrap_err().code(), Code::Unimplemented);
    assert!(received.lock().unwrap().is_empty());
}

#[tokio::test]
async fn error_statuses_pass_through() {
    let details = Bytes::from_static(b"\x08\x05\x12\x07details\xff");
    let d = details.clone();
    let answers: Answers = Arc::new(move |_, _| {
        Err(Status::with_details_and_metadata(
            Code::NotFound,
            "image \"ghcr.io/x\" not found: ünïcode, 100%",
            d.clone(),
            metadata(&[("x-err", "e1")]),
        ))
    });
    let (s, _) = setup(answers, Duration::ZERO);
    for method in METHODS {
        let st = call(&s.proxy, method, Bytes::from_static(b"\x0a\x00"), MetadataMap::new()).await.unwrap_err();
        assert_eq!(st.code(), Code::NotFound, "{method}: {st:?}");
        assert_eq!(st.message(), "image \"ghcr.io/x\" not found: ünïcode, 100%");
        assert_eq!(st.details(), &details[..]);
        assert_eq!(st.metadata().get("x-err").unwrap(), "e1");
    }
}

#[tokio::test]
async fn a_down_backend_is_unavailable_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let backend = dir.path().join("containerd.sock");
    let s = start_proxy(dir, backend.clone());
    let started = Instant::now();
    let st = call(&s.proxy, "ListImages", Bytes::new(), MetadataMap::new()).await.unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains(&*backend.to_string_lossy()), "message does not name the backend: {st:?}");
    // A socket file nobody listens on (containerd crashed): refused.
    drop(std::os::unix::net::UnixListener::bind(&backend).unwrap());
    let st = call(&s.proxy, "ImageStatus", Bytes::new(), MetadataMap::new()).await.unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains(&*backend.to_string_lossy()), "{st:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());

    // The backend comes (back) up: calls go through again.
    std::fs::remove_file(&backend).unwrap();
    let received = start_fake(&backend, Arc::new(|_, _| Ok((Bytes::from_static(b"ok"), MetadataMap::new()))), Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match call(&s.proxy, "ListImages", Bytes::from_static(b"x"), MetadataMap::new()).await {
            Ok(r) => break assert_eq!(r.get_ref(), &Bytes::from_static(b"ok")),
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("backend never reached again: {e:?}"),
        }
    }
    assert_eq!(received.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn the_deadline_ends_a_hanging_backend_call() {
    let (s, received) = setup(Arc::new(|_, _| Ok((Bytes::new(), MetadataMap::new()))), Duration::from_secs(60));
    let started = Instant::now();
    let mut req = Request::new(Bytes::from_static(b"q"));
    req.set_timeout(Duration::from_millis(500));
    let (md, _, msg) = req.into_parts();
    let st = call(&s.proxy, "PullImage", msg, md).await.unwrap_err();
    assert!(matches!(st.code(), Code::Cancelled | Code::DeadlineExceeded), "{st:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    let got = received.lock().unwrap();
    assert!(got[0].metadata.get("grpc-timeout").is_some(), "backend saw no deadline");
}

fn pull_request(image: &str, auth: Option<AuthConfig>) -> Bytes {
    let mut b = PullImageRequest {
        image: Some(ImageSpec { image: image.into() }),
        auth,
    }
    .encode_to_vec();
    // sandbox_config (field 3), which the proxy does not know: must reach the backend.
    b.extend([0x1a, 0x04, 0x0a, 0x02, b'p', b'1']);
    b.into()
}

fn basic(user: &str, password: &str) -> AuthConfig {
    AuthConfig {
        username: user.into(),
        password: password.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn credentials_are_kept_only_after_a_successful_pull() {
    // The backend denies every image whose name contains "denied", and every password ending
    // in "-bad"; while it pulls, it looks the credential up as the lazy mounts would.
    let seen_during_pull: Arc<Mutex<Vec<Option<Credential>>>> = Arc::default();
    let store_slot: Arc<Mutex<Option<cri_proxy::CredentialStore>>> = Arc::default();
    let (seen, slot) = (seen_during_pull.clone(), store_slot.clone());
    let answers: Answers = Arc::new(move |_, msg| {
        let image = PullImageRequest::decode(msg.clone()).unwrap().image.unwrap().image;
        if let Some(store) = slot.lock().unwrap().as_ref() {
            seen.lock().unwrap().push(store.get_for_image(&image));
        }
        if image.contains("denied") || msg.windows(4).any(|w| w == b"-bad") {
            Err(Status::permission_denied(format!("pull {image}: 401 Unauthorized")))
        } else {
            Ok((Bytes::from_static(b"\x0a\x07sha256:"), MetadataMap::new()))
        }
    });
    let (s, received) = setup(answers, Duration::ZERO);
    *store_slot.lock().unwrap() = Some(s.store.clone());
    let pull = |image: &str, auth| call(&s.proxy, "PullImage", pull_request(image, auth), MetadataMap::new());

    let sent = pull_request("registry.test:5000/team/app:1", Some(basic("kube", "hunter2-ok")));
    call(&s.proxy, "PullImage", sent.clone(), MetadataMap::new()).await.unwrap();
    assert_eq!(received.lock().unwrap().last().unwrap().message, sent, "the backend must get the credentials too");
    let want = Credential::Basic {
        username: "kube".into(),
        password: "hunter2-ok".into(),
    };
    assert_eq!(s.store.get("registry.test:5000", "team/app"), Some(want.clone()));
    assert_eq!(s.store.get("registry.test:5000", "team/other"), None);
    assert_eq!(seen_during_pull.lock().unwrap().last().cloned().flatten(), Some(want.clone()), "the credential must be visible while containerd pulls (lazy mounts happen then)");
    // A failed pull with other credentials for the same repository puts the good ones back.
    pull("registry.test:5000/team/app:1", Some(basic("kube", "hunter2-bad"))).await.unwrap_err();
    assert_eq!(s.store.get("registry.test:5000", "team/app"), Some(want.clone()), "a failed pull must not replace working credentials");

    let st = pull("registry.test:5000/team/denied:1", Some(basic("kube", "hunter2-bad"))).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    assert_eq!(s.store.get("registry.test:5000", "team/denied"), None, "a failed pull's credentials were kept");

    // Docker Hub, an identity token, a registry token.
    pull(
        "busybox",
        Some(AuthConfig {
            identity_token: "hunter2-refresh".into(),
            server_address: "https://index.docker.io/v1/".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    assert_eq!(s.store.get("docker.io", "library/busybox"), Some(Credential::IdentityToken("hunter2-refresh".into())));
    pull(
        "ghcr.io/o/r@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        Some(AuthConfig {
            registry_token: "hunter2-bearer".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    assert_eq!(s.store.get("ghcr.io", "o/r"), Some(Credential::RegistryToken("hunter2-bearer".into())));
    // Credentials for another registry than the image's, and anonymous pulls: nothing kept.
    pull(
        "quay.io/a/b",
        Some(AuthConfig {
            server_address: "ghcr.io".into(),
            ..basic("u", "hunter2-other")
        }),
    )
    .await
    .unwrap();
    pull("quay.io/c/d", None).await.unwrap();
    assert_eq!((s.store.get("quay.io", "a/b"), s.store.get("quay.io", "c/d")), (None, None));
    // A new pull replaces the credential.
    pull("registry.test:5000/team/app:2", Some(basic("kube", "hunter2-new"))).await.unwrap();
    assert_eq!(
        s.store.get("registry.test:5000", "team/app"),
        Some(Credential::Basic {
            username: "kube".into(),
            password: "hunter2-new".into()
        })
    );
    assert_eq!(s.store.len(), 3);
    // Other methods never store anything, even with a PullImageRequest body.
    call(&s.proxy, "ImageStatus", pull_request("x.io/y", Some(basic("u", "hunter2-status"))), MetadataMap::new())
        .await
        .unwrap();
    assert_eq!(s.store.get("x.io", "y"), None);
}

/// Captures what this crate logs, at every level.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_appear_in_no_log_and_no_debug_output() {
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("cri_proxy=trace")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let answers: Answers = Arc::new(|_, msg| {
        let image = PullImageRequest::decode(msg.clone()).unwrap().image.unwrap().image;
        if image.contains("denied") {
            Err(Status::unauthenticated("denied"))
        } else {
            Ok((Bytes::new(), MetadataMap::new()))
        }
    });
    let (s, _) = setup(answers, Duration::ZERO);
    let auths = [
        basic("kube", "hunter2"),
        AuthConfig {
            auth: "a3ViZTpodW50ZXIy".into(),
            ..Default::default()
        }, // kube:hunter2
        AuthConfig {
            identity_token: "hunter2".into(),
            ..Default::default()
        },
        AuthConfig {
            registry_token: "hunter2".into(),
            ..Default::default()
        },
        AuthConfig {
            server_address: "elsewhere.io".into(),
            ..basic("kube", "hunter2")
        },
        AuthConfig {
            auth: "!hunter2!".into(),
            ..Default::default()
        },
    ];
    let mut debug = vec![s.proxy_debug.clone()];
    for (i, auth) in auths.into_iter().enumerate() {
        debug.push(format!("{auth:?}"));
        for image in [format!("r{i}.io/app"), format!("r{i}.io/denied")] {
            let _ = call(&s.proxy, "PullImage", pull_request(&image, Some(auth.clone())), MetadataMap::new()).await;
            debug.push(format!("{:?} {:?}", s.store.get_for_image(&image), s.store.get_for_image(&image).and_then(|c| c.to_registry())));
        }
    }
    assert_eq!(s.store.len(), 4);
    debug.push(format!("{:?}", s.store));
    drop(_guard);
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("keeping the credentials"), "nothing was logged, the check is void: {log}");
    for text in debug.iter().chain([&log]) {
        assert!(!text.contains("hunter2") && !text.contains("a3ViZTpodW50ZXIy"), "secret in: {text}");
    }
    assert!(s.backend.exists());
}
