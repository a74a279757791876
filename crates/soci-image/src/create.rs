//! `soci create` (v1: an index beside the unchanged image, found through referrers) and
//! `soci convert` (v2: an image index that carries the annotated manifest and its SOCI index).
//!
//! Each selected manifest's large enough gzip or tar layers are fetched to a temporary file
//! (digest-verified by the store) and indexed in one streaming pass on the blocking pool, a
//! few layers at a time; each zTOC is stored as a blob, then the SOCI index manifest.

use std::sync::Arc;

use bytes::Bytes;
use convert::Store;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use registry::manifest::{self, Descriptor, Index, Manifest, ManifestKind, Platform};
use soci::BuildOptions;

use crate::manifest::{annotate_manifest, sha256_digest, IndexVersion, LayerZtoc, SociIndex, EMPTY_CONFIG};
use crate::{Error, Result};

/// Upstream's default: smaller layers are fetched whole rather than indexed.
pub const DEFAULT_MIN_LAYER_SIZE: u64 = 10 << 20;

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub span_size: u64,
    pub min_layer_size: u64,
    pub platforms: Vec<Platform>,
    pub all_platforms: bool,
    pub parallel_layers: usize,
    pub build_tool: String,
    /// Files to prefetch at mount (`--prefetch-file`): each is looked up from the topmost
    /// indexed layer down, and its spans go into that layer's prefetch artifact.
    pub prefetch_files: Vec<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            span_size: soci::DEFAULT_SPAN_SIZE,
            min_layer_size: DEFAULT_MIN_LAYER_SIZE,
            platforms: Vec::new(),
            all_platforms: false,
            parallel_layers: 2,
            build_tool: soci::ztoc::SOCI_BUILD_TOOL.to_owned(),
            prefetch_files: Vec::new(),
        }
    }
}

/// Progress, for a bar or log lines.
#[derive(Debug, Clone)]
pub enum Event {
    LayerStart { digest: String, size: u64 },
    LayerIndexed { digest: String, ztoc: String, spans: usize, files: usize, seconds: f64 },
    LayerSkipped { digest: String, reason: SkipReason },
    PrefetchStored { digest: String, artifact: String, files: usize, spans: u64 },
    IndexStored { manifest: String, index: String, platform: Option<String> },
}

/// Why a layer gets no zTOC (a bounded label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    BelowMinimumSize,
    NotGzipOrTar,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::BelowMinimumSize => "below_min_layer_size",
            SkipReason::NotGzipOrTar => "not_gzip_or_tar",
        }
    }
}

pub type Progress = Arc<dyn Fn(Event) + Send + Sync>;

/// What was made.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// (image manifest digest, SOCI index digest) per platform.
    pub indexes: Vec<(String, String)>,
    pub layers_indexed: usize,
    pub layers_skipped: usize,
    /// For `convert`: the new top-level image index.
    pub root: Option<String>,
}

/// The image manifests to index: the image itself, or the selected platforms of an index.
async fn selected(store: &Store, opts: &CreateOptions) -> Result<(ManifestKind, Vec<(Bytes, Manifest, Descriptor)>)> {
    let (bytes, root, digest) = store.root().await?;
    match &root {
        ManifestKind::Image(m) => {
            let media = m.media_type.clone().unwrap_or_else(|| manifest::OCI_MANIFEST.to_owned());
            let d = Descriptor::new(&media, digest, bytes.len() as u64);
            Ok((root.clone(), vec![(bytes, m.clone(), d)]))
        }
        ManifestKind::Index(index) => {
            let wanted: Vec<Platform> = if opts.platforms.is_empty() { vec![Platform::host()] } else { opts.platforms.clone() };
            let mut out = Vec::new();
            for d in &index.manifests {
                let pick = opts.all_platforms || d.platform.as_ref().is_some_and(|p| wanted.iter().any(|w| p.matches(w)));
                if !pick || d.artifact_type.is_some() {
                    continue;
                }
                let (b, kind) = store.manifest(&d.digest).await?;
                match kind {
                    ManifestKind::Image(m) => out.push((b, m, d.clone())),
                    ManifestKind::Index(_) => return Err(Error::Invalid(format!("{store}: nested index {} is not supported", d.digest))),
                }
            }
            if out.is_empty() {
                return Err(Error::Invalid(format!("{store}: no manifest for the wanted platforms in the index")));
            }
            Ok((root.clone(), out))
        }
    }
}

/// Whether a layer of this media type can have a zTOC (gzip or uncompressed tar): the one
/// answer for `soci create`, `lazypull mount` and the snapshotter.
pub fn indexable(media_type: &str) -> bool {
    manifest::is_gzip_layer(media_type)
        || media_type == "application/vnd.oci.image.layer.v1.tar"
        || media_type == "application/vnd.docker.image.rootfs.diff.tar"
}

/// Builds and stores the zTOCs of one manifest's layers; returns the SOCI index (no subject).
async fn index_layers(src: &Store, dst: &Store, m: &Manifest, version: IndexVersion, opts: &CreateOptions, progress: &Progress) -> Result<(SociIndex, usize)> {
    let tmp = tempfile::tempdir().map_err(|e| Error::Io { context: "creating a temporary directory".into(), source: e })?;
    let results: Vec<Option<(LayerZtoc, LayerHits)>> = stream::iter(m.layers.iter().cloned().enumerate())
        .map(|(i, layer)| {
            let dir = tmp.path().to_path_buf();
            async move {
                if !indexable(&layer.media_type) {
                    progress(Event::LayerSkipped { digest: layer.digest.clone(), reason: SkipReason::NotGzipOrTar });
                    return Ok(None);
                }
                if layer.size < opts.min_layer_size {
                    progress(Event::LayerSkipped { digest: layer.digest.clone(), reason: SkipReason::BelowMinimumSize });
                    return Ok(None);
                }
                progress(Event::LayerStart { digest: layer.digest.clone(), size: layer.size });
                let path = dir.join(format!("layer{i}"));
                src.blob_to_file(&layer.digest, &path).await?;
                let started = std::time::Instant::now();
                let build = BuildOptions { span_size: opts.span_size, build_tool: opts.build_tool.clone() };
                let ztoc = tokio::task::spawn_blocking(move || -> std::result::Result<soci::Ztoc, soci::BuildError> {
                    let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&path)?);
                    let z = soci::build_ztoc(f, &build);
                    let _ = std::fs::remove_file(&path);
                    z
                })
                .await
                .map_err(|e| Error::Invalid(format!("zTOC builder task failed: {e}")))?
                .map_err(|source| Error::Build { index: i, digest: layer.digest.clone(), source })?;
                let bytes = Bytes::from(ztoc.to_bytes());
                let hits = soci::prefetch::spans_of_files(&ztoc, &opts.prefetch_files);
                let ztoc_digest = dst.put_blob_bytes(&bytes, None).await?;
                progress(Event::LayerIndexed {
                    digest: layer.digest.clone(),
                    ztoc: ztoc_digest.clone(),
                    spans: ztoc.spans.span_count(),
                    files: ztoc.entries.len(),
                    seconds: started.elapsed().as_secs_f64(),
                });
                let z = LayerZtoc {
                    layer_digest: layer.digest.clone(),
                    layer_media_type: layer.media_type.clone(),
                    ztoc_digest,
                    ztoc_size: bytes.len() as u64,
                    span_size: opts.span_size,
                    prefetch: None,
                };
                Ok::<_, Error>(Some((z, hits)))
            }
        })
        .buffered(opts.parallel_layers.max(1))
        .try_collect()
        .await?;
    let skipped = results.iter().filter(|r| r.is_none()).count();
    let mut layers: Vec<(LayerZtoc, LayerHits)> = results.into_iter().flatten().collect();
    add_prefetch_artifacts(dst, &mut layers, &opts.prefetch_files, progress).await?;
    let ztocs: Vec<LayerZtoc> = layers.into_iter().map(|(z, _)| z).collect();
    dst.put_blob_bytes(&Bytes::from_static(EMPTY_CONFIG), None).await?;
    Ok((SociIndex { version, ztocs, subject: None, build_tool: Some(opts.build_tool.clone()) }, skipped))
}

/// Which of the prefetch files a layer holds: (position in the list, inclusive span range).
type LayerHits = Vec<(usize, (usize, usize))>;

/// Gives each file of `files` to the topmost indexed layer holding it (upstream's rule: the
/// file a container sees) and stores one prefetch artifact per layer that got any. A file no
/// indexed layer holds is an error naming it: a typo would otherwise prefetch nothing silently.
async fn add_prefetch_artifacts(dst: &Store, layers: &mut [(LayerZtoc, LayerHits)], files: &[String], progress: &Progress) -> Result<()> {
    let mut owner: Vec<Option<usize>> = vec![None; files.len()];
    for (l, (_, hits)) in layers.iter().enumerate().rev() {
        for (f, _) in hits {
            owner[*f].get_or_insert(l);
        }
    }
    if let Some(f) = owner.iter().position(Option::is_none) {
        return Err(Error::PrefetchFileNotFound(files[f].clone()));
    }
    for (l, (z, hits)) in layers.iter_mut().enumerate() {
        let mine: Vec<(usize, usize)> = hits.iter().filter(|(f, _)| owner[*f] == Some(l)).map(|(_, r)| *r).collect();
        let Some(artifact) = soci::PrefetchArtifact::from_ranges(mine.iter().copied()) else { continue };
        let bytes = Bytes::from(artifact.to_bytes());
        let digest = dst.put_blob_bytes(&bytes, None).await?;
        let spans = artifact.prefetch_spans.iter().map(|s| s.end_span - s.start_span + 1).sum();
        progress(Event::PrefetchStored { digest: z.layer_digest.clone(), artifact: digest.clone(), files: mine.len(), spans });
        z.prefetch = Some(crate::manifest::Blob { digest, size: bytes.len() as u64 });
    }
    Ok(())
}

/// `soci create`: a v1 SOCI index per selected manifest, stored beside the unchanged image
/// and registered as a referrer of it.
pub async fn create_v1(store: &Store, opts: &CreateOptions, progress: Progress) -> Result<Report> {
    let (_, manifests) = selected(store, opts).await?;
    let mut report = Report::default();
    for (_, m, desc) in manifests {
        let (mut index, skipped) = index_layers(store, store, &m, IndexVersion::V1, opts, &progress).await?;
        report.layers_indexed += index.ztocs.len();
        report.layers_skipped += skipped;
        index.subject = Some(Descriptor::new(&desc.media_type, desc.digest.clone(), desc.size));
        let bytes = index.to_bytes();
        let digest = store.put_manifest(Bytes::from(bytes.clone()), manifest::OCI_MANIFEST, false).await?;
        let index_desc = index.descriptor(&bytes, None);
        crate::referrers::register(store, &desc.digest, &index_desc).await?;
        progress(Event::IndexStored { manifest: desc.digest.clone(), index: digest.clone(), platform: desc.platform.as_ref().map(|p| p.to_string()) });
        report.indexes.push((desc.digest.clone(), digest));
    }
    Ok(report)
}

/// `soci convert`: copies the image to `dst` with a v2 SOCI index per selected manifest,
/// under a new image index (the image's layers and config are unchanged).
pub async fn convert_v2(src: &Store, dst: &Store, opts: &CreateOptions, progress: Progress) -> Result<Report> {
    let (root, manifests) = selected(src, opts).await?;
    let mut report = Report::default();
    let mut entries = Vec::new();
    let tmp = tempfile::tempdir().map_err(|e| Error::Io { context: "creating a temporary directory".into(), source: e })?;
    for (_, m, desc) in manifests {
        for blob in std::iter::once(&m.config).chain(&m.layers) {
            let path = tmp.path().join("blob");
            let n = src.blob_to_file(&blob.digest, &path).await?;
            dst.put_blob_file(&blob.digest, n, &path, Some(src)).await?;
        }
        let (index, skipped) = index_layers(src, dst, &m, IndexVersion::V2, opts, &progress).await?;
        report.layers_indexed += index.ztocs.len();
        report.layers_skipped += skipped;
        let index_bytes = index.to_bytes();
        let index_digest = sha256_digest(&index_bytes);
        let annotated = annotate_manifest(&m, &index_digest);
        let annotated_bytes = serde_json::to_vec(&annotated).expect("a manifest serialises");
        let annotated_digest = sha256_digest(&annotated_bytes);
        dst.put_manifest(Bytes::from(index_bytes.clone()), manifest::OCI_MANIFEST, false).await?;
        let media = m.media_type.clone().unwrap_or_else(|| manifest::OCI_MANIFEST.to_owned());
        dst.put_manifest(Bytes::from(annotated_bytes.clone()), &media, false).await?;
        let platform = match &desc.platform {
            Some(p) => Some(p.clone()),
            None => config_platform(src, &m).await?,
        };
        let mut image_desc = Descriptor::new(&media, annotated_digest.clone(), annotated_bytes.len() as u64);
        image_desc.annotations = desc.annotations.clone();
        image_desc.annotations.insert(crate::manifest::INDEX_DIGEST.to_owned(), index_digest.clone());
        image_desc.platform = platform.clone();
        let mut index_desc = index.descriptor(&index_bytes, Some(&annotated_digest));
        index_desc.platform = platform.clone();
        progress(Event::IndexStored { manifest: annotated_digest.clone(), index: index_digest.clone(), platform: platform.as_ref().map(|p| p.to_string()) });
        report.indexes.push((annotated_digest, index_digest));
        entries.push(image_desc);
        entries.push(index_desc);
    }
    let mut new_index = match root {
        ManifestKind::Index(i) => Index { manifests: Vec::new(), ..i },
        ManifestKind::Image(_) => Index {
            schema_version: 2,
            media_type: None,
            artifact_type: None,
            manifests: Vec::new(),
            subject: None,
            annotations: Default::default(),
            extra: Default::default(),
        },
    };
    new_index.media_type = Some(manifest::OCI_INDEX.to_owned());
    new_index.manifests = entries;
    let bytes = Bytes::from(serde_json::to_vec(&new_index).expect("an index serialises"));
    report.root = Some(dst.put_manifest(bytes, manifest::OCI_INDEX, true).await?);
    Ok(report)
}

/// The platform an image's config declares (for an image that was not in an index).
async fn config_platform(store: &Store, m: &Manifest) -> Result<Option<Platform>> {
    let config = store.blob_bytes(&m.config.digest).await?;
    let v: serde_json::Value = serde_json::from_slice(&config).map_err(|e| Error::Invalid(format!("config {} is not JSON: {e}", m.config.digest)))?;
    let (Some(os), Some(arch)) = (v["os"].as_str(), v["architecture"].as_str()) else {
        return Ok(None);
    };
    let mut spec = format!("{os}/{arch}");
    if let Some(variant) = v["variant"].as_str() {
        spec.push('/');
        spec.push_str(variant);
    }
    Ok(Platform::parse(&spec).ok())
}
