//! Member compression and decompression for the two codecs.
//!
//! A "member" is one independently decompressible unit: a gzip member (eStargz) or a zstd frame
//! (zstd:chunked). Members are compressed whole from memory: they are bounded by the chunk size,
//! which lets gzip use libdeflate (faster and denser than zlib at the same level) and lets
//! members be compressed on any thread without changing a single output byte.

use crate::error::{Error, Result};
use index::Codec;

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
    /// How the model decodes this codec's chunks.
    pub fn codec(self) -> Codec {
        match self {
            Compression::Gzip => Codec::GzipMembers,
            Compression::Zstd => Codec::ZstdFrames,
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
/// `offset`, for error messages). Fails if the members hold fewer bytes. The decoding itself is
/// the model crate's ([`index::codec::decode`]), shared with the store's fetch workers; its
/// memory is bounded by `len`, never by what the compressed data claims.
pub fn decompress_range(c: Compression, compressed: &[u8], skip: u64, len: usize, offset: u64, what: &str) -> Result<Vec<u8>> {
    index::codec::decode(c.codec(), compressed, skip, len).map_err(|e| Error::Decompress {
        what: what.to_string(),
        offset,
        reason: e.reason,
    })
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
}
