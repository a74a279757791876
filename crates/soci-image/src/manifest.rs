//! SOCI index manifests: the OCI documents that tie zTOCs to an image's layers.
//!
//! A SOCI index is an OCI image manifest whose config is the empty `{}` blob typed
//! `application/vnd.amazon.soci.index.v{1,2}+json` and whose layers are the zTOC blobs, each
//! annotated with the image layer it indexes. Version 1 points at the image with `subject` and
//! is found through the referrers API (or its fallback tag); version 2 has no subject and is
//! found the other way round: the image manifest carries `com.amazon.soci.index-digest` and
//! the image index lists both, the SOCI index descriptor annotated with
//! `com.amazon.soci.image-manifest-digest`. The layout of every document (key order included)
//! follows what the SOCI project writes, so the same zTOCs give the same digests.

use std::collections::BTreeMap;

use registry::manifest::{Descriptor, Manifest, OCI_MANIFEST};
use sha2::{Digest as _, Sha256};

pub const INDEX_V1_TYPE: &str = "application/vnd.amazon.soci.index.v1+json";
pub const INDEX_V2_TYPE: &str = "application/vnd.amazon.soci.index.v2+json";
pub const ZTOC_MEDIA_TYPE: &str = "application/octet-stream";
pub const LAYER_DIGEST: &str = "com.amazon.soci.image-layer-digest";
pub const LAYER_MEDIA_TYPE: &str = "com.amazon.soci.image-layer-mediaType";
pub const SPAN_SIZE: &str = "com.amazon.soci.span-size";
pub const BUILD_TOOL: &str = "com.amazon.soci.build-tool-identifier";
pub const INDEX_DIGEST: &str = "com.amazon.soci.index-digest";
pub const IMAGE_MANIFEST_DIGEST: &str = "com.amazon.soci.image-manifest-digest";
/// The largest prefetch artifact an index may name (a span range is ~40 bytes of JSON; a
/// layer has at most a few thousand spans).
pub const MAX_PREFETCH_ARTIFACT: u64 = 1 << 20;
/// The config blob of every SOCI index.
pub const EMPTY_CONFIG: &[u8] = b"{}";

/// Which SOCI index format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexVersion {
    V1,
    V2,
}

impl IndexVersion {
    pub fn artifact_type(self) -> &'static str {
        match self {
            IndexVersion::V1 => INDEX_V1_TYPE,
            IndexVersion::V2 => INDEX_V2_TYPE,
        }
    }
}

/// One indexed layer: the image layer, the zTOC blob for it, and its prefetch artifact if the
/// index has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerZtoc {
    pub layer_digest: String,
    pub layer_media_type: String,
    pub ztoc_digest: String,
    pub ztoc_size: u64,
    pub span_size: u64,
    pub prefetch: Option<Blob>,
}

/// A blob an index points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
}

/// A SOCI index, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SociIndex {
    pub version: IndexVersion,
    pub ztocs: Vec<LayerZtoc>,
    pub subject: Option<Descriptor>,
    pub build_tool: Option<String>,
}

/// A document that is not a usable SOCI index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SOCI index {digest}: {reason}")]
pub struct BadIndex {
    pub digest: String,
    pub reason: String,
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl SociIndex {
    /// The index manifest document: the zTOCs in layer order, then the prefetch artifacts in
    /// the same order (upstream's layout).
    pub fn to_manifest(&self) -> Manifest {
        let config = Descriptor::new(self.version.artifact_type(), sha256_digest(EMPTY_CONFIG), EMPTY_CONFIG.len() as u64);
        let ztocs = self.ztocs.iter().map(|z| {
            let mut d = Descriptor::new(ZTOC_MEDIA_TYPE, z.ztoc_digest.clone(), z.ztoc_size);
            d.annotations = BTreeMap::from([
                (LAYER_DIGEST.to_owned(), z.layer_digest.clone()),
                (LAYER_MEDIA_TYPE.to_owned(), z.layer_media_type.clone()),
                (SPAN_SIZE.to_owned(), z.span_size.to_string()),
            ]);
            d
        });
        let prefetches = self.ztocs.iter().filter_map(|z| {
            let p = z.prefetch.as_ref()?;
            let mut d = Descriptor::new(soci::PREFETCH_MEDIA_TYPE, p.digest.clone(), p.size);
            d.annotations = BTreeMap::from([(LAYER_DIGEST.to_owned(), z.layer_digest.clone())]);
            Some(d)
        });
        let layers = ztocs.chain(prefetches).collect();
        let mut annotations = BTreeMap::new();
        if let Some(tool) = &self.build_tool {
            annotations.insert(BUILD_TOOL.to_owned(), tool.clone());
        }
        Manifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.to_owned()),
            artifact_type: None,
            config,
            layers,
            subject: self.subject.clone(),
            annotations,
            extra: BTreeMap::new(),
        }
    }

    /// The index manifest's bytes, as stored and hashed.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_manifest()).expect("a manifest serialises")
    }

    /// The descriptor other documents use to point at this index (`bytes` = [`Self::to_bytes`]).
    /// A v2 index's descriptor names the image manifest it belongs to.
    pub fn descriptor(&self, bytes: &[u8], image_manifest: Option<&str>) -> Descriptor {
        let mut d = Descriptor::new(OCI_MANIFEST, sha256_digest(bytes), bytes.len() as u64);
        d.artifact_type = Some(self.version.artifact_type().to_owned());
        if let (IndexVersion::V2, Some(m)) = (self.version, image_manifest) {
            d.annotations.insert(IMAGE_MANIFEST_DIGEST.to_owned(), m.to_owned());
        }
        d
    }

    /// Reads a SOCI index manifest; `digest` names it in errors.
    pub fn parse(bytes: &[u8], digest: &str) -> Result<SociIndex, BadIndex> {
        let bad = |reason: String| BadIndex { digest: digest.to_owned(), reason };
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(format!("not an OCI manifest: {e}")))?;
        let kind = m.artifact_type.as_deref().unwrap_or(&m.config.media_type);
        let version = match kind {
            INDEX_V1_TYPE => IndexVersion::V1,
            INDEX_V2_TYPE => IndexVersion::V2,
            other => return Err(bad(format!("artifact type {other:?} is not a SOCI index"))),
        };
        let mut ztocs: Vec<LayerZtoc> = Vec::new();
        let mut prefetches = Vec::new();
        for (i, l) in m.layers.iter().enumerate() {
            let get = |key: &str| l.annotations.get(key).cloned().ok_or_else(|| bad(format!("zTOC {i} ({}) has no {key}", l.digest)));
            if l.media_type == soci::PREFETCH_MEDIA_TYPE {
                // A hint: one without its layer, or implausibly large, is left out (below).
                if let (Some(layer), true) = (l.annotations.get(LAYER_DIGEST), l.size <= MAX_PREFETCH_ARTIFACT) {
                    prefetches.push((layer.clone(), Blob { digest: l.digest.clone(), size: l.size }));
                }
                continue;
            }
            let span_size = get(SPAN_SIZE)?.parse().map_err(|_| bad(format!("zTOC {i} ({}) has a bad {SPAN_SIZE}", l.digest)))?;
            ztocs.push(LayerZtoc {
                layer_digest: get(LAYER_DIGEST)?,
                layer_media_type: get(LAYER_MEDIA_TYPE)?,
                ztoc_digest: l.digest.clone(),
                ztoc_size: l.size,
                span_size,
                prefetch: None,
            });
        }
        // Prefetch artifacts are hints (upstream's are experimental): one for a layer without a
        // zTOC has nothing to name spans of, and of two for one layer the first is used; neither
        // makes the index unusable. A layer digest that appears twice gets it on every copy.
        for (layer, blob) in prefetches {
            for z in ztocs.iter_mut().filter(|z| z.layer_digest == layer && z.prefetch.is_none()) {
                z.prefetch = Some(blob.clone());
            }
        }
        Ok(SociIndex { version, ztocs, subject: m.subject, build_tool: m.annotations.get(BUILD_TOOL).cloned() })
    }

    /// The zTOC for an image layer, if this index has one.
    pub fn ztoc_for(&self, layer_digest: &str) -> Option<&LayerZtoc> {
        self.ztocs.iter().find(|z| z.layer_digest == layer_digest)
    }
}

/// A v2 image manifest: the original with `com.amazon.soci.index-digest` added.
pub fn annotate_manifest(original: &Manifest, index_digest: &str) -> Manifest {
    let mut m = original.clone();
    m.annotations.insert(INDEX_DIGEST.to_owned(), index_digest.to_owned());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rejects_other_artifacts_and_missing_annotations() {
        let idx = SociIndex {
            version: IndexVersion::V1,
            ztocs: vec![LayerZtoc {
                layer_digest: "sha256:aa".into(),
                layer_media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                ztoc_digest: "sha256:bb".into(),
                ztoc_size: 3,
                span_size: 4 << 20,
                prefetch: None,
            }],
            subject: None,
            build_tool: Some("t".into()),
        };
        let bytes = idx.to_bytes();
        assert_eq!(SociIndex::parse(&bytes, "x").unwrap(), idx);
        let other = String::from_utf8(bytes.clone()).unwrap().replace(INDEX_V1_TYPE, "application/vnd.example+json");
        assert!(SociIndex::parse(other.as_bytes(), "x").unwrap_err().reason.contains("not a SOCI index"));
        let missing = String::from_utf8(bytes).unwrap().replace(SPAN_SIZE, "x");
        let err = SociIndex::parse(missing.as_bytes(), "sha256:cc").unwrap_err();
        assert!(err.to_string().contains("sha256:cc") && err.reason.contains(SPAN_SIZE), "{err}");
    }

    #[test]
    fn prefetch_artifacts_follow_the_ztocs_and_are_read_back_to_their_layer() {
        let z = |n: &str, p: Option<&str>| LayerZtoc {
            layer_digest: format!("sha256:{n}"),
            layer_media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            ztoc_digest: format!("sha256:z{n}"),
            ztoc_size: 3,
            span_size: 4 << 20,
            prefetch: p.map(|d| Blob { digest: d.into(), size: 60 }),
        };
        let idx = SociIndex { version: IndexVersion::V2, ztocs: vec![z("a", Some("sha256:pa")), z("b", None), z("c", Some("sha256:pc"))], subject: None, build_tool: None };
        let m = idx.to_manifest();
        let kinds: Vec<(&str, &str)> = m.layers.iter().map(|l| (l.media_type.as_str(), l.digest.as_str())).collect();
        assert_eq!(
            kinds,
            [(ZTOC_MEDIA_TYPE, "sha256:za"), (ZTOC_MEDIA_TYPE, "sha256:zb"), (ZTOC_MEDIA_TYPE, "sha256:zc"), (soci::PREFETCH_MEDIA_TYPE, "sha256:pa"), (soci::PREFETCH_MEDIA_TYPE, "sha256:pc")]
        );
        assert_eq!(m.layers[3].annotations, BTreeMap::from([(LAYER_DIGEST.to_owned(), "sha256:a".to_owned())]));
        assert_eq!(SociIndex::parse(&idx.to_bytes(), "x").unwrap(), idx);
        // A prefetch set for a layer the index does not index is a hint with nothing to apply
        // to: left out, the index still usable.
        let bytes = String::from_utf8(idx.to_bytes()).unwrap();
        let (tail, stray_tail) = ("\"com.amazon.soci.image-layer-digest\":\"sha256:c\"}}]", "\"com.amazon.soci.image-layer-digest\":\"sha256:q\"}}]");
        assert!(bytes.contains(tail), "{bytes}");
        let parsed = SociIndex::parse(bytes.replace(tail, stray_tail).as_bytes(), "x").unwrap();
        assert_eq!(parsed.ztocs[2].prefetch, None);
        assert_eq!(parsed.ztocs[0].prefetch, idx.ztocs[0].prefetch);
    }
}
