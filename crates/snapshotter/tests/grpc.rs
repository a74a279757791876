//! The snapshots API over gRPC, as containerd's proxy client uses it: our service on a unix
//! socket, driven by the generated client. Covers the intent of containerd's snapshotter test
//! suite at the wire level: basic prepare/commit/stat, parent chains, commit/remove order,
//! views, walk (List) filters, label updates with field masks, usage, cleanup, and the gRPC
//! status codes containerd's errdefs maps (NotFound, AlreadyExists, FailedPrecondition).

use std::collections::HashMap;
use std::sync::Arc;

use snapshotter::api::snapshots::snapshots_client::SnapshotsClient;
use snapshotter::api::snapshots::{self as pb, Kind};
use snapshotter::Snapshotter;
use tonic::transport::Channel;
use tonic::Code;

/// A client on the socket; the server's listener is bound before this is called, so the first
/// call is queued in its backlog and nothing needs to be waited for.
async fn connect(path: std::path::PathBuf) -> SnapshotsClient<Channel> {
    let channel = containerd_api::unix_channel(path);
    SnapshotsClient::new(channel)
}

async fn list(c: &mut SnapshotsClient<Channel>, filters: &[&str]) -> Vec<String> {
    let req = pb::ListSnapshotsRequest { snapshotter: "lazypull".into(), filters: filters.iter().map(|f| f.to_string()).collect() };
    let mut s = c.list(req).await.unwrap().into_inner();
    let mut names = Vec::new();
    while let Some(batch) = s.message().await.unwrap() {
        names.extend(batch.info.into_iter().map(|i| i.name));
    }
    names.sort();
    names
}

fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_api_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let snap = Arc::new(Snapshotter::open(&dir.path().join("root"), None).unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (listener, _) = snapshotter::listener::listen(&sock).unwrap();
    let server = tokio::spawn(async move {
        snapshotter::service::serve(snap, listener, async move {
            let _ = stop_rx.await;
        })
        .await
    });
    let mut c = connect(sock.clone()).await;
    let sn = "lazypull".to_string();

    // Prepare → bind mount; again → AlreadyExists; missing parent → NotFound.
    let m = c
        .prepare(pb::PrepareSnapshotRequest { snapshotter: sn.clone(), key: "a".into(), parent: String::new(), labels: labels(&[("x", "1")]) })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!((m.len(), m[0].r#type.as_str()), (1, "bind"));
    let again = c.prepare(pb::PrepareSnapshotRequest { snapshotter: sn.clone(), key: "a".into(), ..Default::default() }).await;
    assert_eq!(again.unwrap_err().code(), Code::AlreadyExists);
    let orphan = c.prepare(pb::PrepareSnapshotRequest { snapshotter: sn.clone(), key: "b".into(), parent: "nope".into(), ..Default::default() }).await;
    assert_eq!(orphan.unwrap_err().code(), Code::NotFound);

    // Stat of an active snapshot; Mounts again; Usage; Commit.
    let info = c.stat(pb::StatSnapshotRequest { snapshotter: sn.clone(), key: "a".into() }).await.unwrap().into_inner().info.unwrap();
    assert_eq!((info.kind, info.labels.get("x").map(String::as_str)), (Kind::Active as i32, Some("1")));
    assert!(info.created_at.is_some() && info.updated_at.is_some());
    std::fs::write(std::path::Path::new(&m[0].source).join("f"), vec![1u8; 50_000]).unwrap();
    let u = c.usage(pb::UsageRequest { snapshotter: sn.clone(), key: "a".into() }).await.unwrap().into_inner();
    assert!(u.size >= 50_000 && u.inodes == 1, "{u:?}");
    c.commit(pb::CommitSnapshotRequest { snapshotter: sn.clone(), name: "l1".into(), key: "a".into(), labels: labels(&[("containerd.io/gc.root", "y")]) })
        .await
        .unwrap();
    assert_eq!(c.stat(pb::StatSnapshotRequest { snapshotter: sn.clone(), key: "a".into() }).await.unwrap_err().code(), Code::NotFound);
    let mounts_of_committed = c.mounts(pb::MountsRequest { snapshotter: sn.clone(), key: "l1".into() }).await;
    assert_eq!(mounts_of_committed.unwrap_err().code(), Code::FailedPrecondition);

    // A chain and a view.
    let m2 = c.prepare(pb::PrepareSnapshotRequest { snapshotter: sn.clone(), key: "b".into(), parent: "l1".into(), ..Default::default() }).await.unwrap().into_inner().mounts;
    assert_eq!(m2[0].r#type, "overlay");
    assert!(m2[0].options.iter().any(|o| o.starts_with("upperdir=")));
    c.commit(pb::CommitSnapshotRequest { snapshotter: sn.clone(), name: "l2".into(), key: "b".into(), ..Default::default() }).await.unwrap();
    let v = c.view(pb::ViewSnapshotRequest { snapshotter: sn.clone(), key: "v".into(), parent: "l2".into(), ..Default::default() }).await.unwrap().into_inner().mounts;
    assert!(v[0].options.iter().all(|o| !o.starts_with("upperdir=")), "{v:?}");
    let vinfo = c.stat(pb::StatSnapshotRequest { snapshotter: sn.clone(), key: "v".into() }).await.unwrap().into_inner().info.unwrap();
    assert_eq!((vinfo.kind, vinfo.parent.as_str()), (Kind::View as i32, "l2"));

    // List with filters (one stream, possibly several messages).
    assert_eq!(list(&mut c, &[]).await, ["l1", "l2", "v"]);
    assert_eq!(list(&mut c, &["kind==committed"]).await, ["l1", "l2"]);
    assert_eq!(list(&mut c, &[r#"labels."containerd.io/gc.root""#]).await, ["l1"]);
    assert_eq!(list(&mut c, &["parent==l2", "name==l1"]).await, ["l1", "v"]);

    // Update labels through a field mask.
    let upd = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: sn.clone(),
            info: Some(pb::Info { name: "l1".into(), labels: labels(&[("team", "ml")]), ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["labels.team".into(), "labels.containerd.io/gc.root".into()] }),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(upd.labels, labels(&[("team", "ml")]));

    // Remove order: a parent with children is refused; children first works.
    assert_eq!(c.remove(pb::RemoveSnapshotRequest { snapshotter: sn.clone(), key: "l1".into() }).await.unwrap_err().code(), Code::FailedPrecondition);
    for k in ["v", "l2", "l1"] {
        c.remove(pb::RemoveSnapshotRequest { snapshotter: sn.clone(), key: k.into() }).await.unwrap();
    }
    assert!(list(&mut c, &[]).await.is_empty());
    std::fs::create_dir_all(dir.path().join("root/snapshots/77/fs")).unwrap();
    c.cleanup(pb::CleanupRequest { snapshotter: sn.clone() }).await.unwrap();
    assert!(!dir.path().join("root/snapshots/77").exists());

    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
