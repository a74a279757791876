//! kubelet credential provider plugins (`credentialprovider.kubelet.k8s.io`), run by lazypull.
//!
//! Nodes that get registry credentials from a plugin (ECR, GCR/Artifact Registry, ACR, or a
//! site's own) configure kubelet with `--image-credential-provider-config` and
//! `--image-credential-provider-bin-dir`. Pointing lazypull at the same two paths gives lazy
//! mounts the same credentials without any secret on disk, and also covers images pulled
//! without going through the CRI proxy (pre-pulled, or pulled before a restart).
//!
//! The exec protocol as kubelet speaks it: the plugin named `name` in the bin dir runs with
//! the configured `args`, kubelet's environment plus the configured `env`, gets a
//! `CredentialProviderRequest` on stdin and answers a `CredentialProviderResponse` on stdout.
//! A plugin runs only for images its `matchImages` select ([`crate::matching`]); it is killed
//! (with its whole process group) after a timeout, a minute by default as in kubelet.
//! Responses are cached per `cacheKeyType` (the image, its registry, or everything) for
//! `cacheDuration`, or the provider's `defaultCacheDuration` when the response gives none; a
//! duration of zero means no caching. Concurrent lookups of one image run its plugin once.
//!
//! Config files are YAML, as kubelet's usually are, or JSON (a document starting with `{`;
//! kubelet accepts both, so the node's own file serves both). Errors name the plugin and the
//! image and never contain the plugin's stdout, which may hold credentials.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::matching::{keyring_lookup, parse_go_duration, urls_match};
use crate::store::{Clock, Credential, SystemClock};

/// `kind` and accepted `apiVersion`s of kubelet's config file.
pub const CONFIG_KIND: &str = "CredentialProviderConfig";
pub const CONFIG_API_VERSIONS: [&str; 3] = ["kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v1beta1", "kubelet.config.k8s.io/v1alpha1"];
/// `apiVersion`s of the plugin protocol (its request and response are the same in all three).
pub const PLUGIN_API_VERSIONS: [&str; 3] = [
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
];
/// kubelet's plugin timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of a failed plugin's stderr goes into the error.
const STDERR_LIMIT: usize = 1024;

/// kubelet's `CredentialProviderConfig`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialProviderConfig {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
}

/// One plugin of the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderConfig {
    pub name: String,
    #[serde(default)]
    pub match_images: Vec<String>,
    /// A Go duration (`"12h"`), used when a response has no `cacheDuration`.
    #[serde(default)]
    pub default_cache_duration: String,
    pub api_version: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// kubelet's service-account-token mode (`tokenAttributes`, Kubernetes 1.33+): the plugin
    /// wants a token of the pulling *pod's* service account in its request. Only kubelet has a
    /// pod and can ask the API server for that token, so lazypull does not run such a plugin;
    /// kubelet does, and its credential reaches the lazy mounts as the `AuthConfig` of the
    /// `PullImage` through the CRI proxy. The attributes are kept only to recognise the mode.
    #[serde(default)]
    pub token_attributes: Option<serde_json::Value>,
}

impl ProviderConfig {
    /// Whether this plugin needs a pod's service account token (see [`Self::token_attributes`]).
    pub fn needs_service_account_token(&self) -> bool {
        self.token_attributes.as_ref().is_some_and(|t| !t.is_null())
    }
}

/// An environment variable for a plugin; `Debug` shows only its name (values may be secret).
#[derive(Clone, Deserialize)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

impl fmt::Debug for EnvVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=<redacted>", self.name)
    }
}

/// A failed provider, naming the plugin and the image; never contains plugin stdout.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("credential provider config {source_name}: {reason}")]
    Config { source_name: String, reason: String },
    #[error("credential provider {plugin} for image {image}: running {}: {source}", .bin.display())]
    Spawn { plugin: String, image: String, bin: PathBuf, source: std::io::Error },
    #[error("credential provider {plugin} for image {image}: no answer within {timeout:?}, killed")]
    Timeout { plugin: String, image: String, timeout: Duration },
    #[error("credential provider {plugin} for image {image}: exited with {status}: {stderr}")]
    Failed { plugin: String, image: String, status: String, stderr: String },
    #[error("credential provider {plugin} for image {image}: invalid response: {reason}")]
    Response { plugin: String, image: String, reason: String },
}

impl CredentialProviderConfig {
    /// Parses and validates a config (YAML, or JSON when it starts with `{`); `source_name`
    /// names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<CredentialProviderConfig, ProviderError> {
        let err = |reason: String| ProviderError::Config {
            source_name: source_name.to_string(),
            reason,
        };
        let config: CredentialProviderConfig = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| err(format!("not a JSON CredentialProviderConfig: {e}")))?
        } else {
            serde_norway::from_str(text).map_err(|e| err(format!("not a YAML CredentialProviderConfig: {e}")))?
        };
        config.validate().map_err(err)?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<CredentialProviderConfig, ProviderError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ProviderError::Config {
            source_name: name.clone(),
            reason: e.to_string(),
        })?;
        CredentialProviderConfig::parse(&text, &name)
    }

    /// kubelet's validation of the fields lazypull uses.
    fn validate(&self) -> Result<(), String> {
        if !self.kind.is_empty() && self.kind != CONFIG_KIND {
            return Err(format!("kind is {:?}, not {CONFIG_KIND}", self.kind));
        }
        if !self.api_version.is_empty() && !CONFIG_API_VERSIONS.contains(&self.api_version.as_str()) {
            return Err(format!("unsupported apiVersion {:?}", self.api_version));
        }
        if self.providers.is_empty() {
            return Err("no providers".into());
        }
        let mut names = Vec::new();
        for p in &self.providers {
            let at = |what: String| format!("provider {:?}: {what}", p.name);
            if p.name.is_empty() || p.name.contains(['/', '\\']) || p.name == "." || p.name == ".." {
                return Err(at("name must be a file name in the plugin directory".into()));
            }
            if names.contains(&&p.name) {
                return Err(at("duplicate name".into()));
            }
            names.push(&p.name);
            if p.match_images.is_empty() {
                return Err(at("matchImages is empty".into()));
            }
            if !PLUGIN_API_VERSIONS.contains(&p.api_version.as_str()) {
                return Err(at(format!("unsupported apiVersion {:?}", p.api_version)));
            }
            if parse_go_duration(&p.default_cache_duration).is_none() {
                return Err(at(format!("defaultCacheDuration {:?} is not a duration", p.default_cache_duration)));
            }
        }
        Ok(())
    }
}

/// A username and password from a plugin; `Debug` redacts the password.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct AuthEntry {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: String,
}

impl fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthEntry({}, <redacted>)", self.username)
    }
}

/// What a response is cached under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum CacheKeyType {
    Image,
    Registry,
    Global,
}

/// A `CredentialProviderResponse`, checked.
#[derive(Debug, Clone)]
pub struct ProviderResponse {
    pub cache_key_type: CacheKeyType,
    /// `None`: the provider's default applies.
    pub cache_duration: Option<Duration>,
    /// Match pattern → credentials.
    pub auth: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawResponse {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    cache_key_type: String,
    #[serde(default)]
    cache_duration: Option<String>,
    #[serde(default)]
    auth: BTreeMap<String, AuthEntry>,
}

/// Checks a plugin's stdout; the `Err` describes what is wrong without quoting it.
pub fn parse_response(stdout: &[u8], api_version: &str) -> Result<ProviderResponse, String> {
    let raw: RawResponse = serde_json::from_slice(stdout).map_err(|e| {
        // serde's messages can quote values (a password); position and category only.
        format!("stdout is not a CredentialProviderResponse ({:?} error at line {} column {})", e.classify(), e.line(), e.column())
    })?;
    if raw.api_version != api_version {
        return Err(format!("apiVersion {:?} does not match the request's {api_version:?}", raw.api_version));
    }
    if raw.kind != "CredentialProviderResponse" {
        return Err(format!("kind {:?} is not CredentialProviderResponse", raw.kind));
    }
    let cache_key_type = match raw.cache_key_type.as_str() {
        "Image" => CacheKeyType::Image,
        "Registry" => CacheKeyType::Registry,
        "Global" => CacheKeyType::Global,
        other => return Err(format!("cacheKeyType {other:?} is not Image, Registry or Global")),
    };
    let cache_duration = match raw.cache_duration {
        None => None,
        Some(d) => Some(parse_go_duration(&d).ok_or_else(|| format!("cacheDuration {d:?} is not a duration"))?),
    };
    Ok(ProviderResponse {
        cache_key_type,
        cache_duration,
        auth: raw.auth,
    })
}

/// Where plugins are and how long they may run.
#[derive(Debug, Clone)]
pub struct ProviderOptions {
    /// kubelet's `--image-credential-provider-bin-dir`.
    pub bin_dir: PathBuf,
    pub timeout: Duration,
}

impl ProviderOptions {
    pub fn new(bin_dir: impl Into<PathBuf>) -> ProviderOptions {
        ProviderOptions {
            bin_dir: bin_dir.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

type Auth = Arc<BTreeMap<String, AuthEntry>>;

struct Provider {
    config: ProviderConfig,
    default_cache_duration: Duration,
    bin: PathBuf,
    timeout: Duration,
    /// Cache key (`image:…`, `registry:…`, `global`) → response and its expiry.
    cache: Mutex<HashMap<String, (Auth, Instant)>>,
    /// Per image, held while its plugin runs (concurrent lookups wait, then hit the cache).
    running: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The configured plugins, with their response caches.
pub struct Providers {
    providers: Vec<Provider>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for Providers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.providers.iter().map(|p| &p.config)).finish()
    }
}

/// kubelet's registry of an image for `cacheKeyType: Registry`: up to the first `/`.
fn registry_of(image: &str) -> &str {
    image.split('/').next().unwrap_or(image)
}

impl Providers {
    pub fn new(config: CredentialProviderConfig, options: ProviderOptions) -> Result<Providers, ProviderError> {
        Providers::with_clock(config, options, Arc::new(SystemClock))
    }

    pub fn with_clock(config: CredentialProviderConfig, options: ProviderOptions, clock: Arc<dyn Clock>) -> Result<Providers, ProviderError> {
        config.validate().map_err(|reason| ProviderError::Config {
            source_name: "(given)".into(),
            reason,
        })?;
        let providers = config
            .providers
            .into_iter()
            .filter(|p| {
                let skip = p.needs_service_account_token();
                if skip {
                    tracing::info!(
                        plugin = %p.name,
                        "credential provider needs a pod's service account token (tokenAttributes): kubelet runs it, and its credential reaches lazy mounts through the CRI proxy's PullImage AuthConfig"
                    );
                }
                !skip
            })
            .map(|p| Provider {
                default_cache_duration: parse_go_duration(&p.default_cache_duration).unwrap_or_default(),
                bin: options.bin_dir.join(&p.name),
                timeout: options.timeout,
                cache: Mutex::default(),
                running: Default::default(),
                config: p,
            })
            .collect();
        Ok(Providers { providers, clock })
    }

    /// Reads the config at `path` (kubelet's `--image-credential-provider-config`).
    pub fn load(path: &Path, options: ProviderOptions) -> Result<Providers, ProviderError> {
        Providers::new(CredentialProviderConfig::load(path)?, options)
    }

    /// Whether any plugin handles `image`.
    pub fn matches(&self, image: &str) -> bool {
        self.providers.iter().any(|p| p.matches(image))
    }

    /// The credential for `image` from the plugins whose `matchImages` select it.
    ///
    /// Like kubelet, the auth entries of all those plugins are combined (on equal keys the
    /// earlier plugin wins) and the most specific key matching the image is used. A failing
    /// plugin is an error only if no other one gave a credential.
    pub async fn lookup(&self, image: &str) -> Result<Option<Credential>, ProviderError> {
        let mut auths = Vec::new();
        let mut errors = Vec::new();
        for p in self.providers.iter().filter(|p| p.matches(image)) {
            match p.provide(image, &*self.clock).await {
                Ok(a) => auths.push(a),
                Err(e) => errors.push(e),
            }
        }
        let entries = auths.iter().flat_map(|a| a.iter().map(|(k, v)| (k.as_str(), v)));
        if let Some(e) = keyring_lookup(entries, image) {
            for err in &errors {
                tracing::warn!("{err}");
            }
            return Ok(Some(Credential::Basic {
                username: e.username.clone(),
                password: e.password.clone(),
            }));
        }
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }
}

impl Provider {
    fn matches(&self, image: &str) -> bool {
        self.config.match_images.iter().any(|m| urls_match(m, image))
    }

    fn cached(&self, image: &str, now: Instant) -> Option<Auth> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, (_, expires)| now < *expires);
        let keys = [format!("image:{image}"), format!("registry:{}", registry_of(image)), "global".to_string()];
        keys.iter().find_map(|k| cache.get(k)).map(|(a, _)| a.clone())
    }

    async fn provide(&self, image: &str, clock: &dyn Clock) -> Result<Auth, ProviderError> {
        if let Some(a) = self.cached(image, clock.now()) {
            return Ok(a);
        }
        let gate = self.running.lock().await.entry(image.to_string()).or_default().clone();
        let result = async {
            let _running = gate.lock().await;
            if let Some(a) = self.cached(image, clock.now()) {
                return Ok(a);
            }
            let response = self.exec(image).await?;
            let auth: Auth = Arc::new(response.auth);
            let duration = response.cache_duration.unwrap_or(self.default_cache_duration);
            if !duration.is_zero() {
                let key = match response.cache_key_type {
                    CacheKeyType::Image => format!("image:{image}"),
                    CacheKeyType::Registry => format!("registry:{}", registry_of(image)),
                    CacheKeyType::Global => "global".to_string(),
                };
                let expires = clock.now() + duration;
                self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, (auth.clone(), expires));
            }
            Ok(auth)
        }
        .await;
        let mut running = self.running.lock().await;
        drop(gate);
        if running.get(image).is_some_and(|g| Arc::strong_count(g) == 1) {
            running.remove(image);
        }
        result
    }

    /// Runs the plugin once for `image`.
    async fn exec(&self, image: &str) -> Result<ProviderResponse, ProviderError> {
        let plugin = &self.config.name;
        let api_version = &self.config.api_version;
        let request = serde_json::json!({ "kind": "CredentialProviderRequest", "apiVersion": api_version, "image": image }).to_string();
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(&self.config.args)
            .envs(self.config.env.iter().map(|e| (&e.name, &e.value)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group, so that a timeout kills what it started too.
            .process_group(0);
        let mut attempt = 0;
        let mut child = loop {
            match cmd.spawn() {
                Ok(c) => break c,
                // The binary is being replaced (or was just written and another thread forked
                // meanwhile): ETXTBSY is transient.
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                Err(source) => {
                    return Err(ProviderError::Spawn {
                        plugin: plugin.clone(),
                        image: image.to_string(),
                        bin: self.bin.clone(),
                        source,
                    })
                }
            }
        };
        let pid = child.id();
        let stdin = child.stdin.take();
        let write = async move {
            if let Some(mut stdin) = stdin {
                // A plugin that exits without reading its request is judged by its answer.
                let _ = stdin.write_all(request.as_bytes()).await;
            }
        };
        let run = async { tokio::join!(write, child.wait_with_output()).1 };
        let output = match tokio::time::timeout(self.timeout, run).await {
            Ok(output) => output,
            Err(_) => {
                if let Some(pid) = pid {
                    // SAFETY: kill(2) has no memory effects; the group exists while the plugin
                    // (not yet reaped) or its children live, so the id cannot have been reused.
                    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
                }
                return Err(ProviderError::Timeout {
                    plugin: plugin.clone(),
                    image: image.to_string(),
                    timeout: self.timeout,
                });
            }
        };
        let output = output.map_err(|source| ProviderError::Spawn {
            plugin: plugin.clone(),
            image: image.to_string(),
            bin: self.bin.clone(),
            source,
        })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let mut stderr = stderr.trim().to_string();
            if stderr.len() > STDERR_LIMIT {
                let mut end = STDERR_LIMIT;
                while !stderr.is_char_boundary(end) {
                    end -= 1;
                }
                stderr.truncate(end);
                stderr.push('…');
            }
            return Err(ProviderError::Failed {
                plugin: plugin.clone(),
                image: image.to_string(),
                status: output.status.to_string(),
                stderr,
            });
        }
        parse_response(&output.stdout, api_version).map_err(|reason| ProviderError::Response {
            plugin: plugin.clone(),
            image: image.to_string(),
            reason,
        })
    }
}
