//! The manifest of a baked node cache volume (`lazypull-volume.json` at the volume's root):
//! what is inside, so that a node (or `lazypull bake verify`) can tell whether a volume is
//! complete, which images it holds and how much of each.
//!
//! Why a versioned file of its own: a volume outlives the binary that baked it (it sits in an
//! EBS snapshot for months), and its directories are the private layouts of containerd and of
//! lazypull's store. A node must refuse a layout it does not understand with a clear error
//! rather than serve from it, so the layout has a number ([`FORMAT_VERSION`]) that changes
//! whenever the store, the refs or the snapshotter metadata change incompatibly; the counts let
//! a check notice a volume that lost files (a truncated copy) even where every remaining file
//! is intact.

use serde::{Deserialize, Serialize};

/// The file at the root of a volume.
pub const MANIFEST_FILE: &str = "lazypull-volume.json";
/// The `format` field of every volume manifest.
pub const FORMAT: &str = "lazypull-node-cache-volume";
/// The layout this build bakes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Under the volume root: containerd's root (content, metadata, snapshotter plugins' state).
pub const CONTAINERD_DIR: &str = "containerd";
/// Under the volume root: lazypull's snapshotter root (snapshots, store, refs, tails).
pub const LAZYPULL_DIR: &str = "lazypull";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeManifest {
    pub format: String,
    pub format_version: u32,
    /// The lazypull version that baked it (informational).
    pub lazypull_version: String,
    /// Seconds since the epoch.
    pub created: u64,
    /// `full`, `prioritized` or `budget`.
    pub mode: String,
    /// The byte budget asked for (`budget` mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_bytes: Option<u64>,
    /// containerd namespace the images were pulled into.
    pub namespace: String,
    pub images: Vec<VolumeImage>,
    /// The chunk store as baked.
    pub chunks: u64,
    pub chunk_bytes: u64,
    /// containerd's content store as baked (manifests, configs, non-lazy layers).
    pub blobs: u64,
    pub blob_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeImage {
    pub reference: String,
    pub manifest_digest: String,
    /// Layers served lazily from the chunk store (and the registry for what is not in it).
    pub lazy_layers: Vec<VolumeLayer>,
    /// Layers containerd fetched and unpacked (plain gzip without an index).
    pub unpacked_layers: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeLayer {
    pub digest: String,
    /// Chunks of the layer, and of those stored in the volume.
    pub chunks: usize,
    pub stored_chunks: usize,
    /// Uncompressed bytes of the layer's chunks, and of those stored.
    pub bytes: u64,
    pub stored_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{0} is missing: not a lazypull volume, or an incomplete copy of one")]
    Missing(String),
    #[error("{file} is not a lazypull volume manifest: {reason}")]
    Unreadable { file: String, reason: String },
    #[error("{file}: volume format {found} (baked by lazypull {by}); this lazypull ({ours}) reads format {FORMAT_VERSION} only: bake the volume again with this version")]
    OtherVersion { file: String, found: u32, by: String, ours: String },
}

impl VolumeManifest {
    /// Parses and checks a manifest's text (`file` names it in errors).
    pub fn parse(file: &str, text: &[u8], ours: &str) -> Result<VolumeManifest, VolumeError> {
        // The version first, from a loose reading, so a future layout with other fields still
        // gets the version message rather than a field error.
        #[derive(Deserialize)]
        struct Head {
            format: String,
            format_version: u32,
            #[serde(default)]
            lazypull_version: String,
        }
        let head: Head = serde_json::from_slice(text).map_err(|e| VolumeError::Unreadable { file: file.into(), reason: e.to_string() })?;
        if head.format != FORMAT {
            return Err(VolumeError::Unreadable { file: file.into(), reason: format!("format {:?}, not {FORMAT:?}", head.format) });
        }
        if head.format_version != FORMAT_VERSION {
            return Err(VolumeError::OtherVersion { file: file.into(), found: head.format_version, by: head.lazypull_version, ours: ours.into() });
        }
        serde_json::from_slice(text).map_err(|e| VolumeError::Unreadable { file: file.into(), reason: e.to_string() })
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VolumeManifest {
        VolumeManifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            lazypull_version: "0.1.0".into(),
            created: 1,
            mode: "full".into(),
            budget_bytes: None,
            namespace: "k8s.io".into(),
            images: vec![VolumeImage {
                reference: "r/a:1".into(),
                manifest_digest: "sha256:00".into(),
                lazy_layers: vec![VolumeLayer { digest: "sha256:11".into(), chunks: 3, stored_chunks: 3, bytes: 30, stored_bytes: 30 }],
                unpacked_layers: 1,
            }],
            chunks: 3,
            chunk_bytes: 30,
            blobs: 4,
            blob_bytes: 400,
        }
    }

    #[test]
    fn a_manifest_round_trips() {
        let m = sample();
        assert_eq!(VolumeManifest::parse("v", &m.to_json(), "0.1.0").unwrap(), m);
    }

    #[test]
    fn another_layout_version_is_refused_by_name() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["format_version"] = 7.into();
        v["lazypull_version"] = "9.9.9".into();
        v["images"] = "a field this version does not know".into();
        let e = VolumeManifest::parse("vol/lazypull-volume.json", v.to_string().as_bytes(), "0.1.0").unwrap_err().to_string();
        assert!(e.contains("volume format 7") && e.contains("9.9.9") && e.contains("reads format 1"), "{e}");
    }

    #[test]
    fn garbage_and_other_formats_are_not_volumes() {
        assert!(matches!(VolumeManifest::parse("v", b"{\"format\": 1", "x"), Err(VolumeError::Unreadable { .. })));
        let e = VolumeManifest::parse("v", br#"{"format": "other", "format_version": 1}"#, "x").unwrap_err().to_string();
        assert!(e.contains("\"other\""), "{e}");
    }
}
