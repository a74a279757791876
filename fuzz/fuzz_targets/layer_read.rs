//! What a layer daemon does with a hostile blob: open it (footer, TOC, validated tree, inode
//! table, chunk list), then serve it — getattr/lookup/readdir over every inode, symlink
//! resolution, and reads of every regular file at its start, middle and end through the real
//! fetcher and chunk store (decode, verify, store). Errors are fine; a panic, a hang (libFuzzer's
//! `-timeout`) or an unbounded allocation (`-rss_limit_mb`) is a finding. Seeds are real blobs
//! and the hostile cases of issue 16 (see scripts/fuzz.sh).
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use lazyfs::{FsOptions, LayerFs};
use store::{ChunkStore, FetchConfig, RangeSource, StoreConfig};

/// The blob, served from memory as a registry would serve ranges.
struct Blob(Vec<u8>);

impl RangeSource for Blob {
    fn name(&self) -> &str {
        "fuzz"
    }
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_ranges(&self, ranges: &[(u64, u64)]) -> store::Result<Vec<Vec<u8>>> {
        Ok(ranges
            .iter()
            .map(|&(o, l)| {
                let start = (o as usize).min(self.0.len());
                let end = (o.saturating_add(l) as usize).min(self.0.len());
                self.0[start..end].to_vec()
            })
            .collect())
    }
}

/// One bounded store for the whole run, as a node has (its eviction is exercised too).
fn store() -> Arc<ChunkStore> {
    static STORE: OnceLock<(tempfile::TempDir, Arc<ChunkStore>)> = OnceLock::new();
    STORE
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut cfg = StoreConfig::new(dir.path());
            cfg.disk_limit = 64 << 20;
            cfg.memory_limit = 16 << 20;
            let store = ChunkStore::open(cfg).expect("store");
            (dir, store)
        })
        .1
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let config = FetchConfig { wait_timeout: Duration::from_secs(5), ..FetchConfig::default() };
    let Ok(opened) = lazyfs::open_layer(Arc::new(Blob(data.to_vec())), None, store(), config) else { return };
    let view = opened.view.clone();
    let fs = LayerFs::new(view.clone(), opened.fetcher.clone(), FsOptions { passthrough: false, ..FsOptions::default() });
    for ino in 1..=view.max_ino() {
        let Some(i) = view.get(ino) else { continue };
        for (name, child) in &i.children {
            assert_eq!(view.lookup(ino, name.as_bytes()), Some(*child), "lookup of a listed child");
            assert!(name != "." && name != ".." && !name.is_empty() && !name.contains('/'), "listed name {name:?}");
        }
        if !i.link_target.is_empty() {
            let _ = view.resolve_following(&i.path);
        }
        if i.kind == estargz::NodeKind::Reg {
            for offset in [0, i.size / 2, i.size.saturating_sub(1)] {
                if let Ok(bytes) = fs.read_file(i, offset, 64 << 10) {
                    assert!(bytes.len() as u64 <= (64 << 10).min(i.size.saturating_sub(offset)), "read past the asked range");
                }
            }
        }
    }
});
