//! The layer writer: tar / tar.gz / tar.zst in, eStargz or zstd:chunked blob out.
//!
//! # Why the output does not depend on the thread count
//!
//! The reference converter splits the input into one part per CPU and compresses each part
//! with its own writer, so part boundaries become member boundaries and the bytes change with
//! the machine. Here member boundaries are a function of the input alone: a member starts at
//! each chunk payload (the format requires that) and holds the payload, its tar padding and the
//! headers of the following payload-less entries. Members are independent, so they are
//! compressed on a pool of workers and written back in order; the thread count only changes the
//! speed.
//!
//! # Pipeline
//!
//! ```text
//! input ─sniff/decompress─▶ tar index + spool file ─order─▶ producer ─jobs─▶ N compressors
//!                                                                           │ (out of order)
//!                                         output ◀─ in-order writer (offsets, DiffID, digest)
//! ```
//!
//! The producer cuts members and computes chunk/file digests; the writer thread assigns
//! compressed offsets, hashes the uncompressed stream (DiffID) and the blob. Memory is bounded
//! by the channel capacities times the chunk size.

mod order;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crossbeam_channel::bounded;

pub use order::{order, Item, Ordered};

use crate::compression::{Compression, MemberCompressor};
use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::footer::{estargz_footer, zstd_chunked_footer, ZSTD_SKIPPABLE_MAGIC};
use crate::limits::MAX_CHUNK_SIZE;
use crate::tar::{self, IndexedEntry, TarKind, BLOCK};
use crate::time::format_rfc3339;
use crate::toc::{EntryType, Toc, TocEntry, DEFAULT_CHUNK_SIZE, LANDMARK_CONTENTS, TOC_TAR_NAME};

/// Options of [`build`].
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub compression: Compression,
    /// Maximum uncompressed bytes per chunk (default 4 MiB, at most
    /// [`MAX_CHUNK_SIZE`](crate::limits::MAX_CHUNK_SIZE)).
    pub chunk_size: u64,
    /// Compression level; `None` = the codec's default (gzip 9, zstd 3).
    pub level: Option<u32>,
    /// Paths to place first, in this order (files read at start-up).
    pub prioritized: Vec<String>,
    /// Compression threads; 0 = one per core. Never changes the output bytes.
    pub threads: usize,
    /// Where to spool the decompressed input (default: the system temp dir).
    pub tmp_dir: Option<PathBuf>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            compression: Compression::Gzip,
            chunk_size: DEFAULT_CHUNK_SIZE,
            level: None,
            prioritized: Vec::new(),
            threads: 0,
            tmp_dir: None,
        }
    }
}

/// What [`build`] reports about the blob it wrote.
#[derive(Debug, Clone)]
pub struct BuildResult {
    pub compression: Compression,
    /// sha256 of the uncompressed TOC JSON (`containerd.io/snapshot/stargz/toc.digest`).
    pub toc_digest: Digest,
    /// sha256 of the decompressed stream (the layer's new DiffID).
    pub diff_id: Digest,
    /// Length of the decompressed stream (`io.containers.estargz.uncompressed-size`).
    pub uncompressed_size: u64,
    /// sha256 and size of the blob itself (the layer descriptor's digest and size).
    pub blob_digest: Digest,
    pub blob_size: u64,
    pub toc_offset: u64,
    pub entries: usize,
    /// Prioritized paths that are not in the layer.
    pub missing_prioritized: Vec<String>,
    /// zstd:chunked only: (`manifest-checksum`, `manifest-position`) annotation values.
    pub zstd_manifest: Option<(Digest, String)>,
}

/// Converts a tar stream (optionally gzip- or zstd-compressed; sniffed) into a blob.
pub fn build<R: Read, W: Write + Send>(input: R, output: W, opts: &BuildOptions) -> Result<BuildResult> {
    if opts.chunk_size == 0 || opts.chunk_size > MAX_CHUNK_SIZE {
        return Err(Error::InvalidArgument(format!(
            "chunk size {} is outside 1..={MAX_CHUNK_SIZE} bytes (readers refuse larger chunks)",
            opts.chunk_size
        )));
    }
    let level = opts.level.unwrap_or(opts.compression.default_level());
    MemberCompressor::new(opts.compression, level)?; // validate the level up front
    let spool = match &opts.tmp_dir {
        Some(d) => tempfile::tempfile_in(d),
        None => tempfile::tempfile(),
    }
    .ctx(|| "creating spool file".into())?;
    let index = {
        let mut input = BufReader::with_capacity(1 << 20, input);
        let magic = input.fill_buf().ctx(|| "reading input".into())?.to_vec();
        let sink = BufWriter::with_capacity(1 << 20, &spool);
        if magic.starts_with(&[0x1f, 0x8b]) {
            tar::index(flate2::read::MultiGzDecoder::new(input), sink)
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            let dec = zstd::stream::read::Decoder::with_buffer(input).ctx(|| "opening zstd input".into())?;
            tar::index(dec, sink)
        } else {
            tar::index(input, sink)
        }?
    };
    let ordered = order(&index.entries, &opts.prioritized)?;
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };
    let mut out = HashingWriter::new(output);
    let (mut toc, member_refs, member_offsets, stream) =
        compress_entries(&spool, &index, &ordered.items, opts, level, threads, &mut out)?;
    for (entry, member) in member_refs {
        toc.entries[entry].offset = member_offsets[member];
    }
    let json = toc.to_json();
    let toc_digest = Digest::of(&json);
    let toc_offset = out.written;
    let mut diff = stream.diff;
    let mut uncompressed_size = stream.uncompressed;
    let mut compressor = MemberCompressor::new(opts.compression, level)?;
    let mut buf = Vec::new();
    let zstd_manifest = match opts.compression {
        Compression::Gzip => {
            let mut raw = Vec::with_capacity(json.len() + 2048);
            raw.extend_from_slice(&tar::ustar_header(TOC_TAR_NAME, json.len() as u64, 0));
            raw.extend_from_slice(&json);
            raw.resize((raw.len() as u64).div_ceil(BLOCK) as usize * BLOCK as usize + 1024, 0);
            compressor.compress(&raw, &mut buf);
            diff.update(&raw);
            uncompressed_size += raw.len() as u64;
            out.write(&buf)?;
            out.write(&estargz_footer(toc_offset))?;
            None
        }
        Compression::Zstd => {
            compressor.compress(&json, &mut buf);
            let len = u32::try_from(buf.len()).map_err(|_| Error::InvalidArgument("TOC over 4 GiB".into()))?;
            out.write(&ZSTD_SKIPPABLE_MAGIC)?;
            out.write(&len.to_le_bytes())?;
            let toc_at = out.written;
            out.write(&buf)?;
            out.write(&zstd_chunked_footer(toc_at, buf.len() as u64, json.len() as u64))?;
            Some((Digest::of(&buf), format!("{}:{}:{}:1", toc_at, buf.len(), json.len())))
        }
    };
    out.inner.flush().ctx(|| "flushing output".into())?;
    Ok(BuildResult {
        compression: opts.compression,
        toc_digest,
        diff_id: diff.finish(),
        uncompressed_size,
        blob_size: out.written,
        blob_digest: out.hasher.finish(),
        toc_offset: if zstd_manifest.is_some() { toc_offset + 8 } else { toc_offset },
        entries: toc.entries.len(),
        missing_prioritized: ordered.missing,
        zstd_manifest,
    })
}

struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Hasher::new(),
            written: 0,
        }
    }
    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.inner.write_all(b).ctx(|| format!("writing output at byte {}", self.written))?;
        self.hasher.update(b);
        self.written += b.len() as u64;
        Ok(())
    }
}

/// Uncompressed-stream accounting from the writer thread.
struct StreamStats {
    diff: Hasher,
    uncompressed: u64,
}

struct Job {
    seq: usize,
    members: Vec<Vec<u8>>,
}

struct Done {
    seq: usize,
    compressed: Vec<Vec<u8>>,
    raw: Vec<Vec<u8>>,
}

/// Cuts members, builds TOC entries and runs the compression pool. Returns the TOC (offsets
/// still unresolved), (TOC entry index, member index) pairs, each member's compressed offset,
/// and the uncompressed-stream stats.
#[allow(clippy::type_complexity)]
fn compress_entries<W: Write + Send>(
    spool: &File,
    index: &tar::TarIndex,
    items: &[Item],
    opts: &BuildOptions,
    level: u32,
    threads: usize,
    out: &mut HashingWriter<W>,
) -> Result<(Toc, Vec<(usize, usize)>, Vec<u64>, StreamStats)> {
    let (job_tx, job_rx) = bounded::<Job>(threads * 2);
    let (done_tx, done_rx) = bounded::<Result<Done>>(threads * 2);

    std::thread::scope(|s| {
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let compression = opts.compression;
            s.spawn(move || {
                let mut c = match MemberCompressor::new(compression, level) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = done_tx.send(Err(e));
                        return;
                    }
                };
                for job in job_rx {
                    let compressed = job
                        .members
                        .iter()
                        .map(|m| {
                            let mut o = Vec::with_capacity(m.len() / 2 + 64);
                            c.compress(m, &mut o);
                            o
                        })
                        .collect();
                    if done_tx
                        .send(Ok(Done {
                            seq: job.seq,
                            compressed,
                            raw: job.members,
                        }))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        drop(job_rx);
        drop(done_tx);

        let writer = s.spawn(move || -> Result<(Vec<u64>, StreamStats)> {
            let mut pending: BTreeMap<usize, Done> = BTreeMap::new();
            let mut next = 0usize;
            let mut offsets = Vec::new();
            let mut stats = StreamStats {
                diff: Hasher::new(),
                uncompressed: 0,
            };
            for done in done_rx {
                let done = done?;
                pending.insert(done.seq, done);
                while let Some(d) = pending.remove(&next) {
                    for (c, r) in d.compressed.iter().zip(&d.raw) {
                        offsets.push(out.written);
                        out.write(c)?;
                        stats.diff.update(r);
                        stats.uncompressed += r.len() as u64;
                    }
                    next += 1;
                }
            }
            Ok((offsets, stats))
        });

        let produced = produce(spool, index, items, opts.chunk_size, job_tx);
        let written = writer.join().expect("writer thread does not panic");
        // A write error makes the producer fail on a closed channel: report the cause.
        let (offsets, stats) = written?;
        let (toc, refs) = produced?;
        Ok((toc, refs, offsets, stats))
    })
}

/// Member cutting state of the producer.
struct Cutter {
    tx: crossbeam_channel::Sender<Job>,
    current: Vec<u8>,
    job: Vec<Vec<u8>>,
    job_bytes: usize,
    seq: usize,
    members: usize,
}

const JOB_BYTES: usize = 1 << 20;

impl Cutter {
    /// Closes the current member and opens a new one; returns the new member's index.
    fn cut(&mut self) -> Result<usize> {
        let m = std::mem::take(&mut self.current);
        self.job_bytes += m.len();
        self.job.push(m);
        self.members += 1;
        if self.job_bytes >= JOB_BYTES {
            self.flush()?;
        }
        Ok(self.members)
    }
    fn flush(&mut self) -> Result<()> {
        if self.job.is_empty() {
            return Ok(());
        }
        let members = std::mem::take(&mut self.job);
        self.job_bytes = 0;
        self.tx
            .send(Job { seq: self.seq, members })
            .map_err(|_| Error::InvalidArgument("compression pipeline stopped".into()))?;
        self.seq += 1;
        Ok(())
    }
}

fn produce(
    spool: &File,
    index: &tar::TarIndex,
    items: &[Item],
    chunk_size: u64,
    tx: crossbeam_channel::Sender<Job>,
) -> Result<(Toc, Vec<(usize, usize)>)> {
    let mut cut = Cutter {
        tx,
        current: Vec::with_capacity(64 << 10),
        job: Vec::new(),
        job_bytes: 0,
        seq: 0,
        members: 0,
    };
    let mut toc = Toc {
        version: 1,
        entries: Vec::with_capacity(items.len() + items.len() / 8),
    };
    let mut refs = Vec::new();
    let mut last_user: HashMap<i64, String> = HashMap::new();
    let mut last_group: HashMap<i64, String> = HashMap::new();
    let read_at = |buf: &mut [u8], off: u64| spool.read_exact_at(buf, off).ctx(|| format!("reading spool at byte {off}"));

    for &(start, end) in &index.global_headers {
        let at = cut.current.len();
        cut.current.resize(at + (end - start) as usize, 0);
        read_at(&mut cut.current[at..], start)?;
    }
    for item in items {
        let landmark_entry;
        let e: &IndexedEntry = match *item {
            Item::Entry(i) => &index.entries[i],
            Item::Landmark(name) => {
                landmark_entry = landmark(name);
                &landmark_entry
            }
        };
        // Header blocks, verbatim (synthetic landmarks get a fresh ustar header).
        match *item {
            Item::Entry(_) => {
                let at = cut.current.len();
                cut.current.resize(at + (e.data_start - e.header_start) as usize, 0);
                read_at(&mut cut.current[at..], e.header_start)?;
            }
            Item::Landmark(name) => cut.current.extend_from_slice(&tar::ustar_header(name, 1, 0)),
        }
        let m = &e.meta;
        let mut ent = TocEntry::new(m.name.clone(), entry_type(m.kind()));
        ent.mode = m.mode;
        ent.uid = m.uid;
        ent.gid = m.gid;
        ent.user_name = name_if_changed(&mut last_user, m.uid, &m.uname);
        ent.group_name = name_if_changed(&mut last_group, m.gid, &m.gname);
        if m.mtime != 0 {
            ent.mod_time = format_rfc3339(m.mtime);
        }
        ent.xattrs = m.xattrs.clone();
        match m.kind() {
            TarKind::Hardlink | TarKind::Symlink => ent.link_name = m.link_name.clone(),
            TarKind::Char | TarKind::Block => {
                ent.dev_major = m.dev_major;
                ent.dev_minor = m.dev_minor;
            }
            _ => {}
        }
        if m.kind() != TarKind::Reg {
            toc.entries.push(ent);
            continue;
        }
        ent.size = e.size;
        if e.size == 0 {
            ent.digest = Digest::of(b"").to_string();
            toc.entries.push(ent);
            continue;
        }
        let mut file_hash = Hasher::new();
        let reg_index = toc.entries.len();
        let mut written = 0u64;
        while written < e.size {
            let member = cut.cut()?;
            let remain = e.size - written;
            let this = remain.min(chunk_size);
            if remain >= chunk_size {
                ent.chunk_size = chunk_size;
            }
            ent.chunk_offset = written;
            let at = cut.current.len();
            cut.current.resize(at + this as usize, 0);
            match *item {
                Item::Entry(_) => read_at(&mut cut.current[at..], e.data_start + written)?,
                Item::Landmark(_) => cut.current[at] = LANDMARK_CONTENTS,
            }
            let chunk = &cut.current[at..];
            let chunk_digest = Digest::of(chunk);
            if this < e.size {
                file_hash.update(chunk);
            }
            ent.chunk_digest = chunk_digest.to_string();
            refs.push((toc.entries.len(), member));
            let next = TocEntry::new(m.name.clone(), EntryType::Chunk);
            toc.entries.push(std::mem::replace(&mut ent, next));
            written += this;
        }
        toc.entries[reg_index].digest = if e.size <= chunk_size {
            toc.entries[reg_index].chunk_digest.clone()
        } else {
            file_hash.finish().to_string()
        };
        let pad = (e.padded_size() - e.size) as usize;
        cut.current.resize(cut.current.len() + pad, 0);
    }
    cut.cut()?;
    cut.flush()?;
    Ok((toc, refs))
}

fn landmark(name: &'static str) -> IndexedEntry {
    IndexedEntry {
        header_start: 0,
        data_start: 0,
        size: 1,
        meta: tar::TarMeta {
            name: name.to_string(),
            kind: Some(TarKind::Reg),
            ..Default::default()
        },
    }
}

fn entry_type(k: TarKind) -> EntryType {
    match k {
        TarKind::Reg => EntryType::Reg,
        TarKind::Hardlink => EntryType::Hardlink,
        TarKind::Symlink => EntryType::Symlink,
        TarKind::Char => EntryType::Char,
        TarKind::Block => EntryType::Block,
        TarKind::Dir => EntryType::Dir,
        TarKind::Fifo => EntryType::Fifo,
    }
}

/// The reference writes a user/group name only when it differs from the last one written for
/// the same id; readers carry names forward per id.
fn name_if_changed(last: &mut HashMap<i64, String>, id: i64, name: &str) -> String {
    if name.is_empty() || last.get(&id).map(String::as_str) == Some(name) {
        return String::new();
    }
    last.insert(id, name.to_string());
    name.to_string()
}
