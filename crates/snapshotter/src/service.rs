//! containerd's snapshots gRPC service over [`Snapshotter`]: request/response conversion only.
//! Snapshot operations touch the disk (and may mount FUSE), so each runs on the blocking pool.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::api::snapshots::{self as pb, snapshots_server::Snapshots};
use crate::api::types::Mount as PbMount;
use crate::meta::Kind;
use crate::snapshots::{Info, Mount, Snapshotter};

pub use crate::api::snapshots::snapshots_server::SnapshotsServer;

/// The gRPC face of a snapshotter.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Snapshotter>,
}

impl Service {
    pub fn new(inner: Arc<Snapshotter>) -> Service {
        Service { inner }
    }
}

/// Runs snapshot operation `op` on the blocking pool; its duration is logged at debug level
/// (calls on a container's start path: Prepare, Mounts, Stat).
async fn blocking<T: Send + 'static>(op: &'static str, f: impl FnOnce() -> crate::error::Result<T> + Send + 'static) -> Result<T, Status> {
    let started = std::time::Instant::now();
    let out = match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("snapshot operation panicked: {e}"))),
    };
    tracing::debug!(op, ok = out.is_ok(), us = started.elapsed().as_micros() as u64, "snapshot call");
    out
}

fn mounts(v: Vec<Mount>) -> Vec<PbMount> {
    v.into_iter()
        .map(|m| PbMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn ts((secs, nanos): (i64, u32)) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: secs, nanos: nanos as i32 }
}

fn info(i: Info) -> pb::Info {
    pb::Info {
        name: i.name,
        parent: i.parent,
        kind: match i.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(ts(i.created)),
        updated_at: Some(ts(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(&self, r: Request<pb::PrepareSnapshotRequest>) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = r.into_inner();
        let s = self.inner.clone();
        let m = blocking("prepare", move || s.prepare(&r.key, &r.parent, labels(r.labels), Kind::Active)).await?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts: mounts(m) }))
    }

    async fn view(&self, r: Request<pb::ViewSnapshotRequest>) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        let s = self.inner.clone();
        let m = blocking("view", move || s.prepare(&r.key, &r.parent, labels(r.labels), Kind::View)).await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts: mounts(m) }))
    }

    async fn mounts(&self, r: Request<pb::MountsRequest>) -> Result<Response<pb::MountsResponse>, Status> {
        let r = r.into_inner();
        let s = self.inner.clone();
        let m = blocking("mounts", move || s.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(&self, r: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        let s = self.inner.clone();
        blocking("commit", move || s.commit(&r.name, &r.key, labels(r.labels))).await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, r: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        let s = self.inner.clone();
        blocking("remove", move || s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(&self, r: Request<pb::StatSnapshotRequest>) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = r.into_inner();
        let s = self.inner.clone();
        let i = blocking("stat", move || s.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse { info: Some(info(i)) }))
    }

    async fn update(&self, r: Request<pb::UpdateSnapshotRequest>) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let i = r.info.ok_or_else(|| Status::invalid_argument("update without info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let s = self.inner.clone();
        let out = blocking("update", move || s.update(&i.name, labels(i.labels), &paths)).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse { info: Some(info(out)) }))
    }

    type ListStream = ListStream;

    async fn list(&self, r: Request<pb::ListSnapshotsRequest>) -> Result<Response<Self::ListStream>, Status> {
        let r = r.into_inner();
        let s = self.inner.clone();
        let all = blocking("list", move || s.list(&r.filters)).await?;
        // Batches of 100, as containerd's own service sends them.
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = all
            .chunks(100)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.iter().cloned().map(info).collect() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(&self, r: Request<pb::UsageRequest>) -> Result<Response<pb::UsageResponse>, Status> {
        let r = r.into_inner();
        let s = self.inner.clone();
        let (size, inodes) = blocking("usage", move || s.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _r: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let s = self.inner.clone();
        blocking("cleanup", move || s.cleanup()).await?;
        Ok(Response::new(()))
    }
}

/// Serves the snapshots API on a listening unix socket (see [`crate::listener`]) until
/// `shutdown` resolves. Calls that arrived in the backlog before this point are served.
pub async fn serve(inner: Arc<Snapshotter>, listener: std::os::unix::net::UnixListener, shutdown: impl std::future::Future<Output = ()>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service::new(inner)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(std::io::Error::other)
}
