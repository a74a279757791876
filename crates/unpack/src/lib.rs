//! Materializing a layer's file tree on a local filesystem.
//!
//! Used by `lazypull layer extract` and, later, by the snapshotter's fallback path for layers
//! that cannot be mounted lazily. It works from the normalized [`estargz::Tree`] rather than from
//! raw tar entries, so hostile names (`../x`, absolute paths) were already rejected when the TOC
//! was parsed, duplicates are already resolved and hardlinks point at inodes.
//!
//! Why not just write through `std::fs`: extraction into a directory must never follow a
//! symlink the layer itself created (`a -> /etc`, then `a/passwd`). Every entry is created
//! relative to a parent whose real type was checked with `lstat`, and metadata calls use the
//! no-follow variants. Directory times are applied last, after their contents stopped changing.
//!
//! Whiteouts are kept as regular files by default (what `tar -x` does); with
//! [`ExtractOptions::overlay_whiteouts`] they become overlayfs whiteouts (0/0 char devices and
//! `trusted.overlay.opaque`), which is what a snapshot directory needs.
//!
//! Defense in depth: the tree's names were validated when it was built ([`estargz::path`]), but
//! [`estargz::Tree`] has public fields and a mistake there would be a host write or, worse, a
//! host *removal*: a whiteout `.wh...` hides `..`, and replacing it once meant
//! `remove_dir_all(DEST/..)`. So every path is re-checked here with the same rules (each
//! component non-empty, not `.`/`..`, no NUL, at most 255 bytes; a whiteout hides a valid
//! name), and nothing is ever removed or replaced unless it lies strictly below `dest` and was
//! reached through real directories only (no symlink followed, as containerd resolves paths).

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use estargz::limits::MAX_PATH_DEPTH;
use estargz::path::{component_problem, whiteout, Whiteout};
use estargz::{BlobSource, NodeId, NodeKind, Reader, Tree};
use nix::sys::stat::{mknod, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

/// Errors from extraction; each names the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to extract {path:?}: its parent {parent} is not a directory (symlink escape?)")]
    UnsafeParent { path: String, parent: PathBuf },
    /// A name in the tree that no layer may carry; `field` says which (`name`, `whiteout target`).
    #[error("refusing to extract entry {entry:?}: {field} {reason}")]
    UnsafeName {
        entry: String,
        field: &'static str,
        reason: &'static str,
    },
    /// A removal that would not be strictly below the extraction directory.
    #[error("refusing to remove {path}: not strictly below the extraction directory {dest}")]
    OutsideDest { path: PathBuf, dest: PathBuf },
    #[error(transparent)]
    Format(#[from] estargz::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn nix_io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> Error + 'a {
    move |e| Error::Io {
        op,
        path: path.to_path_buf(),
        source: std::io::Error::from_raw_os_error(e as i32),
    }
}

/// Knobs for [`extract`].
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Check every chunk's sha256 while reading.
    pub verify: bool,
    /// Apply owners (needs CAP_CHOWN; defaults to "am I root").
    pub chown: bool,
    /// Convert `.wh.*` entries to overlayfs whiteouts.
    pub overlay_whiteouts: bool,
    /// Leave out the eStargz format's own files at the root (TOC, landmarks), as a lazy mount
    /// hides them: for a layer that was re-indexed into eStargz only to be extracted.
    pub skip_index_files: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            verify: true,
            chown: nix::unistd::geteuid().is_root(),
            overlay_whiteouts: false,
            skip_index_files: false,
        }
    }
}

/// What an extraction did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExtractStats {
    pub entries: u64,
    pub bytes: u64,
}

/// Extracts the whole layer below `dest` (created if missing).
pub fn extract<S: BlobSource>(reader: &Reader<S>, dest: &Path, opts: &ExtractOptions) -> Result<ExtractStats> {
    extract_tree(reader.tree(), |node, c| reader.read_chunk(node, c, opts.verify), dest, opts)
}

/// Extracts a whole layer blob (a tar, gzip- or zstd-compressed or not) held in memory below
/// `dest`, with overlayfs whiteouts. The tar is first re-indexed into an in-memory eStargz blob
/// at compression level 1: a little CPU on a path that is already the slow one, and one audited
/// extractor (hostile names refused, no symlink followed) instead of a second one for raw tars.
/// For small layers (the caller bounds `blob`): the re-indexed copy is held in memory too.
pub fn extract_blob(blob: &[u8], dest: &Path) -> Result<ExtractStats> {
    let mut indexed = Vec::with_capacity(blob.len() + blob.len() / 4);
    let build = estargz::BuildOptions { level: Some(1), ..Default::default() };
    estargz::build(blob, &mut indexed, &build)?;
    let reader = Reader::open(indexed)?;
    // The re-indexing added a landmark file; a layer's own root file of that name (or the TOC's)
    // is left out with it, as a lazy mount of an eStargz layer hides them.
    extract(&reader, dest, &ExtractOptions { overlay_whiteouts: true, skip_index_files: true, ..Default::default() })
}

/// Extracts `tree` below `dest`, reading file contents with `read_chunk`. What [`extract`]
/// does; public so that a tree that did not come from [`Reader::open`] gets the same checks.
pub fn extract_tree<F>(tree: &Tree, read_chunk: F, dest: &Path, opts: &ExtractOptions) -> Result<ExtractStats>
where
    F: Fn(&estargz::Node, &estargz::Chunk) -> estargz::Result<Vec<u8>>,
{
    fs::create_dir_all(dest).map_err(io("creating", dest))?;
    let mut first_path: HashMap<NodeId, PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, NodeId)> = Vec::new();
    let mut stats = ExtractStats::default();
    for (rel, id) in tree.walk() {
        if opts.skip_index_files && estargz::layer_model::HIDDEN_ROOT_NAMES.contains(&rel.as_str()) {
            continue;
        }
        let node = tree.node(id);
        let target = below(dest, &rel, "name")?;
        if !rel.is_empty() {
            check_parent(dest, &rel, &target)?;
        }
        let name = estargz::path::base(&rel);
        let whiteout = whiteout(name).map_err(|reason| Error::UnsafeName {
            entry: rel.clone(),
            field: "whiteout target",
            reason,
        })?;
        if opts.overlay_whiteouts && node.kind != NodeKind::Dir {
            if whiteout == Whiteout::Opaque {
                let parent = target.parent().unwrap_or(dest);
                set_xattr(parent, "trusted.overlay.opaque", b"y")?;
                continue;
            }
            if let Whiteout::Hides(hidden) = whiteout {
                // The entry's parent was checked above; `hidden` is one valid component.
                let wh = target.parent().unwrap_or(dest).join(hidden);
                remove_existing(dest, &wh)?;
                mknod(&wh, SFlag::S_IFCHR, Mode::empty(), 0).map_err(nix_io("creating whiteout", &wh))?;
                // Owned by root with no permission bits (what overlayfs itself creates), and
                // the entry's time so that extraction is reproducible.
                let t = TimeSpec::new(node.mtime, 0);
                nix::sys::stat::utimensat(nix::fcntl::AT_FDCWD, &wh, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink)
                    .map_err(nix_io("setting times on", &wh))?;
                stats.entries += 1;
                continue;
            }
        }
        if let Some(existing) = first_path.get(&id) {
            remove_existing(dest, &target)?;
            fs::hard_link(existing, &target).map_err(io("hardlinking", &target))?;
            stats.entries += 1;
            continue;
        }
        match node.kind {
            NodeKind::Dir => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_existing(dest, &target)?;
                        fs::create_dir(&target).map_err(io("creating directory", &target))?;
                    }
                    Err(_) => fs::create_dir(&target).map_err(io("creating directory", &target))?,
                }
                dirs.push((target.clone(), id));
            }
            NodeKind::Reg => {
                remove_existing(dest, &target)?;
                stats.bytes += write_file(node, &read_chunk, &target)?;
            }
            NodeKind::Symlink => {
                remove_existing(dest, &target)?;
                symlink(&node.link_target, &target).map_err(io("creating symlink", &target))?;
            }
            NodeKind::Char | NodeKind::Block | NodeKind::Fifo => {
                remove_existing(dest, &target)?;
                let kind = match node.kind {
                    NodeKind::Char => SFlag::S_IFCHR,
                    NodeKind::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let dev = nix::sys::stat::makedev(node.dev_major as u64, node.dev_minor as u64);
                mknod(&target, kind, Mode::from_bits_truncate(node.mode), dev).map_err(nix_io("creating device node", &target))?;
            }
        }
        if node.kind != NodeKind::Dir {
            apply_metadata(&target, node, opts)?;
        }
        first_path.insert(id, target);
        stats.entries += 1;
    }
    // Deepest directories first so a parent's mtime is set after its children.
    for (path, id) in dirs.iter().rev() {
        apply_metadata(path, tree.node(*id), opts)?;
    }
    Ok(stats)
}

/// Every ancestor between `dest` and the entry must be a real directory.
fn check_parent(dest: &Path, rel: &str, target: &Path) -> Result<()> {
    let mut p = dest.to_path_buf();
    let comps: Vec<&str> = rel.split('/').collect();
    for c in &comps[..comps.len() - 1] {
        p.push(c);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            _ => {
                return Err(Error::UnsafeParent {
                    path: target.display().to_string(),
                    parent: p,
                })
            }
        }
    }
    Ok(())
}

/// `dest` joined with the tree path `rel` ("" for `dest` itself), every component checked.
fn below(dest: &Path, rel: &str, field: &'static str) -> Result<PathBuf> {
    let mut p = dest.to_path_buf();
    if rel.is_empty() {
        return Ok(p);
    }
    let mut depth = 0;
    for comp in rel.split('/') {
        depth += 1;
        let problem = component_problem(comp).or((depth > MAX_PATH_DEPTH).then_some("more than 4096 path components"));
        if let Some(reason) = problem {
            return Err(Error::UnsafeName {
                entry: rel.to_string(),
                field,
                reason,
            });
        }
        p.push(comp);
    }
    Ok(p)
}

/// Removes whatever is at `path` (a directory with its contents; a symlink itself, never what it
/// points to), which must be strictly below `dest`.
fn remove_existing(dest: &Path, path: &Path) -> Result<()> {
    let inside = path.strip_prefix(dest).is_ok_and(|rel| {
        let mut comps = rel.components().peekable();
        comps.peek().is_some() && comps.all(|c| matches!(c, Component::Normal(_)))
    });
    // Textual check on top of the component checks: `Path::components` folds `.` away, so
    // `dest/.` and `dest/x/..` must be caught by the raw bytes.
    let raw_ok = !path.as_os_str().as_bytes().ends_with(b"/.") && !path.as_os_str().as_bytes().ends_with(b"/..");
    if !inside || !raw_ok {
        return Err(Error::OutsideDest {
            path: path.to_path_buf(),
            dest: dest.to_path_buf(),
        });
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io("replacing", path)),
        Ok(_) => fs::remove_file(path).map_err(io("replacing", path)),
        Err(_) => Ok(()),
    }
}

fn write_file<F>(node: &estargz::Node, read_chunk: &F, target: &Path) -> Result<u64>
where
    F: Fn(&estargz::Node, &estargz::Chunk) -> estargz::Result<Vec<u8>>,
{
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)
        .map_err(io("creating", target))?;
    for c in &node.chunks {
        let data = read_chunk(node, c)?;
        f.write_all(&data).map_err(io("writing", target))?;
    }
    Ok(node.size)
}

fn set_xattr(path: &Path, key: &str, value: &[u8]) -> Result<()> {
    let p = CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Io {
        op: "setting xattr on",
        path: path.to_path_buf(),
        source: std::io::Error::other("NUL in path"),
    })?;
    let k = CString::new(key).map_err(|_| Error::Io {
        op: "setting xattr on",
        path: path.to_path_buf(),
        source: std::io::Error::other(format!("NUL in xattr name {key:?}")),
    })?;
    // SAFETY: both strings are NUL-terminated and live across the call; value is a valid slice.
    let rc = unsafe { libc::lsetxattr(p.as_ptr(), k.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if rc != 0 {
        return Err(Error::Io {
            op: "setting xattr on",
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn apply_metadata(path: &Path, node: &estargz::Node, opts: &ExtractOptions) -> Result<()> {
    if opts.chown {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            path,
            Some(Uid::from_raw(node.uid)),
            Some(Gid::from_raw(node.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(nix_io("chown", path))?;
    }
    if node.kind != NodeKind::Symlink {
        // After chown: chown clears setuid/setgid bits.
        fs::set_permissions(path, fs::Permissions::from_mode(node.mode)).map_err(io("chmod", path))?;
    }
    // Last of the owner/mode changes: the kernel drops `security.capability` on chown (and on
    // writes), so file capabilities set earlier would silently vanish.
    for (k, v) in &node.xattrs {
        set_xattr(path, k, v)?;
    }
    let t = TimeSpec::new(node.mtime, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(nix_io("setting times on", path))?;
    Ok(())
}
