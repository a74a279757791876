//! The request engine: endpoints (mirrors, then the registry), authentication, retries,
//! redirects.
//!
//! Every registry call goes through [`Client::send`], which
//! * adds cached authorization for the (host, scope) pair, answers a `401` challenge once
//!   (Basic credentials or a Bearer token fetched from the challenge's realm), and refreshes a
//!   token shortly before it expires, so long lazy reads never run into an expired token;
//! * retries network errors, `429` (honouring `Retry-After`) and `5xx` except `501` with jittered
//!   exponential backoff;
//! * follows redirects itself (reqwest's automatic following is off) so the blob layer can cache
//!   the redirected URL and never forwards registry credentials to another host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};
use serde::Deserialize;

use crate::auth::{parse_challenge, Challenge, Credential, Credentials};
use crate::config::RegistryConfig;
use crate::error::{Error, Result};
use crate::reference::Reference;

/// One place to send a repository's requests: a mirror or the registry itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host used for credentials and tokens.
    pub host: String,
    /// `scheme://host/v2` (or a mirror's path).
    pub base: String,
    /// Upstream registry name, sent to mirrors as `?ns=` (containerd's convention).
    pub ns: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl Endpoint {
    pub fn url(&self, path: &str) -> String {
        let mut u = format!("{}{}", self.base, path);
        if let Some(ns) = &self.ns {
            u.push(if u.contains('?') { '&' } else { '?' });
            u.push_str("ns=");
            u.push_str(ns);
        }
        u
    }
}

/// A cached authorization header value and when it stops being valid.
#[derive(Clone)]
struct CachedAuth {
    value: HeaderValue,
    expires: Option<Instant>,
}

/// A request to send; the body is `Bytes` so it can be re-sent on retry.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Option<Bytes>,
    /// Token scope, e.g. `repository:test/app:pull`.
    pub scope: String,
    /// Host whose credentials apply.
    pub host: String,
    /// Whether a redirect may be followed (and to where it went, see [`Sent::final_url`]).
    pub follow_redirects: bool,
    /// Overall timeout for this request, headers and body.
    pub timeout: Option<Duration>,
}

/// A response plus the URL that answered it (after redirects).
pub struct Sent {
    pub response: Response,
    pub final_url: String,
}

/// The OCI distribution client. Cheap to clone; clones share connections and token caches.
#[derive(Clone)]
pub struct Client {
    pub(crate) http: crate::http::HttpClients,
    pub(crate) config: Arc<RegistryConfig>,
    credentials: Arc<Credentials>,
    auth_cache: Arc<Mutex<HashMap<(String, String), CachedAuth>>>,
    /// Hosts that answered a multi-range request with 400/416: single ranges only from then on.
    pub(crate) single_range_hosts: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Redirected blob URLs, keyed by (repository endpoint base, digest).
    pub(crate) redirects: Arc<Mutex<HashMap<(String, String), String>>>,
}

pub(crate) fn install_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Several crates may race to install; whichever wins is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Client {
    pub fn new(config: RegistryConfig, credentials: Credentials) -> Result<Client> {
        install_crypto();
        let http = crate::http::HttpClients::new(Duration::from_secs(config.connect_timeout_secs.max(1)))?;
        Ok(Client {
            http,
            config: Arc::new(config),
            credentials: Arc::new(credentials),
            auth_cache: Arc::default(),
            single_range_hosts: Arc::default(),
            redirects: Arc::default(),
        })
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    fn endpoint_for(&self, host: &str, ns: Option<String>, plain: bool, path: Option<&str>) -> Endpoint {
        let hc = self.config.host(host);
        Endpoint {
            host: host.to_string(),
            base: format!("{}://{}{}", if plain { "http" } else { "https" }, host, path.unwrap_or("/v2")),
            ns,
            headers: hc.headers.into_iter().collect(),
        }
    }

    /// Where to read `r` from: configured mirrors in order, then the registry itself.
    pub fn pull_endpoints(&self, r: &Reference) -> Vec<Endpoint> {
        let mut out: Vec<Endpoint> = self
            .config
            .host(&r.registry)
            .mirrors
            .iter()
            .map(|m| {
                let plain = m.plain_http || self.config.is_plain_http(&m.host);
                self.endpoint_for(&m.host, Some(r.registry.clone()), plain, m.path.as_deref())
            })
            .collect();
        out.push(self.push_endpoint(r));
        out
    }

    /// Where to write `r`: the registry itself (never a mirror).
    pub fn push_endpoint(&self, r: &Reference) -> Endpoint {
        let host = r.api_host();
        let plain = self.config.is_plain_http(&r.registry) || self.config.is_plain_http(host);
        let mut e = self.endpoint_for(host, None, plain, None);
        // Credentials and host options are keyed by the registry's name (docker.io).
        e.host = r.registry.clone();
        e
    }

    /// Builds a request to `ep` for repository `repo`.
    pub fn request(&self, ep: &Endpoint, method: Method, path: &str, repo: &str, actions: &str) -> Request {
        let mut headers = Vec::new();
        for (k, v) in &ep.headers {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
                headers.push((k, v));
            }
        }
        Request {
            method,
            url: ep.url(path),
            headers,
            body: None,
            scope: format!("repository:{repo}:{actions}"),
            host: ep.host.clone(),
            follow_redirects: true,
            timeout: Some(Duration::from_secs(self.config.request_timeout_secs.max(1))),
        }
    }

    /// Sends with authentication, retries and redirects; returns any final status (callers
    /// decide what is an error), except that an unanswerable 401 is [`Error::Unauthorized`].
    pub async fn send(&self, req: &Request) -> Result<Sent> {
        let policy = &self.config.retry;
        let mut attempt = 0u32;
        let mut authed_once = false;
        loop {
            let result = self.send_once(req).await;
            let retry_after = match &result {
                Ok(sent) => {
                    let st = sent.response.status();
                    if st == StatusCode::UNAUTHORIZED && !authed_once {
                        authed_once = true;
                        self.answer_challenge(req, &sent.response).await?;
                        continue;
                    }
                    if st == StatusCode::UNAUTHORIZED {
                        return Err(Error::Unauthorized {
                            method: req.method.to_string(),
                            url: req.url.clone(),
                            reason: "credentials were rejected".into(),
                        });
                    }
                    let transient = st == StatusCode::TOO_MANY_REQUESTS || (st.is_server_error() && st != StatusCode::NOT_IMPLEMENTED);
                    if !transient || attempt >= policy.max_retries {
                        return result;
                    }
                    sent.response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s.min(120)))
                }
                Err(e) => {
                    if !e.is_transient() || attempt >= policy.max_retries {
                        return result;
                    }
                    None
                }
            };
            let wait = retry_after.unwrap_or_else(|| policy.backoff(attempt));
            tracing::debug!(url = %req.url, attempt, ?wait, "retrying registry request");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    async fn send_once(&self, req: &Request) -> Result<Sent> {
        let mut url = req.url.clone();
        let origin = url::Url::parse(&url).map_err(|e| Error::Config(format!("bad URL {url}: {e}")))?;
        for _hop in 0..6 {
            let same_host = url::Url::parse(&url).ok().is_some_and(|u| u.host_str() == origin.host_str() && u.port() == origin.port());
            let mut b = self.http.for_url(&url)?.request(req.method.clone(), &url);
            for (k, v) in &req.headers {
                b = b.header(k, v);
            }
            if same_host {
                if let Some(a) = self.cached_auth(&req.host, &req.scope) {
                    b = b.header(AUTHORIZATION, a);
                }
            }
            if let Some(body) = &req.body {
                b = b.body(body.clone());
            }
            if let Some(t) = req.timeout {
                b = b.timeout(t);
            }
            let resp = b.send().await.map_err(|e| Error::Http {
                method: req.method.to_string(),
                url: url.clone(),
                source: e,
            })?;
            if resp.status().is_redirection() && req.follow_redirects {
                if let Some(loc) = resp.headers().get(LOCATION).and_then(|l| l.to_str().ok()) {
                    let next = url::Url::parse(&url).and_then(|u| u.join(loc)).map_err(|e| Error::BadResponse {
                        url: url.clone(),
                        reason: format!("bad redirect Location {loc:?}: {e}"),
                    })?;
                    url = next.to_string();
                    continue;
                }
            }
            return Ok(Sent { response: resp, final_url: url });
        }
        Err(Error::BadResponse {
            url: req.url.clone(),
            reason: "too many redirects".into(),
        })
    }

    fn cached_auth(&self, host: &str, scope: &str) -> Option<HeaderValue> {
        let cache = self.auth_cache.lock().expect("auth cache poisoned");
        let fresh = |a: &CachedAuth| a.expires.is_none_or(|e| Instant::now() < e);
        cache
            .get(&(host.to_string(), scope.to_string()))
            .or_else(|| cache.get(&(host.to_string(), String::new())))
            .filter(|a| fresh(a))
            .map(|a| a.value.clone())
    }

    /// Forgets cached authorization for a host (after a 401/403 on a cached token).
    pub fn forget_auth(&self, host: &str) {
        self.auth_cache.lock().expect("auth cache poisoned").retain(|(h, _), _| h != host);
    }

    async fn answer_challenge(&self, req: &Request, resp: &Response) -> Result<()> {
        let unauthorized = |reason: String| Error::Unauthorized {
            method: req.method.to_string(),
            url: req.url.clone(),
            reason,
        };
        let header = resp
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(parse_challenge)
            .ok_or_else(|| unauthorized("401 without a usable WWW-Authenticate challenge".into()))?;
        // The repository of the request's scope (`repository:NAME:pull`), for per-repository
        // sources such as CRI pull credentials.
        let repository = req.scope.split(' ').find_map(|s| s.strip_prefix("repository:")).and_then(|s| s.rsplit_once(':')).map(|(name, _)| name);
        let cred = self.credentials.lookup_repository(&req.host, repository)?;
        match header {
            Challenge::Basic => {
                let Some(Credential::Basic { username, password }) = cred else {
                    return Err(unauthorized(format!("registry wants Basic auth and there are no credentials for {}", req.host)));
                };
                let v = basic_header(&username, &password);
                self.auth_cache.lock().expect("auth cache poisoned").insert(
                    (req.host.clone(), String::new()),
                    CachedAuth { value: v, expires: None },
                );
            }
            Challenge::Bearer { realm, service, scope } => {
                // Ask for the request's scope (and the challenge's, if it named another).
                let mut scopes: Vec<String> = req.scope.split(' ').map(str::to_string).collect();
                if let Some(s) = scope.filter(|s| !scopes.contains(s)) {
                    scopes.push(s);
                }
                let (token, ttl) = self.fetch_token(&realm, service.as_deref(), &scopes, cred.as_ref(), &req.host).await?;
                let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| unauthorized("token is not a valid header value".into()))?;
                // Refresh a little before the registry would reject it.
                let expires = Instant::now() + ttl.saturating_sub(Duration::from_secs(ttl.as_secs().min(30) / 3 + 1));
                self.auth_cache.lock().expect("auth cache poisoned").insert(
                    (req.host.clone(), req.scope.clone()),
                    CachedAuth { value, expires: Some(expires) },
                );
            }
        }
        Ok(())
    }

    async fn fetch_token(&self, realm: &str, service: Option<&str>, scopes: &[String], cred: Option<&Credential>, host: &str) -> Result<(String, Duration)> {
        #[derive(Deserialize)]
        struct TokenResponse {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let mut url = url::Url::parse(realm).map_err(|e| Error::Unauthorized {
            method: "GET".into(),
            url: realm.into(),
            reason: format!("bad token realm: {e}"),
        })?;
        let builder = match cred {
            Some(Credential::IdentityToken(refresh)) => {
                let mut form = vec![("grant_type", "refresh_token".to_string()), ("refresh_token", refresh.clone()), ("client_id", "lazypull".into())];
                if let Some(s) = service {
                    form.push(("service", s.into()));
                }
                form.push(("scope", scopes.join(" ")));
                let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
                self.http.for_url(url.as_str())?.post(url.clone()).header("Content-Type", "application/x-www-form-urlencoded").body(body)
            }
            other => {
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    for s in scopes {
                        q.append_pair("scope", s);
                    }
                }
                let mut b = self.http.for_url(url.as_str())?.get(url.clone());
                if let Some(Credential::Basic { username, password }) = other {
                    b = b.header(AUTHORIZATION, basic_header(username, password));
                }
                b
            }
        };
        let resp = builder
            .timeout(Duration::from_secs(self.config.request_timeout_secs.max(1)))
            .send()
            .await
            .map_err(|e| Error::Http {
                method: "GET".into(),
                url: url.to_string(),
                source: e,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(Error::Unauthorized {
                method: "GET".into(),
                url: url.to_string(),
                reason: format!("token endpoint for {host} answered {status}: {}", body.chars().take(200).collect::<String>()),
            });
        }
        let t: TokenResponse = resp.json().await.map_err(|e| Error::BadResponse {
            url: url.to_string(),
            reason: format!("token response: {e}"),
        })?;
        let token = t.token.or(t.access_token).filter(|t| !t.is_empty()).ok_or_else(|| Error::BadResponse {
            url: url.to_string(),
            reason: "token response has no token".into(),
        })?;
        // The spec's default lifetime is 60 s when unstated.
        Ok((token, Duration::from_secs(t.expires_in.unwrap_or(60).max(1))))
    }

    /// Turns a non-success response into an error carrying its body's first bytes.
    pub(crate) async fn status_error(&self, req: &Request, sent: Sent, what: &str) -> Error {
        let status = sent.response.status();
        let url = sent.final_url;
        if status == StatusCode::NOT_FOUND {
            return Error::NotFound { what: what.into(), url };
        }
        let body = sent.response.text().await.unwrap_or_default();
        Error::Status {
            method: req.method.to_string(),
            url,
            status: status.as_u16(),
            body: body.chars().take(300).collect(),
        }
    }
}

pub(crate) fn basic_header(user: &str, pass: &str) -> HeaderValue {
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    HeaderValue::from_str(&format!("Basic {enc}")).expect("base64 is a valid header value")
}

/// Headers of a response, for callers that need several.
pub(crate) fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}
