//! Where compressed blob bytes come from.
//!
//! The fetcher asks for byte ranges of one blob through [`RangeSource`]; it does not know whether
//! they come from a local file (tests, `layer mount` of a file) or a registry. The registry
//! adapter lives here rather than in the registry crate because it is the seam between the
//! async client and the synchronous FUSE worker threads: each call blocks its (non-runtime)
//! thread on the shared tokio runtime, under an overall deadline so a dead registry turns into
//! an error instead of a hung `read(2)`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use registry::{Client, Reference};

use crate::error::{Error, Result};

/// Positional multi-range reads of one blob.
pub trait RangeSource: Send + Sync {
    /// Name used in errors and logs (the blob digest).
    fn name(&self) -> &str;
    /// Blob size in bytes.
    fn size(&self) -> u64;
    /// Returns the bytes of each `(offset, len)` range exactly, in order.
    fn read_ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<Vec<u8>>>;
}

/// A blob in a local file.
pub struct FileRangeSource {
    name: String,
    file: File,
    size: u64,
}

impl FileRangeSource {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, "opening blob", e))?;
        let size = file.metadata().map_err(|e| Error::io(path, "stat blob", e))?.len();
        Ok(FileRangeSource {
            name: path.display().to_string(),
            file,
            size,
        })
    }
}

impl RangeSource for FileRangeSource {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<Vec<u8>>> {
        ranges
            .iter()
            .map(|&(offset, len)| {
                let mut buf = vec![0u8; len as usize];
                self.file.read_exact_at(&mut buf, offset).map_err(|e| Error::Fetch {
                    blob: self.name.clone(),
                    offset,
                    end: offset + len,
                    reason: e.to_string(),
                })?;
                Ok(buf)
            })
            .collect()
    }
}

/// A blob in a registry, read with HTTP Range requests.
pub struct RegistryRangeSource {
    client: Client,
    reference: Reference,
    digest: String,
    size: u64,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl RegistryRangeSource {
    /// `timeout` bounds each call, retries included.
    pub fn new(client: Client, reference: Reference, digest: String, size: u64, runtime: tokio::runtime::Handle, timeout: Duration) -> Self {
        RegistryRangeSource {
            client,
            reference,
            digest,
            size,
            runtime,
            timeout,
        }
    }
}

impl RangeSource for RegistryRangeSource {
    fn name(&self) -> &str {
        &self.digest
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<Vec<u8>>> {
        let (first, last) = match (ranges.first(), ranges.last()) {
            (Some(f), Some(l)) => (f.0, l.0 + l.1),
            _ => return Ok(Vec::new()),
        };
        let fut = self.client.read_ranges(&self.reference, &self.digest, ranges);
        let res = self.runtime.block_on(async { tokio::time::timeout(self.timeout, fut).await });
        match res {
            Err(_) => Err(Error::Timeout {
                blob: self.digest.clone(),
                offset: first,
                end: last,
                secs: self.timeout.as_secs_f64(),
            }),
            Ok(Err(e)) => Err(Error::Fetch {
                blob: self.digest.clone(),
                offset: first,
                end: last,
                reason: e.to_string(),
            }),
            Ok(Ok(parts)) => Ok(parts.into_iter().map(|b| b.to_vec()).collect()),
        }
    }
}

/// Adapts a [`RangeSource`] to the format reader's [`index::BlobSource`], for reading the
/// footer and TOC through the same path (and counters) as chunks.
pub struct BlobSourceAdapter(pub std::sync::Arc<dyn RangeSource>);

impl index::BlobSource for BlobSourceAdapter {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut parts = self.0.read_ranges(&[(offset, buf.len() as u64)]).map_err(std::io::Error::other)?;
        let part = parts.pop().unwrap_or_default();
        if part.len() != buf.len() {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short range read"));
        }
        buf.copy_from_slice(&part);
        Ok(())
    }
}
