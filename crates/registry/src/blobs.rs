//! Reading manifests and blobs: whole blobs (streamed, digest-checked, resumed after a dropped
//! connection), sizes, and random access with HTTP `Range`.
//!
//! Random access is what a lazy filesystem lives on, and registries differ: some answer
//! multi-range requests with `multipart/byteranges`, some reject them (400/416: we switch that
//! host to single ranges for good), some coalesce ranges into one part, and some ignore `Range`
//! entirely and send the whole blob with `200` (we detect it and slice, never returning wrong
//! bytes). Blob storage behind a redirect (S3, GCS) hands out expiring URLs: the redirected URL is
//! cached per blob and dropped when it answers 401/403, so the next read goes back to the
//! registry for a fresh one.

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::{Method, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::client::{header_str, Client, Endpoint, Request};
use crate::error::{Error, Result};
use crate::manifest::{ManifestKind, ACCEPT_MANIFESTS};
use crate::reference::Reference;

/// A fetched manifest: its bytes (digest-exact), media type and digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: String,
    pub manifest: ManifestKind,
}

pub fn sha256_digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn check_digest(digest: &str) -> Result<()> {
    match digest.split_once(':') {
        Some(("sha256", h)) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(()),
        _ => Err(Error::InvalidDigest(digest.to_string())),
    }
}

/// Parses `Content-Range: bytes a-b/total` into (a, b, total?).
pub(crate) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let total = if total.trim() == "*" { None } else { Some(total.trim().parse().ok()?) };
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, total))
}

impl Client {
    /// Tries each pull endpoint in turn; the first that does not fail wins.
    async fn on_pull_endpoints<T, F, Fut>(&self, r: &Reference, mut f: F) -> Result<T>
    where
        F: FnMut(Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let eps = self.pull_endpoints(r);
        let n = eps.len();
        let mut last = None;
        for (i, ep) in eps.into_iter().enumerate() {
            match f(ep.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) if i + 1 < n => {
                    tracing::warn!(mirror = %ep.base, error = %e, "mirror failed; trying the next endpoint");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least the registry itself is an endpoint"))
    }

    /// Fetches the manifest or index `r` names. Pinned digests are verified.
    pub async fn get_manifest(&self, r: &Reference) -> Result<FetchedManifest> {
        self.on_pull_endpoints(r, |ep| async move {
            let mut req = self.request(&ep, Method::GET, &format!("/{}/manifests/{}", r.repository, r.manifest_ref()), &r.repository, "pull");
            req.headers.push((ACCEPT, HeaderValue::from_static(ACCEPT_MANIFESTS)));
            let sent = self.send(&req).await?;
            if !sent.response.status().is_success() {
                return Err(self.status_error(&req, sent, &format!("manifest {r}")).await);
            }
            let ct = header_str(sent.response.headers(), "content-type").map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
            let url = sent.final_url.clone();
            let bytes = sent.response.bytes().await.map_err(|e| Error::Http {
                method: "GET".into(),
                url: url.clone(),
                source: e,
            })?;
            if bytes.len() > 4 << 20 {
                return Err(Error::BadResponse { url, reason: format!("manifest of {} bytes exceeds 4 MiB", bytes.len()) });
            }
            let digest = sha256_digest(&bytes);
            if let Some(want) = &r.digest {
                if *want != digest {
                    return Err(Error::DigestMismatch { what: format!("manifest {r}"), expected: want.clone(), actual: digest });
                }
            }
            let manifest = ManifestKind::parse(&bytes, ct.as_deref(), &url)?;
            let media_type = manifest.media_type().to_string();
            Ok(FetchedManifest { bytes, media_type, digest, manifest })
        })
        .await
    }

    /// Fetches a small blob (a config) whole, verified.
    pub async fn get_blob_bytes(&self, r: &Reference, digest: &str, limit: u64) -> Result<Bytes> {
        let mut buf = Vec::new();
        let n = self.get_blob_to(r, digest, &mut buf, Some(limit)).await?;
        debug_assert_eq!(n as usize, buf.len());
        Ok(Bytes::from(buf))
    }

    /// Streams a whole blob into `out`, checking its sha256; a dropped connection resumes with a
    /// `Range` request from where it stopped. Returns the byte count.
    pub async fn get_blob_to<W: AsyncWrite + Unpin>(&self, r: &Reference, digest: &str, out: &mut W, limit: Option<u64>) -> Result<u64> {
        check_digest(digest)?;
        let eps = self.pull_endpoints(r);
        let mut last_err = None;
        // Fix: progress is kept across endpoints. It used to be reset per endpoint, so when a
        // mirror failed after writing part of the blob to `out`, the next endpoint wrote the
        // whole blob again after it: `out` ended up with a duplicated prefix while the (reset)
        // hash still matched. Blobs are content-addressed, so the next endpoint simply resumes
        // at `done`.
        let mut hasher = Sha256::new();
        let mut done: u64 = 0;
        for ep in eps {
            let mut resumes = 0;
            let result: Result<()> = loop {
                let mut req = self.request(&ep, Method::GET, &format!("/{}/blobs/{digest}", r.repository), &r.repository, "pull");
                req.timeout = Some(std::time::Duration::from_secs(self.config.fetch_timeout_secs.max(1)));
                if done > 0 {
                    req.headers.push((RANGE, HeaderValue::from_str(&format!("bytes={done}-")).expect("ascii")));
                }
                let sent = match self.send(&req).await {
                    Ok(s) => s,
                    Err(e) => break Err(e),
                };
                let status = sent.response.status();
                if !status.is_success() {
                    break Err(self.status_error(&req, sent, &format!("blob {digest} of {r}")).await);
                }
                // Resuming: a 200 means the server ignored Range; skip what we already have.
                let mut skip = if done > 0 && status == StatusCode::OK { done } else { 0 };
                let url = sent.final_url.clone();
                let mut stream = sent.response.bytes_stream();
                let mut failed = None;
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(mut chunk) => {
                            if skip > 0 {
                                let s = skip.min(chunk.len() as u64);
                                chunk = chunk.slice(s as usize..);
                                skip -= s;
                            }
                            if let Some(l) = limit {
                                if done + chunk.len() as u64 > l {
                                    return Err(Error::BadResponse { url, reason: format!("blob {digest} exceeds the {l}-byte limit") });
                                }
                            }
                            hasher.update(&chunk);
                            out.write_all(&chunk).await.map_err(|e| Error::io(format!("writing blob {digest}"), e))?;
                            done += chunk.len() as u64;
                        }
                        Err(e) => {
                            failed = Some(Error::Http { method: "GET".into(), url: url.clone(), source: e });
                            break;
                        }
                    }
                }
                match failed {
                    None => break Ok(()),
                    Some(e) if resumes < self.config.retry.max_retries => {
                        resumes += 1;
                        tracing::warn!(%digest, done, error = %e, "blob download interrupted; resuming");
                        tokio::time::sleep(self.config.retry.backoff(resumes - 1)).await;
                    }
                    Some(e) => break Err(e),
                }
            };
            match result {
                Ok(()) => {
                    out.flush().await.map_err(|e| Error::io(format!("writing blob {digest}"), e))?;
                    let actual = format!("sha256:{}", hex::encode(std::mem::take(&mut hasher).finalize()));
                    if actual != digest {
                        return Err(Error::DigestMismatch { what: format!("blob of {r}"), expected: digest.into(), actual });
                    }
                    return Ok(done);
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one endpoint"))
    }

    /// The blob's size: `HEAD`, or `GET Range: bytes=0-1` where HEAD is refused.
    pub async fn blob_size(&self, r: &Reference, digest: &str) -> Result<u64> {
        check_digest(digest)?;
        self.on_pull_endpoints(r, |ep| async move {
            let path = format!("/{}/blobs/{digest}", r.repository);
            let req = self.request(&ep, Method::HEAD, &path, &r.repository, "pull");
            let sent = self.send(&req).await?;
            let st = sent.response.status();
            if st.is_success() {
                if let Some(len) = sent.response.content_length().filter(|&l| l > 0).or_else(|| header_str(sent.response.headers(), "content-length").and_then(|s| s.parse().ok())) {
                    return Ok(len);
                }
            } else if st == StatusCode::NOT_FOUND {
                return Err(Error::NotFound { what: format!("blob {digest} of {r}"), url: sent.final_url });
            }
            let mut req = self.request(&ep, Method::GET, &path, &r.repository, "pull");
            req.headers.push((RANGE, HeaderValue::from_static("bytes=0-1")));
            let sent = self.send(&req).await?;
            match sent.response.status() {
                StatusCode::PARTIAL_CONTENT => header_str(sent.response.headers(), "content-range")
                    .and_then(parse_content_range)
                    .and_then(|(_, _, t)| t)
                    .ok_or_else(|| Error::BadResponse { url: sent.final_url.clone(), reason: "206 without a total in Content-Range".into() }),
                StatusCode::OK => sent.response.content_length().ok_or_else(|| Error::BadResponse {
                    url: sent.final_url.clone(),
                    reason: "200 without Content-Length".into(),
                }),
                _ => Err(self.status_error(&req, sent, &format!("blob {digest} of {r}")).await),
            }
        })
        .await
    }

    /// Sends a ranged GET for a blob through the cached redirect when there is one.
    async fn ranged_get(&self, r: &Reference, ep: &Endpoint, digest: &str, range: &str) -> Result<(reqwest::Response, String)> {
        let key = (ep.base.clone(), digest.to_string());
        let cached = self.redirects.lock().expect("redirect cache poisoned").get(&key).cloned();
        if let Some(url) = cached {
            let resp = self
                .http
                .for_url(&url)?
                .get(&url)
                .header(RANGE, range)
                .header("Accept-Encoding", "identity")
                .timeout(std::time::Duration::from_secs(self.config.fetch_timeout_secs.max(1)))
                .send()
                .await;
            match resp {
                Ok(resp) if matches!(resp.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND) => {
                    // Expired presigned URL: forget it and ask the registry again.
                    tracing::debug!(%url, status = %resp.status(), "cached blob URL refused; refreshing");
                    self.redirects.lock().expect("redirect cache poisoned").remove(&key);
                }
                Ok(resp) if resp.status().is_success() => return Ok((resp, url)),
                Ok(_) | Err(_) => {
                    self.redirects.lock().expect("redirect cache poisoned").remove(&key);
                }
            }
        }
        let mut req: Request = self.request(ep, Method::GET, &format!("/{}/blobs/{digest}", r.repository), &r.repository, "pull");
        req.headers.push((RANGE, HeaderValue::from_str(range).map_err(|_| Error::Config(format!("bad range {range}")))?));
        req.headers.push((reqwest::header::ACCEPT_ENCODING, HeaderValue::from_static("identity")));
        req.timeout = Some(std::time::Duration::from_secs(self.config.fetch_timeout_secs.max(1)));
        let sent = self.send(&req).await?;
        if !sent.response.status().is_success() {
            return Err(self.status_error(&req, sent, &format!("blob {digest} of {r}")).await);
        }
        if sent.final_url != req.url {
            self.redirects.lock().expect("redirect cache poisoned").insert(key, sent.final_url.clone());
        }
        Ok((sent.response, sent.final_url))
    }

    /// Reads `len` bytes of a blob from `offset`.
    pub async fn read_range(&self, r: &Reference, digest: &str, offset: u64, len: u64) -> Result<Bytes> {
        Ok(self.read_ranges(r, digest, &[(offset, len)]).await?.remove(0))
    }

    /// Reads several ranges of a blob: one multi-range request where the registry allows it.
    /// Returns the bytes of each requested range, in request order, exactly.
    pub async fn read_ranges(&self, r: &Reference, digest: &str, ranges: &[(u64, u64)]) -> Result<Vec<Bytes>> {
        check_digest(digest)?;
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        if ranges.iter().any(|&(_, l)| l == 0) {
            return Err(Error::Config("zero-length range requested".into()));
        }
        self.on_pull_endpoints(r, |ep| async move {
            let single_only = self.single_range_hosts.lock().expect("poisoned").contains(&ep.host);
            if ranges.len() == 1 || single_only {
                let mut out = Vec::with_capacity(ranges.len());
                for &(o, l) in ranges {
                    out.push(self.fetch_one(r, &ep, digest, o, l).await?);
                }
                return Ok(out);
            }
            let spec = ranges.iter().map(|&(o, l)| format!("{o}-{}", o + l - 1)).collect::<Vec<_>>().join(",");
            match self.fetch_ranges(r, &ep, digest, &format!("bytes={spec}"), ranges).await {
                Ok(parts) => Ok(parts),
                Err(Error::Status { status: 400 | 416, .. }) => {
                    tracing::info!(host = %ep.host, "registry refuses multi-range requests; using single ranges");
                    self.single_range_hosts.lock().expect("poisoned").insert(ep.host.clone());
                    let mut out = Vec::with_capacity(ranges.len());
                    for &(o, l) in ranges {
                        out.push(self.fetch_one(r, &ep, digest, o, l).await?);
                    }
                    Ok(out)
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn fetch_one(&self, r: &Reference, ep: &Endpoint, digest: &str, offset: u64, len: u64) -> Result<Bytes> {
        Ok(self.fetch_ranges(r, ep, digest, &format!("bytes={offset}-{}", offset + len - 1), &[(offset, len)]).await?.remove(0))
    }

    /// One ranged GET (`range` is the `Range` header for `ranges`), retrying a body that breaks
    /// off mid-way.
    ///
    /// Fix: this used to retry every transient error, including the 5xx/429 statuses and
    /// connection errors that [`Client::send`] had already retried, so a failing registry got
    /// `(max_retries + 1)²` requests with compounding backoff instead of `max_retries + 1`.
    /// Now only failures while reading the body (which `send` never sees) are retried here.
    /// The multi-range path goes through here too, so a dropped multipart body is retried
    /// instead of failing the read.
    async fn fetch_ranges(&self, r: &Reference, ep: &Endpoint, digest: &str, range: &str, ranges: &[(u64, u64)]) -> Result<Vec<Bytes>> {
        let mut attempt = 0;
        loop {
            // Errors here were already retried by `send`.
            let (resp, url) = self.ranged_get(r, ep, digest, range).await?;
            match self.collect_ranges(resp, &url, ranges).await {
                Err(e) if e.is_transient() && attempt < self.config.retry.max_retries => {
                    tracing::debug!(%digest, range, error = %e, "range body interrupted; retrying");
                    tokio::time::sleep(self.config.retry.backoff(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Turns a 206 (single or multipart) or 200 response into the requested ranges' bytes.
    async fn collect_ranges(&self, resp: reqwest::Response, url: &str, ranges: &[(u64, u64)]) -> Result<Vec<Bytes>> {
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(|e| Error::Http { method: "GET".into(), url: url.into(), source: e })?;
        let bad = |reason: String| Error::BadResponse { url: url.into(), reason };
        // Parts we got: (start offset in the blob, bytes).
        let parts: Vec<(u64, Bytes)> = if status == StatusCode::OK {
            tracing::debug!(%url, "registry ignored Range and sent the whole blob");
            vec![(0, body)]
        } else if status == StatusCode::PARTIAL_CONTENT {
            let ct = header_str(&headers, CONTENT_TYPE.as_str()).unwrap_or("");
            if ct.starts_with("multipart/byteranges") {
                let boundary = ct
                    .split(';')
                    .find_map(|p| p.trim().strip_prefix("boundary="))
                    .map(|b| b.trim_matches('"').to_string())
                    .ok_or_else(|| bad("multipart response without a boundary".into()))?;
                parse_multipart(&body, &boundary).map_err(bad)?
            } else {
                let (a, b, _) = header_str(&headers, CONTENT_RANGE.as_str())
                    .and_then(parse_content_range)
                    .ok_or_else(|| bad("206 without a valid Content-Range".into()))?;
                if b < a || body.len() as u64 != b - a + 1 {
                    return Err(bad(format!("Content-Range {a}-{b} does not match a {}-byte body", body.len())));
                }
                vec![(a, body)]
            }
        } else {
            return Err(bad(format!("unexpected status {status} for a range request")));
        };
        ranges
            .iter()
            .map(|&(o, l)| {
                parts
                    .iter()
                    .find(|(start, b)| *start <= o && o + l <= start + b.len() as u64)
                    .map(|(start, b)| b.slice((o - start) as usize..(o - start + l) as usize))
                    .ok_or_else(|| bad(format!("response does not contain bytes {o}-{} (blob too short or range dropped)", o + l - 1)))
            })
            .collect()
    }
}

/// Splits a `multipart/byteranges` body into (offset, bytes) parts.
pub(crate) fn parse_multipart(body: &Bytes, boundary: &str) -> std::result::Result<Vec<(u64, Bytes)>, String> {
    let delim = format!("--{boundary}");
    let d = delim.as_bytes();
    let find = |hay: &[u8], needle: &[u8], from: usize| -> Option<usize> { hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| p + from) };
    let mut parts = Vec::new();
    let mut pos = find(body, d, 0).ok_or("multipart body has no boundary")?;
    loop {
        pos += d.len();
        if body.get(pos..pos + 2) == Some(b"--") {
            break;
        }
        // Headers end at the blank line.
        let hdr_end = find(body, b"\r\n\r\n", pos).ok_or("multipart part without header end")?;
        let headers = std::str::from_utf8(&body[pos..hdr_end]).map_err(|_| "non-UTF-8 part headers")?;
        let (a, b, _) = headers
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case("content-range").then(|| parse_content_range(v)).flatten()
            })
            .ok_or("multipart part without Content-Range")?;
        if b < a {
            return Err(format!("part range {a}-{b} is reversed"));
        }
        let start = hdr_end + 4;
        let len = (b - a + 1) as usize;
        let end = start.checked_add(len).filter(|&e| e <= body.len()).ok_or("multipart part shorter than its Content-Range")?;
        parts.push((a, body.slice(start..end)));
        pos = find(body, d, end).ok_or("multipart body ends without a closing boundary")?;
    }
    Ok(parts)
}

/// A bytes buffer helper for tests and callers assembling parts.
pub fn concat(parts: &[Bytes]) -> Bytes {
    let mut b = BytesMut::new();
    for p in parts {
        b.extend_from_slice(p);
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_and_content_range() {
        assert_eq!(parse_content_range("bytes 0-1/100"), Some((0, 1, Some(100))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        let body = Bytes::from_static(b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-3/20\r\n\r\nabcd\r\n--XX\r\nContent-Range: bytes 10-11/20\r\n\r\nkl\r\n--XX--\r\n");
        let p = parse_multipart(&body, "XX").unwrap();
        assert_eq!(p, vec![(0, Bytes::from_static(b"abcd")), (10, Bytes::from_static(b"kl"))]);
        let truncated = Bytes::from_static(b"--XX\r\nContent-Range: bytes 0-9/20\r\n\r\nabc");
        assert!(parse_multipart(&truncated, "XX").is_err());
    }
}
