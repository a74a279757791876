//! Test support: a generator for tar corpora that exercise every header form the converter
//! must carry through byte-exactly, and a parser that turns any tar stream into comparable
//! entries (metadata + content digest).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest as _, Sha256};

/// How an entry's header is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Plain ustar (names must fit).
    Ustar,
    /// GNU header; long names via `././@LongLink`.
    Gnu,
    /// ustar preceded by a PAX `x` header (path, linkpath, xattrs, uname/gname).
    Pax,
}

#[derive(Clone, Debug)]
pub struct Item {
    pub name: String,
    pub kind: u8,
    pub data: Vec<u8>,
    pub link: String,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub uname: String,
    pub gname: String,
    pub mtime: u64,
    pub dev: (u32, u32),
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub style: Style,
}

impl Item {
    pub fn new(name: &str, kind: u8) -> Item {
        Item {
            name: name.to_string(),
            kind,
            data: Vec::new(),
            link: String::new(),
            mode: if kind == b'5' { 0o755 } else { 0o644 },
            uid: 1000,
            gid: 1000,
            uname: "user".into(),
            gname: "group".into(),
            mtime: 1_700_000_000,
            dev: (0, 0),
            xattrs: BTreeMap::new(),
            style: Style::Ustar,
        }
    }
    pub fn dir(name: &str) -> Item {
        Item::new(name, b'5')
    }
    pub fn file(name: &str, data: Vec<u8>) -> Item {
        let mut i = Item::new(name, b'0');
        i.data = data;
        i
    }
    pub fn symlink(name: &str, target: &str) -> Item {
        let mut i = Item::new(name, b'2');
        i.link = target.into();
        i.mode = 0o777;
        i
    }
    pub fn hardlink(name: &str, target: &str) -> Item {
        let mut i = Item::new(name, b'1');
        i.link = target.into();
        i
    }
    pub fn device(name: &str, kind: u8, major: u32, minor: u32) -> Item {
        let mut i = Item::new(name, kind);
        i.dev = (major, minor);
        i
    }
    pub fn style(mut self, s: Style) -> Item {
        self.style = s;
        self
    }
    pub fn owner(mut self, uid: u64, gid: u64, uname: &str, gname: &str) -> Item {
        self.uid = uid;
        self.gid = gid;
        self.uname = uname.into();
        self.gname = gname.into();
        self
    }
    pub fn mode(mut self, m: u32) -> Item {
        self.mode = m;
        self
    }
    pub fn xattr(mut self, k: &str, v: &[u8]) -> Item {
        self.xattrs.insert(k.into(), v.to_vec());
        self.style = Style::Pax;
        self
    }
}

/// Deterministic pseudo-random bytes (xorshift), incompressible enough to make real chunks.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    // "<len> key=value\n", where len counts itself.
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len += 1;
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

fn set_common(h: &mut tar::Header, it: &Item, name_fits: bool) {
    h.set_mode(it.mode);
    h.set_uid(it.uid);
    h.set_gid(it.gid);
    h.set_mtime(it.mtime);
    h.set_entry_type(tar::EntryType::new(it.kind));
    h.set_size(if it.kind == b'0' { it.data.len() as u64 } else { 0 });
    h.set_username(&it.uname).unwrap();
    h.set_groupname(&it.gname).unwrap();
    if it.kind == b'3' || it.kind == b'4' {
        h.set_device_major(it.dev.0).unwrap();
        h.set_device_minor(it.dev.1).unwrap();
    }
    if name_fits {
        let raw = it.name.as_bytes();
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..raw.len()].copy_from_slice(raw);
        if !it.link.is_empty() && it.link.len() <= 100 {
            old.linkname = [0; 100];
            old.linkname[..it.link.len()].copy_from_slice(it.link.as_bytes());
        }
    }
}

/// Writes the items as a tar stream.
pub fn write_tar(items: &[Item]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for it in items {
        match it.style {
            Style::Ustar => {
                assert!(it.name.len() <= 100 && it.link.len() <= 100, "{} needs a long-name style", it.name);
                let mut h = tar::Header::new_ustar();
                set_common(&mut h, it, true);
                h.set_cksum();
                b.append(&h, it.data.as_slice()).unwrap();
            }
            Style::Gnu => {
                let mut h = tar::Header::new_gnu();
                set_common(&mut h, it, false);
                if it.kind == b'1' || it.kind == b'2' {
                    b.append_link(&mut h, &it.name, &it.link).unwrap();
                } else {
                    b.append_data(&mut h, &it.name, it.data.as_slice()).unwrap();
                }
            }
            Style::Pax => {
                let mut recs = Vec::new();
                recs.extend(pax_record("path", it.name.as_bytes()));
                if !it.link.is_empty() {
                    recs.extend(pax_record("linkpath", it.link.as_bytes()));
                }
                recs.extend(pax_record("uname", it.uname.as_bytes()));
                // Sub-second times: the TOC rounds to the nearest second, like the reference.
                recs.extend(pax_record("mtime", format!("{}.25", it.mtime).as_bytes()));
                for (k, v) in &it.xattrs {
                    recs.extend(pax_record(&format!("SCHILY.xattr.{k}"), v));
                }
                let mut ph = tar::Header::new_ustar();
                ph.as_old_mut().name[..11].copy_from_slice(b"PaxHeaders0");
                ph.set_entry_type(tar::EntryType::XHeader);
                ph.set_size(recs.len() as u64);
                ph.set_mode(0o644);
                ph.set_cksum();
                b.append(&ph, recs.as_slice()).unwrap();
                let mut h = tar::Header::new_ustar();
                let mut short = it.clone();
                // The ustar fields carry a truncated name; the PAX record wins.
                short.name = it.name.chars().take(50).collect::<String>().replace('/', "_");
                short.link = String::new();
                set_common(&mut h, &short, true);
                h.set_cksum();
                b.append(&h, it.data.as_slice()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// One parsed tar entry, comparable across streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub name: String,
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub uname: String,
    pub gname: String,
    pub mtime: u64,
    pub size: u64,
    pub link: String,
    pub dev: (u32, u32),
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub sha256: String,
}

pub fn clean_name(n: &str) -> String {
    let n = n.trim_start_matches("./").trim_start_matches('/');
    n.trim_end_matches('/').to_string()
}

/// Parses a tar stream with the `tar` crate (an implementation independent of ours).
pub fn parse_tar(bytes: &[u8]) -> Vec<Parsed> {
    let mut a = tar::Archive::new(bytes);
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let mut xattrs = BTreeMap::new();
        let mut uname_pax = None;
        if let Some(exts) = e.pax_extensions().unwrap() {
            for ext in exts {
                let ext = ext.unwrap();
                let k = ext.key().unwrap().to_string();
                if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(x.to_string(), ext.value_bytes().to_vec());
                }
                if k == "uname" {
                    uname_pax = Some(String::from_utf8(ext.value_bytes().to_vec()).unwrap());
                }
            }
        }
        let h = e.header().clone();
        let name = clean_name(core::str::from_utf8(&e.path_bytes()).unwrap());
        let link = e.link_name_bytes().map(|l| String::from_utf8(l.to_vec()).unwrap()).unwrap_or_default();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push(Parsed {
            name,
            kind: h.entry_type().as_byte(),
            mode: h.mode().unwrap(),
            uid: h.uid().unwrap(),
            gid: h.gid().unwrap(),
            uname: uname_pax.unwrap_or_else(|| h.username().unwrap().unwrap_or("").to_string()),
            gname: h.groupname().unwrap().unwrap_or("").to_string(),
            mtime: h.mtime().unwrap(),
            size: data.len() as u64,
            link,
            dev: (h.device_major().ok().flatten().unwrap_or(0), h.device_minor().ok().flatten().unwrap_or(0)),
            xattrs,
            sha256: hex::encode(Sha256::digest(&data)),
        });
    }
    out
}

/// The entries a filesystem ends up with: later duplicates replace earlier ones.
pub fn last_wins(entries: Vec<Parsed>) -> BTreeMap<String, Parsed> {
    entries.into_iter().map(|p| (p.name.clone(), p)).collect()
}

/// Runs a system tool with `input` on stdin; returns stdout (panics with stderr on failure).
pub fn pipe(cmd: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(out.status.success(), "{cmd} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

pub fn sha256_hex(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Chunk size the corpus is built around (small, so "many chunks" stays cheap).
pub const CHUNK: usize = 4096;

/// The named corpora of the round-trip acceptance test.
pub fn corpora() -> Vec<(&'static str, Vec<Item>)> {
    let long_dir = "d".repeat(60);
    let long_name = format!("{long_dir}/{}", "n".repeat(120));
    let long_target = format!("/{}/{}", "t".repeat(80), "u".repeat(80));
    vec![
        (
            "pax-long-names",
            vec![
                Item::dir(&long_dir).style(Style::Pax),
                Item::file(&long_name, b"long name content\n".to_vec()).style(Style::Pax),
                Item::symlink(&format!("{long_dir}/{}", "s".repeat(110)), &long_target).style(Style::Pax),
                Item::hardlink(&format!("{long_dir}/{}", "h".repeat(110)), &long_name).style(Style::Pax),
            ],
        ),
        (
            "gnu-long-names",
            vec![
                Item::dir("g").style(Style::Gnu),
                Item::file(&format!("g/{}", "x".repeat(150)), noise(5000, 1)).style(Style::Gnu),
                Item::symlink(&format!("g/{}", "y".repeat(150)), &"z".repeat(150)).style(Style::Gnu),
            ],
        ),
        (
            "non-ascii",
            vec![
                Item::dir("données").style(Style::Pax),
                Item::file("données/日本語.txt", "こんにちは\n".as_bytes().to_vec()).style(Style::Pax),
                Item::file("données/emoji-🦀", b"crab".to_vec()).style(Style::Pax),
                Item::file("ünïcödé-ustar", b"x".to_vec()),
            ],
        ),
        (
            "xattrs",
            vec![
                Item::dir("x").xattr("user.dir", b"on a dir"),
                Item::file("x/caps", b"\x7fELF".to_vec()).xattr("security.capability", &[1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                Item::file("x/multi", noise(9000, 2)).xattr("user.a", b"1").xattr("user.b", b"binary\x00\xff"),
            ],
        ),
        (
            "links-and-specials",
            vec![
                Item::dir("etc"),
                Item::file("etc/big", noise(CHUNK * 5 + 123, 3)),
                Item::hardlink("etc/big-link", "etc/big"),
                Item::hardlink("etc/big-link2", "etc/big"),
                Item::file("etc/small", b"small".to_vec()),
                Item::hardlink("small-elsewhere", "etc/small"),
                Item::symlink("etc/rel-link", "small"),
                Item::symlink("abs-link", "/etc/small"),
                Item::symlink("dangling", "does/not/exist"),
                Item::dir("dev"),
                Item::device("dev/null", b'3', 1, 3).mode(0o666).owner(0, 0, "root", "root"),
                Item::device("dev/sda", b'4', 8, 0).mode(0o660).owner(0, 6, "root", "disk"),
                Item::new("dev/pipe", b'6').mode(0o600),
                Item::file("etc/setuid", b"#!/bin/sh\n".to_vec()).mode(0o4755).owner(0, 0, "root", "root"),
                Item::dir("tmp").mode(0o1777),
            ],
        ),
        (
            "sizes",
            vec![
                Item::dir("s"),
                Item::file("s/empty", Vec::new()),
                Item::file("s/empty2", Vec::new()),
                Item::file("s/one", vec![b'1']),
                Item::file("s/chunk-minus-1", noise(CHUNK - 1, 4)),
                Item::file("s/chunk", noise(CHUNK, 5)),
                Item::file("s/chunk-plus-1", noise(CHUNK + 1, 6)),
                Item::file("s/many", noise(CHUNK * 37 + 999, 7)),
                Item::file("s/zeros", vec![0u8; CHUNK * 8]),
                Item::file("s/after", b"after many".to_vec()),
            ],
        ),
        ("empty-layer", vec![]),
        (
            "duplicates",
            vec![
                Item::dir("a"),
                Item::file("a/f", b"first version".to_vec()),
                Item::file("a/g", b"g".to_vec()),
                Item::file("a/f", b"second version, longer".to_vec()).mode(0o600),
                Item::dir("a").mode(0o700),
                Item::symlink("a/g", "f"),
            ],
        ),
        (
            "whiteouts",
            vec![
                Item::dir("var"),
                Item::file("var/.wh.removed", Vec::new()),
                Item::dir("opaque"),
                Item::file("opaque/.wh..wh..opq", Vec::new()),
                Item::file("opaque/kept", b"kept".to_vec()),
            ],
        ),
        (
            "missing-parents",
            vec![
                Item::file("no/such/parent/file", b"orphan".to_vec()),
                Item::symlink("also/missing/link", "../x"),
                Item::file("./dot-slash/name", b"dot".to_vec()),
                Item::dir("no/such"),
            ],
        ),
    ]
}

pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Checks that a reader serves exactly the `want` entries (metadata and verified content).
pub fn reader_matches<S: estargz::BlobSource>(name: &str, r: &estargz::Reader<S>, want: &BTreeMap<String, Parsed>) {
    use estargz::NodeKind;
    let stats = estargz::verify_chunks(r).unwrap();
    assert!(stats.chunks >= want.values().filter(|p| p.kind == b'0' && p.size > 0).count() as u64);
    for (k, w) in want {
        let node = r.lookup(k).unwrap_or_else(|e| panic!("{name}: lookup {k}: {e}"));
        match w.kind {
            b'0' | b'\0' => {
                assert_eq!(node.kind, NodeKind::Reg, "{name}: {k}");
                let id = r.tree().lookup(k).unwrap();
                let mut buf = vec![0u8; node.size as usize];
                assert_eq!(r.read_file_at(id, 0, &mut buf, true).unwrap(), buf.len());
                assert_eq!(sha256_hex(&buf), format!("sha256:{}", w.sha256), "{name}: {k} content");
                assert_eq!(node.mode, w.mode & 0o7777, "{name}: {k} mode");
                assert_eq!((node.uid as u64, node.gid as u64), (w.uid, w.gid), "{name}: {k} owner");
                assert_eq!(node.user_name, w.uname, "{name}: {k} user name");
                assert_eq!(node.group_name, w.gname, "{name}: {k} group name");
                assert_eq!(node.mtime as u64, w.mtime, "{name}: {k} mtime");
                assert_eq!(node.xattrs, w.xattrs, "{name}: {k} xattrs");
            }
            b'1' => {
                let target = r.lookup(&clean_name(&w.link)).unwrap();
                assert!(std::ptr::eq(node, target), "{name}: hardlink {k} must resolve to its target's inode");
                assert!(node.nlink >= 2, "{name}: {k} nlink {}", node.nlink);
            }
            b'2' => {
                assert_eq!(node.kind, NodeKind::Symlink);
                assert_eq!(node.link_target, w.link);
            }
            b'3' | b'4' => {
                assert_eq!((node.dev_major, node.dev_minor), w.dev, "{name}: {k} device numbers");
                assert_eq!(node.kind, if w.kind == b'3' { NodeKind::Char } else { NodeKind::Block });
            }
            b'5' => {
                assert_eq!(node.kind, NodeKind::Dir);
                assert_eq!(node.mode, w.mode & 0o7777, "{name}: {k} dir mode");
                assert_eq!(node.xattrs, w.xattrs, "{name}: {k} xattrs");
            }
            b'6' => assert_eq!(node.kind, NodeKind::Fifo),
            other => panic!("unexpected type {other}"),
        }
    }
}

/// A blob of `items` converted with [`CHUNK`]-byte chunks.
pub fn small_chunk_blob(items: &[Item]) -> Vec<u8> {
    let mut out = Vec::new();
    let opts = estargz::BuildOptions { chunk_size: CHUNK as u64, ..Default::default() };
    estargz::build(write_tar(items).as_slice(), &mut out, &opts).unwrap();
    out
}

/// A copy of an eStargz (gzip) `blob` whose TOC is replaced by `toc` (payload unchanged, fresh
/// footer). How hostile TOCs are made: the writer refuses to write them.
pub fn swap_toc(blob: &[u8], toc: &estargz::Toc) -> Vec<u8> {
    let off = estargz::Reader::open(blob.to_vec()).unwrap().footer().toc_offset;
    let mut out = blob[..off as usize].to_vec();
    out.extend(toc_member(toc));
    out.extend_from_slice(&estargz::footer::estargz_footer(off));
    // `make fuzz` seeds its layer_read target with every hostile blob the tests make.
    if let Some(dir) = std::env::var_os("LAZYPULL_FUZZ_SEEDS") {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(std::path::Path::new(&dir).join(sha256_hex(&out)), &out);
    }
    out
}

/// `toc` as a gzip TOC member (tar entry `stargz.index.json` and end-of-archive marker).
pub fn toc_member(toc: &estargz::Toc) -> Vec<u8> {
    let json = toc.to_json();
    let mut member = estargz::tar::ustar_header("stargz.index.json", json.len() as u64, 0o644).to_vec();
    member.extend_from_slice(&json);
    member.resize(member.len().next_multiple_of(512) + 1024, 0);
    let mut out = Vec::new();
    estargz::compression::MemberCompressor::new(estargz::Compression::Gzip, 6).unwrap().compress(&member, &mut out);
    out
}

/// A raw ustar archive of regular files `(name, contents)`, names written verbatim (the `tar`
/// crate refuses to write the hostile ones).
pub fn raw_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        out.extend_from_slice(&estargz::tar::ustar_header(name, data.len() as u64, 0o644));
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}
