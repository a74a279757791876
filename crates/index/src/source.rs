//! Positional reads of a blob: the only I/O a format's opener sees.
//!
//! The registry client, the tails cache and tests each provide one; a format reads its footer
//! and index through it without knowing whether the bytes come over HTTP or from memory.

/// Positional reads of a blob.
pub trait BlobSource: Send + Sync {
    /// Total blob size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; short reads are errors.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

impl BlobSource for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|&s| s <= self.len());
        match start.and_then(|s| self.get(s..s.checked_add(buf.len())?)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end of the blob")),
        }
    }
}

impl<T: BlobSource + ?Sized> BlobSource for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        (**self).read_at(offset, buf)
    }
}

impl<T: BlobSource + ?Sized> BlobSource for &T {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        (**self).read_at(offset, buf)
    }
}
