//! The inode table a layer mount serves: the format-neutral [`LayerIndex`] plus the fetcher's
//! chunk list for it.
//!
//! The index is already in the form overlayfs wants for a lower layer (whiteouts as 0/0
//! character devices, opaque directories as an xattr, format bookkeeping removed): each format
//! does that translation when it builds the index (`estargz::layer_model`), so the FUSE handlers
//! stay trivial and know no format. Inode numbers are the index's, stable for the same index.
//! Extents name chunks by their position in the index's chunk table, which is also the order of
//! the fetcher's chunk list ([`store::chunk_refs`]), so a read maps straight to fetcher chunks.

use std::ops::Deref;

pub use index::names::OPAQUE_XATTR;
pub use index::{Extent, Inode, LayerIndex, NodeKind, Prefetch};
use store::ChunkRef;

/// A layer's inode table and the fetcher chunk list its extents index.
#[derive(Debug)]
pub struct LayerView {
    pub index: LayerIndex,
    /// The chunk list to give the fetcher, in the index's chunk-table order.
    pub chunk_refs: Vec<ChunkRef>,
}

impl LayerView {
    pub fn new(index: LayerIndex) -> LayerView {
        let chunk_refs = store::chunk_refs(&index);
        LayerView { index, chunk_refs }
    }
}

impl Deref for LayerView {
    type Target = LayerIndex;
    fn deref(&self) -> &LayerIndex {
        &self.index
    }
}
