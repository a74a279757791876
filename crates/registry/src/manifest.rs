//! Manifests, indexes, descriptors and platforms (OCI and Docker schema 2).
//!
//! Our own serde types rather than `oci-spec`'s: conversion rewrites manifests and must keep
//! every field it does not understand (vendor annotations, `subject`, future fields) exactly,
//! which a `#[serde(flatten)]` map of the rest does simply.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_FOREIGN_LAYER: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// Every manifest type we ask for, in `Accept` form.
pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(rename = "os.version", default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Platform {
    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(Error::Config(format!("platform {s:?} is not os/arch[/variant]")));
        }
        Ok(Platform {
            os: parts[0].into(),
            architecture: parts[1].into(),
            variant: parts.get(2).map(|v| v.to_string()),
            os_version: None,
            extra: BTreeMap::new(),
        })
    }

    /// This machine's platform.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: None,
            os_version: None,
            extra: BTreeMap::new(),
        }
    }

    /// Whether a manifest for `self` runs on `want` (variant matches when `want` names one).
    pub fn matches(&self, want: &Platform) -> bool {
        self.os == want.os && self.architecture == want.architecture && (want.variant.is_none() || self.variant == want.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: String, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            annotations: BTreeMap::new(),
            platform: None,
            urls: Vec::new(),
            artifact_type: None,
            extra: BTreeMap::new(),
        }
    }
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// An index / manifest list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Either kind of top-level document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestKind {
    Image(Manifest),
    Index(Index),
}

impl ManifestKind {
    /// Decodes a manifest body, using the `Content-Type` when the body lacks `mediaType`.
    pub fn parse(bytes: &[u8], content_type: Option<&str>, what: &str) -> Result<ManifestKind> {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| Error::BadResponse {
            url: what.to_string(),
            reason: format!("manifest is not JSON: {e}"),
        })?;
        let mt = v.get("mediaType").and_then(|m| m.as_str()).or(content_type).unwrap_or("").to_string();
        let mt = mt.as_str();
        let is_index = matches!(mt, OCI_INDEX | DOCKER_LIST) || (mt.is_empty() && v.get("manifests").is_some());
        let bad = |e: serde_json::Error| Error::BadResponse {
            url: what.to_string(),
            reason: format!("invalid {mt} document: {e}"),
        };
        if is_index {
            Ok(ManifestKind::Index(serde_json::from_value(v).map_err(bad)?))
        } else {
            if v.get("schemaVersion").and_then(|s| s.as_u64()) == Some(1) {
                return Err(Error::BadResponse {
                    url: what.to_string(),
                    reason: "Docker schema 1 manifests are not supported".into(),
                });
            }
            Ok(ManifestKind::Image(serde_json::from_value(v).map_err(bad)?))
        }
    }

    pub fn media_type(&self) -> &str {
        match self {
            ManifestKind::Image(m) => m.media_type.as_deref().unwrap_or(OCI_MANIFEST),
            ManifestKind::Index(i) => i.media_type.as_deref().unwrap_or(OCI_INDEX),
        }
    }
}

/// Picks the manifest for `want` from an index.
pub fn select_platform<'a>(index: &'a Index, want: &Platform, reference: &str) -> Result<&'a Descriptor> {
    index
        .manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| p.matches(want)))
        .ok_or_else(|| Error::NoMatchingPlatform {
            reference: reference.to_string(),
            platform: want.to_string(),
            available: index.manifests.iter().filter_map(|d| d.platform.as_ref().map(|p| p.to_string())).collect::<Vec<_>>().join(", "),
        })
}

/// Whether a layer media type is gzip-compressed tar.
pub fn is_gzip_layer(media_type: &str) -> bool {
    matches!(media_type, OCI_LAYER_GZIP | DOCKER_LAYER_GZIP | DOCKER_FOREIGN_LAYER) || media_type.ends_with("+gzip")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_unknown_fields_and_selects_platforms() {
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aa","size":1,"platform":{"architecture":"arm64","os":"linux","variant":"v8"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:bb","size":2,"platform":{"architecture":"amd64","os":"linux"},"x-vendor":true}],
            "x-top":{"k":1}}"#;
        let ManifestKind::Index(i) = ManifestKind::parse(body, None, "t").unwrap() else { panic!() };
        assert_eq!(select_platform(&i, &Platform::parse("linux/amd64").unwrap(), "r").unwrap().digest, "sha256:bb");
        assert_eq!(select_platform(&i, &Platform::parse("linux/arm64").unwrap(), "r").unwrap().digest, "sha256:aa");
        let e = select_platform(&i, &Platform::parse("linux/s390x").unwrap(), "r").unwrap_err().to_string();
        assert!(e.contains("linux/arm64/v8") && e.contains("linux/amd64"), "{e}");
        let back = serde_json::to_value(&i).unwrap();
        assert_eq!(back["x-top"]["k"], 1);
        assert_eq!(back["manifests"][1]["x-vendor"], true);
    }

    #[test]
    fn schema1_is_refused() {
        let e = ManifestKind::parse(br#"{"schemaVersion":1,"name":"x"}"#, None, "t").unwrap_err();
        assert!(e.to_string().contains("schema 1"));
    }
}
