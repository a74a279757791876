//! The FUSE request handlers of one read-only layer.
//!
//! Layers are immutable, so the kernel is told to cache everything for a long time (entries,
//! attributes, symlinks, file pages kept across opens). Requests run on fuser's worker threads
//! (one cloned `/dev/fuse` fd each), so a read waiting for the network never blocks a `lookup`
//! or a cached read on another thread. When the kernel offers FUSE passthrough, a file whose
//! single chunk is already in the chunk store is opened *on the chunk file itself*: the kernel
//! then reads it with no daemon round trip at all. An inode keeps one mode (cached or
//! passthrough) while it has open handles, because the kernel refuses to mix them.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use store::LayerFetcher;
use tracing::{info, warn};

use crate::deps;

mod requests;
pub use requests::{DirEntry, XattrAnswer};
use crate::view::{Inode, LayerView, NodeKind};

/// How long the kernel may cache entries and attributes: the layer never changes.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// Options of a layer filesystem.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Use FUSE passthrough for fully cached files when the kernel supports it.
    pub passthrough: bool,
    /// With passthrough: open incomplete files with direct I/O (mmap still allowed).
    pub direct_io_until_cached: bool,
    /// Prefetch the shared libraries of a program when it is first read (see [`crate::deps`]).
    pub prefetch_libraries: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            passthrough: true,
            direct_io_until_cached: std::env::var_os("LAZYPULL_NO_DIRECT_IO").is_none(),
            prefetch_libraries: true,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OpenMode {
    Cached,
    Passthrough,
}

struct InodeOpens {
    mode: OpenMode,
    count: u32,
    backing: Option<BackingId>,
}

/// Counters of the FUSE side.
#[derive(Debug, Default)]
pub struct FsStats {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub read_errors: AtomicU64,
    pub passthrough_opens: AtomicU64,
    /// Libraries handed to the fetcher by the dependency-aware prefetch ([`crate::deps`]).
    pub libraries_prefetched: AtomicU64,
    /// Regular files in the order they were first opened: what a workload reads, which is what
    /// `lazypull image convert --prioritize` wants (the optimize loop: record, then rebuild).
    pub opened: Mutex<OpenedFiles>,
}

/// First opens of regular files (paths as in the layer, at most [`OpenedFiles::LIMIT`]).
#[derive(Debug, Default)]
pub struct OpenedFiles {
    seen: std::collections::HashSet<u64>,
    pub paths: Vec<String>,
}

impl OpenedFiles {
    /// Enough for any workload's start; bounds the status file of a read-everything workload.
    pub const LIMIT: usize = 20_000;

    fn record(&mut self, ino: u64, path: &str) {
        if self.paths.len() < Self::LIMIT && self.seen.insert(ino) {
            self.paths.push(path.to_string());
        }
    }
}

/// A run of sequential reads of one file: where it started and how far it has got.
#[derive(Clone, Copy)]
struct Stream {
    start: u64,
    end: u64,
}

/// Reads up to this far before or after a stream's end still continue it: the kernel sends the
/// pieces of one large read in parallel, so they arrive slightly out of order.
const STREAM_SLACK: u64 = 1 << 20;
/// A stream is read ahead once it has covered this much...
const AHEAD_AFTER: u64 = 512 << 10;
/// ...by as much as it has covered, within these bounds (uncompressed bytes).
const AHEAD_MIN: u64 = 4 << 20;
const AHEAD_MAX: u64 = 16 << 20;
/// Streams remembered at most (the table is simply cleared when it grows past this).
const MAX_STREAMS: usize = 4096;

/// A mounted layer's request handlers.
pub struct LayerFs {
    view: Arc<LayerView>,
    fetcher: Arc<LayerFetcher>,
    options: FsOptions,
    passthrough: AtomicBool,
    /// Per inode: the mode of its open handles, how many there are, and the backing file of
    /// passthrough opens (one per inode: the kernel fails opens that bring a second one).
    opens: Mutex<HashMap<u64, InodeOpens>>,
    next_fh: AtomicU64,
    /// Sequential readers per inode, for [`LayerFs::read_ahead`].
    streams: Mutex<HashMap<u64, Stream>>,
    /// What the library prefetch ([`crate::deps`]) shares with its helper threads.
    deps: deps::Context,
    /// Backing files (device, inode, change time) whose every chunk this layer has hashed (see
    /// [`LayerFs::backing_file`]); the change time tells a reused inode number apart.
    verified_backing: Mutex<std::collections::HashSet<store::FileIdentity>>,
    pub stats: Arc<FsStats>,
}

impl LayerFs {
    pub fn new(view: Arc<LayerView>, fetcher: Arc<LayerFetcher>, options: FsOptions) -> LayerFs {
        let stats = Arc::new(FsStats::default());
        LayerFs {
            view: view.clone(),
            fetcher: fetcher.clone(),
            options,
            passthrough: AtomicBool::new(false),
            opens: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            streams: Mutex::new(HashMap::new()),
            deps: deps::Context {
                view: view.clone(),
                fetcher: fetcher.clone(),
                examined: Arc::default(),
                stats: stats.clone(),
            },
            verified_backing: Mutex::new(std::collections::HashSet::new()),
            stats,
        }
    }

    fn attr(&self, ino: u64, i: &Inode) -> FileAttr {
        let t = if i.mtime >= 0 {
            UNIX_EPOCH + Duration::from_secs(i.mtime as u64)
        } else {
            UNIX_EPOCH - Duration::from_secs(i.mtime.unsigned_abs())
        };
        FileAttr {
            ino: INodeNo(ino),
            size: i.size,
            blocks: i.size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: file_type(i.kind),
            perm: i.perm,
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: encode_dev(i.rdev_major, i.rdev_minor),
            blksize: 4096,
            flags: 0,
        }
    }

    /// Reads `[offset, offset + size)` of a regular file through the fetcher.
    pub fn read_file(&self, i: &Inode, offset: u64, size: u32) -> Result<Vec<u8>, store::Error> {
        read_chunks(&self.fetcher, i, offset, size)
    }

    /// Tracks sequential reads of `ino` and, once a reader is streaming through the file, has
    /// the fetcher start on the chunks it will want next (see `store`'s `fetch_ahead`), so the
    /// link keeps busy while the reader consumes what it has.
    fn read_ahead(&self, ino: u64, i: &Inode, offset: u64, size: u32) {
        if i.extents.len() < 2 {
            return;
        }
        let end = offset + size as u64;
        let stream = {
            let mut streams = self.streams.lock().unwrap();
            let continues = |s: &Stream| offset + STREAM_SLACK >= s.end && offset <= s.end + STREAM_SLACK;
            let s = match streams.get(&ino) {
                Some(s) if continues(s) => Stream { start: s.start, end: s.end.max(end) },
                _ => Stream { start: offset, end },
            };
            if streams.len() >= MAX_STREAMS {
                streams.clear();
            }
            streams.insert(ino, s);
            s
        };
        let covered = stream.end - stream.start;
        if covered < AHEAD_AFTER || stream.end >= i.size {
            return;
        }
        let until = stream.end + covered.clamp(AHEAD_MIN, AHEAD_MAX);
        let first = i.extents.partition_point(|c| c.file_offset + c.len <= stream.end);
        let ahead: Vec<usize> = i.extents[first..].iter().take_while(|c| c.file_offset < until).map(|c| c.chunk).collect();
        self.fetcher.fetch_ahead(&ahead);
    }

    /// The store file holding all of a fully cached file, for passthrough: the chunk file of a
    /// single-chunk file, or the complete object of a multi-chunk one.
    fn backing_file(&self, i: &Inode) -> Option<std::fs::File> {
        let first = i.extents.first()?;
        let c = &self.fetcher.chunks()[first.chunk];
        match (&c.slot, i.extents.len()) {
            // A chunk file is written whole and renamed into place under its digest; it is the
            // file only if the file is that whole chunk. The kernel reads a passthrough file
            // without us, so the opened file is hashed first (once per file): a chunk damaged
            // on disk (a bad volume, a bit flip) is then read through the daemon, which drops
            // and refetches it, instead of being handed out as is.
            (None, 1) if first.chunk_offset == 0 && first.len == c.size && i.size == c.size => {
                let d = c.digest?;
                let f = std::fs::File::open(self.fetcher.store().disk_path(&d)?).ok()?;
                let want = self.fetcher.store().content_digest(&d);
                self.verify_whole(i, &f, want).then_some(f)
            }
            // An object is assembled in place by any daemon and may be evicted and begun again
            // by another while our index still calls it complete; the kernel reads a
            // passthrough file without us. So the opened file itself is hashed, chunk by chunk
            // against this layer's digests, once per file (device, inode).
            (Some(slot), _) => {
                let f = std::fs::File::open(self.fetcher.store().complete_object(&slot.file)?).ok()?;
                self.verify_backing(i, &slot.file, &f).then_some(f)
            }
            _ => None,
        }
    }

    /// Whether the opened chunk file `f` holds exactly the bytes hashing to `want`.
    fn verify_whole(&self, i: &Inode, f: &std::fs::File, want: index::Digest) -> bool {
        use std::os::unix::fs::FileExt;
        let (Ok(md), Ok(id)) = (f.metadata(), store::file_identity(f)) else { return false };
        if self.verified_backing.lock().unwrap().contains(&id) {
            return true;
        }
        let mut buf = vec![0u8; i.size as usize];
        if md.len() != i.size || f.read_exact_at(&mut buf, 0).is_err() || index::Digest::of(&buf) != want {
            tracing::warn!(path = %i.path, "stored chunk file does not hold this file's bytes; not passing it through");
            return false;
        }
        self.verified_backing.lock().unwrap().insert(id);
        true
    }

    fn verify_backing(&self, i: &Inode, object: &index::Digest, f: &std::fs::File) -> bool {
        use std::os::unix::fs::FileExt;
        let Ok(id) = store::file_identity(f) else { return false };
        if self.verified_backing.lock().unwrap().contains(&id) {
            return true;
        }
        // Every piece written by this process (each verified when fetched) and the file
        // unchanged since: hashing it again would only cost the first passthrough open of
        // every file its whole size in sha256 (0.4 s for test/big:1's 500 MiB).
        if self.fetcher.store().object_written_by_us(object) == Some(id) {
            self.verified_backing.lock().unwrap().insert(id);
            return true;
        }
        if !f.metadata().is_ok_and(|m| m.len() == i.size) {
            return false;
        }
        let mut buf = Vec::new();
        for e in &i.extents {
            let c = &self.fetcher.chunks()[e.chunk];
            let Some(want) = c.digest.filter(|_| e.chunk_offset == 0 && e.len == c.size) else { return false };
            buf.resize(e.len as usize, 0);
            if f.read_exact_at(&mut buf, e.file_offset).is_err() || index::Digest::of(&buf) != want {
                tracing::warn!(path = %i.path, offset = e.file_offset, "store object does not hold this layer's bytes; not passing it through");
                return false;
            }
        }
        self.verified_backing.lock().unwrap().insert(id);
        true
    }
}

/// Reads `[offset, offset + size)` of regular file `i` through `fetcher`.
pub(crate) fn read_chunks(fetcher: &Arc<LayerFetcher>, i: &Inode, offset: u64, size: u32) -> Result<Vec<u8>, store::Error> {
    if offset >= i.size || size == 0 {
        return Ok(Vec::new());
    }
    let end = i.size.min(offset + size as u64);
    let first = i.extents.partition_point(|c| c.file_offset + c.len <= offset);
    let touched: Vec<_> = i.extents[first..].iter().take_while(|c| c.file_offset < end).collect();
    let idxs: Vec<usize> = touched.iter().map(|c| c.chunk).collect();
    let datas = fetcher.get_many(&idxs, true)?;
    let mut out = Vec::with_capacity((end - offset) as usize);
    for (c, data) in touched.iter().zip(datas) {
        // The extent's bytes start `chunk_offset` into its chunk (0 for eStargz).
        let from = offset.max(c.file_offset) - c.file_offset + c.chunk_offset;
        let to = end.min(c.file_offset + c.len) - c.file_offset + c.chunk_offset;
        // The fetcher hands out chunks of their declared size; never trust that with a panic.
        let part = data.get(from as usize..to as usize).ok_or_else(|| store::Error::Corrupt {
            digest: fetcher.chunks()[c.chunk].digest.map(|d| d.to_string()).unwrap_or_default(),
            blob: i.path.clone(),
            offset: c.file_offset,
            reason: format!("chunk holds {} bytes, the file needs {from}..{to} of it", data.len()),
        })?;
        out.extend_from_slice(part);
    }
    Ok(out)
}

fn file_type(k: NodeKind) -> FileType {
    match k {
        NodeKind::Dir => FileType::Directory,
        NodeKind::Reg => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Char => FileType::CharDevice,
        NodeKind::Block => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

/// The kernel's `new_encode_dev` for the 32-bit `rdev` of FUSE attributes.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS | InitFlags::FUSE_PARALLEL_DIROPS);
        if self.options.passthrough && config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH) {
            // Depth 1: the backing chunk files live on a plain file system, and an overlay on
            // top of this mount still fits the kernel's stacking limit of two.
            if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(1).is_ok() {
                self.passthrough.store(true, Ordering::Relaxed);
                // Direct-I/O opens must still be mmap-able (shared libraries, executables).
                if !(config.capabilities().contains(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP) && config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP).is_ok()) {
                    self.options.direct_io_until_cached = false;
                }
            }
        }
        info!(passthrough = self.passthrough.load(Ordering::Relaxed), "FUSE session initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_entry(parent.0, name.as_bytes()) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attributes(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.link_target(ino.0) {
            Ok(target) => reply.data(target),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let Some(i) = self.view.get(ino.0) else { return reply.error(Errno::ENOENT) };
        if i.kind == NodeKind::Dir {
            return reply.error(Errno::EISDIR);
        }
        if i.kind == NodeKind::Reg {
            self.stats.opened.lock().unwrap().record(ino.0, &i.path);
        }
        let fh = FileHandle(self.next_fh.fetch_add(1, Ordering::Relaxed));
        let mut opens = self.opens.lock().unwrap();
        let entry = opens.entry(ino.0).or_insert(InodeOpens {
            mode: OpenMode::Cached,
            count: 0,
            backing: None,
        });
        if entry.count == 0 {
            entry.backing = None;
            entry.mode = OpenMode::Cached;
            if self.passthrough.load(Ordering::Relaxed) {
                if let Some(file) = self.backing_file(i) {
                    match reply.open_backing(&file) {
                        Ok(id) => {
                            entry.backing = Some(id);
                            entry.mode = OpenMode::Passthrough;
                            if self.options.prefetch_libraries {
                                deps::on_cached_open(&self.deps, ino.0);
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "FUSE passthrough unavailable; serving reads from the daemon");
                            self.passthrough.store(false, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        entry.count += 1;
        match (&entry.mode, &entry.backing) {
            // Every open of the inode shares its one backing file while any is open.
            (OpenMode::Passthrough, Some(id)) => {
                self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                reply.opened_passthrough(fh, FopenFlags::empty(), id);
            }
            // Not (yet) complete: bypass the FUSE page cache while passthrough is possible, so
            // that once the file is complete it is served by the kernel from its store object
            // alone (one copy in memory, ext4 speed) instead of from stale FUSE pages.
            _ if self.passthrough.load(Ordering::Relaxed) && self.options.direct_io_until_cached => reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO),
            _ => reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyData) {
        match self.read_bytes(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _flags: OpenFlags, _lock: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        let _ = fh;
        let mut opens = self.opens.lock().unwrap();
        if let Some(e) = opens.get_mut(&ino.0) {
            e.count = e.count.saturating_sub(1);
            if e.count == 0 {
                // Closes the backing id; the kernel keeps the file until its own last close.
                opens.remove(&ino.0);
            }
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.can_list(ino.0) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.list(ino.0, offset, |e| reply.add(INodeNo(e.ino), e.next, e.kind, e.name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.view.total_file_bytes().div_ceil(4096);
        reply.statfs(blocks, 0, 0, self.view.count() as u64, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.xattr(ino.0, name, size) {
            Ok(XattrAnswer::Size(n)) => reply.size(n),
            Ok(XattrAnswer::Data(v)) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.xattr_names(ino.0, size) {
            Ok(XattrAnswer::Size(n)) => reply.size(n),
            Ok(XattrAnswer::Data(v)) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}

/// Seconds since the epoch, for status files.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::encode_dev;

    #[test]
    fn device_numbers_encode_like_the_kernel() {
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(8, 0x123), 0x23 | (8 << 8) | (0x100 << 12));
    }
}
