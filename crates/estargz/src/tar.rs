//! A small tar indexer and header encoder.
//!
//! Why not the `tar` crate: conversion copies every entry's header blocks *verbatim* (PAX, GNU
//! long names and all), so the converted layer keeps exactly the metadata of its input, and it
//! needs the byte position of each entry's first extension header, which the crate does not
//! expose. The indexer therefore records, per entry, the raw header range, the payload position
//! and the parsed metadata the TOC needs, while streaming the archive once.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use crate::error::{Error, IoContext, Result};
use crate::limits::MAX_FILE_SIZE;

pub const BLOCK: u64 = 512;
/// Largest PAX or GNU long-name payload we accept (hostile input must not make us allocate).
const MAX_EXTENSION_SIZE: u64 = 16 << 20;

/// Kind of a tar entry, after extension headers are folded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarKind {
    Reg,
    Hardlink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

/// Metadata of one tar entry, as the TOC needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TarMeta {
    pub name: String,
    pub link_name: String,
    pub kind: Option<TarKind>,
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    pub uname: String,
    pub gname: String,
    /// Seconds since the epoch, rounded to the nearest second.
    pub mtime: i64,
    pub dev_major: i64,
    pub dev_minor: i64,
    /// From `SCHILY.xattr.*` PAX records.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl TarMeta {
    pub fn kind(&self) -> TarKind {
        self.kind.expect("indexed entries always have a kind")
    }
}

/// One entry of the indexed archive: where its header blocks and payload are.
#[derive(Debug, Clone)]
pub struct IndexedEntry {
    /// Offset of the first header block (an extension header if any).
    pub header_start: u64,
    /// Offset of the payload (just after the main header block).
    pub data_start: u64,
    /// Payload size in bytes (PAX `size` wins over the header field).
    pub size: u64,
    pub meta: TarMeta,
}

impl IndexedEntry {
    /// Payload rounded up to whole blocks.
    pub fn padded_size(&self) -> u64 {
        self.size.div_ceil(BLOCK) * BLOCK
    }
}

/// Result of indexing an archive.
#[derive(Debug, Default)]
pub struct TarIndex {
    pub entries: Vec<IndexedEntry>,
    /// Raw byte ranges of PAX global headers (kept and re-emitted first).
    pub global_headers: Vec<(u64, u64)>,
    /// Bytes consumed (up to and including the end-of-archive marker, if any).
    pub len: u64,
}

/// Streams `input`, copying every byte to `copy` (the spool), and returns the index.
pub fn index<R: Read, W: Write>(mut input: R, mut copy: W) -> Result<TarIndex> {
    let mut pos = 0u64;
    let mut idx = TarIndex::default();
    let mut pending_start: Option<u64> = None;
    let mut pax: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut global_pax: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut long_name: Option<String> = None;
    let mut long_link: Option<String> = None;
    let mut block = [0u8; BLOCK as usize];
    let mut buf = vec![0u8; 1 << 20];

    loop {
        let n = read_full(&mut input, &mut block).ctx(|| format!("reading tar header at byte {pos}"))?;
        if n == 0 {
            if pending_start.is_some() {
                return Err(invalid(pos, "archive ends after an extension header, before its entry"));
            }
            break; // EOF at a block boundary without end marker: accepted like GNU tar does
        }
        if n < block.len() {
            return Err(invalid(pos, "truncated header block"));
        }
        copy.write_all(&block).ctx(|| "writing tar spool".into())?;
        let header_pos = pos;
        pos += BLOCK;
        if block.iter().all(|&b| b == 0) {
            if pending_start.is_some() {
                return Err(invalid(header_pos, "end-of-archive marker right after an extension header"));
            }
            // Consume (and keep) whatever trailer follows so the spool holds the whole stream.
            loop {
                let n = input.read(&mut buf).ctx(|| "reading tar trailer".into())?;
                if n == 0 {
                    break;
                }
                copy.write_all(&buf[..n]).ctx(|| "writing tar spool".into())?;
                pos += n as u64;
            }
            break;
        }
        verify_checksum(&block, header_pos)?;
        let flag = block[156];
        let size = parse_number(&block[124..136]).ok_or_else(|| invalid(header_pos, "bad size field"))?;
        match flag {
            b'x' | b'g' | b'L' | b'K' => {
                if size > MAX_EXTENSION_SIZE {
                    return Err(invalid(header_pos, "extension header larger than 16 MiB"));
                }
                let padded = size.div_ceil(BLOCK) * BLOCK;
                let mut data = vec![0u8; padded as usize];
                let n = read_full(&mut input, &mut data).ctx(|| format!("reading extension header at byte {header_pos}"))?;
                if n < data.len() {
                    return Err(invalid(pos, "archive truncated inside an extension header"));
                }
                copy.write_all(&data).ctx(|| "writing tar spool".into())?;
                pos += padded;
                data.truncate(size as usize);
                match flag {
                    b'x' => parse_pax(&data, &mut pax, header_pos)?,
                    b'g' => {
                        parse_pax(&data, &mut global_pax, header_pos)?;
                        idx.global_headers.push((header_pos, pos));
                        continue;
                    }
                    b'L' => long_name = Some(utf8(trim_nul(&data), header_pos, "GNU long name")?),
                    _ => long_link = Some(utf8(trim_nul(&data), header_pos, "GNU long link name")?),
                }
                pending_start.get_or_insert(header_pos);
                continue;
            }
            _ => {}
        }

        let get = |k: &str| pax.get(k).or_else(|| global_pax.get(k));
        let mut meta = TarMeta::default();
        meta.name = match (get("path"), long_name.take()) {
            (Some(p), _) => utf8(p, header_pos, "PAX path")?,
            (None, Some(n)) => n,
            (None, None) => ustar_name(&block, header_pos)?,
        };
        meta.link_name = match (get("linkpath"), long_link.take()) {
            (Some(p), _) => utf8(p, header_pos, "PAX linkpath")?,
            (None, Some(n)) => n,
            (None, None) => utf8(trim_nul(&block[157..257]), header_pos, "link name")?,
        };
        meta.kind = Some(match flag {
            b'0' | b'7' => TarKind::Reg,
            0 if meta.name.ends_with('/') => TarKind::Dir,
            0 => TarKind::Reg,
            b'1' => TarKind::Hardlink,
            b'2' => TarKind::Symlink,
            b'3' => TarKind::Char,
            b'4' => TarKind::Block,
            b'5' => TarKind::Dir,
            b'6' => TarKind::Fifo,
            other => {
                return Err(Error::UnsupportedEntry {
                    path: meta.name,
                    flag: other as char,
                })
            }
        });
        let num = |r: std::ops::Range<usize>, what: &str| {
            parse_number(&block[r]).map(|v| v as i64).ok_or_else(|| invalid(header_pos, &format!("bad {what} field")))
        };
        meta.mode = num(100..108, "mode")?;
        meta.uid = num(108..116, "uid")?;
        meta.gid = num(116..124, "gid")?;
        meta.mtime = num(136..148, "mtime")?;
        meta.uname = utf8(trim_nul(&block[265..297]), header_pos, "user name")?;
        meta.gname = utf8(trim_nul(&block[297..329]), header_pos, "group name")?;
        if matches!(meta.kind, Some(TarKind::Char | TarKind::Block)) {
            meta.dev_major = num(329..337, "devmajor")?;
            meta.dev_minor = num(337..345, "devminor")?;
        }
        let mut size = size;
        let pax_num = |k: &str| -> Result<Option<i64>> {
            match get(k) {
                None => Ok(None),
                Some(v) => std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .map(Some)
                    .ok_or_else(|| invalid(header_pos, &format!("bad PAX {k} record"))),
            }
        };
        if let Some(s) = pax_num("size")? {
            size = u64::try_from(s).map_err(|_| invalid(header_pos, "negative PAX size"))?;
        }
        if let Some(v) = pax_num("uid")? {
            meta.uid = v;
        }
        if let Some(v) = pax_num("gid")? {
            meta.gid = v;
        }
        if let Some(v) = get("uname") {
            meta.uname = utf8(v, header_pos, "PAX uname")?;
        }
        if let Some(v) = get("gname") {
            meta.gname = utf8(v, header_pos, "PAX gname")?;
        }
        if let Some(v) = get("mtime") {
            meta.mtime = parse_pax_time(v).ok_or_else(|| invalid(header_pos, "bad PAX mtime record"))?;
        }
        for (k, v) in pax.iter() {
            if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                meta.xattrs.insert(x.to_string(), v.clone());
            }
        }
        // Links, directories and device nodes carry no payload even if the size field says so
        // (GNU tar writes hardlinks with size 0; some writers put the target's size there).
        if !matches!(meta.kind, Some(TarKind::Reg)) {
            size = 0;
        }
        // Readers refuse larger files, and block arithmetic on a size near 2^64 would wrap.
        if size > MAX_FILE_SIZE {
            return Err(invalid(header_pos, &format!("entry {:?}: size {size} exceeds the {MAX_FILE_SIZE}-byte file size limit", meta.name)));
        }
        let entry = IndexedEntry {
            header_start: pending_start.take().unwrap_or(header_pos),
            data_start: pos,
            size,
            meta,
        };
        pax.clear();
        // Copy the payload through.
        let padded = entry.padded_size();
        let mut left = padded;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = read_full(&mut input, &mut buf[..want]).ctx(|| format!("reading payload of {:?}", entry.meta.name))?;
            if n < want {
                // The final padding is sometimes missing in the wild; the payload itself must be whole.
                let got = padded - left + n as u64;
                if got < entry.size {
                    return Err(invalid(pos + got, &format!("archive truncated inside the payload of {:?}", entry.meta.name)));
                }
                copy.write_all(&buf[..n]).ctx(|| "writing tar spool".into())?;
                let pad = vec![0u8; (padded - got) as usize];
                copy.write_all(&pad).ctx(|| "writing tar spool".into())?;
                left = 0;
                break;
            }
            copy.write_all(&buf[..n]).ctx(|| "writing tar spool".into())?;
            left -= n as u64;
        }
        debug_assert_eq!(left, 0);
        pos += padded;
        idx.entries.push(entry);
    }
    copy.flush().ctx(|| "writing tar spool".into())?;
    idx.len = pos;
    Ok(idx)
}

fn invalid(offset: u64, reason: &str) -> Error {
    Error::InvalidTar {
        offset,
        reason: reason.to_string(),
    }
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn trim_nul(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

fn utf8(b: &[u8], offset: u64, what: &str) -> Result<String> {
    String::from_utf8(b.to_vec()).map_err(|_| invalid(offset, &format!("{what} is not valid UTF-8")))
}

fn ustar_name(block: &[u8; 512], offset: u64) -> Result<String> {
    let name = utf8(trim_nul(&block[0..100]), offset, "name")?;
    // POSIX ustar ("ustar\0" "00") has a prefix field; GNU ("ustar  \0") reuses that space.
    if &block[257..263] == b"ustar\0" {
        let prefix = utf8(trim_nul(&block[345..500]), offset, "name prefix")?;
        if !prefix.is_empty() {
            return Ok(format!("{prefix}/{name}"));
        }
    }
    Ok(name)
}

fn verify_checksum(block: &[u8; 512], offset: u64) -> Result<()> {
    let stored = parse_number(&block[148..156]).ok_or_else(|| invalid(offset, "bad checksum field"))?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if stored != unsigned && stored as i64 != signed {
        return Err(invalid(offset, "header checksum mismatch (not a tar archive, or corrupt)"));
    }
    Ok(())
}

/// Parses an octal (space/NUL padded) or base-256 numeric field.
pub(crate) fn parse_number(field: &[u8]) -> Option<u64> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            if first & 0x40 != 0 {
                return None; // negative base-256
            }
            let mut v: u64 = u64::from(first & 0x3f);
            for &b in &field[1..] {
                v = v.checked_mul(256)?.checked_add(u64::from(b))?;
            }
            return Some(v);
        }
    }
    let s: Vec<u8> = field.iter().copied().skip_while(|&b| b == b' ' || b == 0).take_while(|&b| b != b' ' && b != 0).collect();
    if s.is_empty() {
        return Some(0);
    }
    let mut v: u64 = 0;
    for b in s {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

fn parse_pax(data: &[u8], out: &mut BTreeMap<String, Vec<u8>>, offset: u64) -> Result<()> {
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest.iter().position(|&b| b == b' ').ok_or_else(|| invalid(offset, "malformed PAX record"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(offset, "malformed PAX record length"))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(invalid(offset, "malformed PAX record"));
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec.iter().position(|&b| b == b'=').ok_or_else(|| invalid(offset, "PAX record without '='"))?;
        let key = utf8(&rec[..eq], offset, "PAX key")?;
        let value = rec[eq + 1..].to_vec();
        if value.is_empty() {
            out.remove(&key); // an empty value deletes a (global) setting
        } else {
            out.insert(key, value);
        }
        rest = &rest[len..];
    }
    Ok(())
}

fn parse_pax_time(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = int.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Rounded to the nearest second like the reference writer (Go's `Round(time.Second)`),
    // so TOCs of the same input are identical.
    let up = frac.as_bytes().first().is_some_and(|&d| d >= b'5');
    Some(if up { if secs < 0 { secs - 1 } else { secs + 1 } } else { secs })
}

/// Encodes a plain ustar header block (used for the TOC entry and landmark files).
pub fn ustar_header(name: &str, size: u64, mode: u32) -> [u8; 512] {
    let mut h = [0u8; 512];
    let nb = name.as_bytes();
    assert!(nb.len() <= 100, "synthetic tar names are short");
    h[..nb.len()].copy_from_slice(nb);
    write_octal(&mut h[100..108], u64::from(mode));
    write_octal(&mut h[108..116], 0);
    write_octal(&mut h[116..124], 0);
    write_octal(&mut h[124..136], size);
    write_octal(&mut h[136..148], 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    write_octal(&mut h[329..337], 0);
    write_octal(&mut h[337..345], 0);
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    write_octal(&mut h[148..155], sum);
    h[155] = b' ';
    h
}

fn write_octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    assert!(s.len() <= digits, "value fits the field");
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"0000644\0"), Some(0o644));
        assert_eq!(parse_number(b"   644 \0"), Some(0o644));
        assert_eq!(parse_number(b"\0\0\0\0"), Some(0));
        assert_eq!(parse_number(&[0x80, 0, 0, 1, 0]), Some(256));
        assert_eq!(parse_number(b"0009"), None);
    }

    #[test]
    fn synthetic_header_is_valid() {
        let h = ustar_header("stargz.index.json", 1234, 0);
        let mut data = h.to_vec();
        data.extend(vec![0u8; 1234usize.div_ceil(512) * 512]);
        data.extend([0u8; 1024]);
        let idx = index(&data[..], std::io::sink()).unwrap();
        assert_eq!(idx.entries.len(), 1);
        assert_eq!(idx.entries[0].meta.name, "stargz.index.json");
        assert_eq!(idx.entries[0].size, 1234);
    }

    #[test]
    fn rejects_sizes_that_would_wrap() {
        let mut h = ustar_header("big", 0, 0o644);
        // base-256 size field of 2^64 - 1.
        h[124..128].copy_from_slice(&[0x80, 0, 0, 0]);
        h[128..136].fill(0xff);
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        write_octal(&mut h[148..155], sum);
        let e = index(&h[..], std::io::sink()).unwrap_err().to_string();
        assert!(e.contains("\"big\"") && e.contains("size"), "{e}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(index(&[7u8; 512][..], std::io::sink()).is_err());
        assert!(index(&[7u8; 100][..], std::io::sink()).is_err());
        let mut data = ustar_header("a", 1000, 0o644).to_vec();
        data.extend([1u8; 100]);
        let e = index(&data[..], std::io::sink()).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
