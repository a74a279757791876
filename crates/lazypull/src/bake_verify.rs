//! Checking a baked volume, and packing it into an ext4 image.
//!
//! Every piece of a volume is content addressed, so a check needs no outside reference:
//! containerd's blobs are named by their sha256 and the chunk store's chunks by theirs (or by
//! an alias recording it, [`store::verify`]). The manifest's counts catch what hashing cannot:
//! files that are simply gone (a truncated copy). An image file is first checked as a file
//! system (`e2fsck -n`: a truncated image fails there with the sizes it expected), then mounted
//! read-only on a loop device and checked like a directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use warm::volume::{self, VolumeManifest};

/// What is in a volume directory, and what of it is wrong.
pub(crate) struct DirCheck {
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
    /// One line per damaged item, naming it (by its path in the volume).
    pub damaged: Vec<String>,
    pub damaged_chunks: u64,
    pub damaged_blobs: u64,
}

/// containerd's content store under a containerd root.
fn blobs_dir(containerd_root: &Path) -> PathBuf {
    containerd_root.join("io.containerd.content.v1.content").join("blobs").join("sha256")
}

/// The chunk stores under a snapshotter root: the layer daemons' (`layers/cache`, the default
/// mode) and the in-process one (`cache`).
fn store_dirs(lazypull_root: &Path) -> Vec<PathBuf> {
    [lazypull_root.join("layers").join("cache"), lazypull_root.join("cache")].into_iter().filter(|d| d.join("chunks").is_dir()).collect()
}

/// Hashes every content blob and chunk of the volume at `dir`.
pub(crate) fn check_dir(dir: &Path) -> Result<DirCheck> {
    let mut out = DirCheck { chunks: 0, chunk_bytes: 0, blobs: 0, blob_bytes: 0, damaged: Vec::new(), damaged_chunks: 0, damaged_blobs: 0 };
    let rel = |p: &Path| p.strip_prefix(dir).unwrap_or(p).display().to_string();
    let blobs = blobs_dir(&dir.join(volume::CONTAINERD_DIR));
    if blobs.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(&blobs).with_context(|| format!("listing {}", blobs.display()))?.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            match crate::bake_cmd::sha256_file(&path) {
                Ok((hex, len)) if hex == name => {
                    out.blobs += 1;
                    out.blob_bytes += len;
                }
                Ok((hex, len)) => {
                    out.damaged_blobs += 1;
                    out.damaged.push(format!("content blob {}: its {len} bytes hash to sha256:{hex}, not sha256:{name}", rel(&path)));
                }
                Err(e) => {
                    out.damaged_blobs += 1;
                    out.damaged.push(format!("content blob {}: unreadable: {e}", rel(&path)));
                }
            }
        }
    }
    for store_dir in store_dirs(&dir.join(volume::LAZYPULL_DIR)) {
        let check = store::verify::check_store(&store_dir).with_context(|| format!("checking the chunk store {}", store_dir.display()))?;
        out.chunks += check.good_chunks;
        out.chunk_bytes += check.good_bytes;
        out.damaged_chunks += check.damaged.len() as u64;
        out.damaged.extend(check.damaged.into_iter().map(|d| format!("chunk store: {}", store::verify::Damage { path: PathBuf::from(rel(&d.path)), ..d })));
    }
    Ok(out)
}

/// `lazypull bake verify VOLUME`.
pub fn verify(volume: &Path) -> Result<()> {
    let md = std::fs::metadata(volume).with_context(|| format!("opening the volume {}", volume.display()))?;
    if md.is_dir() {
        return verify_dir(volume, &volume.display().to_string());
    }
    fsck(volume)?;
    let mnt = PathBuf::from(format!("/run/lazypull-verify-{}", std::process::id()));
    std::fs::create_dir_all(&mnt).with_context(|| format!("creating {}", mnt.display()))?;
    let status = Command::new("mount").arg("-o").arg("loop,ro,noload").arg(volume).arg(&mnt).status().context("running mount")?;
    if !status.success() {
        let _ = std::fs::remove_dir(&mnt);
        bail!("{}: cannot be mounted as ext4 on a loop device (mount {status})", volume.display());
    }
    let result = verify_dir(&mnt, &volume.display().to_string());
    let _ = Command::new("umount").arg(&mnt).status();
    let _ = std::fs::remove_dir(&mnt);
    result
}

/// `e2fsck -n -f`: the image is a whole, consistent ext4 file system.
fn fsck(image: &Path) -> Result<()> {
    let out = Command::new("e2fsck").arg("-n").arg("-f").arg(image).output().context("running e2fsck (Debian package e2fsprogs)")?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).take(8).collect();
        bail!("{} is truncated or damaged: e2fsck found a broken file system ({}):\n{}", image.display(), out.status, lines.join("\n"));
    }
    Ok(())
}

fn verify_dir(dir: &Path, name: &str) -> Result<()> {
    let manifest_path = dir.join(volume::MANIFEST_FILE);
    let text = match std::fs::read(&manifest_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(warm::VolumeError::Missing(format!("{name}: {}", volume::MANIFEST_FILE)).into()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", manifest_path.display())),
    };
    let manifest = VolumeManifest::parse(&format!("{name}: {}", volume::MANIFEST_FILE), &text, env!("CARGO_PKG_VERSION"))?;
    let check = check_dir(dir)?;
    let mut problems = check.damaged.clone();
    // Damaged items are named above; what is neither good nor damaged is gone.
    let missing_blobs = manifest.blobs.saturating_sub(check.blobs + check.damaged_blobs);
    if missing_blobs > 0 {
        problems.push(format!("{missing_blobs} of the {} content blobs the manifest lists are missing", manifest.blobs));
    }
    let missing_chunks = manifest.chunks.saturating_sub(check.chunks + check.damaged_chunks);
    if missing_chunks > 0 {
        problems.push(format!("{missing_chunks} of the {} chunks the manifest lists are missing", manifest.chunks));
    }
    let blobs = blobs_dir(&dir.join(volume::CONTAINERD_DIR));
    for image in &manifest.images {
        let hex = image.manifest_digest.split_once(':').map_or(image.manifest_digest.as_str(), |(_, h)| h);
        if !blobs.join(hex).is_file() {
            problems.push(format!("image {}: its manifest {} is not in the content store", image.reference, image.manifest_digest));
        }
    }
    println!(
        "{name}: {} image{} ({} mode), {} content blobs / {} bytes and {} chunks / {} bytes checked",
        manifest.images.len(),
        if manifest.images.len() == 1 { "" } else { "s" },
        manifest.mode,
        check.blobs,
        check.blob_bytes,
        check.chunks,
        check.chunk_bytes
    );
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("{name}: {p}");
        }
        bail!("{name}: {} problem{} found", problems.len(), if problems.len() == 1 { "" } else { "s" });
    }
    println!("{name}: OK");
    Ok(())
}

/// Packs the directory `dir` into the ext4 image `image` (`mkfs.ext4 -d`), sized for its
/// contents with room to grow (a node writes container layers and new chunks into it).
pub(crate) fn make_ext4(dir: &Path, image: &Path) -> Result<()> {
    let (bytes, entries) = usage(dir)?;
    // Data blocks, one inode and a block per entry for metadata, a fifth on top for the
    // journal and growth, and a floor for tiny volumes.
    let size = ((bytes + entries * 4096) * 6 / 5).max(64 << 20);
    let inodes = (entries * 2).max(16_384);
    let mut tmp = image.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "lazypull-cache", "-E", "root_owner=0:0", "-N", &inodes.to_string(), "-d"])
        .arg(dir)
        .arg(&tmp)
        .arg(format!("{}k", size.div_ceil(1024)))
        .output()
        .context("running mkfs.ext4 (Debian package e2fsprogs)")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!("mkfs.ext4 -d {} {} failed ({}): {}", dir.display(), image.display(), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    std::fs::rename(&tmp, image).with_context(|| format!("renaming {} to {}", tmp.display(), image.display()))?;
    Ok(())
}

/// Allocated bytes (4 KiB blocks, holes not counted) and number of entries under `dir`.
fn usage(dir: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let e = e?;
            let md = e.metadata()?;
            entries += 1;
            bytes += (md.blocks() * 512).next_multiple_of(4096);
            if md.is_dir() {
                todo.push(e.path());
            }
        }
    }
    Ok((bytes, entries))
}
