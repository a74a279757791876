//! The table of contents (`stargz.index.json`): its JSON schema and the constants around it.
//!
//! The schema mirrors the reference implementation field for field (same JSON keys, same
//! `omitempty` behaviour, same field order, tab-indented), so a TOC we write reads like one
//! written by `ctr-remote`, and a TOC written by any ecosystem tool parses here. Unknown keys
//! (such as the `NumLink` that old producers serialized) are ignored; xattr values are base64,
//! as Go's `[]byte` JSON encoding makes them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Name of the TOC tar entry, which must be the last entry of a gzip eStargz blob.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Landmark placed after the prioritized files: prefetch everything before it.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Landmark placed first when nothing is prioritized: do not prefetch this layer.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The one-byte content of both landmark files.
pub const LANDMARK_CONTENTS: u8 = 0x0f;
/// Default chunk size of the reference writer (4 MiB).
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// Layer annotation carrying the digest of the uncompressed TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation carrying the size of the whole decompressed layer stream.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// zstd:chunked annotation: sha256 of the compressed TOC bytes.
pub const ZSTD_MANIFEST_CHECKSUM_ANNOTATION: &str = "io.containers.zstd-chunked.manifest-checksum";
/// zstd:chunked annotation: `offset:compressedLen:uncompressedLen:1`.
pub const ZSTD_MANIFEST_POSITION_ANNOTATION: &str = "io.containers.zstd-chunked.manifest-position";

/// Kind of a TOC entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    /// A continuation chunk of the preceding `reg` entry.
    Chunk,
}

impl EntryType {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryType::Dir => "dir",
            EntryType::Reg => "reg",
            EntryType::Symlink => "symlink",
            EntryType::Hardlink => "hardlink",
            EntryType::Char => "char",
            EntryType::Block => "block",
            EntryType::Fifo => "fifo",
            EntryType::Chunk => "chunk",
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn is_zero_i(v: &i64) -> bool {
    *v == 0
}

/// One entry of the TOC, exactly as serialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: EntryType,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(rename = "modtime", default, skip_serializing_if = "String::is_empty")]
    pub mod_time: String,
    #[serde(rename = "linkName", default, skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(default, skip_serializing_if = "is_zero_i")]
    pub mode: i64,
    #[serde(default, skip_serializing_if = "is_zero_i")]
    pub uid: i64,
    #[serde(default, skip_serializing_if = "is_zero_i")]
    pub gid: i64,
    #[serde(rename = "userName", default, skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    #[serde(rename = "groupName", default, skip_serializing_if = "String::is_empty")]
    pub group_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(rename = "innerOffset", default, skip_serializing_if = "is_zero")]
    pub inner_offset: u64,
    #[serde(rename = "devMajor", default, skip_serializing_if = "is_zero_i")]
    pub dev_major: i64,
    #[serde(rename = "devMinor", default, skip_serializing_if = "is_zero_i")]
    pub dev_minor: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", with = "xattr_b64")]
    pub xattrs: BTreeMap<String, Vec<u8>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(rename = "chunkOffset", default, skip_serializing_if = "is_zero")]
    pub chunk_offset: u64,
    #[serde(rename = "chunkSize", default, skip_serializing_if = "is_zero")]
    pub chunk_size: u64,
    #[serde(rename = "chunkDigest", default, skip_serializing_if = "String::is_empty")]
    pub chunk_digest: String,
}

impl TocEntry {
    /// A bare entry of the given name and kind; every other field empty.
    pub fn new(name: impl Into<String>, kind: EntryType) -> Self {
        TocEntry {
            name: name.into(),
            kind,
            size: 0,
            mod_time: String::new(),
            link_name: String::new(),
            mode: 0,
            uid: 0,
            gid: 0,
            user_name: String::new(),
            group_name: String::new(),
            offset: 0,
            inner_offset: 0,
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            digest: String::new(),
            chunk_offset: 0,
            chunk_size: 0,
            chunk_digest: String::new(),
        }
    }

    /// Modification time in seconds since the Unix epoch (0 when absent).
    pub fn mtime(&self) -> Result<i64> {
        if self.mod_time.is_empty() {
            return Ok(0);
        }
        crate::time::parse_rfc3339(&self.mod_time)
            .ok_or_else(|| Error::InvalidToc(format!("entry {:?}: bad modtime {:?}", self.name, self.mod_time)))
    }

    /// True for entries that carry file payload (a `reg` with content, or a `chunk`).
    pub fn has_payload(&self) -> bool {
        match self.kind {
            EntryType::Reg => self.size > 0,
            EntryType::Chunk => true,
            _ => false,
        }
    }
}

/// The whole TOC document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Toc {
    pub version: u32,
    #[serde(default)]
    pub entries: Vec<TocEntry>,
}

impl Toc {
    /// Serializes like Go's `json.MarshalIndent(toc, "", "\t")`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 * self.entries.len() + 64);
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        self.serialize(&mut ser).expect("TOC serialization cannot fail");
        out
    }

    /// Parses TOC JSON and checks the version.
    pub fn from_json(bytes: &[u8]) -> Result<Toc> {
        let toc: Toc = serde_json::from_slice(bytes).map_err(|e| Error::InvalidToc(format!("JSON: {e}")))?;
        if toc.version != 1 {
            return Err(Error::InvalidToc(format!("unsupported TOC version {}", toc.version)));
        }
        Ok(toc)
    }

    /// Digest of the serialized TOC, the value of the `toc.digest` annotation.
    pub fn digest_of(json: &[u8]) -> Digest {
        Digest::of(json)
    }
}

mod xattr_b64 {
    use std::collections::BTreeMap;

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(map: &BTreeMap<String, Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(k, v)| (k, STANDARD.encode(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let raw: Option<BTreeMap<String, Option<String>>> = Option::deserialize(d)?;
        let mut out = BTreeMap::new();
        for (k, v) in raw.unwrap_or_default() {
            let v = v.unwrap_or_default();
            let bytes = STANDARD
                .decode(v.as_bytes())
                .map_err(|e| D::Error::custom(format!("xattr {k:?} is not base64: {e}")))?;
            out.insert(k, bytes);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerant_parse() {
        let json = br#"{"version":1,"entries":[
            {"name":"a","type":"reg","size":3,"NumLink":0,"xattrs":{"user.x":"aGk="},"modtime":"2020-01-02T03:04:05Z"},
            {"name":"b","type":"dir","someFutureKey":{"x":1}}]}"#;
        let toc = Toc::from_json(json).unwrap();
        assert_eq!(toc.entries[0].xattrs["user.x"], b"hi");
        assert_eq!(toc.entries[0].mtime().unwrap(), 1577934245);
        let back = Toc::from_json(&toc.to_json()).unwrap();
        assert_eq!(back, toc);
        assert!(String::from_utf8(toc.to_json()).unwrap().contains("\n\t\"entries\": [\n\t\t{"));
    }

    #[test]
    fn rejects_bad_toc() {
        assert!(Toc::from_json(br#"{"version":2,"entries":[]}"#).is_err());
        assert!(Toc::from_json(br#"{"version":1,"entries":[{"name":"a","type":"weird"}]}"#).is_err());
        assert!(Toc::from_json(br#"{"version":1,"entries":[{"name":"a","type":"reg","size":-1}]}"#).is_err());
        assert!(Toc::from_json(br#"{"version":1,"#).is_err());
    }
}
