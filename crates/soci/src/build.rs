//! Building a zTOC from a layer blob, reading the blob once, without spooling it.
//!
//! The blob streams through [`SpanCutter`] (gzip) or [`FixedSpans`] (uncompressed tar),
//! which decompress it, place checkpoints and hash every span's compressed bytes as they pass;
//! the uncompressed bytes they yield feed the `tar` reader that lists the entries. So one pass
//! gives entries, checkpoints and span digests, with memory bounded by the window size.
//!
//! Checkpoints follow zlib's zran rule, as SOCI does: the first right after the first gzip
//! header, then at the first deflate block boundary (never after a stream's final block) where
//! more than `span_size` bytes came out since the last one. Concatenated gzip members are one
//! stream for the counters; each member's window restarts empty, since a member cannot refer
//! back into the previous one.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

use sha2::{Digest as _, Sha256};

use crate::inflate::{RawInflater, Status, WINDOW_SIZE};
use crate::time::Mtime;
use crate::zinfo::{Checkpoint, SpanTable};
use crate::ztoc::{Compression, Entry, EntryKind, Ztoc, SOCI_BUILD_TOOL, ZTOC_VERSION};

/// SOCI's default span size.
pub const DEFAULT_SPAN_SIZE: u64 = 4 << 20;

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub span_size: u64,
    pub build_tool: String,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions { span_size: DEFAULT_SPAN_SIZE, build_tool: SOCI_BUILD_TOOL.to_owned() }
    }
}

/// Why a zTOC could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("reading the layer: {0}")]
    Io(#[from] io::Error),
    #[error("span size must be positive")]
    SpanSize,
    #[error("the layer is {0}, which SOCI cannot index (gzip or uncompressed tar only)")]
    Unsupported(&'static str),
    #[error("tar entry {index} ({name:?}): {reason}")]
    Entry { index: usize, name: String, reason: String },
}

/// Builds the zTOC of one layer blob.
pub fn build_ztoc(mut blob: impl Read, opts: &BuildOptions) -> Result<Ztoc, BuildError> {
    if opts.span_size == 0 {
        return Err(BuildError::SpanSize);
    }
    let mut head = [0u8; 4];
    let got = read_up_to(&mut blob, &mut head)?;
    let head = &head[..got];
    let replay = io::Cursor::new(head.to_vec()).chain(blob);
    if head.starts_with(&[0x1f, 0x8b]) {
        let mut cutter = SpanCutter::new(replay, opts.span_size);
        let (entries, archive_end) = list_entries(&mut cutter)?;
        io::copy(&mut cutter, &mut io::sink())?;
        let (spans, span_digests, compressed_size, uncompressed) = cutter.finish();
        Ok(assemble(opts, Compression::Gzip, entries, archive_end.min(uncompressed), compressed_size, spans, span_digests))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Err(BuildError::Unsupported("zstd-compressed"))
    } else {
        let mut fixed = FixedSpans::new(replay, opts.span_size);
        let (entries, archive_end) = list_entries(&mut fixed)?;
        io::copy(&mut fixed, &mut io::sink())?;
        let size = fixed.total;
        let span_digests = fixed.finish();
        let spans = SpanTable::Tar { span_size: opts.span_size, size };
        Ok(assemble(opts, Compression::Uncompressed, entries, archive_end.min(size), size, spans, span_digests))
    }
}

fn assemble(
    opts: &BuildOptions,
    compression: Compression,
    entries: Vec<Entry>,
    uncompressed_size: u64,
    compressed_size: u64,
    spans: SpanTable,
    span_digests: Vec<String>,
) -> Ztoc {
    Ztoc {
        version: ZTOC_VERSION.to_owned(),
        build_tool: opts.build_tool.clone(),
        compressed_size,
        uncompressed_size,
        entries,
        compression,
        span_digests,
        spans,
        prefetch: None,
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A reader that counts the bytes it has passed on.
struct Counted<R> {
    inner: R,
    read: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

fn sha256_name(h: Sha256) -> String {
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Lists the tar entries of an uncompressed stream; also returns where the archive ends
/// (after its two zero blocks), which is SOCI's `uncompressed_archive_size`.
fn list_entries(tar_stream: impl Read) -> Result<(Vec<Entry>, u64), BuildError> {
    let read = Rc::new(Cell::new(0u64));
    let mut archive = tar::Archive::new(Counted { inner: tar_stream, read: read.clone() });
    let mut entries = Vec::new();
    let mut end = 0u64;
    let mut data_end = 0u64;
    for (index, item) in archive.entries()?.enumerate() {
        let mut entry = match item {
            Ok(entry) => entry,
            // The stream ends right after the last file's data, without its block padding or
            // the two zero blocks (seen in layers written by umoci: the peers' test/big:1).
            // Go's archive/tar, and so containerd's unpacking and upstream SOCI, take that as
            // the archive's end; so do we: the stream ended inside the padding (the tar crate
            // says "unexpected EOF during skip"). Data cut short is still an error.
            Err(_) if (data_end..end).contains(&read.get()) => break,
            Err(e) => return Err(e.into()),
        };
        let mut pax = Vec::new();
        let pax_fail = |reason: String| BuildError::Entry { index, name: String::new(), reason };
        if let Some(records) = entry.pax_extensions().map_err(|e| pax_fail(format!("PAX header: {e}")))? {
            for record in records {
                let record = record.map_err(|e| pax_fail(format!("PAX record: {e}")))?;
                let (Ok(k), Ok(v)) = (record.key(), record.value()) else {
                    return Err(pax_fail("a PAX record is not UTF-8".into()));
                };
                pax.push((k.to_owned(), v.to_owned()));
            }
        }
        pax.sort();
        let name_bytes = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&name_bytes).into_owned();
        let fail = |reason: String| BuildError::Entry { index, name: name.clone(), reason };
        let Ok(name_utf8) = std::str::from_utf8(&name_bytes) else {
            return Err(fail("the name is not UTF-8".into()));
        };
        let header = entry.header();
        let kind = match header.entry_type() {
            tar::EntryType::Regular => EntryKind::Reg,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Link => EntryKind::Hardlink,
            tar::EntryType::Char => EntryKind::Char,
            tar::EntryType::Block => EntryKind::Block,
            tar::EntryType::Fifo => EntryKind::Fifo,
            tar::EntryType::XGlobalHeader => continue,
            other => return Err(fail(format!("unsupported tar entry type {:?}", other.as_byte() as char))),
        };
        // Old tars mark regular files with NUL; a trailing slash then means a directory.
        let kind = if kind == EntryKind::Reg && header.entry_type().as_byte() == 0 && name_utf8.ends_with('/') {
            EntryKind::Dir
        } else {
            kind
        };
        let record = |key: &str| pax.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let number = |key: &str, raw: io::Result<u64>| -> Result<u64, BuildError> {
            match record(key) {
                Some(v) => v.parse().map_err(|_| fail(format!("PAX {key} {v:?} is not a number"))),
                None => raw.map_err(|e| fail(format!("{key}: {e}"))),
            }
        };
        let uid = number("uid", header.uid())?;
        let gid = number("gid", header.gid())?;
        let mtime = match record("mtime") {
            Some(v) => Mtime::parse_pax(v).ok_or_else(|| fail(format!("PAX mtime {v:?}")))?,
            None => Mtime { secs: header.mtime().map_err(|e| fail(format!("mtime: {e}")))? as i64, nanos: 0 },
        };
        let text = |key: &str, raw: Option<&[u8]>| -> String {
            record(key).map(str::to_owned).unwrap_or_else(|| String::from_utf8_lossy(raw.unwrap_or_default()).into_owned())
        };
        let linkname = entry
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        let offset = entry.raw_file_position();
        let size = if kind == EntryKind::Reg { entry.size() } else { 0 };
        end = offset + size.div_ceil(512) * 512;
        data_end = offset + size;
        entries.push(Entry {
            name: name_utf8.to_owned(),
            kind,
            offset,
            size,
            linkname,
            mode: i64::from(header.mode().map_err(|e| fail(format!("mode: {e}")))?),
            uid: u32::try_from(uid).map_err(|_| fail(format!("uid {uid} does not fit 32 bits")))?,
            gid: u32::try_from(gid).map_err(|_| fail(format!("gid {gid} does not fit 32 bits")))?,
            uname: text("uname", header.username_bytes()),
            gname: text("gname", header.groupname_bytes()),
            mtime,
            devmajor: i64::from(header.device_major().ok().flatten().unwrap_or(0)),
            devminor: i64::from(header.device_minor().ok().flatten().unwrap_or(0)),
            pax,
        });
    }
    Ok((entries, end + 1024))
}

/// Hashes the compressed bytes of each span as they stream past.
struct SpanHashes {
    current: Option<Sha256>,
    digests: Vec<String>,
    last_byte: u8,
}

impl SpanHashes {
    fn consumed(&mut self, bytes: &[u8]) {
        if let Some(h) = &mut self.current {
            h.update(bytes);
        }
        if let Some(&b) = bytes.last() {
            self.last_byte = b;
        }
    }

    /// A new span starts at the current position; with leftover bits it also owns the last
    /// consumed byte (which the previous span keeps too).
    fn cut(&mut self, bits: u8) {
        if let Some(h) = self.current.take() {
            self.digests.push(sha256_name(h));
        }
        let mut next = Sha256::new();
        if bits != 0 {
            next.update([self.last_byte]);
        }
        self.current = Some(next);
    }
}

enum GzipState {
    Header,
    Deflate,
    Trailer,
    Done,
}

/// Inflates a gzip stream (any number of members) while placing checkpoints and hashing spans.
struct SpanCutter<R> {
    src: R,
    input: Box<[u8]>,
    pos: usize,
    end: usize,
    compressed: u64,
    uncompressed: u64,
    state: GzipState,
    inflater: RawInflater,
    window: Box<[u8]>,
    window_at: usize,
    span_size: u64,
    checkpoints: Vec<Checkpoint>,
    last_checkpoint: u64,
    hashes: SpanHashes,
}

impl<R: Read> SpanCutter<R> {
    fn new(src: R, span_size: u64) -> Self {
        SpanCutter {
            src,
            input: vec![0; 64 * 1024].into(),
            pos: 0,
            end: 0,
            compressed: 0,
            uncompressed: 0,
            state: GzipState::Header,
            inflater: RawInflater::new(),
            window: vec![0; WINDOW_SIZE].into(),
            window_at: 0,
            span_size,
            checkpoints: Vec::new(),
            last_checkpoint: 0,
            hashes: SpanHashes { current: None, digests: Vec::new(), last_byte: 0 },
        }
    }

    /// Makes input available; `false` at the end of the blob.
    fn fill(&mut self) -> io::Result<bool> {
        if self.pos < self.end {
            return Ok(true);
        }
        self.pos = 0;
        self.end = 0;
        loop {
            match self.src.read(&mut self.input) {
                Ok(n) => {
                    self.end = n;
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.hashes.consumed(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        self.compressed += n as u64;
    }

    fn byte(&mut self, what: &str) -> io::Result<u8> {
        if !self.fill()? {
            return Err(corrupt(format!("the blob ends inside a gzip {what} at byte {}", self.compressed)));
        }
        let b = self.input[self.pos];
        self.consume(1);
        Ok(b)
    }

    fn skip(&mut self, mut n: usize, what: &str) -> io::Result<()> {
        while n > 0 {
            if !self.fill()? {
                return Err(corrupt(format!("the blob ends inside a gzip {what} at byte {}", self.compressed)));
            }
            let k = n.min(self.end - self.pos);
            self.consume(k);
            n -= k;
        }
        Ok(())
    }

    /// Reads one member header (RFC 1952 2.3), checking what zlib checks.
    fn header(&mut self) -> io::Result<()> {
        let at = self.compressed;
        let mut fixed = [0u8; 10];
        for b in &mut fixed {
            *b = self.byte("header")?;
        }
        if fixed[0] != 0x1f || fixed[1] != 0x8b {
            return Err(corrupt(format!("no gzip member starts at byte {at} (bad magic)")));
        }
        if fixed[2] != 8 {
            return Err(corrupt(format!("gzip member at byte {at} uses compression method {}", fixed[2])));
        }
        let flags = fixed[3];
        if flags & 4 != 0 {
            let len = u16::from_le_bytes([self.byte("header")?, self.byte("header")?]);
            self.skip(len.into(), "header")?;
        }
        for flag in [8u8, 16] {
            if flags & flag != 0 {
                while self.byte("header")? != 0 {}
            }
        }
        if flags & 2 != 0 {
            self.skip(2, "header")?;
        }
        if self.checkpoints.is_empty() {
            self.checkpoints.push(Checkpoint {
                compressed: self.compressed,
                uncompressed: 0,
                bits: 0,
                window: vec![0; WINDOW_SIZE].into(),
            });
            self.hashes.cut(0);
        }
        self.inflater.reset();
        self.window.fill(0);
        self.window_at = 0;
        Ok(())
    }

    fn remember(&mut self, out: &[u8]) {
        let tail = &out[out.len().saturating_sub(WINDOW_SIZE)..];
        let first = tail.len().min(WINDOW_SIZE - self.window_at);
        self.window[self.window_at..self.window_at + first].copy_from_slice(&tail[..first]);
        self.window[..tail.len() - first].copy_from_slice(&tail[first..]);
        self.window_at = (self.window_at + tail.len()) % WINDOW_SIZE;
    }

    fn checkpoint(&mut self, bits: u8) {
        let mut window = Vec::with_capacity(WINDOW_SIZE);
        window.extend_from_slice(&self.window[self.window_at..]);
        window.extend_from_slice(&self.window[..self.window_at]);
        self.checkpoints.push(Checkpoint {
            compressed: self.compressed,
            uncompressed: self.uncompressed,
            bits,
            window: window.into(),
        });
        self.last_checkpoint = self.uncompressed;
        self.hashes.cut(bits);
    }

    /// The span table, span digests, compressed size and uncompressed size.
    fn finish(mut self) -> (SpanTable, Vec<String>, u64, u64) {
        // The last span ends with the blob; `cut` closes it (the span it opens is never used).
        self.hashes.cut(0);
        let digests = self.hashes.digests;
        let table = SpanTable::Gzip { span_size: self.span_size, checkpoints: self.checkpoints };
        (table, digests, self.compressed, self.uncompressed)
    }
}

fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl<R: Read> Read for SpanCutter<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                GzipState::Done => return Ok(0),
                GzipState::Header => {
                    self.header()?;
                    self.state = GzipState::Deflate;
                }
                GzipState::Trailer => {
                    self.skip(8, "trailer")?;
                    self.state = if self.fill()? { GzipState::Header } else { GzipState::Done };
                }
                GzipState::Deflate => {
                    if !self.fill()? {
                        return Err(corrupt(format!("the blob ends inside deflate data at byte {}", self.compressed)));
                    }
                    let step = self
                        .inflater
                        .inflate(&self.input[self.pos..self.end], out, true)
                        .map_err(|e| corrupt(format!("{e} (near compressed byte {})", self.compressed)))?;
                    self.consume(step.consumed);
                    self.uncompressed += step.produced as u64;
                    self.remember(&out[..step.produced]);
                    if step.status == Status::StreamEnd {
                        self.state = GzipState::Trailer;
                    } else if step.at_block_boundary()
                        && self.uncompressed - self.last_checkpoint > self.span_size
                    {
                        self.checkpoint(step.unused_bits());
                    }
                    if step.produced > 0 {
                        return Ok(step.produced);
                    }
                }
            }
        }
    }
}

/// Passes an uncompressed tar through, hashing fixed-size spans.
struct FixedSpans<R> {
    src: R,
    span_size: u64,
    total: u64,
    current: Sha256,
    digests: Vec<String>,
}

impl<R: Read> FixedSpans<R> {
    fn new(src: R, span_size: u64) -> Self {
        FixedSpans { src, span_size, total: 0, current: Sha256::new(), digests: Vec::new() }
    }

    fn finish(mut self) -> Vec<String> {
        if self.total == 0 || self.total % self.span_size != 0 {
            self.digests.push(sha256_name(self.current));
        }
        self.digests
    }
}

impl<R: Read> Read for FixedSpans<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.src.read(out)?;
        let mut rest = &out[..n];
        while !rest.is_empty() {
            let room = (self.span_size - self.total % self.span_size) as usize;
            let k = room.min(rest.len());
            self.current.update(&rest[..k]);
            self.total += k as u64;
            rest = &rest[k..];
            if self.total % self.span_size == 0 {
                let done = std::mem::replace(&mut self.current, Sha256::new());
                self.digests.push(sha256_name(done));
            }
        }
        Ok(n)
    }
}
