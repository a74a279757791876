//! The pull itself: registry → containerd content store, snapshots (remote or unpacked), image.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use containerd_api::types::Descriptor as PbDescriptor;
use registry::manifest::select_platform;
use registry::{Client, Descriptor, ManifestKind, Platform, Reference};

use crate::containerd::Containerd;
use crate::error::{Error, Result};
use crate::labels;

/// Largest config blob accepted (configs are kilobytes; this bounds a hostile one).
const MAX_CONFIG_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Snapshotter containerd should use (the proxy plugin's name, e.g. `lazypull`).
    pub snapshotter: String,
    pub platform: Platform,
    /// How long containerd keeps the pull's lease if the pull dies without releasing it.
    pub lease_expiry: Duration,
    /// Labels of the image record (e.g. `io.cri-containerd.image=managed` so that CRI lists it).
    pub image_labels: std::collections::HashMap<String, String>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions { snapshotter: "lazypull".into(), platform: Platform::host(), lease_expiry: Duration::from_secs(3600), image_labels: Default::default() }
    }
}

/// Set by lazypull's snapshotter on a snapshot it fetched and unpacked itself (the same name as
/// `snapshotter::UNPACKED_LABEL`; rpull does not depend on the snapshotter crate).
pub const UNPACKED_BY_SNAPSHOTTER_LABEL: &str = "lazypull.io/unpacked-by-snapshotter";

/// What happened to one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerOutcome {
    /// The snapshot already existed (an earlier pull, or another image sharing the layer).
    Present,
    /// The snapshotter mounted it lazily (Prepare answered AlreadyExists).
    Remote,
    /// The snapshotter fetched and unpacked it itself (Prepare answered AlreadyExists; the
    /// snapshot's `lazypull.io/unpacked-by-snapshotter` label says why it was not lazy).
    UnpackedBySnapshotter { reason: String },
    /// Fetched and unpacked by containerd (the snapshotter fell back; its log says why).
    Unpacked { bytes: u64 },
}

#[derive(Debug, Clone)]
pub struct PullReport {
    pub image: String,
    /// Digest the image record points at (index or manifest).
    pub target: String,
    pub layers: Vec<(String, LayerOutcome)>,
    /// Bytes rpull itself downloaded: manifests, config, unpacked layers.
    pub bytes_downloaded: u64,
    pub elapsed: Duration,
}

impl PullReport {
    pub fn remote_layers(&self) -> usize {
        self.layers.iter().filter(|(_, o)| *o == LayerOutcome::Remote).count()
    }
}

fn pb_descriptor(d: &Descriptor) -> PbDescriptor {
    PbDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as i64,
        annotations: d.annotations.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// Pulls `reference` into containerd (`ctd`, already bound to a namespace) with `opts`.
pub async fn pull(registry: &Client, ctd: &Containerd, reference: &str, opts: &PullOptions) -> Result<PullReport> {
    let started = Instant::now();
    let r = Reference::parse(reference)?;
    let name = r.to_string();
    let bad = |reason: String| Error::BadImage { reference: name.clone(), reason };

    // Resolve: the top document (index or manifest), then the platform's manifest and config.
    let top = registry.get_manifest(&r).await?;
    let mut downloaded = top.bytes.len() as u64;
    let top_desc = Descriptor::new(&top.media_type, top.digest.clone(), top.bytes.len() as u64);
    let (manifest_fetched, index) = match &top.manifest {
        ManifestKind::Image(_) => (top.clone(), None),
        ManifestKind::Index(ix) => {
            let d = select_platform(ix, &opts.platform, &name)?;
            let m = registry.get_manifest(&r.with_digest(&d.digest)).await?;
            downloaded += m.bytes.len() as u64;
            (m, Some(top.clone()))
        }
    };
    let ManifestKind::Image(manifest) = &manifest_fetched.manifest else {
        return Err(bad(format!("{} is an index inside an index", manifest_fetched.digest)));
    };
    let config_bytes = registry.get_blob_bytes(&r, &manifest.config.digest, MAX_CONFIG_BYTES).await?;
    downloaded += config_bytes.len() as u64;
    let config: serde_json::Value =
        serde_json::from_slice(&config_bytes).map_err(|e| bad(format!("config {} is not JSON: {e}", manifest.config.digest)))?;
    let diff_ids: Vec<String> = config
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad(format!("config {} has no rootfs.diff_ids", manifest.config.digest)))?
        .iter()
        .map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad("a diff_id is not a string".into())))
        .collect::<Result<_>>()?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(bad(format!("{} layers but {} diff_ids in config {}", manifest.layers.len(), diff_ids.len(), manifest.config.digest)));
    }
    let chain = labels::chain_ids(&diff_ids);

    // Everything below happens under a lease, released at the end whatever the outcome.
    let expire = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + opts.lease_expiry;
    let lease = ctd.create_lease(&labels::rfc3339_utc(expire.as_secs())).await?;
    let leased = ctd.with_lease(&lease);
    let result = pull_under_lease(registry, &leased, &r, &name, opts, &top_desc, index.as_ref(), &manifest_fetched, manifest, &config_bytes, &chain, &diff_ids).await;
    if let Err(e) = ctd.delete_lease(&lease).await {
        tracing::warn!(lease = %lease, error = %e, "releasing the pull's lease failed; it expires by itself");
    }
    let (layers, unpacked_bytes) = result?;
    Ok(PullReport { image: name, target: top_desc.digest, layers, bytes_downloaded: downloaded + unpacked_bytes, elapsed: started.elapsed() })
}

#[allow(clippy::too_many_arguments)]
async fn pull_under_lease(
    registry: &Client,
    ctd: &Containerd,
    r: &Reference,
    name: &str,
    opts: &PullOptions,
    top_desc: &Descriptor,
    index: Option<&registry::FetchedManifest>,
    manifest_fetched: &registry::FetchedManifest,
    manifest: &registry::Manifest,
    config_bytes: &[u8],
    chain: &[String],
    diff_ids: &[String],
) -> Result<(Vec<(String, LayerOutcome)>, u64)> {
    // Content first: children before parents, so a GC between calls never sees a dangling ref
    // that matters (the lease protects them anyway).
    ctd.put_bytes(&manifest.config.digest, config_bytes, HashMap::new()).await?;
    ctd.put_bytes(&manifest_fetched.digest, &manifest_fetched.bytes, labels::manifest_gc_labels(&manifest.config, &manifest.layers)).await?;
    if let Some(ix) = index {
        ctd.put_bytes(&ix.digest, &ix.bytes, labels::index_gc_labels(&[manifest_fetched.digest.as_str()])).await?;
    }

    let mut outcomes = Vec::with_capacity(manifest.layers.len());
    let mut unpacked_bytes = 0u64;
    for (i, layer) in manifest.layers.iter().enumerate() {
        let chain_id = &chain[i];
        let parent = if i == 0 { "" } else { chain[i - 1].as_str() };
        if ctd.snapshot_exists(&opts.snapshotter, chain_id).await? {
            outcomes.push((layer.digest.clone(), LayerOutcome::Present));
            continue;
        }
        let snap_labels = labels::layer_snapshot_labels(name, &manifest.layers, i, chain_id);
        // containerd's own key format for unpack snapshots ("extract-<unique> <chainID>").
        let key = format!("extract-{}-{:08x} {chain_id}", std::process::id(), rand::random::<u32>());
        let Some(mounts) = ctd.prepare(&opts.snapshotter, &key, parent, snap_labels.clone()).await? else {
            // A layer the snapshotter unpacked itself says so on the snapshot (one Stat; a
            // failure to ask is not a failure of the pull).
            let labels = ctd.snapshot_labels(&opts.snapshotter, chain_id).await.unwrap_or_default();
            match labels.get(UNPACKED_BY_SNAPSHOTTER_LABEL) {
                Some(reason) => {
                    tracing::info!(layer = %layer.digest, chain_id = %chain_id, %reason, "unpacked by the snapshotter");
                    outcomes.push((layer.digest.clone(), LayerOutcome::UnpackedBySnapshotter { reason: reason.clone() }));
                }
                None => {
                    tracing::info!(layer = %layer.digest, chain_id = %chain_id, "remote snapshot");
                    outcomes.push((layer.digest.clone(), LayerOutcome::Remote));
                }
            }
            continue;
        };
        tracing::info!(layer = %layer.digest, "snapshotter fell back; fetching and unpacking the layer");
        match unpack_layer(registry, ctd, r, layer, &diff_ids[i], mounts).await {
            Ok(bytes) => {
                unpacked_bytes += bytes;
                ctd.commit(&opts.snapshotter, chain_id, &key, snap_labels).await?;
                ctd.add_labels(&layer.digest, HashMap::from([(labels::UNCOMPRESSED_LABEL.to_string(), diff_ids[i].clone())])).await?;
                outcomes.push((layer.digest.clone(), LayerOutcome::Unpacked { bytes }));
            }
            Err(e) => {
                if let Err(re) = ctd.remove_snapshot(&opts.snapshotter, &key).await {
                    tracing::warn!(key = %key, error = %re, "removing the failed extraction snapshot");
                }
                return Err(e);
            }
        }
    }

    let top_chain = chain.last().cloned().unwrap_or_default();
    if !top_chain.is_empty() {
        ctd.add_labels(&manifest.config.digest, HashMap::from([(labels::gc_snapshot_label(&opts.snapshotter), top_chain)])).await?;
    }
    ctd.put_image(name, pb_descriptor(top_desc), &opts.image_labels).await?;
    Ok((outcomes, unpacked_bytes))
}

/// Fetches a layer blob (digest-verified) into containerd's content store and has containerd
/// apply it onto `mounts`; checks the DiffID containerd computed. Returns the blob's size.
async fn unpack_layer(registry: &Client, ctd: &Containerd, r: &Reference, layer: &Descriptor, diff_id: &str, mounts: Vec<containerd_api::types::Mount>) -> Result<u64> {
    let tmp = tempfile::NamedTempFile::new().map_err(|e| Error::Io { context: "creating a temporary file for a layer".into(), source: e })?;
    let mut file = tokio::fs::File::from_std(tmp.reopen().map_err(|e| Error::Io { context: "reopening the temporary layer file".into(), source: e })?);
    let bytes = registry.get_blob_to(r, &layer.digest, &mut file, Some(layer.size)).await?;
    tokio::io::AsyncWriteExt::flush(&mut file).await.map_err(|e| Error::Io { context: format!("writing layer {}", layer.digest), source: e })?;
    drop(file);
    ctd.put_file(&layer.digest, tmp.path(), HashMap::new()).await?;
    let applied = ctd.apply(pb_descriptor(layer), mounts).await?;
    if applied != diff_id {
        return Err(Error::BadImage {
            reference: r.to_string(),
            reason: format!("layer {} unpacks to {applied}, but the config says {diff_id}", layer.digest),
        });
    }
    Ok(bytes)
}
