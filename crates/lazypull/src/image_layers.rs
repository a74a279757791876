//! An image's layers as every caller that serves or warms them sees them: which are lazy and
//! how each index is checked (eStargz/zstd:chunked annotations, else a SOCI index looked up once
//! per image), and opening a lazy one over the node's chunk store.
//!
//! Why here: `lazypull mount` and `lazypull warm` must agree on exactly this (a layer warmed
//! must be the layer the daemons serve, keyed the same way in the store); the snapshotter makes
//! the same decision through the same `layer` and `soci_image` calls, except that it indexes
//! small layers a SOCI index leaves out itself (their daemons find that zTOC in the tails
//! cache, or build it again here: [`open_lazy`]).

use std::sync::Arc;
use std::time::Duration;

use store::{ChunkStore, FetchConfig, RangeSource, RegistryRangeSource};
use tracing::{info, warn};

/// One image's manifest and the SOCI lookup, done at most once.
pub struct ImageLayers<'a> {
    location: &'a convert::Store,
    manifest: &'a registry::Manifest,
    manifest_digest: &'a str,
    /// A SOCI index digest given by the user, used instead of discovery.
    soci_index: Option<&'a str>,
    soci: Option<Option<soci_image::Found>>,
}

impl<'a> ImageLayers<'a> {
    pub fn new(location: &'a convert::Store, manifest: &'a registry::Manifest, manifest_digest: &'a str, soci_index: Option<&'a str>) -> ImageLayers<'a> {
        ImageLayers { location, manifest, manifest_digest, soci_index, soci: None }
    }

    /// The one decision every caller shares (layer crate): lazy, and checked how, or why not.
    pub fn check(&mut self, rt: &tokio::runtime::Runtime, d: &registry::Descriptor) -> Result<layer::IndexCheck, layer::NotLazy> {
        let reason = match layer::detect(&d.media_type, &d.annotations) {
            Ok(found) => return Ok(found.check),
            Err(reason) => reason,
        };
        if !soci_image::indexable(&d.media_type) {
            return Err(reason);
        }
        let (location, manifest, digest, explicit) = (self.location, self.manifest, self.manifest_digest, self.soci_index);
        let found = self.soci.get_or_insert_with(|| match rt.block_on(soci_image::discover(location, digest, manifest, explicit)) {
            Ok(Some(f)) => {
                info!(manifest = %digest, index = %f.digest, via = f.via.as_str(), "using a SOCI index");
                Some(f)
            }
            Ok(None) => None,
            Err(e) => {
                warn!(manifest = %digest, error = %e, "cannot look for a SOCI index");
                None
            }
        });
        match found {
            None => Err(reason),
            Some(f) => match f.index.ztoc_for(&d.digest) {
                Some(z) => layer::IndexCheck::soci(&z.ztoc_digest, z.prefetch.as_ref().map(|p| p.digest.as_str())),
                None => Err(layer::NotLazy::NoZtoc { index: f.digest.clone() }),
            },
        }
    }
}

/// Where and how a lazy layer is opened.
pub struct OpenAt<'a> {
    pub rt: &'a tokio::runtime::Runtime,
    pub client: &'a registry::Client,
    pub reference: &'a registry::Reference,
    pub store: &'a Arc<ChunkStore>,
    pub fetch: FetchConfig,
    /// The state directory (its tails cache holds layer TOCs).
    pub state_dir: &'a std::path::Path,
    pub fetch_timeout: Duration,
}

/// Opens lazy layer `d` of the image at `location`, checked by `check`: its index (a zTOC from
/// the registry by digest, or the footer and TOC through the tails cache) and a fetcher over
/// the node's store.
pub fn open_lazy(at: &OpenAt, location: &convert::Store, d: &registry::Descriptor, check: layer::IndexCheck) -> Result<lazyfs::OpenedLayer, layer::NotLazy> {
    let source: Arc<dyn RangeSource> = Arc::new(RegistryRangeSource::new(
        at.client.clone(),
        at.reference.clone(),
        d.digest.clone(),
        d.size,
        at.rt.handle().clone(),
        at.fetch_timeout,
    ));
    let tails = store::TailCache::new(crate::mount::tails_dir(at.state_dir));
    match check {
        layer::IndexCheck::SociZtoc(ztoc, prefetch) => {
            let bytes = match side_blob(at, location, &tails, &ztoc, "zTOC") {
                Ok(b) => b,
                // A zTOC the snapshotter built for a small layer (none in the registry) and no
                // longer cached: build it again from the layer (deterministic; the digest decides).
                Err(e) if d.size <= snapshotter::remote::LOCAL_UNPACK_MAX => rebuild_ztoc(at, location, &tails, d, &ztoc).ok_or(e)?,
                Err(e) => return Err(e),
            };
            // A small layer the snapshotter indexed itself was kept whole: read it from disk
            // (every span is still checked against the zTOC's digests).
            let source = match tails.load_whole(&d.digest, d.size) {
                Some(blob) => Arc::new(store::TailSource::new(source, Some((0, blob)))) as Arc<dyn RangeSource>,
                None => source,
            };
            // A hint: a prefetch artifact that cannot be fetched costs the prefetch, not the layer.
            let prefetch = prefetch.and_then(|p| side_blob(at, location, &tails, &p, "prefetch artifact").map_err(|e| warn!(error = %e, "SOCI prefetch artifact not fetched")).ok());
            lazyfs::open_ztoc_layer(source, &bytes, prefetch.as_deref(), &check, at.store.clone(), at.fetch.clone()).map_err(|e| layer::NotLazy::IndexUnusable(format!("{e}")))
        }
        _ => lazyfs::open_layer_cached(source, Some(&check), at.store.clone(), at.fetch.clone(), &tails).map_err(|e| layer::NotLazy::IndexUnusable(format!("{e}"))),
    }
}

/// The zTOC `want` of small layer `d`, built from the whole blob (fetched digest-checked), if
/// that is what it builds to; kept in the tails cache with the blob, as the snapshotter keeps them.
fn rebuild_ztoc(at: &OpenAt, location: &convert::Store, tails: &store::TailCache, d: &registry::Descriptor, want: &estargz::Digest) -> Option<Vec<u8>> {
    let blob = at.rt.block_on(location.blob_bytes(&d.digest)).ok()?;
    let ztoc = soci::build_ztoc(&blob[..], &soci::BuildOptions::default()).ok()?.to_bytes();
    if estargz::Digest::of(&ztoc) != *want {
        return None;
    }
    info!(layer = %d.digest, ztoc = %want, "zTOC built again from the layer (it was built locally and is no longer cached)");
    let _ = tails.save(&d.digest, 0, &blob);
    let _ = tails.save(&want.to_string(), 0, &ztoc);
    Some(ztoc)
}

/// A blob a SOCI layer needs from beside the image (`what`: its zTOC or prefetch artifact),
/// from the tails cache or else from the image's location, then cached there.
fn side_blob(at: &OpenAt, location: &convert::Store, tails: &store::TailCache, digest: &estargz::Digest, what: &str) -> Result<Vec<u8>, layer::NotLazy> {
    if let Some(b) = cached_side_blob(tails, digest, what) {
        return Ok(b);
    }
    let b = at.rt.block_on(location.blob_bytes(&digest.to_string())).map_err(|e| layer::NotLazy::Registry(format!("fetching {what} {digest}: {e}")))?.to_vec();
    if let Err(e) = tails.save(&digest.to_string(), 0, &b) {
        tracing::warn!(%digest, error = %e, "{what} not cached (a remount will fetch it again)");
    }
    Ok(b)
}

/// A zTOC or prefetch artifact from the tails cache (kept under its own digest next to the
/// eStargz TOCs, so a remount after a restart, or on a node started from a baked volume, needs
/// no registry), if its bytes still hash to `digest`; a damaged entry is dropped.
fn cached_side_blob(tails: &store::TailCache, digest: &estargz::Digest, what: &str) -> Option<Vec<u8>> {
    let (_, bytes) = tails.load(&digest.to_string())?;
    if estargz::Digest::of(&bytes) == *digest {
        return Some(bytes);
    }
    tracing::warn!(%digest, "cached {what} does not match its digest; fetching it again");
    tails.remove(&digest.to_string());
    None
}
