//! One answer to "is this layer lazy, and how is its index checked?" for every caller: image
//! conversion and inspection, `lazypull mount`, the snapshotter (and its metrics).
//!
//! Why a crate of its own: the decision used to be made in four places that disagreed (two
//! accepted zstd:chunked layers, two only the stargz TOC-digest annotation), so a zstd:chunked
//! image we converted showed as lazy in `image inspect` but fell back in the snapshotter. It is
//! also the start of the format seam (ARCHITECTURE.md): each lazy format names the annotations
//! that make a layer lazy and the digest that authenticates its index, and a layer that is not
//! lazy gets a typed [`NotLazy`] reason whose [`NotLazy::label`] is a bounded metric label.
//!
//! Annotations: eStargz layers carry `containerd.io/snapshot/stargz/toc.digest` (sha256 of the
//! uncompressed TOC JSON). zstd:chunked layers carry `io.containers.zstd-chunked.manifest-checksum`
//! (sha256 of the *compressed* TOC, as containers/storage writes it) and, when written by
//! ctr-remote or by us, the stargz TOC digest too — the Go stargz-snapshotter keys on that one.
//! Either is accepted; when both are present the TOC digest is used.

mod open;

pub use open::{fetch_index, format_for, open, open_ztoc, LazyFormat, OpenError, OpenOptions, OpenedIndex, Stargz};

use std::collections::BTreeMap;
use std::fmt;

use estargz::toc::{TOC_DIGEST_ANNOTATION, ZSTD_MANIFEST_CHECKSUM_ANNOTATION};
use estargz::Digest;

/// The lazy formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Estargz,
    ZstdChunked,
    /// An unmodified gzip or tar layer with a SOCI zTOC (found beside the image, not in it).
    Soci,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Estargz => "eStargz",
            Format::ZstdChunked => "zstd:chunked",
            Format::Soci => "SOCI",
        })
    }
}

/// What authenticates a lazy layer's index (checked when the layer is opened).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IndexCheck {
    /// sha256 of the uncompressed TOC JSON (`…/stargz/toc.digest`).
    TocDigest(Digest),
    /// sha256 of the compressed zstd:chunked manifest (`…zstd-chunked.manifest-checksum`).
    ZstdManifestChecksum(Digest),
    /// sha256 of a SOCI zTOC blob (its descriptor's digest in the SOCI index), and of the
    /// layer's prefetch artifact when the index has one (a best-effort hint: see
    /// [`open_ztoc`]).
    SociZtoc(Digest, Option<Digest>),
}

const ZSTD_CHECK_PREFIX: &str = "zstd-manifest-checksum:";
const SOCI_CHECK_PREFIX: &str = "soci-ztoc:";
const SOCI_PREFETCH_PREFIX: &str = ",soci-prefetch:";

impl fmt::Display for IndexCheck {
    /// `sha256:…` for a TOC digest (what older records hold), `zstd-manifest-checksum:sha256:…`
    /// otherwise; [`IndexCheck::parse`] reads both back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IndexCheck::TocDigest(d) => write!(f, "{d}"),
            IndexCheck::ZstdManifestChecksum(d) => write!(f, "{ZSTD_CHECK_PREFIX}{d}"),
            IndexCheck::SociZtoc(d, None) => write!(f, "{SOCI_CHECK_PREFIX}{d}"),
            IndexCheck::SociZtoc(d, Some(p)) => write!(f, "{SOCI_CHECK_PREFIX}{d}{SOCI_PREFETCH_PREFIX}{p}"),
        }
    }
}

impl IndexCheck {
    pub fn parse(s: &str) -> Result<IndexCheck, NotLazy> {
        let bad = || NotLazy::BadAnnotation { key: "index check".into(), value: s.into() };
        if let Some(rest) = s.strip_prefix(SOCI_CHECK_PREFIX) {
            let (ztoc, prefetch) = match rest.split_once(SOCI_PREFETCH_PREFIX) {
                Some((z, p)) => (z, Some(p.parse().map_err(|_| bad())?)),
                None => (rest, None),
            };
            return ztoc.parse().map(|z| IndexCheck::SociZtoc(z, prefetch)).map_err(|_| bad());
        }
        match s.strip_prefix(ZSTD_CHECK_PREFIX) {
            Some(d) => d.parse().map(IndexCheck::ZstdManifestChecksum).map_err(|_| bad()),
            None => s.parse().map(IndexCheck::TocDigest).map_err(|_| bad()),
        }
    }

    /// The check of a SOCI layer from the digests its SOCI index gives (zTOC, prefetch
    /// artifact), as text. A prefetch digest that is not a sha256 digest is a hint left out.
    pub fn soci(ztoc: &str, prefetch: Option<&str>) -> Result<IndexCheck, NotLazy> {
        let z = ztoc.parse::<Digest>().map_err(|_| NotLazy::IndexUnusable(format!("zTOC digest {ztoc:?}")))?;
        Ok(IndexCheck::SociZtoc(z, prefetch.and_then(|p| p.parse().ok())))
    }

    /// The blobs beside the image this check names (a SOCI layer's zTOC and prefetch
    /// artifact), which a node keeps cached under their digests while the layer is in use.
    pub fn side_blobs(&self) -> Vec<Digest> {
        match self {
            IndexCheck::SociZtoc(z, p) => std::iter::once(*z).chain(*p).collect(),
            IndexCheck::TocDigest(_) | IndexCheck::ZstdManifestChecksum(_) => Vec::new(),
        }
    }

    /// Checks the index of an opened layer: `toc_digest` is the sha256 of its uncompressed TOC,
    /// `compressed_toc_digest` that of the TOC as stored in the blob.
    pub fn verify(&self, toc_digest: &Digest, compressed_toc_digest: &Digest) -> Result<(), String> {
        let (want, got, what) = match self {
            IndexCheck::TocDigest(d) => (d, toc_digest, "TOC digest"),
            IndexCheck::ZstdManifestChecksum(d) => (d, compressed_toc_digest, "zstd:chunked manifest checksum"),
            IndexCheck::SociZtoc(d, _) => (d, toc_digest, "zTOC digest"),
        };
        if want == got {
            Ok(())
        } else {
            Err(format!("{what} mismatch: the layer's annotation says {want}, its index has {got}"))
        }
    }
}

/// A layer that can be served lazily.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LazyLayer {
    pub format: Format,
    pub check: IndexCheck,
}

/// Why a layer is not served lazily. [`NotLazy::label`] is the metric label (bounded); the
/// `Display` text is for logs and names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotLazy {
    #[error("not a lazy layer: {media_type} layer without a {TOC_DIGEST_ANNOTATION} or {ZSTD_MANIFEST_CHECKSUM_ANNOTATION} annotation (convert it with `lazypull image convert`)")]
    NoIndex { media_type: String },
    #[error("annotation {key} has a malformed value {value:?}")]
    BadAnnotation { key: String, value: String },
    #[error("layer {digest} is not in the manifest of {image}")]
    NotInManifest { image: String, digest: String },
    #[error("registry unreachable: {0}")]
    RegistryUnreachable(String),
    #[error("registry: {0}")]
    Registry(String),
    #[error("index unusable: {0}")]
    IndexUnusable(String),
    #[error("mount failed: {0}")]
    MountFailed(String),
    /// A gzip/tar layer of an image with a SOCI index that has no zTOC for it (upstream skips
    /// layers below its minimum size): fetched whole, as SOCI does.
    #[error("no zTOC for this layer in SOCI index {index} (below the index's minimum layer size?)")]
    NoZtoc { index: String },
}

impl NotLazy {
    /// The reason as a metric label: one of a fixed set.
    pub fn label(&self) -> &'static str {
        match self {
            NotLazy::NoIndex { .. } => "no_lazy_index",
            NotLazy::BadAnnotation { .. } => "bad_annotation",
            NotLazy::NotInManifest { .. } => "not_in_manifest",
            NotLazy::RegistryUnreachable(_) => "registry_unreachable",
            NotLazy::Registry(_) => "registry_error",
            NotLazy::IndexUnusable(_) => "index_unusable",
            NotLazy::MountFailed(_) => "mount_failed",
            NotLazy::NoZtoc { .. } => "soci_no_ztoc",
        }
    }
}

/// Whether (and how) a layer with this media type and these annotations (manifest annotations,
/// or snapshot labels carrying them) is lazily servable.
pub fn detect(media_type: &str, annotations: &BTreeMap<String, String>) -> Result<LazyLayer, NotLazy> {
    let zstd = media_type.contains("zstd") || annotations.contains_key(ZSTD_MANIFEST_CHECKSUM_ANNOTATION);
    let format = if zstd { Format::ZstdChunked } else { Format::Estargz };
    let digest = |key: &str| -> Option<Result<Digest, NotLazy>> {
        annotations.get(key).map(|v| v.parse::<Digest>().map_err(|_| NotLazy::BadAnnotation { key: key.into(), value: v.clone() }))
    };
    if let Some(d) = digest(TOC_DIGEST_ANNOTATION) {
        return Ok(LazyLayer { format, check: IndexCheck::TocDigest(d?) });
    }
    if let Some(d) = digest(ZSTD_MANIFEST_CHECKSUM_ANNOTATION) {
        return Ok(LazyLayer { format: Format::ZstdChunked, check: IndexCheck::ZstdManifestChecksum(d?) });
    }
    Err(NotLazy::NoIndex { media_type: media_type.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn either_annotation_makes_a_layer_lazy_and_the_toc_digest_wins() {
        let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
        let zst = "application/vnd.oci.image.layer.v1.tar+zstd";
        assert_eq!(detect(gz, &ann(&[(TOC_DIGEST_ANNOTATION, D1)])).unwrap(), LazyLayer { format: Format::Estargz, check: IndexCheck::TocDigest(D1.parse().unwrap()) });
        assert_eq!(detect(zst, &ann(&[(ZSTD_MANIFEST_CHECKSUM_ANNOTATION, D2)])).unwrap(), LazyLayer { format: Format::ZstdChunked, check: IndexCheck::ZstdManifestChecksum(D2.parse().unwrap()) });
        let both = detect(zst, &ann(&[(ZSTD_MANIFEST_CHECKSUM_ANNOTATION, D2), (TOC_DIGEST_ANNOTATION, D1)])).unwrap();
        assert_eq!(both, LazyLayer { format: Format::ZstdChunked, check: IndexCheck::TocDigest(D1.parse().unwrap()) });
    }

    #[test]
    fn reasons_are_typed_with_bounded_labels() {
        let e = detect("application/vnd.docker.image.rootfs.diff.tar.gzip", &ann(&[])).unwrap_err();
        assert_eq!(e.label(), "no_lazy_index");
        assert!(e.to_string().contains("diff.tar.gzip"), "{e}");
        let e = detect("x", &ann(&[(TOC_DIGEST_ANNOTATION, "sha256:nothex")])).unwrap_err();
        assert_eq!(e.label(), "bad_annotation");
        assert!(e.to_string().contains("sha256:nothex"), "{e}");
    }

    #[test]
    fn checks_round_trip_through_their_text() {
        for c in [IndexCheck::TocDigest(D1.parse().unwrap()), IndexCheck::ZstdManifestChecksum(D2.parse().unwrap()), IndexCheck::SociZtoc(D1.parse().unwrap(), None), IndexCheck::SociZtoc(D1.parse().unwrap(), Some(D2.parse().unwrap()))] {
            assert_eq!(IndexCheck::parse(&c.to_string()).unwrap(), c);
        }
        // Records written before zstd-only layers existed hold a bare TOC digest.
        assert_eq!(IndexCheck::parse(D1).unwrap(), IndexCheck::TocDigest(D1.parse().unwrap()));
        let (a, b): (Digest, Digest) = (D1.parse().unwrap(), D2.parse().unwrap());
        assert!(IndexCheck::TocDigest(a).verify(&a, &b).is_ok());
        assert!(IndexCheck::ZstdManifestChecksum(b).verify(&a, &b).is_ok());
        assert!(IndexCheck::ZstdManifestChecksum(a).verify(&a, &b).unwrap_err().contains("manifest checksum mismatch"));
    }
}
