//! The credentials kubelet sent with successful pulls, by registry host and repository.
//!
//! Why in memory only: these are the pod's image pull secrets (or a credential provider's
//! short-lived tokens), owned by the Kubernetes API. Writing them to disk would make lazypull a
//! second, unmanaged copy that outlives secret rotation and deletion and that nobody audits.
//! After a restart the store is empty until kubelet pulls again; lazy mounts of a private image
//! then fail over to the regular (full) pull path instead of using stale secrets.
//!
//! Why a TTL: kubelet re-sends credentials with every pull, but never tells anyone when a
//! secret was deleted or a pod that owned it went away. An entry therefore lives a bounded
//! time after the last pull that carried it (12 h by default, refreshed by each new pull), so
//! a revoked secret stops being used by lazypull without any signal from the cluster, while
//! the layers of a running workload (fetched lazily for hours) can still authenticate.
//!
//! Why per repository: two pods may pull from the same registry with different secrets (one
//! per namespace or team). A credential is used for the repository it was given for; reuse
//! for other repositories on the same host is opt-in ([`StoreConfig::host_fallback`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use registry::reference::DOCKER_HUB;
use registry::Reference;

/// What to authenticate with at a registry. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Basic {
        username: String,
        password: String,
    },
    /// An OAuth2 refresh token (docker's `identitytoken`), exchanged at the token realm.
    IdentityToken(String),
    /// A bearer token sent to the registry as is.
    RegistryToken(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::IdentityToken(_) => write!(f, "IdentityToken(<redacted>)"),
            Credential::RegistryToken(_) => write!(f, "RegistryToken(<redacted>)"),
        }
    }
}

impl Credential {
    /// The same credential for `lazypull-registry`'s client, which has no bearer-token variant
    /// (a [`Credential::RegistryToken`] gives `None`).
    pub fn to_registry(&self) -> Option<registry::Credential> {
        match self {
            Credential::Basic { username, password } => Some(registry::Credential::Basic {
                username: username.clone(),
                password: password.clone(),
            }),
            Credential::IdentityToken(t) => Some(registry::Credential::IdentityToken(t.clone())),
            Credential::RegistryToken(_) => None,
        }
    }
}

/// The time source of expiry decisions (tests inject their own).
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;
}

/// [`Instant::now`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// How long entries live and how they are looked up.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Lifetime of an entry after the last successful pull that carried it.
    pub ttl: Duration,
    /// When a repository has no entry, use the most recently refreshed one of the same host.
    pub host_fallback: bool,
}

/// Default [`StoreConfig::ttl`].
pub const DEFAULT_TTL: Duration = Duration::from_secs(12 * 3600);

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            ttl: DEFAULT_TTL,
            host_fallback: false,
        }
    }
}

struct Entry {
    credential: Credential,
    refreshed: Instant,
}

/// In-memory credential store, shared by clones (the proxy fills it, the snapshotter reads it).
#[derive(Clone)]
pub struct CredentialStore {
    entries: Arc<Mutex<HashMap<(String, String), Entry>>>,
    config: StoreConfig,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys and credential kinds only: `Credential`'s Debug redacts the secrets.
        let entries = self.lock();
        let mut keys: Vec<_> = entries.iter().map(|((h, r), e)| (format!("{h}/{r}"), &e.credential)).collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        f.debug_struct("CredentialStore").field("config", &self.config).field("entries", &keys).finish()
    }
}

impl Default for CredentialStore {
    fn default() -> CredentialStore {
        CredentialStore::new(StoreConfig::default())
    }
}

/// The store's host key: scheme and path removed, lowercase, Docker Hub's aliases
/// (`index.docker.io`, `registry-1.docker.io`) as `docker.io` — the same normalization as
/// `lazypull-registry`'s credential lookup, so a [`Reference::registry`] finds its entry.
pub fn host_key(host: &str) -> String {
    let h = host.trim().trim_start_matches("https://").trim_start_matches("http://");
    let h = h.split('/').next().unwrap_or(h).to_ascii_lowercase();
    if h == "index.docker.io" || h == "registry-1.docker.io" {
        DOCKER_HUB.to_string()
    } else {
        h
    }
}

/// The store's repository key: Docker Hub's official images under `library/`.
fn repository_key(host: &str, repository: &str) -> String {
    let r = repository.trim_matches('/');
    if host == DOCKER_HUB && !r.contains('/') {
        format!("library/{r}")
    } else {
        r.to_string()
    }
}

/// (host, repository) of an image reference as kubelet sends it: `busybox` →
/// (`docker.io`, `library/busybox`), `registry:5000/a/b:tag` → (`registry:5000`, `a/b`); tags
/// and digests are not part of the key.
pub fn image_key(image: &str) -> Result<(String, String), registry::Error> {
    let r = Reference::parse(image)?;
    let host = host_key(&r.registry);
    let repository = repository_key(&host, &r.repository);
    Ok((host, repository))
}

impl CredentialStore {
    pub fn new(config: StoreConfig) -> CredentialStore {
        CredentialStore::with_clock(config, Arc::new(SystemClock))
    }

    pub fn with_clock(config: StoreConfig, clock: Arc<dyn Clock>) -> CredentialStore {
        CredentialStore {
            entries: Arc::default(),
            config,
            clock,
        }
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Entry>> {
        // A panic while holding the lock cannot leave a map half-updated in a way that matters.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self, e: &Entry, now: Instant) -> bool {
        e.refreshed.checked_add(self.config.ttl).is_none_or(|end| now < end)
    }

    /// Stores (or replaces and refreshes) the credential of one repository.
    pub fn insert(&self, host: &str, repository: &str, credential: Credential) {
        let host = host_key(host);
        let repository = repository_key(&host, repository);
        let now = self.clock.now();
        let mut entries = self.lock();
        entries.retain(|_, e| self.live(e, now));
        entries.insert((host, repository), Entry { credential, refreshed: now });
    }

    /// Puts `credential` (or nothing) for the repository of an image reference and returns the
    /// entry it replaced, live or not (to put it back if the pull fails).
    pub fn swap_for_image(&self, image: &str, credential: Option<Credential>) -> Result<Option<Credential>, registry::Error> {
        let (host, repository) = image_key(image)?;
        let now = self.clock.now();
        let mut entries = self.lock();
        let previous = entries.remove(&(host.clone(), repository.clone())).filter(|e| self.live(e, now)).map(|e| e.credential);
        if let Some(credential) = credential {
            entries.insert((host, repository), Entry { credential, refreshed: now });
        }
        Ok(previous)
    }

    /// Stores the credential for the repository of an image reference.
    pub fn insert_for_image(&self, image: &str, credential: Credential) -> Result<(), registry::Error> {
        let (host, repository) = image_key(image)?;
        self.insert(&host, &repository, credential);
        Ok(())
    }

    /// The live credential of (host, repository); with [`StoreConfig::host_fallback`], else
    /// the most recently refreshed live one of the host.
    pub fn get(&self, host: &str, repository: &str) -> Option<Credential> {
        let host = host_key(host);
        let repository = repository_key(&host, repository);
        let now = self.clock.now();
        let entries = self.lock();
        if let Some(e) = entries.get(&(host.clone(), repository)).filter(|e| self.live(e, now)) {
            return Some(e.credential.clone());
        }
        if !self.config.host_fallback {
            return None;
        }
        entries
            .iter()
            .filter(|((h, _), e)| *h == host && self.live(e, now))
            .max_by_key(|(_, e)| e.refreshed)
            .map(|(_, e)| e.credential.clone())
    }

    /// [`CredentialStore::get`] for an image reference (`None` when it does not parse).
    pub fn get_for_image(&self, image: &str) -> Option<Credential> {
        let (host, repository) = image_key(image).ok()?;
        self.get(&host, &repository)
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        let now = self.clock.now();
        self.lock().values().filter(|e| self.live(e, now)).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A clock that moves only when told to.
    pub(crate) struct ManualClock(Mutex<Instant>);

    impl ManualClock {
        pub(crate) fn new() -> Arc<ManualClock> {
            Arc::new(ManualClock(Mutex::new(Instant::now())))
        }
        pub(crate) fn advance(&self, d: Duration) {
            *self.0.lock().unwrap() += d;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    fn basic(p: &str) -> Credential {
        Credential::Basic {
            username: "kube".into(),
            password: p.into(),
        }
    }

    #[test]
    fn keys_of_image_references() {
        let d = format!("sha256:{}", "a".repeat(64));
        let cases = [
            ("busybox", ("docker.io", "library/busybox")),
            ("busybox:1.36", ("docker.io", "library/busybox")),
            ("docker.io/library/busybox:latest", ("docker.io", "library/busybox")),
            ("index.docker.io/user/app", ("docker.io", "user/app")),
            ("user/app:v1", ("docker.io", "user/app")),
            ("registry:5000/a/b:tag", ("registry:5000", "a/b")),
            ("localhost/x", ("localhost", "x")),
            (&*format!("ghcr.io/o/r@{d}"), ("ghcr.io", "o/r")),
            (&*format!("ghcr.io/o/r:t@{d}"), ("ghcr.io", "o/r")),
        ];
        for (image, (h, r)) in cases {
            assert_eq!(image_key(image).unwrap(), (h.to_string(), r.to_string()), "{image}");
        }
        assert!(image_key("UPPER/x").is_err());
        for (k, want) in [
            ("https://index.docker.io/v1/", "docker.io"),
            ("registry-1.docker.io", "docker.io"),
            ("Quay.IO", "quay.io"),
            ("http://r:5000/x", "r:5000"),
        ] {
            assert_eq!(host_key(k), want, "{k}");
        }
    }

    #[test]
    fn lookup_is_per_repository_unless_fallback() {
        let store = CredentialStore::default();
        store.insert_for_image("registry:5000/team/app:1", basic("p1")).unwrap();
        assert_eq!(store.get("registry:5000", "team/app"), Some(basic("p1")));
        assert_eq!(store.get("registry:5000", "team/other"), None);
        assert_eq!(store.get("other:5000", "team/app"), None);
        // Docker Hub aliases and official-image names meet the same entry.
        store.insert_for_image("busybox", basic("hub")).unwrap();
        assert_eq!(store.get("registry-1.docker.io", "busybox"), Some(basic("hub")));
        assert_eq!(store.get_for_image("docker.io/library/busybox:1"), Some(basic("hub")));

        let clock = ManualClock::new();
        let store = CredentialStore::with_clock(
            StoreConfig {
                host_fallback: true,
                ..Default::default()
            },
            clock.clone(),
        );
        store.insert("r.io", "a", basic("old"));
        clock.advance(Duration::from_secs(1));
        store.insert("r.io", "b", basic("new"));
        assert_eq!(store.get("r.io", "a"), Some(basic("old")));
        assert_eq!(store.get("r.io", "zzz"), Some(basic("new")));
        assert_eq!(store.get("s.io", "a"), None);
    }

    #[test]
    fn entries_expire_and_pulls_refresh_them() {
        let clock = ManualClock::new();
        let store = CredentialStore::with_clock(
            StoreConfig {
                ttl: Duration::from_secs(100),
                host_fallback: true,
            },
            clock.clone(),
        );
        store.insert("r.io", "a", basic("p"));
        store.insert("r.io", "b", basic("q"));
        clock.advance(Duration::from_secs(60));
        store.insert("r.io", "a", basic("p2"));
        clock.advance(Duration::from_secs(50));
        // b is 110 s old: gone, also as a host fallback; a was refreshed 50 s ago.
        assert_eq!(store.get("r.io", "b"), Some(basic("p2")), "fallback must skip the expired entry");
        assert_eq!(store.get("r.io", "a"), Some(basic("p2")));
        assert_eq!(store.len(), 1);
        clock.advance(Duration::from_secs(50));
        assert_eq!(store.get("r.io", "a"), None);
        assert!(store.is_empty());
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let store = CredentialStore::default();
        store.insert(
            "r.io",
            "a",
            Credential::Basic {
                username: "kube".into(),
                password: "hunter2-basic".into(),
            },
        );
        store.insert("r.io", "b", Credential::IdentityToken("hunter2-identity".into()));
        store.insert("r.io", "c", Credential::RegistryToken("hunter2-bearer".into()));
        let all = [
            format!("{store:?}"),
            format!("{:?}", store.get("r.io", "a")),
            format!("{:?}", store.get("r.io", "b")),
            format!("{:?}", store.get("r.io", "c")),
        ];
        for s in &all {
            assert!(!s.contains("hunter2"), "secret in {s}");
        }
        assert!(all[0].contains("r.io/a") && all[0].contains("kube"), "{}", all[0]);
    }
}
