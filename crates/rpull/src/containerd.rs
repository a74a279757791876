//! A typed client for the containerd calls a pull makes (content, images, leases, diff,
//! snapshots), bound to one namespace and, once [`Containerd::with_lease`] is set, one lease.
//!
//! Every request carries the `containerd-namespace` header and the lease header, exactly as
//! containerd's Go client does; errors name the call and its subject.

use std::collections::HashMap;
use std::path::Path;

use containerd_api::content::content_client::ContentClient;
use containerd_api::content::{self as content, WriteAction, WriteContentRequest};
use containerd_api::diff::diff_client::DiffClient;
use containerd_api::images::images_client::ImagesClient;
use containerd_api::images::{self as images, Image};
use containerd_api::leases::leases_client::LeasesClient;
use containerd_api::snapshots::snapshots_client::SnapshotsClient;
use containerd_api::snapshots as snap;
use containerd_api::types::{Descriptor, Mount};
use containerd_api::{LEASE_HEADER, NAMESPACE_HEADER};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;
use tonic::Code;

use crate::error::{Error, Result};

/// Bytes per message of a content Write stream (containerd's client uses 1 MiB too).
const WRITE_CHUNK: usize = 1 << 20;

/// containerd's API on one channel, in one namespace, optionally under a lease.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

/// Result of writing content: newly stored, or already there (containerd keeps one copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    New,
    Existing,
}

impl Containerd {
    pub fn new(channel: Channel, namespace: &str) -> Containerd {
        Containerd { channel, namespace: namespace.to_string(), lease: None }
    }

    /// The same client with every later call attached to `lease`.
    pub fn with_lease(&self, lease: &str) -> Containerd {
        Containerd { lease: Some(lease.to_string()), ..self.clone() }
    }

    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        let md = r.metadata_mut();
        md.insert(NAMESPACE_HEADER, self.namespace.parse().expect("namespace is ascii"));
        if let Some(l) = &self.lease {
            md.insert(LEASE_HEADER, l.parse().expect("lease id is ascii"));
        }
        r
    }

    /// Creates a lease that expires by itself at `expire` (RFC 3339) if the pull never ends.
    pub async fn create_lease(&self, expire: &str) -> Result<String> {
        let labels = HashMap::from([(crate::labels::GC_EXPIRE_LABEL.to_string(), expire.to_string())]);
        let id = format!("lazypull-rpull-{:016x}", rand::random::<u64>());
        let resp = LeasesClient::new(self.channel.clone())
            .create(self.req(containerd_api::leases::CreateRequest { id: id.clone(), labels }))
            .await
            .map_err(|s| Error::containerd("Leases.Create", &id, s))?;
        Ok(resp.into_inner().lease.map(|l| l.id).unwrap_or(id))
    }

    pub async fn delete_lease(&self, id: &str) -> Result<()> {
        LeasesClient::new(self.channel.clone())
            .delete(self.req(containerd_api::leases::DeleteRequest { id: id.to_string(), sync: false }))
            .await
            .map_err(|s| Error::containerd("Leases.Delete", id, s))?;
        Ok(())
    }

    /// Stores `data` under `digest` with `labels`; existing content gets the labels added.
    pub async fn put_bytes(&self, digest: &str, data: &[u8], labels: HashMap<String, String>) -> Result<Stored> {
        let chunks: Vec<bytes::Bytes> = if data.is_empty() {
            vec![bytes::Bytes::new()]
        } else {
            data.chunks(WRITE_CHUNK).map(bytes::Bytes::copy_from_slice).collect()
        };
        self.write(digest, data.len() as u64, futures_util::stream::iter(chunks.into_iter().map(Ok)), labels).await
    }

    /// Stores the file at `path` (already verified to be `digest`) in the content store.
    pub async fn put_file(&self, digest: &str, path: &Path, labels: HashMap<String, String>) -> Result<Stored> {
        let file = tokio::fs::File::open(path).await.map_err(|e| Error::Io { context: format!("opening {}", path.display()), source: e })?;
        let size = file.metadata().await.map_err(|e| Error::Io { context: format!("stat {}", path.display()), source: e })?.len();
        let ctx = path.display().to_string();
        let stream = futures_util::stream::unfold(Some(file), move |state| {
            let ctx = ctx.clone();
            async move {
                let mut file = state?;
                let mut buf = vec![0u8; WRITE_CHUNK];
                match file.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(bytes::Bytes::from(buf)), Some(file)))
                    }
                    Err(e) => Some((Err(Error::Io { context: format!("reading {ctx}"), source: e }), None)),
                }
            }
        });
        self.write(digest, size, stream, labels).await
    }

    /// One Write stream: data messages at increasing offsets, then a COMMIT that checks size
    /// and digest and applies `labels`. Messages go one at a time, each answered by containerd
    /// before the next, so a failure is reported against the offset where it happened.
    async fn write<S>(&self, digest: &str, total: u64, data: S, labels: HashMap<String, String>) -> Result<Stored>
    where
        S: futures_util::Stream<Item = Result<bytes::Bytes>> + Send + 'static,
    {
        use futures_util::StreamExt;
        let ingest = format!("lazypull-rpull-{digest}-{:08x}", rand::random::<u32>());
        let base = WriteContentRequest { r#ref: ingest.clone(), total: total as i64, expected: digest.to_string(), ..Default::default() };
        let mut data = std::pin::pin!(data);
        let mut offset: u64 = 0;
        // The next message: data at `offset`, or the commit once the data is exhausted.
        let mut next = async |offset: u64| -> Result<(WriteAction, WriteContentRequest)> {
            let (action, bytes) = match data.next().await.transpose()? {
                Some(b) => (WriteAction::Write, b),
                None => (WriteAction::Commit, bytes::Bytes::new()),
            };
            let msg = WriteContentRequest {
                action: action as i32,
                offset: offset as i64,
                data: bytes.to_vec(),
                labels: if action == WriteAction::Commit { labels.clone() } else { HashMap::new() },
                ..base.clone()
            };
            Ok((action, msg))
        };
        // containerd answers (and sends response headers) only after the first message, so it
        // must be queued before the call is awaited.
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(1);
        let (mut action, first) = next(0).await?;
        let mut sent = first.data.len() as u64;
        tx.send(first).await.expect("the receiver is alive until the call starts");
        let mut responses = match ContentClient::new(self.channel.clone()).write(self.req(tokio_stream::wrappers::ReceiverStream::new(rx))).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => return self.add_labels(digest, labels.clone()).await.map(|_| Stored::Existing),
            Err(s) => return Err(Error::containerd("Content.Write", digest, s)),
        };
        loop {
            match responses.message().await {
                Ok(Some(r)) if r.offset as u64 == offset + sent => {}
                Ok(Some(r)) => {
                    return Err(Error::containerd(
                        "Content.Write",
                        digest,
                        tonic::Status::data_loss(format!("ingest {ingest}: containerd is at offset {} after writing up to {}", r.offset, offset + sent)),
                    ))
                }
                Ok(None) => return Err(Error::containerd("Content.Write", digest, tonic::Status::aborted("stream ended before the commit"))),
                // Someone stored it first: it is there, and it still gets our labels.
                Err(s) if s.code() == Code::AlreadyExists => return self.add_labels(digest, labels.clone()).await.map(|_| Stored::Existing),
                Err(s) => return Err(Error::containerd("Content.Write", format!("{digest} at offset {offset}"), s)),
            }
            offset += sent;
            if action == WriteAction::Commit {
                return Ok(Stored::New);
            }
            let (a, msg) = next(offset).await?;
            action = a;
            sent = msg.data.len() as u64;
            // A closed stream shows up as the error of the next response.
            let _ = tx.send(msg).await;
        }
    }

    /// Adds `labels` to existing content (the other labels stay).
    pub async fn add_labels(&self, digest: &str, labels: HashMap<String, String>) -> Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let info = content::Info { digest: digest.to_string(), labels, ..Default::default() };
        ContentClient::new(self.channel.clone())
            .update(self.req(content::UpdateRequest { info: Some(info), update_mask: Some(prost_types::FieldMask { paths }) }))
            .await
            .map_err(|s| Error::containerd("Content.Update", digest, s))?;
        Ok(())
    }

    /// `Snapshots.Stat`: whether the committed snapshot `key` exists.
    pub async fn snapshot_exists(&self, snapshotter: &str, key: &str) -> Result<bool> {
        let req = snap::StatSnapshotRequest { snapshotter: snapshotter.to_string(), key: key.to_string() };
        match SnapshotsClient::new(self.channel.clone()).stat(self.req(req)).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(Error::containerd("Snapshots.Stat", key, s)),
        }
    }

    /// `Snapshots.Stat`: the labels of snapshot `key`.
    pub async fn snapshot_labels(&self, snapshotter: &str, key: &str) -> Result<HashMap<String, String>> {
        let req = snap::StatSnapshotRequest { snapshotter: snapshotter.to_string(), key: key.to_string() };
        match SnapshotsClient::new(self.channel.clone()).stat(self.req(req)).await {
            Ok(r) => Ok(r.into_inner().info.map(|i| i.labels).unwrap_or_default()),
            Err(s) => Err(Error::containerd("Snapshots.Stat", key, s)),
        }
    }

    /// `Snapshots.Prepare`: `Ok(None)` when the snapshotter answered AlreadyExists (the target
    /// of `containerd.io/snapshot.ref` now exists: a remote snapshot), else the mounts to unpack onto.
    pub async fn prepare(&self, snapshotter: &str, key: &str, parent: &str, labels: HashMap<String, String>) -> Result<Option<Vec<Mount>>> {
        let req = snap::PrepareSnapshotRequest { snapshotter: snapshotter.into(), key: key.into(), parent: parent.into(), labels };
        match SnapshotsClient::new(self.channel.clone()).prepare(self.req(req)).await {
            Ok(r) => Ok(Some(r.into_inner().mounts)),
            Err(s) if s.code() == Code::AlreadyExists => Ok(None),
            Err(s) => Err(Error::containerd("Snapshots.Prepare", key, s)),
        }
    }

    /// `Snapshots.Commit`; `Ok(false)` if `name` was committed meanwhile by someone else.
    pub async fn commit(&self, snapshotter: &str, name: &str, key: &str, labels: HashMap<String, String>) -> Result<bool> {
        let req = snap::CommitSnapshotRequest { snapshotter: snapshotter.into(), name: name.into(), key: key.into(), labels };
        match SnapshotsClient::new(self.channel.clone()).commit(self.req(req)).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::AlreadyExists => Ok(false),
            Err(s) => Err(Error::containerd("Snapshots.Commit", format!("{key} → {name}"), s)),
        }
    }

    pub async fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<()> {
        let req = snap::RemoveSnapshotRequest { snapshotter: snapshotter.into(), key: key.into() };
        SnapshotsClient::new(self.channel.clone()).remove(self.req(req)).await.map_err(|s| Error::containerd("Snapshots.Remove", key, s))?;
        Ok(())
    }

    /// `Diff.Apply`: containerd unpacks the layer blob `layer` (in its content store) onto
    /// `mounts` and returns the DiffID it computed.
    pub async fn apply(&self, layer: Descriptor, mounts: Vec<Mount>) -> Result<String> {
        let what = layer.digest.clone();
        let req = containerd_api::diff::ApplyRequest { diff: Some(layer), mounts, payloads: HashMap::new() };
        let resp = DiffClient::new(self.channel.clone()).apply(self.req(req)).await.map_err(|s| Error::containerd("Diff.Apply", &what, s))?;
        Ok(resp.into_inner().applied.map(|d| d.digest).unwrap_or_default())
    }

    /// Creates the image record `name` → `target` with `labels`, or points an existing one at
    /// `target` and sets those labels on it (others it has are kept).
    pub async fn put_image(&self, name: &str, target: Descriptor, labels: &HashMap<String, String>) -> Result<()> {
        let image = Image { name: name.to_string(), target: Some(target), labels: labels.clone(), ..Default::default() };
        let mut client = ImagesClient::new(self.channel.clone());
        match client.create(self.req(images::CreateImageRequest { image: Some(image.clone()) })).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                let mut paths = vec!["target".to_string()];
                paths.extend(labels.keys().map(|k| format!("labels.{k}")));
                let mask = prost_types::FieldMask { paths };
                client
                    .update(self.req(images::UpdateImageRequest { image: Some(image), update_mask: Some(mask) }))
                    .await
                    .map_err(|s| Error::containerd("Images.Update", name, s))?;
                Ok(())
            }
            Err(s) => Err(Error::containerd("Images.Create", name, s)),
        }
    }
}
