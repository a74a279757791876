//! Credentials and authentication challenges.
//!
//! Credentials come from a docker `config.json` (`auths`, `credsStore`, `credHelpers` through
//! `docker-credential-*` executables, exactly like docker and containerd's CRI do) or are given
//! directly. The client answers a `401` by parsing the `WWW-Authenticate` challenge: `Basic`
//! sends the credentials, `Bearer` fetches a token from the realm for the request's scope. Tokens
//! are cached per (registry, scope) until shortly before they expire.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::reference::DOCKER_HUB;

/// What to authenticate with at one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Basic { username: String, password: String },
    /// An OAuth2 refresh token (docker's `identitytoken`), exchanged at the token realm.
    IdentityToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::IdentityToken(_) => write!(f, "IdentityToken(<redacted>)"),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

/// A source of credentials per repository that changes while the process runs: the
/// credentials kubelet sent with a CRI `PullImage` (kept by lazypull's CRI proxy), asked again
/// whenever a registry answers 401, so a rotated secret or an expired token is picked up.
/// Consulted before the fixed and docker-config credentials.
pub trait CredentialSource: Send + Sync {
    /// The credential for `repository` (e.g. `library/busybox`) at `host`, if this source has one.
    fn credential(&self, host: &str, repository: &str) -> Option<Credential>;
}

/// Where credentials come from.
#[derive(Clone, Default)]
pub struct Credentials {
    fixed: HashMap<String, Credential>,
    docker_config: Option<PathBuf>,
    helper_dir: Option<PathBuf>,
    source: Option<std::sync::Arc<dyn CredentialSource>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("fixed", &self.fixed)
            .field("docker_config", &self.docker_config)
            .field("helper_dir", &self.helper_dir)
            .field("source", &self.source.is_some())
            .finish()
    }
}

/// Docker's own key for Docker Hub in `config.json`.
const DOCKER_HUB_CONFIG_KEY: &str = "https://index.docker.io/v1/";

fn host_of_key(key: &str) -> &str {
    let k = key.trim_start_matches("https://").trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k);
    if k == "index.docker.io" || k == "registry-1.docker.io" {
        DOCKER_HUB
    } else {
        k
    }
}

impl Credentials {
    /// No credentials: anonymous access only.
    pub fn anonymous() -> Credentials {
        Credentials::default()
    }

    /// Reads `$DOCKER_CONFIG/config.json` or `~/.docker/config.json` when present.
    pub fn from_environment() -> Credentials {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")));
        Credentials {
            docker_config: dir.map(|d| d.join("config.json")).filter(|p| p.exists()),
            ..Default::default()
        }
    }

    /// Uses a specific docker `config.json`.
    pub fn from_docker_config(path: &Path) -> Credentials {
        Credentials {
            docker_config: Some(path.to_path_buf()),
            ..Default::default()
        }
    }

    /// Adds (or replaces) credentials for one registry host.
    pub fn with(mut self, host: &str, cred: Credential) -> Credentials {
        self.fixed.insert(host_of_key(host).to_string(), cred);
        self
    }

    /// Looks `docker-credential-*` helpers up in `dir` before `$PATH` (tests, sandboxes).
    pub fn with_helper_dir(mut self, dir: &Path) -> Credentials {
        self.helper_dir = Some(dir.to_path_buf());
        self
    }

    /// Asks `source` first (per repository), then the other sources.
    pub fn with_source(mut self, source: std::sync::Arc<dyn CredentialSource>) -> Credentials {
        self.source = Some(source);
        self
    }

    /// The credential for `repository` at a registry host: the dynamic source's, else
    /// [`Credentials::lookup`]'s.
    pub fn lookup_repository(&self, host: &str, repository: Option<&str>) -> Result<Option<Credential>> {
        if let (Some(source), Some(repo)) = (&self.source, repository) {
            if let Some(c) = source.credential(host_of_key(host), repo) {
                return Ok(Some(c));
            }
        }
        self.lookup(host)
    }

    /// The credential for a registry host, if any.
    pub fn lookup(&self, host: &str) -> Result<Option<Credential>> {
        let host = host_of_key(host);
        if let Some(c) = self.fixed.get(host) {
            return Ok(Some(c.clone()));
        }
        let Some(path) = &self.docker_config else { return Ok(None) };
        let text = std::fs::read_to_string(path).map_err(|e| Error::Credentials {
            host: host.into(),
            reason: format!("reading {}: {e}", path.display()),
        })?;
        let cfg: DockerConfig = serde_json::from_str(&text).map_err(|e| Error::Credentials {
            host: host.into(),
            reason: format!("{} is not a docker config: {e}", path.display()),
        })?;
        let helper_key = if host == DOCKER_HUB { DOCKER_HUB_CONFIG_KEY } else { host };
        if let Some(helper) = cfg.cred_helpers.iter().find(|(k, _)| host_of_key(k) == host).map(|(_, v)| v) {
            return self.run_helper(helper, helper_key, host);
        }
        if let Some((_, e)) = cfg.auths.iter().find(|(k, _)| host_of_key(k) == host) {
            if let Some(t) = &e.identity_token {
                return Ok(Some(Credential::IdentityToken(t.clone())));
            }
            if let Some(a) = &e.auth {
                let decoded = base64::engine::general_purpose::STANDARD.decode(a.trim()).map_err(|e| Error::Credentials {
                    host: host.into(),
                    reason: format!("\"auth\" is not base64: {e}"),
                })?;
                let s = String::from_utf8(decoded).map_err(|_| Error::Credentials {
                    host: host.into(),
                    reason: "\"auth\" is not UTF-8".into(),
                })?;
                let (u, p) = s.split_once(':').ok_or_else(|| Error::Credentials {
                    host: host.into(),
                    reason: "\"auth\" is not user:password".into(),
                })?;
                return Ok(Some(Credential::Basic {
                    username: u.into(),
                    password: p.into(),
                }));
            }
            if let (Some(u), Some(p)) = (&e.username, &e.password) {
                return Ok(Some(Credential::Basic {
                    username: u.clone(),
                    password: p.clone(),
                }));
            }
        }
        if let Some(store) = &cfg.creds_store {
            return self.run_helper(store, helper_key, host);
        }
        Ok(None)
    }

    fn run_helper(&self, helper: &str, server: &str, host: &str) -> Result<Option<Credential>> {
        let name = format!("docker-credential-{helper}");
        let exe = self.helper_dir.as_ref().map(|d| d.join(&name)).filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from(&name));
        let err = |reason: String| Error::Credentials { host: host.into(), reason };
        let mut child = Command::new(&exe)
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("running {name}: {e}")))?;
        child.stdin.take().expect("piped").write_all(server.as_bytes()).map_err(|e| err(format!("writing to {name}: {e}")))?;
        let out = child.wait_with_output().map_err(|e| err(format!("waiting for {name}: {e}")))?;
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
            // The helper protocol's "not found" is not an error: go anonymous.
            if msg.contains("credentials not found") {
                return Ok(None);
            }
            return Err(err(format!("{name} failed: {}", msg.trim())));
        }
        #[derive(Deserialize)]
        struct HelperOut {
            #[serde(rename = "Username")]
            username: String,
            #[serde(rename = "Secret")]
            secret: String,
        }
        let h: HelperOut = serde_json::from_slice(&out.stdout).map_err(|e| err(format!("{name} printed invalid JSON: {e}")))?;
        Ok(Some(if h.username == "<token>" {
            Credential::IdentityToken(h.secret)
        } else {
            Credential::Basic {
                username: h.username,
                password: h.secret,
            }
        }))
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

/// Parses `Bearer realm="…",service="…",scope="…"` / `Basic realm="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            out.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => out.push(c),
                }
            }
            (out, &q[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.insert(k, v);
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.remove("realm")?,
            service: params.remove("service"),
            scope: params.remove("scope"),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/ubuntu:pull".into())
            })
        );
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None, "realm is required");
    }

    #[test]
    fn docker_config_and_helpers() {
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("config.json");
        let helper = d.path().join("docker-credential-fake");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread host\nif [ \"$host\" = helped.example ]; then echo '{\"Username\":\"hu\",\"Secret\":\"hs\"}'; \
             elif [ \"$host\" = tok.example ]; then echo '{\"Username\":\"<token>\",\"Secret\":\"refresh\"}'; \
             else echo 'credentials not found in native keychain'; exit 1; fi\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            &cfg,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"aHViOnNlY3JldA=="},"127.0.0.1:5000":{"username":"u","password":"p"},"ident.example":{"identitytoken":"it"}},
                "credHelpers":{"helped.example":"fake","tok.example":"fake"},"credsStore":"fake"}"#,
        )
        .unwrap();
        let c = Credentials::from_docker_config(&cfg).with_helper_dir(d.path());
        assert_eq!(c.lookup("docker.io").unwrap(), Some(Credential::Basic { username: "hub".into(), password: "secret".into() }));
        assert_eq!(c.lookup("127.0.0.1:5000").unwrap(), Some(Credential::Basic { username: "u".into(), password: "p".into() }));
        assert_eq!(c.lookup("ident.example").unwrap(), Some(Credential::IdentityToken("it".into())));
        assert_eq!(c.lookup("helped.example").unwrap(), Some(Credential::Basic { username: "hu".into(), password: "hs".into() }));
        assert_eq!(c.lookup("tok.example").unwrap(), Some(Credential::IdentityToken("refresh".into())));
        assert_eq!(c.lookup("unknown.example").unwrap(), None, "credsStore says not found");
        let fixed = c.with("unknown.example", Credential::Basic { username: "a".into(), password: "b".into() });
        assert!(fixed.lookup("unknown.example").unwrap().is_some());
    }
}
