//! The intent of containerd's snapshotter test suite, against our snapshotter directly (the
//! gRPC layer is a thin conversion, exercised by the containerd tests of the binary): basic
//! prepare/commit/mount (with real overlay mounts when root), parent chains, commit/remove
//! order, views, walk filters, label updates, usage, cleanup, and the remote-snapshot protocol
//! (AlreadyExists, fallback) with a fake remote.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use snapshotter::snapshots::NotLazy;
use snapshotter::meta::{Kind, RemoteLayer};
use snapshotter::snapshots::{Mount, Remote, Snapshotter, TARGET_REF_LABEL, UNPACKED_LABEL};
use snapshotter::Error;

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Mounts containerd's way, runs `f` on the mount point, unmounts.
fn with_mounted<T>(mounts: &[Mount], f: impl FnOnce(&Path) -> T) -> T {
    let dir = tempfile::tempdir().unwrap();
    let m = &mounts[0];
    let target = dir.path();
    if m.kind == "bind" {
        let ro = m.options.iter().any(|o| o == "ro");
        nix::mount::mount(Some(m.source.as_str()), target, None::<&str>, nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC, None::<&str>).unwrap();
        if ro {
            nix::mount::mount(None::<&str>, target, None::<&str>, nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY, None::<&str>).unwrap();
        }
    } else {
        let data = m.options.join(",");
        nix::mount::mount(Some("overlay"), target, Some("overlay"), nix::mount::MsFlags::empty(), Some(data.as_str())).unwrap_or_else(|e| panic!("overlay {data}: {e}"));
    }
    let out = f(target);
    nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH).unwrap();
    out
}

fn open() -> (tempfile::TempDir, Snapshotter) {
    let d = tempfile::tempdir().unwrap();
    let s = Snapshotter::open(d.path(), None).unwrap();
    (d, s)
}

#[test]
fn prepare_commit_and_parent_chains() {
    let (_d, s) = open();
    let m = s.prepare("ns/1/a", "", BTreeMap::new(), Kind::Active).unwrap();
    assert_eq!(m[0].kind, "bind");
    assert!(matches!(s.prepare("ns/1/a", "", BTreeMap::new(), Kind::Active), Err(Error::AlreadyExists(_))));
    assert!(matches!(s.prepare("x", "missing", BTreeMap::new(), Kind::Active), Err(Error::NotFound(_))));
    // The parent must be committed.
    assert!(matches!(s.prepare("x", "ns/1/a", BTreeMap::new(), Kind::Active), Err(Error::FailedPrecondition(_))));
    if is_root() {
        with_mounted(&m, |p| std::fs::write(p.join("base"), b"1").unwrap());
    } else {
        std::fs::write(Path::new(&m[0].source).join("base"), b"1").unwrap();
    }
    s.commit("layer1", "ns/1/a", labels(&[("l", "1")])).unwrap();
    assert!(matches!(s.stat("ns/1/a"), Err(Error::NotFound(_))));
    let i = s.stat("layer1").unwrap();
    assert_eq!((i.kind, i.labels.get("l").map(String::as_str)), (Kind::Committed, Some("1")));
    assert!(matches!(s.commit("layer1", "layer1", BTreeMap::new()), Err(Error::FailedPrecondition(_))));

    let m2 = s.prepare("ns/2/b", "layer1", BTreeMap::new(), Kind::Active).unwrap();
    assert_eq!(m2[0].kind, "overlay");
    if is_root() {
        with_mounted(&m2, |p| {
            assert_eq!(std::fs::read(p.join("base")).unwrap(), b"1");
            std::fs::write(p.join("second"), b"2").unwrap();
            std::fs::remove_file(p.join("base")).unwrap();
        });
    }
    s.commit("layer2", "ns/2/b", BTreeMap::new()).unwrap();
    let m3 = s.prepare("ns/3/c", "layer2", BTreeMap::new(), Kind::Active).unwrap();
    let lower = m3[0].options.iter().find(|o| o.starts_with("lowerdir=")).unwrap();
    assert_eq!(lower.matches(':').count(), 1, "two lowers, nearest first: {lower}");
    if is_root() {
        with_mounted(&m3, |p| {
            assert!(!p.join("base").exists(), "whiteout of layer 2 hides layer 1's file");
            assert_eq!(std::fs::read(p.join("second")).unwrap(), b"2");
        });
    }
    // Mounts of an active snapshot can be asked again; of a committed one not.
    assert_eq!(s.mounts("ns/3/c").unwrap(), m3);
    assert!(matches!(s.mounts("layer2"), Err(Error::FailedPrecondition(_))));
}

#[test]
fn views_are_read_only() {
    let (_d, s) = open();
    s.prepare("a", "", BTreeMap::new(), Kind::Active).unwrap();
    s.commit("l1", "a", BTreeMap::new()).unwrap();
    let v = s.prepare("v1", "l1", BTreeMap::new(), Kind::View).unwrap();
    assert_eq!(v[0].kind, "bind");
    assert!(v[0].options.contains(&"ro".to_string()));
    assert!(matches!(s.commit("x", "v1", BTreeMap::new()), Err(Error::FailedPrecondition(_))));
    s.prepare("b", "l1", BTreeMap::new(), Kind::Active).unwrap();
    s.commit("l2", "b", BTreeMap::new()).unwrap();
    let v2 = s.prepare("v2", "l2", BTreeMap::new(), Kind::View).unwrap();
    assert_eq!(v2[0].kind, "overlay");
    assert!(v2[0].options.iter().all(|o| !o.starts_with("upperdir")));
    if is_root() {
        with_mounted(&v2, |p| assert!(std::fs::write(p.join("x"), b"no").is_err()));
    }
    assert_eq!(s.stat("v2").unwrap().kind, Kind::View);
}

#[test]
fn remove_order_usage_and_cleanup() {
    let (d, s) = open();
    let m = s.prepare("a", "", BTreeMap::new(), Kind::Active).unwrap();
    std::fs::write(Path::new(&m[0].source).join("f"), vec![7u8; 100_000]).unwrap();
    let (size, inodes) = s.usage("a").unwrap();
    assert!(size >= 100_000 && inodes == 1, "{size} {inodes}");
    s.commit("l1", "a", BTreeMap::new()).unwrap();
    assert_eq!(s.usage("l1").unwrap(), (size, inodes));
    s.prepare("b", "l1", BTreeMap::new(), Kind::Active).unwrap();
    assert!(matches!(s.remove("l1"), Err(Error::FailedPrecondition(_))));
    s.remove("b").unwrap();
    s.remove("l1").unwrap();
    assert!(matches!(s.remove("l1"), Err(Error::NotFound(_))));
    assert!(s.list(&[]).unwrap().is_empty());
    // An orphaned directory (a crash between mkdir and commit) goes away on cleanup.
    std::fs::create_dir_all(d.path().join("snapshots/999/fs")).unwrap();
    s.cleanup().unwrap();
    assert!(!d.path().join("snapshots/999").exists());
}

#[test]
fn walk_filters_and_label_updates() {
    let (d, s) = open();
    s.prepare("a", "", labels(&[("containerd.io/gc.root", "x")]), Kind::Active).unwrap();
    s.commit("l1", "a", labels(&[("team", "ml")])).unwrap();
    s.prepare("b", "l1", BTreeMap::new(), Kind::Active).unwrap();
    let names = |f: &[&str]| {
        let mut v: Vec<String> = s.list(&f.iter().map(|x| x.to_string()).collect::<Vec<_>>()).unwrap().into_iter().map(|i| i.name).collect();
        v.sort();
        v
    };
    assert_eq!(names(&[]), ["b", "l1"]);
    assert_eq!(names(&["kind==committed"]), ["l1"]);
    assert_eq!(names(&["parent==l1"]), ["b"]);
    assert_eq!(names(&["labels.team==ml"]), ["l1"]);
    assert_eq!(names(&["labels.team==ml", "kind==active"]), ["b", "l1"]);
    let i = s.update("l1", labels(&[("new", "v")]), &["labels.new".to_string()]).unwrap();
    assert_eq!(i.labels, labels(&[("team", "ml"), ("new", "v")]));
    let i = s.update("l1", BTreeMap::new(), &["labels.team".to_string()]).unwrap();
    assert_eq!(i.labels, labels(&[("new", "v")]));
    let i = s.update("l1", labels(&[("only", "1")]), &[]).unwrap();
    assert_eq!(i.labels, labels(&[("only", "1")]));
    assert!(i.updated >= i.created);
    assert!(matches!(s.update("l1", BTreeMap::new(), &["parent".to_string()]), Err(Error::InvalidArgument(_))));
    // Metadata survives reopening.
    drop(s);
    let s = Snapshotter::open(d.path(), None).unwrap();
    assert_eq!(s.stat("l1").unwrap().labels, labels(&[("only", "1")]));
    assert_eq!(s.stat("b").unwrap().parent, "l1");
}

/// A remote that "mounts" by writing a marker file, and refuses layers named "plain".
struct FakeRemote {
    mounted: Mutex<Vec<String>>,
    unmounts: AtomicUsize,
}

impl Remote for FakeRemote {
    fn resolve(&self, l: &BTreeMap<String, String>) -> Result<Option<RemoteLayer>, NotLazy> {
        let Some(d) = l.get("containerd.io/snapshot/cri.layer-digest") else { return Ok(None) };
        if d == "plain" {
            return Err(NotLazy::NoIndex { media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into() });
        }
        if d.starts_with("small") {
            return Err(NotLazy::NoZtoc { index: "sha256:index".into() });
        }
        Ok(Some(RemoteLayer {
            image_ref: "reg/img:1".into(),
            digest: d.clone(),
            size: 1,
            index_check: "sha256:00".into(),
        }))
    }
    fn mount(&self, layer: &RemoteLayer, dir: &Path) -> Result<(), NotLazy> {
        std::fs::write(dir.join("marker"), &layer.digest).map_err(|e| NotLazy::MountFailed(e.to_string()))?;
        self.mounted.lock().unwrap().push(layer.digest.clone());
        Ok(())
    }
    /// "Served" while the marker exists (removing it plays a dead layer daemon).
    fn is_live(&self, dir: &Path) -> bool {
        dir.join("marker").exists()
    }
    fn unmount(&self, _dir: &Path) {
        self.unmounts.fetch_add(1, Ordering::SeqCst);
    }
    /// "small" unpacks (writes a file and a partial one first), "small-broken" fails midway.
    fn unpack(&self, l: &BTreeMap<String, String>, dir: &Path) -> Result<u64, String> {
        std::fs::write(dir.join("half"), b"x").unwrap();
        match l.get("containerd.io/snapshot/cri.layer-digest").map(String::as_str) {
            Some("small") => {
                std::fs::write(dir.join("unpacked"), b"ok").unwrap();
                Ok(2)
            }
            _ => Err("blob digest mismatch".into()),
        }
    }
}

#[test]
fn layers_without_a_ztoc_are_unpacked_by_the_snapshotter_or_left_to_containerd() {
    let d = tempfile::tempdir().unwrap();
    let remote = Arc::new(FakeRemote {
        mounted: Mutex::new(Vec::new()),
        unmounts: AtomicUsize::new(0),
    });
    let s = Snapshotter::open(d.path(), Some(remote.clone())).unwrap();
    let l = labels(&[(TARGET_REF_LABEL, "sha256:chain1"), ("containerd.io/snapshot/cri.layer-digest", "small")]);
    assert!(matches!(s.prepare("default/1/extract-1", "", l, Kind::Active), Err(Error::AlreadyExists(n)) if n == "sha256:chain1"));
    let i = s.stat("sha256:chain1").unwrap();
    assert_eq!(i.kind, Kind::Committed);
    assert_eq!(i.labels.get(UNPACKED_LABEL).map(String::as_str), Some("soci_no_ztoc"));
    assert!(!i.labels.contains_key("containerd.io/snapshot/remote"), "an unpacked layer is no remote snapshot");
    assert!(s.remote_snapshots().unwrap().is_empty(), "nothing to mount again after a restart");
    assert_eq!(s.stats.fallbacks.lock().unwrap().get("soci_no_ztoc"), Some(&1), "the reason is still counted");
    assert_eq!(s.stats.unpacked_snapshots.load(Ordering::SeqCst), 1);
    // Its content is what a child sees below it.
    let l2 = labels(&[(TARGET_REF_LABEL, "sha256:chain2"), ("containerd.io/snapshot/cri.layer-digest", "small-broken")]);
    let m = s.prepare("default/2/extract-2", "sha256:chain1", l2, Kind::Active).expect("a failed unpack falls back to containerd");
    let lower = m[0].options.iter().find_map(|o| o.strip_prefix("lowerdir=")).map(str::to_string);
    let lower = lower.or_else(|| (m[0].kind == "bind").then(|| m[0].source.clone())).expect("the unpacked layer is the lower directory");
    assert_eq!(std::fs::read(Path::new(&lower).join("unpacked")).unwrap(), b"ok");
    assert!(matches!(s.stat("sha256:chain2"), Err(Error::NotFound(_))), "a failed unpack commits nothing");
    let dirs = std::fs::read_dir(d.path().join("snapshots")).unwrap().count();
    assert_eq!(dirs, 2, "the failed unpack's directory is removed (the unpacked one and the fallback's remain)");
    assert_eq!(s.stats.unpacked_snapshots.load(Ordering::SeqCst), 1);
}

#[test]
fn remote_snapshots_answer_already_exists_and_fall_back_with_a_reason() {
    let d = tempfile::tempdir().unwrap();
    let remote = Arc::new(FakeRemote {
        mounted: Mutex::new(Vec::new()),
        unmounts: AtomicUsize::new(0),
    });
    let s = Snapshotter::open(d.path(), Some(remote.clone())).unwrap();
    let l = labels(&[(TARGET_REF_LABEL, "sha256:chain1"), ("containerd.io/snapshot/cri.layer-digest", "sha256:l1")]);
    match s.prepare("default/1/extract-1", "", l.clone(), Kind::Active) {
        Err(Error::AlreadyExists(n)) => assert_eq!(n, "sha256:chain1"),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    let i = s.stat("sha256:chain1").unwrap();
    assert_eq!(i.kind, Kind::Committed);
    assert!(i.labels.contains_key("containerd.io/snapshot/remote"));
    assert!(matches!(s.stat("default/1/extract-1"), Err(Error::NotFound(_))));
    // Asking again (another image sharing the layer) does not mount twice.
    assert!(matches!(s.prepare("default/2/extract-2", "", l, Kind::Active), Err(Error::AlreadyExists(_))));
    assert_eq!(remote.mounted.lock().unwrap().len(), 1);
    // A child layer on top of the remote one.
    let l2 = labels(&[(TARGET_REF_LABEL, "sha256:chain2"), ("containerd.io/snapshot/cri.layer-digest", "plain")]);
    let m = s.prepare("default/3/extract-3", "sha256:chain1", l2, Kind::Active).expect("falls back to a normal snapshot");
    assert_eq!(m[0].kind, "overlay");
    assert_eq!(s.stats.fallbacks.lock().unwrap().get("no_lazy_index"), Some(&1));
    assert_eq!(remote.mounted.lock().unwrap().len(), 1, "a live remote parent is not mounted again");
    // Its daemon dies (the mount goes away): the next Prepare/View on top mounts it again
    // instead of handing containerd an empty lower directory.
    let fs = s.remote_snapshots().unwrap().into_iter().find(|r| r.0 == "sha256:chain1").unwrap().1;
    std::fs::remove_file(fs.join("marker")).unwrap();
    s.prepare("default/4/view", "sha256:chain1", BTreeMap::new(), Kind::View).unwrap();
    assert!(fs.join("marker").exists(), "the dead remote parent was not mounted again");
    assert_eq!(remote.mounted.lock().unwrap().len(), 2);
    s.remove("default/4/view").unwrap();
    s.commit("sha256:chain2", "default/3/extract-3", BTreeMap::new()).unwrap();
    assert_eq!(s.remote_snapshots().unwrap().len(), 1);
    s.remove("sha256:chain2").unwrap();
    s.remove("sha256:chain1").unwrap();
    assert_eq!(remote.unmounts.load(Ordering::SeqCst), 1);
}
