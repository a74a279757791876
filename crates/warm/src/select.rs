//! Which chunks to warm.
//!
//! Three modes, as `lazypull warm` offers them:
//! - [`Mode::Full`]: every chunk of every layer (the image is then served with no registry
//!   request at all, like a fully pulled image, but still through the lazy path).
//! - [`Mode::Prioritized`]: the chunks of the files a layer marks as needed at start (eStargz's
//!   prioritized files, before `.prefetch.landmark`) and of the files a recording run saw opened.
//! - [`Mode::Budget`]: the most valuable chunks of all the images together within a byte budget:
//!   first the prioritized and recorded chunks of every image (in the order the images were
//!   given), then the rest in image order, layer order and blob order. A chunk that does not fit
//!   is skipped and smaller ones after it may still be taken, so the budget is used up.
//!
//! Costs are the chunk's *stored* (uncompressed) bytes: a budget is disk space on the node or the
//! volume. A compressed range shared by several chunks (a SOCI span cut at file boundaries) is
//! fetched once however many of its chunks are chosen; that is the fetcher's business, not the
//! plan's.

use std::collections::BTreeSet;

use index::{LayerIndex, Prefetch};

/// What to warm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Full,
    Prioritized,
    /// At most this many stored bytes over all images.
    Budget(u64),
}

/// One lazy layer to plan for: its index and the paths a recording run saw opened in it.
pub struct LayerInput<'a> {
    pub index: &'a LayerIndex,
    /// Paths as the layer names them (`usr/bin/sh` or `/usr/bin/sh`); unknown paths are ignored.
    pub recorded: &'a [String],
}

/// Why a chunk was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Prioritized by the layer or opened in a recording run.
    Hot,
    /// Anything else.
    Rest,
}

/// The chunks chosen in one layer (indices into its chunk table, ascending).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlannedLayer {
    pub chunks: Vec<usize>,
    pub bytes: u64,
    /// Of which hot (prioritized or recorded).
    pub hot_chunks: usize,
}

/// A plan over all layers of all images, in input order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub layers: Vec<PlannedLayer>,
    /// Stored bytes of everything planned.
    pub bytes: u64,
    /// Stored bytes of every chunk of every layer (what `Full` would take).
    pub total_bytes: u64,
}

/// The hot chunks of a layer: those of its prioritized files and of the recorded paths.
pub fn hot_chunks(input: &LayerInput) -> BTreeSet<usize> {
    let idx = input.index;
    let mut hot = BTreeSet::new();
    match idx.prefetch() {
        Prefetch::UpTo(end) => hot.extend(idx.chunks().iter().enumerate().filter(|(_, c)| c.offset < *end).map(|(i, _)| i)),
        Prefetch::Ranges(ranges) => {
            hot.extend(idx.chunks().iter().enumerate().filter(|(_, c)| ranges.iter().any(|r| c.offset >= r.start && c.end <= r.end)).map(|(i, _)| i))
        }
        Prefetch::Unspecified | Prefetch::Nothing => {}
    }
    for path in input.recorded {
        let Some(ino) = idx.resolve(path.trim_start_matches('/')) else { continue };
        if let Some(node) = idx.get(ino) {
            hot.extend(node.extents.iter().map(|e| e.chunk));
        }
    }
    hot
}

/// Plans `mode` over `layers` (every layer of every image, images in the order given).
pub fn plan(layers: &[LayerInput], mode: Mode) -> Plan {
    let hot: Vec<BTreeSet<usize>> = layers.iter().map(hot_chunks).collect();
    let size = |l: usize, c: usize| layers[l].index.chunks()[c].size;
    let total_bytes = layers.iter().map(|l| l.index.chunks().iter().map(|c| c.size).sum::<u64>()).sum();
    let mut chosen: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); layers.len()];
    match mode {
        Mode::Full => {
            for (l, input) in layers.iter().enumerate() {
                chosen[l].extend(0..input.index.chunks().len());
            }
        }
        Mode::Prioritized => chosen.clone_from(&hot),
        Mode::Budget(budget) => {
            let mut left = budget;
            let mut take = |l: usize, c: usize, chosen: &mut Vec<BTreeSet<usize>>| {
                let s = size(l, c);
                if s <= left && chosen[l].insert(c) {
                    left -= s;
                }
            };
            for (l, h) in hot.iter().enumerate() {
                for &c in h {
                    take(l, c, &mut chosen);
                }
            }
            for (l, input) in layers.iter().enumerate() {
                let mut order: Vec<usize> = (0..input.index.chunks().len()).collect();
                order.sort_by_key(|&c| (input.index.chunks()[c].offset, input.index.chunks()[c].inner_offset));
                for c in order {
                    take(l, c, &mut chosen);
                }
            }
        }
    }
    let mut out = Plan { total_bytes, ..Plan::default() };
    for (l, set) in chosen.into_iter().enumerate() {
        let bytes = set.iter().map(|&c| size(l, c)).sum();
        let hot_chunks = set.iter().filter(|c| hot[l].contains(c)).count();
        out.bytes += bytes;
        out.layers.push(PlannedLayer { chunks: set.into_iter().collect(), bytes, hot_chunks });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use index::{Chunk, Codec, Digest, Extent, Inode, NodeKind, Verify};

    /// A layer of files `(name, size)`, one chunk each, in blob order; `prefetch` files first.
    fn layer(files: &[(&str, u64)], prefetch_files: usize) -> LayerIndex {
        let mut root = Inode::new(NodeKind::Dir, String::new(), 1);
        let mut inodes = vec![None];
        let mut chunks = Vec::new();
        let mut offset = 0;
        let mut landmark = None;
        for (i, (name, size)) in files.iter().enumerate() {
            if i == prefetch_files {
                landmark = Some(offset);
            }
            let ino = inodes.len() as u64 + 1;
            let mut f = Inode::new(NodeKind::Reg, name.to_string(), 1);
            f.size = *size;
            f.extents = vec![Extent { file_offset: 0, len: *size, chunk: chunks.len(), chunk_offset: 0 }];
            chunks.push(Chunk {
                offset,
                end: offset + size / 2 + 1,
                codec: Codec::GzipMembers,
                inner_offset: 0,
                size: *size,
                verify: Verify::Uncompressed(Digest::of(name.as_bytes())),
                resume: None,
            });
            offset += size / 2 + 1;
            root.children.push((name.to_string(), ino));
            inodes.push(Some(f));
        }
        root.children.sort();
        inodes[0] = Some(root);
        let prefetch = match landmark {
            Some(end) if prefetch_files > 0 => Prefetch::UpTo(end),
            _ => Prefetch::Unspecified,
        };
        LayerIndex::new(inodes, chunks, prefetch).unwrap()
    }

    #[test]
    fn full_takes_everything_and_prioritized_the_hot_chunks() {
        let a = layer(&[("sh", 100), ("lib", 300), ("data", 1000)], 1);
        let b = layer(&[("x", 10), ("y", 20)], 0);
        let rec = vec!["/y".to_string(), "/nope".to_string()];
        let inputs = [LayerInput { index: &a, recorded: &[] }, LayerInput { index: &b, recorded: &rec }];
        let full = plan(&inputs, Mode::Full);
        assert_eq!(full.bytes, 1430);
        assert_eq!(full.total_bytes, 1430);
        assert_eq!(full.layers[0].chunks, vec![0, 1, 2]);
        let prio = plan(&inputs, Mode::Prioritized);
        assert_eq!(prio.layers[0].chunks, vec![0], "the file before the landmark");
        assert_eq!(prio.layers[1].chunks, vec![1], "the recorded file; unknown paths ignored");
        assert_eq!(prio.bytes, 120);
        assert_eq!(prio.layers[1].hot_chunks, 1);
    }

    #[test]
    fn a_budget_takes_hot_chunks_of_every_image_first_then_image_order_and_fills_up() {
        let a = layer(&[("sh", 100), ("lib", 300), ("data", 1000)], 1);
        let b = layer(&[("x", 10), ("y", 20), ("z", 500)], 0);
        let rec = vec!["z".to_string()];
        let inputs = [LayerInput { index: &a, recorded: &[] }, LayerInput { index: &b, recorded: &rec }];
        // Hot: a/sh (100) and b/z (500) = 600; then a/lib (300) fits in 950, a/data (1000) does
        // not, b/x (10) and b/y (20) do.
        let p = plan(&inputs, Mode::Budget(950));
        assert_eq!(p.layers[0].chunks, vec![0, 1]);
        assert_eq!(p.layers[1].chunks, vec![0, 1, 2]);
        assert_eq!(p.bytes, 930);
        assert!(p.bytes <= 950);
        // A budget smaller than the hot set: hot chunks in image order, as far as they fit.
        let p = plan(&inputs, Mode::Budget(150));
        assert_eq!((p.layers[0].chunks.clone(), p.layers[1].chunks.clone()), (vec![0], vec![0, 1]));
        assert_eq!(plan(&inputs, Mode::Budget(0)).bytes, 0);
        assert_eq!(plan(&inputs, Mode::Budget(u64::MAX)).bytes, p.total_bytes);
    }
}
