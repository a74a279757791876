//! Decoding one fetched chunk: bounds, decompression, verification.

use std::sync::Arc;

use index::Digest;

use super::{Claim, LayerFetcher, ResumedSpan};
use crate::error::{Error, Result};

/// How far short of its span's end an inflation may stop and still be carried to the end (to
/// check the next checkpoint's window): a few milliseconds of inflating at most.
const SPAN_END_SLACK: u64 = 512 << 10;

impl LayerFetcher {
    /// Decompresses and verifies one claimed chunk from the bytes of the range holding it.
    ///
    /// The reference's numbers come from the TOC: they are bounds-checked here (the member must
    /// lie in the range, the decoded size within [`index::limits::MAX_CHUNK_SIZE`]) so that a
    /// hostile value is an error for this chunk's readers, not a panic in a fetch thread.
    pub(super) fn decode(&self, cl: &Claim, range: &[u8], range_start: u64) -> Result<Arc<Vec<u8>>> {
        self.decode_range(cl, range, range_start, false)
    }

    /// [`Self::decode`]; with `range_verified`, the range's bytes are known to hash to the
    /// chunk's compressed digest already (a span read back from the store, which checks it).
    pub(super) fn decode_range(&self, cl: &Claim, range: &[u8], range_start: u64, range_verified: bool) -> Result<Arc<Vec<u8>>> {
        let c = &self.chunks[cl.idx];
        let corrupt = |reason: String| Error::Corrupt {
            digest: cl.digest.to_string(),
            blob: self.blob.clone(),
            offset: c.offset,
            reason,
        };
        let as_chunk = index::Chunk {
            offset: c.offset,
            end: c.next_offset,
            codec: c.codec,
            inner_offset: c.inner_offset,
            size: c.size,
            verify: match c.compressed_digest {
                Some(d) => index::Verify::Compressed(d),
                None => index::Verify::Uncompressed(cl.digest),
            },
            resume: c.resume.clone(),
        };
        as_chunk.check().map_err(|e| corrupt(e.to_string()))?;
        let member = c
            .offset
            .checked_sub(range_start)
            .zip(c.next_offset.checked_sub(range_start))
            .and_then(|(from, to)| range.get(usize::try_from(from).ok()?..usize::try_from(to).ok()?))
            .ok_or_else(|| corrupt(format!("member {}..{} is not inside the fetched range starting at {range_start}", c.offset, c.next_offset)))?;
        if let Some(data) = self.resumed_slice(c.offset, c.next_offset, c.inner_offset, c.size) {
            // Inflated from this range's verified bytes before: no second hash or inflation.
            self.store.put_alias(&cl.digest, &Digest::of(&data))?;
            return Ok(data);
        }
        if let Some(want) = c.compressed_digest.filter(|_| !range_verified) {
            let got = Digest::of(member);
            if got != want {
                return Err(corrupt(format!("compressed range {}..{} hashes to {got}, the index says {want}", c.offset, c.next_offset)));
            }
        }
        let data = match (&c.resume, c.codec) {
            (Some(resume), index::Codec::GzipResume) => {
                // Inflate as far as any chunk of this range needs, once; slice this one out.
                let mut need = self.resumed_need.get(&(c.offset, c.next_offset)).copied().unwrap_or(0).max(c.inner_offset + c.size);
                // Close to the span's end, inflate to it: the output is then checked against
                // the next checkpoint's window (a wrong window is an error, not wrong bytes).
                if let Some(end) = &resume.span_end {
                    if end.len.saturating_sub(need) <= SPAN_END_SLACK {
                        need = need.max(end.len);
                    }
                }
                let need = need.min(index::limits::MAX_CHUNK_SIZE.max(c.inner_offset + c.size));
                let t = std::time::Instant::now();
                let whole = index::decode_resumed(resume, member, 0, need as usize).map_err(|e| corrupt(e.to_string()))?;
                tracing::debug!(blob = %self.blob, offset = c.offset, out = need, us = t.elapsed().as_micros() as u64, "span inflated");
                let whole = Arc::new(whole);
                let slice = whole[c.inner_offset as usize..(c.inner_offset + c.size) as usize].to_vec();
                self.remember_resumed(c.offset, c.next_offset, whole);
                Ok(slice)
            }
            _ => index::decode(c.codec, member, c.inner_offset, c.size as usize),
        }
        .map_err(|e| corrupt(e.to_string()))?;
        if data.len() as u64 != c.size {
            return Err(corrupt(format!("decoded to {} bytes, the TOC declares {}", data.len(), c.size)));
        }
        let actual = Digest::of(&data);
        if c.compressed_digest.is_some() {
            // Verified through the compressed range: remember what the bytes hash to, so that
            // every later read of the stored chunk is checked against its content.
            self.store.put_alias(&cl.digest, &actual)?;
        } else if actual != cl.digest {
            return Err(corrupt(format!("content hashes to {actual}")));
        }
        Ok(Arc::new(data))
    }

    /// A chunk's bytes from an already inflated (and verified) resumed range, if kept.
    pub(super) fn resumed_slice(&self, offset: u64, end: u64, inner: u64, size: u64) -> Option<Arc<Vec<u8>>> {
        let mut kept = self.resumed.lock().unwrap();
        let at = kept.iter().position(|s| s.offset == offset && s.end == end)?;
        let to = inner.checked_add(size)?;
        if to > kept[at].data.len() as u64 {
            return None;
        }
        let s = kept.remove(at)?;
        let out = Arc::new(s.data[inner as usize..to as usize].to_vec());
        kept.push_front(s);
        Some(out)
    }

    /// Whether [`Self::resumed_slice`] would answer, without copying the bytes or touching the
    /// recency order.
    pub(super) fn has_resumed(&self, offset: u64, end: u64, inner: u64, size: u64) -> bool {
        let Some(to) = inner.checked_add(size) else { return false };
        self.resumed.lock().unwrap().iter().any(|s| s.offset == offset && s.end == end && to <= s.data.len() as u64)
    }

    fn remember_resumed(&self, offset: u64, end: u64, data: Arc<Vec<u8>>) {
        let mut kept = self.resumed.lock().unwrap();
        kept.retain(|s| !(s.offset == offset && s.end == end));
        kept.push_front(ResumedSpan { offset, end, data });
        let mut total = 0;
        let keep = kept
            .iter()
            .position(|s| {
                total += s.data.len();
                total > super::RESUMED_BYTES_KEPT
            })
            .unwrap_or(kept.len())
            .max(1);
        kept.truncate(keep);
    }
}
