//! Opening a blob: footer, TOC, tree; reading file bytes by decompressing only the chunks
//! a range touches.
//!
//! All I/O goes through [`BlobSource`], a positional-read trait, so the same reader serves a
//! local file, an in-memory buffer (tests, fuzzing) and, in the lazy filesystem, HTTP range
//! requests. Opening costs at most two reads: the tail (sized so that the TOC of a typical layer
//! is already in it), then the TOC itself if it was not.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::compression::{decompress_prefix, decompress_range, Compression};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::footer::{parse_footer, Footer, FooterKind, MAX_FOOTER_SIZE};
use crate::tar::{parse_number, BLOCK};
use crate::toc::{Toc, TOC_TAR_NAME};
use crate::tree::{Chunk, Node, NodeId, NodeKind, Tree};

pub use index::BlobSource;

/// A local blob file.
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    pub fn open(path: &std::path::Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let size = file.metadata().map_err(|e| Error::io(format!("stat {}", path.display()), e))?.len();
        Ok(FileSource { file, size })
    }
}

impl BlobSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// Knobs of [`Reader::open`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Bytes read from the end of the blob in the first read. The default (1 MiB) holds the TOC
    /// of most layers, so opening over HTTP is usually one round trip.
    pub tail_size: u64,
    /// Largest uncompressed TOC accepted (protects against decompression bombs).
    pub max_toc_size: u64,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            tail_size: 1 << 20,
            max_toc_size: 512 << 20,
        }
    }
}

/// An opened blob.
pub struct Reader<S> {
    source: S,
    footer: Footer,
    compression: Compression,
    toc: Toc,
    toc_json_len: u64,
    toc_digest: Digest,
    /// sha256 of the TOC as stored (compressed) in the blob: zstd:chunked's manifest checksum.
    compressed_toc_digest: Digest,
    tree: Tree,
    open_reads: u32,
    bytes_read: AtomicU64,
}

/// A blob's footer and TOC as read and decompressed, not yet parsed: what authenticating a TOC
/// needs (its digests) without the cost of parsing it. Reading a layer's TOC ahead of its mount
/// (the snapshotter's read-ahead) stops here, so that the TOC is parsed once, by the mount.
pub struct RawToc {
    pub footer: Footer,
    pub compression: Compression,
    /// The TOC as stored in the blob (compressed).
    pub compressed: Vec<u8>,
    /// The uncompressed TOC JSON.
    pub json: Vec<u8>,
    /// Reads made (1 or 2) and compressed bytes read.
    pub open_reads: u32,
    pub bytes_read: u64,
}

impl RawToc {
    /// Reads the tail (and the TOC, when the tail does not hold it) and decompresses the TOC,
    /// bounded by `opts.max_toc_size`.
    pub fn read<S: BlobSource + ?Sized>(source: &S, opts: &OpenOptions) -> Result<RawToc> {
        let size = source.size();
        let tail_len = size.min(opts.tail_size.max(MAX_FOOTER_SIZE as u64));
        let mut tail = vec![0u8; tail_len as usize];
        read(source, size - tail_len, &mut tail, "blob tail")?;
        let mut open_reads = 1;
        let footer = parse_footer(&tail, size)?;
        let compression = match footer.kind {
            FooterKind::ZstdChunked => Compression::Zstd,
            _ => Compression::Gzip,
        };
        let tail_start = size - tail_len;
        let toc_end = footer.toc_offset + footer.toc_compressed_len;
        let compressed = if footer.toc_offset >= tail_start {
            tail[(footer.toc_offset - tail_start) as usize..(toc_end - tail_start) as usize].to_vec()
        } else {
            if footer.toc_compressed_len > opts.max_toc_size {
                return Err(Error::InvalidToc(format!(
                    "compressed TOC of {} bytes exceeds the {}-byte limit",
                    footer.toc_compressed_len, opts.max_toc_size
                )));
            }
            let mut b = vec![0u8; footer.toc_compressed_len as usize];
            read(source, footer.toc_offset, &mut b, "TOC")?;
            open_reads += 1;
            b
        };
        let json = match compression {
            Compression::Gzip => toc_json_from_gzip(&compressed, footer.toc_offset, opts.max_toc_size)?,
            Compression::Zstd => toc_json_from_zstd(&compressed, &footer, opts.max_toc_size)?,
        };
        let bytes_read = tail_len + if open_reads > 1 { footer.toc_compressed_len } else { 0 };
        Ok(RawToc { footer, compression, compressed, json, open_reads, bytes_read })
    }

    /// sha256 of the uncompressed TOC JSON (eStargz's `toc.digest`).
    pub fn toc_digest(&self) -> Digest {
        Digest::of(&self.json)
    }

    /// sha256 of the TOC as stored (zstd:chunked's manifest checksum).
    pub fn compressed_toc_digest(&self) -> Digest {
        Digest::of(&self.compressed)
    }

    /// Where the payload ends: every chunk must lie before it.
    pub fn payload_end(&self) -> u64 {
        match self.compression {
            Compression::Zstd => self.footer.toc_offset - 8,
            Compression::Gzip => self.footer.toc_offset,
        }
    }
}

impl<S: BlobSource> Reader<S> {
    /// Opens a blob with default options.
    pub fn open(source: S) -> Result<Self> {
        Self::open_with(source, &OpenOptions::default())
    }

    pub fn open_with(source: S, opts: &OpenOptions) -> Result<Self> {
        let raw = RawToc::read(&source, opts)?;
        let toc = Toc::from_json(&raw.json)?;
        let tree = Tree::build(&toc, raw.payload_end())?;
        Ok(Reader {
            source,
            footer: raw.footer,
            compression: raw.compression,
            toc_json_len: raw.json.len() as u64,
            toc_digest: raw.toc_digest(),
            compressed_toc_digest: raw.compressed_toc_digest(),
            toc,
            tree,
            open_reads: raw.open_reads,
            bytes_read: AtomicU64::new(raw.bytes_read),
        })
    }

    pub fn footer(&self) -> &Footer {
        &self.footer
    }
    pub fn compression(&self) -> Compression {
        self.compression
    }
    pub fn toc(&self) -> &Toc {
        &self.toc
    }
    /// sha256 of the uncompressed TOC JSON.
    pub fn toc_digest(&self) -> Digest {
        self.toc_digest
    }

    /// sha256 of the compressed TOC as stored in the blob (what zstd:chunked's
    /// `manifest-checksum` annotation names).
    pub fn compressed_toc_digest(&self) -> Digest {
        self.compressed_toc_digest
    }
    pub fn toc_json_len(&self) -> u64 {
        self.toc_json_len
    }
    pub fn tree(&self) -> &Tree {
        &self.tree
    }
    pub fn source(&self) -> &S {
        &self.source
    }
    /// Reads made by `open` (1 or 2).
    pub fn open_reads(&self) -> u32 {
        self.open_reads
    }
    /// Compressed bytes read from the source so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Checks the TOC against the digest from the layer's `toc.digest` annotation.
    pub fn verify_toc(&self, expected: &Digest) -> Result<()> {
        if *expected != self.toc_digest {
            return Err(Error::TocDigestMismatch {
                expected: expected.to_string(),
                actual: self.toc_digest.to_string(),
            });
        }
        Ok(())
    }

    /// Looks a path up (hardlinks resolve to their target).
    pub fn lookup(&self, path: &str) -> Result<&Node> {
        self.tree.lookup(path).map(|id| self.tree.node(id)).ok_or_else(|| Error::NotFound(path.to_string()))
    }

    /// Fetches, decompresses and (if `verify`) checks one chunk of `node`.
    pub fn read_chunk(&self, node: &Node, chunk: &Chunk, verify: bool) -> Result<Vec<u8>> {
        chunk.check(&node.path)?;
        let len = chunk.next_offset - chunk.offset;
        let mut compressed = vec![0u8; len as usize];
        read(&self.source, chunk.offset, &mut compressed, &node.path)?;
        self.bytes_read.fetch_add(len, Ordering::Relaxed);
        decode_chunk(self.compression, &compressed, node, chunk, verify)
    }

    /// Reads up to `buf.len()` bytes of a regular file from `offset`; returns the count
    /// (short only at end of file). Only the chunks the range touches are decompressed.
    pub fn read_file_at(&self, id: NodeId, offset: u64, buf: &mut [u8], verify: bool) -> Result<usize> {
        let node = self.tree.node(id);
        if node.kind != NodeKind::Reg {
            return Err(Error::NotRegular { path: node.path.clone() });
        }
        if offset >= node.size || buf.is_empty() {
            return Ok(0);
        }
        let end = node.size.min(offset.saturating_add(buf.len() as u64));
        let first = node.chunks.partition_point(|c| c.chunk_offset.saturating_add(c.size) <= offset);
        let mut done = 0usize;
        for c in &node.chunks[first..] {
            if c.chunk_offset >= end {
                break;
            }
            let data = self.read_chunk(node, c, verify)?;
            let from = offset.max(c.chunk_offset);
            let to = end.min(c.chunk_offset.saturating_add(c.size));
            let src = data.get((from - c.chunk_offset) as usize..(to - c.chunk_offset) as usize).ok_or_else(|| {
                Error::InvalidToc(format!("{:?}: chunk at file offset {} decoded to {} bytes, not {}", node.path, c.chunk_offset, data.len(), c.size))
            })?;
            buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
            done = (to - offset) as usize;
        }
        Ok(done)
    }
}

/// Decompresses a chunk from its member bytes (`compressed` = `[offset, next_offset)`) and
/// checks its digest. Public so the lazy filesystem can decode ranges it fetched itself.
///
/// Inflates only the chunk's declared bytes (`innerOffset` skipped, `chunkSize` kept), bounded
/// by [`Chunk::check`]: what the member's own trailer claims is never trusted.
pub fn decode_chunk(c: Compression, compressed: &[u8], node: &Node, chunk: &Chunk, verify: bool) -> Result<Vec<u8>> {
    chunk.check(&node.path)?;
    let data = decompress_range(c, compressed, chunk.inner_offset, chunk.size as usize, chunk.offset, &node.path)?;
    if verify {
        let expected = chunk.digest.ok_or_else(|| Error::InvalidToc(format!("{:?}: chunk at {} has no chunkDigest; cannot verify", node.path, chunk.chunk_offset)))?;
        let actual = Digest::of(&data);
        if actual != expected {
            return Err(Error::ChunkDigestMismatch {
                path: node.path.clone(),
                chunk_offset: chunk.chunk_offset,
                blob_offset: chunk.offset,
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
    }
    Ok(data)
}

fn read<S: BlobSource + ?Sized>(s: &S, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
    s.read_at(offset, buf)
        .map_err(|e| Error::io(format!("reading {} bytes of {what} at blob offset {offset}", buf.len()), e))
}

fn toc_json_from_gzip(member: &[u8], offset: u64, max: u64) -> Result<Vec<u8>> {
    let err = |reason: String| Error::Decompress {
        what: "TOC".into(),
        offset,
        reason,
    };
    // Exactly one member: the TOC tar entry and the end-of-archive marker.
    let mut dec = flate2::read::GzDecoder::new(member);
    let mut header = [0u8; BLOCK as usize];
    dec.read_exact(&mut header).map_err(|e| err(e.to_string()))?;
    let name_end = header[..100].iter().position(|&b| b == 0).unwrap_or(100);
    if &header[..name_end] != TOC_TAR_NAME.as_bytes() {
        return Err(Error::InvalidToc(format!(
            "the TOC member's first entry is {:?}, not {TOC_TAR_NAME}",
            String::from_utf8_lossy(&header[..name_end])
        )));
    }
    let size = parse_number(&header[124..136]).ok_or_else(|| Error::InvalidToc("bad size in the TOC tar header".into()))?;
    if size > max {
        return Err(Error::InvalidToc(format!("TOC of {size} bytes exceeds the {max}-byte limit")));
    }
    let mut json = vec![0u8; size as usize];
    dec.read_exact(&mut json).map_err(|e| err(format!("TOC JSON truncated: {e}")))?;
    Ok(json)
}

fn toc_json_from_zstd(bytes: &[u8], footer: &Footer, max: u64) -> Result<Vec<u8>> {
    let ulen = footer.toc_uncompressed_len.unwrap_or(0);
    if ulen > max {
        return Err(Error::InvalidToc(format!("TOC of {ulen} bytes exceeds the {max}-byte limit")));
    }
    decompress_prefix(Compression::Zstd, bytes, ulen as usize, footer.toc_offset, "TOC")
}
