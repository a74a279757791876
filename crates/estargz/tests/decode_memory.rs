//! Decode memory (issue 16, part 3): serving a chunk must cost about its declared size, never
//! what the member's gzip trailer (ISIZE) claims or what the member would inflate to. The fast
//! path used to allocate and inflate the whole member — up to 1 GiB — to return a 1-byte chunk.
//!
//! A counting global allocator measures the peak heap growth during each read. This file holds
//! a single test so that no other test allocates concurrently.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use estargz::footer::estargz_footer;
use estargz::{decode_chunk, Compression, Digest, Reader, Toc, TocEntry};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(l.size(), Ordering::SeqCst) + l.size();
        PEAK.fetch_max(now, Ordering::SeqCst);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(l.size(), Ordering::SeqCst) + l.size();
        PEAK.fetch_max(now, Ordering::SeqCst);
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        CURRENT.fetch_sub(l.size(), Ordering::SeqCst);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() {
            let now = CURRENT.fetch_add(new - l.size(), Ordering::SeqCst) + (new - l.size());
            PEAK.fetch_max(now, Ordering::SeqCst);
        } else {
            CURRENT.fetch_sub(l.size() - new, Ordering::SeqCst);
        }
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak heap growth while running `f`.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst) - base)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// A blob of three 1-byte files, each chunk at the start of its own member:
/// `honest` — the byte followed by 48 MiB of zeros (as if headers followed it),
/// `liar` — a member of 2 bytes whose trailer claims 1 GiB,
/// `plain` — an ordinary member.
fn blob() -> Vec<u8> {
    let mut honest = vec![0u8; 48 << 20];
    honest[0] = b'h';
    let mut liar = gzip(b"l\0");
    let n = liar.len();
    liar[n - 4..].copy_from_slice(&(1u32 << 30).to_le_bytes());
    let members = [gzip(&estargz::tar::ustar_header("first", 0, 0o644)), gzip(&honest), liar, gzip(b"p")];
    let mut out = Vec::new();
    let mut offsets = Vec::new();
    for m in &members {
        offsets.push(out.len() as u64);
        out.extend_from_slice(m);
    }
    let mut toc = Toc { version: 1, entries: Vec::new() };
    for (i, (name, byte)) in [("honest", b'h'), ("liar", b'l'), ("plain", b'p')].into_iter().enumerate() {
        let mut e = TocEntry::new(name, estargz::EntryType::Reg);
        e.size = 1;
        e.offset = offsets[i + 1];
        e.digest = Digest::of(&[byte]).to_string();
        e.chunk_digest = e.digest.clone();
        toc.entries.push(e);
    }
    let json = toc.to_json();
    let mut member = estargz::tar::ustar_header("stargz.index.json", json.len() as u64, 0o644).to_vec();
    member.extend_from_slice(&json);
    member.resize(member.len().next_multiple_of(512) + 1024, 0);
    let toc_offset = out.len() as u64;
    out.extend(gzip(&member));
    out.extend_from_slice(&estargz_footer(toc_offset));
    out
}

#[test]
fn a_one_byte_chunk_costs_about_one_byte_whatever_its_member_claims() {
    let blob = blob();
    let r = Reader::open(blob.clone()).unwrap();
    const BUDGET: usize = 1 << 20; // decoder state and buffers, far below any member size
    for (name, byte) in [("honest", b'h'), ("liar", b'l'), ("plain", b'p')] {
        let node = r.lookup(name).unwrap().clone();
        let c = node.chunks[0].clone();
        let (data, peak) = peak_during(|| r.read_chunk(&node, &c, true).unwrap());
        assert_eq!(data, [byte], "{name}");
        assert!(peak < BUDGET, "{name}: reading a 1-byte chunk peaked at {peak} bytes of heap");
        let member = &blob[c.offset as usize..c.next_offset as usize];
        let (data, peak) = peak_during(|| decode_chunk(Compression::Gzip, member, &node, &c, true).unwrap());
        assert_eq!(data, [byte], "{name}");
        assert!(peak < BUDGET, "{name}: decoding a 1-byte chunk peaked at {peak} bytes of heap");
    }
}
