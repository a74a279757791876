//! Reading uncompressed bytes out of compressed spans, starting at a checkpoint.
//!
//! A gzip span is resumed by priming the inflater with the checkpoint's leftover bits (taken
//! from the span's first byte), presetting its 32 KiB window, and inflating. A span can hold
//! the end of one gzip member and the start of the next (`pigz`-style layers): at a member's
//! end the trailer and next header are skipped and inflation restarts with an empty window,
//! exactly as the stream itself does. Inflation stops as soon as the requested bytes are out,
//! so a small file near a span's start costs a fraction of the span's CPU.

use sha2::{Digest as _, Sha256};

use index::zran::{inflate_from_checkpoint, InflateError, ResumeError};
use crate::zinfo::{Checkpoint, SpanTable};
use crate::ztoc::{Entry, EntryKind, Ztoc};

/// Why bytes could not be produced from a span.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("span {span}: {source}")]
    Inflate { span: usize, source: InflateError },
    #[error("span {span}: the compressed bytes end {missing} bytes short of the request")]
    Truncated { span: usize, missing: u64 },
    #[error("span {span}: {reason}")]
    Framing { span: usize, reason: String },
    #[error("span {span}: compressed bytes hash to {actual}, the zTOC says {expected}")]
    Digest { span: usize, expected: String, actual: String },
    #[error("span {span} does not exist ({spans} spans)")]
    NoSuchSpan { span: usize, spans: usize },
    #[error("{0}")]
    Source(String),
}

/// Checks one span's compressed bytes against the zTOC's digest.
pub fn verify_span(ztoc: &Ztoc, span: usize, compressed: &[u8]) -> Result<(), ExtractError> {
    let expected = ztoc
        .span_digests
        .get(span)
        .ok_or(ExtractError::NoSuchSpan { span, spans: ztoc.span_digests.len() })?;
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(compressed)));
    if &actual != expected {
        return Err(ExtractError::Digest { span, expected: expected.clone(), actual });
    }
    Ok(())
}

/// Fills `out` with the uncompressed bytes that start `skip` bytes after span `span`'s
/// start. `data` is the compressed stream from the span's fetch start (see
/// [`SpanTable::compressed_range`]) onwards, for as many spans as the request crosses.
pub fn inflate_at(
    spans: &SpanTable,
    span: usize,
    data: &[u8],
    skip: u64,
    out: &mut [u8],
) -> Result<(), ExtractError> {
    match spans {
        SpanTable::Tar { .. } => {
            let start = usize::try_from(skip).unwrap_or(usize::MAX);
            let available = data.len().saturating_sub(start);
            if available < out.len() {
                return Err(ExtractError::Truncated { span, missing: (out.len() - available) as u64 });
            }
            out.copy_from_slice(&data[start..start + out.len()]);
            Ok(())
        }
        SpanTable::Gzip { checkpoints, .. } => {
            let cp = checkpoints
                .get(span)
                .ok_or(ExtractError::NoSuchSpan { span, spans: checkpoints.len() })?;
            inflate_from(cp, span, data, skip, out)
        }
    }
}

fn inflate_from(cp: &Checkpoint, span: usize, data: &[u8], skip: u64, out: &mut [u8]) -> Result<(), ExtractError> {
    inflate_from_checkpoint(cp.bits, &cp.window, data, skip, out).map_err(|e| match e {
        ResumeError::Inflate(source) => ExtractError::Inflate { span, source },
        ResumeError::Truncated { missing } => ExtractError::Truncated { span, missing },
        ResumeError::Framing(reason) => ExtractError::Framing { span, reason },
        // `inflate_from_checkpoint` does not check span ends (`index::decode_resumed` does).
        e @ ResumeError::WindowMismatch { .. } => ExtractError::Framing { span, reason: e.to_string() },
    })
}

/// Range reads of a layer blob.
pub trait BlobRange {
    fn read_range(&self, start: u64, end: u64) -> Result<Vec<u8>, String>;
}

impl BlobRange for [u8] {
    fn read_range(&self, start: u64, end: u64) -> Result<Vec<u8>, String> {
        self.get(start as usize..end as usize)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| format!("range {start}..{end} is outside the {}-byte blob", self.len()))
    }
}

/// Reads a whole regular file through the zTOC: range-reads exactly the spans it covers,
/// verifies each against its digest, inflates from the first one's checkpoint.
pub fn read_entry(ztoc: &Ztoc, blob: &(impl BlobRange + ?Sized), entry: &Entry) -> Result<Vec<u8>, ExtractError> {
    if entry.kind != EntryKind::Reg || entry.size == 0 {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    out.try_reserve_exact(entry.size as usize)
        .map_err(|_| ExtractError::Source(format!("{} bytes for {:?} cannot be allocated", entry.size, entry.name)))?;
    out.resize(entry.size as usize, 0);
    let (first, last) = ztoc.spans_of(entry);
    let (start, _) = ztoc.spans.compressed_range(first, ztoc.compressed_size);
    let (_, end) = ztoc.spans.compressed_range(last, ztoc.compressed_size);
    let data = blob.read_range(start, end).map_err(ExtractError::Source)?;
    if data.len() as u64 != end - start {
        return Err(ExtractError::Source(format!("range {start}..{end} returned {} bytes", data.len())));
    }
    for span in first..=last {
        let (s, e) = ztoc.spans.compressed_range(span, ztoc.compressed_size);
        verify_span(ztoc, span, &data[(s - start) as usize..(e - start) as usize])?;
    }
    let skip = entry.offset - ztoc.spans.uncompressed_start(first);
    inflate_at(&ztoc.spans, first, &data, skip, &mut out)?;
    Ok(out)
}
