#![allow(dead_code)]
//! Self-test of the registry test harness (tests/support/registry.rs), using `curl` as an
//! independent client against the real distribution 2.8 `docker-registry`.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest, Sha256};
use support::registry::{listening_tcp_ports, Auth, RefusingAddr, TestRegistry, TOKEN_SERVICE};

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Runs curl; `args` are extra curl arguments (method, headers, auth, data).
fn curl(url: &str, args: &[&str]) -> Resp {
    let dir = tempfile::tempdir().unwrap();
    let hdr = dir.path().join("headers");
    let body = dir.path().join("body");
    let out = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "--max-time", "20", "-H", "Expect:"])
        .arg("-D")
        .arg(&hdr)
        .arg("-o")
        .arg(&body)
        .args(args)
        .arg(url)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl {url} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let raw = std::fs::read_to_string(&hdr).unwrap();
    // Keep the last header block (skips any interim 1xx responses).
    let block = raw.trim_end().rsplit("\r\n\r\n").next().unwrap();
    let mut lines = block.lines();
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Resp { status, headers, body: std::fs::read(&body).unwrap_or_default() }
}

/// `Bearer realm="...",service="..."` -> ("Bearer", {realm: ..., service: ...})
fn parse_challenge(h: &str) -> (String, HashMap<String, String>) {
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (k, r) = rest.split_once('=').unwrap();
        let r = r.strip_prefix('"').unwrap();
        let end = r.find('"').unwrap();
        params.insert(k.trim().to_string(), r[..end].to_string());
        rest = r[end + 1..].trim_start_matches(',').trim();
    }
    (scheme.to_string(), params)
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

fn fetch_token(realm: &str, service: &str, scope: &str, user: &str, pass: &str) -> Resp {
    curl(
        realm,
        &[
            "-G",
            "--data-urlencode",
            &format!("service={service}"),
            "--data-urlencode",
            &format!("scope={scope}"),
            "-u",
            &format!("{user}:{pass}"),
        ],
    )
}

fn token_of(r: &Resp) -> String {
    assert_eq!(r.status, 200, "token request: {}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["token"], v["access_token"]);
    assert!(v["expires_in"].as_u64().is_some(), "{v}");
    assert!(v["issued_at"].as_str().unwrap().ends_with('Z'), "{v}");
    v["token"].as_str().unwrap().to_string()
}

/// Monolithic upload (POST then PUT ?digest=), then GET back.
fn push_and_pull_blob(reg: &TestRegistry, repo: &str, auth_header: &str, data: &[u8]) {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    let post = curl(
        &format!("{}/v2/{repo}/blobs/uploads/", reg.url),
        &["-X", "POST", "-H", auth_header, "-H", "Content-Length: 0"],
    );
    assert_eq!(post.status, 202, "POST upload: {}\n{}", post.text(), reg.log());
    let loc = post.header("Location").expect("Location").to_string();
    let loc = if loc.starts_with('/') { format!("{}{loc}", reg.url) } else { loc };
    assert!(loc.starts_with(&reg.url), "{loc}");
    let sep = if loc.contains('?') { '&' } else { '?' };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    std::fs::write(&file, data).unwrap();
    let put = curl(
        &format!("{loc}{sep}digest={digest}"),
        &[
            "-X",
            "PUT",
            "-H",
            auth_header,
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", file.display()),
        ],
    );
    assert_eq!(put.status, 201, "PUT upload: {}\n{}", put.text(), reg.log());
    assert_eq!(put.header("Docker-Content-Digest"), Some(digest.as_str()));
    let get = curl(&format!("{}/v2/{repo}/blobs/{digest}", reg.url), &["-H", auth_header]);
    assert_eq!(get.status, 200, "GET blob: {}", get.text());
    assert_eq!(get.body, data);
}

#[test]
fn listening_ports_of_a_process_are_found() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    assert!(listening_tcp_ports(std::process::id()).contains(&port));
    drop(l);
    assert!(!listening_tcp_ports(std::process::id()).contains(&port), "a closed listener is not reported");
}

#[test]
fn refusing_addr_refuses_and_keeps_its_port() {
    let r = RefusingAddr::new();
    let err = std::net::TcpStream::connect(r.addr).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // Held: nobody else can listen on it while the value lives.
    assert!(std::net::TcpListener::bind(r.addr).is_err());
}

#[test]
fn no_auth() {
    let t = Instant::now();
    let reg = TestRegistry::start(Auth::None);
    eprintln!("no-auth registry up in {:?}", t.elapsed());
    assert!(reg.host.starts_with("127.0.0.1:"));
    assert_eq!(reg.url, format!("http://{}", reg.host));
    assert!(reg.token_url.is_none());
    let r = curl(&format!("{}/v2/", reg.url), &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Docker-Distribution-Api-Version"), Some("registry/2.0"));
    push_and_pull_blob(&reg, "test/x", "X-Nothing: 1", b"no auth blob");
    assert!(reg.log().contains("listening on 127.0.0.1:"), "{}", reg.log());
    // Deletion is enabled.
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(b"no auth blob")));
    let del = curl(&format!("{}/v2/test/x/blobs/{digest}", reg.url), &["-X", "DELETE"]);
    assert_eq!(del.status, 202, "{}", del.text());
    let dir = reg.dir().to_path_buf();
    drop(reg);
    assert!(!dir.exists(), "tempdir removed on drop");
}

#[test]
fn basic_auth() {
    let reg = TestRegistry::start(Auth::Basic { user: "alice".into(), pass: "s3cret pw".into() });
    let v2 = format!("{}/v2/", reg.url);
    let r = curl(&v2, &[]);
    assert_eq!(r.status, 401);
    let www = r.header("WWW-Authenticate").expect("WWW-Authenticate");
    assert!(www.starts_with("Basic "), "{www}");
    let (scheme, params) = parse_challenge(www);
    assert_eq!(scheme, "Basic");
    assert!(params.contains_key("realm"), "{www}");
    assert_eq!(curl(&v2, &["-u", "alice:wrong"]).status, 401);
    assert_eq!(curl(&v2, &["-u", "alice:s3cret pw"]).status, 200);
    let basic = format!(
        "Authorization: Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:s3cret pw")
    );
    push_and_pull_blob(&reg, "test/x", &basic, b"basic auth blob");
    assert_eq!(reg.token_requests.load(Ordering::SeqCst), 0);
}

#[test]
fn token_auth() {
    let reg = TestRegistry::start(Auth::Token { user: "bob".into(), pass: "hunter2".into(), ttl_secs: 300 });
    let token_url = reg.token_url.clone().expect("token_url");
    let v2 = format!("{}/v2/", reg.url);

    // Challenge.
    let r = curl(&v2, &[]);
    assert_eq!(r.status, 401);
    let www = r.header("WWW-Authenticate").expect("WWW-Authenticate").to_string();
    let port = token_url.trim_start_matches("http://127.0.0.1:").trim_end_matches("/token");
    assert_eq!(
        www,
        format!("Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"{TOKEN_SERVICE}\"")
    );
    let (scheme, params) = parse_challenge(&www);
    assert_eq!(scheme, "Bearer");
    let realm = &params["realm"];
    let service = &params["service"];
    assert_eq!(realm, &token_url);

    // Token server rejects missing / wrong credentials.
    let scope = "repository:test/x:pull,push";
    assert_eq!(curl(&format!("{realm}?service={service}&scope={scope}"), &[]).status, 401);
    assert_eq!(fetch_token(realm, service, scope, "bob", "nope").status, 401);
    assert_eq!(reg.token_requests.load(Ordering::SeqCst), 0);

    let token = token_of(&fetch_token(realm, service, scope, "bob", "hunter2"));
    assert_eq!(reg.token_requests.load(Ordering::SeqCst), 1);
    let r = curl(&v2, &["-H", &bearer(&token)]);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), reg.log());

    // Garbage token -> 401.
    assert_eq!(curl(&v2, &["-H", &bearer("a.b.c")]).status, 401);

    // Repository operations announce the scope they need.
    let r = curl(&format!("{}/v2/test/x/tags/list", reg.url), &[]);
    assert_eq!(r.status, 401);
    let (_, p) = parse_challenge(r.header("WWW-Authenticate").unwrap());
    assert_eq!(p.get("scope").map(String::as_str), Some("repository:test/x:pull"));

    push_and_pull_blob(&reg, "test/x", &bearer(&token), b"hello from lazypull");

    // A pull-only token may pull but not push.
    let pull_only = token_of(&fetch_token(realm, service, "repository:test/x:pull", "bob", "hunter2"));
    let r = curl(
        &format!("{}/v2/test/x/blobs/uploads/", reg.url),
        &["-X", "POST", "-H", &bearer(&pull_only), "-H", "Content-Length: 0"],
    );
    assert_eq!(r.status, 401, "{}", r.text());
    let (_, p) = parse_challenge(r.header("WWW-Authenticate").unwrap());
    assert_eq!(p.get("error").map(String::as_str), Some("insufficient_scope"));
    // The token is scoped to test/x only.
    let r = curl(&format!("{}/v2/test/other/tags/list", reg.url), &["-H", &bearer(&token)]);
    assert_eq!(r.status, 401);

    // A token for the wrong audience is rejected by the registry.
    let wrong_aud = token_of(&fetch_token(realm, "other-service", scope, "bob", "hunter2"));
    assert_eq!(curl(&v2, &["-H", &bearer(&wrong_aud)]).status, 401);

    // OAuth2 password grant (POST), with a refresh token, then the refresh grant.
    let r = curl(
        realm,
        &[
            "--data-urlencode",
            "grant_type=password",
            "--data-urlencode",
            "username=bob",
            "--data-urlencode",
            "password=hunter2",
            "--data-urlencode",
            &format!("service={service}"),
            "--data-urlencode",
            &format!("scope={scope}"),
            "--data-urlencode",
            "client_id=lazypull-test",
            "--data-urlencode",
            "access_type=offline",
        ],
    );
    let oauth_token = token_of(&r);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let refresh = v["refresh_token"].as_str().expect("refresh_token").to_string();
    assert_eq!(curl(&v2, &["-H", &bearer(&oauth_token)]).status, 200);
    let r = curl(
        realm,
        &[
            "-d",
            "grant_type=refresh_token",
            "-d",
            &format!("refresh_token={refresh}"),
            "-d",
            &format!("service={service}"),
            "--data-urlencode",
            &format!("scope={scope}"),
        ],
    );
    let refreshed = token_of(&r);
    let r = curl(&format!("{}/v2/test/x/tags/list", reg.url), &["-H", &bearer(&refreshed)]);
    assert_eq!(r.status, 404, "no tags yet (NAME_UNKNOWN) but authorized: {}", r.text());
    let r = curl(realm, &["-d", "grant_type=password", "-d", "username=bob", "-d", "password=x"]);
    assert_eq!(r.status, 401);
    assert_eq!(reg.token_requests.load(Ordering::SeqCst), 5);
}

#[test]
fn token_expires() {
    let ttl = 2;
    let reg = TestRegistry::start(Auth::Token { user: "u".into(), pass: "p".into(), ttl_secs: ttl });
    let realm = reg.token_url.clone().unwrap();
    let v2 = format!("{}/v2/", reg.url);
    let issued = Instant::now();
    let r = fetch_token(&realm, TOKEN_SERVICE, "repository:test/x:pull", "u", "p");
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["expires_in"], ttl);
    let token = token_of(&r);
    assert_eq!(curl(&v2, &["-H", &bearer(&token)]).status, 200, "{}", reg.log());
    // Effective lifetime is ttl (the issuer compensates the registry's 60 s leeway); allow
    // for whole-second rounding.
    std::thread::sleep(Duration::from_millis(ttl * 1000 + 1100).saturating_sub(issued.elapsed()));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = curl(&v2, &["-H", &bearer(&token)]).status;
        if status == 401 {
            break;
        }
        assert!(Instant::now() < deadline, "token still accepted (status {status})");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("token expired {:?} after issue", issued.elapsed());
    assert!(reg.log().contains("token not to be used after"), "{}", reg.log());
}

#[test]
fn log_captures_registry_output() {
    let reg = TestRegistry::start(Auth::None);
    let _ = curl(&format!("{}/v2/", reg.url), &[]);
    let log = reg.log();
    assert!(log.contains("GET /v2/"), "access log expected:\n{log}");
    assert!(Path::new(&reg.dir().join("config.yml")).exists());
}
