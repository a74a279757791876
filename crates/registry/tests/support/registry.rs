#![allow(dead_code)]
//! Test harness: runs Debian's real `docker-registry` (distribution 2.8) on 127.0.0.1 in one of
//! three authentication set-ups, plus (for token auth) a tiny Bearer-token issuer on another
//! 127.0.0.1 port.
//!
//! Everything stays on the loopback interface. Each `TestRegistry` owns a temporary directory
//! holding the config, storage, htpasswd file / signing key and the registry's log; dropping the
//! value kills the registry, stops the token issuer and deletes the directory.
//!
//! Token auth notes (distribution 2.8):
//! * The registry accepts an RS256 JWT whose header carries `x5c` = [base64 DER of our
//!   self-signed cert]; the chain is verified against `auth.token.rootcertbundle`.
//! * The registry adds a fixed 60 s leeway to `exp` (and subtracts it from `nbf`). To make
//!   `ttl_secs` mean what tests expect, the issuer writes `exp = iat + ttl - 60` into the JWT
//!   (it may lie before `iat`; the registry does not care), so the registry starts refusing the
//!   token `ttl_secs` after issue. `expires_in` in the JSON response is `ttl_secs`.
//! * `aud` is a plain string in 2.8 (an array is rejected as a malformed token).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

/// Path of Debian's distribution 2.8 registry binary.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// `service` the registry announces in token mode (and expects as the JWT `aud`).
pub const TOKEN_SERVICE: &str = "lazypull-test-registry";
/// `iss` the registry trusts in token mode.
pub const TOKEN_ISSUER: &str = "lazypull-test-issuer";
/// Realm of the registry's htpasswd (Basic) auth.
pub const BASIC_REALM: &str = "lazypull-test-registry";
/// Clock-skew leeway distribution 2.8 applies to `exp`/`nbf` (registry/auth/token: `Leeway`).
pub const REGISTRY_TOKEN_LEEWAY_SECS: i64 = 60;

const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub enum Auth {
    None,
    Basic { user: String, pass: String },
    Token { user: String, pass: String, ttl_secs: u64 },
}

pub struct TestRegistry {
    /// "127.0.0.1:PORT"
    pub host: String,
    /// "http://127.0.0.1:PORT"
    pub url: String,
    /// Number of tokens successfully issued by the token server (token mode only; 0 otherwise).
    pub token_requests: Arc<AtomicUsize>,
    /// "http://127.0.0.1:TOKENPORT/token" in token mode.
    pub token_url: Option<String>,
    child: Child,
    log_path: PathBuf,
    token_server: Option<TokenServer>,
    // Last: removed after the registry is dead.
    dir: tempfile::TempDir,
}

impl TestRegistry {
    /// Starts a registry and blocks until `GET /v2/` answers (with any status).
    /// Panics (including the registry's log) if it does not come up within ~10 s.
    pub fn start(auth: Auth) -> TestRegistry {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} not found (install Debian's docker-registry package)"
        );
        let dir = tempfile::Builder::new()
            .prefix("lazypull-registry-")
            .tempdir()
            .expect("create registry tempdir");
        let token_requests = Arc::new(AtomicUsize::new(0));

        let (auth_yaml, token_server) = match &auth {
            Auth::None => (String::new(), None),
            Auth::Basic { user, pass } => {
                let htpasswd = dir.path().join("htpasswd");
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, pass])
                    .stdin(Stdio::null())
                    .output()
                    .expect("run htpasswd (apache2-utils)");
                assert!(
                    out.status.success(),
                    "htpasswd failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                fs::write(&htpasswd, &out.stdout).expect("write htpasswd");
                let yaml = format!(
                    "auth:\n  htpasswd:\n    realm: {}\n    path: {}\n",
                    yaml_str(BASIC_REALM),
                    yaml_path(&htpasswd)
                );
                (yaml, None)
            }
            Auth::Token { user, pass, ttl_secs } => {
                let key = dir.path().join("token-key.pem");
                let cert = dir.path().join("token-cert.pem");
                gen_key_and_cert(&key, &cert);
                let cert_pem = fs::read_to_string(&cert).expect("read token cert");
                let server = TokenServer::start(TokenIssuer {
                    user: user.clone(),
                    pass: pass.clone(),
                    ttl_secs: *ttl_secs,
                    key_path: key,
                    x5c: pem_body(&cert_pem),
                    requests: token_requests.clone(),
                    refresh_tokens: Mutex::new(HashMap::new()),
                    events: Arc::new(Mutex::new(Vec::new())),
                    counter: AtomicU64::new(0),
                });
                let yaml = format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    yaml_str(&server.realm()),
                    yaml_str(TOKEN_SERVICE),
                    yaml_str(TOKEN_ISSUER),
                    yaml_path(&cert)
                );
                (yaml, Some(server))
            }
        };

        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).expect("create storage dir");
        let log_path = dir.path().join("registry.log");
        let config_path = dir.path().join("config.yml");

        // The registry binds port 0 itself (no probe-then-bind race with other tests); its port
        // is read back from the kernel: the TCP socket in LISTEN state that this child owns.
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             redirect:\n    disable: true\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:0\n  secret: {secret}\n  headers:\n    X-Content-Type-Options: [nosniff]\n\
             health:\n  storagedriver:\n    enabled: false\n\
             {auth_yaml}",
            storage = yaml_path(&storage),
            secret = yaml_str(&random_hex(16)),
        );
        fs::write(&config_path, &config).expect("write registry config");
        let log_file = File::create(&log_path).expect("create registry log");
        let mut cmd = Command::new(REGISTRY_BIN);
        cmd.arg("serve")
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log fd"))
            .stderr(log_file);
        // REGISTRY_* variables override the config file; keep the environment from
        // changing what the tests run against.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(&k);
            }
        }
        let mut child = cmd.spawn().expect("spawn docker-registry");
        let deadline = Instant::now() + START_TIMEOUT;
        let mut host = None;
        let outcome = loop {
            if let Some(status) = child.try_wait().expect("poll docker-registry") {
                break Err(format!("docker-registry exited early with {status}"));
            }
            if host.is_none() {
                host = listening_tcp_ports(child.id()).first().map(|p| format!("127.0.0.1:{p}"));
            }
            if let Some(h) = &host {
                if probe_v2(h) {
                    break Ok(h.clone());
                }
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let what = match &host {
                    None => "did not listen on a TCP port".to_string(),
                    Some(h) => format!("did not answer GET /v2/ on {h}"),
                };
                break Err(format!("docker-registry {what} within {START_TIMEOUT:?}"));
            }
            thread::sleep(Duration::from_millis(20));
        };
        match outcome {
            Ok(host) => TestRegistry {
                url: format!("http://{host}"),
                host,
                token_requests,
                token_url: token_server.as_ref().map(|s| s.realm()),
                child,
                log_path,
                token_server,
                dir,
            },
            Err(msg) => {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                panic!("{msg}\n--- config ---\n{config}\n--- registry log ---\n{log}");
            }
        }
    }

    /// The registry's stdout/stderr so far, followed (in token mode) by the token server's
    /// event log.
    pub fn log(&self) -> String {
        let mut s = String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned();
        if let Some(ts) = &self.token_server {
            s.push_str("--- token server ---\n");
            for line in ts.events.lock().unwrap().iter() {
                s.push_str(line);
                s.push('\n');
            }
        }
        s
    }

    /// Directory holding config, storage and logs (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(mut ts) = self.token_server.take() {
            ts.stop();
        }
    }
}

/// TCP ports on which process `pid` listens (IPv4 and IPv6), found by matching the socket
/// inodes of its open descriptors against the kernel's socket tables. This is how a test learns
/// the port of a server that bound port 0 and does not print it.
pub fn listening_tcp_ports(pid: u32) -> Vec<u16> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    let inodes: std::collections::HashSet<String> = fds
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|l| l.to_str().and_then(|s| s.strip_prefix("socket:[")).and_then(|s| s.strip_suffix(']')).map(str::to_string))
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                if let Some(port) = f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) {
                    ports.push(port);
                }
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// A 127.0.0.1 address nothing listens on, held for as long as the value lives: the port is
/// bound (so no other test can take it) but never listened on, so connections are refused.
pub struct RefusingAddr {
    _socket: tokio::net::TcpSocket,
    pub addr: SocketAddr,
}

impl RefusingAddr {
    pub fn new() -> RefusingAddr {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind 127.0.0.1:0");
        let addr = socket.local_addr().expect("local_addr");
        RefusingAddr { _socket: socket, addr }
    }
}

/// `GET /v2/` answered with any HTTP status line?
fn probe_v2(host: &str) -> bool {
    let addr: SocketAddr = host.parse().unwrap();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s
        .write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    buf[..n].starts_with(b"HTTP/1.")
}

// ---------------------------------------------------------------------------------------------
// Key material

fn gen_key_and_cert(key: &Path, cert: &Path) {
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650"])
        .args(["-subj", "/CN=lazypull test token issuer"])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl req");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Base64 body of the first PEM block (= standard base64 of its DER), as used in `x5c`.
fn pem_body(pem: &str) -> String {
    pem.lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .map(str::trim)
        .collect()
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf
}

fn random_hex(n: usize) -> String {
    random_bytes(n).iter().map(|b| format!("{b:02x}")).collect()
}

fn yaml_str(s: &str) -> String {
    // JSON strings are valid YAML double-quoted scalars.
    serde_json::to_string(s).unwrap()
}

fn yaml_path(p: &Path) -> String {
    yaml_str(p.to_str().expect("utf-8 temp path"))
}

// ---------------------------------------------------------------------------------------------
// Token server

struct TokenIssuer {
    user: String,
    pass: String,
    ttl_secs: u64,
    key_path: PathBuf,
    /// Standard base64 DER of the signing certificate.
    x5c: String,
    requests: Arc<AtomicUsize>,
    /// refresh token -> user
    refresh_tokens: Mutex<HashMap<String, String>>,
    events: Arc<Mutex<Vec<String>>>,
    counter: AtomicU64,
}

struct TokenServer {
    addr: SocketAddr,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    events: Arc<Mutex<Vec<String>>>,
}

impl TokenServer {
    fn start(issuer: TokenIssuer) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind token server");
        let addr = listener.local_addr().unwrap();
        let shutdown = Arc::new(AtomicBool::new(false));
        let events = issuer.events.clone();
        let issuer = Arc::new(issuer);
        let flag = shutdown.clone();
        let thread = thread::Builder::new()
            .name("token-server".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = conn else { continue };
                    let issuer = issuer.clone();
                    let _ = thread::Builder::new()
                        .name("token-conn".into())
                        .spawn(move || issuer.serve(stream));
                }
            })
            .expect("spawn token server");
        TokenServer { addr, shutdown, thread: Some(thread), events }
    }

    fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn stop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        // Wake the blocking accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if len > 1024 * 1024 {
        return None;
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(len);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    Some(Request { method, path, query, headers, body })
}

fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' if i + 2 < b.len() => match hex_val(b[i + 1]).zip(hex_val(b[i + 2])) {
                Some((h, l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// `application/x-www-form-urlencoded` (also used for query strings).
fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn basic_credentials(req: &Request) -> Option<(String, String)> {
    let v = req.header("authorization")?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

fn json_response(status: u16, body: serde_json::Value) -> Response {
    Response { status, headers: Vec::new(), body: body.to_string() }
}

fn error_response(status: u16, code: &str, message: &str) -> Response {
    let mut r = json_response(
        status,
        serde_json::json!({"error": code, "error_description": message, "details": message}),
    );
    if status == 401 {
        r.headers.push((
            "WWW-Authenticate".into(),
            "Basic realm=\"lazypull-test-token-server\"".into(),
        ));
    }
    r
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    }
}

/// Parses scope strings ("repository:NAME:pull,push", several may be space-separated) into
/// the JWT `access` entries. Every requested action is granted.
fn access_entries(scopes: &[&str]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for scope in scopes.iter().flat_map(|s| s.split(' ')).filter(|s| !s.is_empty()) {
        let Some((typ, rest)) = scope.split_once(':') else { continue };
        let Some((name, actions)) = rest.rsplit_once(':') else { continue };
        // "repository(plugin):name:pull" — the class is not part of the type.
        let typ = typ.split('(').next().unwrap_or(typ);
        let actions: Vec<&str> = actions.split(',').filter(|a| !a.is_empty()).collect();
        out.push(serde_json::json!({"type": typ, "name": name, "actions": actions}));
    }
    out
}

impl TokenIssuer {
    fn log(&self, line: String) {
        self.events.lock().unwrap().push(line);
    }

    fn serve(&self, mut stream: TcpStream) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
        let Some(req) = read_request(&mut stream) else { return };
        let resp = self.handle(&req);
        self.log(format!(
            "{} {}{}{} -> {}",
            req.method,
            req.path,
            if req.query.is_empty() { "" } else { "?" },
            req.query,
            resp.status
        ));
        let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
        out.push_str("Content-Type: application/json\r\n");
        out.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
        out.push_str("Connection: close\r\n");
        for (k, v) in &resp.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&resp.body);
        let _ = stream.write_all(out.as_bytes());
        let _ = stream.flush();
        let _ = stream.shutdown(Shutdown::Write);
    }

    fn check(&self, user: &str, pass: &str) -> bool {
        user == self.user && pass == self.pass
    }

    fn handle(&self, req: &Request) -> Response {
        if req.path != "/token" {
            return error_response(404, "not_found", "no such endpoint");
        }
        match req.method.as_str() {
            "GET" => {
                let params = parse_form(&req.query);
                let user = match basic_credentials(req) {
                    Some((u, p)) if self.check(&u, &p) => u,
                    Some(_) => return error_response(401, "unauthorized", "invalid credentials"),
                    None => return error_response(401, "unauthorized", "authentication required"),
                };
                let scopes: Vec<&str> =
                    params.iter().filter(|(k, _)| k == "scope").map(|(_, v)| v.as_str()).collect();
                let refresh = (param(&params, "offline_token") == Some("true")).then(|| self.new_refresh_token(&user));
                self.issue(&user, param(&params, "service"), &scopes, refresh)
            }
            "POST" => {
                let params = parse_form(&String::from_utf8_lossy(&req.body));
                let scopes: Vec<&str> = param(&params, "scope").into_iter().collect();
                match param(&params, "grant_type") {
                    Some("password") => {
                        let creds = match (param(&params, "username"), param(&params, "password")) {
                            (Some(u), Some(p)) => Some((u.to_string(), p.to_string())),
                            _ => basic_credentials(req),
                        };
                        let user = match creds {
                            Some((u, p)) if self.check(&u, &p) => u,
                            _ => return error_response(401, "invalid_grant", "invalid credentials"),
                        };
                        let refresh = (param(&params, "access_type") == Some("offline"))
                            .then(|| self.new_refresh_token(&user));
                        self.issue(&user, param(&params, "service"), &scopes, refresh)
                    }
                    Some("refresh_token") => {
                        let Some(rt) = param(&params, "refresh_token") else {
                            return error_response(400, "invalid_request", "missing refresh_token");
                        };
                        let user = self.refresh_tokens.lock().unwrap().get(rt).cloned();
                        match user {
                            Some(user) => self.issue(&user, param(&params, "service"), &scopes, Some(rt.to_string())),
                            None => error_response(401, "invalid_grant", "unknown refresh token"),
                        }
                    }
                    _ => error_response(400, "unsupported_grant_type", "unsupported grant_type"),
                }
            }
            _ => error_response(405, "method_not_allowed", "use GET or POST"),
        }
    }

    fn new_refresh_token(&self, user: &str) -> String {
        let rt = random_hex(24);
        self.refresh_tokens.lock().unwrap().insert(rt.clone(), user.to_string());
        rt
    }

    fn issue(&self, user: &str, service: Option<&str>, scopes: &[&str], refresh: Option<String>) -> Response {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let ttl = self.ttl_secs as i64;
        let access = access_entries(scopes);
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER,
            "sub": user,
            // A client sending the wrong service gets a token the registry rejects, as with a
            // real token server.
            "aud": service.unwrap_or(TOKEN_SERVICE),
            // See the module docs: compensates the registry's fixed leeway.
            "exp": now + ttl - REGISTRY_TOKEN_LEEWAY_SECS,
            "nbf": now,
            "iat": now,
            "jti": format!("{}-{}-{}", std::process::id(), n, random_hex(8)),
            "access": access,
        });
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [self.x5c]});
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signing_input = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let sig = match rs256_sign(&self.key_path, signing_input.as_bytes()) {
            Ok(sig) => sig,
            Err(e) => {
                self.log(format!("signing failed: {e}"));
                return error_response(500, "server_error", &e);
            }
        };
        let jwt = format!("{signing_input}.{}", b64.encode(sig));
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut body = serde_json::json!({
            "token": jwt,
            "access_token": jwt,
            "expires_in": self.ttl_secs,
            "issued_at": rfc3339(now),
        });
        if !scopes.is_empty() {
            body["scope"] = serde_json::Value::String(scopes.join(" "));
        }
        if let Some(rt) = refresh {
            body["refresh_token"] = serde_json::Value::String(rt);
        }
        json_response(200, body)
    }
}

fn rs256_sign(key: &Path, data: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn openssl dgst: {e}"))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(data)
        .map_err(|e| format!("write to openssl: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("openssl dgst: {e}"))?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err(format!("openssl dgst failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(out.stdout)
}

/// Unix seconds -> "YYYY-MM-DDTHH:MM:SSZ".
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}
