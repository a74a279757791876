//! Footers: the fixed-size trailer that says where the TOC is.
//!
//! Four variants exist in the wild and a reader meets all of them:
//!
//! | kind | size | TOC location |
//! |---|---|---|
//! | eStargz | 51 B | gzip empty member, RFC 1952 extra subfield `SG` = `%016x` offset + `STARGZ` |
//! | legacy stargz (CRFS) | 47 B | same, but the extra field *is* `%016xSTARGZ` (no subfield header) |
//! | zstd:chunked | 40 B | payload of a zstd skippable frame: offset, lengths, type, `GnUlInUx` |
//! | external TOC | 46 B | gzip empty member with subfield `STARGZEXTERNALTOC`: TOC is elsewhere |
//!
//! Parsing is exact-byte for the fixed parts; anything else is "not this kind", and only when
//! no kind matches do we report the blob as not lazily pullable.

use crate::error::{Error, Result};

pub const ESTARGZ_FOOTER_SIZE: usize = 51;
pub const LEGACY_FOOTER_SIZE: usize = 47;
pub const EXTERNAL_TOC_FOOTER_SIZE: usize = 46;
pub const ZSTD_FOOTER_SIZE: usize = 40;
/// The largest footer; reading this many bytes from the end always suffices to find any footer.
pub const MAX_FOOTER_SIZE: usize = ESTARGZ_FOOTER_SIZE;

/// zstd skippable frame magic (0x184D2A50, little-endian on the wire).
pub const ZSTD_SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
/// Magic closing a zstd:chunked footer.
pub const ZSTD_CHUNKED_MAGIC: &[u8; 8] = b"GnUlInUx";
/// zstd:chunked manifest type "CRFS" (the TOC format shared with eStargz).
pub const ZSTD_MANIFEST_TYPE_CRFS: u64 = 1;

const GZIP_EXTRA_HEADER: [u8; 10] = [0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff];
const EMPTY_STORED_BLOCK_AND_TRAILER: [u8; 13] = [0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];

/// Which footer a blob ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FooterKind {
    Estargz,
    LegacyStargz,
    ZstdChunked,
    ExternalToc,
}

impl FooterKind {
    pub fn size(self) -> usize {
        match self {
            FooterKind::Estargz => ESTARGZ_FOOTER_SIZE,
            FooterKind::LegacyStargz => LEGACY_FOOTER_SIZE,
            FooterKind::ZstdChunked => ZSTD_FOOTER_SIZE,
            FooterKind::ExternalToc => EXTERNAL_TOC_FOOTER_SIZE,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            FooterKind::Estargz => "eStargz (gzip, 51-byte footer)",
            FooterKind::LegacyStargz => "legacy stargz (gzip, 47-byte footer)",
            FooterKind::ZstdChunked => "zstd:chunked (40-byte footer)",
            FooterKind::ExternalToc => "eStargz with external TOC (46-byte footer)",
        }
    }
}

/// A parsed footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub kind: FooterKind,
    /// Blob offset of the TOC: the TOC gzip member (gzip kinds) or the compressed TOC bytes
    /// inside their skippable frame (zstd:chunked).
    pub toc_offset: u64,
    /// Length of the compressed TOC bytes.
    pub toc_compressed_len: u64,
    /// Uncompressed TOC length when the footer states it (zstd:chunked only).
    pub toc_uncompressed_len: Option<u64>,
}

/// Encodes the 51-byte eStargz footer for a TOC member at `toc_offset`.
pub fn estargz_footer(toc_offset: u64) -> [u8; ESTARGZ_FOOTER_SIZE] {
    let mut f = [0u8; ESTARGZ_FOOTER_SIZE];
    f[..10].copy_from_slice(&GZIP_EXTRA_HEADER);
    f[10..12].copy_from_slice(&26u16.to_le_bytes());
    f[12..14].copy_from_slice(b"SG");
    f[14..16].copy_from_slice(&22u16.to_le_bytes());
    f[16..38].copy_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    f[38..].copy_from_slice(&EMPTY_STORED_BLOCK_AND_TRAILER);
    f
}

/// Encodes the 47-byte legacy stargz footer (only used by tests: we never write legacy blobs).
pub fn legacy_footer(toc_offset: u64) -> [u8; LEGACY_FOOTER_SIZE] {
    let mut f = [0u8; LEGACY_FOOTER_SIZE];
    f[..10].copy_from_slice(&GZIP_EXTRA_HEADER);
    f[10..12].copy_from_slice(&22u16.to_le_bytes());
    f[12..34].copy_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    f[34..].copy_from_slice(&EMPTY_STORED_BLOCK_AND_TRAILER);
    f
}

/// Encodes the 46-byte external-TOC footer.
pub fn external_toc_footer() -> [u8; EXTERNAL_TOC_FOOTER_SIZE] {
    let mut f = [0u8; EXTERNAL_TOC_FOOTER_SIZE];
    f[..10].copy_from_slice(&GZIP_EXTRA_HEADER);
    f[10..12].copy_from_slice(&21u16.to_le_bytes());
    f[12..14].copy_from_slice(b"SG");
    f[14..16].copy_from_slice(&17u16.to_le_bytes());
    f[16..33].copy_from_slice(b"STARGZEXTERNALTOC");
    f[33..].copy_from_slice(&EMPTY_STORED_BLOCK_AND_TRAILER);
    f
}

/// Encodes the zstd:chunked footer *including* its 8-byte skippable-frame header (48 bytes).
pub fn zstd_chunked_footer(toc_offset: u64, compressed_len: u64, uncompressed_len: u64) -> [u8; 48] {
    let mut f = [0u8; 48];
    f[..4].copy_from_slice(&ZSTD_SKIPPABLE_MAGIC);
    f[4..8].copy_from_slice(&(ZSTD_FOOTER_SIZE as u32).to_le_bytes());
    f[8..16].copy_from_slice(&toc_offset.to_le_bytes());
    f[16..24].copy_from_slice(&compressed_len.to_le_bytes());
    f[24..32].copy_from_slice(&uncompressed_len.to_le_bytes());
    f[32..40].copy_from_slice(&ZSTD_MANIFEST_TYPE_CRFS.to_le_bytes());
    f[40..48].copy_from_slice(ZSTD_CHUNKED_MAGIC);
    f
}

fn parse_hex_offset(s: &[u8]) -> Option<u64> {
    if s.len() != 16 || !s.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

fn try_estargz(f: &[u8]) -> Option<u64> {
    if f[..10] != GZIP_EXTRA_HEADER[..] || f[10..12] != [26, 0] || &f[12..14] != b"SG" || f[14..16] != [22, 0] {
        return None;
    }
    if &f[32..38] != b"STARGZ" || f[38..] != EMPTY_STORED_BLOCK_AND_TRAILER[..] {
        return None;
    }
    parse_hex_offset(&f[16..32])
}

fn try_legacy(f: &[u8]) -> Option<u64> {
    if f[..10] != GZIP_EXTRA_HEADER[..] || f[10..12] != [22, 0] || &f[28..34] != b"STARGZ" {
        return None;
    }
    if f[34..] != EMPTY_STORED_BLOCK_AND_TRAILER[..] {
        return None;
    }
    parse_hex_offset(&f[12..28])
}

fn try_external(f: &[u8]) -> bool {
    f[..10] == GZIP_EXTRA_HEADER[..]
        && f[10..12] == [21, 0]
        && &f[12..14] == b"SG"
        && f[14..16] == [17, 0]
        && &f[16..33] == b"STARGZEXTERNALTOC"
        && f[33..] == EMPTY_STORED_BLOCK_AND_TRAILER[..]
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

/// Finds and parses the footer in `tail`, the last bytes of a blob of `blob_size` bytes
/// (`tail` must hold at least `min(blob_size, MAX_FOOTER_SIZE)` bytes).
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<Footer> {
    let end = |n: usize| -> Option<&[u8]> {
        if tail.len() >= n && blob_size >= n as u64 {
            Some(&tail[tail.len() - n..])
        } else {
            None
        }
    };
    let gzip_footer = |kind: FooterKind, toc_offset: u64| -> Result<Footer> {
        let payload_end = blob_size - kind.size() as u64;
        if toc_offset >= payload_end {
            return Err(Error::InvalidFooter(format!(
                "{} footer points at TOC offset {toc_offset}, outside the blob's {payload_end} payload bytes",
                kind.name()
            )));
        }
        Ok(Footer {
            kind,
            toc_offset,
            toc_compressed_len: payload_end - toc_offset,
            toc_uncompressed_len: None,
        })
    };
    if let Some(off) = end(ESTARGZ_FOOTER_SIZE).and_then(try_estargz) {
        return gzip_footer(FooterKind::Estargz, off);
    }
    if let Some(off) = end(LEGACY_FOOTER_SIZE).and_then(try_legacy) {
        return gzip_footer(FooterKind::LegacyStargz, off);
    }
    if let Some(f) = end(ZSTD_FOOTER_SIZE) {
        if &f[32..40] == ZSTD_CHUNKED_MAGIC {
            let (off, clen, ulen, ty) = (le64(&f[0..8]), le64(&f[8..16]), le64(&f[16..24]), le64(&f[24..32]));
            if ty != ZSTD_MANIFEST_TYPE_CRFS {
                return Err(Error::InvalidFooter(format!("zstd:chunked footer has manifest type {ty}, expected 1 (CRFS)")));
            }
            // The TOC's skippable frame precedes the footer's own 8-byte frame header.
            let limit = blob_size.saturating_sub(ZSTD_FOOTER_SIZE as u64 + 8);
            if off.checked_add(clen).is_none_or(|e| e > limit) || off < 8 {
                return Err(Error::InvalidFooter(format!(
                    "zstd:chunked footer points at TOC bytes {off}+{clen}, outside the blob's {limit} payload bytes"
                )));
            }
            return Ok(Footer {
                kind: FooterKind::ZstdChunked,
                toc_offset: off,
                toc_compressed_len: clen,
                toc_uncompressed_len: Some(ulen),
            });
        }
    }
    if end(EXTERNAL_TOC_FOOTER_SIZE).is_some_and(try_external) {
        return Err(Error::ExternalToc);
    }
    Err(Error::NotEstargz(format!(
        "no eStargz (51 B), legacy stargz (47 B) or zstd:chunked (40 B) footer in the last bytes of this {blob_size}-byte blob; \
         is it a plain tar.gz/tar.zst layer?"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_bytes() {
        // Footer produced by the reference library for a TOC at 0x1d0.
        let f = estargz_footer(0x1d0);
        assert_eq!(
            hex::encode(f),
            concat!(
                "1f8b08040000000000ff1a0053471600",
                "30303030303030303030303030316430", // "00000000000001d0"
                "5354415247", "5a", "010000ffff", "0000000000000000"
            )
        );
        assert_eq!(parse_footer(&f, 0x1d0 + 100).unwrap().toc_offset, 0x1d0);
    }

    #[test]
    fn all_kinds() {
        let size = 10_000u64;
        let l = legacy_footer(77);
        let p = parse_footer(&l, size).unwrap();
        assert_eq!((p.kind, p.toc_offset, p.toc_compressed_len), (FooterKind::LegacyStargz, 77, size - 47 - 77));
        let z = zstd_chunked_footer(100, 50, 400);
        let p = parse_footer(&z, size).unwrap();
        assert_eq!((p.kind, p.toc_offset, p.toc_compressed_len, p.toc_uncompressed_len), (FooterKind::ZstdChunked, 100, 50, Some(400)));
        assert!(matches!(parse_footer(&external_toc_footer(), size), Err(Error::ExternalToc)));
        assert!(matches!(parse_footer(&[0u8; 60], size), Err(Error::NotEstargz(_))));
        assert!(matches!(parse_footer(&[1, 2], 2), Err(Error::NotEstargz(_))));
    }

    #[test]
    fn out_of_bounds() {
        let f = estargz_footer(1_000_000);
        assert!(matches!(parse_footer(&f, 5000), Err(Error::InvalidFooter(_))));
        let z = zstd_chunked_footer(4000, 5000, 1);
        assert!(matches!(parse_footer(&z, 5000), Err(Error::InvalidFooter(_))));
        let z = zstd_chunked_footer(u64::MAX, 5, 1);
        assert!(matches!(parse_footer(&z, 5000), Err(Error::InvalidFooter(_))));
    }
}
