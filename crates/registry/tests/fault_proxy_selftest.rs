//! Self-test of the fault-injecting proxy in `support/fault_proxy.rs`, against a tiny in-test
//! upstream server (std only) serving a fixed 1 MiB body.

// Only the proxy module: keeps this test independent of the other support modules.
#[path = "support/fault_proxy.rs"]
mod fault_proxy;

use fault_proxy::{Fault, FaultProxy};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const SIZE: usize = 1 << 20;
const BLOB_PATH: &str = "/v2/test/repo/blobs/sha256:0123abcd";
const BOUNDARY: &str = "LAZYPULLBOUNDARY";

fn blob() -> Vec<u8> {
    (0..SIZE as u64)
        .map(|i| ((i * 31 + i / 251) % 251) as u8)
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

// ---------------------------------------------------------------------------------------------
// Upstream

#[derive(Clone, Debug)]
struct UpReq {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl UpReq {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Upstream {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<UpReq>>>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let h = hits.clone();
        let data = Arc::new(blob());
        thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { continue };
                let h = h.clone();
                let data = data.clone();
                thread::spawn(move || {
                    let _ = serve_one(s, addr, &data, &h);
                });
            }
        });
        Upstream { addr, hits }
    }

    fn hits(&self) -> Vec<UpReq> {
        self.hits.lock().unwrap().clone()
    }

    fn addr_str(&self) -> String {
        self.addr.to_string()
    }
}

type Head = (String, Vec<(String, String)>);

fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let first = line.trim_end().to_string();
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Some((first, headers)))
}

fn hdr<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Parse `bytes=a-b,c-` into inclusive ranges (enough for tests).
fn parse_ranges(spec: &str, total: usize) -> Vec<(usize, usize)> {
    spec.trim()
        .trim_start_matches("bytes=")
        .split(',')
        .map(|r| {
            let (a, b) = r.trim().split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b: usize = if b.is_empty() {
                total - 1
            } else {
                b.parse::<usize>().unwrap().min(total - 1)
            };
            (a, b)
        })
        .collect()
}

fn serve_one(
    s: TcpStream,
    self_addr: SocketAddr,
    data: &[u8],
    hits: &Mutex<Vec<UpReq>>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    let Some((line, headers)) = read_head(&mut r)? else {
        return Ok(());
    };
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap().to_string();
    let path = parts.next().unwrap().to_string();
    let chunked_in = hdr(&headers, "transfer-encoding").is_some();
    let mut body = Vec::new();
    if let Some(n) = hdr(&headers, "content-length") {
        body.resize(n.parse().unwrap(), 0);
        r.read_exact(&mut body)?;
    }
    hits.lock().unwrap().push(UpReq {
        method: method.clone(),
        path: path.clone(),
        headers: headers.clone(),
        body: body.clone(),
    });

    let is_head = method == "HEAD";
    let mut status = "200 OK".to_string();
    let mut out_headers: Vec<(String, String)> = vec![("Connection".into(), "close".into())];
    let mut out_body: Vec<u8> = Vec::new();
    let mut framing = "length"; // "length" | "chunked" | "close"

    if chunked_in {
        status = "400 Bad Request".into();
        out_body = b"proxy forwarded a chunked body\n".to_vec();
    } else if path.starts_with("/chunked") {
        framing = "chunked";
        out_body = data[..100_000].to_vec();
    } else if path.starts_with("/until-close") {
        framing = "close";
        out_body = data[..50_000].to_vec();
    } else if path.starts_with("/auth") {
        status = "401 Unauthorized".into();
        out_headers.push((
            "WWW-Authenticate".into(),
            r#"Bearer realm="http://127.0.0.1:1/token",service="test""#.into(),
        ));
        out_headers.push(("Content-Type".into(), "application/json".into()));
        out_body = br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#.to_vec();
    } else if path.starts_with("/redirect-localhost") {
        status = "307 Temporary Redirect".into();
        out_headers.push((
            "Location".into(),
            format!(
                "http://localhost:{}{}?from=redirect",
                self_addr.port(),
                BLOB_PATH
            ),
        ));
    } else if matches!(method.as_str(), "PUT" | "POST" | "PATCH") {
        status = "201 Created".into();
        out_headers.push((
            "Location".into(),
            format!("http://{self_addr}/v2/test/repo/blobs/uploads/u1?_state=x"),
        ));
        out_headers.push((
            "Docker-Content-Digest".into(),
            format!("sha256:{}", sha256_hex(&body)),
        ));
        out_headers.push(("X-Body-Len".into(), body.len().to_string()));
    } else {
        out_headers.push((
            "Docker-Content-Digest".into(),
            format!("sha256:{}", sha256_hex(data)),
        ));
        out_headers.push(("Accept-Ranges".into(), "bytes".into()));
        match hdr(&headers, "range") {
            None => {
                out_headers.push(("Content-Type".into(), "application/octet-stream".into()));
                out_body = data.to_vec();
            }
            Some(spec) => {
                let ranges = parse_ranges(spec, data.len());
                status = "206 Partial Content".into();
                if ranges.len() == 1 {
                    let (a, b) = ranges[0];
                    out_headers.push(("Content-Type".into(), "application/octet-stream".into()));
                    out_headers.push((
                        "Content-Range".into(),
                        format!("bytes {a}-{b}/{}", data.len()),
                    ));
                    out_body = data[a..=b].to_vec();
                } else {
                    out_headers.push((
                        "Content-Type".into(),
                        format!("multipart/byteranges; boundary={BOUNDARY}"),
                    ));
                    out_body = multipart(data, &ranges);
                }
            }
        }
    }

    let mut head = format!("HTTP/1.1 {status}\r\n");
    for (k, v) in &out_headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match framing {
        "length" => head.push_str(&format!("Content-Length: {}\r\n", out_body.len())),
        "chunked" => head.push_str("Transfer-Encoding: chunked\r\n"),
        _ => {}
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    if !is_head {
        if framing == "chunked" {
            for c in out_body.chunks(7000) {
                w.write_all(format!("{:x}\r\n", c.len()).as_bytes())?;
                w.write_all(c)?;
                w.write_all(b"\r\n")?;
            }
            w.write_all(b"0\r\n\r\n")?;
        } else {
            w.write_all(&out_body)?;
        }
    }
    w.flush()?;
    Ok(())
}

fn multipart(data: &[u8], ranges: &[(usize, usize)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(a, b) in ranges {
        out.extend_from_slice(
            format!(
                "\r\n--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{b}/{}\r\n\r\n",
                data.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(&data[a..=b]);
    }
    out.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    out
}

// ---------------------------------------------------------------------------------------------
// Raw client

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        hdr(&self.headers, name)
    }
}

struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    fn send(&mut self, method: &str, path: &str, extra: &[(&str, &str)], body: Option<&[u8]>) {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: registry.test\r\nUser-Agent: selftest\r\n");
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        self.w.write_all(req.as_bytes()).unwrap();
        if let Some(b) = body {
            self.w.write_all(b).unwrap();
        }
    }

    /// Read a Content-Length framed response (what the proxy always sends).
    fn recv(&mut self, was_head: bool) -> Resp {
        let (line, headers) = read_head(&mut self.r)
            .unwrap()
            .expect("EOF instead of response");
        let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(
            hdr(&headers, "transfer-encoding").is_none(),
            "proxy must not send chunked: {headers:?}"
        );
        let mut body = Vec::new();
        if !was_head && status != 204 && status != 304 {
            let n: usize = hdr(&headers, "content-length")
                .expect("Content-Length")
                .parse()
                .unwrap();
            body.resize(n, 0);
            self.r.read_exact(&mut body).unwrap();
        }
        Resp {
            status,
            headers,
            body,
        }
    }

    fn req(&mut self, method: &str, path: &str, extra: &[(&str, &str)]) -> Resp {
        self.send(method, path, extra, None);
        self.recv(method == "HEAD")
    }

    /// After the response: the server must have closed the connection.
    fn assert_closed(&mut self) {
        let mut buf = [0u8; 1];
        match self.r.read(&mut buf) {
            Ok(0) => {}
            Ok(_) => panic!("unexpected extra bytes after response"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected EOF, got {e}"),
        }
    }
}

fn one(proxy: &FaultProxy, method: &str, path: &str, extra: &[(&str, &str)]) -> Resp {
    Client::connect(proxy.addr).req(method, path, extra)
}

fn setup() -> (Upstream, FaultProxy) {
    let up = Upstream::start();
    let proxy = FaultProxy::start(&up.addr_str());
    (up, proxy)
}

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .expect("run curl")
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn passthrough_get_head_range_and_keepalive() {
    let (up, proxy) = setup();
    let data = blob();
    assert_eq!(proxy.url, format!("http://{}", proxy.addr));

    let mut c = Client::connect(proxy.addr);
    // HEAD first: Content-Length of the blob but no body; the next response on the same
    // connection must parse cleanly.
    let r = c.req("HEAD", BLOB_PATH, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("1048576"));
    assert_eq!(
        r.header("docker-content-digest").unwrap(),
        format!("sha256:{}", sha256_hex(&data))
    );

    let r = c.req("GET", BLOB_PATH, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, data);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));

    let r = c.req(
        "GET",
        &format!("{BLOB_PATH}?q=1"),
        &[("Range", "bytes=100-199")],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 100-199/1048576"));
    assert_eq!(r.body, &data[100..200]);

    // Upstream sees the rewritten Host, Connection: close, and the Range header.
    let hits = up.hits();
    assert_eq!(hits.len(), 3);
    for h in &hits {
        assert_eq!(h.header("host"), Some(up.addr_str().as_str()));
        assert_eq!(h.header("connection"), Some("close"));
        assert_eq!(h.header("user-agent"), Some("selftest"));
    }
    assert_eq!(hits[2].header("range"), Some("bytes=100-199"));
    assert_eq!(hits[2].path, format!("{BLOB_PATH}?q=1"));

    // Recording.
    let recs = proxy.requests();
    assert_eq!(recs.len(), 3);
    assert_eq!((recs[0].method.as_str(), recs[0].status), ("HEAD", 200));
    assert_eq!(recs[2].path, format!("{BLOB_PATH}?q=1"));
    assert_eq!(recs[2].status, 206);
    assert_eq!(recs[2].header("range"), Some("bytes=100-199"));
    assert_eq!(recs[0].header("host"), Some("registry.test"));
    assert_eq!(proxy.count("GET", "/blobs/"), 2);
    assert_eq!(proxy.count("head", "/blobs/"), 1);
    assert_eq!(proxy.count("", "q=1"), 1);
    assert_eq!(proxy.count("PUT", ""), 0);

    // Client asks to close: proxy honours it.
    let r = c.req(
        "GET",
        BLOB_PATH,
        &[("Connection", "close"), ("Range", "bytes=0-0")],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.header("connection"), Some("close"));
    c.assert_closed();
}

#[test]
fn curl_range_head_and_multirange_passthrough() {
    let (_up, proxy) = setup();
    let data = blob();
    let url = format!("{}{BLOB_PATH}", proxy.url);

    let out = curl(&["-r", "1000-1999", "-o", "-", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, &data[1000..2000]);

    let out = curl(&["-I", &url]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.contains("content-length: 1048576"), "{text}");

    // Multi-range: multipart/byteranges must pass through untouched.
    let r = one(
        &proxy,
        "GET",
        BLOB_PATH,
        &[("Range", "bytes=0-9,500-509,1048570-")],
    );
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-type").unwrap(),
        format!("multipart/byteranges; boundary={BOUNDARY}")
    );
    assert_eq!(
        r.body,
        multipart(&data, &[(0, 9), (500, 509), (1048570, 1048575)])
    );

    // Two curl transfers in one invocation reuse the connection.
    let out = curl(&["-v", "-o", "/dev/null", "-o", "/dev/null", &url, &url]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Re-using existing connection") || err.contains("Reusing existing connection"),
        "{err}"
    );
    assert_eq!(proxy.count("GET", BLOB_PATH), 4);
}

#[test]
fn drop_mid_body() {
    let (_up, proxy) = setup();
    let data = blob();
    proxy.inject(
        Some("GET"),
        "/blobs/",
        Fault::DropMidBody { after: 1000 },
        2,
    );

    let mut c = Client::connect(proxy.addr);
    c.send("GET", BLOB_PATH, &[], None);
    let (line, headers) = read_head(&mut c.r).unwrap().unwrap();
    assert!(line.contains(" 200 "), "{line}");
    assert_eq!(hdr(&headers, "content-length"), Some("1048576"));
    let mut got = Vec::new();
    let _ = c.r.read_to_end(&mut got);
    assert_eq!(got, &data[..1000]);
    assert_eq!(proxy.requests().last().unwrap().status, 200);

    // HEAD does not match (method filter); curl sees the second drop: exit 18 (partial file).
    assert_eq!(one(&proxy, "HEAD", BLOB_PATH, &[]).status, 200);
    let out = curl(&["-o", "/dev/null", &format!("{}{BLOB_PATH}", proxy.url)]);
    assert_eq!(
        out.status.code(),
        Some(18),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Consumed: third GET is whole.
    assert_eq!(one(&proxy, "GET", BLOB_PATH, &[]).body, data);
}

#[test]
fn status_faults_do_not_reach_upstream() {
    let (up, proxy) = setup();
    proxy.inject(None, "/manifests/", Fault::Status(503), 2);
    proxy.inject(None, "/manifests/", Fault::Status(404), 1);

    let mut c = Client::connect(proxy.addr);
    let path = "/v2/test/repo/manifests/latest";
    for _ in 0..2 {
        let r = c.req("GET", path, &[]);
        assert_eq!(r.status, 503);
        assert!(String::from_utf8_lossy(&r.body).contains("UNKNOWN"));
    }
    // The first rule is used up; the second wins now. HEAD gets no body but the same head.
    let r = c.req("HEAD", path, &[]);
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty());
    let r = c.req("GET", path, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(up.hits().len(), 1);

    for code in [500u16, 502, 401, 403] {
        proxy.inject(Some("GET"), "", Fault::Status(code), 1);
        let r = c.req("GET", BLOB_PATH, &[]);
        assert_eq!(r.status, code);
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    assert_eq!(up.hits().len(), 1);
    let statuses: Vec<u16> = proxy.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 503, 404, 200, 500, 502, 401, 403]);
}

#[test]
fn too_many_requests() {
    let (up, proxy) = setup();
    proxy.inject(
        None,
        "",
        Fault::TooManyRequests {
            retry_after_secs: 7,
        },
        1,
    );
    let r = one(&proxy, "GET", BLOB_PATH, &[]);
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert!(String::from_utf8_lossy(&r.body).contains("TOOMANYREQUESTS"));
    assert_eq!(one(&proxy, "GET", BLOB_PATH, &[]).status, 200);
    assert_eq!(up.hits().len(), 1);
}

#[test]
fn ignore_range() {
    let (up, proxy) = setup();
    let data = blob();
    proxy.inject(Some("GET"), "/blobs/", Fault::IgnoreRange, 1);
    let mut c = Client::connect(proxy.addr);
    // A request without Range does not consume the rule.
    assert_eq!(c.req("GET", BLOB_PATH, &[]).status, 200);
    let r = c.req(
        "GET",
        BLOB_PATH,
        &[("Range", "bytes=10-19"), ("If-Range", "\"etag\"")],
    );
    assert_eq!(r.status, 200);
    assert!(r.header("content-range").is_none());
    assert_eq!(r.body, data);
    let hits = up.hits();
    assert!(hits[1].header("range").is_none() && hits[1].header("if-range").is_none());
    // Recorded headers are what the client sent.
    assert_eq!(proxy.requests()[1].header("range"), Some("bytes=10-19"));
    // Used up.
    assert_eq!(
        c.req("GET", BLOB_PATH, &[("Range", "bytes=10-19")]).status,
        206
    );
}

#[test]
fn reject_multi_range() {
    let (_up, proxy) = setup();
    let data = blob();
    proxy.inject_always(None, "/blobs/", Fault::RejectMultiRange);
    let mut c = Client::connect(proxy.addr);
    for _ in 0..3 {
        let r = c.req("GET", BLOB_PATH, &[("Range", "bytes=0-9,20-29")]);
        assert_eq!(r.status, 400);
        let r = c.req("GET", BLOB_PATH, &[("Range", "bytes=0-9")]);
        assert_eq!(r.status, 206);
        assert_eq!(r.body, &data[..10]);
    }
    proxy.clear();
    let r = c.req("GET", BLOB_PATH, &[("Range", "bytes=0-9,20-29")]);
    assert_eq!(r.status, 206);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("multipart/byteranges"));
}

#[test]
fn slow_body() {
    let (_up, proxy) = setup();
    let data = blob();
    proxy.inject(
        None,
        "",
        Fault::SlowBody {
            bytes_per_sec: 200_000,
        },
        1,
    );
    let t = Instant::now();
    let r = one(&proxy, "GET", BLOB_PATH, &[("Range", "bytes=0-99999")]);
    let slow = t.elapsed();
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[..100_000]);
    assert!(
        slow >= Duration::from_millis(400),
        "100 kB at 200 kB/s took only {slow:?}"
    );
    assert!(slow < Duration::from_secs(5), "{slow:?}");

    let t = Instant::now();
    one(&proxy, "GET", BLOB_PATH, &[("Range", "bytes=0-99999")]);
    assert!(t.elapsed() < slow);
}

#[test]
fn refuse_head() {
    let (up, proxy) = setup();
    proxy.inject(None, "", Fault::RefuseHead, 1);
    let mut c = Client::connect(proxy.addr);
    // GET does not consume the HEAD-only rule.
    assert_eq!(c.req("GET", BLOB_PATH, &[]).status, 200);
    let r = c.req("HEAD", BLOB_PATH, &[]);
    assert_eq!(r.status, 405);
    assert_eq!(c.req("HEAD", BLOB_PATH, &[]).status, 200);
    assert_eq!(up.hits().len(), 2);

    proxy.inject_always(Some("HEAD"), "/manifests/", Fault::RefuseHead);
    let out = curl(&[
        "-I",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{}/v2/x/manifests/y", proxy.url),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "405");
}

#[test]
fn corrupt_body() {
    let (_up, proxy) = setup();
    let data = blob();
    proxy.inject(
        Some("GET"),
        BLOB_PATH,
        Fault::CorruptBody { offset: 12345 },
        1,
    );
    let r = one(&proxy, "GET", BLOB_PATH, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), data.len());
    let diffs: Vec<usize> = (0..data.len()).filter(|&i| r.body[i] != data[i]).collect();
    assert_eq!(diffs, vec![12345]);
    assert_eq!(r.body[12345], data[12345] ^ 0xff);
    assert_ne!(sha256_hex(&r.body), sha256_hex(&data));
    assert_eq!(one(&proxy, "GET", BLOB_PATH, &[]).body, data);
}

#[test]
fn redirect() {
    let (up, proxy) = setup();
    let data = blob();
    let target = format!("{}{BLOB_PATH}?signed=1", proxy.url);
    proxy.inject(
        Some("GET"),
        "/blobs/sha256:",
        Fault::Redirect {
            location: target.clone(),
        },
        1,
    );
    let r = one(&proxy, "GET", "/v2/test/repo/blobs/sha256:other", &[]);
    assert_eq!(r.status, 307);
    assert_eq!(r.header("location"), Some(target.as_str()));
    assert!(up.hits().is_empty());

    // curl -L follows it through the proxy.
    proxy.inject(
        Some("GET"),
        "/blobs/sha256:other",
        Fault::Redirect {
            location: target.clone(),
        },
        1,
    );
    let out = curl(&[
        "-L",
        "-o",
        "-",
        &format!("{}/v2/test/repo/blobs/sha256:other", proxy.url),
    ]);
    assert!(out.status.success());
    assert_eq!(out.stdout, data);
    assert_eq!(proxy.count("GET", "signed=1"), 1);
}

#[test]
fn upstream_location_is_rewritten_to_proxy() {
    let (up, proxy) = setup();
    let r = one(&proxy, "GET", "/redirect-localhost", &[]);
    assert_eq!(r.status, 307);
    assert_eq!(
        r.header("location").unwrap(),
        format!("{}{BLOB_PATH}?from=redirect", proxy.url)
    );

    let r = one(&proxy, "POST", "/v2/test/repo/blobs/uploads/", &[]);
    assert_eq!(r.status, 201);
    assert_eq!(
        r.header("location").unwrap(),
        format!("{}/v2/test/repo/blobs/uploads/u1?_state=x", proxy.url)
    );
    assert!(!r.header("location").unwrap().contains(&up.addr_str()));
}

#[test]
fn www_authenticate_passes_through() {
    let (_up, proxy) = setup();
    let r = one(
        &proxy,
        "GET",
        "/auth/v2/",
        &[("Authorization", "Bearer abc")],
    );
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Bearer realm="http://127.0.0.1:1/token",service="test""#)
    );
    assert_eq!(
        proxy.requests()[0].header("authorization"),
        Some("Bearer abc")
    );
}

#[test]
fn uploads_content_length_chunked_and_expect() {
    let (up, proxy) = setup();
    let data = blob();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload.bin");
    std::fs::write(&file, &data[..300_000]).unwrap();
    let at_file = format!("@{}", file.display());
    let url = format!("{}/v2/test/repo/blobs/uploads/u1?digest=x", proxy.url);

    // curl chunked upload (with Expect: 100-continue).
    let out = curl(&[
        "-X",
        "PUT",
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &at_file,
        "-D",
        "-",
        "-o",
        "/dev/null",
        &url,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let headers = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(headers.contains("100 continue"), "{headers}");
    assert!(headers.contains("201 created"), "{headers}");
    let digest = format!(
        "docker-content-digest: sha256:{}",
        sha256_hex(&data[..300_000])
    );
    assert!(headers.contains(&digest), "{headers}");
    assert!(
        headers.contains(&format!(
            "location: {}/v2/test/repo/blobs/uploads/u1?_state=x",
            proxy.url
        )),
        "{headers}"
    );

    let hits = up.hits();
    assert_eq!(hits[0].method, "PUT");
    assert_eq!(hits[0].header("content-length"), Some("300000"));
    assert!(hits[0].header("transfer-encoding").is_none() && hits[0].header("expect").is_none());
    assert_eq!(hits[0].body, &data[..300_000]);

    // Raw chunked PATCH, then a Content-Length PATCH, then an empty-bodied PUT, one connection.
    let mut c = Client::connect(proxy.addr);
    let mut req = b"PATCH /v2/test/repo/blobs/uploads/u1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for piece in data[..10_000].chunks(3000) {
        req.extend_from_slice(format!("{:X};ext=1\r\n", piece.len()).as_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\nX-Trailer: y\r\n\r\n");
    c.w.write_all(&req).unwrap();
    let r = c.recv(false);
    assert_eq!(r.status, 201);
    assert_eq!(r.header("x-body-len"), Some("10000"));

    c.send(
        "PATCH",
        "/v2/test/repo/blobs/uploads/u1",
        &[],
        Some(&data[..777]),
    );
    let r = c.recv(false);
    assert_eq!(r.header("x-body-len"), Some("777"));

    c.send(
        "PUT",
        "/v2/test/repo/blobs/uploads/u1?digest=sha256:e3",
        &[],
        Some(b""),
    );
    let r = c.recv(false);
    assert_eq!(r.header("x-body-len"), Some("0"));

    let hits = up.hits();
    assert_eq!(hits[1].body, &data[..10_000]);
    assert_eq!(hits[2].body, &data[..777]);
    assert_eq!(hits[3].header("content-length"), Some("0"));
    assert_eq!(proxy.count("PATCH", "/uploads/"), 2);

    // A status fault on an upload still consumes the body: the connection stays usable.
    proxy.inject(Some("PATCH"), "/uploads/", Fault::Status(500), 1);
    c.send(
        "PATCH",
        "/v2/test/repo/blobs/uploads/u1",
        &[],
        Some(&data[..5000]),
    );
    assert_eq!(c.recv(false).status, 500);
    c.send(
        "PATCH",
        "/v2/test/repo/blobs/uploads/u1",
        &[],
        Some(&data[..5000]),
    );
    assert_eq!(c.recv(false).header("x-body-len"), Some("5000"));
}

#[test]
fn upstream_chunked_and_close_delimited_bodies_are_reframed() {
    let (_up, proxy) = setup();
    let data = blob();
    let mut c = Client::connect(proxy.addr);
    let r = c.req("GET", "/chunked", &[]);
    assert_eq!(r.header("content-length"), Some("100000"));
    assert_eq!(r.body, &data[..100_000]);
    let r = c.req("GET", "/until-close", &[]);
    assert_eq!(r.header("content-length"), Some("50000"));
    assert_eq!(r.body, &data[..50_000]);
    let r = c.req("HEAD", "/chunked", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(c.req("GET", "/chunked", &[]).body.len(), 100_000);
}

#[test]
fn matching_rules_and_clear() {
    let (_up, proxy) = setup();
    proxy.inject(Some("HEAD"), "/manifests/", Fault::Status(404), 1);
    proxy.inject_always(None, "/manifests/", Fault::Status(500));
    let m = "/v2/r/manifests/v1";
    // First matching rule wins: HEAD hits the 404 rule, GET skips it and hits the 500 rule.
    assert_eq!(one(&proxy, "GET", m, &[]).status, 500);
    assert_eq!(one(&proxy, "HEAD", m, &[]).status, 404);
    assert_eq!(one(&proxy, "HEAD", m, &[]).status, 500);
    assert_eq!(one(&proxy, "GET", m, &[]).status, 500);
    assert_eq!(one(&proxy, "GET", BLOB_PATH, &[]).status, 200);
    proxy.inject(None, "", Fault::Status(503), 0); // times 0: no-op
    proxy.clear();
    assert_eq!(one(&proxy, "GET", m, &[]).status, 200);
    assert_eq!(proxy.count("*", "/manifests/"), 5);
}

#[test]
fn concurrent_clients() {
    let (up, proxy) = setup();
    let data = Arc::new(blob());
    let addr = proxy.addr;
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let data = data.clone();
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                for j in 0..5 {
                    let a = (i * 5 + j) * 1000;
                    let r = c.req(
                        "GET",
                        BLOB_PATH,
                        &[("Range", &format!("bytes={a}-{}", a + 4095))],
                    );
                    assert_eq!(r.status, 206);
                    assert_eq!(r.body, &data[a..a + 4096]);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(proxy.count("GET", ""), 40);
    assert_eq!(up.hits().len(), 40);
}

#[test]
fn upstream_down_gives_502() {
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let proxy = FaultProxy::start(&addr.to_string());
    let r = one(&proxy, "GET", "/v2/", &[]);
    assert_eq!(r.status, 502);
    assert_eq!(proxy.requests()[0].status, 502);
}

#[test]
fn drop_stops_proxy_and_closes_idle_clients() {
    let (_up, proxy) = setup();
    let addr = proxy.addr;
    let mut c = Client::connect(addr);
    assert_eq!(c.req("GET", "/v2/", &[]).status, 200);
    drop(proxy);
    c.assert_closed();
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
}
