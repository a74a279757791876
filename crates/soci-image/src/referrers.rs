//! Finding the SOCI index of an image manifest, and registering a v1 index as its referrer.
//!
//! Discovery tries, in order: an index digest the caller names (a label), the v2
//! `com.amazon.soci.index-digest` annotation on the manifest, then v1 referrers of the
//! manifest: the referrers API, or the `sha256-<hex>` fallback tag on registries without it
//! (Debian's `docker-registry` has none), or the layout's `index.json`. The first source that
//! answers wins and is reported, so a log says how an index was found. Registration mirrors
//! that: a registry with the referrers API lists a pushed v1 index by itself; otherwise the
//! fallback tag's image index gets the descriptor appended, as oras does.

use bytes::Bytes;
use convert::Store;
use registry::manifest::{self, Descriptor, Index, Manifest, ManifestKind};

use crate::manifest::{SociIndex, INDEX_DIGEST, INDEX_V1_TYPE};
use crate::{Error, Result};

/// How an index was found (a bounded label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Explicit,
    ManifestAnnotation,
    Referrers,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Explicit => "explicit",
            Via::ManifestAnnotation => "manifest_annotation",
            Via::Referrers => "referrers",
        }
    }
}

/// A SOCI index found for a manifest.
#[derive(Debug, Clone)]
pub struct Found {
    pub index: SociIndex,
    pub digest: String,
    pub via: Via,
}

async fn fetch(store: &Store, digest: &str) -> Result<SociIndex> {
    let (bytes, _) = store.manifest(digest).await?;
    let actual = crate::manifest::sha256_digest(&bytes);
    if actual != digest {
        return Err(Error::Invalid(format!("SOCI index {digest} arrived with digest {actual}")));
    }
    Ok(SociIndex::parse(&bytes, digest)?)
}

/// The v1 SOCI indexes that name `subject` as their subject.
pub async fn v1_referrers(store: &Store, subject: &str) -> Result<Vec<Descriptor>> {
    match store {
        Store::Registry { client, reference } => Ok(client.referrers(reference, subject, Some(INDEX_V1_TYPE)).await?.manifests),
        Store::Layout { dir, .. } => {
            let index = read_layout_index(dir)?;
            let mut out = Vec::new();
            for d in index.manifests.into_iter().filter(|d| d.artifact_type.as_deref() == Some(INDEX_V1_TYPE)) {
                let (bytes, _) = store.manifest(&d.digest).await?;
                if let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) {
                    if m.subject.as_ref().is_some_and(|s| s.digest == subject) {
                        out.push(d);
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Finds the SOCI index for the image manifest `digest` (parsed as `m`).
pub async fn discover(store: &Store, digest: &str, m: &Manifest, explicit: Option<&str>) -> Result<Option<Found>> {
    if let Some(d) = explicit {
        return Ok(Some(Found { index: fetch(store, d).await?, digest: d.to_owned(), via: Via::Explicit }));
    }
    if let Some(d) = m.annotations.get(INDEX_DIGEST) {
        return Ok(Some(Found { index: fetch(store, d).await?, digest: d.clone(), via: Via::ManifestAnnotation }));
    }
    let candidates = v1_referrers(store, digest).await?;
    // Several indexes may refer to one image (rebuilt with other span sizes): the last listed
    // is the newest on the fallback tag, which is also what upstream picks.
    let Some(chosen) = candidates.last() else {
        return Ok(None);
    };
    if candidates.len() > 1 {
        tracing::info!(manifest = digest, chosen = %chosen.digest, candidates = candidates.len(), "several SOCI indexes refer to this manifest");
    }
    Ok(Some(Found { index: fetch(store, &chosen.digest).await?, digest: chosen.digest.clone(), via: Via::Referrers }))
}

/// Makes a pushed v1 index findable from its subject.
pub async fn register(store: &Store, subject: &str, index: &Descriptor) -> Result<()> {
    match store {
        Store::Registry { client, reference } => {
            let listed = client.referrers(reference, subject, Some(INDEX_V1_TYPE)).await?;
            if listed.manifests.iter().any(|d| d.digest == index.digest) {
                return Ok(());
            }
            // No referrers API: maintain the fallback tag (an image index of referrers).
            let tag = reference.with_tag(&subject.replace(':', "-"));
            let mut tag_index = match client.get_manifest(&tag).await {
                Ok(m) => match m.manifest {
                    ManifestKind::Index(i) => i,
                    ManifestKind::Image(_) => empty_index(),
                },
                Err(registry::Error::NotFound { .. }) => empty_index(),
                Err(e) => return Err(e.into()),
            };
            tag_index.manifests.retain(|d| d.digest != index.digest);
            tag_index.manifests.push(index.clone());
            let bytes = Bytes::from(serde_json::to_vec(&tag_index).expect("an index serialises"));
            client.put_manifest(&tag, bytes, manifest::OCI_INDEX).await?;
            Ok(())
        }
        Store::Layout { dir, .. } => {
            let mut listed = read_layout_index(dir)?;
            listed.manifests.retain(|d| d.digest != index.digest);
            listed.manifests.push(index.clone());
            let path = dir.join("index.json");
            let tmp = path.with_extension("json.tmp");
            let bytes = serde_json::to_vec(&listed).expect("an index serialises");
            std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|source| Error::Io { context: format!("writing {}", path.display()), source })
        }
    }
}

fn empty_index() -> Index {
    Index {
        schema_version: 2,
        media_type: Some(manifest::OCI_INDEX.to_owned()),
        artifact_type: None,
        manifests: Vec::new(),
        subject: None,
        annotations: Default::default(),
        extra: Default::default(),
    }
}

fn read_layout_index(dir: &std::path::Path) -> Result<Index> {
    let path = dir.join("index.json");
    let bytes = std::fs::read(&path).map_err(|source| Error::Io { context: format!("reading {}", path.display()), source })?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Invalid(format!("{} is not an image index: {e}", path.display())))
}
