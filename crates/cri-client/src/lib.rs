//! A small CRI v1 client: the calls kubelet makes to start a pod, over a unix socket.
//!
//! Debian 12 has no `crictl`, and kubelet is not something a test or a demo can run, yet pod
//! start time is the number our users care about ("2 s instead of 45 s"). This crate speaks
//! the same gRPC calls kubelet does — `ImageService.PullImage`/`ListImages` and
//! `RuntimeService.RunPodSandbox`/`CreateContainer`/`StartContainer`/`StopPodSandbox`/
//! `RemovePodSandbox` — so `lazypull cri time-pod`, `make demo` and the tests start pods the
//! way a node does. [`pod`] composes them into one timed, host-network pod start.
//!
//! The messages are a hand-declared subset of the CRI proto ([`messages`]); see there why.

pub mod messages;
pub mod pod;

use std::path::{Path, PathBuf};

use messages::*;

/// A failed CRI call, naming the call and the socket; the runtime's status is kept as source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CRI {method} on {socket}: cannot connect: {source}")]
    Connect {
        method: &'static str,
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CRI {method} on {socket}: {}", .status.message())]
    Call {
        method: &'static str,
        socket: PathBuf,
        #[source]
        status: tonic::Status,
    },
    #[error("pod {pod}: {what}: {source}")]
    Io {
        pod: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {pod}: the container did not report ready within {timeout_secs} s ({ready_file})")]
    NotReady { pod: String, timeout_secs: u64, ready_file: PathBuf },
}

impl Error {
    /// The runtime's gRPC status, when the call reached it.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Error::Call { status, .. } => Some(status),
            _ => None,
        }
    }
}

/// A CRI endpoint (containerd's socket, or a proxy in front of it such as `cri_listen`).
#[derive(Clone)]
pub struct Client {
    socket: PathBuf,
    channel: tonic::transport::Channel,
}

/// Registry credentials for a pull, as kubelet passes an image pull secret.
#[derive(Clone)]
pub struct PullAuth {
    pub username: String,
    pub password: String,
}

impl Client {
    /// Connects lazily: the socket is dialed at the first call, so a missing runtime shows
    /// up there (an `Unavailable` [`Error::Call`] naming the socket). Must be called inside a
    /// tokio runtime (the channel spawns its worker task).
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        let socket = socket.into();
        Client { channel: containerd_api::unix_channel(socket.clone()), socket }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn unary<Req, Resp>(&self, service: &str, method: &'static str, req: Req) -> Result<Resp, Error>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|source| Error::Connect { method, socket: self.socket.clone(), source })?;
        let path = http::uri::PathAndQuery::try_from(format!("/runtime.v1.{service}/{method}")).expect("a CRI method name is a valid path");
        let resp = grpc
            .unary(tonic::Request::new(req), path, tonic_prost::ProstCodec::default())
            .await
            .map_err(|status| Error::Call { method, socket: self.socket.clone(), status })?;
        Ok(resp.into_inner())
    }

    /// `ImageService.PullImage`; returns the image reference the runtime resolved (its id).
    pub async fn pull(&self, image: &str, auth: Option<&PullAuth>) -> Result<String, Error> {
        let auth = auth.map(|a| AuthConfig { username: a.username.clone(), password: a.password.clone() });
        let req = PullImageRequest { image: Some(ImageSpec { image: image.to_string() }), auth };
        let resp: PullImageResponse = self.unary("ImageService", "PullImage", req).await?;
        Ok(resp.image_ref)
    }

    /// `ImageService.ListImages`: the images kubelet would see as present.
    pub async fn list_images(&self) -> Result<Vec<Image>, Error> {
        let resp: ListImagesResponse = self.unary("ImageService", "ListImages", ListImagesRequest {}).await?;
        Ok(resp.images)
    }

    /// `RuntimeService.RunPodSandbox`; returns the sandbox id.
    pub async fn run_pod_sandbox(&self, config: &PodSandboxConfig) -> Result<String, Error> {
        let resp: RunPodSandboxResponse = self.unary("RuntimeService", "RunPodSandbox", RunPodSandboxRequest { config: Some(config.clone()) }).await?;
        Ok(resp.pod_sandbox_id)
    }

    /// `RuntimeService.CreateContainer` in a sandbox; returns the container id.
    pub async fn create_container(&self, pod_sandbox_id: &str, config: ContainerConfig, sandbox: &PodSandboxConfig) -> Result<String, Error> {
        let req = CreateContainerRequest { pod_sandbox_id: pod_sandbox_id.to_string(), config: Some(config), sandbox_config: Some(sandbox.clone()) };
        let resp: CreateContainerResponse = self.unary("RuntimeService", "CreateContainer", req).await?;
        Ok(resp.container_id)
    }

    /// `RuntimeService.StartContainer`.
    pub async fn start_container(&self, container_id: &str) -> Result<(), Error> {
        let _: Empty = self.unary("RuntimeService", "StartContainer", StartContainerRequest { container_id: container_id.to_string() }).await?;
        Ok(())
    }

    /// `RuntimeService.StopPodSandbox` (stops its containers too).
    pub async fn stop_pod_sandbox(&self, pod_sandbox_id: &str) -> Result<(), Error> {
        let _: Empty = self.unary("RuntimeService", "StopPodSandbox", PodSandboxId { pod_sandbox_id: pod_sandbox_id.to_string() }).await?;
        Ok(())
    }

    /// `RuntimeService.RemovePodSandbox` (removes its containers too).
    pub async fn remove_pod_sandbox(&self, pod_sandbox_id: &str) -> Result<(), Error> {
        let _: Empty = self.unary("RuntimeService", "RemovePodSandbox", PodSandboxId { pod_sandbox_id: pod_sandbox_id.to_string() }).await?;
        Ok(())
    }
}
