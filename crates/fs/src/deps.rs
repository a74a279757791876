//! Dependency-aware prefetch: when a program is first read, the shared libraries it is about
//! to load are fetched at once, together.
//!
//! Why: starting a dynamically linked program is a chain of first reads. The kernel reads the
//! executable, the dynamic loader opens each `DT_NEEDED` library in turn, reads its header and
//! maps it, then moves on to the next. Lazily, every link of that chain is one round trip to the
//! registry, one after the other: `apt-get` alone loads 15 libraries, so on a 20 ms link its
//! start costs a third of a second before it does anything. None of that is a guess the file
//! system has to make — the executable says which libraries it needs. So on the first read of
//! an ELF file's header, a helper thread reads its program headers and dynamic section (from
//! chunks that are usually already here), resolves the interpreter and the needed libraries in
//! this layer the way the loader would (`RUNPATH`/`RPATH` with `$ORIGIN`, then the standard
//! directories, following symbolic links such as Debian's `/lib -> usr/lib`), and has the fetcher
//! start on all of them at once. It then does the same for those libraries, breadth first, so
//! the whole closure is in flight after a few round trips instead of one per library.
//!
//! Only this layer is searched: a library in another layer belongs to another mount (and its own
//! daemon), which fetches it on demand as before. Only 64-bit ELF is read; anything else, or any
//! inconsistency in the headers, just means nothing is prefetched.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use object::elf::{self, FileHeader64};
use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use object::Endianness;
use store::LayerFetcher;
use tracing::debug;

use crate::fs::{read_chunks, FsStats};
use crate::view::{Inode, LayerView, NodeKind};

/// Most libraries one examination prefetches (a loader closure is rarely above a few dozen).
const MAX_LIBRARIES: usize = 64;
/// Headers and program headers are read from this prefix of the file.
const HEADER_BYTES: u64 = 4096;
/// Dynamic sections and string tables larger than this are not read.
const MAX_TABLE_BYTES: u64 = 1 << 20;

/// The dynamic-linking facts of one ELF file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ElfDeps {
    /// `PT_INTERP`: the dynamic loader's path.
    pub interpreter: Option<String>,
    /// `DT_NEEDED` names, in order.
    pub needed: Vec<String>,
    /// `DT_RUNPATH` or `DT_RPATH` directories (`:`-separated in the file).
    pub search: Vec<String>,
    /// The multiarch directory name of the machine (e.g. `x86_64-linux-gnu`), if known.
    pub multiarch: Option<&'static str>,
}

/// Whether `head` (the first bytes of a file) starts like an ELF file.
pub fn looks_like_elf(head: &[u8]) -> bool {
    head.starts_with(b"\x7fELF")
}

/// Reads the dynamic dependencies of a 64-bit ELF file through `read(offset, len)`, which
/// returns the file's bytes there (fewer at the end of the file) or `None` on failure.
pub fn parse_elf(read: &mut dyn FnMut(u64, u64) -> Option<Vec<u8>>) -> Option<ElfDeps> {
    let head = read(0, HEADER_BYTES)?;
    let header = FileHeader64::<Endianness>::parse(head.as_slice()).ok()?;
    let endian = header.endian().ok()?;
    let phdrs = header.program_headers(endian, head.as_slice()).ok()?;
    let mut deps = ElfDeps {
        multiarch: multiarch(header.e_machine(endian)),
        ..ElfDeps::default()
    };
    let mut dynamic = None;
    for ph in phdrs {
        if let Ok(Some(interp)) = ph.interpreter(endian, head.as_slice()) {
            deps.interpreter = std::str::from_utf8(interp).ok().map(str::to_string);
        } else if ph.p_type(endian) == elf::PT_INTERP {
            // Past the header prefix: read it where it is.
            let data = read_exact(read, ph.p_offset(endian), ph.p_filesz(endian).min(4096))?;
            let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            deps.interpreter = std::str::from_utf8(&data[..end]).ok().map(str::to_string);
        }
        if ph.p_type(endian) == elf::PT_DYNAMIC {
            dynamic = Some((ph.p_offset(endian), ph.p_filesz(endian)));
        }
    }
    let Some((dyn_offset, dyn_size)) = dynamic else { return Some(deps) };
    if dyn_size > MAX_TABLE_BYTES {
        return None;
    }
    let raw = read_exact(read, dyn_offset, dyn_size)?;
    let entries = object::pod::slice_from_bytes::<object::elf::Dyn64<Endianness>>(&raw, raw.len() / std::mem::size_of::<object::elf::Dyn64<Endianness>>()).ok()?.0;
    let (mut strtab, mut strsz) = (None, None);
    let mut needed = Vec::new();
    let (mut runpath, mut rpath) = (None, None);
    for d in entries {
        let tag = d.d_tag(endian);
        let val = d.val(endian);
        match tag {
            elf::DT_NULL => break,
            elf::DT_NEEDED => needed.push(val),
            elf::DT_STRTAB => strtab = Some(val),
            elf::DT_STRSZ => strsz = Some(val),
            elf::DT_RUNPATH => runpath = Some(val),
            elf::DT_RPATH => rpath = Some(val),
            _ => {}
        }
    }
    let (Some(strtab), Some(strsz)) = (strtab, strsz) else { return Some(deps) };
    if strsz > MAX_TABLE_BYTES {
        return None;
    }
    // DT_STRTAB is an address: find the loaded segment that maps it to get its file offset.
    let offset = phdrs.iter().filter(|ph| ph.p_type(endian) == elf::PT_LOAD).find_map(|ph| {
        let (vaddr, filesz) = (ph.p_vaddr(endian), ph.p_filesz(endian));
        (vaddr <= strtab && strtab < vaddr.saturating_add(filesz)).then(|| strtab - vaddr + ph.p_offset(endian))
    })?;
    let strings = read_exact(read, offset, strsz)?;
    let string_at = |at: u64| -> Option<String> {
        let tail = strings.get(at as usize..)?;
        let end = tail.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&tail[..end]).ok().map(str::to_string)
    };
    deps.needed = needed.into_iter().filter_map(string_at).collect();
    if let Some(s) = runpath.or(rpath).and_then(string_at) {
        deps.search = s.split(':').filter(|p| !p.is_empty()).map(str::to_string).collect();
    }
    Some(deps)
}

fn read_exact(read: &mut dyn FnMut(u64, u64) -> Option<Vec<u8>>, offset: u64, len: u64) -> Option<Vec<u8>> {
    let data = read(offset, len)?;
    (data.len() as u64 == len).then_some(data)
}

/// Debian's multiarch directory of an ELF machine.
fn multiarch(machine: elf::Machine) -> Option<&'static str> {
    match machine {
        elf::EM_X86_64 => Some("x86_64-linux-gnu"),
        elf::EM_AARCH64 => Some("aarch64-linux-gnu"),
        elf::EM_PPC64 => Some("powerpc64le-linux-gnu"),
        elf::EM_S390 => Some("s390x-linux-gnu"),
        elf::EM_RISCV => Some("riscv64-linux-gnu"),
        _ => None,
    }
}

/// Finds library `name` needed by the file at `origin_dir` the way the dynamic loader searches
/// (without `LD_LIBRARY_PATH` or `ld.so.cache`, which agree with the default directories on
/// the distributions' own layouts).
pub fn resolve_library(view: &LayerView, name: &str, origin_dir: &str, deps: &ElfDeps) -> Option<u64> {
    let is_file = |ino: u64| view.get(ino).is_some_and(|i| i.kind == NodeKind::Reg);
    if name.contains('/') {
        return view.resolve_following(name).filter(|&i| is_file(i));
    }
    let mut dirs: Vec<String> = deps.search.iter().map(|d| d.replace("$ORIGIN", origin_dir).replace("${ORIGIN}", origin_dir)).collect();
    if let Some(m) = deps.multiarch {
        dirs.push(format!("/lib/{m}"));
        dirs.push(format!("/usr/lib/{m}"));
    }
    dirs.extend(["/lib64", "/usr/lib64", "/lib", "/usr/lib"].map(String::from));
    dirs.iter().find_map(|d| view.resolve_following(&format!("{d}/{name}")).filter(|&i| is_file(i)))
}

/// Files already examined (or being examined) in this mount: each is looked at once.
#[derive(Default)]
pub struct Examined(Mutex<HashSet<u64>>);

impl Examined {
    /// Marks `ino`; true if it was not marked before.
    fn first_time(&self, ino: u64) -> bool {
        self.0.lock().unwrap().insert(ino)
    }
}

/// What the helper thread needs of the mount.
#[derive(Clone)]
pub struct Context {
    pub view: Arc<LayerView>,
    pub fetcher: Arc<LayerFetcher>,
    pub examined: Arc<Examined>,
    pub stats: Arc<FsStats>,
}

/// Called with the first bytes of a read at offset 0 of `ino`: if it is an ELF file seen for
/// the first time, starts prefetching its libraries on a helper thread.
pub fn on_first_read(cx: &Context, ino: u64, head: &[u8]) {
    if !looks_like_elf(head) || !cx.examined.first_time(ino) {
        return;
    }
    let cx = cx.clone();
    let _ = std::thread::Builder::new().name("deps".into()).spawn(move || prefetch_closure(&cx, ino));
}

/// Called when `ino` is opened with all its content already in the store (a passthrough open,
/// whose reads the daemon never sees): examines it like [`on_first_read`], reading its header
/// from the store on the helper thread.
pub fn on_cached_open(cx: &Context, ino: u64) {
    if cx.examined.0.lock().unwrap().contains(&ino) {
        return;
    }
    let cx = cx.clone();
    let _ = std::thread::Builder::new().name("deps".into()).spawn(move || {
        let Some(inode) = cx.view.get(ino) else { return };
        let is_elf = read_chunks(&cx.fetcher, inode, 0, 4).is_ok_and(|head| looks_like_elf(&head));
        if is_elf && cx.examined.first_time(ino) {
            prefetch_closure(&cx, ino);
        }
    });
}

/// Breadth first over the dependency graph from `root`: every level's libraries are handed to
/// the fetcher together, then read (which waits for them) to find the next level.
fn prefetch_closure(cx: &Context, root: u64) {
    let view = &cx.view;
    let mut level = vec![root];
    let mut started = 0;
    while !level.is_empty() && started < MAX_LIBRARIES {
        let mut next = Vec::new();
        for ino in level {
            let Some(inode) = view.get(ino) else { continue };
            let mut read = |offset: u64, len: u64| read_chunks(&cx.fetcher, inode, offset, len.min(u32::MAX as u64) as u32).ok();
            let Some(deps) = parse_elf(&mut read) else { continue };
            let origin = format!("/{}", inode.path.rsplit_once('/').map_or("", |(dir, _)| dir));
            let names = deps.interpreter.iter().chain(&deps.needed);
            for lib in names.filter_map(|n| resolve_library(view, n, &origin, &deps)) {
                if started < MAX_LIBRARIES && cx.examined.first_time(lib) {
                    started += 1;
                    next.push(lib);
                }
            }
        }
        let chunks: Vec<usize> = next.iter().filter_map(|&l| view.get(l)).flat_map(|i: &Inode| i.extents.iter().map(|c| c.chunk)).collect();
        if !chunks.is_empty() {
            debug!(root = %view.get(root).map_or("", |i| i.path.as_str()), libraries = next.len(), "prefetching libraries");
            cx.stats.libraries_prefetched.fetch_add(next.len() as u64, Ordering::Relaxed);
            cx.fetcher.fetch_ahead(&chunks);
        }
        level = next;
    }
}

/// Files that nearly every container start reads, whatever it runs: containerd resolves the
/// process's groups (and user) from the rootfs's `/etc/group` and `/etc/passwd` before the task
/// is created, and a dynamically linked glibc program starts with the loader reading
/// `/etc/ld.so.cache` and mapping the C library.
/// On a cold start each is one registry round trip on the start's critical path (seen on
/// `ctr run … /bin/echo` of a Debian image: 13 ms for `/etc/group`, 23 ms for the loader and
/// libc), taken while the link is otherwise idle if they are asked for at mount.
pub const START_FILES: &[&str] = &[
    "/etc/passwd",
    "/etc/group",
    "/etc/ld.so.cache",
    "/lib64/ld-linux-x86-64.so.2",
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/lib/ld-linux-aarch64.so.1",
    "/lib/aarch64-linux-gnu/libc.so.6",
    "/lib/ld-musl-x86_64.so.1",
    "/lib/ld-musl-aarch64.so.1",
];

/// Starts fetching those of [`START_FILES`] this layer holds (symbolic links followed inside
/// the layer, as `/lib64 -> usr/lib64`); returns how many. The fetch runs on helper threads.
pub fn prefetch_start_files(view: &LayerView, fetcher: &Arc<LayerFetcher>) -> usize {
    let files: Vec<&Inode> = START_FILES.iter().filter_map(|p| view.resolve_following(p)).filter_map(|ino| view.get(ino)).filter(|i| i.kind == NodeKind::Reg).collect();
    let chunks: Vec<usize> = files.iter().flat_map(|i| i.extents.iter().map(|c| c.chunk)).collect();
    if !chunks.is_empty() {
        debug!(files = files.len(), "prefetching the files every container start reads");
        fetcher.fetch_ahead(&chunks);
    }
    files.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(bytes: &[u8]) -> impl FnMut(u64, u64) -> Option<Vec<u8>> + '_ {
        move |offset, len| {
            let start = (offset as usize).min(bytes.len());
            let end = (offset.saturating_add(len) as usize).min(bytes.len());
            Some(bytes[start..end].to_vec())
        }
    }

    #[test]
    fn reads_the_libraries_of_this_machines_programs() {
        // Any dynamically linked program of the build machine will do: Debian's `ls` needs libc.
        let bytes = std::fs::read("/bin/ls").expect("/bin/ls");
        let deps = parse_elf(&mut reader(&bytes)).expect("ELF parsed");
        assert!(deps.needed.iter().any(|n| n.starts_with("libc.so")), "{deps:?}");
        assert!(deps.interpreter.as_deref().is_some_and(|i| i.contains("ld-linux")), "{deps:?}");
    }

    #[test]
    fn anything_else_yields_nothing() {
        assert!(!looks_like_elf(b"#!/bin/sh\n"));
        assert_eq!(parse_elf(&mut reader(b"\x7fELF truncated")), None);
        let mut bytes = std::fs::read("/bin/ls").unwrap();
        bytes.truncate(200); // program headers cut off
        assert_eq!(parse_elf(&mut reader(&bytes)), None);
        assert_eq!(parse_elf(&mut |_, _| None), None);
    }

    /// The start files a layer holds are fetched at once (through its symbolic links), and
    /// nothing else is.
    #[test]
    fn start_files_are_fetched_and_only_they() {
        use store::{ChunkStore, FetchConfig, FileRangeSource, StoreConfig};
        use tar::EntryType::*;
        let entries: [(&str, tar::EntryType, &[u8], &str); 8] = [
            ("etc/passwd", Regular, b"root:x:0:0:root:/root:/bin/sh\n", ""),
            ("etc/group", Regular, b"root:x:0:\n", ""),
            ("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", Regular, b"\x7fELF loader", ""),
            ("usr/lib/x86_64-linux-gnu/libc.so.6", Regular, b"\x7fELF libc", ""),
            ("usr/bin/tool", Regular, b"\x7fELF not a start file", ""),
            ("lib", Symlink, b"", "usr/lib"),
            ("lib64/", Directory, b"", ""),
            ("lib64/ld-linux-x86-64.so.2", Symlink, b"", "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
        ];
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(0o755);
            h.set_size(data.len() as u64);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        }
        let mut blob = Vec::new();
        estargz::build(std::io::Cursor::new(b.into_inner().unwrap()), &mut blob, &estargz::BuildOptions::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("blob"), &blob).unwrap();
        let store = ChunkStore::open(StoreConfig::new(dir.path().join("store"))).unwrap();
        let source = Arc::new(FileRangeSource::open(&dir.path().join("blob")).unwrap());
        let opened = crate::open_layer(source, None, store, FetchConfig::default()).unwrap();
        let (view, fetcher) = (opened.view.clone(), opened.fetcher.clone());
        assert_eq!(prefetch_start_files(&view, &fetcher), 4, "passwd, group, the loader (through two links) and libc");
        let stored = |path: &str| {
            let inode = view.get(view.resolve_following(path).unwrap()).unwrap();
            inode.extents.iter().all(|e| fetcher.chunks()[e.chunk].digest.is_some_and(|d| fetcher.store().contains(&d)))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !["/etc/passwd", "/etc/group", "/lib64/ld-linux-x86-64.so.2", "/usr/lib/x86_64-linux-gnu/libc.so.6"].iter().all(|p| stored(p)) {
            assert!(std::time::Instant::now() < deadline, "the start files were not fetched");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!stored("/usr/bin/tool"), "a file that is not a start file was fetched");
    }

}
