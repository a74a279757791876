//! `status.json`: a mount daemon's view of its layers, rewritten every second; read by
//! `lazypull status` and the metrics endpoint.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One layer's line in `status.json`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LayerStatus {
    pub index: usize,
    pub digest: String,
    pub lazy: bool,
    /// Why a layer is not lazy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
    pub blob_bytes: u64,
    pub fetched_bytes: u64,
    pub present_percent: f64,
    pub requests: u64,
    pub chunks_fetched: u64,
    pub cache_hits: u64,
    pub errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub prefetch_done: bool,
    pub complete: bool,
    pub reads: u64,
    pub read_errors: u64,
    pub passthrough_opens: u64,
    /// Shared libraries prefetched because a program that needs them was read (`fs::deps`).
    #[serde(default)]
    pub libraries_prefetched: u64,
    /// Regular files in first-open order (paths in the layer): the workload's reads, usable as
    /// `image convert --prioritize` input.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opened_files: Vec<String>,
    /// Range-request latency histogram: counts per bucket (upper bounds in ms:
    /// `store::LATENCY_BUCKETS_MS`, then +Inf) and the sum in seconds.
    #[serde(default)]
    pub fetch_latency_buckets: Vec<u64>,
    #[serde(default)]
    pub fetch_latency_sum_secs: f64,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct MountStatus {
    pub source: String,
    pub mountpoint: PathBuf,
    pub pid: u32,
    pub mounted_secs: f64,
    pub cache_disk_bytes: u64,
    pub layers: Vec<LayerStatus>,
}

impl MountStatus {
    /// Reads `DIR/status.json`.
    pub fn load(mount_dir: &Path) -> std::io::Result<MountStatus> {
        crate::files::read_json(&mount_dir.join("status.json"))
    }

    /// Writes `DIR/status.json` atomically (readers never see half a file).
    pub fn save(&self, mount_dir: &Path) -> std::io::Result<()> {
        crate::files::write_json(&mount_dir.join("status.json"), self)
    }
}
