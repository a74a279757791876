//! The zTOC: SOCI's per-layer index, read from and written to its FlatBuffers form.
//!
//! A zTOC lists every tar entry of one layer with the offset of its data in the
//! *uncompressed* tar stream, and carries the span table (checkpoints) and one sha256 per
//! span of the *compressed* blob. Reading a file is then: find the spans its bytes fall in,
//! range-read those compressed spans, check each against its digest, inflate from the span's
//! checkpoint. The in-memory [`Ztoc`] mirrors the wire fields one to one so that a zTOC we
//! parse and write back is the same document; [`Ztoc::from_bytes`] checks everything a
//! reader later relies on (offsets inside the archive, one digest per span, sane names), so
//! that a hostile zTOC is rejected once, with a reason, instead of misleading each read.
//!
//! The writer adds fields in the order the SOCI project's marshaller does, so the bytes (and
//! therefore the zTOC digest) come out the same for the same content.

use crate::fbs::ztoc as fb;
use crate::zinfo::{SpanTable, ZinfoError};

/// The zTOC format version SOCI writes and reads.
pub const ZTOC_VERSION: &str = "0.9";
/// What `soci create` writes as its build tool.
pub const SOCI_BUILD_TOOL: &str = "AWS SOCI CLI v0.2";
/// Upstream appends prefetch hints after the FlatBuffer, behind this marker.
const PREFETCH_SEPARATOR: &[u8] = b"---SOCI-PREFETCH---";

/// How the layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Uncompressed,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Uncompressed => "uncompressed",
        }
    }
}

/// The kind of a tar entry, named as SOCI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Reg,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

impl EntryKind {
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::Reg => "reg",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Hardlink => "hardlink",
            EntryKind::Char => "char",
            EntryKind::Block => "block",
            EntryKind::Fifo => "fifo",
        }
    }

    pub fn from_name(name: &str) -> Option<EntryKind> {
        Some(match name {
            "reg" => EntryKind::Reg,
            "dir" => EntryKind::Dir,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "char" => EntryKind::Char,
            "block" => EntryKind::Block,
            "fifo" => EntryKind::Fifo,
            _ => return None,
        })
    }
}

/// One tar entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The tar name as stored (PAX/GNU long names resolved; no cleaning: `dir/` keeps its slash).
    pub name: String,
    pub kind: EntryKind,
    /// Offset of the entry's data in the uncompressed tar stream (just after its header).
    pub offset: u64,
    pub size: u64,
    pub linkname: String,
    /// The tar header's mode field (permission bits plus setuid/setgid/sticky).
    pub mode: i64,
    pub uid: u32,
    pub gid: u32,
    pub uname: String,
    pub gname: String,
    pub mtime: crate::time::Mtime,
    pub devmajor: i64,
    pub devminor: i64,
    /// Every PAX record of the entry (`path`, `mtime`, `SCHILY.xattr.*`, ...), sorted by key.
    pub pax: Vec<(String, String)>,
}

impl Entry {
    /// The entry's extended attributes (`SCHILY.xattr.NAME` PAX records).
    pub fn xattrs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pax
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("SCHILY.xattr.").map(|name| (name, v.as_str())))
    }
}

/// A parsed zTOC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ztoc {
    pub version: String,
    pub build_tool: String,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub entries: Vec<Entry>,
    pub compression: Compression,
    /// One `sha256:<hex>` per span, over the span's compressed bytes.
    pub span_digests: Vec<String>,
    pub spans: SpanTable,
    /// Prefetch hints upstream appends after the FlatBuffer (raw JSON), if any.
    pub prefetch: Option<Vec<u8>>,
}

/// Why a zTOC cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ZtocError {
    #[error("not a zTOC FlatBuffer: {0}")]
    Flatbuffer(#[from] flatbuffers::InvalidFlatbuffer),
    #[error("zTOC has no {0}")]
    Missing(&'static str),
    #[error("zTOC version {0:?} is not supported (only {ZTOC_VERSION})")]
    Version(String),
    #[error("zTOC compression algorithm {0} is not supported")]
    Algorithm(i8),
    #[error("zTOC checkpoints: {0}")]
    Checkpoints(#[from] ZinfoError),
    #[error("zTOC lists {digests} span digests for {spans} spans")]
    SpanDigests { digests: usize, spans: usize },
    #[error("zTOC span digest {index} {digest:?} is not sha256:<64 hex>")]
    BadSpanDigest { index: usize, digest: String },
    #[error("zTOC max_span_id {max_span_id} does not match its {spans} spans")]
    MaxSpanId { max_span_id: i32, spans: usize },
    #[error("zTOC span table describes {table} bytes but the archive holds {archive}")]
    SpanTableSize { table: u64, archive: u64 },
    #[error("zTOC entry {index} ({name:?}): {reason}")]
    BadEntry { index: usize, name: String, reason: String },
    #[error("zTOC sizes: {0}")]
    Sizes(String),
}

fn bad_entry(index: usize, name: &str, reason: impl Into<String>) -> ZtocError {
    ZtocError::BadEntry { index, name: name.to_owned(), reason: reason.into() }
}

impl Ztoc {
    /// Parses and checks a zTOC blob (FlatBuffer, optionally followed by prefetch hints).
    pub fn from_bytes(blob: &[u8]) -> Result<Ztoc, ZtocError> {
        let (fbuf, prefetch) = match find(blob, PREFETCH_SEPARATOR) {
            Some(at) => (&blob[..at], Some(blob[at + PREFETCH_SEPARATOR.len()..].to_vec())),
            None => (blob, None),
        };
        let opts = flatbuffers::VerifierOptions {
            max_tables: 50_000_000,
            max_apparent_size: 1 << 34,
            ..Default::default()
        };
        let root = flatbuffers::root_with_opts::<fb::Ztoc>(&opts, fbuf)?;
        let version = root.version().unwrap_or_default().to_owned();
        if version != ZTOC_VERSION {
            return Err(ZtocError::Version(version));
        }
        let info = root.compression_info().ok_or(ZtocError::Missing("compression_info"))?;
        let compression = match info.compression_algorithm() {
            fb::CompressionAlgorithm::Gzip => Compression::Gzip,
            fb::CompressionAlgorithm::Uncompressed => Compression::Uncompressed,
            other => return Err(ZtocError::Algorithm(other.0)),
        };
        let checkpoints = info.checkpoints().ok_or(ZtocError::Missing("checkpoints"))?;
        let spans = match compression {
            Compression::Gzip => SpanTable::parse_gzip(checkpoints.bytes())?,
            Compression::Uncompressed => SpanTable::parse_tar(checkpoints.bytes())?,
        };
        let span_digests: Vec<String> =
            info.span_digests().into_iter().flatten().map(str::to_owned).collect();
        let size = |v: i64, what: &str| {
            u64::try_from(v).map_err(|_| ZtocError::Sizes(format!("{what} {v} is negative")))
        };
        let mut entries = Vec::new();
        for (index, m) in root.toc().and_then(|t| t.metadata()).into_iter().flatten().enumerate() {
            entries.push(entry_from_fb(index, &m)?);
        }
        let ztoc = Ztoc {
            version,
            build_tool: root.build_tool_identifier().unwrap_or_default().to_owned(),
            compressed_size: size(root.compressed_archive_size(), "compressed archive size")?,
            uncompressed_size: size(root.uncompressed_archive_size(), "uncompressed archive size")?,
            entries,
            compression,
            span_digests,
            spans,
            prefetch,
        };
        if info.max_span_id() as i64 != ztoc.spans.span_count() as i64 - 1 {
            return Err(ZtocError::MaxSpanId {
                max_span_id: info.max_span_id(),
                spans: ztoc.spans.span_count(),
            });
        }
        ztoc.validate()?;
        Ok(ztoc)
    }

    /// Checks the invariants readers rely on.
    pub fn validate(&self) -> Result<(), ZtocError> {
        let spans = self.spans.span_count();
        if self.span_digests.len() != spans {
            return Err(ZtocError::SpanDigests { digests: self.span_digests.len(), spans });
        }
        for (index, d) in self.span_digests.iter().enumerate() {
            let hex = d.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ZtocError::BadSpanDigest { index, digest: d.clone() });
            }
        }
        self.spans.validate()?;
        match &self.spans {
            SpanTable::Gzip { checkpoints, .. } => {
                let last = checkpoints.last().expect("validated: at least one checkpoint");
                if last.compressed > self.compressed_size {
                    return Err(ZtocError::SpanTableSize { table: last.compressed, archive: self.compressed_size });
                }
                // Deflate expands at most 1032:1: a larger claim is a lie that would make
                // readers allocate for bytes the blob cannot hold.
                let most = last.uncompressed.saturating_add((self.compressed_size - last.fetch_start()).saturating_mul(1032));
                if self.uncompressed_size > most {
                    return Err(ZtocError::Sizes(format!(
                        "{} uncompressed bytes cannot come out of a {}-byte gzip blob",
                        self.uncompressed_size, self.compressed_size
                    )));
                }
            }
            SpanTable::Tar { size, .. } => {
                if *size != self.compressed_size || self.uncompressed_size > *size {
                    return Err(ZtocError::SpanTableSize { table: *size, archive: self.compressed_size });
                }
            }
        }
        let mut previous_end = 0u64;
        for (index, e) in self.entries.iter().enumerate() {
            let end = e.offset.checked_add(e.size).filter(|&end| end <= self.uncompressed_size);
            let Some(end) = end else {
                return Err(bad_entry(index, &e.name, format!(
                    "data [{}, +{}) runs past the {}-byte archive", e.offset, e.size, self.uncompressed_size
                )));
            };
            if e.offset < previous_end + 512 {
                return Err(bad_entry(index, &e.name, format!(
                    "data at {} overlaps the previous entry or leaves no room for its header", e.offset
                )));
            }
            if e.offset % 512 != 0 {
                return Err(bad_entry(index, &e.name, format!("data at {} is not block aligned", e.offset)));
            }
            if e.size != 0 && e.kind != EntryKind::Reg {
                return Err(bad_entry(index, &e.name, format!("a {} with {} data bytes", e.kind.name(), e.size)));
            }
            if e.name.is_empty() || e.name.contains('\0') || e.linkname.contains('\0') {
                return Err(bad_entry(index, &e.name, "empty name or NUL byte"));
            }
            previous_end = end;
        }
        Ok(())
    }

    /// Serialises the zTOC as SOCI does (same field order, so the same bytes for the same content).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = flatbuffers::FlatBufferBuilder::with_capacity(64 * 1024);
        let version = b.create_string(&self.version);
        let tool = b.create_string(&self.build_tool);
        let toc = {
            let mut offsets = vec![None; self.entries.len()];
            for (i, e) in self.entries.iter().enumerate().rev() {
                offsets[i] = Some(entry_to_fb(&mut b, e));
            }
            let offsets: Vec<_> = offsets.into_iter().map(Option::unwrap).collect();
            let metadata = b.create_vector(&offsets);
            let mut t = fb::TOCBuilder::new(&mut b);
            t.add_metadata(metadata);
            t.finish()
        };
        let checkpoints = b.create_vector(&self.spans.to_bytes());
        let digests: Vec<_> = self.span_digests.iter().map(|d| b.create_string(d)).collect();
        let digests = b.create_vector(&digests);
        let info = {
            let mut c = fb::CompressionInfoBuilder::new(&mut b);
            c.add_max_span_id(self.spans.span_count() as i32 - 1);
            c.add_span_digests(digests);
            c.add_checkpoints(checkpoints);
            c.add_compression_algorithm(match self.compression {
                Compression::Gzip => fb::CompressionAlgorithm::Gzip,
                Compression::Uncompressed => fb::CompressionAlgorithm::Uncompressed,
            });
            c.finish()
        };
        let mut z = fb::ZtocBuilder::new(&mut b);
        z.add_version(version);
        z.add_build_tool_identifier(tool);
        z.add_toc(toc);
        z.add_compressed_archive_size(self.compressed_size as i64);
        z.add_uncompressed_archive_size(self.uncompressed_size as i64);
        z.add_compression_info(info);
        let root = z.finish();
        b.finish_minimal(root);
        let mut out = b.finished_data().to_vec();
        if let Some(p) = &self.prefetch {
            out.extend_from_slice(PREFETCH_SEPARATOR);
            out.extend_from_slice(p);
        }
        out
    }

    /// The spans `[first, last]` holding `entry`'s bytes (its own span when empty).
    pub fn spans_of(&self, entry: &Entry) -> (usize, usize) {
        let first = self.spans.span_of(entry.offset);
        let last = self.spans.span_of((entry.offset + entry.size).saturating_sub(1).max(entry.offset));
        (first, last)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn entry_from_fb(index: usize, m: &fb::FileMetadata<'_>) -> Result<Entry, ZtocError> {
    let name = m.name().unwrap_or_default().to_owned();
    let kind_name = m.type_().unwrap_or_default();
    let kind = EntryKind::from_name(kind_name)
        .ok_or_else(|| bad_entry(index, &name, format!("unknown type {kind_name:?}")))?;
    let non_negative = |v: i64, what: &str| {
        u64::try_from(v).map_err(|_| bad_entry(index, &name, format!("negative {what} {v}")))
    };
    let mod_time = m.mod_time().unwrap_or_default();
    let mtime = crate::time::Mtime::parse_rfc3339(mod_time)
        .ok_or_else(|| bad_entry(index, &name, format!("unreadable mod_time {mod_time:?}")))?;
    let mut pax: Vec<(String, String)> = m
        .xattrs()
        .into_iter()
        .flatten()
        .map(|x| (x.key().unwrap_or_default().to_owned(), x.value().unwrap_or_default().to_owned()))
        .collect();
    pax.sort();
    Ok(Entry {
        offset: non_negative(m.uncompressed_offset(), "offset")?,
        size: non_negative(m.uncompressed_size(), "size")?,
        kind,
        linkname: m.linkname().unwrap_or_default().to_owned(),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        uname: m.uname().unwrap_or_default().to_owned(),
        gname: m.gname().unwrap_or_default().to_owned(),
        mtime,
        devmajor: m.devmajor(),
        devminor: m.devminor(),
        pax,
        name,
    })
}

fn entry_to_fb<'a>(
    b: &mut flatbuffers::FlatBufferBuilder<'a>,
    e: &Entry,
) -> flatbuffers::WIPOffset<fb::FileMetadata<'a>> {
    let name = b.create_string(&e.name);
    let kind = b.create_string(e.kind.name());
    let linkname = b.create_string(&e.linkname);
    let uname = b.create_string(&e.uname);
    let gname = b.create_string(&e.gname);
    let mod_time = b.create_string(&e.mtime.to_rfc3339());
    let xattrs: Vec<_> = e
        .pax
        .iter()
        .map(|(k, v)| {
            let key = b.create_string(k);
            let value = b.create_string(v);
            let mut x = fb::XattrBuilder::new(b);
            x.add_key(key);
            x.add_value(value);
            x.finish()
        })
        .collect();
    let xattrs = b.create_vector(&xattrs);
    let mut m = fb::FileMetadataBuilder::new(b);
    m.add_name(name);
    m.add_type_(kind);
    m.add_uncompressed_offset(e.offset as i64);
    m.add_uncompressed_size(e.size as i64);
    m.add_linkname(linkname);
    m.add_mode(e.mode);
    m.add_uid(e.uid);
    m.add_gid(e.gid);
    m.add_uname(uname);
    m.add_gname(gname);
    m.add_mod_time(mod_time);
    m.add_devmajor(e.devmajor);
    m.add_devminor(e.devminor);
    m.add_xattrs(xattrs);
    m.finish()
}
