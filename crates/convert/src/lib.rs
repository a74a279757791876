//! Whole-image conversion to eStargz or zstd:chunked, without a container daemon.
//!
//! `SRC` and `DST` are registries or OCI layouts ([`store::Store`]). For each selected platform
//! the image's layers are fetched to temporary files (digest-verified), converted with the
//! format crate (all cores, output independent of the thread count) and stored; layers that are
//! already eStargz are kept as they are. The config's `rootfs.diff_ids` is rewritten, the new
//! manifest uses OCI media types with the layer annotations the snapshotter needs, and an index
//! stays an index. Unknown manifest fields and annotations are carried over.
//!
//! Layers are processed a few at a time ([`ConvertOptions::parallel_layers`]): one conversion
//! already saturates the CPUs, the overlap hides download and upload time.

pub mod error;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use estargz::toc::{TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION, ZSTD_MANIFEST_CHECKSUM_ANNOTATION, ZSTD_MANIFEST_POSITION_ANNOTATION};
use estargz::{BuildOptions, Compression};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use registry::manifest::{self, Descriptor, Index, Manifest, ManifestKind, Platform};

pub use error::{Error, Result};
pub use store::{parse_location, Store};

/// What to produce.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub compression: Compression,
    pub chunk_size: u64,
    pub level: Option<u32>,
    pub prioritized: Vec<String>,
    /// Platforms to convert from an index; empty = this host's.
    pub platforms: Vec<Platform>,
    pub all_platforms: bool,
    pub parallel_layers: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            compression: Compression::Gzip,
            chunk_size: estargz::toc::DEFAULT_CHUNK_SIZE,
            level: None,
            prioritized: Vec::new(),
            platforms: Vec::new(),
            all_platforms: false,
            parallel_layers: 2,
        }
    }
}

/// Progress events, for a progress bar or log lines.
#[derive(Debug, Clone)]
pub enum Event {
    LayerStart { digest: String, size: u64 },
    LayerFetched { digest: String },
    LayerConverted { digest: String, new_digest: String, uncompressed: u64, size: u64, seconds: f64 },
    LayerKept { digest: String, reason: String },
    LayerStored { digest: String },
    ManifestStored { digest: String, platform: Option<String> },
}

pub type Progress = Arc<dyn Fn(Event) + Send + Sync>;

/// What a conversion produced.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub digest: String,
    pub manifests: usize,
    pub layers_converted: usize,
    pub layers_kept: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Whether a layer descriptor is already lazily pullable (the decision every caller shares).
pub fn is_lazy_layer(d: &Descriptor) -> bool {
    layer::detect(&d.media_type, &d.annotations).is_ok()
}

/// Converts the image at `src` and stores it at `dst`.
pub async fn convert_image(src: &Store, dst: &Store, opts: &ConvertOptions, progress: Progress) -> Result<Report> {
    let (_, root, _) = src.root().await?;
    let mut report = Report::default();
    match root {
        ManifestKind::Image(m) => {
            let (bytes, _) = convert_manifest(src, dst, &m, opts, &progress, &mut report).await?;
            report.digest = dst.put_manifest(bytes, manifest::OCI_MANIFEST, true).await?;
            report.manifests = 1;
            progress(Event::ManifestStored { digest: report.digest.clone(), platform: None });
        }
        ManifestKind::Index(index) => {
            let wanted: Vec<Platform> = if opts.platforms.is_empty() { vec![Platform::host()] } else { opts.platforms.clone() };
            let selected: Vec<&Descriptor> = index
                .manifests
                .iter()
                .filter(|d| opts.all_platforms || d.platform.as_ref().is_some_and(|p| wanted.iter().any(|w| p.matches(w))))
                .collect();
            if selected.is_empty() {
                return Err(Error::Invalid(format!(
                    "{src}: no manifest for {} in the index (available: {})",
                    wanted.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "),
                    index.manifests.iter().filter_map(|d| d.platform.as_ref().map(|p| p.to_string())).collect::<Vec<_>>().join(", ")
                )));
            }
            let mut out = Vec::new();
            for d in selected {
                let (_, kind) = src.manifest(&d.digest).await?;
                let ManifestKind::Image(m) = kind else {
                    return Err(Error::Invalid(format!("{src}: nested index {} is not supported", d.digest)));
                };
                let (bytes, _) = convert_manifest(src, dst, &m, opts, &progress, &mut report).await?;
                let len = bytes.len() as u64;
                let digest = dst.put_manifest(bytes, manifest::OCI_MANIFEST, false).await?;
                progress(Event::ManifestStored { digest: digest.clone(), platform: d.platform.as_ref().map(|p| p.to_string()) });
                let mut nd = Descriptor::new(manifest::OCI_MANIFEST, digest, len);
                nd.platform = d.platform.clone();
                nd.annotations = d.annotations.clone();
                out.push(nd);
                report.manifests += 1;
            }
            let new_index = Index {
                schema_version: 2,
                media_type: Some(manifest::OCI_INDEX.into()),
                manifests: out,
                ..index.clone()
            };
            let bytes = Bytes::from(serde_json::to_vec(&new_index).expect("index serializes"));
            report.digest = dst.put_manifest(bytes, manifest::OCI_INDEX, true).await?;
        }
    }
    Ok(report)
}

struct LayerOut {
    desc: Descriptor,
    diff_id: Option<String>,
    converted: bool,
    bytes_in: u64,
}

async fn convert_manifest(src: &Store, dst: &Store, m: &Manifest, opts: &ConvertOptions, progress: &Progress, report: &mut Report) -> Result<(Bytes, String)> {
    let config_bytes = src.blob_bytes(&m.config.digest).await?;
    let mut config: serde_json::Value =
        serde_json::from_slice(&config_bytes).map_err(|e| Error::Invalid(format!("image config {} is not JSON: {e}", m.config.digest)))?;
    let layers: Vec<LayerOut> = stream::iter(m.layers.iter().cloned().enumerate())
        .map(|(i, d)| {
            let progress = progress.clone();
            async move { convert_layer(src, dst, i, d, opts, &progress).await }
        })
        .buffered(opts.parallel_layers.max(1))
        .try_collect()
        .await?;

    // Rewrite diff_ids of converted layers (position i of rootfs.diff_ids is layer i).
    let diff_ids = config
        .get_mut("rootfs")
        .and_then(|r| r.get_mut("diff_ids"))
        .and_then(|d| d.as_array_mut())
        .ok_or_else(|| Error::Invalid(format!("image config {} has no rootfs.diff_ids", m.config.digest)))?;
    if diff_ids.len() != layers.len() {
        return Err(Error::Invalid(format!(
            "image config {} lists {} diff_ids for {} layers",
            m.config.digest,
            diff_ids.len(),
            layers.len()
        )));
    }
    for (i, l) in layers.iter().enumerate() {
        if let Some(d) = &l.diff_id {
            diff_ids[i] = serde_json::Value::String(d.clone());
        }
        report.bytes_in += l.bytes_in;
        report.bytes_out += l.desc.size;
        if l.converted {
            report.layers_converted += 1;
        } else {
            report.layers_kept += 1;
        }
    }
    let new_config = Bytes::from(serde_json::to_vec(&config).expect("config serializes"));
    let config_digest = dst.put_blob_bytes(&new_config, Some(src)).await?;
    let mut cfg_desc = Descriptor::new(manifest::OCI_CONFIG, config_digest, new_config.len() as u64);
    cfg_desc.annotations = m.config.annotations.clone();
    let new = Manifest {
        schema_version: 2,
        media_type: Some(manifest::OCI_MANIFEST.into()),
        config: cfg_desc,
        layers: layers.into_iter().map(|l| l.desc).collect(),
        ..m.clone()
    };
    let bytes = Bytes::from(serde_json::to_vec(&new).expect("manifest serializes"));
    let digest = format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)));
    Ok((bytes, digest))
}

async fn convert_layer(src: &Store, dst: &Store, index: usize, d: Descriptor, opts: &ConvertOptions, progress: &Progress) -> Result<LayerOut> {
    progress(Event::LayerStart { digest: d.digest.clone(), size: d.size });
    let keep = |reason: &str| {
        progress(Event::LayerKept { digest: d.digest.clone(), reason: reason.to_string() });
    };
    let wanted = match opts.compression {
        Compression::Gzip => layer::Format::Estargz,
        Compression::Zstd => layer::Format::ZstdChunked,
    };
    let already = layer::detect(&d.media_type, &d.annotations).is_ok_and(|l| l.format == wanted);
    let foreign = d.media_type == manifest::DOCKER_FOREIGN_LAYER || !d.urls.is_empty();
    let tmp = tempfile::tempdir().map_err(|e| Error::Io { context: "creating a temporary directory".into(), source: e })?;
    let input = tmp.path().join("in");
    if already || foreign {
        if foreign {
            keep("foreign layer (not distributable); left as is");
            return Ok(LayerOut { desc: d, diff_id: None, converted: false, bytes_in: 0 });
        }
        keep("already lazily pullable");
        let n = src.blob_to_file(&d.digest, &input).await?;
        dst.put_blob_file(&d.digest, n, &input, Some(src)).await?;
        progress(Event::LayerStored { digest: d.digest.clone() });
        return Ok(LayerOut { desc: Descriptor { media_type: oci_media_type(&d.media_type), ..d }, diff_id: None, converted: false, bytes_in: n });
    }
    let n = src.blob_to_file(&d.digest, &input).await?;
    progress(Event::LayerFetched { digest: d.digest.clone() });
    let output = tmp.path().join("out");
    let build = BuildOptions {
        compression: opts.compression,
        chunk_size: opts.chunk_size,
        level: opts.level,
        prioritized: opts.prioritized.clone(),
        threads: 0,
        tmp_dir: Some(tmp.path().to_path_buf()),
    };
    let started = std::time::Instant::now();
    let (inp, outp) = (input.clone(), output.clone());
    let res = tokio::task::spawn_blocking(move || -> Result<estargz::BuildResult> {
        let i = std::fs::File::open(&inp).map_err(|e| Error::Io { context: format!("opening {}", inp.display()), source: e })?;
        let o = std::fs::File::create(&outp).map_err(|e| Error::Io { context: format!("creating {}", outp.display()), source: e })?;
        Ok(estargz::build(std::io::BufReader::with_capacity(1 << 20, i), std::io::BufWriter::with_capacity(1 << 20, o), &build)?)
    })
    .await
    .map_err(|e| Error::Invalid(format!("conversion task failed: {e}")))?
    .map_err(|e| match e {
        Error::Format(f) => Error::Layer { index, digest: d.digest.clone(), source: f },
        other => other,
    })?;
    progress(Event::LayerConverted {
        digest: d.digest.clone(),
        new_digest: res.blob_digest.to_string(),
        uncompressed: res.uncompressed_size,
        size: res.blob_size,
        seconds: started.elapsed().as_secs_f64(),
    });
    let digest = res.blob_digest.to_string();
    dst.put_blob_file(&digest, res.blob_size, &output, None).await?;
    progress(Event::LayerStored { digest: digest.clone() });
    let mut annotations: BTreeMap<String, String> = d.annotations.clone();
    annotations.insert(UNCOMPRESSED_SIZE_ANNOTATION.into(), res.uncompressed_size.to_string());
    let media_type = match opts.compression {
        Compression::Gzip => {
            annotations.insert(TOC_DIGEST_ANNOTATION.into(), res.toc_digest.to_string());
            manifest::OCI_LAYER_GZIP
        }
        Compression::Zstd => {
            let (sum, pos) = res.zstd_manifest.clone().expect("zstd build reports its manifest");
            annotations.insert(ZSTD_MANIFEST_CHECKSUM_ANNOTATION.into(), sum.to_string());
            annotations.insert(ZSTD_MANIFEST_POSITION_ANNOTATION.into(), pos);
            // Also the stargz TOC digest, as ctr-remote writes it: the Go stargz-snapshotter
            // keys on it, and with it a layer is checked by its uncompressed TOC.
            annotations.insert(TOC_DIGEST_ANNOTATION.into(), res.toc_digest.to_string());
            manifest::OCI_LAYER_ZSTD
        }
    };
    let mut desc = Descriptor::new(media_type, digest, res.blob_size);
    desc.annotations = annotations;
    Ok(LayerOut { desc, diff_id: Some(res.diff_id.to_string()), converted: true, bytes_in: n })
}

fn oci_media_type(mt: &str) -> String {
    match mt {
        manifest::DOCKER_LAYER_GZIP => manifest::OCI_LAYER_GZIP.into(),
        other => other.into(),
    }
}

/// Copies an image unchanged (same manifest bytes, so the same digests): every platform of an
/// index, config and layers by digest. Blobs go through a temporary file each.
pub async fn copy_image(src: &Store, dst: &Store) -> Result<String> {
    let (bytes, root, _) = src.root().await?;
    let tmp = tempfile::tempdir().map_err(|e| Error::Io { context: "creating a temporary directory".into(), source: e })?;
    let copy_manifest = |m: Manifest| {
        let tmp = tmp.path().to_path_buf();
        async move {
            for blob in std::iter::once(&m.config).chain(&m.layers) {
                let path = tmp.join("blob");
                let n = src.blob_to_file(&blob.digest, &path).await?;
                dst.put_blob_file(&blob.digest, n, &path, Some(src)).await?;
            }
            Ok::<_, Error>(())
        }
    };
    match root {
        ManifestKind::Image(m) => {
            let media = m.media_type.clone().unwrap_or_else(|| manifest::OCI_MANIFEST.to_owned());
            copy_manifest(m).await?;
            dst.put_manifest(bytes, &media, true).await
        }
        ManifestKind::Index(index) => {
            for d in &index.manifests {
                let (child, kind) = src.manifest(&d.digest).await?;
                match kind {
                    ManifestKind::Image(m) => copy_manifest(m).await?,
                    ManifestKind::Index(_) => return Err(Error::Invalid(format!("{src}: nested index {} is not supported", d.digest))),
                }
                dst.put_manifest(child, &d.media_type, false).await?;
            }
            let media = index.media_type.clone().unwrap_or_else(|| manifest::OCI_INDEX.to_owned());
            dst.put_manifest(bytes, &media, true).await
        }
    }
}
