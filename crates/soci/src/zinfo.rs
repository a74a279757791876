//! The checkpoint blob of a zTOC (`compression_info.checkpoints`): where each span starts.
//!
//! A span is the unit SOCI fetches and verifies. For a gzip layer its start is a zran-style
//! checkpoint: the compressed offset just after a deflate block ended (`in`), the
//! uncompressed offset there (`out`), how many bits of the byte before `in` still belong to
//! the next block (`bits`), and the 32 KiB of output before it (the window a resumed inflate
//! needs). The blob layout is the SOCI project's, little-endian and tightly packed:
//! `u32 count, u64 span_size`, then per checkpoint `u64 in, u64 out, u8 bits, [u8; 32768]`.
//! Its older "version one" omitted checkpoint 0 (implied at `in` = 10). An uncompressed
//! layer needs no checkpoints: its spans are fixed slices, and the blob is a `TarZinfo`
//! FlatBuffer (or, from older builders, its 20 raw bytes).

use crate::fbs::zinfo as fb;
use crate::inflate::WINDOW_SIZE;

const HEADER: usize = 4 + 8;
const PACKED_CHECKPOINT: usize = 8 + 8 + 1 + WINDOW_SIZE;
/// The `TarZinfo` version SOCI writes (the same number as its gzip blob version).
const TAR_ZINFO_VERSION: i32 = 2;

/// One resumable position in a gzip stream.
#[derive(Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Compressed offset of the first whole byte of the span's first block.
    pub compressed: u64,
    /// Uncompressed offset where the span starts.
    pub uncompressed: u64,
    /// Bits (0..=7) of the byte at `compressed - 1` that belong to this span.
    pub bits: u8,
    /// The 32 KiB of output before `uncompressed` (zero-filled at the front near a stream start).
    pub window: Box<[u8]>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("compressed", &self.compressed)
            .field("uncompressed", &self.uncompressed)
            .field("bits", &self.bits)
            .finish_non_exhaustive()
    }
}

impl Checkpoint {
    /// Where the span's compressed bytes start: one byte early when leftover bits live there.
    pub fn fetch_start(&self) -> u64 {
        self.compressed - u64::from(self.bits != 0)
    }
}

/// How a layer is cut into spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpanTable {
    Gzip { span_size: u64, checkpoints: Vec<Checkpoint> },
    /// An uncompressed tar: span `i` is bytes `[i * span_size, (i + 1) * span_size)`.
    Tar { span_size: u64, size: u64 },
}

/// A checkpoint blob that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZinfoError {
    #[error("checkpoint blob of {len} bytes is shorter than its {HEADER}-byte header")]
    Short { len: usize },
    #[error("checkpoint blob of {len} bytes does not hold {count} checkpoints")]
    CountMismatch { len: usize, count: u32 },
    #[error("checkpoint {index}: {reason}")]
    BadCheckpoint { index: usize, reason: String },
    #[error("span size 0")]
    ZeroSpanSize,
    #[error("tar span table: {0}")]
    BadTar(String),
}

impl SpanTable {
    /// Reads a gzip checkpoint blob.
    pub fn parse_gzip(blob: &[u8]) -> Result<SpanTable, ZinfoError> {
        if blob.len() < HEADER {
            return Err(ZinfoError::Short { len: blob.len() });
        }
        let count = u32::from_le_bytes(blob[0..4].try_into().unwrap());
        let span_size = u64::from_le_bytes(blob[4..12].try_into().unwrap());
        let body = &blob[HEADER..];
        let stored = body.len() / PACKED_CHECKPOINT;
        let mismatch = ZinfoError::CountMismatch { len: blob.len(), count };
        if body.len() % PACKED_CHECKPOINT != 0 {
            return Err(mismatch);
        }
        let mut checkpoints = Vec::with_capacity(stored + 1);
        if stored as u64 + 1 == u64::from(count) {
            // Version one: checkpoint 0 was not stored; it sits after a 10-byte gzip header.
            checkpoints.push(Checkpoint {
                compressed: 10,
                uncompressed: 0,
                bits: 0,
                window: vec![0; WINDOW_SIZE].into(),
            });
        } else if stored as u64 != u64::from(count) {
            return Err(mismatch);
        }
        for packed in body.chunks_exact(PACKED_CHECKPOINT) {
            checkpoints.push(Checkpoint {
                compressed: u64::from_le_bytes(packed[0..8].try_into().unwrap()),
                uncompressed: u64::from_le_bytes(packed[8..16].try_into().unwrap()),
                bits: packed[16],
                window: packed[17..].into(),
            });
        }
        let table = SpanTable::Gzip { span_size, checkpoints };
        table.validate()?;
        Ok(table)
    }

    /// Reads an uncompressed layer's blob (FlatBuffer, or the 20 raw bytes older builders wrote).
    pub fn parse_tar(blob: &[u8]) -> Result<SpanTable, ZinfoError> {
        let (version, span_size, size) = if blob.len() == 20 {
            (
                i32::from_le_bytes(blob[0..4].try_into().unwrap()),
                i64::from_le_bytes(blob[4..12].try_into().unwrap()),
                i64::from_le_bytes(blob[12..20].try_into().unwrap()),
            )
        } else {
            let t = flatbuffers::root::<fb::TarZinfo>(blob)
                .map_err(|e| ZinfoError::BadTar(format!("not a TarZinfo table: {e}")))?;
            (t.version(), t.span_size(), t.size())
        };
        if version != TAR_ZINFO_VERSION {
            return Err(ZinfoError::BadTar(format!("version {version}, expected {TAR_ZINFO_VERSION}")));
        }
        if span_size <= 0 || size < 0 {
            return Err(ZinfoError::BadTar(format!("span size {span_size}, size {size}")));
        }
        Ok(SpanTable::Tar { span_size: span_size as u64, size: size as u64 })
    }

    /// Checks what readers rely on (also run by [`SpanTable::parse_gzip`]).
    pub fn validate(&self) -> Result<(), ZinfoError> {
        let SpanTable::Gzip { span_size, checkpoints } = self else { return Ok(()) };
        if *span_size == 0 {
            return Err(ZinfoError::ZeroSpanSize);
        }
        let bad = |index, reason: String| Err(ZinfoError::BadCheckpoint { index, reason });
        match checkpoints.first() {
            None => return bad(0, "no checkpoints".into()),
            Some(c) if c.uncompressed != 0 => return bad(0, format!("starts at uncompressed {}", c.uncompressed)),
            _ => {}
        }
        for (i, c) in checkpoints.iter().enumerate() {
            if c.bits > 7 {
                return bad(i, format!("{} leftover bits", c.bits));
            }
            if c.bits != 0 && c.compressed == 0 {
                return bad(i, "leftover bits before offset 0".into());
            }
            if i > 0 {
                let p = &checkpoints[i - 1];
                if c.compressed <= p.compressed || c.uncompressed <= p.uncompressed {
                    return bad(i, format!(
                        "offsets ({}, {}) do not grow past ({}, {})",
                        c.compressed, c.uncompressed, p.compressed, p.uncompressed
                    ));
                }
            }
        }
        Ok(())
    }

    /// Serialises a gzip table in the current (version two) layout, or a tar table as a
    /// `TarZinfo` FlatBuffer, as SOCI v0.15 writes them.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            SpanTable::Gzip { span_size, checkpoints } => {
                let mut out = Vec::with_capacity(HEADER + PACKED_CHECKPOINT * checkpoints.len());
                out.extend_from_slice(&(checkpoints.len() as u32).to_le_bytes());
                out.extend_from_slice(&span_size.to_le_bytes());
                for c in checkpoints {
                    out.extend_from_slice(&c.compressed.to_le_bytes());
                    out.extend_from_slice(&c.uncompressed.to_le_bytes());
                    out.push(c.bits);
                    out.extend_from_slice(&c.window);
                }
                out
            }
            SpanTable::Tar { span_size, size } => {
                let mut b = flatbuffers::FlatBufferBuilder::new();
                let mut t = fb::TarZinfoBuilder::new(&mut b);
                t.add_version(TAR_ZINFO_VERSION);
                t.add_span_size(*span_size as i64);
                t.add_size(*size as i64);
                let root = t.finish();
                b.finish_minimal(root);
                b.finished_data().to_vec()
            }
        }
    }

    pub fn span_size(&self) -> u64 {
        match self {
            SpanTable::Gzip { span_size, .. } | SpanTable::Tar { span_size, .. } => *span_size,
        }
    }

    pub fn span_count(&self) -> usize {
        match self {
            SpanTable::Gzip { checkpoints, .. } => checkpoints.len(),
            SpanTable::Tar { span_size, size } => size.div_ceil(*span_size).max(1) as usize,
        }
    }

    /// The span holding uncompressed offset `offset`.
    pub fn span_of(&self, offset: u64) -> usize {
        match self {
            SpanTable::Gzip { checkpoints, .. } => {
                checkpoints.partition_point(|c| c.uncompressed <= offset).saturating_sub(1)
            }
            SpanTable::Tar { span_size, .. } => {
                ((offset / span_size) as usize).min(self.span_count() - 1)
            }
        }
    }

    /// Uncompressed start of `span`.
    pub fn uncompressed_start(&self, span: usize) -> u64 {
        match self {
            SpanTable::Gzip { checkpoints, .. } => checkpoints[span].uncompressed,
            SpanTable::Tar { span_size, .. } => span as u64 * span_size,
        }
    }

    /// Uncompressed end of `span`; the last span ends at `uncompressed_size`.
    pub fn uncompressed_end(&self, span: usize, uncompressed_size: u64) -> u64 {
        if span + 1 >= self.span_count() {
            uncompressed_size
        } else {
            self.uncompressed_start(span + 1)
        }
    }

    /// The compressed byte range `[start, end)` a fetch of `span` needs, which its span
    /// digest covers: from its checkpoint (one byte early with leftover bits) up to the next
    /// checkpoint's `compressed`, so two spans share the byte holding a split; the last span
    /// runs to the end of the blob.
    pub fn compressed_range(&self, span: usize, blob_size: u64) -> (u64, u64) {
        let start = match self {
            SpanTable::Gzip { checkpoints, .. } => checkpoints[span].fetch_start(),
            SpanTable::Tar { span_size, .. } => span as u64 * span_size,
        };
        let end = if span + 1 >= self.span_count() {
            blob_size
        } else {
            match self {
                SpanTable::Gzip { checkpoints, .. } => checkpoints[span + 1].compressed,
                SpanTable::Tar { span_size, .. } => (span as u64 + 1) * span_size,
            }
        };
        (start, end.max(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(compressed: u64, uncompressed: u64, bits: u8) -> Checkpoint {
        Checkpoint { compressed, uncompressed, bits, window: vec![7; WINDOW_SIZE].into() }
    }

    #[test]
    fn gzip_blob_round_trips_and_answers_span_questions() {
        let t = SpanTable::Gzip {
            span_size: 100,
            checkpoints: vec![point(10, 0, 0), point(50, 150, 3), point(90, 300, 0)],
        };
        let bytes = t.to_bytes();
        assert_eq!(bytes.len(), 12 + 3 * (17 + WINDOW_SIZE));
        assert_eq!(SpanTable::parse_gzip(&bytes).unwrap(), t);
        assert_eq!(t.span_of(0), 0);
        assert_eq!(t.span_of(149), 0);
        assert_eq!(t.span_of(150), 1);
        assert_eq!(t.span_of(10_000), 2);
        assert_eq!(t.compressed_range(0, 120), (10, 50));
        assert_eq!(t.compressed_range(1, 120), (49, 90));
        assert_eq!(t.compressed_range(2, 120), (90, 120));
        assert_eq!(t.uncompressed_end(1, 400), 300);
        assert_eq!(t.uncompressed_end(2, 400), 400);
    }

    #[test]
    fn version_one_blob_gets_its_implied_first_checkpoint() {
        let mut bytes = SpanTable::Gzip { span_size: 9, checkpoints: vec![point(40, 90, 0)] }.to_bytes();
        bytes[0..4].copy_from_slice(&2u32.to_le_bytes());
        let SpanTable::Gzip { checkpoints, .. } = SpanTable::parse_gzip(&bytes).unwrap() else { panic!() };
        assert_eq!((checkpoints[0].compressed, checkpoints[0].uncompressed), (10, 0));
        assert_eq!(checkpoints[1].compressed, 40);
    }

    #[test]
    fn broken_blobs_are_named_errors() {
        let good = SpanTable::Gzip { span_size: 9, checkpoints: vec![point(10, 0, 0), point(40, 90, 2)] }.to_bytes();
        assert!(matches!(SpanTable::parse_gzip(&good[..5]), Err(ZinfoError::Short { .. })));
        assert!(matches!(SpanTable::parse_gzip(&good[..good.len() - 1]), Err(ZinfoError::CountMismatch { .. })));
        let mut count = good.clone();
        count[0..4].copy_from_slice(&7u32.to_le_bytes());
        assert!(matches!(SpanTable::parse_gzip(&count), Err(ZinfoError::CountMismatch { .. })));
        let mut bits = good.clone();
        bits[12 + 17 + WINDOW_SIZE + 16] = 9;
        assert!(matches!(SpanTable::parse_gzip(&bits), Err(ZinfoError::BadCheckpoint { index: 1, .. })));
        let mut order = good.clone();
        order[12 + 17 + WINDOW_SIZE..][..8].copy_from_slice(&5u64.to_le_bytes());
        assert!(matches!(SpanTable::parse_gzip(&order), Err(ZinfoError::BadCheckpoint { index: 1, .. })));
        let mut zero = good;
        zero[4..12].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(SpanTable::parse_gzip(&zero), Err(ZinfoError::ZeroSpanSize));
    }

    #[test]
    fn tar_table_is_fixed_slices() {
        let t = SpanTable::Tar { span_size: 4, size: 10 };
        assert_eq!(SpanTable::parse_tar(&t.to_bytes()).unwrap(), t);
        assert_eq!(t.span_count(), 3);
        assert_eq!(t.span_of(9), 2);
        assert_eq!(t.compressed_range(2, 10), (8, 10));
        assert!(SpanTable::parse_tar(b"junk").is_err());
    }
}
