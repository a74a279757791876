//! Member compression and decompression for the two codecs.
//!
//! A "member" is one independently decompressible unit: a gzip member (eStargz) or a zstd frame
//! (zstd:chunked). Members are compressed whole from memory: they are bounded by the chunk size,
//! which lets gzip use libdeflate (faster and denser than zlib at the same level) and lets
//! members be compressed on any thread without changing a single output byte.

use std::io::Read;

use crate::error::{Error, Result};
use crate::limits::DECODE_SLACK;

/// Codec of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
}

impl Compression {
    /// Default level: 9 for gzip (as the reference converter), 3 for zstd (zstd's default, as
    /// the reference's `SpeedDefault`).
    pub fn default_level(self) -> u32 {
        match self {
            Compression::Gzip => 9,
            Compression::Zstd => 3,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// A reusable per-thread compressor.
pub enum MemberCompressor {
    Gzip(libdeflater::Compressor),
    Zstd(zstd::bulk::Compressor<'static>),
}

impl MemberCompressor {
    pub fn new(c: Compression, level: u32) -> Result<Self> {
        Ok(match c {
            Compression::Gzip => {
                let lvl = libdeflater::CompressionLvl::new(level as i32)
                    .map_err(|_| Error::InvalidArgument(format!("gzip level {level} is outside 0..=12")))?;
                MemberCompressor::Gzip(libdeflater::Compressor::new(lvl))
            }
            Compression::Zstd => {
                if !(1..=22).contains(&level) {
                    return Err(Error::InvalidArgument(format!("zstd level {level} is outside 1..=22")));
                }
                let mut z = zstd::bulk::Compressor::new(level as i32)
                    .map_err(|e| Error::InvalidArgument(format!("zstd level {level}: {e}")))?;
                z.include_checksum(true).map_err(|e| Error::InvalidArgument(format!("zstd: {e}")))?;
                z.include_contentsize(true).map_err(|e| Error::InvalidArgument(format!("zstd: {e}")))?;
                MemberCompressor::Zstd(z)
            }
        })
    }

    /// Compresses `data` into one complete member, appending to `out`.
    pub fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) {
        match self {
            MemberCompressor::Gzip(c) => {
                let start = out.len();
                out.resize(start + c.gzip_compress_bound(data.len()), 0);
                let n = c.gzip_compress(data, &mut out[start..]).expect("buffer sized by compress_bound");
                out.truncate(start + n);
            }
            MemberCompressor::Zstd(c) => {
                let start = out.len();
                out.resize(start + zstd::zstd_safe::compress_bound(data.len()), 0);
                let n = c.compress_to_buffer(data, &mut out[start..]).expect("buffer sized by compress_bound");
                out.truncate(start + n);
            }
        }
    }
}

/// Decompresses the first `want` bytes of the member(s) in `compressed`, which starts at blob
/// offset `offset` (for error messages). Fails if fewer than `want` bytes come out.
pub fn decompress_prefix(c: Compression, compressed: &[u8], want: usize, offset: u64, what: &str) -> Result<Vec<u8>> {
    decompress_range(c, compressed, 0, want, offset, what)
}

/// Decompresses bytes `skip..skip + len` of the member(s) in `compressed` (blob offset
/// `offset`, for error messages). Fails if the members hold fewer bytes.
///
/// Memory is bounded by `len`, never by what the compressed data claims: a gzip trailer's ISIZE
/// is only a hint for the fast path, taken when the whole member is at most
/// [`DECODE_SLACK`] bytes larger than `len` (libdeflate checks it against the real output);
/// otherwise the decoder streams, discarding the skipped bytes through a small buffer and
/// stopping once `len` bytes are out, however much more the member would inflate to. Callers
/// bound `len` (chunks by [`crate::limits::MAX_CHUNK_SIZE`], the TOC by its size limit).
pub fn decompress_range(c: Compression, compressed: &[u8], skip: u64, len: usize, offset: u64, what: &str) -> Result<Vec<u8>> {
    let err = |reason: String| Error::Decompress {
        what: what.to_string(),
        offset,
        reason,
    };
    if c == Compression::Gzip {
        if let Some(out) = gzip_whole_member(compressed, skip, len) {
            return Ok(out);
        }
    }
    let mut out = vec![0u8; len];
    let mut filled = 0;
    let res = match c {
        Compression::Gzip => skip_then_read(flate2::read::MultiGzDecoder::new(compressed), skip, &mut out, &mut filled),
        Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(compressed) {
            Ok(d) => skip_then_read(d, skip, &mut out, &mut filled),
            Err(e) => Err(e),
        },
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

    #[test]
    fn round_trip_both() {
        let data: Vec<u8> = (0..100_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for c in [Compression::Gzip, Compression::Zstd] {
            let mut mc = MemberCompressor::new(c, c.default_level()).unwrap();
            let mut out = Vec::new();
            mc.compress(&data, &mut out);
            assert_eq!(decompress_prefix(c, &out, data.len(), 0, "t").unwrap(), data);
            assert_eq!(decompress_prefix(c, &out, 10, 0, "t").unwrap(), data[..10]);
            assert!(decompress_prefix(c, &out, data.len() + 1, 0, "t").is_err());
            assert!(decompress_prefix(c, &out[..out.len() / 2], data.len(), 0, "t").is_err());
            assert_eq!(decompress_range(c, &out, 1000, 10, 0, "t").unwrap(), data[1000..1010]);
            assert_eq!(decompress_range(c, &out, data.len() as u64 - 10, 10, 0, "t").unwrap(), data[data.len() - 10..]);
            assert!(decompress_range(c, &out, data.len() as u64 - 10, 11, 0, "t").is_err());
            assert!(decompress_range(c, &out, data.len() as u64 + 1, 0, 0, "t").is_err());
        }
    }

    #[test]
    fn a_lying_trailer_costs_nothing() {
        // A member of 300 KiB of zeros whose trailer claims 1 GiB: the fast path must not trust
        // it (libdeflate rejects the mismatch), and the slow path reads only what is asked.
        let mut mc = MemberCompressor::new(Compression::Gzip, 6).unwrap();
        let mut out = Vec::new();
        mc.compress(&vec![0u8; 300 << 10], &mut out);
        let n = out.len();
        out[n - 4..].copy_from_slice(&(1u32 << 30).to_le_bytes());
        assert_eq!(decompress_prefix(Compression::Gzip, &out, 1, 0, "t").unwrap(), [0]);
        assert_eq!(gzip_whole_member(&out, 0, 1), None);
    }
}
