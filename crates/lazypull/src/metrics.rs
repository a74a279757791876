//! Prometheus `/metrics` of the snapshotter, in the text exposition format.
//!
//! Per-layer figures come from the status files the layer daemons rewrite every second (the
//! daemons outlive snapshotter restarts, so their counters do too); fallbacks and remote
//! snapshot counts come from the snapshotter itself. Served by a tiny HTTP/1.1 responder: the
//! endpoint is scraped, not browsed, so a web framework would be dead weight.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapshotter::Snapshotter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use node::MountStatus;

fn statuses(state: &Path) -> Vec<MountStatus> {
    let Ok(rd) = std::fs::read_dir(state.join("mounts")) else { return Vec::new() };
    rd.flatten()
        .filter(|e| e.path().join("record.json").exists())
        .filter_map(|e| std::fs::read(e.path().join("status.json")).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

/// The metrics page.
pub fn render(snap: &Snapshotter, layer_state: &Path) -> String {
    let mut out = String::new();
    let st = statuses(layer_state);
    let layers: Vec<_> = st.iter().flat_map(|m| m.layers.iter()).collect();
    let mut counter = |name: &str, help: &str, kind: &str, f: &dyn Fn(&node::LayerStatus) -> f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for l in &layers {
            let _ = writeln!(out, "{name}{{layer=\"{}\"}} {}", l.digest, f(l));
        }
    };
    counter("lazypull_fetched_bytes_total", "Compressed bytes fetched from the registry per layer.", "counter", &|l| l.fetched_bytes as f64);
    counter("lazypull_fetch_requests_total", "Range requests per layer.", "counter", &|l| l.requests as f64);
    counter("lazypull_chunks_fetched_total", "Chunks fetched and verified per layer.", "counter", &|l| l.chunks_fetched as f64);
    counter("lazypull_cache_hits_total", "Chunk lookups answered by the chunk store per layer.", "counter", &|l| l.cache_hits as f64);
    counter("lazypull_fetch_errors_total", "Failed chunk fetches (network, corruption) per layer.", "counter", &|l| l.errors as f64);
    counter("lazypull_fuse_reads_total", "FUSE reads served by the daemon per layer.", "counter", &|l| l.reads as f64);
    counter("lazypull_layer_present_ratio", "Fraction of the layer's compressed bytes in the chunk store.", "gauge", &|l| l.present_percent / 100.0);

    // Request latency, all layers together.
    let bounds = store::LATENCY_BUCKETS_MS;
    let mut buckets = vec![0u64; bounds.len() + 1];
    let mut sum = 0.0;
    for l in &layers {
        for (i, b) in l.fetch_latency_buckets.iter().enumerate().take(buckets.len()) {
            buckets[i] += b;
        }
        sum += l.fetch_latency_sum_secs;
    }
    let _ = writeln!(out, "# HELP lazypull_fetch_latency_seconds Latency of range requests to registries.\n# TYPE lazypull_fetch_latency_seconds histogram");
    let mut cum = 0;
    for (i, b) in bounds.iter().enumerate() {
        cum += buckets[i];
        let _ = writeln!(out, "lazypull_fetch_latency_seconds_bucket{{le=\"{}\"}} {cum}", *b as f64 / 1000.0);
    }
    cum += buckets[bounds.len()];
    let _ = writeln!(out, "lazypull_fetch_latency_seconds_bucket{{le=\"+Inf\"}} {cum}\nlazypull_fetch_latency_seconds_sum {sum}\nlazypull_fetch_latency_seconds_count {cum}");

    let _ = writeln!(out, "# HELP lazypull_fallbacks_total Layers not mounted lazily, by reason.\n# TYPE lazypull_fallbacks_total counter");
    for (reason, n) in snap.stats.fallbacks.lock().unwrap().iter() {
        let _ = writeln!(out, "lazypull_fallbacks_total{{reason={:?}}} {n}", reason);
    }
    let _ = writeln!(
        out,
        "# HELP lazypull_remote_snapshots_total Layers mounted lazily since start.\n# TYPE lazypull_remote_snapshots_total counter\nlazypull_remote_snapshots_total {}",
        snap.stats.remote_snapshots.load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP lazypull_unpacked_snapshots_total Layers the snapshotter fetched and unpacked itself (SOCI layers without a zTOC) since start.\n# TYPE lazypull_unpacked_snapshots_total counter\nlazypull_unpacked_snapshots_total {}",
        snap.stats.unpacked_snapshots.load(std::sync::atomic::Ordering::Relaxed)
    );
    let cache = st.iter().map(|m| m.cache_disk_bytes).max().unwrap_or(0);
    let _ = writeln!(out, "# HELP lazypull_cache_disk_bytes Bytes in the chunk store.\n# TYPE lazypull_cache_disk_bytes gauge\nlazypull_cache_disk_bytes {cache}");
    out
}

/// Serves `GET /metrics` on `addr` until the runtime stops.
pub async fn serve(addr: String, snap: Arc<Snapshotter>, layer_state: PathBuf) {
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => {
            if let Ok(local) = l.local_addr() {
                info!(address = %local, "serving Prometheus metrics on /metrics");
            }
            l
        }
        Err(e) => {
            warn!(%addr, error = %e, "metrics endpoint not started");
            return;
        }
    };
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { continue };
        let (snap, state) = (snap.clone(), layer_state.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = conn.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                ("200 OK", tokio::task::spawn_blocking(move || render(&snap, &state)).await.unwrap_or_default())
            } else {
                ("404 Not Found", "not found; try /metrics\n".to_string())
            };
            let head = format!("HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        });
    }
}
