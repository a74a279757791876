//! Offline check of a chunk store directory (`lazypull bake verify`): every stored chunk is
//! hashed again and every one whose bytes do not match its name is reported.
//!
//! Why a walk of the directory rather than a [`crate::ChunkStore`]: opening a store indexes,
//! evicts and cleans; a check must change nothing (the volume may be mounted read-only) and
//! must see everything, not just what an LRU bound keeps. The rules are the store's own: a
//! single chunk `chunks/sha256/ab/<hex>` hashes to `<hex>`, or to the content digest its alias
//! `aliases/ab/<hex>` records (SOCI chunks are named by their promise); each line `offset
//! length hex` of an object's `.chunks` index names bytes of the object that hash the same way.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use index::Digest;

/// One stored item that failed its check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub path: PathBuf,
    /// Byte offset in `path` of the chunk (0 for single chunks).
    pub offset: u64,
    pub what: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.offset == 0 {
            write!(f, "{}: {}", self.path.display(), self.what)
        } else {
            write!(f, "{} at offset {}: {}", self.path.display(), self.offset, self.what)
        }
    }
}

/// What a check found.
#[derive(Debug, Default)]
pub struct StoreCheck {
    /// Chunks whose bytes hash right (single chunks and object slots).
    pub good_chunks: u64,
    pub good_bytes: u64,
    pub damaged: Vec<Damage>,
}

/// Checks every chunk stored under `dir` (a store's directory). Only a missing or unreadable
/// `dir` is an error; everything wrong inside it is a [`Damage`].
pub fn check_store(dir: &Path) -> std::io::Result<StoreCheck> {
    let mut out = StoreCheck::default();
    let chunks = dir.join("chunks").join("sha256");
    let objects = dir.join("objects").join("sha256");
    fs::metadata(&chunks)?;
    let aliases = dir.join("aliases");
    let expected = |d: &Digest| -> Digest {
        let hex = d.hex();
        fs::read_to_string(aliases.join(&hex[..2]).join(&hex)).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(*d)
    };
    for (path, name) in entries(&chunks)? {
        let Ok(d) = format!("sha256:{name}").parse::<Digest>() else {
            out.damaged.push(Damage { path, offset: 0, what: "not named by a sha256 digest".into() });
            continue;
        };
        match fs::read(&path) {
            Ok(bytes) if Digest::of(&bytes) == expected(&d) => {
                out.good_chunks += 1;
                out.good_bytes += bytes.len() as u64;
            }
            Ok(bytes) => out.damaged.push(Damage { path, offset: 0, what: format!("chunk {d}: its {} bytes hash to {}", bytes.len(), Digest::of(&bytes)) }),
            Err(e) => out.damaged.push(Damage { path, offset: 0, what: format!("chunk {d}: unreadable: {e}") }),
        }
    }
    if fs::metadata(&objects).is_ok() {
        for (path, name) in entries(&objects)? {
            if name.ends_with(".chunks") {
                continue;
            }
            check_object(&path, &expected, &mut out);
        }
    }
    Ok(out)
}

/// The files two levels below `dir` (`ab/<name>`), sorted for a stable report.
fn entries(dir: &Path) -> std::io::Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    for shard in fs::read_dir(dir)? {
        let shard = shard?;
        if !shard.file_type()?.is_dir() {
            continue;
        }
        for e in fs::read_dir(shard.path())? {
            let e = e?;
            if let Some(name) = e.file_name().to_str() {
                out.push((e.path(), name.to_string()));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn check_object(path: &Path, expected: &dyn Fn(&Digest) -> Digest, out: &mut StoreCheck) {
    let mut index = path.as_os_str().to_owned();
    index.push(".chunks");
    let index = PathBuf::from(index);
    let text = match fs::read_to_string(&index) {
        Ok(t) => t,
        Err(e) => {
            out.damaged.push(Damage { path: index, offset: 0, what: format!("object index unreadable: {e}") });
            return;
        }
    };
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            out.damaged.push(Damage { path: path.to_path_buf(), offset: 0, what: format!("unreadable: {e}") });
            return;
        }
    };
    let mut seen = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let mut it = line.split(' ');
        let parsed = match (it.next(), it.next(), it.next(), it.next()) {
            (Some(o), Some(l), Some(h), None) => o.parse::<u64>().ok().zip(l.parse::<u64>().ok()).zip(format!("sha256:{h}").parse::<Digest>().ok()),
            _ => None,
        };
        let Some(((offset, len), d)) = parsed else {
            out.damaged.push(Damage { path: index.clone(), offset: 0, what: format!("line {}: not `offset length digest`: {line:?}", n + 1) });
            continue;
        };
        // The store reads the first record of an offset; a repeat is harmless.
        if !seen.insert(offset) {
            continue;
        }
        let Ok(len_usize) = usize::try_from(len) else {
            out.damaged.push(Damage { path: path.to_path_buf(), offset, what: format!("chunk {d}: impossible length {len}") });
            continue;
        };
        let mut buf = vec![0u8; len_usize];
        match file.read_exact_at(&mut buf, offset) {
            Ok(()) if Digest::of(&buf) == expected(&d) => {
                out.good_chunks += 1;
                out.good_bytes += len;
            }
            Ok(()) => out.damaged.push(Damage { path: path.to_path_buf(), offset, what: format!("chunk {d}: its {len} bytes hash to {}", Digest::of(&buf)) }),
            Err(e) => out.damaged.push(Damage { path: path.to_path_buf(), offset, what: format!("chunk {d} ({len} bytes): unreadable: {e}") }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChunkStore, FileSlot, StoreConfig};
    use std::sync::Arc;

    #[test]
    fn a_flipped_byte_in_a_chunk_or_an_object_is_named_and_the_rest_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(StoreConfig::new(dir.path())).unwrap();
        let a = Arc::new(vec![1u8; 5000]);
        let b = Arc::new(vec![2u8; 3000]);
        let (da, db) = (Digest::of(&a), Digest::of(&b));
        store.put(&da, &a).unwrap();
        store.put(&db, &b).unwrap();
        let file = Digest::of(b"file key");
        let (c0, c1) = (Arc::new(vec![3u8; 4096]), Arc::new(vec![4u8; 100]));
        store.put_slot(&Digest::of(&c0), &FileSlot { file, file_size: 4196, offset: 0 }, &c0).unwrap();
        store.put_slot(&Digest::of(&c1), &FileSlot { file, file_size: 4196, offset: 4096 }, &c1).unwrap();
        drop(store);
        let clean = check_store(dir.path()).unwrap();
        assert_eq!((clean.good_chunks, clean.good_bytes, clean.damaged.len()), (4, 5000 + 3000 + 4196, 0));

        let hex = db.hex();
        let chunk = dir.path().join("chunks/sha256").join(&hex[..2]).join(&hex);
        flip(&chunk, 10);
        let fhex = file.hex();
        let object = dir.path().join("objects/sha256").join(&fhex[..2]).join(&fhex);
        flip(&object, 4100);
        let got = check_store(dir.path()).unwrap();
        assert_eq!(got.good_chunks, 2, "{:?}", got.damaged);
        assert_eq!(got.damaged.len(), 2, "{:?}", got.damaged);
        assert_eq!(got.damaged[0].path, chunk);
        assert!(got.damaged[0].what.contains(&db.to_string()), "{}", got.damaged[0]);
        assert_eq!((got.damaged[1].path.clone(), got.damaged[1].offset), (object, 4096));
    }

    #[test]
    fn aliased_chunks_are_checked_against_their_content_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(StoreConfig::new(dir.path())).unwrap();
        let data = Arc::new(vec![9u8; 777]);
        let key = Digest::of(b"a promise, not the content");
        store.put_alias(&key, &Digest::of(&data)).unwrap();
        store.put(&key, &data).unwrap();
        drop(store);
        assert_eq!(check_store(dir.path()).unwrap().damaged, vec![]);
        let hex = key.hex();
        std::fs::write(dir.path().join("aliases").join(&hex[..2]).join(&hex), Digest::of(b"other").to_string()).unwrap();
        assert_eq!(check_store(dir.path()).unwrap().damaged.len(), 1);
    }

    #[test]
    fn a_missing_store_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_store(&dir.path().join("nothing")).is_err());
    }

    fn flip(path: &Path, at: u64) {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    }
}
