//! Blob tails on disk: the footer and TOC of each layer, keyed by the layer's blob digest.
//!
//! Why: a layer cannot be mounted before its TOC is read, and containerd prepares an image's
//! layers one after the other, so on a high-latency link every layer pays a TCP connection and
//! one or two round trips in turn (measured: ~70 ms per layer on a 100 Mbit/s + 20 ms link).
//! With this cache the snapshotter reads the TOCs of an image's remaining layers in parallel as
//! soon as it sees the first one, and each later mount opens its TOC from disk. It also makes a
//! re-mount after a restart free of network round trips.
//!
//! Safety: a blob is immutable under its digest, and the TOC read from the cache is still
//! checked against the TOC digest from the manifest by the caller; an entry that fails that check
//! is dropped and the TOC is read from the registry again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::source::RangeSource;

/// The on-disk cache (`DIR/<blob digest hex>`: 8-byte little-endian blob offset, then the bytes
/// from there to the end of the blob).
#[derive(Debug, Clone)]
pub struct TailCache {
    dir: PathBuf,
}

impl TailCache {
    pub fn new(dir: impl Into<PathBuf>) -> TailCache {
        TailCache { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry's path; `None` for anything that is not a `sha256:<64 hex>` digest (a hostile
    /// digest never becomes a path).
    fn path(&self, blob: &str) -> Option<PathBuf> {
        let hex = blob.strip_prefix("sha256:")?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| self.dir.join(hex))
    }

    /// The cached tail of `blob`: its start offset and bytes.
    pub fn load(&self, blob: &str) -> Option<(u64, Vec<u8>)> {
        let data = std::fs::read(self.path(blob)?).ok()?;
        let (head, rest) = data.split_at_checked(8)?;
        Some((u64::from_le_bytes(head.try_into().ok()?), rest.to_vec()))
    }

    /// The whole of `blob` (`size` bytes), when the cache holds all of it and it still hashes
    /// to its digest: a small layer kept whole where it was fetched whole (the snapshotter
    /// indexing a SOCI layer that has no zTOC), so that its mount reads it from disk. A damaged
    /// entry is dropped.
    pub fn load_whole(&self, blob: &str, size: u64) -> Option<Vec<u8>> {
        let (start, bytes) = self.load(blob)?;
        if start != 0 || bytes.len() as u64 != size {
            return None;
        }
        if index::Digest::of(&bytes).to_string() != blob {
            self.remove(blob);
            return None;
        }
        Some(bytes)
    }

    pub fn contains(&self, blob: &str) -> bool {
        self.path(blob).is_some_and(|p| p.exists())
    }

    /// Stores the tail of `blob` starting at `offset` (atomically: a reader sees all or nothing).
    pub fn save(&self, blob: &str, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let Some(path) = self.path(blob) else {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("not a sha256 digest: {blob:?}")));
        };
        std::fs::create_dir_all(&self.dir)?;
        // Unique per save: two writers of one entry (a read-ahead and a mount, in one process
        // or two) each rename a whole file of their own; the last one wins, both are complete.
        static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
        let mut data = offset.to_le_bytes().to_vec();
        data.extend_from_slice(bytes);
        std::fs::write(&tmp, data)?;
        std::fs::rename(&tmp, &path)
    }

    pub fn remove(&self, blob: &str) {
        if let Some(p) = self.path(blob) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Removes every entry whose blob digest `keep` rejects; returns how many went. Files
    /// being written (`<hex>.tmp…`) are not entries: they are left to their writers, unless an
    /// hour old (a writer that crashed).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) -> usize {
        let mut n = 0;
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains('.') {
                let stale = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > std::time::Duration::from_secs(3600));
                if stale {
                    let _ = std::fs::remove_file(e.path());
                }
                continue;
            }
            if !keep(&format!("sha256:{name}")) && std::fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
        n
    }
}

/// A [`RangeSource`] in front of another that answers reads lying inside a known tail from
/// memory and remembers the reads it passed on, so that the tail a TOC was read from can be
/// saved afterwards.
pub struct TailSource {
    inner: Arc<dyn RangeSource>,
    cached: Option<(u64, Vec<u8>)>,
    passed: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl TailSource {
    pub fn new(inner: Arc<dyn RangeSource>, cached: Option<(u64, Vec<u8>)>) -> TailSource {
        TailSource {
            inner,
            cached,
            passed: Mutex::new(Vec::new()),
        }
    }

    /// Whether every read so far was answered from the cached tail.
    pub fn served_from_cache(&self) -> bool {
        self.cached.is_some() && self.passed.lock().unwrap().is_empty()
    }

    /// The bytes from `start` to the end of the blob, if the reads passed on cover them.
    pub fn passed_tail(&self, start: u64) -> Option<Vec<u8>> {
        let size = self.inner.size();
        let mut reads = self.passed.lock().unwrap();
        reads.sort_by_key(|r| r.0);
        let mut out = Vec::with_capacity(size.saturating_sub(start) as usize);
        let mut at = start;
        for (off, bytes) in reads.iter() {
            let end = off + bytes.len() as u64;
            if *off > at {
                return None;
            }
            if end > at {
                out.extend_from_slice(&bytes[(at - off) as usize..]);
                at = end;
            }
        }
        (at == size).then_some(out)
    }
}

impl RangeSource for TailSource {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<Vec<u8>>> {
        if let Some((start, bytes)) = &self.cached {
            let end = start + bytes.len() as u64;
            if ranges.iter().all(|&(o, l)| o >= *start && o + l <= end) {
                return Ok(ranges.iter().map(|&(o, l)| bytes[(o - start) as usize..(o - start + l) as usize].to_vec()).collect());
            }
        }
        let parts = self.inner.read_ranges(ranges)?;
        let mut passed = self.passed.lock().unwrap();
        for (&(o, _), p) in ranges.iter().zip(&parts) {
            passed.push((o, p.clone()));
        }
        Ok(parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FileRangeSource;

    const BLOB: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_whole_blob_is_served_only_if_complete_and_still_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let c = TailCache::new(dir.path().join("tails"));
        let blob = b"a small layer, kept whole".to_vec();
        let digest = index::Digest::of(&blob).to_string();
        c.save(&digest, 0, &blob).unwrap();
        assert_eq!(c.load_whole(&digest, blob.len() as u64), Some(blob.clone()));
        assert_eq!(c.load_whole(&digest, blob.len() as u64 + 1), None, "another size: not the whole blob");
        c.save(&digest, 3, &blob[3..]).unwrap();
        assert_eq!(c.load_whole(&digest, blob.len() as u64), None, "a tail is not the whole blob");
        assert!(c.contains(&digest), "a tail is kept for what it is");
        let mut damaged = blob.clone();
        damaged[0] ^= 1;
        c.save(&digest, 0, &damaged).unwrap();
        assert_eq!(c.load_whole(&digest, blob.len() as u64), None);
        assert!(!c.contains(&digest), "a damaged whole blob is dropped");
    }

    #[test]
    fn entries_round_trip_and_hostile_digests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = TailCache::new(dir.path().join("tails"));
        assert!(c.load(BLOB).is_none());
        c.save(BLOB, 42, b"tail").unwrap();
        assert_eq!(c.load(BLOB), Some((42, b"tail".to_vec())));
        assert!(c.save("sha256:../../etc/passwd", 0, b"x").is_err());
        assert!(c.load("../x").is_none());
        assert_eq!(c.retain(|d| d != BLOB), 1);
        assert!(!c.contains(BLOB));
    }

    #[test]
    fn reads_inside_the_tail_come_from_memory_and_passed_reads_rebuild_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file: Arc<dyn RangeSource> = Arc::new(FileRangeSource::open(&path).unwrap());

        let cold = TailSource::new(file.clone(), None);
        assert_eq!(cold.read_ranges(&[(900, 100)]).unwrap(), vec![data[900..].to_vec()]);
        assert_eq!(cold.read_ranges(&[(700, 250)]).unwrap(), vec![data[700..950].to_vec()]);
        assert_eq!(cold.passed_tail(800), Some(data[800..].to_vec()));
        assert_eq!(cold.passed_tail(600), None, "bytes 600..700 were never read");
        assert!(!cold.served_from_cache());

        let warm = TailSource::new(file, Some((800, data[800..].to_vec())));
        assert_eq!(warm.read_ranges(&[(850, 10), (990, 10)]).unwrap(), vec![data[850..860].to_vec(), data[990..].to_vec()]);
        assert!(warm.served_from_cache());
        assert_eq!(warm.read_ranges(&[(100, 10)]).unwrap(), vec![data[100..110].to_vec()]);
        assert!(!warm.served_from_cache());
    }
}
