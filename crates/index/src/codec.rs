//! How a chunk's compressed bytes turn into its uncompressed bytes.
//!
//! A codec decodes a compressed range fetched from the blob and returns bytes
//! `skip..skip + len` of what it inflates to. eStargz stores each chunk in gzip members,
//! zstd:chunked in zstd frames; SOCI will add "inflate an unmodified gzip stream from a
//! checkpoint with a 32 KiB window", which needs the checkpoint as input and so becomes a variant
//! carrying it. One implementation serves every reader (the format crate's own reader, the
//! store's fetch workers), so a bound or a fast path is fixed once.
//!
//! Memory is bounded by `len`, never by what the compressed data claims: a gzip trailer's ISIZE
//! is only a hint for the fast path, taken when the whole member is at most [`DECODE_SLACK`]
//! bytes larger than `len` (libdeflate checks it against the real output); otherwise the decoder
//! streams, discarding the skipped bytes through a small buffer and stopping once `len` bytes are
//! out, however much more the data would inflate to. Callers bound `len` (chunks by
//! [`crate::limits::MAX_CHUNK_SIZE`]).

use std::io::Read;

use crate::limits::DECODE_SLACK;

/// How a chunk's compressed range is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Codec {
    /// One or more complete gzip members (eStargz).
    GzipMembers,
    /// One or more complete zstd frames (zstd:chunked).
    ZstdFrames,
    /// Stored as is (an uncompressed tar layer).
    Uncompressed,
    /// A slice of one unmodified gzip stream, resumed at a zran checkpoint (SOCI): decoding
    /// needs the chunk's [`crate::zran::Resume`] ([`decode_resumed`]).
    GzipResume,
}

impl Codec {
    pub fn name(self) -> &'static str {
        match self {
            Codec::GzipMembers => "gzip",
            Codec::ZstdFrames => "zstd",
            Codec::Uncompressed => "none",
            Codec::GzipResume => "gzip-checkpoint",
        }
    }
}

/// Why a range did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{codec} data does not decode: {reason}")]
pub struct DecodeError {
    pub codec: &'static str,
    pub reason: String,
}

/// Decodes bytes `skip..skip + len` of what `compressed` inflates to. Fails if it holds fewer.
pub fn decode(codec: Codec, compressed: &[u8], skip: u64, len: usize) -> Result<Vec<u8>, DecodeError> {
    let err = |reason: String| DecodeError { codec: codec.name(), reason };
    if codec == Codec::Uncompressed {
        let from = usize::try_from(skip).ok();
        return from
            .and_then(|f| compressed.get(f..f.checked_add(len)?))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| err(format!("range holds only {} bytes, {} expected", compressed.len(), skip.saturating_add(len as u64))));
    }
    if codec == Codec::GzipMembers {
        if let Some(out) = gzip_whole_member(compressed, skip, len) {
            return Ok(out);
        }
    }
    let mut out = vec![0u8; len];
    let mut filled = 0;
    let res = match codec {
        Codec::GzipMembers => skip_then_read(flate2::read::MultiGzDecoder::new(compressed), skip, &mut out, &mut filled),
        Codec::ZstdFrames => match zstd::stream::read::Decoder::with_buffer(compressed) {
            Ok(d) => skip_then_read(d, skip, &mut out, &mut filled),
            Err(e) => Err(e),
        },
        Codec::Uncompressed => unreachable!("handled above"),
        Codec::GzipResume => return Err(err("a checkpoint is needed to decode (decode_resumed)".into())),
    };
    let skipped = res.map_err(|e| err(e.to_string()))?;
    if skipped < skip || filled < len {
        let got = skipped + filled as u64;
        let want = skip.saturating_add(len as u64);
        return Err(err(format!("member holds only {got} bytes, {want} expected")));
    }
    Ok(out)
}

/// Fast path: the range is exactly one gzip member whose trailer states a size close to `len`.
fn gzip_whole_member(compressed: &[u8], skip: u64, len: usize) -> Option<Vec<u8>> {
    if compressed.len() < 18 || compressed[..2] != [0x1f, 0x8b] {
        return None;
    }
    let isize = u64::from(u32::from_le_bytes(compressed[compressed.len() - 4..].try_into().ok()?));
    let want = skip.checked_add(len as u64)?;
    if isize < want || isize - len as u64 > DECODE_SLACK {
        return None;
    }
    let mut out = vec![0u8; usize::try_from(isize).ok()?];
    let mut d = libdeflater::Decompressor::new();
    match d.gzip_decompress(compressed, &mut out) {
        Ok(n) if n as u64 == isize => {
            // `skip <= isize - len <= DECODE_SLACK` here, so this moves little.
            out.truncate(want as usize);
            out.drain(..skip as usize);
            Some(out)
        }
        _ => None,
    }
}

/// Discards `skip` bytes of `r`, then fills `out`; returns how many bytes were skipped (fewer
/// than `skip` only at the end of the data).
fn skip_then_read<R: Read>(mut r: R, skip: u64, out: &mut [u8], filled: &mut usize) -> std::io::Result<u64> {
    let skipped = std::io::copy(&mut (&mut r).take(skip), &mut std::io::sink())?;
    if skipped == skip {
        read_into(r, out, filled)?;
    }
    Ok(skipped)
}

fn read_into<R: Read>(mut r: R, out: &mut [u8], filled: &mut usize) -> std::io::Result<()> {
    while *filled < out.len() {
        match r.read(&mut out[*filled..]) {
            Ok(0) => break,
            Ok(n) => *filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn every_codec_decodes_ranges_and_refuses_short_data() {
        let data: Vec<u8> = (0..100_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let encoded = [
            (Codec::GzipMembers, gzip(&data)),
            (Codec::ZstdFrames, zstd::bulk::compress(&data, 3).unwrap()),
            (Codec::Uncompressed, data.clone()),
        ];
        for (c, out) in encoded {
            assert_eq!(decode(c, &out, 0, data.len()).unwrap(), data, "{c:?}");
            assert_eq!(decode(c, &out, 0, 10).unwrap(), data[..10]);
            assert!(decode(c, &out, 0, data.len() + 1).is_err());
            assert!(decode(c, &out[..out.len() / 2], 0, data.len()).is_err());
            assert_eq!(decode(c, &out, 1000, 10).unwrap(), data[1000..1010]);
            assert_eq!(decode(c, &out, data.len() as u64 - 10, 10).unwrap(), data[data.len() - 10..]);
            assert!(decode(c, &out, data.len() as u64 - 10, 11).is_err());
            assert!(decode(c, &out, data.len() as u64 + 1, 0).is_err());
            assert!(decode(c, &out, u64::MAX, 1).is_err());
        }
    }

    #[test]
    fn a_lying_trailer_costs_nothing() {
        // A member of 300 KiB of zeros whose trailer claims 1 GiB: the fast path must not trust
        // it (libdeflate rejects the mismatch), and the slow path reads only what is asked.
        let mut out = gzip(&vec![0u8; 300 << 10]);
        let n = out.len();
        out[n - 4..].copy_from_slice(&(1u32 << 30).to_le_bytes());
        assert_eq!(decode(Codec::GzipMembers, &out, 0, 1).unwrap(), [0]);
        assert_eq!(gzip_whole_member(&out, 0, 1), None);
    }
}

/// Decodes bytes `skip..skip + len` of a gzip stream resumed at `resume`; `compressed` starts at
/// the checkpoint's fetch offset. Stops inflating as soon as `len` bytes are out; output that
/// starts at the checkpoint and reaches its span's end is checked against the next checkpoint's
/// window ([`crate::zran::Resume::check_span_end`]).
pub fn decode_resumed(resume: &crate::zran::Resume, compressed: &[u8], skip: u64, len: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = vec![0u8; len];
    let err = |e: crate::zran::ResumeError| DecodeError { codec: Codec::GzipResume.name(), reason: e.to_string() };
    crate::zran::resume_inflate(resume, compressed, skip, &mut out).map_err(err)?;
    if skip == 0 {
        resume.check_span_end(&out).map_err(err)?;
    }
    Ok(out)
}
