#![allow(dead_code)]
//! Fault-injecting HTTP/1.1 reverse proxy for integration tests.
//!
//! Listens on `127.0.0.1:0`, forwards every request to one upstream (`127.0.0.1:PORT`) over a
//! fresh `Connection: close` connection, and can be told to misbehave for requests matching a
//! method and a path substring. std only: one accept thread plus one thread per client
//! connection. Client connections may be kept alive (several requests per connection).
//!
//! Mechanics worth knowing when writing tests:
//! * Request bodies (Content-Length or chunked) are read completely and re-sent to the upstream
//!   with a Content-Length. `Expect: 100-continue` is answered by the proxy itself.
//! * Upstream responses are buffered completely, then sent with a Content-Length (the upstream's
//!   own if it sent one; otherwise the length of the de-chunked / read-until-close body).
//! * `Location` headers pointing at the upstream are rewritten to the proxy's URL.
//! * A request is recorded (see [`FaultProxy::requests`]) just before its response is written,
//!   so the record is visible even when the client sees a dropped connection.
//! * [`FaultProxy::serve_referrers_api`] adds the OCI referrers API in front of a registry that
//!   lacks it (Debian's): manifests PUT with a `subject` are remembered, and
//!   `GET /v2/<repo>/referrers/<digest>[?artifactType=T]` answers from that memory.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub enum Fault {
    /// Forward, but close the connection after sending `after` bytes of the response body
    /// (headers intact, Content-Length as upstream said).
    DropMidBody { after: usize },
    /// Answer this status with a short body without contacting upstream (e.g. 500, 502, 503,
    /// 401, 403, 404).
    Status(u16),
    /// 429 with `Retry-After: secs`.
    TooManyRequests { retry_after_secs: u64 },
    /// Strip the Range header before forwarding, so upstream answers 200 with the full body.
    /// Only applies to (and is only consumed by) requests that carry a `Range` header.
    IgnoreRange,
    /// Answer 400 to requests that carry a multi-range `Range` header (bytes=a-b,c-d); forward
    /// others. Only consumed by multi-range requests.
    RejectMultiRange,
    /// Send the body at most `bytes_per_sec` (sleeping between small writes).
    SlowBody { bytes_per_sec: usize },
    /// Answer HEAD requests with 405 (registries behind S3 that refuse HEAD); forward others.
    /// Only consumed by HEAD requests.
    RefuseHead,
    /// Flip one byte (XOR 0xff) of the response body at `offset` (for digest-check tests).
    /// The offset is relative to the response body as sent (i.e. to the range for a 206).
    CorruptBody { offset: usize },
    /// Answer 307 redirect to `location` (absolute URL) without contacting upstream.
    Redirect { location: String },
}

impl Fault {
    /// Whether this fault is relevant for a request at all. Rules whose fault does not apply are
    /// skipped (and not consumed), so e.g. `inject(None, "", RefuseHead, 1)` waits for a HEAD.
    fn applies_to(&self, head: &RequestHead) -> bool {
        match self {
            Fault::IgnoreRange => head.header("range").is_some(),
            Fault::RejectMultiRange => head.header("range").is_some_and(|r| r.contains(',')),
            Fault::RefuseHead => head.method.eq_ignore_ascii_case("HEAD"),
            _ => true,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Request target including the query string (origin-form).
    pub path: String,
    /// Headers as the client sent them.
    pub headers: Vec<(String, String)>,
    /// Status sent to the client.
    pub status: u16,
}

impl RecordedRequest {
    /// Case-insensitive header lookup (first occurrence).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

struct Rule {
    method: Option<String>,
    path_contains: String,
    fault: Fault,
    /// `None` = until cleared.
    remaining: Option<usize>,
}

struct Shared {
    upstream: String,
    proxy_url: String,
    rules: Mutex<Vec<Rule>>,
    requests: Mutex<Vec<RecordedRequest>>,
    stop: AtomicBool,
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
    /// Referrers API emulation: on when set; (repository, subject digest) -> descriptors.
    referrers_api: AtomicBool,
    referrers: Mutex<HashMap<(String, String), Vec<serde_json::Value>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FaultProxy {
    /// Start a proxy in front of `upstream` (`"127.0.0.1:PORT"`; a leading `http://` and a
    /// trailing `/` are tolerated).
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream = upstream
            .trim()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").expect("fault proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fault proxy: local_addr");
        let url = format!("http://{addr}");
        let shared = Arc::new(Shared {
            upstream,
            proxy_url: url.clone(),
            rules: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            referrers_api: AtomicBool::new(false),
            referrers: Mutex::new(HashMap::new()),
        });
        let accept_shared = shared.clone();
        let accept_thread = thread::Builder::new()
            .name("fault-proxy-accept".into())
            .spawn(move || accept_loop(listener, accept_shared))
            .expect("fault proxy: spawn accept thread");
        FaultProxy {
            addr,
            url,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    /// Apply `fault` to the next `times` requests whose method+path matches: `path_contains` is a
    /// substring of the path (""=any), `method` None = any.
    pub fn inject(&self, method: Option<&str>, path_contains: &str, fault: Fault, times: usize) {
        if times == 0 {
            return;
        }
        self.push_rule(method, path_contains, fault, Some(times));
    }

    /// Apply `fault` to all matching requests until cleared.
    pub fn inject_always(&self, method: Option<&str>, path_contains: &str, fault: Fault) {
        self.push_rule(method, path_contains, fault, None);
    }

    fn push_rule(
        &self,
        method: Option<&str>,
        path_contains: &str,
        fault: Fault,
        remaining: Option<usize>,
    ) {
        lock(&self.shared.rules).push(Rule {
            method: method.map(str::to_string),
            path_contains: path_contains.to_string(),
            fault,
            remaining,
        });
    }

    /// Answer the OCI referrers API (see the module docs) from now on.
    pub fn serve_referrers_api(&self) {
        self.shared.referrers_api.store(true, Ordering::SeqCst);
    }

    /// Remove all injected faults (recorded requests are kept).
    pub fn clear(&self) {
        lock(&self.shared.rules).clear();
    }

    /// All requests seen so far, in the order their responses were started.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Forget the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Number of recorded requests with this method (case-insensitive; "" or "*" = any) whose
    /// path contains `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| method.is_empty() || method == "*" || r.method.eq_ignore_ascii_case(method))
            .filter(|r| r.path.contains(path_contains))
            .count()
    }

    /// Bytes clients asked for from blob `digest` of `size` bytes: the lengths of the requested
    /// ranges, summed over recorded GETs (a GET without `Range` counts the whole blob).
    pub fn blob_bytes_requested(&self, digest: &str, size: u64) -> u64 {
        let mut total = 0;
        for r in lock(&self.shared.requests).iter() {
            if r.method != "GET" || !r.path.contains(&format!("/blobs/{digest}")) {
                continue;
            }
            match r.header("range").and_then(|v| v.strip_prefix("bytes=")) {
                None => total += size,
                Some(spec) => {
                    for part in spec.split(',') {
                        let (a, b) = part.trim().split_once('-').expect("malformed Range header");
                        let a: u64 = a.parse().unwrap_or(0);
                        let b: u64 = b.parse().unwrap_or(size - 1);
                        total += b.min(size - 1) + 1 - a;
                    }
                }
            }
        }
        total
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() so the loop sees the stop flag and drops the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        // Unblock connection threads waiting on idle keep-alive clients.
        for (_, s) in lock(&self.shared.conns).drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(_) => {
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.conns).insert(id, clone);
        }
        let conn_shared = shared.clone();
        let spawned = thread::Builder::new()
            .name(format!("fault-proxy-conn-{id}"))
            .spawn(move || {
                handle_connection(&conn_shared, stream);
                lock(&conn_shared.conns).remove(&id);
            });
        if spawned.is_err() {
            lock(&shared.conns).remove(&id);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing

const MAX_HEAD: usize = 1 << 20;

struct RequestHead {
    method: String,
    /// Origin-form target (path + query).
    path: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl RequestHead {
    fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    fn wants_close(&self) -> bool {
        let conn = self.header("connection").unwrap_or("").to_ascii_lowercase();
        if self.version.eq_ignore_ascii_case("HTTP/1.0") {
            !conn.split(',').any(|t| t.trim() == "keep-alive")
        } else {
            conn.split(',').any(|t| t.trim() == "close")
        }
    }
}

struct UpstreamResponse {
    status: u16,
    reason: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// False when the upstream closed before delivering the whole body.
    complete: bool,
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
        .any(|(_, v)| v.to_ascii_lowercase().contains("chunked"))
}

fn content_length(headers: &[(String, String)]) -> io::Result<Option<usize>> {
    match find_header(headers, "content-length") {
        None => Ok(None),
        Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad Content-Length {v:?}"),
            )
        }),
    }
}

/// Read one CRLF/LF-terminated line without the terminator. `Ok(None)` on EOF before any byte.
fn read_line<R: BufRead>(r: &mut R, budget: &mut usize) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "header section too large",
        ));
    }
    *budget -= n;
    if buf.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed mid-line",
        ));
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

fn read_headers<R: BufRead>(r: &mut R, budget: &mut usize) -> io::Result<Vec<(String, String)>> {
    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let line = read_line(r, budget)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in headers"))?;
        if line.is_empty() {
            return Ok(headers);
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            // Obsolete line folding: append to the previous value.
            if let Some(last) = headers.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
            continue;
        }
        let (k, v) = line.split_once(':').ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad header line {line:?}"),
            )
        })?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
}

/// Read a request head. `Ok(None)` on a clean EOF between requests.
fn read_request_head<R: BufRead>(r: &mut R) -> io::Result<Option<RequestHead>> {
    let mut budget = MAX_HEAD;
    let line = loop {
        match read_line(r, &mut budget)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue, // tolerate stray CRLF between requests
            Some(l) => break l,
        }
    };
    let mut parts = line.split_whitespace();
    let (method, target, version) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v)) => (m.to_string(), t.to_string(), v.to_string()),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad request line {line:?}"),
            ))
        }
    };
    let headers = read_headers(r, &mut budget)?;
    Ok(Some(RequestHead {
        method,
        path: origin_form(&target),
        version,
        headers,
    }))
}

/// `http://host:port/a?b` -> `/a?b`; origin-form targets are returned unchanged.
fn origin_form(target: &str) -> String {
    for scheme in ["http://", "https://"] {
        if let Some(rest) = target.strip_prefix(scheme) {
            return match rest.find(['/', '?']) {
                Some(i) if rest[i..].starts_with('/') => rest[i..].to_string(),
                Some(i) => format!("/{}", &rest[i..]),
                None => "/".to_string(),
            };
        }
    }
    target.to_string()
}

fn read_chunked<R: BufRead>(r: &mut R, out: &mut Vec<u8>) -> io::Result<()> {
    let mut budget = MAX_HEAD;
    loop {
        let line = read_line(r, &mut budget)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in chunk size"))?;
        let size_str = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad chunk size {line:?}"),
            )
        })?;
        if size == 0 {
            // Trailers until an empty line.
            loop {
                match read_line(r, &mut budget)? {
                    None => return Ok(()),
                    Some(l) if l.is_empty() => return Ok(()),
                    Some(_) => {}
                }
            }
        }
        let start = out.len();
        out.resize(start + size, 0);
        r.read_exact(&mut out[start..])?;
        budget = MAX_HEAD;
        let crlf = read_line(r, &mut budget)?;
        if crlf.as_deref() != Some("") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "missing CRLF after chunk",
            ));
        }
    }
}

/// Read a request body per its framing. `Ok(None)` = the request had no body framing at all.
fn read_request_body<R: BufRead>(r: &mut R, head: &RequestHead) -> io::Result<Option<Vec<u8>>> {
    if is_chunked(&head.headers) {
        let mut body = Vec::new();
        read_chunked(r, &mut body)?;
        return Ok(Some(body));
    }
    match content_length(&head.headers)? {
        None => Ok(None),
        Some(n) => {
            let mut body = vec![0u8; n];
            r.read_exact(&mut body)?;
            Ok(Some(body))
        }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Injected",
    }
}

fn registry_error_code(status: u16) -> &'static str {
    match status {
        400 => "UNSUPPORTED",
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "NOT_FOUND",
        405 => "UNSUPPORTED",
        429 => "TOOMANYREQUESTS",
        _ => "UNKNOWN",
    }
}

fn bodyless_status(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

// ---------------------------------------------------------------------------------------------
// Per-connection handling

enum BodyMode {
    Normal,
    DropAfter(usize),
    Slow(usize),
}

fn handle_connection(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(120)));
    let read_half = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let head = match read_request_head(&mut reader) {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(_) => {
                let _ = write_simple(&mut writer, 400, &[], b"malformed request\n", false, true);
                break;
            }
        };
        match handle_request(shared, &head, &mut reader, &mut writer) {
            Ok(true) => continue,
            Ok(false) | Err(_) => break,
        }
    }
    let _ = writer.flush();
    let _ = writer.shutdown(Shutdown::Both);
}

fn select_fault(shared: &Shared, head: &RequestHead) -> Option<Fault> {
    let mut rules = lock(&shared.rules);
    let idx = rules.iter().position(|r| {
        (match &r.method {
            None => true,
            Some(m) => m.eq_ignore_ascii_case(&head.method),
        }) && head.path.contains(&r.path_contains)
            && r.remaining != Some(0)
            && r.fault.applies_to(head)
    })?;
    let fault = rules[idx].fault.clone();
    if let Some(n) = rules[idx].remaining.as_mut() {
        *n -= 1;
        if *n == 0 {
            rules.remove(idx);
        }
    }
    Some(fault)
}

fn record(shared: &Shared, head: &RequestHead, status: u16) {
    lock(&shared.requests).push(RecordedRequest {
        method: head.method.clone(),
        path: head.path.clone(),
        headers: head.headers.clone(),
        status,
    });
}

/// Handle one request; returns whether the client connection may be reused.
fn handle_request(
    shared: &Shared,
    head: &RequestHead,
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
) -> io::Result<bool> {
    let fault = select_fault(shared, head);

    // Always consume the request body so the connection stays in sync for keep-alive.
    let expects_continue = head
        .header("expect")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"));
    let has_body_framing = is_chunked(&head.headers) || head.header("content-length").is_some();
    if expects_continue && has_body_framing {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        writer.flush()?;
    }
    let body = match read_request_body(reader, head) {
        Ok(b) => b,
        Err(_) => {
            record(shared, head, 400);
            let _ = write_simple(writer, 400, &[], b"malformed request body\n", false, true);
            return Ok(false);
        }
    };

    let is_head = head.method.eq_ignore_ascii_case("HEAD");
    let keep_alive = !head.wants_close();
    if shared.referrers_api.load(Ordering::SeqCst) {
        if let Some(answer) = referrers_api(shared, head, body.as_deref()) {
            record(shared, head, 200);
            write_simple(writer, 200, &[("Content-Type", "application/vnd.oci.image.index.v1+json")], &answer, is_head, !keep_alive)?;
            return Ok(keep_alive);
        }
    }

    let mut strip_range = false;
    let mut mode = BodyMode::Normal;
    let mut corrupt_at: Option<usize> = None;
    match fault {
        Some(Fault::Status(code)) => {
            let msg = format!(
                "{{\"errors\":[{{\"code\":\"{}\",\"message\":\"injected fault: status {}\"}}]}}\n",
                registry_error_code(code),
                code
            );
            record(shared, head, code);
            write_simple(
                writer,
                code,
                &[("Content-Type", "application/json")],
                msg.as_bytes(),
                is_head,
                !keep_alive,
            )?;
            return Ok(keep_alive);
        }
        Some(Fault::TooManyRequests { retry_after_secs }) => {
            let msg = "{\"errors\":[{\"code\":\"TOOMANYREQUESTS\",\"message\":\"injected fault: too many requests\"}]}\n";
            record(shared, head, 429);
            let ra = retry_after_secs.to_string();
            write_simple(
                writer,
                429,
                &[("Content-Type", "application/json"), ("Retry-After", &ra)],
                msg.as_bytes(),
                is_head,
                !keep_alive,
            )?;
            return Ok(keep_alive);
        }
        Some(Fault::RejectMultiRange) => {
            record(shared, head, 400);
            write_simple(
                writer,
                400,
                &[("Content-Type", "text/plain")],
                b"multi-range requests are not supported\n",
                is_head,
                !keep_alive,
            )?;
            return Ok(keep_alive);
        }
        Some(Fault::RefuseHead) => {
            record(shared, head, 405);
            write_simple(
                writer,
                405,
                &[("Allow", "GET, PUT, POST, PATCH, DELETE")],
                b"",
                true,
                !keep_alive,
            )?;
            return Ok(keep_alive);
        }
        Some(Fault::Redirect { location }) => {
            record(shared, head, 307);
            write_simple(
                writer,
                307,
                &[("Location", &location)],
                b"",
                is_head,
                !keep_alive,
            )?;
            return Ok(keep_alive);
        }
        Some(Fault::IgnoreRange) => strip_range = true,
        Some(Fault::DropMidBody { after }) => mode = BodyMode::DropAfter(after),
        Some(Fault::SlowBody { bytes_per_sec }) => mode = BodyMode::Slow(bytes_per_sec.max(1)),
        Some(Fault::CorruptBody { offset }) => corrupt_at = Some(offset),
        None => {}
    }

    let mut resp = match forward(shared, head, body.as_deref(), strip_range) {
        Ok(r) => r,
        Err(e) => {
            record(shared, head, 502);
            let msg = format!("fault proxy: upstream {} failed: {e}\n", shared.upstream);
            write_simple(
                writer,
                502,
                &[("Content-Type", "text/plain")],
                msg.as_bytes(),
                is_head,
                !keep_alive,
            )?;
            return Ok(keep_alive);
        }
    };
    if !resp.complete && content_length(&resp.headers).ok().flatten().is_none() {
        // Truncated chunked / until-close body: there is no honest length to announce.
        record(shared, head, 502);
        let msg = "fault proxy: upstream response body was truncated\n";
        write_simple(
            writer,
            502,
            &[("Content-Type", "text/plain")],
            msg.as_bytes(),
            is_head,
            true,
        )?;
        return Ok(false);
    }
    if let Some(off) = corrupt_at {
        if let Some(b) = resp.body.get_mut(off) {
            *b ^= 0xff;
        }
    }

    // Response head for the client.
    let mut out_headers: Vec<(String, String)> = Vec::new();
    let mut saw_length = false;
    for (k, v) in &resp.headers {
        let lk = k.to_ascii_lowercase();
        match lk.as_str() {
            "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "trailer"
            | "upgrade" => {}
            "content-length" => {
                if !saw_length {
                    saw_length = true;
                    out_headers.push((k.clone(), v.clone()));
                }
            }
            "location" | "content-location" => out_headers.push((
                k.clone(),
                rewrite_location(v, &shared.upstream, &shared.proxy_url),
            )),
            _ => out_headers.push((k.clone(), v.clone())),
        }
    }
    let body_allowed = !is_head && !bodyless_status(resp.status);
    if !saw_length && body_allowed {
        out_headers.push(("Content-Length".into(), resp.body.len().to_string()));
    }
    let will_close = !keep_alive || !resp.complete || matches!(mode, BodyMode::DropAfter(_));
    out_headers.push((
        "Connection".into(),
        if will_close { "close" } else { "keep-alive" }.into(),
    ));

    let mut head_bytes = format!("HTTP/1.1 {} {}\r\n", resp.status, resp.reason).into_bytes();
    for (k, v) in &out_headers {
        head_bytes.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    head_bytes.extend_from_slice(b"\r\n");

    record(shared, head, resp.status);
    writer.write_all(&head_bytes)?;
    let body: &[u8] = if body_allowed { &resp.body } else { &[] };
    match mode {
        BodyMode::Normal => writer.write_all(body)?,
        BodyMode::DropAfter(after) => {
            writer.write_all(&body[..after.min(body.len())])?;
            writer.flush()?;
            return Ok(false);
        }
        BodyMode::Slow(bps) => {
            let chunk = (bps / 20).clamp(1, 16 * 1024);
            let start = Instant::now();
            let mut sent = 0usize;
            while sent < body.len() {
                let n = chunk.min(body.len() - sent);
                writer.write_all(&body[sent..sent + n])?;
                writer.flush()?;
                sent += n;
                let due = Duration::from_secs_f64(sent as f64 / bps as f64);
                let elapsed = start.elapsed();
                if due > elapsed && sent < body.len() {
                    thread::sleep(due - elapsed);
                }
            }
        }
    }
    writer.flush()?;
    Ok(!will_close)
}

/// Write a locally generated response. `omit_body` for HEAD (Content-Length still describes the
/// body that would have been sent).
fn write_simple(
    w: &mut TcpStream,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    omit_body: bool,
    close: bool,
) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", status, reason_phrase(status));
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    out.push_str(if close {
        "Connection: close\r\n\r\n"
    } else {
        "Connection: keep-alive\r\n\r\n"
    });
    let mut bytes = out.into_bytes();
    if !omit_body {
        bytes.extend_from_slice(body);
    }
    w.write_all(&bytes)?;
    w.flush()
}

fn rewrite_location(loc: &str, upstream: &str, proxy_url: &str) -> String {
    let Some(rest) = loc.strip_prefix("http://") else {
        return loc.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority_is_upstream(authority, upstream) {
        format!("{proxy_url}{tail}")
    } else {
        loc.to_string()
    }
}

fn authority_is_upstream(authority: &str, upstream: &str) -> bool {
    if authority.eq_ignore_ascii_case(upstream) {
        return true;
    }
    let split = |a: &str| -> Option<(String, String)> {
        let (h, p) = a.rsplit_once(':')?;
        Some((h.to_ascii_lowercase(), p.to_string()))
    };
    let is_loopback = |h: &str| matches!(h, "127.0.0.1" | "localhost" | "[::1]");
    match (split(authority), split(upstream)) {
        (Some((ah, ap)), Some((uh, up))) => ap == up && is_loopback(&ah) && is_loopback(&uh),
        _ => false,
    }
}

fn forward(
    shared: &Shared,
    head: &RequestHead,
    body: Option<&[u8]>,
    strip_range: bool,
) -> io::Result<UpstreamResponse> {
    let addr: SocketAddr = match shared.upstream.parse() {
        Ok(a) => a,
        Err(_) => {
            use std::net::ToSocketAddrs;
            shared.upstream.to_socket_addrs()?.next().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "upstream address does not resolve")
            })?
        }
    };
    let mut up = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    up.set_nodelay(true)?;
    up.set_read_timeout(Some(Duration::from_secs(120)))?;
    up.set_write_timeout(Some(Duration::from_secs(120)))?;

    // Hop-by-hop headers plus anything the Connection header names.
    let mut drop: Vec<String> = [
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "trailer",
        "upgrade",
        "expect",
        "content-length",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(c) = head.header("connection") {
        drop.extend(
            c.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty()),
        );
    }
    if strip_range {
        drop.push("range".into());
        drop.push("if-range".into());
    }

    let mut req = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\n",
        head.method, head.path, shared.upstream
    );
    for (k, v) in &head.headers {
        if !drop.contains(&k.to_ascii_lowercase()) {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("Connection: close\r\n\r\n");
    let mut bytes = req.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    up.write_all(&bytes)?;
    up.flush()?;

    let mut r = BufReader::new(up);
    let is_head = head.method.eq_ignore_ascii_case("HEAD");
    loop {
        let mut budget = MAX_HEAD;
        let line = read_line(&mut r, &mut budget)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "upstream closed without a response",
            )
        })?;
        let mut parts = line.splitn(3, ' ');
        let _version = parts.next().unwrap_or("");
        let status: u16 = parts
            .next()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad status line {line:?}"),
                )
            })?;
        let reason = parts.next().unwrap_or("").trim().to_string();
        let reason = if reason.is_empty() {
            reason_phrase(status).to_string()
        } else {
            reason
        };
        let headers = read_headers(&mut r, &mut budget)?;
        if (100..200).contains(&status) {
            continue; // interim response; we never forward 1xx
        }

        let mut body = Vec::new();
        let mut complete = true;
        if !is_head && !bodyless_status(status) {
            if is_chunked(&headers) {
                complete = read_chunked(&mut r, &mut body).is_ok();
            } else if let Some(n) = content_length(&headers)? {
                // Read what arrives; a short read means the upstream truncated the body.
                let got = (&mut r).take(n as u64).read_to_end(&mut body);
                complete = got.is_ok() && body.len() == n;
            } else {
                complete = r.read_to_end(&mut body).is_ok();
            }
        }
        return Ok(UpstreamResponse {
            status,
            reason,
            headers,
            body,
            complete,
        });
    }
}

/// The referrers API emulation: remembers manifests with a subject (the request is forwarded
/// as usual, `None`), and answers referrers queries (`Some(index body)`).
fn referrers_api(shared: &Shared, head: &RequestHead, body: Option<&[u8]>) -> Option<Vec<u8>> {
    let (path, query) = head.path.split_once('?').unwrap_or((&head.path, ""));
    let rest = path.strip_prefix("/v2/")?;
    if head.method.eq_ignore_ascii_case("PUT") {
        let (repo, _) = rest.rsplit_once("/manifests/")?;
        let body = body?;
        let m: serde_json::Value = serde_json::from_slice(body).ok()?;
        let subject = m["subject"]["digest"].as_str()?.to_string();
        let mut desc = serde_json::json!({
            "mediaType": m["mediaType"].as_str().unwrap_or("application/vnd.oci.image.manifest.v1+json"),
            "digest": format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body))),
            "size": body.len(),
        });
        let artifact = m["artifactType"].as_str().or_else(|| m["config"]["mediaType"].as_str());
        if let Some(t) = artifact {
            desc["artifactType"] = serde_json::Value::String(t.to_string());
        }
        if m["annotations"].is_object() {
            desc["annotations"] = m["annotations"].clone();
        }
        let mut all = lock(&shared.referrers);
        let list = all.entry((repo.to_string(), subject)).or_default();
        list.retain(|d| d["digest"] != desc["digest"]);
        list.push(desc);
        return None;
    }
    if !head.method.eq_ignore_ascii_case("GET") && !head.method.eq_ignore_ascii_case("HEAD") {
        return None;
    }
    let (repo, digest) = rest.rsplit_once("/referrers/")?;
    let want = query.split('&').find_map(|kv| kv.strip_prefix("artifactType=")).map(|t| t.replace("%2B", "+").replace("%2b", "+").replace("%2F", "/").replace("%2f", "/"));
    let manifests: Vec<serde_json::Value> = lock(&shared.referrers)
        .get(&(repo.to_string(), digest.to_string()))
        .map(|l| l.iter().filter(|d| want.as_deref().is_none_or(|t| d["artifactType"] == t)).cloned().collect())
        .unwrap_or_default();
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
    Some(serde_json::to_vec(&index).unwrap())
}
