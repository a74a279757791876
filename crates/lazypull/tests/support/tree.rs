//! Tree comparison for mount tests: one line per path with everything the identity
//! acceptance names (type, mode, owner, size, mtime, link target, nlink, xattrs, sha256).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest as _, Sha256};

pub fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

pub fn xattrs(p: &Path) -> BTreeMap<String, String> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: buffers are valid for the sizes given.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr() as *mut libc::c_char, names.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: as above.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr() as *mut libc::c_void, v.len()) };
        assert!(len >= 0, "lgetxattr {} {:?}", p.display(), String::from_utf8_lossy(name));
        out.insert(String::from_utf8_lossy(name).into_owned(), hex::encode(&v[..len as usize]));
    }
    out
}

/// One line per path: everything the identity acceptance names.
pub fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let (kind, extra) = if ft.is_dir() {
                stack.push(p.clone());
                ("dir", String::new())
            } else if ft.is_symlink() {
                ("symlink", std::fs::read_link(&p).unwrap().to_string_lossy().into_owned())
            } else if ft.is_file() {
                ("file", format!("size={} sha256={}", m.len(), sha_hex(&std::fs::read(&p).unwrap())))
            } else if ft.is_char_device() {
                ("char", format!("rdev={:x}", m.rdev()))
            } else if ft.is_block_device() {
                ("block", format!("rdev={:x}", m.rdev()))
            } else if ft.is_fifo() {
                ("fifo", String::new())
            } else {
                ("other", String::new())
            };
            let line = format!(
                "{kind} mode={:o} uid={} gid={} mtime={} nlink={} {extra} xattrs={:?}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                m.mtime(),
                m.nlink(),
                xattrs(&p)
            );
            out.insert(rel, line);
        }
    }
    out
}

pub fn assert_same(what: &str, want: &BTreeMap<String, String>, got: &BTreeMap<String, String>) {
    let mut diffs = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            None => diffs.push(format!("missing {k}: {v}")),
            Some(g) if g != v => diffs.push(format!("differs {k}:\n   want {v}\n   got  {g}")),
            _ => {}
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        diffs.push(format!("extra {k}: {}", got[k]));
    }
    assert!(diffs.is_empty(), "{what}: {} differences:\n{}", diffs.len(), diffs.iter().take(30).cloned().collect::<Vec<_>>().join("\n"));
}

