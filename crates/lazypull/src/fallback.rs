//! Layers that cannot be mounted lazily, and the overlay that stacks a whole image.
//!
//! A non-eStargz layer in an image that is otherwise lazy should not make the whole mount fail:
//! it is downloaded (digest-checked), and extracted once into `STATE/layers/<digest>/fs` with
//! overlayfs whiteouts. Extraction goes through the same safe extractor as eStargz layers
//! (hostile names rejected, no symlink following): the tar is first re-indexed into a local
//! eStargz file at compression level 1, which costs a little CPU on a path that is already the
//! slow one, and keeps one audited extractor instead of two.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use convert::Store;
use registry::Descriptor;

/// Downloads and extracts layer `d` (once; later calls reuse it); returns the directory.
pub async fn extract_layer(store: &Store, d: &Descriptor, state: &Path) -> Result<PathBuf> {
    let hex = d.digest.strip_prefix("sha256:").context("layer digest is not sha256")?;
    let base = state.join("layers").join(hex);
    let fs_dir = base.join("fs");
    let done = base.join("done");
    if done.exists() {
        return Ok(fs_dir);
    }
    std::fs::create_dir_all(&base)?;
    let blob = base.join("blob");
    store.blob_to_file(&d.digest, &blob).await.with_context(|| format!("downloading layer {}", d.digest))?;
    let indexed = base.join("indexed.stargz");
    let (blob2, indexed2, fs2) = (blob.clone(), indexed.clone(), fs_dir.clone());
    tokio::task::spawn_blocking(move || -> Result<()> {
        let input = std::fs::File::open(&blob2)?;
        let out = std::fs::File::create(&indexed2)?;
        let opts = estargz::BuildOptions {
            level: Some(1),
            ..Default::default()
        };
        estargz::build(std::io::BufReader::new(input), std::io::BufWriter::new(out), &opts).context("indexing the layer tar")?;
        let reader = estargz::Reader::open(estargz::FileSource::open(&indexed2)?)?;
        if fs2.exists() {
            std::fs::remove_dir_all(&fs2)?;
        }
        // The re-indexing added a landmark file, which is not the layer's.
        let opts = unpack::ExtractOptions {
            overlay_whiteouts: true,
            skip_index_files: true,
            ..Default::default()
        };
        unpack::extract(&reader, &fs2, &opts)?;
        Ok(())
    })
    .await??;
    let _ = std::fs::remove_file(&blob);
    let _ = std::fs::remove_file(&indexed);
    std::fs::write(&done, b"")?;
    Ok(fs_dir)
}

/// Mounts a read-only overlayfs of `lowers` (bottom layer first) at `at`; `nosuid,nodev`
/// unless the image's privileges are to be honoured.
/// Returns the overlay's device number (its identity for a later unmount).
pub fn mount_overlay(lowers: &[PathBuf], at: &Path, privileges: lazyfs::Privileges) -> Result<u64> {
    std::fs::create_dir_all(at)?;
    // overlayfs lists the top layer first.
    let list: Vec<String> = lowers.iter().rev().map(|p| p.display().to_string()).collect();
    let data = format!("lowerdir={}", list.join(":"));
    let mut flags = nix::mount::MsFlags::MS_RDONLY;
    if privileges == lazyfs::Privileges::Ignore {
        flags |= nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV;
    }
    nix::mount::mount(Some("overlay"), at, Some("overlay"), flags, Some(data.as_str()))
        .with_context(|| format!("mounting overlayfs at {} ({} layers)", at.display(), lowers.len()))?;
    match std::fs::symlink_metadata(at) {
        Ok(m) => Ok(std::os::unix::fs::MetadataExt::dev(&m)),
        Err(e) => {
            let _ = lazyfs::detach(at);
            Err(e).with_context(|| format!("stat of the new overlay at {}", at.display()))
        }
    }
}
