//! The pure parts of a pull: chain IDs, the labels put on snapshots and content, and the
//! expiry timestamp of the pull's lease. No I/O, so all of it is unit-tested.

use std::collections::HashMap;

use registry::Descriptor;
use sha2::{Digest, Sha256};

/// Snapshot label naming the committed snapshot a Prepare is meant to become (its chain ID).
pub const SNAPSHOT_REF_LABEL: &str = "containerd.io/snapshot.ref";
/// Image reference of the layer (read by stargz-snapshotter and lazypull).
pub const STARGZ_REF_LABEL: &str = "containerd.io/snapshot/remote/stargz.reference";
/// Digest of the layer blob.
pub const STARGZ_DIGEST_LABEL: &str = "containerd.io/snapshot/remote/stargz.digest";
/// Comma-separated digests of this and the following layers, so the snapshotter can resolve
/// them in parallel on the first Prepare.
pub const STARGZ_LAYERS_LABEL: &str = "containerd.io/snapshot/remote/stargz.layers";
/// Compressed size of the layer blob. With it and the TOC digest annotation the lazypull
/// snapshotter mounts a layer without fetching the image manifest again (one round trip less
/// per pull); other snapshotters ignore it.
pub const LAYER_SIZE_LABEL: &str = "containerd.io/snapshot/lazypull.layer-size";
/// containerd forwards only layer annotations with this prefix to snapshotters.
pub const INHERITED_PREFIX: &str = "containerd.io/snapshot/";
/// containerd refuses labels whose key + value exceed this many bytes.
pub const MAX_LABEL_BYTES: usize = 4096;
/// Content label: the uncompressed digest (DiffID) of a layer blob.
pub const UNCOMPRESSED_LABEL: &str = "containerd.io/uncompressed";
/// Lease label: when containerd may drop the lease (a crashed pull's resources then become
/// collectable instead of leaking).
pub const GC_EXPIRE_LABEL: &str = "containerd.io/gc.expire";

/// Content label through which the config keeps the image's top snapshot alive.
pub fn gc_snapshot_label(snapshotter: &str) -> String {
    format!("containerd.io/gc.ref.snapshot.{snapshotter}")
}

/// Chain IDs of a layer stack: `chain[0] = diff_ids[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff_ids[i])` (OCI image spec, "ChainID").
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!("sha256:{}", hex::encode(Sha256::digest(format!("{prev} {d}").as_bytes()))),
        };
        out.push(next);
    }
    out
}

/// Labels for the Prepare of layer `i`: the layer's own `containerd.io/snapshot/*` annotations
/// (e.g. the TOC digest), the stargz reference/digest/layers labels and the target chain ID.
pub fn layer_snapshot_labels(reference: &str, layers: &[Descriptor], i: usize, chain_id: &str) -> HashMap<String, String> {
    let layer = &layers[i];
    let mut labels: HashMap<String, String> =
        layer.annotations.iter().filter(|(k, _)| k.starts_with(INHERITED_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect();
    labels.insert(STARGZ_REF_LABEL.into(), reference.into());
    labels.insert(STARGZ_DIGEST_LABEL.into(), layer.digest.clone());
    labels.insert(LAYER_SIZE_LABEL.into(), layer.size.to_string());
    let mut list = String::new();
    for l in &layers[i..] {
        let sep = if list.is_empty() { 0 } else { 1 };
        if STARGZ_LAYERS_LABEL.len() + list.len() + sep + l.digest.len() > MAX_LABEL_BYTES {
            break; // a prefix of the list is still a useful hint
        }
        if sep == 1 {
            list.push(',');
        }
        list.push_str(&l.digest);
    }
    labels.insert(STARGZ_LAYERS_LABEL.into(), list);
    labels.insert(SNAPSHOT_REF_LABEL.into(), chain_id.into());
    labels
}

/// GC labels of a manifest: it references its config and layers.
pub fn manifest_gc_labels(config: &Descriptor, layers: &[Descriptor]) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    labels.insert("containerd.io/gc.ref.content.config".to_string(), config.digest.clone());
    for (i, l) in layers.iter().enumerate() {
        labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), l.digest.clone());
    }
    labels
}

/// GC labels of an index: it references the manifests that were pulled.
pub fn index_gc_labels(manifests: &[&str]) -> HashMap<String, String> {
    manifests.iter().enumerate().map(|(i, d)| (format!("containerd.io/gc.ref.content.m.{i}"), d.to_string())).collect()
}

/// `unix_secs` as an RFC 3339 UTC timestamp (`2026-11-23T10:00:00Z`), the form containerd parses
/// in `containerd.io/gc.expire`.
pub fn rfc3339_utc(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> Descriptor {
        let mut d = Descriptor::new("application/vnd.oci.image.layer.v1.tar+gzip", format!("sha256:{}", hex::encode([n; 32])), 10);
        d.annotations.insert("containerd.io/snapshot/stargz/toc.digest".into(), format!("sha256:{}", hex::encode([n + 100; 32])));
        d.annotations.insert("org.opencontainers.image.title".into(), "not inherited".into());
        d
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        // Known values: the chain of two diff IDs from the OCI image spec's example computation.
        let a = "sha256:a".to_string();
        let b = "sha256:b".to_string();
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        assert_eq!(chain[1], format!("sha256:{}", hex::encode(Sha256::digest(b"sha256:a sha256:b"))));
        assert!(chain_ids(&[]).is_empty());
        let three = chain_ids(&[a.clone(), b.clone(), a.clone()]);
        assert_eq!(three[..2], chain[..]);
        assert_eq!(three[2], format!("sha256:{}", hex::encode(Sha256::digest(format!("{} {a}", chain[1]).as_bytes()))));
    }

    #[test]
    fn layer_labels_inherit_only_snapshot_annotations_and_list_the_rest_of_the_image() {
        let layers = vec![layer(1), layer(2), layer(3)];
        let l = layer_snapshot_labels("127.0.0.1:5000/app:1", &layers, 1, "sha256:chain");
        assert_eq!(l[STARGZ_REF_LABEL], "127.0.0.1:5000/app:1");
        assert_eq!(l[STARGZ_DIGEST_LABEL], layers[1].digest);
        assert_eq!(l[STARGZ_LAYERS_LABEL], format!("{},{}", layers[1].digest, layers[2].digest));
        assert_eq!(l[SNAPSHOT_REF_LABEL], "sha256:chain");
        assert_eq!(l[LAYER_SIZE_LABEL], layers[1].size.to_string());
        assert_eq!(l["containerd.io/snapshot/stargz/toc.digest"], layers[1].annotations["containerd.io/snapshot/stargz/toc.digest"]);
        assert!(!l.contains_key("org.opencontainers.image.title"));
    }

    #[test]
    fn the_layers_label_stays_within_containerds_label_limit() {
        let layers: Vec<Descriptor> = (0..100).map(layer).collect();
        let l = layer_snapshot_labels("r/a:1", &layers, 0, "c");
        let v = &l[STARGZ_LAYERS_LABEL];
        assert!(STARGZ_LAYERS_LABEL.len() + v.len() <= MAX_LABEL_BYTES);
        let n = v.split(',').count();
        assert!(n > 40 && n < 100, "{n} digests kept");
        assert!(v.split(',').zip(&layers).all(|(a, b)| a == b.digest), "a prefix, in order");
    }

    #[test]
    fn gc_labels_reference_children() {
        let layers = vec![layer(1), layer(2)];
        let config = Descriptor::new("application/vnd.oci.image.config.v1+json", "sha256:cfg".into(), 5);
        let m = manifest_gc_labels(&config, &layers);
        assert_eq!(m["containerd.io/gc.ref.content.config"], "sha256:cfg");
        assert_eq!(m["containerd.io/gc.ref.content.l.1"], layers[1].digest);
        assert_eq!(index_gc_labels(&["sha256:m"])["containerd.io/gc.ref.content.m.0"], "sha256:m");
        assert_eq!(gc_snapshot_label("lazypull"), "containerd.io/gc.ref.snapshot.lazypull");
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_795_435_200), "2026-11-23T12:00:00Z");
        assert_eq!(rfc3339_utc(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
