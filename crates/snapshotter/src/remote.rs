//! The real [`Remote`]: resolves image/layer labels through the registry, opens the layer's TOC
//! (verified against the manifest's TOC digest annotation) and mounts it with FUSE.
//!
//! Labels understood (whichever a client sets): ctr-remote/stargz
//! `containerd.io/snapshot/remote/stargz.reference|digest`, and CRI
//! `containerd.io/snapshot/cri.image-ref|layer-digest`. The TOC digest comes from the label
//! `containerd.io/snapshot/stargz/toc.digest` when present, otherwise from the layer's
//! annotation in the image manifest, which is fetched once per image. When the labels also carry
//! the blob's size (`containerd.io/snapshot/lazypull.layer-size`, set by `lazypull rpull`), the
//! manifest is not fetched at all: a round trip less on every cold start.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazyfs::{FsOptions, LayerServer, ServeOptions};
use registry::manifest::{self, ManifestKind, Platform};
use registry::{Client, Reference};
use store::{ChunkStore, FetchConfig, LayerFetcher, RangeSource, RegistryRangeSource, TailCache};

use crate::meta::RemoteLayer;
use crate::snapshots::NotLazy;
use crate::snapshots::Remote;

pub const STARGZ_REF_LABEL: &str = "containerd.io/snapshot/remote/stargz.reference";
pub const STARGZ_DIGEST_LABEL: &str = "containerd.io/snapshot/remote/stargz.digest";
pub const CRI_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.layer-digest";
/// The image's layers from this one up, comma-separated (stargz and CRI flavours).
pub const STARGZ_LAYERS_LABEL: &str = "containerd.io/snapshot/remote/stargz.layers";
pub const CRI_LAYERS_LABEL: &str = "containerd.io/snapshot/cri.image-layers";
/// Compressed size of the layer blob (the same key as `rpull::labels::LAYER_SIZE_LABEL`).
pub const LAYER_SIZE_LABEL: &str = "containerd.io/snapshot/lazypull.layer-size";

/// Settings of lazily mounted layers.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    pub fetch_timeout: Duration,
    pub fetch: FetchConfig,
    pub fs: FsOptions,
    pub threads: usize,
    pub background: bool,
    /// Delay before the background fill starts, so a starting container's first reads have the
    /// link to themselves (the prioritized-files prefetch is not delayed).
    pub background_delay: Duration,
    pub prefetch: bool,
    /// Layers without prioritized files and at most this big are fetched whole at mount.
    pub small_layer_prefetch: u64,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            fetch_timeout: Duration::from_secs(30),
            fetch: FetchConfig::default(),
            fs: FsOptions::default(),
            threads: 8,
            background: true,
            background_delay: Duration::from_secs(5),
            prefetch: true,
            small_layer_prefetch: lazyfs::SMALL_LAYER_BYTES,
        }
    }
}

pub struct RegistryRemote {
    client: Client,
    runtime: tokio::runtime::Handle,
    store: Arc<ChunkStore>,
    config: RemoteConfig,
    /// Image manifests by reference, shared with the TOC read-ahead tasks.
    manifests: Arc<Mutex<HashMap<String, Arc<registry::Manifest>>>>,
    mounts: Mutex<HashMap<PathBuf, LayerServer>>,
    /// Footers and TOCs read ahead of their layers' mounts (see `store::tails`).
    tails: Option<TailCache>,
    /// Blobs whose TOC is being read ahead.
    warming: Arc<Mutex<HashSet<String>>>,
    /// The platform manifest's digest by image reference (for SOCI discovery).
    manifest_digests: Mutex<HashMap<String, String>>,
    /// The SOCI index of each image looked up (`None`: it has none), once per image.
    soci: Mutex<HashMap<String, Option<(String, Arc<soci_image::SociIndex>)>>>,
    /// zTOCs built here for the small layers a SOCI index leaves out: layer digest → zTOC
    /// digest (the bytes are in `tails`, where the layer's mount finds them).
    local_ztocs: Arc<Mutex<HashMap<String, estargz::Digest>>>,
}

impl RegistryRemote {
    pub fn new(client: Client, runtime: tokio::runtime::Handle, store: Arc<ChunkStore>, config: RemoteConfig) -> RegistryRemote {
        RegistryRemote {
            client,
            runtime,
            store,
            config,
            manifests: Arc::default(),
            mounts: Mutex::new(HashMap::new()),
            tails: None,
            warming: Arc::new(Mutex::new(HashSet::new())),
            manifest_digests: Mutex::new(HashMap::new()),
            soci: Mutex::new(HashMap::new()),
            local_ztocs: Arc::default(),
        }
    }

    /// Reads the TOCs of an image's later layers into `tails` as soon as its first layer is
    /// prepared, and opens layers from there.
    pub fn with_tail_cache(mut self, tails: TailCache) -> Self {
        self.tails = Some(tails);
        self
    }

    /// Starts reading, in parallel and in the background, the TOCs of the layers the labels list
    /// after `current` (containerd prepares them next, one by one), so that their mounts find
    /// them on disk. Costs one manifest request, off the critical path.
    fn warm_later_layers(&self, image: &str, current: &str, labels: &BTreeMap<String, String>) {
        let Some(tails) = self.tails.clone() else { return };
        let Some(list) = labels.get(STARGZ_LAYERS_LABEL).or_else(|| labels.get(CRI_LAYERS_LABEL)) else { return };
        let todo: Vec<String> = {
            let mut warming = self.warming.lock().unwrap();
            list.split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty() && *d != current && !tails.contains(d))
                .filter(|d| warming.insert(d.to_string()))
                .map(str::to_string)
                .collect()
        };
        if todo.is_empty() {
            return;
        }
        let Ok(reference) = Reference::parse(image) else { return };
        let (client, runtime, warming, timeout) = (self.client.clone(), self.runtime.clone(), self.warming.clone(), self.config.fetch_timeout);
        let (manifests, image, local_ztocs) = (self.manifests.clone(), image.to_string(), self.local_ztocs.clone());
        // The image's SOCI index, looked up by the current layer's resolution if it is not
        // eStargz: later layers' zTOCs are read ahead like TOCs.
        let soci = self.soci.lock().unwrap().get(&image).cloned().flatten().map(|(_, index)| index);
        self.runtime.spawn(async move {
            let done = |todo: &[String]| {
                let mut w = warming.lock().unwrap();
                todo.iter().for_each(|d| {
                    w.remove(d);
                });
            };
            let cached = manifests.lock().unwrap().get(&image).cloned();
            let manifest = match cached {
                Some(m) => m,
                None => match tokio::time::timeout(timeout, fetch_manifest(&client, &reference)).await {
                    Ok(Ok((m, _))) => manifests.lock().unwrap().entry(image).or_insert_with(|| Arc::new(m)).clone(),
                    _ => return done(&todo),
                },
            };
            let mut tasks = Vec::new();
            for d in &todo {
                let Some(layer) = manifest.layers.iter().find(|l| &l.digest == d) else { continue };
                let Ok(found) = layer::detect(&layer.media_type, &layer.annotations) else {
                    match soci.as_ref().map(|s| s.ztoc_for(d)) {
                        Some(Some(z)) => {
                            for blob in std::iter::once(z.ztoc_digest.clone()).chain(z.prefetch.as_ref().map(|p| p.digest.clone())) {
                                let (client, reference, tails) = (client.clone(), reference.clone(), tails.clone());
                                tasks.push(tokio::spawn(async move { read_side_blob_ahead(&client, &reference, &blob, &tails, timeout).await }));
                            }
                        }
                        // A small layer the SOCI index leaves out: indexed here, ahead of its Prepare.
                        Some(None) if soci_image::indexable(&layer.media_type) && layer.size <= LOCAL_UNPACK_MAX => {
                            let (client, reference, tails, local, digest) = (client.clone(), reference.clone(), tails.clone(), local_ztocs.clone(), d.clone());
                            tasks.push(tokio::spawn(async move {
                                match index_small_layer(&client, &reference, &digest, &tails, timeout).await {
                                    Ok(z) => drop(local.lock().unwrap().insert(digest, z)),
                                    Err(e) => tracing::debug!(layer = %digest, error = %e, "indexing a small layer ahead failed; its Prepare will try"),
                                }
                            }));
                        }
                        _ => {}
                    }
                    continue;
                };
                let toc = found.check;
                let source: Arc<dyn RangeSource> = Arc::new(RegistryRangeSource::new(client.clone(), reference.clone(), d.clone(), layer.size, runtime.clone(), timeout));
                let tails = tails.clone();
                let digest = d.clone();
                tasks.push(tokio::task::spawn_blocking(move || {
                    if let Err(e) = lazyfs::cache_toc(source, Some(&toc), &tails) {
                        tracing::debug!(layer = %digest, error = %e, "reading a TOC ahead failed; the mount will read it");
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            done(&todo);
        });
    }

    /// The remote layer the labels name: from the labels alone when they carry what
    /// authenticates its index and the blob size, else with the manifest's descriptor (size,
    /// media type, annotations; labels win). Whether it is lazy is [`layer::detect`]'s answer.
    fn layer_of(&self, image: &str, digest: &str, labels: &BTreeMap<String, String>) -> Result<RemoteLayer, NotLazy> {
        let labelled_size = labels.get(LAYER_SIZE_LABEL).and_then(|s| s.parse::<u64>().ok());
        let remote = |size: u64, check: layer::IndexCheck| RemoteLayer { image_ref: image.to_string(), digest: digest.to_string(), size, index_check: check.to_string() };
        if let (Ok(found), Some(size)) = (layer::detect("", labels), labelled_size) {
            return Ok(remote(size, found.check));
        }
        let m = self.manifest(image)?;
        let d = m.layers.iter().find(|l| l.digest == digest).ok_or_else(|| NotLazy::NotInManifest { image: image.to_string(), digest: digest.to_string() })?;
        let mut annotations = d.annotations.clone();
        annotations.extend(labels.iter().filter(|(k, _)| k.starts_with("containerd.io/snapshot/stargz/") || k.starts_with("io.containers.zstd-chunked.")).map(|(k, v)| (k.clone(), v.clone())));
        match layer::detect(&d.media_type, &annotations) {
            Ok(found) => Ok(remote(d.size, found.check)),
            // Not eStargz: lazy through a SOCI index when the image has one with a zTOC for it.
            Err(reason @ NotLazy::NoIndex { .. }) if soci_image::indexable(&d.media_type) => {
                let Some((index_digest, index)) = self.soci_index(image, &m)? else { return Err(reason) };
                match index.ztoc_for(digest) {
                    Some(z) => Ok(remote(d.size, layer::IndexCheck::soci(&z.ztoc_digest, z.prefetch.as_ref().map(|p| p.digest.as_str()))?)),
                    None => match self.local_ztoc(image, digest, d.size, &d.media_type) {
                        Some(z) => Ok(remote(d.size, layer::IndexCheck::SociZtoc(z, None))),
                        None => Err(NotLazy::NoZtoc { index: index_digest }),
                    },
                }
            }
            Err(reason) => Err(reason),
        }
    }

    /// The image's SOCI index and its digest (looked up once per image: manifest annotation,
    /// then referrers).
    fn soci_index(&self, image: &str, m: &registry::Manifest) -> Result<Option<(String, Arc<soci_image::SociIndex>)>, NotLazy> {
        if let Some(found) = self.soci.lock().unwrap().get(image) {
            return Ok(found.clone());
        }
        let digest = self.manifest_digests.lock().unwrap().get(image).cloned().unwrap_or_default();
        let reference = Reference::parse(image).map_err(|e| NotLazy::BadAnnotation { key: "image reference".into(), value: format!("{image}: {e}") })?;
        let store = convert::Store::Registry { client: self.client.clone(), reference };
        let timeout = self.config.fetch_timeout;
        let found = self
            .runtime
            .block_on(async { tokio::time::timeout(timeout, soci_image::discover(&store, &digest, m, None)).await })
            .map_err(|_| NotLazy::RegistryUnreachable(format!("no SOCI index answer for {image} within {timeout:?}")))?
            .map_err(|e| NotLazy::Registry(format!("looking for a SOCI index of {image}: {e}")))?;
        if let Some(f) = &found {
            tracing::info!(image, index = %f.digest, via = f.via.as_str(), "using a SOCI index");
        }
        let found = found.map(|f| (f.digest, Arc::new(f.index)));
        self.soci.lock().unwrap().insert(image.to_string(), found.clone());
        Ok(found)
    }

    fn manifest(&self, image: &str) -> Result<Arc<registry::Manifest>, NotLazy> {
        if let Some(m) = self.manifests.lock().unwrap().get(image) {
            return Ok(m.clone());
        }
        let r = Reference::parse(image).map_err(|e| NotLazy::BadAnnotation { key: "image reference".into(), value: format!("{image}: {e}") })?;
        let timeout = self.config.fetch_timeout;
        let client = self.client.clone();
        let m = self
            .runtime
            .block_on(async move { tokio::time::timeout(timeout, fetch_manifest(&client, &r)).await })
            .map_err(|_| NotLazy::RegistryUnreachable(format!("no manifest for {image} within {timeout:?}")))?
            .map_err(|e| NotLazy::Registry(e.to_string()))?;
        let (m, digest) = m;
        let m = Arc::new(m);
        self.manifests.lock().unwrap().insert(image.to_string(), m.clone());
        self.manifest_digests.lock().unwrap().insert(image.to_string(), digest);
        Ok(m)
    }

    /// The zTOC of a small layer the image's SOCI index leaves out (below its minimum layer
    /// size), built here from the whole blob: read ahead by [`Self::warm_later_layers`], or
    /// now. `None` (the layer is then unpacked) without a tails cache, for a layer too large
    /// or not gzip/tar, or when the blob cannot be fetched or indexed.
    ///
    /// Why not unpack it, as upstream does: unpacking test/big:1's 64 KB top layer (1022 small
    /// files) took 106 ms of its Prepare, a third of the image's pull; indexing it takes a few
    /// milliseconds, off the critical path, and its mount is served like any SOCI layer (one
    /// span, fetched whole at mount as small layers are).
    fn local_ztoc(&self, image: &str, digest: &str, size: u64, media_type: &str) -> Option<estargz::Digest> {
        let tails = self.tails.as_ref()?;
        // Only while the tails cache still holds both (GC removes what no live layer uses).
        if let Some(z) = self.local_ztocs.lock().unwrap().get(digest) {
            if tails.contains(&z.to_string()) && tails.contains(digest) {
                return Some(*z);
            }
        }
        if size > LOCAL_UNPACK_MAX || !soci_image::indexable(media_type) {
            return None;
        }
        let reference = Reference::parse(image).ok()?;
        let (client, timeout) = (self.client.clone(), self.config.fetch_timeout);
        match self.runtime.block_on(index_small_layer(&client, &reference, digest, tails, timeout)) {
            Ok(z) => {
                tracing::info!(image, layer = digest, ztoc = %z, "layer has no zTOC in the SOCI index; indexed here and served lazily");
                self.local_ztocs.lock().unwrap().insert(digest.to_string(), z);
                Some(z)
            }
            Err(e) => {
                tracing::warn!(image, layer = digest, error = %e, "a small layer without a zTOC could not be indexed here; unpacking it");
                None
            }
        }
    }

    /// A blob a SOCI layer needs from beside the image (`what`: its zTOC or prefetch
    /// artifact), digest-checked as it arrives; from the tails cache when read ahead there.
    fn side_blob(&self, reference: &Reference, digest: &estargz::Digest, what: &str) -> Result<Vec<u8>, NotLazy> {
        let name = digest.to_string();
        if let Some((_, b)) = self.tails.as_ref().and_then(|t| t.load(&name)) {
            if estargz::Digest::of(&b) == *digest {
                return Ok(b);
            }
        }
        let (client, reference, timeout) = (self.client.clone(), reference.clone(), self.config.fetch_timeout);
        let bytes = self
            .runtime
            .block_on(async move { tokio::time::timeout(timeout, client.get_blob_bytes(&reference, &name, 512 << 20)).await })
            .map_err(|_| NotLazy::RegistryUnreachable(format!("{what} {digest} not fetched within {timeout:?}")))?
            .map_err(|e| NotLazy::Registry(format!("fetching {what} {digest}: {e}")))?;
        Ok(bytes.to_vec())
    }

    /// Per-layer counters of every mounted layer: (fs dir, fetcher).
    pub fn layers(&self) -> Vec<(PathBuf, Arc<LayerFetcher>)> {
        self.mounts.lock().unwrap().iter().map(|(p, m)| (p.clone(), m.fetcher().clone())).collect()
    }
}

impl Remote for RegistryRemote {
    fn resolve(&self, labels: &BTreeMap<String, String>) -> Result<Option<RemoteLayer>, NotLazy> {
        let image = labels.get(STARGZ_REF_LABEL).or_else(|| labels.get(CRI_REF_LABEL));
        let digest = labels.get(STARGZ_DIGEST_LABEL).or_else(|| labels.get(CRI_DIGEST_LABEL));
        let (Some(image), Some(digest)) = (image, digest) else { return Ok(None) };
        let layer = self.layer_of(image, digest, labels);
        // After the layer's own resolution, so the read-ahead finds its manifest cached.
        self.warm_later_layers(image, digest, labels);
        layer.map(Some)
    }

    fn mount(&self, layer: &RemoteLayer, dir: &Path) -> Result<(), NotLazy> {
        let reference = Reference::parse(&layer.image_ref).map_err(|e| NotLazy::BadAnnotation { key: "image reference".into(), value: format!("{}: {e}", layer.image_ref) })?;
        let want = layer::IndexCheck::parse(&layer.index_check)?;
        let source: Arc<dyn RangeSource> = Arc::new(RegistryRangeSource::new(
            self.client.clone(),
            reference,
            layer.digest.clone(),
            layer.size,
            self.runtime.clone(),
            self.config.fetch_timeout,
        ));
        let opened = match (&want, &self.tails) {
            (layer::IndexCheck::SociZtoc(ztoc, prefetch), _) => {
                let reference = Reference::parse(&layer.image_ref).expect("parsed above");
                let bytes = match self.side_blob(&reference, ztoc, "zTOC") {
                    Ok(b) => b,
                    // A zTOC built here and no longer cached: build it again (the builder is
                    // deterministic; the digest decides).
                    Err(e) => match self.tails.as_ref().filter(|_| layer.size <= LOCAL_UNPACK_MAX) {
                        Some(tails) => {
                            let (client, timeout) = (self.client.clone(), self.config.fetch_timeout);
                            match self.runtime.block_on(index_small_layer(&client, &reference, &layer.digest, tails, timeout)) {
                                Ok(z) if z == *ztoc => self.side_blob(&reference, ztoc, "zTOC")?,
                                _ => return Err(e),
                            }
                        }
                        None => return Err(e),
                    },
                };
                // A small layer indexed here was kept whole: read it from disk.
                let source = match self.tails.as_ref().and_then(|t| t.load_whole(&layer.digest, layer.size)) {
                    Some(blob) => Arc::new(store::TailSource::new(source, Some((0, blob)))) as Arc<dyn RangeSource>,
                    None => source,
                };
                // A hint: a prefetch artifact that cannot be fetched costs the prefetch, not the layer.
                let prefetch = prefetch.and_then(|p| self.side_blob(&reference, &p, "prefetch artifact").map_err(|e| tracing::warn!(error = %e, "SOCI prefetch artifact not fetched")).ok());
                lazyfs::open_ztoc_layer(source, &bytes, prefetch.as_deref(), &want, self.store.clone(), self.config.fetch.clone())
            }
            (_, Some(tails)) => lazyfs::open_layer_cached(source, Some(&want), self.store.clone(), self.config.fetch.clone(), tails),
            (_, None) => lazyfs::open_layer(source, Some(&want), self.store.clone(), self.config.fetch.clone()),
        }
        .map_err(|e| NotLazy::IndexUnusable(e.to_string()))?;
        let options = ServeOptions {
            fs: self.config.fs.clone(),
            threads: self.config.threads,
            privileges: lazyfs::Privileges::Honour,
            prefetch: self.config.prefetch,
            small_layer: self.config.small_layer_prefetch,
            fetch_all: false,
            background: self.config.background,
            background_delay: self.config.background_delay,
        };
        let server = LayerServer::mount(opened, dir, &format!("lazypull:{}", layer.digest), options).map_err(|e| NotLazy::MountFailed(e.to_string()))?;
        server.start_fill().map_err(|e| NotLazy::MountFailed(format!("spawning the fill thread: {e}")))?;
        let replaced = self.mounts.lock().unwrap().insert(dir.to_path_buf(), server);
        if let Some(old) = replaced {
            // A dead mount replaced by a new one: its session may take a while to end (its
            // superblock lives while a container still holds it); never wait for it here.
            old.close();
            std::thread::spawn(move || drop(old));
        }
        Ok(())
    }

    fn unpack(&self, labels: &BTreeMap<String, String>, dir: &Path) -> std::result::Result<u64, String> {
        let image = labels.get(STARGZ_REF_LABEL).or_else(|| labels.get(CRI_REF_LABEL)).ok_or("no image label")?;
        let digest = labels.get(STARGZ_DIGEST_LABEL).or_else(|| labels.get(CRI_DIGEST_LABEL)).ok_or("no layer digest label")?;
        let m = self.manifest(image).map_err(|e| e.to_string())?;
        let d = m.layers.iter().find(|l| &l.digest == digest).ok_or_else(|| format!("layer {digest} is not in {image}"))?;
        if d.size > LOCAL_UNPACK_MAX {
            return Err(format!("layer {digest} has {} bytes, more than the {LOCAL_UNPACK_MAX} the snapshotter unpacks itself", d.size));
        }
        let reference = Reference::parse(image).map_err(|e| format!("{image}: {e}"))?;
        let (client, digest_owned, timeout) = (self.client.clone(), digest.clone(), self.config.fetch_timeout);
        // Checked against its digest as it arrives (registry client).
        let blob = self
            .runtime
            .block_on(async move { tokio::time::timeout(timeout, client.get_blob_bytes(&reference, &digest_owned, LOCAL_UNPACK_MAX)).await })
            .map_err(|_| format!("layer {digest} not fetched within {timeout:?}"))?
            .map_err(|e| format!("fetching layer {digest}: {e}"))?;
        unpack::extract_blob(&blob, dir).map_err(|e| format!("unpacking layer {digest}: {e}"))?;
        Ok(blob.len() as u64)
    }

    fn unmount(&self, dir: &Path) {
        if let Some(m) = self.mounts.lock().unwrap().remove(dir) {
            m.close();
            // Dropping the mount detaches it and joins its session.
        } else if lazyfs::is_mountpoint(dir) {
            let _ = lazyfs::detach(dir);
        }
    }
}

/// The largest layer the snapshotter fetches and unpacks itself ([`Remote::unpack`]): SOCI's
/// default minimum layer size is 10 MiB, and the snapshot calls wait while it works.
pub const LOCAL_UNPACK_MAX: u64 = 16 << 20;

/// Fetches a small layer whole (digest-checked by the client, at most [`LOCAL_UNPACK_MAX`]
/// bytes), builds its zTOC (default span size) and keeps it in `tails` under its digest.
async fn index_small_layer(client: &Client, reference: &Reference, digest: &str, tails: &TailCache, timeout: Duration) -> Result<estargz::Digest, String> {
    let blob = tokio::time::timeout(timeout, client.get_blob_bytes(reference, digest, LOCAL_UNPACK_MAX))
        .await
        .map_err(|_| format!("layer {digest} not fetched within {timeout:?}"))?
        .map_err(|e| format!("fetching layer {digest}: {e}"))?;
    let (tails, name) = (tails.clone(), digest.to_string());
    tokio::task::spawn_blocking(move || {
        let ztoc = soci::build_ztoc(&blob[..], &soci::BuildOptions::default()).map_err(|e| format!("indexing layer {name}: {e}"))?.to_bytes();
        let z = estargz::Digest::of(&ztoc);
        // The blob too, so that its mount reads it from here rather than fetch it again.
        tails.save(&name, 0, &blob).map_err(|e| format!("caching layer {name}: {e}"))?;
        tails.save(&z.to_string(), 0, &ztoc).map_err(|e| format!("caching the zTOC of layer {name}: {e}"))?;
        Ok(z)
    })
    .await
    .map_err(|e| format!("indexing layer {digest}: {e}"))?
}

/// Fetches a SOCI layer's zTOC or prefetch artifact `ztoc` into `tails` (under its digest,
/// where a layer's mount looks first), unless it is there; only bytes that hash to it are kept.
async fn read_side_blob_ahead(client: &Client, reference: &Reference, ztoc: &str, tails: &TailCache, timeout: std::time::Duration) {
    if tails.contains(ztoc) {
        return;
    }
    let Ok(want) = ztoc.parse::<estargz::Digest>() else { return };
    match tokio::time::timeout(timeout, client.get_blob_bytes(reference, ztoc, 512 << 20)).await {
        Ok(Ok(bytes)) if estargz::Digest::of(&bytes) == want => {
            if let Err(e) = tails.save(ztoc, 0, &bytes) {
                tracing::debug!(%ztoc, error = %e, "a zTOC read ahead was not cached; the mount will fetch it");
            }
        }
        Ok(Ok(_)) => tracing::debug!(%ztoc, "a zTOC read ahead does not match its digest; the mount will fetch it and say so"),
        Ok(Err(e)) => tracing::debug!(%ztoc, error = %e, "reading a zTOC ahead failed; the mount will fetch it"),
        Err(_) => tracing::debug!(%ztoc, "reading a zTOC ahead timed out; the mount will fetch it"),
    }
}

/// The image manifest of `r` for this host's platform, and its digest.
async fn fetch_manifest(client: &Client, r: &Reference) -> registry::Result<(registry::Manifest, String)> {
    let fetched = client.get_manifest(r).await?;
    match fetched.manifest {
        ManifestKind::Image(m) => Ok((m, fetched.digest)),
        ManifestKind::Index(i) => {
            let d = manifest::select_platform(&i, &Platform::host(), &r.to_string())?;
            match client.get_manifest(&r.with_digest(&d.digest)).await?.manifest {
                ManifestKind::Image(m) => Ok((m, d.digest.clone())),
                ManifestKind::Index(_) => Err(registry::Error::Config("nested index".into())),
            }
        }
    }
}
