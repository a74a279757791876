//! The chunk store: verified, uncompressed chunks keyed by their sha256.
//!
//! Why content addressing: the same file (libc, a Python wheel, a JDK) appears in many layers
//! and images, and eStargz gives every chunk a digest, so keying by digest stores a shared chunk
//! once and makes a cache hit self-verifying. Layout: `DIR/chunks/sha256/ab/abcdef…` holding the
//! raw uncompressed bytes, so that a file made of one chunk can be handed to the kernel as a
//! FUSE passthrough backing file.
//!
//! Writes go to `DIR/tmp/` and are renamed into place, so a crash leaves either the whole chunk
//! or nothing under its name; chunks read back from disk are hashed again (sha256 runs at more
//! than 1 GB/s, far faster than any source) and a damaged one is dropped and refetched rather
//! than returned. A size limit evicts least recently used chunks; the in-process order starts
//! from file modification times after a restart. A bounded memory cache sits in front for hot
//! chunks (a 4 KiB page read of a 4 MiB chunk should not re-read 4 MiB from disk).
//!
//! Formats whose index has no digest of uncompressed bytes (SOCI verifies compressed spans)
//! key their chunks by a digest of the promise instead ([`crate::fetcher::ChunkRef`]). When such
//! a chunk is first verified, its content digest is recorded as an *alias* of the key
//! (`DIR/aliases/ab/abcdef…`, written before the chunk), so that reading it back from disk is
//! still checked against a hash of its bytes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use index::Digest;
use tracing::warn;

use crate::error::{Error, Result};
use crate::lru::Lru;

/// Where and how large the store is.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub dir: PathBuf,
    /// Largest total size of chunks on disk; 0 means no limit.
    pub disk_limit: u64,
    /// Largest total size of chunks held in memory.
    pub memory_limit: u64,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            dir: dir.into(),
            disk_limit: 0,
            memory_limit: 256 << 20,
        }
    }
}

/// Counters of the store.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub memory_hits: AtomicU64,
    pub disk_hits: AtomicU64,
    pub misses: AtomicU64,
    pub evicted: AtomicU64,
    pub corrupt_dropped: AtomicU64,
}

/// A snapshot of usage figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreUsage {
    pub disk_bytes: u64,
    pub disk_chunks: usize,
    pub memory_bytes: u64,
}

/// What the disk LRU holds: single chunks, and whole-file objects that multi-chunk files are
/// assembled in chunk by chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum DiskKey {
    Chunk(Digest),
    Object(Digest),
}

/// Where a chunk of a multi-chunk file lives: inside the file's object, at its file offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileSlot {
    /// The object's key: [`crate::fetcher::object_key`], a digest of the file's size and
    /// verified chunk list (never the TOC's unverified whole-file digest).
    pub file: Digest,
    pub file_size: u64,
    /// Offset of the chunk in the file.
    pub offset: u64,
}

/// Which chunks of an object are written (offset → (length, chunk digest)).
#[derive(Debug, Default)]
struct ObjectState {
    size: u64,
    /// Length of the object's index file when it was read: a reload is only worth it when the
    /// file has grown (another process added chunks) or changed.
    index_len: u64,
    present: std::collections::HashMap<u64, (u64, Digest)>,
    covered: u64,
    /// Bytes of the object this process wrote itself (each piece verified by its caller).
    ours: u64,
    /// The object file's identity (device, inode, ctime) right after our last write to it.
    written_as: Option<FileIdentity>,
}

/// A file's device, inode and change time: it changes with every write to the file, so a file
/// still showing the identity we saw after our last write holds what we wrote.
pub type FileIdentity = (u64, u64, i64, i64);

/// The identity of an open file.
pub fn file_identity(f: &fs::File) -> std::io::Result<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    let md = f.metadata()?;
    Ok((md.dev(), md.ino(), md.ctime(), md.ctime_nsec()))
}

pub struct ChunkStore {
    config: StoreConfig,
    chunks_dir: PathBuf,
    objects_dir: PathBuf,
    tmp_dir: PathBuf,
    aliases_dir: PathBuf,
    aliases: Mutex<std::collections::HashMap<Digest, Digest>>,
    disk: Mutex<Lru<DiskKey, ()>>,
    objects: Mutex<std::collections::HashMap<Digest, ObjectState>>,
    memory: Mutex<Lru<Digest, Arc<Vec<u8>>>>,
    tmp_seq: AtomicU64,
    /// Bytes this process stored since it last re-read the directory (see `evict_disk`).
    written_since_scan: AtomicU64,
    pub stats: StoreStats,
}

impl ChunkStore {
    /// Opens (creating if needed) the store and indexes the chunks already on disk.
    pub fn open(config: StoreConfig) -> Result<Arc<ChunkStore>> {
        let chunks_dir = config.dir.join("chunks").join("sha256");
        let objects_dir = config.dir.join("objects").join("sha256");
        let tmp_dir = config.dir.join("tmp");
        let aliases_dir = config.dir.join("aliases");
        for d in [&chunks_dir, &objects_dir, &tmp_dir, &aliases_dir] {
            fs::create_dir_all(d).map_err(|e| Error::io(d, "creating directory", e))?;
        }
        // Leftovers of writes interrupted by a crash. Several processes (one daemon per layer)
        // share the directory, so only files of dead writers, or too old to be in flight, go.
        clean_tmp(&tmp_dir, TMP_MAX_AGE);
        let (disk, objects) = scan(&chunks_dir, &objects_dir)?;
        let store = ChunkStore {
            config,
            chunks_dir,
            objects_dir,
            tmp_dir,
            aliases_dir,
            aliases: Mutex::new(std::collections::HashMap::new()),
            disk: Mutex::new(disk),
            objects: Mutex::new(objects),
            memory: Mutex::new(Lru::new()),
            tmp_seq: AtomicU64::new(0),
            written_since_scan: AtomicU64::new(0),
            stats: StoreStats::default(),
        };
        store.evict_disk();
        Ok(Arc::new(store))
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    fn path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.chunks_dir.join(&hex[..2]).join(hex)
    }

    fn alias_path(&self, key: &Digest) -> PathBuf {
        let hex = key.hex();
        self.aliases_dir.join(&hex[..2]).join(hex)
    }

    /// Records that chunk `key` (a promise digest) has contents hashing to `content`. Written
    /// before the chunk itself, so any process reading the chunk can check it.
    pub fn put_alias(&self, key: &Digest, content: &Digest) -> Result<()> {
        if key == content || self.aliases.lock().unwrap().get(key) == Some(content) {
            return Ok(());
        }
        let path = self.alias_path(key);
        let tmp = self.tmp_dir.join(format!("{}-{}-alias", std::process::id(), self.tmp_seq.fetch_add(1, Ordering::Relaxed)));
        let write = || -> std::io::Result<()> {
            fs::write(&tmp, content.to_string())?;
            if let Some(p) = path.parent() {
                fs::create_dir_all(p)?;
            }
            fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(&path, format!("storing the content digest of chunk {key}"), e));
        }
        self.aliases.lock().unwrap().insert(*key, *content);
        Ok(())
    }

    /// What the bytes of chunk `d` must hash to: `d` itself, or its recorded alias (for a
    /// caller that reads the chunk file itself, e.g. to hand it to the kernel for passthrough).
    pub fn content_digest(&self, d: &Digest) -> Digest {
        self.expected(d)
    }

    /// What the bytes of chunk `d` must hash to: `d` itself, or its recorded alias.
    fn expected(&self, d: &Digest) -> Digest {
        if let Some(c) = self.aliases.lock().unwrap().get(d) {
            return *c;
        }
        let Ok(text) = fs::read_to_string(self.alias_path(d)) else { return *d };
        match text.trim().parse::<Digest>() {
            Ok(c) => {
                self.aliases.lock().unwrap().insert(*d, c);
                c
            }
            Err(_) => *d,
        }
    }

    /// Whether chunk `d` is on disk, stored by us or by another process sharing the directory
    /// (adopted into our index then): a chunk one layer daemon fetched is found by every other
    /// one without a restart.
    fn indexed_or_adopted(&self, d: &Digest) -> bool {
        if self.disk.lock().unwrap().get(&DiskKey::Chunk(*d)).is_some() {
            return true;
        }
        match fs::metadata(self.path(d)) {
            Ok(m) if m.is_file() => {
                self.disk.lock().unwrap().insert(DiskKey::Chunk(*d), m.len(), ());
                true
            }
            _ => false,
        }
    }

    /// Re-reads the index of object `file` from disk when another process may have added
    /// chunks to it since we loaded it.
    fn reload_object(&self, file: &Digest) {
        let path = self.object_path(file);
        let Ok(md) = fs::metadata(&path) else { return };
        let index_len = fs::metadata(index_path(&path)).map(|m| m.len()).unwrap_or(0);
        if self.objects.lock().unwrap().get(file).is_some_and(|o| o.index_len == index_len) {
            return; // nothing new since we read it
        }
        let state = load_object_index(&path, md.len());
        let new = {
            let mut objs = self.objects.lock().unwrap();
            let new = !objs.contains_key(file);
            objs.insert(*file, state);
            new
        };
        if new {
            self.disk.lock().unwrap().insert(DiskKey::Object(*file), md.len(), ());
        }
    }

    /// The verified bytes of chunk `d`, from memory or disk.
    pub fn get(&self, d: &Digest) -> Option<Arc<Vec<u8>>> {
        if let Some(v) = self.memory.lock().unwrap().get(d) {
            self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Some(v);
        }
        if !self.indexed_or_adopted(d) {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let path = self.path(d);
        match fs::read(&path) {
            Ok(data) if Digest::of(&data) == self.expected(d) => {
                self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                touch(&path);
                let data = Arc::new(data);
                self.remember(d, &data);
                Some(data)
            }
            Ok(_) => {
                warn!(chunk = %d, path = %path.display(), "cached chunk does not match its digest; dropping it");
                self.stats.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
                self.forget(d);
                None
            }
            Err(e) => {
                // Evicted by another process sharing the directory, or removed by hand.
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(chunk = %d, path = %path.display(), error = %e, "cannot read cached chunk");
                }
                self.disk.lock().unwrap().remove(&DiskKey::Chunk(*d));
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Whether `d` is stored (memory or disk), without touching the LRU order.
    /// Whether chunk `d` is stored with exactly `len` bytes. A TOC entry may name a digest
    /// with the wrong size; for it the stored chunk is not its chunk (and must be fetched —
    /// and fail verification — rather than be taken as present).
    pub fn contains_len(&self, d: &Digest, len: u64) -> bool {
        if let Some(v) = self.memory.lock().unwrap().size_of(d) {
            return v == len;
        }
        self.contains(d) && self.disk.lock().unwrap().size_of(&DiskKey::Chunk(*d)).is_some_and(|s| s == len)
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.memory.lock().unwrap().contains(d) || self.disk.lock().unwrap().contains(&DiskKey::Chunk(*d)) || self.indexed_or_adopted(d)
    }

    /// Whether chunk `d` is on disk as a chunk file.
    pub fn on_disk(&self, d: &Digest) -> bool {
        self.disk.lock().unwrap().contains(&DiskKey::Chunk(*d)) || self.indexed_or_adopted(d)
    }

    /// Path of the on-disk copy of `d`, if any (for FUSE passthrough of single-chunk files).
    pub fn disk_path(&self, d: &Digest) -> Option<PathBuf> {
        self.on_disk(d).then(|| self.path(d))
    }

    /// Stores a chunk the caller has verified against `d`. The memory copy is kept even when the
    /// disk write fails (the error is returned so it can be reported).
    pub fn put(&self, d: &Digest, data: &Arc<Vec<u8>>) -> Result<()> {
        self.remember(d, data);
        if self.disk.lock().unwrap().contains(&DiskKey::Chunk(*d)) || self.indexed_or_adopted(d) {
            return Ok(());
        }
        let path = self.path(d);
        let tmp = self.tmp_dir.join(format!("{}-{}-{}", std::process::id(), self.tmp_seq.fetch_add(1, Ordering::Relaxed), &d.hex()[..16]));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            drop(f);
            if let Some(p) = path.parent() {
                fs::create_dir_all(p)?;
            }
            fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(&path, format!("storing chunk {d}"), e));
        }
        self.disk.lock().unwrap().insert(DiskKey::Chunk(*d), data.len() as u64, ());
        self.written_since_scan.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.evict_disk();
        Ok(())
    }

    fn object_path(&self, file: &Digest) -> PathBuf {
        let hex = file.hex();
        self.objects_dir.join(&hex[..2]).join(hex)
    }

    /// The verified bytes of a chunk of a multi-chunk file, from memory or the file's object.
    pub fn get_slot(&self, d: &Digest, slot: &FileSlot, len: u64) -> Option<Arc<Vec<u8>>> {
        if let Some(v) = self.memory.lock().unwrap().get(d) {
            self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Some(v);
        }
        let present = || self.objects.lock().unwrap().get(&slot.file).and_then(|o| o.present.get(&slot.offset).copied());
        if present() != Some((len, *d)) {
            // Perhaps written by another process since we looked.
            self.reload_object(&slot.file);
        }
        if present() != Some((len, *d)) {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.disk.lock().unwrap().get(&DiskKey::Object(slot.file));
        let path = self.object_path(&slot.file);
        let mut buf = vec![0u8; len as usize];
        let ok = fs::File::open(&path).and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, slot.offset)).is_ok();
        if ok && Digest::of(&buf) == self.expected(d) {
            self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
            touch(&path);
            let data = Arc::new(buf);
            self.remember(d, &data);
            return Some(data);
        }
        warn!(chunk = %d, file = %slot.file, offset = slot.offset, "chunk in file object missing or damaged; refetching it");
        self.stats.corrupt_dropped.fetch_add(1, Ordering::Relaxed);
        if let Some(o) = self.objects.lock().unwrap().get_mut(&slot.file) {
            if let Some((l, _)) = o.present.remove(&slot.offset) {
                o.covered = o.covered.saturating_sub(l);
            }
        }
        None
    }

    /// Whether the chunk at `slot` is stored (memory or object).
    pub fn contains_slot(&self, d: &Digest, slot: &FileSlot, len: u64) -> bool {
        if self.memory.lock().unwrap().size_of(d).is_some_and(|s| s == len) {
            return true;
        }
        let present = || self.objects.lock().unwrap().get(&slot.file).is_some_and(|o| o.present.get(&slot.offset) == Some(&(len, *d)));
        if present() {
            return true;
        }
        self.reload_object(&slot.file);
        present()
    }

    /// Stores a verified chunk of a multi-chunk file into the file's object (a sparse file of
    /// the file's size) and records it in the object's index (`<object>.chunks`).
    pub fn put_slot(&self, d: &Digest, slot: &FileSlot, data: &Arc<Vec<u8>>) -> Result<()> {
        self.remember(d, data);
        if self.contains_slot_on_disk(d, slot) {
            return Ok(());
        }
        let path = self.object_path(&slot.file);
        self.objects.lock().unwrap().entry(slot.file).or_insert_with(|| ObjectState {
            size: slot.file_size,
            ..Default::default()
        });
        let write = || -> std::io::Result<(u64, Option<FileIdentity>)> {
            if let Some(p) = path.parent() {
                fs::create_dir_all(p)?;
            }
            let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
            if f.metadata()?.len() != slot.file_size {
                f.set_len(slot.file_size)?;
            }
            std::os::unix::fs::FileExt::write_all_at(&f, data, slot.offset)?;
            let identity = file_identity(&f).ok();
            let mut idx = fs::OpenOptions::new().create(true).append(true).open(index_path(&path))?;
            let line = format!("{} {} {}\n", slot.offset, data.len(), d.hex());
            idx.write_all(line.as_bytes()).map(|()| (line.len() as u64, identity))
        };
        let (line_len, identity) = match write() {
            Ok(n) => n,
            Err(e) => return Err(Error::io(&path, format!("storing chunk {d} at offset {}", slot.offset), e)),
        };
        let covered = {
            let mut objs = self.objects.lock().unwrap();
            let o = objs.entry(slot.file).or_default();
            o.size = slot.file_size;
            o.index_len += line_len;
            if o.present.insert(slot.offset, (data.len() as u64, *d)).is_none() {
                o.covered += data.len() as u64;
                o.ours += data.len() as u64;
            }
            o.written_as = identity;
            o.covered
        };
        self.written_since_scan.fetch_add(data.len() as u64, Ordering::Relaxed);
        // An object counts what it holds (it is a sparse file of the file's size): a big,
        // barely fetched file must not evict the rest of the node's cache.
        self.disk.lock().unwrap().insert(DiskKey::Object(slot.file), covered, ());
        self.evict_disk();
        Ok(())
    }

    fn contains_slot_on_disk(&self, d: &Digest, slot: &FileSlot) -> bool {
        self.objects.lock().unwrap().get(&slot.file).is_some_and(|o| o.present.get(&slot.offset).is_some_and(|p| p.1 == *d))
    }

    /// The identity object `file` had right after our last write to it, if this process wrote
    /// every byte of it (each piece verified before it was stored). A file that still shows it
    /// holds exactly what we wrote — no other process has written to, replaced or recreated it
    /// since — so passing it through needs no hashing of the whole file again.
    pub fn object_written_by_us(&self, file: &Digest) -> Option<FileIdentity> {
        self.objects.lock().unwrap().get(file).filter(|o| o.size > 0 && o.ours >= o.size).and_then(|o| o.written_as)
    }

    /// Path of a file object whose every byte has been stored (for FUSE passthrough).
    pub fn complete_object(&self, file: &Digest) -> Option<PathBuf> {
        let complete = self.objects.lock().unwrap().get(file).is_some_and(|o| o.covered >= o.size && o.size > 0);
        complete.then(|| self.object_path(file))
    }

    fn remember(&self, d: &Digest, data: &Arc<Vec<u8>>) {
        let limit = self.config.memory_limit;
        if data.len() as u64 > limit {
            return;
        }
        let mut m = self.memory.lock().unwrap();
        m.insert(*d, data.len() as u64, data.clone());
        while m.bytes() > limit {
            if m.pop_oldest().is_none() {
                break;
            }
        }
    }

    /// Drops `d` from memory and disk.
    pub fn forget(&self, d: &Digest) {
        self.memory.lock().unwrap().remove(d);
        self.disk.lock().unwrap().remove(&DiskKey::Chunk(*d));
        let _ = fs::remove_file(self.path(d));
    }

    fn remove_key(&self, key: &DiskKey) {
        match key {
            DiskKey::Chunk(d) => {
                let _ = fs::remove_file(self.path(d));
            }
            DiskKey::Object(d) => {
                self.objects.lock().unwrap().remove(d);
                let p = self.object_path(d);
                let _ = fs::remove_file(index_path(&p));
                let _ = fs::remove_file(p);
            }
        }
    }

    /// Keeps the store within `disk_limit` for the whole node. Every layer daemon stores into
    /// the same directory, so our index alone undercounts: after writing 1/64 of the limit we
    /// re-read the directory (everyone's files, ordered by modification time, which disk hits
    /// refresh — the node-wide LRU order) and evict the oldest until the total fits. Evicting a
    /// file another daemon still indexes only costs that daemon a refetch on its next read
    /// (its lookup finds the file gone); open files, like passthrough backing files, stay
    /// readable after unlink.
    fn evict_disk(&self) {
        let limit = self.config.disk_limit;
        if limit == 0 {
            return;
        }
        let rescan_every = (limit / 64).max(256 << 10);
        if self.written_since_scan.load(Ordering::Relaxed) >= rescan_every {
            self.written_since_scan.store(0, Ordering::Relaxed);
            if let Ok((disk, objects)) = scan(&self.chunks_dir, &self.objects_dir) {
                *self.disk.lock().unwrap() = disk;
                let mut mine = self.objects.lock().unwrap();
                // Keep our own view of objects we know (it may be ahead of their index files).
                for (k, v) in objects {
                    mine.entry(k).or_insert(v);
                }
            }
        }
        loop {
            let victim = {
                let mut disk = self.disk.lock().unwrap();
                if disk.bytes() <= limit {
                    return;
                }
                match disk.pop_oldest() {
                    Some((d, ())) => d,
                    None => return,
                }
            };
            // An open file (e.g. a passthrough backing file) stays readable after unlink.
            self.remove_key(&victim);
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Garbage collection: removes every stored chunk and file object for which `live` is
    /// false (chunk digests are passed as `(digest, false)`, file objects as `(digest, true)`).
    /// Returns (entries, bytes) removed.
    pub fn retain(&self, live: impl Fn(&Digest, bool) -> bool) -> (usize, u64) {
        let victims = self.disk.lock().unwrap().retain(|k| match k {
            DiskKey::Chunk(d) => live(d, false),
            DiskKey::Object(d) => live(d, true),
        });
        let mut bytes = 0;
        for (k, size) in &victims {
            let (DiskKey::Chunk(d) | DiskKey::Object(d)) = k;
            self.memory.lock().unwrap().remove(d);
            self.remove_key(k);
            bytes += size;
        }
        (victims.len(), bytes)
    }

    /// Bytes on disk of chunk `d` (`object` false) or of file object `d` (true, with its
    /// index), if stored — by this process or any other sharing the directory.
    pub fn stored_bytes(&self, d: &Digest, object: bool) -> Option<u64> {
        let len = |p: &Path| fs::metadata(p).ok().map(|m| m.len());
        if object {
            let p = self.object_path(d);
            Some(len(&p)? + len(&index_path(&p)).unwrap_or(0))
        } else {
            len(&self.path(d))
        }
    }

    /// Evicts least recently used chunks and objects of the whole node's store until it holds
    /// at most `target` bytes (`lazypull cache prune --max-size`). A reader of an evicted chunk
    /// simply fetches it again. Returns (entries, bytes) removed.
    pub fn shrink_to(&self, target: u64) -> Result<(usize, u64)> {
        let (disk, _) = scan(&self.chunks_dir, &self.objects_dir)?;
        *self.disk.lock().unwrap() = disk;
        let (mut n, mut bytes) = (0, 0);
        loop {
            let victim = {
                let mut disk = self.disk.lock().unwrap();
                let before = disk.bytes();
                if before <= target {
                    break;
                }
                match disk.pop_oldest() {
                    Some((k, ())) => (k, before - disk.bytes()),
                    None => break,
                }
            };
            let (DiskKey::Chunk(d) | DiskKey::Object(d)) = victim.0;
            self.memory.lock().unwrap().remove(&d);
            self.remove_key(&victim.0);
            n += 1;
            bytes += victim.1;
        }
        Ok((n, bytes))
    }

    pub fn usage(&self) -> StoreUsage {
        let disk = self.disk.lock().unwrap();
        StoreUsage {
            disk_bytes: disk.bytes(),
            disk_chunks: disk.len(),
            memory_bytes: self.memory.lock().unwrap().bytes(),
        }
    }

    /// Root directory of the store.
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }
}

fn index_path(object: &Path) -> PathBuf {
    let mut s = object.as_os_str().to_owned();
    s.push(".chunks");
    PathBuf::from(s)
}

/// Reads an object's chunk index (lines `offset length chunkhex`); damaged lines are skipped
/// (and their chunks, if wrong, fail verification on read and are refetched).
/// Marks a stored file as just used for every process: modification time is the node-wide LRU
/// order (see `evict_disk`). Best effort.
fn touch(path: &Path) {
    if let Ok(f) = fs::File::open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

type DiskIndex = (Lru<DiskKey, ()>, std::collections::HashMap<Digest, ObjectState>);

/// Everything stored under the two directories, by anyone: the disk LRU ordered by modification
/// time (oldest first) and the objects' chunk indexes.
fn scan(chunks_dir: &Path, objects_dir: &Path) -> Result<DiskIndex> {
    let mut found: Vec<(std::time::SystemTime, DiskKey, u64)> = Vec::new();
    let mut objects = std::collections::HashMap::new();
    for (dir, is_object) in [(chunks_dir, false), (objects_dir, true)] {
        for shard in fs::read_dir(dir).map_err(|e| Error::io(dir, "listing", e))?.flatten() {
            let Ok(rd) = fs::read_dir(shard.path()) else { continue };
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(d) = name.to_str().and_then(|n| format!("sha256:{n}").parse::<Digest>().ok()) else { continue };
                let Ok(md) = e.metadata() else { continue };
                let (key, bytes) = if is_object {
                    objects.insert(d, load_object_index(&e.path(), md.len()));
                    // Sparse: what it holds on disk, not its length.
                    (DiskKey::Object(d), std::os::unix::fs::MetadataExt::blocks(&md) * 512)
                } else {
                    (DiskKey::Chunk(d), md.len())
                };
                found.push((md.modified().unwrap_or(std::time::UNIX_EPOCH), key, bytes));
            }
        }
    }
    found.sort_by_key(|f| f.0);
    let mut disk = Lru::new();
    for (rank, (_, d, len)) in found.into_iter().enumerate() {
        disk.insert_aged(d, len, (), rank as u64 + 1);
    }
    Ok((disk, objects))
}

/// Temporary files older than this are taken for leftovers even if their writer's pid is alive
/// (pids are reused); no chunk write takes anywhere near this long.
const TMP_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes leftovers in `tmp`: files named `<pid>-…` whose process is gone, and any file
/// older than `max_age`. Files of live writers stay (another daemon's write in flight).
fn clean_tmp(tmp: &Path, max_age: std::time::Duration) {
    let Ok(rd) = fs::read_dir(tmp) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let writer: Option<i32> = name.to_str().and_then(|n| n.split('-').next()).and_then(|p| p.parse().ok());
        let writer_alive = writer.is_some_and(|pid| pid > 0 && Path::new(&format!("/proc/{pid}")).exists());
        let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_none_or(|age| age > max_age);
        if !writer_alive || old {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn load_object_index(object: &Path, size: u64) -> ObjectState {
    let mut st = ObjectState {
        size,
        ..Default::default()
    };
    let Ok(text) = fs::read_to_string(index_path(object)) else { return st };
    st.index_len = text.len() as u64;
    for line in text.lines() {
        let mut it = line.split(' ');
        let (Some(o), Some(l), Some(h)) = (it.next(), it.next(), it.next()) else { continue };
        let (Ok(o), Ok(l), Ok(d)) = (o.parse::<u64>(), l.parse::<u64>(), format!("sha256:{h}").parse::<Digest>()) else { continue };
        // The first record of an offset wins (a damaged index may repeat one).
        if o.checked_add(l).is_some_and(|e| e <= size) && !st.present.contains_key(&o) {
            st.present.insert(o, (l, d));
            st.covered += l;
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: usize) -> (Digest, Arc<Vec<u8>>) {
        let v = vec![n; len];
        (Digest::of(&v), Arc::new(v))
    }

    /// An object counts as ours only while we wrote every byte and nothing changed it since.
    #[test]
    fn an_object_is_ours_only_if_we_wrote_all_of_it_and_it_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(StoreConfig::new(dir.path())).unwrap();
        let (a, va) = chunk(1, 100);
        let (b, vb) = chunk(2, 100);
        let file = Digest::of(b"object");
        let slot = |offset| FileSlot { file, file_size: 200, offset };
        s.put_slot(&a, &slot(0), &va).unwrap();
        assert_eq!(s.object_written_by_us(&file), None, "half written");
        s.put_slot(&b, &slot(100), &vb).unwrap();
        let path = s.complete_object(&file).expect("complete");
        let id = s.object_written_by_us(&file).expect("written whole by us");
        assert_eq!(file_identity(&fs::File::open(&path).unwrap()).unwrap(), id);
        // Another writer (a second store on the directory, or anything else) changes the file:
        // its identity is no longer the one we saw after our last write.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::os::unix::fs::FileExt::write_all_at(&fs::OpenOptions::new().write(true).open(&path).unwrap(), &[9u8; 10], 0).unwrap();
        assert_ne!(file_identity(&fs::File::open(&path).unwrap()).unwrap(), id);
        // A store that adopted the object from disk wrote none of it.
        let other = ChunkStore::open(StoreConfig::new(dir.path())).unwrap();
        assert!(other.contains_slot(&a, &slot(0), 100));
        assert_eq!(other.object_written_by_us(&file), None);
    }

    #[test]
    fn put_get_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(StoreConfig::new(dir.path())).unwrap();
        let (d, v) = chunk(1, 1000);
        assert!(s.get(&d).is_none());
        s.put(&d, &v).unwrap();
        assert_eq!(s.get(&d).unwrap().as_slice(), v.as_slice());
        drop(s);
        let s = ChunkStore::open(StoreConfig::new(dir.path())).unwrap();
        assert_eq!(s.usage().disk_chunks, 1);
        assert_eq!(s.get(&d).unwrap().as_slice(), v.as_slice());
        assert_eq!(s.stats.disk_hits.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn corrupt_file_on_disk_is_dropped_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = StoreConfig::new(dir.path());
        cfg.memory_limit = 0;
        let s = ChunkStore::open(cfg).unwrap();
        let (d, v) = chunk(2, 100);
        s.put(&d, &v).unwrap();
        let p = s.disk_path(&d).unwrap();
        fs::write(&p, vec![3u8; 100]).unwrap();
        assert!(s.get(&d).is_none());
        assert!(!p.exists());
        assert_eq!(s.stats.corrupt_dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn disk_limit_evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = StoreConfig::new(dir.path());
        cfg.disk_limit = 250;
        cfg.memory_limit = 0;
        let s = ChunkStore::open(cfg.clone()).unwrap();
        let (a, va) = chunk(1, 100);
        let (b, vb) = chunk(2, 100);
        let (c, vc) = chunk(3, 100);
        s.put(&a, &va).unwrap();
        s.put(&b, &vb).unwrap();
        assert!(s.get(&a).is_some()); // a is now newer than b
        s.put(&c, &vc).unwrap();
        assert!(s.on_disk(&a) && s.on_disk(&c) && !s.on_disk(&b));
        assert!(s.usage().disk_bytes <= 250);
        // A smaller limit after a restart evicts at open.
        cfg.disk_limit = 100;
        drop(s);
        let s = ChunkStore::open(cfg).unwrap();
        assert_eq!(s.usage().disk_chunks, 1);
    }

    #[test]
    fn retain_removes_what_is_not_live() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(StoreConfig::new(dir.path())).unwrap();
        let (a, va) = chunk(1, 100);
        let (b, vb) = chunk(2, 100);
        s.put(&a, &va).unwrap();
        s.put(&b, &vb).unwrap();
        let (n, bytes) = s.retain(|d, object| !object && *d == a);
        assert_eq!((n, bytes), (1, 100));
        assert!(s.on_disk(&a) && !s.contains(&b));
        assert!(!dir.path().join("chunks/sha256").join(&b.hex()[..2]).join(b.hex()).exists());
    }

    #[test]
    fn a_chunk_stored_by_another_process_is_found_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let a = ChunkStore::open(StoreConfig::new(dir.path())).unwrap();
        let b = ChunkStore::open(StoreConfig::new(dir.path())).unwrap();
        let (d, data) = chunk(7, 5000);
        a.put(&d, &data).unwrap();
        assert!(b.contains(&d) && b.on_disk(&d));
        assert_eq!(b.get(&d).unwrap(), data);
        // Objects too: a slot written by one store is found by the other.
        let (c, cdata) = chunk(8, 1000);
        let slot = FileSlot { file: Digest::of(b"object"), file_size: 3000, offset: 1000 };
        a.put_slot(&c, &slot, &cdata).unwrap();
        assert!(b.contains_slot(&c, &slot, 1000));
        let mut cfg = StoreConfig::new(dir.path());
        cfg.memory_limit = 0;
        let fresh_b = ChunkStore::open(cfg).unwrap();
        let (e, edata) = chunk(9, 1000);
        let slot2 = FileSlot { offset: 2000, ..slot };
        a.put_slot(&e, &slot2, &edata).unwrap();
        assert_eq!(fresh_b.get_slot(&e, &slot2, 1000).unwrap(), edata);
    }

    /// The disk bound holds for the node, not per process: four stores on one directory (as
    /// four layer daemons), each writing four times the limit, interleaved.
    #[test]
    fn the_disk_limit_holds_across_processes_sharing_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 4u64 << 20;
        let open = || {
            let mut cfg = StoreConfig::new(dir.path());
            cfg.disk_limit = limit;
            cfg.memory_limit = 0;
            ChunkStore::open(cfg).unwrap()
        };
        let stores = [open(), open(), open(), open()];
        let on_disk = || -> u64 {
            let mut total = 0;
            for shard in fs::read_dir(dir.path().join("chunks/sha256")).unwrap().flatten() {
                for e in fs::read_dir(shard.path()).unwrap().flatten() {
                    total += e.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
            total
        };
        let mut peak = 0;
        let mut written = Vec::new();
        for i in 0..256u32 {
            let data: Vec<u8> = (0..64 << 10).map(|j: u32| (j.wrapping_mul(2654435761).wrapping_add(i.wrapping_mul(40503)) >> 13) as u8).collect();
            let (d, data) = (Digest::of(&data), Arc::new(data));
            stores[i as usize % 4].put(&d, &data).unwrap();
            written.push((d, data));
            peak = peak.max(on_disk());
        }
        // Each process may overshoot by what it wrote since its last look at the directory.
        let slack = 4 * (256 << 10) + (64 << 10);
        assert!(peak <= limit + slack, "peak {peak} bytes on disk for a {limit}-byte limit");
        // Whatever a store still answers is right; evicted chunks are misses, never wrong bytes.
        let mut hits = 0;
        for (d, data) in &written {
            for s in &stores {
                if let Some(got) = s.get(d) {
                    assert_eq!(&got, data);
                    hits += 1;
                }
            }
        }
        assert!(hits > 0);
    }

    #[test]
    fn tmp_files_of_live_writers_survive_another_open() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        let ours = tmp.join(format!("{}-0-abcdef", std::process::id()));
        let dead = tmp.join("999999999-0-abcdef");
        let stale = tmp.join(format!("{}-1-abcdef", std::process::id()));
        for p in [&ours, &dead, &stale] {
            fs::write(p, b"in flight").unwrap();
        }
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 3600);
        fs::File::options().write(true).open(&stale).unwrap().set_modified(old).unwrap();
        ChunkStore::open(StoreConfig::new(dir.path())).unwrap();
        assert!(ours.exists(), "a live writer's file was deleted by another process opening the store");
        assert!(!dead.exists(), "a dead writer's leftover stayed");
        assert!(!stale.exists(), "a leftover older than the age limit stayed");
    }

    #[test]
    fn tmp_leftovers_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        fs::write(dir.path().join("tmp/partial"), b"x").unwrap();
        let _s = ChunkStore::open(StoreConfig::new(dir.path())).unwrap();
        assert!(!dir.path().join("tmp/partial").exists());
    }
}
