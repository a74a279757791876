//! The credential broker: how layer daemons, which are processes of their own, get the
//! credentials the snapshotter's CRI proxy kept.
//!
//! Why a socket and not the daemon's arguments or environment: a daemon lives as long as its
//! layer is mounted (days), while a pull secret is rotated and a token expires; the daemon asks
//! again each time the registry answers 401 ([`registry::CredentialSource`]), so it always gets
//! the credential of the latest pull. Command lines are world-readable in `/proc`, and nothing
//! secret is ever written to a file. The socket is the snapshotter's (mode 0600, under its
//! root-only state directory); the protocol is one JSON line each way per connection:
//! `{"host": "...", "repository": "..."}` → `{"username": ..., "password": ...}` or
//! `{"identity_token": ...}` or `{}` (none).

use std::io::{BufRead, BufReader, Read as _, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt};

use crate::store::CredentialStore;

/// How long a daemon waits for the broker (it is local; a stuck snapshotter must not hang reads).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request line accepted.
const MAX_LINE: usize = 4096;

#[derive(Serialize, Deserialize)]
struct Ask {
    host: String,
    repository: String,
}

#[derive(Serialize, Deserialize, Default)]
struct Answer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity_token: Option<String>,
}

/// Serves `source` (the CRI store, plugins, or both: [`Chain`]) on `listener` until the task
/// is dropped. A bad request gets no answer (the connection is closed); nothing is logged with
/// a secret in it. The source is asked on a blocking thread (a plugin may take seconds).
pub async fn serve_broker(listener: tokio::net::UnixListener, source: Arc<dyn registry::CredentialSource>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let source = source.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(read).take(MAX_LINE as u64);
            if tokio::time::timeout(CLIENT_TIMEOUT, reader.read_line(&mut line)).await.is_err() {
                return;
            }
            let Ok(ask) = serde_json::from_str::<Ask>(line.trim()) else {
                tracing::debug!("credential broker: unreadable request");
                return;
            };
            let found = tokio::task::spawn_blocking(move || source.credential(&ask.host, &ask.repository)).await.ok().flatten();
            let answer = match found {
                Some(registry::Credential::Basic { username, password }) => Answer { username: Some(username), password: Some(password), ..Default::default() },
                Some(registry::Credential::IdentityToken(t)) => Answer { identity_token: Some(t), ..Default::default() },
                None => Answer::default(),
            };
            let mut out = serde_json::to_vec(&answer).unwrap_or_default();
            out.push(b'\n');
            let _ = write.write_all(&out).await;
        });
    }
}

/// A daemon's side: asks the broker at `path` (blocking, bounded by a short timeout; a broker
/// that is gone means "no credential", and the registry's anonymous answer decides).
pub struct BrokerClient {
    path: PathBuf,
}

impl BrokerClient {
    pub fn new(path: impl Into<PathBuf>) -> BrokerClient {
        BrokerClient { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn ask(&self, host: &str, repository: &str) -> std::io::Result<Option<registry::Credential>> {
        let mut s = std::os::unix::net::UnixStream::connect(&self.path)?;
        s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        let mut req = serde_json::to_vec(&Ask { host: host.into(), repository: repository.into() })?;
        req.push(b'\n');
        s.write_all(&req)?;
        let mut line = String::new();
        BufReader::new(s).take(64 << 10).read_line(&mut line)?;
        let a: Answer = serde_json::from_str(line.trim())?;
        Ok(match a {
            Answer { username: Some(username), password: Some(password), .. } => Some(registry::Credential::Basic { username, password }),
            Answer { identity_token: Some(t), .. } => Some(registry::Credential::IdentityToken(t)),
            _ => None,
        })
    }
}

impl registry::CredentialSource for BrokerClient {
    fn credential(&self, host: &str, repository: &str) -> Option<registry::Credential> {
        match self.ask(host, repository) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(broker = %self.path.display(), error = %e, "credential broker not reachable");
                None
            }
        }
    }
}

/// The snapshotter's own side: the store itself as a source.
impl registry::CredentialSource for CredentialStore {
    fn credential(&self, host: &str, repository: &str) -> Option<registry::Credential> {
        self.get(host, repository).and_then(|c| c.to_registry())
    }
}

/// Several sources, asked in order; the first credential wins.
pub struct Chain(pub Vec<Arc<dyn registry::CredentialSource>>);

impl registry::CredentialSource for Chain {
    fn credential(&self, host: &str, repository: &str) -> Option<registry::Credential> {
        self.0.iter().find_map(|s| s.credential(host, repository))
    }
}

/// kubelet's credential provider plugins as a source: the image is `host/repository`, the
/// plugin runs (or its cached answer is used) on a thread of its own, since callers may be
/// inside an async runtime. A plugin error is logged (never with a secret) and counts as none.
impl registry::CredentialSource for crate::provider::Providers {
    fn credential(&self, host: &str, repository: &str) -> Option<registry::Credential> {
        let image = format!("{host}/{repository}");
        if !self.matches(&image) {
            return None;
        }
        let found = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                Some(rt.block_on(self.lookup(&image)))
            })
            .join()
            .ok()
            .flatten()
        });
        match found {
            Some(Ok(c)) => c.and_then(|c| c.to_registry()),
            Some(Err(e)) => {
                tracing::warn!(%image, error = %e, "credential provider plugin gave no credential");
                None
            }
            None => None,
        }
    }
}

/// For callers that hold the store behind an `Arc<dyn CredentialSource>`.
pub fn source(store: &CredentialStore) -> Arc<dyn registry::CredentialSource> {
    Arc::new(store.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Credential, StoreConfig};
    use registry::CredentialSource as _;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_daemon_gets_the_credential_of_the_latest_pull() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds.sock");
        let store = CredentialStore::new(StoreConfig::default());
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(serve_broker(listener, source(&store)));
        let client = BrokerClient::new(&path);
        let ask = |c: &BrokerClient| {
            let c = BrokerClient::new(c.path());
            std::thread::spawn(move || c.credential("reg.test:5000", "team/app")).join().unwrap()
        };
        assert_eq!(ask(&client), None);
        store.insert("reg.test:5000", "team/app", Credential::Basic { username: "u".into(), password: "p1".into() });
        assert_eq!(ask(&client), Some(registry::Credential::Basic { username: "u".into(), password: "p1".into() }));
        store.insert("reg.test:5000", "team/app", Credential::IdentityToken("t2".into()));
        assert_eq!(ask(&client), Some(registry::Credential::IdentityToken("t2".into())));
        server.abort();
        let _ = server.await;
        drop(std::fs::remove_file(&path));
        assert_eq!(ask(&client), None, "a broker that is gone is no credential, not an error");
    }
}
