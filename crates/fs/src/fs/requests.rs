//! The FUSE requests as plain methods that return their answer or an errno.
//!
//! Why: fuser's reply objects exist only inside a live session (root, `/dev/fuse`, a mount), so
//! logic written against them can only be tested by mounting. Here each request is answered by a
//! method of [`LayerFs`] with ordinary inputs and outputs, and the `Filesystem` impl in the
//! parent module only moves those answers into the reply objects. The handlers' logic — name
//! lookup, attributes, directory offsets, reads through the fetcher, xattr sizing — is therefore
//! unit-tested without root, a kernel or a mount (see the tests below); the mount tests keep
//! covering the kernel side.

use std::ffi::OsStr;
use std::sync::atomic::Ordering;

use fuser::{Errno, FileAttr, FileType};
use tracing::error;

use super::{file_type, LayerFs};
use crate::deps;
use crate::view::NodeKind;

/// One directory entry as `readdir` hands it out: `next` is the offset the kernel passes back
/// to continue after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub ino: u64,
    pub next: u64,
    pub kind: FileType,
    pub name: &'a str,
}

/// Answer of `getxattr`/`listxattr`: the size the caller must provide (when it asked with size
/// 0), or the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XattrAnswer {
    Size(u32),
    Data(Vec<u8>),
}

impl LayerFs {
    /// `lookup`: the attributes of `name` in directory `parent`.
    pub fn lookup_entry(&self, parent: u64, name: &[u8]) -> Result<FileAttr, Errno> {
        let ino = self.view.lookup(parent, name).ok_or(Errno::ENOENT)?;
        let i = self.view.get(ino).ok_or(Errno::ENOENT)?;
        Ok(self.attr(ino, i))
    }

    /// `getattr`.
    pub fn attributes(&self, ino: u64) -> Result<FileAttr, Errno> {
        self.view.get(ino).map(|i| self.attr(ino, i)).ok_or(Errno::ENOENT)
    }

    /// `readlink`.
    pub fn link_target(&self, ino: u64) -> Result<&[u8], Errno> {
        match self.view.get(ino) {
            Some(i) if i.kind == NodeKind::Symlink => Ok(&i.link_target),
            Some(_) => Err(Errno::EINVAL),
            None => Err(Errno::ENOENT),
        }
    }

    /// `read`: up to `size` bytes at `offset` of regular file `ino`, through the fetcher
    /// (a fetch or verification failure is `EIO`, logged with the path).
    pub fn read_bytes(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let i = self.view.get(ino).ok_or(Errno::ENOENT)?;
        if i.kind != NodeKind::Reg {
            return Err(Errno::EINVAL);
        }
        self.read_ahead(ino, i, offset, size);
        match self.read_file(i, offset, size) {
            Ok(data) => {
                if offset == 0 && self.options.prefetch_libraries {
                    deps::on_first_read(&self.deps, ino, &data);
                }
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.stats.read_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                Ok(data)
            }
            Err(e) => {
                self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                error!(path = %i.path, offset, size, error = %e, "read failed; returning EIO");
                Err(Errno::EIO)
            }
        }
    }

    /// `opendir`: whether `ino` can be listed.
    pub fn can_list(&self, ino: u64) -> Result<(), Errno> {
        match self.view.get(ino) {
            Some(i) if i.kind == NodeKind::Dir => Ok(()),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// `readdir`: hands the entries of directory `ino` from `offset` on (`.` and `..` first) to
    /// `add`, until it returns `true` (the reply buffer is full).
    pub fn list(&self, ino: u64, offset: u64, mut add: impl FnMut(DirEntry<'_>) -> bool) -> Result<(), Errno> {
        let d = self.view.get(ino).ok_or(Errno::ENOENT)?;
        if d.kind != NodeKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let dots = [(".", ino), ("..", d.parent)];
        let mut pos = usize::try_from(offset).unwrap_or(usize::MAX);
        while pos < 2 + d.children.len() {
            let next = pos as u64 + 1;
            let entry = if pos < 2 {
                let (name, ino) = dots[pos];
                DirEntry { ino, next, kind: FileType::Directory, name }
            } else {
                let (name, child) = &d.children[pos - 2];
                let kind = self.view.get(*child).map(|c| file_type(c.kind)).unwrap_or(FileType::RegularFile);
                DirEntry { ino: *child, next, kind, name }
            };
            if add(entry) {
                break;
            }
            pos += 1;
        }
        Ok(())
    }

    /// `getxattr`.
    pub fn xattr(&self, ino: u64, name: &OsStr, size: u32) -> Result<XattrAnswer, Errno> {
        let i = self.view.get(ino).ok_or(Errno::ENOENT)?;
        let value = name.to_str().and_then(|n| i.xattrs.get(n)).ok_or(Errno::NO_XATTR)?;
        sized(value, size)
    }

    /// `listxattr`: the names, each NUL-terminated.
    pub fn xattr_names(&self, ino: u64, size: u32) -> Result<XattrAnswer, Errno> {
        let i = self.view.get(ino).ok_or(Errno::ENOENT)?;
        let mut list = Vec::new();
        for k in i.xattrs.keys() {
            list.extend_from_slice(k.as_bytes());
            list.push(0);
        }
        sized(&list, size)
    }
}

fn sized(value: &[u8], size: u32) -> Result<XattrAnswer, Errno> {
    if size == 0 {
        Ok(XattrAnswer::Size(value.len() as u32))
    } else if (size as usize) < value.len() {
        Err(Errno::ERANGE)
    } else {
        Ok(XattrAnswer::Data(value.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    //! The handlers over a real eStargz layer (built by our writer, read through the real
    //! fetcher and store from a local file), without a mount: no root needed.

    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::{open_layer, FsOptions};
    use store::{ChunkStore, FetchConfig, FileRangeSource, StoreConfig};

    struct Fixture {
        fs: LayerFs,
        blob: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    fn big() -> Vec<u8> {
        (0..100_000u32).flat_map(|i| (i.wrapping_mul(2_654_435_761) >> 7).to_le_bytes()).collect()
    }

    fn fixture() -> Fixture {
        use tar::EntryType::*;
        let mut b = tar::Builder::new(Vec::new());
        let big = big();
        let entries: [(&str, tar::EntryType, &[u8], &str); 7] = [
            ("etc/", Directory, b"", ""),
            ("etc/hostname", Regular, b"lazypull\n", ""),
            ("etc/big", Regular, &big, ""),
            ("etc/.wh.removed", Regular, b"", ""),
            ("opaque/", Directory, b"", ""),
            ("opaque/.wh..wh..opq", Regular, b"", ""),
            ("hostname", Symlink, b"", "etc/hostname"),
        ];
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(if kind == Directory { 0o755 } else { 0o640 });
            h.set_uid(1000);
            h.set_size(data.len() as u64);
            h.set_mtime(1_700_000_000);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        }
        let mut out = Vec::new();
        let opts = estargz::BuildOptions {
            chunk_size: 64 << 10,
            ..Default::default()
        };
        estargz::build(std::io::Cursor::new(b.into_inner().unwrap()), &mut out, &opts).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("layer.blob");
        std::fs::write(&blob, &out).unwrap();
        let store = ChunkStore::open(StoreConfig::new(dir.path().join("store"))).unwrap();
        let source = Arc::new(FileRangeSource::open(&blob).unwrap());
        let opened = open_layer(source, None, store, FetchConfig::default()).unwrap();
        let options = FsOptions {
            prefetch_libraries: false,
            ..FsOptions::default()
        };
        Fixture { fs: LayerFs::new(opened.view, opened.fetcher, options), blob, _dir: dir }
    }

    fn listing(fs: &LayerFs, ino: u64, offset: u64) -> Vec<(String, u64, FileType)> {
        let mut out = Vec::new();
        fs.list(ino, offset, |e| {
            out.push((e.name.to_string(), e.next, e.kind));
            false
        })
        .unwrap();
        out
    }

    #[test]
    fn lookup_and_getattr_answer_from_the_index() {
        let f = fixture();
        let etc = f.fs.lookup_entry(1, b"etc").unwrap();
        assert_eq!((etc.kind, etc.perm, etc.uid), (FileType::Directory, 0o755, 1000));
        let host = f.fs.lookup_entry(etc.ino.0, b"hostname").unwrap();
        assert_eq!((host.kind, host.size, host.perm, host.nlink), (FileType::RegularFile, 9, 0o640, 1));
        assert_eq!(host.mtime, std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000));
        assert_eq!(f.fs.attributes(host.ino.0).unwrap(), host);
        assert_eq!(f.fs.lookup_entry(etc.ino.0, b"missing"), Err(Errno::ENOENT));
        assert_eq!(f.fs.lookup_entry(1, b".prefetch.landmark"), Err(Errno::ENOENT), "format bookkeeping is not served");
        assert_eq!(f.fs.attributes(0), Err(Errno::ENOENT));
        assert_eq!(f.fs.attributes(u64::MAX), Err(Errno::ENOENT));
        let gone = f.fs.lookup_entry(etc.ino.0, b"removed").unwrap();
        assert_eq!((gone.kind, gone.rdev, gone.perm), (FileType::CharDevice, 0, 0), "a whiteout is a 0/0 char device");
        let link = f.fs.lookup_entry(1, b"hostname").unwrap();
        assert_eq!(f.fs.link_target(link.ino.0).unwrap(), b"etc/hostname");
        assert_eq!(f.fs.link_target(host.ino.0), Err(Errno::EINVAL));
    }

    #[test]
    fn readdir_lists_dots_and_children_and_resumes_at_any_offset() {
        let f = fixture();
        let etc = f.fs.lookup_entry(1, b"etc").unwrap().ino.0;
        let all = listing(&f.fs, etc, 0);
        let names: Vec<&str> = all.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, [".", "..", "big", "hostname", "removed"]);
        for (i, (_, next, _)) in all.iter().enumerate() {
            assert_eq!(*next, i as u64 + 1);
            // The kernel continues from the offset of the last entry it took.
            assert_eq!(listing(&f.fs, etc, *next), all[i + 1..]);
        }
        // A full reply buffer stops the listing after the entry that did not fit.
        let mut taken = 0;
        f.fs.list(etc, 0, |_| {
            taken += 1;
            taken == 2
        })
        .unwrap();
        assert_eq!(taken, 2);
        assert_eq!(listing(&f.fs, etc, u64::MAX), []);
        let host = f.fs.lookup_entry(etc, b"hostname").unwrap().ino.0;
        assert_eq!(f.fs.list(host, 0, |_| false), Err(Errno::ENOTDIR));
        assert_eq!(f.fs.can_list(host), Err(Errno::ENOTDIR));
        assert_eq!(f.fs.can_list(etc), Ok(()));
    }

    #[test]
    fn reads_fetch_verified_bytes_at_any_offset() {
        let f = fixture();
        let etc = f.fs.lookup_entry(1, b"etc").unwrap().ino.0;
        let host = f.fs.lookup_entry(etc, b"hostname").unwrap().ino.0;
        assert_eq!(f.fs.read_bytes(host, 0, 4096).unwrap(), b"lazypull\n");
        assert_eq!(f.fs.read_bytes(host, 4, 3).unwrap(), b"pul");
        assert_eq!(f.fs.read_bytes(host, 9, 10).unwrap(), b"");
        let big_ino = f.fs.lookup_entry(etc, b"big").unwrap().ino.0;
        let want = big();
        // Across chunk boundaries (64 KiB chunks), and to the end.
        for (off, len) in [(0u64, 131_072u32), (65_530, 20), (300_000, 200_000), (399_999, 10)] {
            let got = f.fs.read_bytes(big_ino, off, len).unwrap();
            let end = (off as usize + len as usize).min(want.len());
            assert_eq!(got, want[off as usize..end], "read at {off}");
        }
        assert_eq!(f.fs.read_bytes(etc, 0, 10), Err(Errno::EINVAL));
        assert_eq!(f.fs.stats.read_errors.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_corrupt_chunk_is_eio_never_wrong_bytes() {
        let f = fixture();
        let etc = f.fs.lookup_entry(1, b"etc").unwrap().ino.0;
        let big_ino = f.fs.lookup_entry(etc, b"big").unwrap().ino.0;
        // Flip one compressed byte of the big file's last chunk in the blob.
        let i = f.fs.view.get(big_ino).unwrap();
        let last = &f.fs.view.chunks()[i.extents.last().unwrap().chunk];
        let mut blob = std::fs::read(&f.blob).unwrap();
        blob[(last.offset + (last.end - last.offset) / 2) as usize] ^= 0x40;
        std::fs::write(&f.blob, &blob).unwrap();
        assert_eq!(f.fs.read_bytes(big_ino, 399_000, 100), Err(Errno::EIO));
        assert_eq!(f.fs.stats.read_errors.load(Ordering::Relaxed), 1);
        // Chunks fetched before the damage still read.
        assert!(f.fs.read_bytes(big_ino, 0, 10).is_ok());
    }

    #[test]
    fn xattrs_are_sized_then_served() {
        let f = fixture();
        let opaque = f.fs.lookup_entry(1, b"opaque").unwrap().ino.0;
        let name = OsStr::new(crate::view::OPAQUE_XATTR);
        assert_eq!(f.fs.xattr(opaque, name, 0), Ok(XattrAnswer::Size(1)));
        assert_eq!(f.fs.xattr(opaque, name, 1), Ok(XattrAnswer::Data(b"y".to_vec())));
        assert_eq!(f.fs.xattr(1, name, 10), Err(Errno::NO_XATTR));
        let names: BTreeMap<_, _> = [(0u32, XattrAnswer::Size(23)), (23, XattrAnswer::Data(b"trusted.overlay.opaque\0".to_vec()))].into();
        for (size, want) in names {
            assert_eq!(f.fs.xattr_names(opaque, size).unwrap(), want);
        }
        assert_eq!(f.fs.xattr_names(opaque, 3), Err(Errno::ERANGE));
        assert_eq!(listing(&f.fs, opaque, 2), [], "the opaque marker is not listed");
    }
}
