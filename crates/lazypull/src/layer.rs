//! `lazypull layer …`: convert, inspect, verify and extract single layer blobs.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use estargz::{BuildOptions, Compression, Digest, FileSource, NodeKind, Reader};
use serde_json::json;

#[derive(Subcommand)]
pub enum LayerCommand {
    /// Mount a local eStargz blob lazily with FUSE (for testing and debugging).
    Mount(crate::mount::LayerMountArgs),
    /// Convert a tar, tar.gz or tar.zst layer into an eStargz (or zstd:chunked) blob.
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// Maximum uncompressed bytes per chunk.
        #[arg(long, default_value_t = estargz::toc::DEFAULT_CHUNK_SIZE)]
        chunk_size: u64,
        /// Compression level (gzip 1-9, default 9; zstd 1-22, default 3).
        #[arg(long)]
        level: Option<u32>,
        /// Files to place first: JSON lines `{"path": "..."}` (as recorded by the reference
        /// optimizer) or one path per line.
        #[arg(long)]
        prioritize: Option<PathBuf>,
        /// Write zstd:chunked instead of eStargz.
        #[arg(long)]
        zstd: bool,
        /// Compression threads (0 = one per core); the output does not depend on it.
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a blob's footer, TOC location, entries, chunks and landmark.
    Inspect {
        blob: PathBuf,
        /// Also list every entry.
        #[arg(long)]
        entries: bool,
        #[arg(long)]
        json: bool,
    },
    /// Check the TOC digest (when given) and the sha256 of every chunk.
    Verify {
        blob: PathBuf,
        /// Expected TOC digest (the layer's `containerd.io/snapshot/stargz/toc.digest`).
        #[arg(long)]
        toc_digest: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Extract the layer's files into a directory (verifying every chunk).
    Extract {
        blob: PathBuf,
        dir: PathBuf,
        /// Turn `.wh.` entries into overlayfs whiteouts instead of keeping them as files.
        #[arg(long)]
        overlay_whiteouts: bool,
    },
}

pub fn run(cmd: LayerCommand) -> Result<()> {
    match cmd {
        LayerCommand::Mount(a) => crate::mount::layer_mount(a),
        LayerCommand::Convert {
            input,
            output,
            chunk_size,
            level,
            prioritize,
            zstd,
            threads,
            json,
        } => convert(&input, &output, chunk_size, level, prioritize.as_deref(), zstd, threads, json),
        LayerCommand::Inspect { blob, entries, json } => inspect(&blob, entries, json),
        LayerCommand::Verify { blob, toc_digest, json } => verify(&blob, toc_digest.as_deref(), json),
        LayerCommand::Extract {
            blob,
            dir,
            overlay_whiteouts,
        } => extract(&blob, &dir, overlay_whiteouts),
    }
}

/// Reads a prioritized-files list: JSON lines with a `path` field, or plain paths.
pub fn read_prioritized(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading prioritized list {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not valid JSON", path.display(), n + 1))?;
            match v.get("path").and_then(|p| p.as_str()) {
                Some(p) => out.push(p.to_string()),
                None => bail!("{}:{}: JSON record has no string \"path\" field", path.display(), n + 1),
            }
        } else {
            out.push(line.to_string());
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn convert(
    input: &Path,
    output: &Path,
    chunk_size: u64,
    level: Option<u32>,
    prioritize: Option<&Path>,
    zstd: bool,
    threads: usize,
    as_json: bool,
) -> Result<()> {
    let prioritized = match prioritize {
        Some(p) => read_prioritized(p)?,
        None => Vec::new(),
    };
    let opts = BuildOptions {
        compression: if zstd { Compression::Zstd } else { Compression::Gzip },
        chunk_size,
        level,
        prioritized,
        threads,
        tmp_dir: output.parent().filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf),
    };
    let inf = File::open(input).with_context(|| format!("opening {}", input.display()))?;
    // Write to a temporary name and rename, so a failed conversion never leaves a
    // half-written blob under the final name.
    let tmp = output.with_extension("partial");
    let outf = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let start = Instant::now();
    let res = estargz::build(BufReader::with_capacity(1 << 20, inf), BufWriter::with_capacity(1 << 20, outf), &opts);
    let res = match res {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("converting {}", input.display()));
        }
    };
    std::fs::rename(&tmp, output).with_context(|| format!("renaming {} to {}", tmp.display(), output.display()))?;
    let secs = start.elapsed().as_secs_f64();
    for p in &res.missing_prioritized {
        eprintln!("lazypull: warning: prioritized path {p:?} is not in the layer");
    }
    let mbps = res.uncompressed_size as f64 / 1e6 / secs.max(1e-9);
    if as_json {
        let mut v = json!({
            "compression": if zstd { "zstd:chunked" } else { "estargz" },
            "tocDigest": res.toc_digest.to_string(),
            "diffID": res.diff_id.to_string(),
            "uncompressedSize": res.uncompressed_size,
            "blobDigest": res.blob_digest.to_string(),
            "blobSize": res.blob_size,
            "tocOffset": res.toc_offset,
            "entries": res.entries,
            "seconds": secs,
            "missingPrioritized": res.missing_prioritized,
        });
        if let Some((sum, pos)) = &res.zstd_manifest {
            v["annotations"] = json!({
                estargz::toc::ZSTD_MANIFEST_CHECKSUM_ANNOTATION: sum.to_string(),
                estargz::toc::ZSTD_MANIFEST_POSITION_ANNOTATION: pos,
                estargz::toc::UNCOMPRESSED_SIZE_ANNOTATION: res.uncompressed_size.to_string(),
            });
        } else {
            v["annotations"] = json!({
                estargz::toc::TOC_DIGEST_ANNOTATION: res.toc_digest.to_string(),
                estargz::toc::UNCOMPRESSED_SIZE_ANNOTATION: res.uncompressed_size.to_string(),
            });
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("toc digest:        {}", res.toc_digest);
        println!("diff id:           {}", res.diff_id);
        println!("uncompressed size: {}", res.uncompressed_size);
        println!("blob digest:       {}", res.blob_digest);
        println!("blob size:         {}", res.blob_size);
        println!("entries:           {}", res.entries);
        if let Some((sum, pos)) = &res.zstd_manifest {
            println!("manifest checksum: {sum}");
            println!("manifest position: {pos}");
        }
        println!("time:              {secs:.3}s ({mbps:.1} MB/s of uncompressed input)");
    }
    Ok(())
}

fn open(blob: &Path) -> Result<Reader<FileSource>> {
    let src = FileSource::open(blob)?;
    Reader::open(src).with_context(|| format!("opening {}", blob.display()))
}

fn landmark(r: &Reader<FileSource>) -> &'static str {
    if r.tree().lookup(estargz::toc::PREFETCH_LANDMARK).is_some() {
        "prefetch (files before .prefetch.landmark are prioritized)"
    } else if r.tree().lookup(estargz::toc::NO_PREFETCH_LANDMARK).is_some() {
        "no-prefetch"
    } else {
        "none"
    }
}

fn inspect(blob: &Path, list: bool, as_json: bool) -> Result<()> {
    let r = open(blob)?;
    let f = r.footer();
    let toc = r.toc();
    let chunks: usize = r.tree().nodes.iter().map(|n| n.chunks.len()).sum();
    let files = r.tree().nodes.iter().filter(|n| n.kind == NodeKind::Reg).count();
    let prioritized = toc
        .entries
        .iter()
        .position(|e| e.name == estargz::toc::PREFETCH_LANDMARK)
        .map(|i| toc.entries[..i].iter().filter(|e| e.kind == estargz::EntryType::Reg).count());
    if as_json {
        let mut v = json!({
            "footer": f.kind.name(),
            "footerSize": f.kind.size(),
            "tocOffset": f.toc_offset,
            "tocCompressedSize": f.toc_compressed_len,
            "tocSize": r.toc_json_len(),
            "tocDigest": r.toc_digest().to_string(),
            "tocVersion": toc.version,
            "blobSize": estargz::BlobSource::size(r.source()),
            "tocEntries": toc.entries.len(),
            "files": files,
            "chunks": chunks,
            "landmark": landmark(&r),
            "prioritizedFiles": prioritized,
        });
        if list {
            v["entries"] = serde_json::to_value(&toc.entries)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("footer:        {}", f.kind.name());
    println!("toc offset:    {} ({} bytes compressed, {} bytes JSON)", f.toc_offset, f.toc_compressed_len, r.toc_json_len());
    println!("toc digest:    {}", r.toc_digest());
    println!("toc entries:   {} ({} files, {} chunks)", toc.entries.len(), files, chunks);
    println!("landmark:      {}", landmark(&r));
    if let Some(n) = prioritized {
        println!("prioritized:   {n} files");
    }
    if list {
        for (path, id) in r.tree().walk() {
            let n = r.tree().node(id);
            println!(
                "{:7} {:o} {}:{} {:>10} {:>3} chunk(s) /{}{}",
                n.kind.as_str(),
                n.mode,
                n.uid,
                n.gid,
                n.size,
                n.chunks.len(),
                path,
                if n.kind == NodeKind::Symlink { format!(" -> {}", n.link_target) } else { String::new() }
            );
        }
    }
    Ok(())
}

fn verify(blob: &Path, toc_digest: Option<&str>, as_json: bool) -> Result<()> {
    let start = Instant::now();
    let r = open(blob)?;
    if let Some(d) = toc_digest {
        let want: Digest = d.parse().with_context(|| format!("--toc-digest {d:?}"))?;
        r.verify_toc(&want).with_context(|| format!("verifying {}", blob.display()))?;
    }
    let stats = estargz::verify_chunks(&r).with_context(|| format!("verifying {}", blob.display()))?;
    let secs = start.elapsed().as_secs_f64();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "ok": true,
                "tocDigest": r.toc_digest().to_string(),
                "tocDigestChecked": toc_digest.is_some(),
                "files": stats.files,
                "chunks": stats.chunks,
                "bytes": stats.bytes,
                "seconds": secs,
            }))?
        );
    } else {
        println!(
            "OK: {} files, {} chunks, {} bytes verified in {secs:.3}s (toc digest {}{})",
            stats.files,
            stats.chunks,
            stats.bytes,
            r.toc_digest(),
            if toc_digest.is_some() { ", matches" } else { ", not checked against an expected value" }
        );
    }
    Ok(())
}

fn extract(blob: &Path, dir: &Path, overlay_whiteouts: bool) -> Result<()> {
    let r = open(blob)?;
    let opts = unpack::ExtractOptions {
        overlay_whiteouts,
        ..Default::default()
    };
    let start = Instant::now();
    let stats = unpack::extract(&r, dir, &opts).with_context(|| format!("extracting {} into {}", blob.display(), dir.display()))?;
    println!("extracted {} entries, {} bytes in {:.3}s", stats.entries, stats.bytes, start.elapsed().as_secs_f64());
    std::io::stdout().flush()?;
    Ok(())
}
