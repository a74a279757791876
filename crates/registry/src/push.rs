//! Writing to a registry: blob existence checks, cross-repository mounts, monolithic and
//! chunked uploads, manifest and index PUTs, and the referrers API with its tag-schema fallback.
//!
//! Uploads read the blob from a file in pieces (never a whole layer in memory); each piece is
//! its own request, so a failed piece is retried alone.

use std::path::Path;

use bytes::Bytes;
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};
use tokio::io::AsyncReadExt;

use crate::blobs::sha256_digest;
use crate::client::{header_str, Client, Endpoint};
use crate::error::{Error, Result};
use crate::manifest::{Index, ManifestKind, OCI_INDEX};
use crate::reference::Reference;

/// Blobs up to this size go up in one PUT; larger ones in PATCH pieces of this size.
pub const UPLOAD_PIECE: u64 = 16 << 20;

/// How a blob reached the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    AlreadyThere,
    Mounted,
    Uploaded,
}

impl Client {
    /// Whether the repository already has the blob.
    pub async fn blob_exists(&self, r: &Reference, digest: &str) -> Result<bool> {
        let ep = self.push_endpoint(r);
        let req = self.request(&ep, Method::HEAD, &format!("/{}/blobs/{digest}", r.repository), &r.repository, "pull,push");
        let sent = self.send(&req).await?;
        match sent.response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.status_error(&req, sent, &format!("blob {digest}")).await),
        }
    }

    fn absolute(&self, ep: &Endpoint, base_url: &str, loc: &str) -> Result<String> {
        let base = url::Url::parse(base_url).map_err(|e| Error::Config(format!("bad URL {base_url}: {e}")))?;
        let u = base.join(loc).map_err(|e| Error::BadResponse {
            url: ep.base.clone(),
            reason: format!("bad upload Location {loc:?}: {e}"),
        })?;
        Ok(u.to_string())
    }

    /// Pushes the blob in `path` (with known digest and size), unless the repository has it;
    /// tries a cross-repository mount from `mount_from` first.
    pub async fn push_blob_file(&self, r: &Reference, digest: &str, size: u64, path: &Path, mount_from: Option<&str>) -> Result<Pushed> {
        if self.blob_exists(r, digest).await? {
            return Ok(Pushed::AlreadyThere);
        }
        let ep = self.push_endpoint(r);
        let mut scope_actions = "pull,push".to_string();
        let mut start_path = format!("/{}/blobs/uploads/", r.repository);
        if let Some(from) = mount_from.filter(|f| *f != r.repository) {
            start_path.push_str(&format!("?mount={digest}&from={from}"));
            scope_actions = format!("pull,push repository:{from}:pull");
        }
        let mut req = self.request(&ep, Method::POST, &start_path, &r.repository, &scope_actions);
        req.headers.push((CONTENT_LENGTH, HeaderValue::from_static("0")));
        req.body = Some(Bytes::new());
        let sent = self.send(&req).await?;
        let status = sent.response.status();
        if status == StatusCode::CREATED && mount_from.is_some() {
            return Ok(Pushed::Mounted);
        }
        if status != StatusCode::ACCEPTED {
            return Err(self.status_error(&req, sent, "blob upload").await);
        }
        let loc = header_str(sent.response.headers(), LOCATION.as_str()).ok_or_else(|| Error::BadResponse {
            url: sent.final_url.clone(),
            reason: "upload started without a Location".into(),
        })?;
        let mut upload_url = self.absolute(&ep, &sent.final_url, loc)?;

        let mut file = tokio::fs::File::open(path).await.map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        if size <= UPLOAD_PIECE {
            let mut buf = Vec::with_capacity(size as usize);
            file.read_to_end(&mut buf).await.map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            check_len(&buf, size, path)?;
            let url = with_digest(&upload_url, digest);
            self.upload_request(r, &ep, Method::PUT, &url, Bytes::from(buf), None).await?;
            return Ok(Pushed::Uploaded);
        }
        let mut sent_bytes = 0u64;
        while sent_bytes < size {
            let n = UPLOAD_PIECE.min(size - sent_bytes);
            let mut buf = vec![0u8; n as usize];
            file.read_exact(&mut buf).await.map_err(|e| Error::io(format!("reading {} at {sent_bytes}", path.display()), e))?;
            let range = format!("{}-{}", sent_bytes, sent_bytes + n - 1);
            upload_url = self.upload_request(r, &ep, Method::PATCH, &upload_url, Bytes::from(buf), Some(range)).await?;
            sent_bytes += n;
        }
        let url = with_digest(&upload_url, digest);
        self.upload_request(r, &ep, Method::PUT, &url, Bytes::new(), None).await?;
        Ok(Pushed::Uploaded)
    }

    /// One upload request; returns the next upload URL (from `Location`).
    async fn upload_request(&self, r: &Reference, ep: &Endpoint, method: Method, url: &str, body: Bytes, range: Option<String>) -> Result<String> {
        let mut req = self.request(ep, method, "", &r.repository, "pull,push");
        req.url = url.to_string();
        req.headers.push((CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")));
        req.headers.push((CONTENT_LENGTH, HeaderValue::from_str(&body.len().to_string()).expect("digits")));
        if let Some(r) = range {
            req.headers.push((CONTENT_RANGE, HeaderValue::from_str(&r).expect("ascii")));
        }
        req.body = Some(body);
        req.follow_redirects = false;
        req.timeout = Some(std::time::Duration::from_secs(self.config.fetch_timeout_secs.max(1)));
        let sent = self.send(&req).await?;
        if !sent.response.status().is_success() {
            return Err(self.status_error(&req, sent, "blob upload").await);
        }
        match header_str(sent.response.headers(), LOCATION.as_str()) {
            Some(loc) => self.absolute(ep, &sent.final_url, loc),
            None => Ok(url.to_string()),
        }
    }

    /// PUTs a manifest or index under `r`'s tag (or digest); returns its digest.
    pub async fn put_manifest(&self, r: &Reference, bytes: Bytes, media_type: &str) -> Result<String> {
        let digest = sha256_digest(&bytes);
        let ep = self.push_endpoint(r);
        let target = r.tag.clone().unwrap_or_else(|| digest.clone());
        let mut req = self.request(&ep, Method::PUT, &format!("/{}/manifests/{target}", r.repository), &r.repository, "pull,push");
        req.headers.push((CONTENT_TYPE, HeaderValue::from_str(media_type).map_err(|_| Error::Config(format!("bad media type {media_type}")))?));
        req.body = Some(bytes);
        let sent = self.send(&req).await?;
        if !sent.response.status().is_success() {
            return Err(self.status_error(&req, sent, &format!("manifest {r}")).await);
        }
        if let Some(d) = header_str(sent.response.headers(), "docker-content-digest") {
            if d != digest {
                return Err(Error::DigestMismatch { what: format!("pushed manifest {r}"), expected: digest, actual: d.into() });
            }
        }
        Ok(digest)
    }

    /// The referrers of `digest` (artifacts whose `subject` is it), optionally filtered by
    /// artifact type: the referrers API, or the `sha256-<hex>` tag index where it is missing.
    pub async fn referrers(&self, r: &Reference, digest: &str, artifact_type: Option<&str>) -> Result<Index> {
        let ep = self.pull_endpoints(r).pop().expect("registry endpoint");
        let mut path = format!("/{}/referrers/{digest}", r.repository);
        if let Some(t) = artifact_type {
            // Fix: the value is percent-encoded. Artifact types are media types, which often
            // contain `+` (`…+json`); sent raw, a server decodes that `+` as a space and filters
            // every referrer out.
            let t: String = url::form_urlencoded::byte_serialize(t.as_bytes()).collect();
            path.push_str(&format!("?artifactType={t}"));
        }
        let mut req = self.request(&ep, Method::GET, &path, &r.repository, "pull");
        req.headers.push((ACCEPT, HeaderValue::from_static(OCI_INDEX)));
        let sent = self.send(&req).await?;
        let st = sent.response.status();
        let mut index = if st.is_success() && header_str(sent.response.headers(), "content-type").is_some_and(|c| c.starts_with(OCI_INDEX)) {
            let url = sent.final_url.clone();
            let body = sent.response.bytes().await.map_err(|e| Error::Http { method: "GET".into(), url: url.clone(), source: e })?;
            match ManifestKind::parse(&body, Some(OCI_INDEX), &url)? {
                ManifestKind::Index(i) => i,
                ManifestKind::Image(_) => return Err(Error::BadResponse { url, reason: "referrers answer is not an index".into() }),
            }
        } else if st == StatusCode::NOT_FOUND || st.is_success() {
            // Fallback: the tag schema `<alg>-<hex>`.
            let tag = digest.replace(':', "-");
            match self.get_manifest(&r.with_tag(&tag)).await {
                Ok(m) => match m.manifest {
                    ManifestKind::Index(i) => i,
                    ManifestKind::Image(_) => empty_index(),
                },
                Err(Error::NotFound { .. }) => empty_index(),
                Err(e) => return Err(e),
            }
        } else {
            return Err(self.status_error(&req, sent, &format!("referrers of {digest}")).await);
        };
        if let Some(t) = artifact_type {
            index.manifests.retain(|d| d.artifact_type.as_deref() == Some(t));
        }
        Ok(index)
    }
}

fn empty_index() -> Index {
    Index {
        schema_version: 2,
        media_type: Some(OCI_INDEX.into()),
        artifact_type: None,
        manifests: Vec::new(),
        subject: None,
        annotations: Default::default(),
        extra: Default::default(),
    }
}

fn with_digest(url: &str, digest: &str) -> String {
    format!("{url}{}digest={digest}", if url.contains('?') { '&' } else { '?' })
}

fn check_len(buf: &[u8], size: u64, path: &Path) -> Result<()> {
    if buf.len() as u64 != size {
        return Err(Error::io(
            format!("reading {}", path.display()),
            std::io::Error::other(format!("file has {} bytes, descriptor says {size}", buf.len())),
        ));
    }
    Ok(())
}
