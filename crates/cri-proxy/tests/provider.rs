//! Credential provider plugins: shell scripts in a temporary directory speaking kubelet's
//! exec protocol.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cri_proxy::provider::{CredentialProviderConfig, ProviderError, ProviderOptions, Providers};
use cri_proxy::{Clock, Credential};

struct ManualClock(Mutex<Instant>);

impl ManualClock {
    fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap()
    }
}

const V1: &str = "credentialprovider.kubelet.k8s.io/v1";

/// Answers from `$KEY_TYPE`, `$DURATION` (a JSON fragment, may be empty) and `$AUTH`; records
/// each request in `$STATE/requests` and its arguments in `$STATE/args`.
const GOOD: &str = r#"#!/bin/sh
cat >> "$STATE/requests"
echo >> "$STATE/requests"
echo "$@" > "$STATE/args"
sleep "${DELAY:-0}"
printf '{"kind":"CredentialProviderResponse","apiVersion":"%s","cacheKeyType":"%s",%s"auth":%s}' "${API:-credentialprovider.kubelet.k8s.io/v1}" "$KEY_TYPE" "$DURATION" "$AUTH"
"#;
const SLEEPER: &str = "#!/bin/sh\nsleep 1000 &\necho $! > \"$STATE/sleep.pid\"\nwait\n";
const GARBAGE: &str = "#!/bin/sh\ncat > /dev/null\necho '{\"auth\": {\"r.io\": {\"username\": \"u\", \"password\": 123456789}}, password: hunter2'\n";
const FAILING: &str = "#!/bin/sh\necho 'token endpoint said no' >&2\nexit 3\n";

struct Fixture {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [("good", GOOD), ("sleeper", SLEEPER), ("garbage", GARBAGE), ("failing", FAILING)] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Fixture {
            dir,
            clock: Arc::new(ManualClock(Mutex::new(Instant::now()))),
        }
    }

    fn state(&self) -> &Path {
        self.dir.path()
    }

    fn calls(&self) -> usize {
        std::fs::read_to_string(self.state().join("requests")).map_or(0, |s| s.lines().filter(|l| !l.is_empty()).count())
    }

    /// A provider entry: `env` beyond `STATE` as name/value pairs.
    fn provider(&self, name: &str, match_images: &[&str], default_cache: &str, env: &[(&str, &str)]) -> serde_json::Value {
        let mut vars = vec![serde_json::json!({"name": "STATE", "value": self.state()})];
        vars.extend(env.iter().map(|(n, v)| serde_json::json!({"name": n, "value": v})));
        serde_json::json!({
            "name": name, "matchImages": match_images, "defaultCacheDuration": default_cache,
            "apiVersion": V1, "args": ["--flag", "value"], "env": vars,
        })
    }

    fn providers(&self, providers: Vec<serde_json::Value>, timeout: Duration) -> Providers {
        let config = serde_json::json!({"kind": "CredentialProviderConfig", "apiVersion": "kubelet.config.k8s.io/v1", "providers": providers});
        let config = CredentialProviderConfig::parse(&config.to_string(), "test").unwrap();
        let options = ProviderOptions {
            bin_dir: self.dir.path().to_path_buf(),
            timeout,
        };
        Providers::with_clock(config, options, self.clock.clone()).unwrap()
    }

    /// One provider running `good` for `*.reg.test` with the given response fields.
    fn good(&self, key_type: &str, duration: Option<&str>, default_cache: &str) -> Providers {
        let duration = duration.map_or(String::new(), |d| format!("\"cacheDuration\":\"{d}\","));
        let auth = r#"{"*.reg.test": {"username": "wild", "password": "pw-wild"}, "a.reg.test/team": {"username": "team", "password": "pw-team"}}"#;
        let p = self.provider(
            "good",
            &["*.reg.test", "*.other.test"],
            default_cache,
            &[("KEY_TYPE", key_type), ("DURATION", &duration), ("AUTH", auth)],
        );
        self.providers(vec![p], Duration::from_secs(10))
    }
}

fn basic(u: &str, p: &str) -> Option<Credential> {
    Some(Credential::Basic {
        username: u.into(),
        password: p.into(),
    })
}

#[tokio::test]
async fn a_good_plugin_answers_with_the_most_specific_key() {
    let f = Fixture::new();
    let p = f.good("Image", Some("0s"), "1h");
    assert_eq!(p.lookup("a.reg.test/team/app:1").await.unwrap(), basic("team", "pw-team"));
    let request: serde_json::Value = serde_json::from_str(std::fs::read_to_string(f.state().join("requests")).unwrap().trim()).unwrap();
    assert_eq!(request, serde_json::json!({"kind": "CredentialProviderRequest", "apiVersion": V1, "image": "a.reg.test/team/app:1"}));
    assert_eq!(std::fs::read_to_string(f.state().join("args")).unwrap().trim(), "--flag value");
    assert_eq!(p.lookup("b.reg.test/x").await.unwrap(), basic("wild", "pw-wild"));
    // Selected by matchImages but no auth key matches: no credential.
    assert_eq!(p.lookup("x.other.test/y").await.unwrap(), None);
    assert_eq!(f.calls(), 3);
    // Not selected by matchImages: the plugin does not run.
    assert!(!p.matches("reg.test/x") && !p.matches("a.b.reg.test/x") && !p.matches("a.reg.test:5000/x"));
    assert_eq!(p.lookup("reg.test/x").await.unwrap(), None);
    assert_eq!(f.calls(), 3);
}

#[tokio::test]
async fn image_cache_key() {
    let f = Fixture::new();
    let p = f.good("Image", Some("1h"), "5m");
    for _ in 0..3 {
        assert_eq!(p.lookup("a.reg.test/team/app").await.unwrap(), basic("team", "pw-team"));
    }
    assert_eq!(f.calls(), 1);
    p.lookup("b.reg.test/x").await.unwrap();
    p.lookup("a.reg.test/team/other").await.unwrap();
    assert_eq!(f.calls(), 3, "other images of the registry must not use an Image-keyed entry");
    f.clock.advance(Duration::from_secs(3599));
    p.lookup("a.reg.test/team/app").await.unwrap();
    assert_eq!(f.calls(), 3);
    f.clock.advance(Duration::from_secs(2));
    p.lookup("a.reg.test/team/app").await.unwrap();
    assert_eq!(f.calls(), 4, "expired entry was used");
}

#[tokio::test]
async fn registry_and_global_cache_keys() {
    let f = Fixture::new();
    let p = f.good("Registry", Some("5m0s"), "1h");
    assert_eq!(p.lookup("a.reg.test/team/app").await.unwrap(), basic("team", "pw-team"));
    // Same registry: from the cache, but the key is still matched per image.
    assert_eq!(p.lookup("a.reg.test/x").await.unwrap(), basic("wild", "pw-wild"));
    assert_eq!(f.calls(), 1);
    p.lookup("b.reg.test/x").await.unwrap();
    assert_eq!(f.calls(), 2);

    let f = Fixture::new();
    let p = f.good("Global", Some("5m"), "1h");
    p.lookup("a.reg.test/team/app").await.unwrap();
    p.lookup("b.reg.test/x").await.unwrap();
    p.lookup("z.other.test/x").await.unwrap();
    assert_eq!(f.calls(), 1);
    f.clock.advance(Duration::from_secs(301));
    p.lookup("b.reg.test/x").await.unwrap();
    assert_eq!(f.calls(), 2);
}

#[tokio::test]
async fn cache_durations() {
    // Zero: never cached.
    let f = Fixture::new();
    let p = f.good("Global", Some("0s"), "1h");
    p.lookup("a.reg.test/x").await.unwrap();
    p.lookup("a.reg.test/x").await.unwrap();
    assert_eq!(f.calls(), 2);
    // None in the response: the provider's default.
    let f = Fixture::new();
    let p = f.good("Image", None, "10m");
    p.lookup("a.reg.test/x").await.unwrap();
    f.clock.advance(Duration::from_secs(599));
    p.lookup("a.reg.test/x").await.unwrap();
    assert_eq!(f.calls(), 1);
    f.clock.advance(Duration::from_secs(2));
    p.lookup("a.reg.test/x").await.unwrap();
    assert_eq!(f.calls(), 2);
    // A zero default and none in the response: not cached.
    let f = Fixture::new();
    let p = f.good("Image", None, "0");
    p.lookup("a.reg.test/x").await.unwrap();
    p.lookup("a.reg.test/x").await.unwrap();
    assert_eq!(f.calls(), 2);
}

#[tokio::test]
async fn concurrent_lookups_run_the_plugin_once() {
    let f = Fixture::new();
    let auth = r#"{"a.reg.test": {"username": "u", "password": "p"}}"#;
    let p = f.provider("good", &["a.reg.test"], "1h", &[("KEY_TYPE", "Image"), ("DURATION", ""), ("AUTH", auth), ("DELAY", "0.3")]);
    let p = f.providers(vec![p], Duration::from_secs(10));
    let (a, b, c) = tokio::join!(p.lookup("a.reg.test/x"), p.lookup("a.reg.test/x"), p.lookup("a.reg.test/x"));
    assert_eq!((a.unwrap(), b.unwrap(), c.unwrap()), (basic("u", "p"), basic("u", "p"), basic("u", "p")));
    assert_eq!(f.calls(), 1);
}

#[tokio::test]
async fn a_hanging_plugin_is_killed_at_the_timeout() {
    let f = Fixture::new();
    let p = f.providers(vec![f.provider("sleeper", &["*.reg.test"], "1h", &[])], Duration::from_millis(500));
    let started = Instant::now();
    let err = p.lookup("a.reg.test/x").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(matches!(err, ProviderError::Timeout { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("sleeper") && msg.contains("a.reg.test/x"), "{msg}");
    // What the plugin started dies with it (gone, or a zombie waiting for its reaper).
    let pid = std::fs::read_to_string(f.state().join("sleep.pid")).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::read_to_string(&stat) {
            Err(_) => break,
            Ok(s) if s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')) => break,
            Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(s) => panic!("the plugin's child still runs: {s}"),
        }
    }
}

#[tokio::test]
async fn bad_plugins_give_typed_errors_without_secrets() {
    let f = Fixture::new();
    let run = |name: &str, env: &[(&str, &str)]| f.providers(vec![f.provider(name, &["*.reg.test"], "1h", env)], Duration::from_secs(10));

    let err = run("garbage", &[]).lookup("a.reg.test/x").await.unwrap_err();
    assert!(matches!(err, ProviderError::Response { .. }), "{err:?}");
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(
            text.contains("garbage") && text.contains("a.reg.test/x") && !text.contains("hunter2") && !text.contains("123456789"),
            "{text}"
        );
    }

    let err = run("failing", &[]).lookup("a.reg.test/x").await.unwrap_err();
    assert!(matches!(err, ProviderError::Failed { .. }), "{err:?}");
    assert!(err.to_string().contains("token endpoint said no"), "{err}");

    let err = run("missing", &[]).lookup("a.reg.test/x").await.unwrap_err();
    assert!(matches!(err, ProviderError::Spawn { .. }) && err.to_string().contains("missing"), "{err:?}");

    let wrong_version = [("KEY_TYPE", "Image"), ("DURATION", ""), ("AUTH", "{}"), ("API", "credentialprovider.kubelet.k8s.io/v1beta1")];
    let err = run("good", &wrong_version).lookup("a.reg.test/x").await.unwrap_err();
    assert!(matches!(err, ProviderError::Response { .. }) && err.to_string().contains("apiVersion"), "{err:?}");

    let err = run("good", &[("KEY_TYPE", "Pod"), ("DURATION", ""), ("AUTH", "{}")]).lookup("a.reg.test/x").await.unwrap_err();
    assert!(err.to_string().contains("cacheKeyType"), "{err}");
    let err = run("good", &[("KEY_TYPE", "Image"), ("DURATION", "\"cacheDuration\":\"soon\","), ("AUTH", "{}")])
        .lookup("a.reg.test/x")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cacheDuration"), "{err}");
}

#[tokio::test]
async fn providers_are_combined_like_kubelet() {
    let f = Fixture::new();
    let first = f.provider(
        "good",
        &["*.reg.test"],
        "0",
        &[
            ("KEY_TYPE", "Image"),
            ("DURATION", ""),
            (
                "AUTH",
                r#"{"*.reg.test": {"username": "first", "password": "1"}, "b.reg.test": {"username": "first-b", "password": "1"}}"#,
            ),
        ],
    );
    let failing = f.provider("failing", &["*.reg.test"], "0", &[]);
    std::fs::copy(f.state().join("good"), f.state().join("good2")).unwrap();
    let second = f.provider(
        "good2",
        &["*.reg.test"],
        "0",
        &[
            ("KEY_TYPE", "Image"),
            ("DURATION", ""),
            (
                "AUTH",
                r#"{"a.reg.test": {"username": "second", "password": "2"}, "b.reg.test": {"username": "second-b", "password": "2"}}"#,
            ),
        ],
    );
    let p = f.providers(vec![first, failing, second], Duration::from_secs(10));
    // The more specific key wins even from a later provider; on equal keys the earlier one.
    assert_eq!(p.lookup("a.reg.test/x").await.unwrap(), basic("second", "2"));
    assert_eq!(p.lookup("b.reg.test/x").await.unwrap(), basic("first-b", "1"));
    assert_eq!(p.lookup("c.reg.test/x").await.unwrap(), basic("first", "1"));
    // Only the failing one selects this image: its error is the answer.
    let p = f.providers(vec![f.provider("failing", &["*.reg.test"], "0", &[])], Duration::from_secs(10));
    assert!(p.lookup("c.reg.test/x").await.is_err());
}

#[test]
fn config_validation() {
    let f = Fixture::new();
    let good = f.provider("good", &["*.reg.test"], "12h", &[]);
    let with = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut p = good.clone();
        change(&mut p);
        serde_json::json!({"kind": "CredentialProviderConfig", "apiVersion": "kubelet.config.k8s.io/v1", "providers": [p]}).to_string()
    };
    let config = CredentialProviderConfig::parse(&with(&|_| {}), "c.json").unwrap();
    assert_eq!(config.providers[0].match_images, ["*.reg.test"]);
    assert!(!format!("{config:?}").contains(&*f.state().to_string_lossy()), "env values must not be shown");
    type Change<'a> = &'a dyn Fn(&mut serde_json::Value);
    let bad: [(&str, Change); 6] = [
        ("name", &|p| p["name"] = "../bin/sh".into()),
        ("matchImages", &|p| p["matchImages"] = serde_json::json!([])),
        ("apiVersion", &|p| p["apiVersion"] = "credentialprovider.kubelet.k8s.io/v2".into()),
        ("defaultCacheDuration", &|p| p["defaultCacheDuration"] = "twelve hours".into()),
        ("defaultCacheDuration", &|p| p.as_object_mut().unwrap().remove("defaultCacheDuration").map(drop).unwrap()),
        ("JSON", &|p| p["args"] = "not a list".into()),
    ];
    for (what, change) in bad {
        let err = CredentialProviderConfig::parse(&with(change), "c.json").unwrap_err();
        assert!(err.to_string().contains(what) && err.to_string().contains("c.json"), "{what}: {err}");
    }
    for config in [r#"{"providers": []}"#, r#"{"kind": "Other", "providers": [{}]}"#, "providers: []"] {
        assert!(CredentialProviderConfig::parse(config, "c").is_err(), "{config}");
    }
    let two = serde_json::json!({"providers": [good.clone(), good]}).to_string();
    assert!(CredentialProviderConfig::parse(&two, "c").unwrap_err().to_string().contains("duplicate"));
}

/// kubelet's config files are usually YAML (the form its documentation shows): read the same
/// as the JSON form, and a bad one is refused naming the file.
#[test]
fn yaml_configs_read_like_json_ones() {
    let yaml = r#"
apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-credential-provider
    matchImages:
      - "*.dkr.ecr.*.amazonaws.com"
      - "*.dkr.ecr.*.amazonaws.com.cn"
    defaultCacheDuration: "12h"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args:
      - get-credentials
    env:
      - name: AWS_PROFILE
        value: temp
"#;
    let json = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1",
        "kind": "CredentialProviderConfig",
        "providers": [{
            "name": "ecr-credential-provider",
            "matchImages": ["*.dkr.ecr.*.amazonaws.com", "*.dkr.ecr.*.amazonaws.com.cn"],
            "defaultCacheDuration": "12h",
            "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
            "args": ["get-credentials"],
            "env": [{"name": "AWS_PROFILE", "value": "temp"}]
        }]
    })
    .to_string();
    let (from_yaml, from_json) = (CredentialProviderConfig::parse(yaml, "c.yaml").unwrap(), CredentialProviderConfig::parse(&json, "c.json").unwrap());
    assert_eq!(format!("{from_yaml:?}"), format!("{from_json:?}"));
    assert_eq!(from_yaml.providers[0].match_images.len(), 2);
    assert_eq!(from_yaml.providers[0].args, ["get-credentials"]);
    // A service-account-token plugin (kubelet's tokenAttributes) is kubelet's to run: not run
    // by lazypull, whose CRI proxy gets its credential in PullImage's AuthConfig instead.
    let sa = yaml.replace(
        "    args:\n",
        "    tokenAttributes:\n      serviceAccountTokenAudience: ecr.example\n      requireServiceAccount: true\n    args:\n",
    );
    let sa = CredentialProviderConfig::parse(&sa, "c.yaml").unwrap();
    assert!(sa.providers[0].needs_service_account_token() && !from_yaml.providers[0].needs_service_account_token());
    let p = cri_proxy::provider::Providers::new(sa, cri_proxy::provider::ProviderOptions { bin_dir: "/nonexistent".into(), timeout: Duration::from_secs(1) }).unwrap();
    assert!(!p.matches("123.dkr.ecr.us-east-1.amazonaws.com/app"), "a token plugin is not lazypull's to run");
    let bad = yaml.replace("defaultCacheDuration: \"12h\"", "defaultCacheDuration: [12h]");
    let err = CredentialProviderConfig::parse(&bad, "c.yaml").unwrap_err().to_string();
    assert!(err.contains("c.yaml") && err.contains("YAML"), "{err}");
}
