//! The HTTP clients under [`crate::client::Client`], one per URL scheme.
//!
//! Loading the system's CA roots (rustls-platform-verifier reads every file of
//! `/etc/ssl/certs`, ~150 on Debian) takes 5–25 ms, and the snapshotter starts one layer daemon
//! per lazy layer at container start: that cost landed on every pod's `PullImage`. Registries
//! and mirrors on a node are often plain HTTP, so the verifying client is built at the first
//! `https://` request instead of up front; a plain-HTTP client has no root store at all (it
//! could not verify anything, and never needs to).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::error::{Error, Result};

#[derive(Clone)]
pub(crate) struct HttpClients {
    plain: reqwest::Client,
    tls: Arc<OnceLock<std::result::Result<reqwest::Client, String>>>,
    connect_timeout: Duration,
}

fn builder(connect_timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("lazypull/", env!("CARGO_PKG_VERSION")))
}

impl HttpClients {
    pub(crate) fn new(connect_timeout: Duration) -> Result<HttpClients> {
        let plain = builder(connect_timeout)
            .tls_certs_only(Vec::new())
            .build()
            .map_err(|e| Error::Config(format!("building the HTTP client: {e}")))?;
        Ok(HttpClients { plain, tls: Arc::default(), connect_timeout })
    }

    /// The client for `url`: the plain one for `http://`, else the verifying one (built once).
    pub(crate) fn for_url(&self, url: &str) -> Result<&reqwest::Client> {
        if url.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://")) {
            return Ok(&self.plain);
        }
        let built = self.tls.get_or_init(|| builder(self.connect_timeout).build().map_err(|e| e.to_string()));
        built.as_ref().map_err(|e| Error::Config(format!("building the HTTPS client: {e}")))
    }

    /// Whether the verifying client has been built (tests).
    #[cfg(test)]
    pub(crate) fn tls_built(&self) -> bool {
        self.tls.get().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_never_builds_the_verifying_client() {
        crate::client::install_crypto();
        let h = HttpClients::new(Duration::from_secs(1)).unwrap();
        h.for_url("http://127.0.0.1:5000/v2/").unwrap();
        h.for_url("HTTP://mirror.local/v2/").unwrap();
        assert!(!h.tls_built());
        h.for_url("https://registry.example/v2/").unwrap();
        assert!(h.tls_built());
    }
}
