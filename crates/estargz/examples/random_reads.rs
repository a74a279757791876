//! Random 4 KiB reads from a local blob, through [`estargz::Reader::read_file_at`] with chunk
//! verification and no cache: the worst case of the format itself (the lazy filesystem adds a
//! chunk cache on top). Reports ops/s and how many bytes each read had to decompress.
//!
//!   cargo run --release --example random_reads -- BLOB [OPS] [READ_SIZE]

use std::time::Instant;

use estargz::{FileSource, NodeKind, Reader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let blob = args.get(1).ok_or("usage: random_reads BLOB [OPS] [READ_SIZE]")?;
    let ops: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let size: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(4096);
    let r = Reader::open(FileSource::open(std::path::Path::new(blob))?)?;
    // Files weighted by size, as a reader touching random bytes of the layer would be.
    let files: Vec<(usize, u64)> =
        r.tree().nodes.iter().enumerate().filter(|(_, n)| n.kind == NodeKind::Reg && n.size > 0).map(|(i, n)| (i, n.size)).collect();
    let total: u64 = files.iter().map(|f| f.1).sum();
    if total == 0 {
        return Err("blob has no file data".into());
    }
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = vec![0u8; size];
    let mut decompressed = 0u64;
    let start = Instant::now();
    for _ in 0..ops {
        let mut at = next() % total;
        let (id, fsize) = *files
            .iter()
            .find(|(_, s)| {
                if at < *s {
                    true
                } else {
                    at -= s;
                    false
                }
            })
            .expect("offset within total");
        let off = at.min(fsize.saturating_sub(size as u64));
        let node = r.tree().node(id);
        let end = (off + size as u64).min(fsize);
        decompressed += node
            .chunks
            .iter()
            .filter(|c| c.chunk_offset < end && c.chunk_offset + c.size > off)
            .map(|c| c.inner_offset + c.size)
            .sum::<u64>();
        r.read_file_at(id, off, &mut buf, true)?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"ops\":{ops},\"readSize\":{size},\"seconds\":{secs:.3},\"opsPerSec\":{:.1},\"decompressedBytesPerRead\":{},\"chunks\":{}}}",
        ops as f64 / secs,
        decompressed / ops as u64,
        r.tree().nodes.iter().map(|n| n.chunks.len()).sum::<usize>()
    );
    Ok(())
}
