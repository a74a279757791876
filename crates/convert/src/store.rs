//! Where images come from and go to: a registry repository or an OCI image layout directory
//! (`oci:DIR[:TAG]`). Both expose the same few operations conversion needs; blobs always pass
//! through files, never whole in memory.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use registry::manifest::ManifestKind;
use registry::{Client, Reference};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An image location.
#[derive(Clone)]
pub enum Store {
    Registry { client: Client, reference: Reference },
    Layout { dir: PathBuf, tag: String },
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Registry { reference, .. } => write!(f, "{reference}"),
            Store::Layout { dir, tag } => write!(f, "oci:{}:{tag}", dir.display()),
        }
    }
}

/// Parses `oci:DIR[:TAG]` or a registry reference.
pub fn parse_location(s: &str, client: &Client) -> Result<Store> {
    if let Some(rest) = s.strip_prefix("oci:") {
        // The tag is after the last ':' only if what follows has no '/'.
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((d, t)) if !t.contains('/') && !t.is_empty() => (d, t),
            _ => (rest, "latest"),
        };
        return Ok(Store::Layout {
            dir: PathBuf::from(dir),
            tag: tag.to_string(),
        });
    }
    Ok(Store::Registry {
        client: client.clone(),
        reference: Reference::parse(s)?,
    })
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| Error::Invalid(format!("unsupported digest {digest:?}")))?;
    Ok(dir.join("blobs").join("sha256").join(hex))
}

fn io(ctx: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let ctx = ctx.into();
    move |source| Error::Io { context: ctx, source }
}

impl Store {
    /// The top-level manifest or index: bytes, parsed form, digest.
    pub async fn root(&self) -> Result<(Bytes, ManifestKind, String)> {
        match self {
            Store::Registry { client, reference } => {
                let m = client.get_manifest(reference).await?;
                Ok((m.bytes, m.manifest, m.digest))
            }
            Store::Layout { dir, tag } => {
                let index = read_layout_index(dir).await?;
                let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
                let desc = manifests
                    .iter()
                    .find(|d| d["annotations"][REF_NAME].as_str() == Some(tag))
                    .or_else(|| (manifests.len() == 1 && tag == "latest").then(|| &manifests[0]))
                    .ok_or_else(|| Error::Invalid(format!("no image tagged {tag:?} in {}/index.json", dir.display())))?;
                let digest = desc["digest"].as_str().ok_or_else(|| Error::Invalid("index.json entry without digest".into()))?.to_string();
                let bytes = self.blob_bytes(&digest).await?;
                let mt = desc["mediaType"].as_str();
                let kind = ManifestKind::parse(&bytes, mt, &format!("{self}"))?;
                Ok((bytes, kind, digest))
            }
        }
    }

    /// A child manifest (of an index) by digest.
    pub async fn manifest(&self, digest: &str) -> Result<(Bytes, ManifestKind)> {
        match self {
            Store::Registry { client, reference } => {
                let m = client.get_manifest(&reference.with_digest(digest)).await?;
                Ok((m.bytes, m.manifest))
            }
            Store::Layout { .. } => {
                let bytes = self.blob_bytes(digest).await?;
                let kind = ManifestKind::parse(&bytes, None, digest)?;
                Ok((bytes, kind))
            }
        }
    }

    /// A small blob (config), verified.
    pub async fn blob_bytes(&self, digest: &str) -> Result<Bytes> {
        match self {
            Store::Registry { client, reference } => Ok(client.get_blob_bytes(reference, digest, 64 << 20).await?),
            Store::Layout { dir, .. } => {
                let p = blob_path(dir, digest)?;
                let b = tokio::fs::read(&p).await.map_err(io(format!("reading {}", p.display())))?;
                let actual = format!("sha256:{}", hex::encode(Sha256::digest(&b)));
                if actual != digest {
                    return Err(Error::Invalid(format!("blob {} has digest {actual}, expected {digest}", p.display())));
                }
                Ok(Bytes::from(b))
            }
        }
    }

    /// Copies a blob into `path`, verified.
    pub async fn blob_to_file(&self, digest: &str, path: &Path) -> Result<u64> {
        let mut f = tokio::fs::File::create(path).await.map_err(io(format!("creating {}", path.display())))?;
        match self {
            Store::Registry { client, reference } => Ok(client.get_blob_to(reference, digest, &mut f, None).await?),
            Store::Layout { dir, .. } => {
                let src = blob_path(dir, digest)?;
                let mut inp = tokio::fs::File::open(&src).await.map_err(io(format!("opening {}", src.display())))?;
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0u64;
                loop {
                    let k = tokio::io::AsyncReadExt::read(&mut inp, &mut buf).await.map_err(io(format!("reading {}", src.display())))?;
                    if k == 0 {
                        break;
                    }
                    hasher.update(&buf[..k]);
                    f.write_all(&buf[..k]).await.map_err(io(format!("writing {}", path.display())))?;
                    n += k as u64;
                }
                f.flush().await.map_err(io(format!("writing {}", path.display())))?;
                let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
                if actual != digest {
                    return Err(Error::Invalid(format!("blob {} has digest {actual}, expected {digest}", src.display())));
                }
                Ok(n)
            }
        }
    }

    /// Stores the blob in `path` (digest and size known), mounting from `from` when possible.
    pub async fn put_blob_file(&self, digest: &str, size: u64, path: &Path, from: Option<&Store>) -> Result<()> {
        match self {
            Store::Registry { client, reference } => {
                let mount = match from {
                    Some(Store::Registry { reference: src, .. }) if src.registry == reference.registry => Some(src.repository.as_str()),
                    _ => None,
                };
                client.push_blob_file(reference, digest, size, path, mount).await?;
                Ok(())
            }
            Store::Layout { dir, .. } => {
                let dst = blob_path(dir, digest)?;
                if tokio::fs::metadata(&dst).await.is_ok_and(|m| m.len() == size) {
                    return Ok(());
                }
                let parent = dst.parent().expect("blob path has a parent");
                tokio::fs::create_dir_all(parent).await.map_err(io(format!("creating {}", parent.display())))?;
                let tmp = dst.with_extension("tmp");
                tokio::fs::copy(path, &tmp).await.map_err(io(format!("copying into {}", tmp.display())))?;
                tokio::fs::rename(&tmp, &dst).await.map_err(io(format!("renaming {}", tmp.display())))?;
                Ok(())
            }
        }
    }

    /// Stores a small blob from memory.
    pub async fn put_blob_bytes(&self, bytes: &Bytes, from: Option<&Store>) -> Result<String> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let tmp = tempfile::NamedTempFile::new().map_err(io("creating a temporary file"))?;
        tokio::fs::write(tmp.path(), bytes).await.map_err(io("writing a temporary file"))?;
        self.put_blob_file(&digest, bytes.len() as u64, tmp.path(), from).await?;
        Ok(digest)
    }

    /// Stores a manifest; `tag` names it (for the top level), else it is stored by digest.
    pub async fn put_manifest(&self, bytes: Bytes, media_type: &str, tag: bool) -> Result<String> {
        match self {
            Store::Registry { client, reference } => {
                let target = if tag { reference.clone() } else { Reference { tag: None, ..reference.clone() } };
                Ok(client.put_manifest(&target, bytes, media_type).await?)
            }
            Store::Layout { dir, tag: name } => {
                let digest = self.put_blob_bytes(&bytes, None).await?;
                if tag {
                    let mut index = read_layout_index(dir).await.unwrap_or_else(|_| serde_json::json!({"schemaVersion": 2, "manifests": []}));
                    let list = index["manifests"].as_array_mut().ok_or_else(|| Error::Invalid("index.json has no manifests array".into()))?;
                    list.retain(|d| d["annotations"][REF_NAME].as_str() != Some(name));
                    list.push(serde_json::json!({
                        "mediaType": media_type, "digest": digest, "size": bytes.len(),
                        "annotations": {REF_NAME: name}
                    }));
                    write_json(&dir.join("index.json"), &index).await?;
                    write_json(&dir.join("oci-layout"), &serde_json::json!({"imageLayoutVersion": "1.0.0"})).await?;
                }
                Ok(digest)
            }
        }
    }
}

async fn read_layout_index(dir: &Path) -> Result<Value> {
    let p = dir.join("index.json");
    let b = tokio::fs::read(&p).await.map_err(io(format!("reading {}", p.display())))?;
    serde_json::from_slice(&b).map_err(|e| Error::Invalid(format!("{} is not JSON: {e}", p.display())))
}

async fn write_json(path: &Path, v: &Value) -> Result<()> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(io(format!("creating {}", parent.display())))?;
    }
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, serde_json::to_vec_pretty(v).expect("JSON")).await.map_err(io(format!("writing {}", tmp.display())))?;
    tokio::fs::rename(&tmp, path).await.map_err(io(format!("renaming {}", tmp.display())))
}
