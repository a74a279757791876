//! `runtime.v1.ImageService`, forwarded to containerd's CRI socket.
//!
//! kubelet talks to the proxy (its `--image-service-endpoint`) exactly as it would to
//! containerd. Every unary call under `/runtime.v1.ImageService/` — the known ones and any a
//! newer kubelet may add — is sent on to the backend with its message bytes and metadata
//! unchanged (see [`crate::codec`] for why nothing is re-encoded), and the backend's answer,
//! message or status (code, message, details, metadata), comes back unchanged. Only
//! connection-level headers are dropped (`te`, `content-type`, compression negotiation,
//! hop-by-hop headers; HTTP/2 pseudo headers never reach the metadata): those describe one
//! hop and are set again by the next. `grpc-timeout` is passed on, so kubelet's deadline
//! applies to the backend call too. The user agent gets tonic's appended. Trailing response
//! metadata arrives at kubelet in the headers (CRI defines none).
//!
//! Why credentials are made visible *before* the pull is forwarded, and withdrawn if it fails:
//! containerd's CRI pull unpacks while it pulls, so the snapshotter mounts the image's lazy
//! layers (and needs the credentials) during the `PullImage` call, not after. A pull that
//! failed may have carried wrong credentials (a stale secret, a typo, another registry's), so
//! on any error the previous entry for that repository is put back: only credentials of a
//! successful pull stay.
//!
//! When the backend is down the call fails at once with `Unavailable` naming the backend
//! socket (kubelet retries with back-off, as with containerd down). Connecting is bounded by
//! [`ProxyConfig::connect_timeout`], and HTTP/2 keep-alive pings detect a backend that
//! accepted the connection but stopped answering.

use std::convert::Infallible;
use std::error::Error as _;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Response, Status};

use crate::codec::RawCodec;
use crate::cri::{self, Skip};
use crate::store::{Credential, CredentialStore};

/// The gRPC service name of CRI v1's image service.
pub const SERVICE_NAME: &str = "runtime.v1.ImageService";

/// Message size limit in both directions: kubelet's own (16 MiB) for CRI.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 << 20;

/// Headers that belong to one HTTP/2 hop or to gRPC framing, not to the call.
const HOP_HEADERS: &[&str] = &[
    "te",
    "content-type",
    "content-length",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "host",
    "grpc-encoding",
    "grpc-accept-encoding",
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
];

/// Where to forward and how.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// containerd's CRI socket, e.g. `/run/containerd/containerd.sock`.
    pub backend: PathBuf,
    /// Bound on connecting to the backend (a unix connect blocks while its backlog is full).
    pub connect_timeout: Duration,
    /// HTTP/2 keep-alive ping interval towards the backend; `None` disables pings.
    pub keep_alive_interval: Option<Duration>,
    /// How long a ping may go unanswered before the connection (and its calls) fail.
    pub keep_alive_timeout: Duration,
    /// Largest message accepted or sent, in either direction.
    pub max_message_size: usize,
}

impl ProxyConfig {
    pub fn new(backend: impl Into<PathBuf>) -> ProxyConfig {
        ProxyConfig {
            backend: backend.into(),
            connect_timeout: Duration::from_secs(5),
            keep_alive_interval: Some(Duration::from_secs(30)),
            keep_alive_timeout: Duration::from_secs(20),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

/// The image service proxy: a tonic service to add to a [`tonic::transport::Server`].
#[derive(Clone)]
pub struct ImageServiceProxy {
    inner: Arc<Inner>,
}

struct Inner {
    channel: Channel,
    config: ProxyConfig,
    store: CredentialStore,
}

impl std::fmt::Debug for ImageServiceProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageServiceProxy").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl ImageServiceProxy {
    /// A proxy to `config.backend`, keeping pull credentials in `store`. The backend is
    /// connected on first use (and again after failures). Must be called within a tokio
    /// runtime.
    pub fn new(config: ProxyConfig, store: CredentialStore) -> ImageServiceProxy {
        let channel = backend_channel(&config);
        ImageServiceProxy {
            inner: Arc::new(Inner { channel, config, store }),
        }
    }

    pub fn store(&self) -> &CredentialStore {
        &self.inner.store
    }
}

fn backend_channel(config: &ProxyConfig) -> Channel {
    let mut endpoint = Endpoint::from_static("http://[::1]:1").connect_timeout(config.connect_timeout);
    if let Some(interval) = config.keep_alive_interval {
        endpoint = endpoint.http2_keep_alive_interval(interval).keep_alive_timeout(config.keep_alive_timeout);
    }
    let path = config.backend.clone();
    // The URI is a placeholder; the connector dials the unix socket.
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(s) => Ok(hyper_util::rt::TokioIo::new(s)),
                Err(e) => Err(std::io::Error::new(e.kind(), format!("connecting to {}: {e}", path.display()))),
            }
        }
    }))
}

/// Serves the proxy on a listening unix socket until `shutdown` resolves.
pub async fn serve(proxy: ImageServiceProxy, listener: std::os::unix::net::UnixListener, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(proxy)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(std::io::Error::other)
}

impl NamedService for ImageServiceProxy {
    const NAME: &'static str = SERVICE_NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl tower::Service<http::Request<Body>> for ImageServiceProxy {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let path = req.uri().path();
            let method = path.strip_prefix('/').and_then(|p| p.strip_prefix(SERVICE_NAME)).and_then(|p| p.strip_prefix('/'));
            let Some(path) = method.filter(|m| !m.is_empty() && !m.contains('/')).and_then(|_| PathAndQuery::try_from(path).ok()) else {
                return Ok(Status::unimplemented(format!("{path} is not a method of {SERVICE_NAME}")).into_http());
            };
            let max = inner.config.max_message_size;
            let mut grpc = tonic::server::Grpc::new(RawCodec).apply_max_message_size_config(Some(max), Some(max));
            Ok(grpc.unary(Forward { inner, path }, req).await)
        })
    }
}

/// One call, forwarded.
struct Forward {
    inner: Arc<Inner>,
    path: PathAndQuery,
}

impl tonic::server::UnaryService<Bytes> for Forward {
    type Response = Bytes;
    type Future = BoxFuture<Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let inner = self.inner.clone();
        let path = self.path.clone();
        Box::pin(async move { inner.forward(path, request).await })
    }
}

impl Inner {
    async fn forward(&self, path: PathAndQuery, request: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let (metadata, _extensions, message) = request.into_parts();
        let pull = (path.path() == cri::PULL_IMAGE).then(|| cri::pull_credential(&message));
        // Visible to the lazy mounts of this very pull (see the module docs).
        let pending = pull.and_then(|p| self.offer(p));
        let max = self.config.max_message_size;
        let mut grpc = tonic::client::Grpc::new(self.channel.clone()).max_decoding_message_size(max).max_encoding_message_size(max);
        grpc.ready().await.map_err(|e| self.local_failure(Code::Unavailable, &e.to_string(), e.source()))?;
        let request = Request::from_parts(scrub(metadata), Default::default(), message);
        match grpc.unary(request, path.clone(), RawCodec).await {
            Ok(response) => {
                if let Some((image, _)) = &pending {
                    tracing::debug!(%image, "keeping the credentials of a successful pull");
                }
                let (metadata, message, _extensions) = response.into_parts();
                Ok(Response::from_parts(scrub(metadata), message, Default::default()))
            }
            Err(status) if status.source().is_none() => {
                self.withdraw(pending);
                // The backend's own answer: passed through.
                tracing::debug!(method = path.path(), code = ?status.code(), "CRI backend answered with an error");
                Err(Status::with_details_and_metadata(
                    status.code(),
                    status.message(),
                    Bytes::copy_from_slice(status.details()),
                    scrub(status.metadata().clone()),
                ))
            }
            Err(status) => {
                self.withdraw(pending);
                // Made here by the transport (connect failure, reset, timeout): say where.
                let code = if status.code() == Code::Unknown { Code::Unavailable } else { status.code() };
                Err(self.local_failure(code, status.message(), status.source()))
            }
        }
    }

    /// Stores a pull's credential at once; returns the image and the entry it replaced.
    fn offer(&self, pull: Result<cri::PullCredential, Skip>) -> Option<(String, Option<Credential>)> {
        match pull {
            Ok(p) => match self.store.swap_for_image(&p.image, Some(p.credential)) {
                Ok(previous) => Some((p.image, previous)),
                Err(e) => {
                    tracing::debug!(image = %p.image, "not keeping pull credentials: {e}");
                    None
                }
            },
            Err(Skip::Anonymous) => None,
            Err(why) => {
                tracing::debug!("not keeping pull credentials: {why}");
                None
            }
        }
    }

    /// After a failed pull: the repository's previous credential (or none) again.
    fn withdraw(&self, pending: Option<(String, Option<Credential>)>) {
        if let Some((image, previous)) = pending {
            let _ = self.store.swap_for_image(&image, previous);
        }
    }

    fn local_failure(&self, code: Code, what: &str, mut source: Option<&(dyn std::error::Error + 'static)>) -> Status {
        let mut msg = format!("CRI backend {}: {what}", self.config.backend.display());
        while let Some(e) = source {
            let s = e.to_string();
            if !msg.contains(&s) {
                msg.push_str(": ");
                msg.push_str(&s);
            }
            source = e.source();
        }
        tracing::warn!("{msg}");
        Status::new(code, msg)
    }
}

/// The call's metadata without the headers of one hop.
fn scrub(metadata: MetadataMap) -> MetadataMap {
    let mut headers = metadata.into_headers();
    for h in HOP_HEADERS {
        headers.remove(*h);
    }
    MetadataMap::from_headers(headers)
}
