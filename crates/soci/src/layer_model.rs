//! SOCI behind the layer seam: a zTOC as a format-neutral [`LayerIndex`].
//!
//! The tree side is tar semantics, shared with eStargz: the zTOC's entries become TOC entries
//! and go through the same tree builder (path normalisation, implicit parents, hardlinks,
//! hostile names refused) and the same overlay conversion (whiteouts, opaque directories).
//! Only the chunks are SOCI's own: a file's bytes `[offset, offset + size)` in the
//! uncompressed tar are cut where spans start, and each piece becomes a chunk whose compressed
//! range is its span's (`[checkpoint fetch start, next checkpoint)`, verified against the span
//! digest before anything is decoded), decoded by resuming the gzip stream at the span's
//! checkpoint (or sliced, for an uncompressed layer) and taking `size` bytes at the piece's
//! offset in the span. Inflation stops once those bytes are out, so a small file at the start
//! of a span costs little CPU; the fetch is the span (the unit SOCI can verify).

use std::collections::HashMap;
use std::sync::Arc;

use estargz::toc::{EntryType, Toc, TocEntry};
use estargz::tree::Tree;
use index::zran::{Resume, SpanEnd};
use index::{Chunk, Codec, Digest, LayerIndex, Verify};

use crate::zinfo::SpanTable;
use crate::ztoc::{Compression, EntryKind, Ztoc};

/// Why a zTOC does not make a layer model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("zTOC entries: {0}")]
    Tree(#[from] estargz::Error),
    #[error("zTOC: {0}")]
    Model(#[from] index::IndexError),
    #[error("zTOC span {span}: {reason}")]
    Span { span: usize, reason: String },
}

/// The layer model of the layer `ztoc` indexes.
pub fn layer_index(ztoc: &Ztoc) -> Result<LayerIndex, ModelError> {
    let toc = Toc { version: 1, entries: ztoc.entries.iter().map(toc_entry).collect() };
    let mut tree = Tree::build(&toc, ztoc.compressed_size.max(1))?;

    // One table chunk per (file, span) piece, keyed by the span's fetch start.
    let spans = &ztoc.spans;
    let mut by_start: HashMap<u64, usize> = HashMap::new();
    let mut resumes: Vec<Option<Arc<Resume>>> = Vec::new();
    let mut digests: Vec<Digest> = Vec::new();
    for span in 0..spans.span_count() {
        let (start, _) = spans.compressed_range(span, ztoc.compressed_size);
        if by_start.insert(start, span).is_some() {
            return Err(ModelError::Span { span, reason: format!("starts at compressed offset {start} like another span") });
        }
        resumes.push(match spans {
            SpanTable::Gzip { checkpoints, .. } => {
                let c = &checkpoints[span];
                let span_end = checkpoints.get(span + 1).map(|n| SpanEnd { len: n.uncompressed - c.uncompressed, window: n.window.clone() });
                Some(Arc::new(Resume::new(c.bits, c.window.clone(), span_end)))
            }
            SpanTable::Tar { .. } => None,
        });
        let d = ztoc.span_digests[span]
            .parse::<Digest>()
            .map_err(|e| ModelError::Span { span, reason: format!("digest: {e}") })?;
        digests.push(d);
    }
    for e in &ztoc.entries {
        if e.kind != EntryKind::Reg {
            continue;
        }
        let Some(id) = tree.lookup(&e.name) else { continue };
        let node = &mut tree.nodes[id];
        node.size = e.size;
        node.chunks.clear();
        let mut pos = e.offset;
        let end = e.offset + e.size;
        while pos < end {
            let span = spans.span_of(pos);
            let span_start = spans.uncompressed_start(span);
            let span_end = spans.uncompressed_end(span, ztoc.uncompressed_size).max(pos + 1);
            let piece_end = end.min(span_end);
            let (fetch_start, fetch_end) = spans.compressed_range(span, ztoc.compressed_size);
            node.chunks.push(estargz::tree::Chunk {
                offset: fetch_start,
                next_offset: fetch_end,
                inner_offset: pos - span_start,
                chunk_offset: pos - e.offset,
                size: piece_end - pos,
                digest: None,
            });
            pos = piece_end;
        }
    }
    let codec = match ztoc.compression {
        Compression::Gzip => Codec::GzipResume,
        Compression::Uncompressed => Codec::Uncompressed,
    };
    Ok(estargz::layer_model::layer_index_with(&tree, |c| {
        let span = by_start[&c.offset];
        Chunk {
            offset: c.offset,
            end: c.next_offset,
            codec,
            inner_offset: c.inner_offset,
            size: c.size,
            verify: Verify::Compressed(digests[span]),
            resume: resumes[span].clone(),
        }
    })?)
}

fn toc_entry(e: &crate::ztoc::Entry) -> TocEntry {
    let kind = match e.kind {
        EntryKind::Reg => EntryType::Reg,
        EntryKind::Dir => EntryType::Dir,
        EntryKind::Symlink => EntryType::Symlink,
        EntryKind::Hardlink => EntryType::Hardlink,
        EntryKind::Char => EntryType::Char,
        EntryKind::Block => EntryType::Block,
        EntryKind::Fifo => EntryType::Fifo,
    };
    let mut t = TocEntry::new(e.name.clone(), kind);
    // Regular files get their size and chunks after the tree is built (a TOC entry with a
    // size would need eStargz member offsets).
    t.mod_time = crate::time::Mtime { secs: e.mtime.secs, nanos: 0 }.to_rfc3339();
    t.link_name = e.linkname.clone();
    t.mode = e.mode;
    t.uid = i64::from(e.uid);
    t.gid = i64::from(e.gid);
    t.user_name = e.uname.clone();
    t.group_name = e.gname.clone();
    t.dev_major = e.devmajor;
    t.dev_minor = e.devminor;
    t.xattrs = e.xattrs().map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec())).collect();
    t
}
