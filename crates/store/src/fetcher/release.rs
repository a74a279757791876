//! Releasing claims, including after a panic.
//!
//! A claim is an entry in the in-flight table that readers of the same chunk wait on. If the
//! thread fetching it died without completing it, those readers would block for the whole
//! `wait_timeout` (60 s by default) and then fail with a timeout, and every later reader would
//! join the dead flight. Panics should not happen (the TOC's numbers are bounds-checked before
//! and during decoding), but the fetch and settle workers run under `catch_unwind` all the same,
//! and whatever they leave unfinished is failed and released here.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::warn;

use super::{Claim, LayerFetcher};
use crate::error::{Error, Result};

impl LayerFetcher {
    /// Removes `cl`'s flight from the in-flight table, unless a later claim of the same digest
    /// has replaced it there.
    /// Waits (at most `timeout`) until no chunk of this layer is in flight, i.e. every chunk
    /// fetched so far is in the store: [`LayerFetcher::get_many`] returns as soon as *its*
    /// chunks are verified and stores them on a helper thread, so a process that exits right
    /// after (`lazypull warm`) must wait for this or lose those writes. True if settled.
    pub fn wait_settled(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.inflight.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    pub(super) fn release(&self, cl: &Claim) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if inflight.get(&cl.digest).is_some_and(|f| Arc::ptr_eq(f, &cl.flight)) {
            inflight.remove(&cl.digest);
        }
    }

    /// After a fetch or settle worker panicked: fails every one of `claims` not yet published
    /// with an [`Error::Fetch`] naming the panic and releases them all, so readers get an error now instead of a
    /// timeout. Returns each claim's outcome.
    pub(super) fn abandon(&self, claims: &[Claim], stage: &str, panic: &(dyn std::any::Any + Send)) -> Vec<(usize, Result<Arc<Vec<u8>>>)> {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        warn!(blob = %self.blob, stage, panic = %what, claims = claims.len(), "fetch worker panicked; failing its chunks");
        let mut out = Vec::new();
        for cl in claims {
            let c = &self.chunks[cl.idx];
            let err = Error::Fetch {
                blob: self.blob.clone(),
                offset: c.offset,
                end: c.next_offset,
                reason: format!("internal error: the {stage} worker panicked ({what})"),
            };
            let published = cl.flight.result.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let res = match published {
                Some(r) => r,
                None => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    *self.stats.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(err.to_string());
                    cl.flight.publish(Err(err.clone()));
                    Err(err)
                }
            };
            self.release(cl);
            out.push((cl.idx, res));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use estargz::compression::{Compression, MemberCompressor};
    use estargz::Digest;

    use crate::{ChunkRef, ChunkStore, FetchConfig, LayerFetcher, RangeSource, StoreConfig};

    /// Serves ranges of a buffer; with `gate`, the first request waits for a signal and every
    /// request panics (a bug in a source, or in what runs under it).
    struct Source {
        blob: Vec<u8>,
        gate: Option<(Mutex<mpsc::Sender<()>>, Mutex<mpsc::Receiver<()>>)>,
    }

    impl RangeSource for Source {
        fn name(&self) -> &str {
            "test"
        }
        fn size(&self) -> u64 {
            self.blob.len() as u64
        }
        fn read_ranges(&self, ranges: &[(u64, u64)]) -> crate::Result<Vec<Vec<u8>>> {
            if let Some((entered, go)) = &self.gate {
                if entered.lock().unwrap().send(()).is_ok() {
                    let _ = go.lock().unwrap().recv_timeout(Duration::from_secs(10));
                }
                panic!("source exploded");
            }
            Ok(ranges.iter().map(|&(o, l)| self.blob.get(o as usize..(o + l) as usize).unwrap_or_default().to_vec()).collect())
        }
    }

    fn fetcher(src: Source, chunks: Vec<ChunkRef>) -> (Arc<LayerFetcher>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(StoreConfig::new(dir.path())).unwrap();
        let cfg = FetchConfig {
            wait_timeout: Duration::from_secs(60),
            ..Default::default()
        };
        (Arc::new(LayerFetcher::new("blob", chunks, Arc::new(src), store, cfg)), dir)
    }

    fn chunk(offset: u64, next_offset: u64, inner_offset: u64, size: u64, content: &[u8]) -> ChunkRef {
        ChunkRef {
            digest: Some(Digest::of(content)),
            offset,
            next_offset,
            inner_offset,
            size,
            codec: crate::Codec::GzipMembers,
            compressed_digest: None,
            resume: None,
            slot: None,
        }
    }

    #[test]
    fn a_fill_thread_that_panics_fails_its_waiting_readers_at_once() {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel();
        let src = Source {
            blob: vec![0; 64],
            gate: Some((Mutex::new(entered_tx), Mutex::new(go_rx))),
        };
        let (f, _dir) = fetcher(src, vec![chunk(10, 40, 0, 1, b"x")]);
        let fill = f.spawn_fill(vec![0..u64::MAX], false, Duration::ZERO, Arc::new(AtomicBool::new(false))).unwrap();
        entered_rx.recv_timeout(Duration::from_secs(10)).expect("the prefetch asked the source");
        drop(entered_rx); // later requests panic at once
        // A reader joins the prefetch's flight, then the prefetch dies.
        let reader = {
            let f = f.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                (f.get(0), t.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        go_tx.send(()).unwrap();
        fill.join().expect("the fill thread does not die of it");
        let (res, waited) = reader.join().unwrap();
        let e = res.expect_err("nothing to read");
        assert!(e.to_string().contains("panicked"), "{e}");
        assert!(waited < Duration::from_secs(10), "the reader waited {waited:?}, as for a stuck flight");
        assert!(f.inflight.lock().unwrap().is_empty(), "no claim is left in flight");
        // Later readers fetch anew (and fail the same way), they do not join a dead flight.
        let t = Instant::now();
        assert!(f.get(0).is_err());
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn hostile_chunk_numbers_are_errors_not_panics() {
        let mut blob = vec![0u8; 10];
        MemberCompressor::new(Compression::Gzip, 6).unwrap().compress(b"xy", &mut blob);
        let end = blob.len() as u64;
        let hostile = vec![
            chunk(10, end, u64::MAX - 1, 2, b"y"),
            chunk(10, end, 1, u64::MAX, b"y"),
            chunk(10, end, 0, 1 << 62, b"xy"),
            chunk(10, 5, 0, 1, b"x"),
            chunk(10, u64::MAX, 0, 1, b"x"),
        ];
        for c in hostile {
            let (f, _dir) = fetcher(Source { blob: blob.clone(), gate: None }, vec![c.clone()]);
            // Through the fill thread (prefetch and background pass) ...
            let fill = f.spawn_fill(vec![0..u64::MAX], true, Duration::ZERO, Arc::new(AtomicBool::new(false))).unwrap();
            // ... and through a reader.
            let t = Instant::now();
            assert!(f.get(0).is_err(), "{c:?}");
            assert!(t.elapsed() < Duration::from_secs(10), "{c:?}");
            f.close();
            fill.join().expect("no panic in the fill thread");
            assert!(f.inflight.lock().unwrap().is_empty(), "{c:?}");
        }
        // The same member read honestly works.
        let (f, _dir) = fetcher(Source { blob, gate: None }, vec![chunk(10, end, 1, 1, b"y")]);
        assert_eq!(f.get(0).unwrap().as_slice(), b"y");
    }
}
