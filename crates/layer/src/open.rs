//! Opening a lazy layer's index into the format-neutral model.
//!
//! Each lazy format is one implementation of [`LazyFormat`] (ripgrep's `Matcher` with sibling
//! implementations is the model): it reads what it needs through a [`BlobSource`] (the blob's
//! tail for eStargz; SOCI will be handed its zTOC, fetched from the registry by digest),
//! authenticates it against the layer's [`IndexCheck`], and returns a [`LayerIndex`]. The store,
//! the mount and the snapshotter call [`open`] and never see a format type, so a new format is
//! a new implementation here and a variant of [`IndexCheck`] — no edit in store, fs or
//! snapshotter.

use index::{BlobSource, Digest, IndexError, LayerIndex};

use crate::{Format, IndexCheck};

/// Knobs of [`open`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Bytes read from the end of the blob in the first read (footer, and the index of layers
    /// with few files, in one round trip).
    pub tail_size: u64,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { tail_size: 64 << 10 }
    }
}

/// A layer's index, opened and (when a check was given) authenticated.
#[derive(Debug)]
pub struct OpenedIndex {
    pub format: Format,
    pub index: LayerIndex,
    /// sha256 of the index as the format defines it (eStargz: the uncompressed TOC JSON).
    pub index_digest: Digest,
    /// Blob offset where the format's index starts: opening read only bytes from here to the
    /// end (what a tails cache keeps to reopen the layer without the network).
    pub index_offset: u64,
    /// Why a prefetch hint given with the index was not used (the layer opens without it).
    pub prefetch_ignored: Option<String>,
}

/// Why a layer's index could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The blob's footer or TOC is unreadable or malformed.
    #[error("{0}")]
    Stargz(#[from] estargz::Error),
    /// The index does not match the digest the layer's descriptor names.
    #[error("{0}")]
    Check(String),
    /// The index breaks the layer model's invariants.
    #[error("{0}")]
    Model(#[from] IndexError),
    /// The SOCI zTOC is unreadable or does not make a layer model.
    #[error("{0}")]
    Soci(String),
}

/// One lazy format: how its index is opened into a [`LayerIndex`].
pub trait LazyFormat: Send + Sync {
    /// Reads and authenticates the index of the blob behind `source`.
    fn open(&self, source: &dyn BlobSource, check: Option<&IndexCheck>, opts: &OpenOptions) -> Result<OpenedIndex, OpenError>;
}

/// eStargz and zstd:chunked: footer + TOC at the end of the blob (one reader handles both; the
/// footer says which codec).
pub struct Stargz;

impl LazyFormat for Stargz {
    fn open(&self, source: &dyn BlobSource, check: Option<&IndexCheck>, opts: &OpenOptions) -> Result<OpenedIndex, OpenError> {
        let reader = estargz::Reader::open_with(source, &stargz_options(opts))?;
        if let Some(check) = check {
            check.verify(&reader.toc_digest(), &reader.compressed_toc_digest()).map_err(OpenError::Check)?;
        }
        let format = match reader.compression() {
            estargz::Compression::Gzip => Format::Estargz,
            estargz::Compression::Zstd => Format::ZstdChunked,
        };
        Ok(OpenedIndex {
            format,
            index: estargz::layer_model::layer_index(reader.tree(), reader.compression())?,
            index_digest: reader.toc_digest(),
            index_offset: reader.footer().toc_offset,
            prefetch_ignored: None,
        })
    }
}

/// The eStargz reader's options for ours.
fn stargz_options(opts: &OpenOptions) -> estargz::OpenOptions {
    estargz::OpenOptions {
        tail_size: opts.tail_size,
        ..estargz::OpenOptions::default()
    }
}

/// The format whose index `check` authenticates (eStargz's reader when nothing is checked).
pub fn format_for(check: Option<&IndexCheck>) -> &'static dyn LazyFormat {
    match check {
        None | Some(IndexCheck::TocDigest(_)) | Some(IndexCheck::ZstdManifestChecksum(_)) => &Stargz,
        Some(IndexCheck::SociZtoc(..)) => &SociNeedsZtoc,
    }
}

/// SOCI through [`open`]: its index is not in the blob, so it must be opened with
/// [`open_ztoc`] and the zTOC fetched by the caller; this says so instead of misreading.
struct SociNeedsZtoc;

impl LazyFormat for SociNeedsZtoc {
    fn open(&self, _: &dyn BlobSource, _: Option<&IndexCheck>, _: &OpenOptions) -> Result<OpenedIndex, OpenError> {
        Err(OpenError::Soci("a SOCI layer's zTOC lives beside the image: open it with open_ztoc".into()))
    }
}

/// Opens a SOCI layer from its zTOC blob (fetched from the registry by the digest its SOCI
/// index gives), checked against `check` ([`IndexCheck::SociZtoc`]) before it is parsed.
///
/// `prefetch` is the layer's prefetch artifact when the check names one and the caller could
/// fetch it. It is a hint, as upstream treats it: one that does not match its digest, does not
/// parse or names spans the zTOC does not have is left out with the reason in
/// [`OpenedIndex::prefetch_ignored`], and the layer opens without it (every span is verified
/// when read, so a hint can cost bandwidth, never correctness).
pub fn open_ztoc(ztoc: &[u8], check: &IndexCheck, prefetch: Option<&[u8]>) -> Result<OpenedIndex, OpenError> {
    let actual = Digest::of(ztoc);
    let want_prefetch = match check {
        IndexCheck::SociZtoc(want, p) if *want == actual => *p,
        IndexCheck::SociZtoc(want, _) => return Err(OpenError::Check(format!("zTOC digest mismatch: the SOCI index says {want}, the blob has {actual}"))),
        other => return Err(OpenError::Check(format!("a zTOC is checked by its digest, not by {other}"))),
    };
    let parsed = soci::Ztoc::from_bytes(ztoc).map_err(|e| OpenError::Soci(e.to_string()))?;
    let mut index = soci::layer_model::layer_index(&parsed).map_err(|e| OpenError::Soci(e.to_string()))?;
    let prefetch_ignored = match (want_prefetch, prefetch) {
        (None, _) => None,
        (Some(want), None) => Some(format!("prefetch artifact {want} not available")),
        (Some(want), Some(bytes)) => match soci_prefetch(bytes, &want, &parsed) {
            Ok(ranges) => {
                index.set_prefetch(index::Prefetch::Ranges(ranges.into()));
                None
            }
            Err(why) => Some(format!("prefetch artifact {want}: {why}")),
        },
    };
    Ok(OpenedIndex { format: Format::Soci, index, index_digest: actual, index_offset: parsed.compressed_size, prefetch_ignored })
}

/// The blob ranges a prefetch artifact names, once it is authenticated and fits the zTOC.
fn soci_prefetch(bytes: &[u8], want: &Digest, ztoc: &soci::Ztoc) -> Result<Vec<std::ops::Range<u64>>, String> {
    let actual = Digest::of(bytes);
    if actual != *want {
        return Err(format!("digest mismatch: the blob has {actual}"));
    }
    let artifact = soci::PrefetchArtifact::parse(bytes).map_err(|e| e.to_string())?;
    artifact.check(ztoc).map_err(|e| e.to_string())?;
    Ok(artifact.blob_ranges(ztoc))
}

/// Reads and authenticates the index of the layer behind `source` without parsing it; returns
/// the blob offset where the index starts (what [`open`] would read from). For reading an index
/// ahead of the layer's mount: the mount parses it, so parsing it here too would only compete
/// for the CPU with the mounts on the critical path. Formats whose index is not in the blob
/// (SOCI) have nothing to read ahead here.
pub fn fetch_index(source: &dyn BlobSource, check: Option<&IndexCheck>, opts: &OpenOptions) -> Result<u64, OpenError> {
    if matches!(check, Some(IndexCheck::SociZtoc(..))) {
        return Err(OpenError::Soci("a SOCI layer's zTOC lives beside the image, not in the blob".into()));
    }
    let raw = estargz::RawToc::read(source, &stargz_options(opts))?;
    if let Some(check) = check {
        check.verify(&raw.toc_digest(), &raw.compressed_toc_digest()).map_err(OpenError::Check)?;
    }
    Ok(raw.footer.toc_offset)
}

/// Opens the index of the layer behind `source` with the format its `check` names.
pub fn open(source: &dyn BlobSource, check: Option<&IndexCheck>, opts: &OpenOptions) -> Result<OpenedIndex, OpenError> {
    format_for(check).open(source, check, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(zstd: bool) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(5);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, "etc/hello", &b"hello"[..]).unwrap();
        let mut opts = estargz::BuildOptions::default();
        if zstd {
            opts.compression = estargz::Compression::Zstd;
        }
        let mut out = Vec::new();
        estargz::build(std::io::Cursor::new(tar.into_inner().unwrap()), &mut out, &opts).unwrap();
        out
    }

    #[test]
    fn both_stargz_codecs_open_into_the_model_and_are_checked() {
        for zstd in [false, true] {
            let b = blob(zstd);
            let opened = open(&b, None, &OpenOptions::default()).unwrap();
            assert_eq!(opened.format, if zstd { Format::ZstdChunked } else { Format::Estargz });
            let ino = opened.index.resolve("etc/hello").unwrap();
            assert_eq!(opened.index.get(ino).unwrap().size, 5);
            let right = IndexCheck::TocDigest(opened.index_digest);
            assert!(open(&b, Some(&right), &OpenOptions::default()).is_ok());
            let wrong = IndexCheck::TocDigest(Digest::of(b"other"));
            assert!(matches!(open(&b, Some(&wrong), &OpenOptions::default()), Err(OpenError::Check(m)) if m.contains("mismatch")));
        }
    }

    #[test]
    fn a_ztoc_opens_only_with_its_digest_and_through_open_ztoc() {
        let (tar_bytes, ztoc) = {
            let mut tar = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(5);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            tar.append_data(&mut h, "etc/hello", &b"hello"[..]).unwrap();
            let bytes = tar.into_inner().unwrap();
            let z = soci::build_ztoc(&bytes[..], &soci::BuildOptions::default()).unwrap();
            (bytes, z.to_bytes())
        };
        let right = IndexCheck::SociZtoc(Digest::of(&ztoc), None);
        let opened = open_ztoc(&ztoc, &right, None).unwrap();
        assert_eq!(opened.format, Format::Soci);
        assert_eq!(opened.index.get(opened.index.resolve("etc/hello").unwrap()).unwrap().size, 5);
        // A zTOC whose digest does not match the SOCI index: refused, the layer falls back.
        let wrong = IndexCheck::SociZtoc(Digest::of(b"other"), None);
        assert!(matches!(open_ztoc(&ztoc, &wrong, None), Err(OpenError::Check(m)) if m.contains("zTOC digest mismatch")));
        // A SOCI check through the blob-reading entry point names the right one.
        assert!(matches!(open(&tar_bytes, Some(&right), &OpenOptions::default()), Err(OpenError::Soci(m)) if m.contains("open_ztoc")));
        // A garbage zTOC with a matching digest: a parse error, not a panic.
        let junk = b"not a ztoc".to_vec();
        assert!(matches!(open_ztoc(&junk, &IndexCheck::SociZtoc(Digest::of(&junk), None), None), Err(OpenError::Soci(_))));
    }

    #[test]
    fn a_prefetch_artifact_becomes_blob_ranges_or_is_ignored_with_a_reason() {
        let mut tar = tar::Builder::new(Vec::new());
        for i in 0..8u8 {
            let data = vec![i; 100_000];
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            tar.append_data(&mut h, format!("f{i}"), &data[..]).unwrap();
        }
        let bytes = tar.into_inner().unwrap();
        let z = soci::build_ztoc(&bytes[..], &soci::BuildOptions { span_size: 128 << 10, ..Default::default() }).unwrap();
        assert!(z.spans.span_count() >= 4, "{} spans", z.spans.span_count());
        let ztoc = z.to_bytes();
        let artifact = soci::PrefetchArtifact::from_ranges([(1, 2)]).unwrap().to_bytes();
        let check = IndexCheck::SociZtoc(Digest::of(&ztoc), Some(Digest::of(&artifact)));
        let opened = open_ztoc(&ztoc, &check, Some(&artifact)).unwrap();
        assert_eq!(opened.prefetch_ignored, None);
        let index::Prefetch::Ranges(r) = opened.index.prefetch() else { panic!("{:?}", opened.index.prefetch()) };
        let (start, _) = z.spans.compressed_range(1, z.compressed_size);
        let (_, end) = z.spans.compressed_range(2, z.compressed_size);
        assert_eq!(&r[..], &[start..end]);
        // Damaged, missing or lying hints: the layer still opens, without prefetch, saying why.
        let beyond = soci::PrefetchArtifact::from_ranges([(0, 999)]).unwrap().to_bytes();
        let cases: [(&[u8], Digest, &str); 3] =
            [(b"{}", Digest::of(&artifact), "digest mismatch"), (&beyond, Digest::of(&beyond), "beyond"), (b"[1]", Digest::of(b"[1]"), "JSON")];
        for (blob, digest, why) in cases {
            let opened = open_ztoc(&ztoc, &IndexCheck::SociZtoc(Digest::of(&ztoc), Some(digest)), Some(blob)).unwrap();
            assert!(opened.prefetch_ignored.as_deref().is_some_and(|m| m.contains(why)), "{:?}", opened.prefetch_ignored);
            assert_eq!(opened.index.prefetch(), &index::Prefetch::Unspecified);
        }
        let opened = open_ztoc(&ztoc, &check, None).unwrap();
        assert!(opened.prefetch_ignored.unwrap().contains("not available"));
    }

    #[test]
    fn an_index_read_ahead_is_authenticated_without_being_parsed() {
        for zstd in [false, true] {
            let b = blob(zstd);
            let opened = open(&b, None, &OpenOptions::default()).unwrap();
            let right = IndexCheck::TocDigest(opened.index_digest);
            assert_eq!(fetch_index(&b, Some(&right), &OpenOptions::default()).unwrap(), opened.index_offset);
            let wrong = IndexCheck::TocDigest(Digest::of(b"other"));
            assert!(matches!(fetch_index(&b, Some(&wrong), &OpenOptions::default()), Err(OpenError::Check(m)) if m.contains("mismatch")));
            assert!(matches!(fetch_index(&b, Some(&IndexCheck::SociZtoc(Digest::of(b"z"), None)), &OpenOptions::default()), Err(OpenError::Soci(_))));
        }
        assert!(matches!(fetch_index(&vec![0u8; 100], None, &OpenOptions::default()), Err(OpenError::Stargz(_))));
    }

    #[test]
    fn a_blob_that_is_not_stargz_is_a_format_error() {
        assert!(matches!(open(&vec![0u8; 100], None, &OpenOptions::default()), Err(OpenError::Stargz(_))));
    }
}
