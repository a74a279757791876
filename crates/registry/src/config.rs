//! Registry host configuration: mirrors, plain HTTP, extra headers, retries and timeouts.
//!
//! The file format follows containerd's `hosts.toml` idea in one file:
//!
//! ```toml
//! [retry]
//! max_retries = 5
//! min_wait_ms = 30
//! max_wait_ms = 30000
//!
//! [host."docker.io"]
//! mirrors = [{ host = "mirror.internal:5000", plain_http = true }]
//!
//! [host."127.0.0.1:5000"]
//! plain_http = true
//! headers = { "X-Team" = "ml" }
//! ```
//!
//! Loopback hosts (`localhost`, `127.*`, `[::1]`) default to plain HTTP, like containerd.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Mirror {
    pub host: String,
    #[serde(default)]
    pub plain_http: bool,
    /// Optional path prefix instead of `/v2` (some mirrors serve under a sub-path).
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct HostConfig {
    #[serde(default)]
    pub mirrors: Vec<Mirror>,
    /// Talk HTTP instead of HTTPS to this host.
    #[serde(default)]
    pub plain_http: Option<bool>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub min_wait_ms: u64,
    pub max_wait_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 5,
            min_wait_ms: 30,
            max_wait_ms: 30_000,
        }
    }
}

impl RetryPolicy {
    /// Jittered exponential backoff for attempt `n` (0-based): a random wait in `[d, 2d)` with
    /// `d = min_wait · 2ⁿ`, capped at `max_wait`.
    pub fn backoff(&self, n: u32) -> Duration {
        let base = self.min_wait_ms.saturating_mul(1u64 << n.min(30)).min(self.max_wait_ms);
        let jitter = if base > 0 { rand::random_range(0..base) } else { 0 };
        Duration::from_millis((base + jitter).min(self.max_wait_ms.max(1)))
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RegistryConfig {
    #[serde(rename = "host")]
    pub hosts: BTreeMap<String, HostConfig>,
    pub retry: RetryPolicy,
    /// Per-request timeout for metadata requests (seconds).
    pub request_timeout_secs: u64,
    /// Timeout for a whole blob or range body (seconds).
    pub fetch_timeout_secs: u64,
    pub connect_timeout_secs: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            hosts: BTreeMap::new(),
            retry: RetryPolicy::default(),
            request_timeout_secs: 30,
            fetch_timeout_secs: 300,
            connect_timeout_secs: 10,
        }
    }
}

impl RegistryConfig {
    pub fn from_toml(text: &str) -> Result<RegistryConfig> {
        toml::from_str(text).map_err(|e| Error::Config(format!("invalid registry config: {e}")))
    }

    pub fn load(path: &std::path::Path) -> Result<RegistryConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Self::from_toml(&text)
    }

    /// Marks a host as plain HTTP (the CLI's `--plain-http`).
    pub fn plain_http(mut self, host: &str) -> Self {
        self.hosts.entry(host.to_string()).or_default().plain_http = Some(true);
        self
    }

    pub fn host(&self, host: &str) -> HostConfig {
        self.hosts.get(host).cloned().unwrap_or_default()
    }

    pub fn is_plain_http(&self, host: &str) -> bool {
        if let Some(p) = self.hosts.get(host).and_then(|h| h.plain_http) {
            return p;
        }
        let name = host.rsplit_once(':').map_or(host, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { host });
        name == "localhost" || name.starts_with("127.") || name == "[::1]"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_file() {
        let c = RegistryConfig::from_toml(
            r#"
            request_timeout_secs = 5
            [retry]
            max_retries = 2
            [host."docker.io"]
            mirrors = [{ host = "m.internal:5000", plain_http = true }]
            [host."reg.example"]
            plain_http = true
            headers = { "X-A" = "b" }
            "#,
        )
        .unwrap();
        assert_eq!(c.retry.max_retries, 2);
        assert_eq!(c.retry.min_wait_ms, 30);
        assert_eq!(c.host("docker.io").mirrors[0].host, "m.internal:5000");
        assert!(c.is_plain_http("reg.example") && c.is_plain_http("127.0.0.1:5000") && c.is_plain_http("localhost"));
        assert!(!c.is_plain_http("ghcr.io"));
        assert!(RegistryConfig::from_toml("[host.x]\nmirrors = 3").is_err());
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let p = RetryPolicy { max_retries: 5, min_wait_ms: 100, max_wait_ms: 1000 };
        for n in 0..10 {
            let d = p.backoff(n).as_millis() as u64;
            assert!(d <= 1000, "{n}: {d}");
            if n == 0 {
                assert!((100..200).contains(&d), "{d}");
            }
        }
    }
}
