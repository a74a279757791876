//! SOCI spans kept whole: reading one file of a span does not decode and store every other.
//!
//! A SOCI span is verified as a whole (its digest covers the compressed bytes), so a read of
//! any file in it fetches all of it. The first version decoded every other file's piece of
//! the span right away and stored each as its own chunk: on `test/debian:12` a script that
//! reads a few dozen files created thousands of chunk files (and their aliases), and those
//! inode allocations were most of the CPU time of its run. Now the other pieces are claimed
//! only so that a concurrent reader of one of them waits for this fetch ([`Claim::optional`]);
//! the ones nobody waited for are released undecoded, and the verified span is stored once,
//! keyed by its own digest (so reading it back is checked like any chunk). A later read of
//! such a piece is served from the span's inflated output if it is still in memory, else by
//! inflating the stored span again — never by fetching it again while it is stored.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use index::Digest;
use tracing::warn;

use super::{Claim, LayerFetcher};
use crate::error::Result;

impl LayerFetcher {
    /// The bytes of `cl`'s chunk without a request, if its span is here: inflated in memory
    /// (no hash, no inflation), or stored whole (checked by the store as it is read back).
    pub(super) fn decode_local(&self, cl: &Claim) -> Option<Result<Arc<Vec<u8>>>> {
        let c = &self.chunks[cl.idx];
        let span = c.compressed_digest?;
        if let Some(data) = self.resumed_slice(c.offset, c.next_offset, c.inner_offset, c.size) {
            return Some(self.store.put_alias(&cl.digest, &Digest::of(&data)).map(|()| data));
        }
        let bytes = self.store.get(&span)?;
        if bytes.len() as u64 != c.next_offset.saturating_sub(c.offset) {
            return None; // not this range (a zTOC naming one digest for two ranges); fetch it
        }
        Some(self.decode_range(cl, &bytes, c.offset, true))
    }

    /// Whether chunk `cl`'s span is here (see [`Self::decode_local`]), without reading it.
    pub(super) fn span_is_local(&self, cl: &Claim) -> bool {
        let c = &self.chunks[cl.idx];
        let Some(span) = c.compressed_digest else { return false };
        self.has_resumed(c.offset, c.next_offset, c.inner_offset, c.size) || self.store.contains_len(&span, c.next_offset.saturating_sub(c.offset))
    }

    /// Releases an optional claim nobody joined, leaving its chunk unfetched; false (and the
    /// claim kept) if a reader is waiting for it.
    pub(super) fn drop_unwanted(&self, cl: &Claim) -> bool {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        match inflight.get(&cl.digest) {
            Some(f) if Arc::ptr_eq(f, &cl.flight) => {
                if f.waiters.load(Ordering::Relaxed) > 0 {
                    return false;
                }
                inflight.remove(&cl.digest);
                true
            }
            // Not ours any more: nothing to release.
            _ => true,
        }
    }

    /// Stores whole, under their digests, the spans (inside the fetched `range` starting at
    /// `range_start`) of the optional chunks `optional`, which may be left undecoded.
    pub(super) fn keep_spans(&self, optional: &[usize], range: &[u8], range_start: u64) {
        let mut done = std::collections::HashSet::new();
        for &i in optional {
            let c = &self.chunks[i];
            let Some(want) = c.compressed_digest else { continue };
            if !done.insert(want) || self.store.contains(&want) {
                continue;
            }
            let from = c.offset.checked_sub(range_start).and_then(|f| usize::try_from(f).ok());
            let to = c.next_offset.checked_sub(range_start).and_then(|t| usize::try_from(t).ok());
            let Some(bytes) = from.zip(to).and_then(|(f, t)| range.get(f..t)) else { continue };
            // Hashed again here, off the reader's path: what is stored under a digest must be it.
            if Digest::of(bytes) != want {
                continue; // the urgent chunk's decode reported it
            }
            if let Err(e) = self.store.put(&want, &Arc::new(bytes.to_vec())) {
                warn!(blob = %self.blob, span = %want, error = %e, "span not written to the disk cache; its other files will fetch it again");
            }
        }
    }
}
