//! Snapshot metadata in an embedded, crash-safe transactional store (redb).
//!
//! One table maps a snapshot key (as containerd names it: `namespace/N/name`) to its record;
//! a second holds the id counter. Every API call is one write transaction, so a crash leaves
//! either the state before the call or after it; directories are created before the commit and
//! removed again if it fails, and `Cleanup` removes directories no record refers to.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// Where a remote (lazily mounted) layer comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    pub image_ref: String,
    pub digest: String,
    pub size: u64,
    /// What authenticates the layer's index ([`layer::IndexCheck`] as text: a TOC digest, or
    /// a zstd:chunked manifest checksum); records of older versions call it `toc_digest`.
    #[serde(alias = "toc_digest")]
    pub index_check: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub kind: Kind,
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    /// Seconds and nanoseconds since the epoch.
    pub created: (i64, u32),
    pub updated: (i64, u32),
    /// Usage of a committed snapshot, measured at commit.
    pub size: i64,
    pub inodes: i64,
    pub remote: Option<RemoteLayer>,
}

/// Seconds and nanoseconds since the epoch, as records store times.
pub fn now() -> (i64, u32) {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

impl Record {
    /// A new record created now, with no usage measured yet.
    pub fn new(id: u64, kind: Kind, parent: &str, labels: BTreeMap<String, String>, remote: Option<RemoteLayer>) -> Record {
        let t = now();
        Record {
            id,
            kind,
            parent: parent.to_string(),
            labels,
            created: t,
            updated: t,
            size: 0,
            inodes: 0,
            remote,
        }
    }
}

pub struct Meta {
    db: Database,
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::Meta(e.to_string())
}

/// A write transaction over the snapshot table.
pub struct Tx {
    tx: redb::WriteTransaction,
}

impl Tx {
    pub fn get(&self, key: &str) -> Result<Option<Record>> {
        let t = self.tx.open_table(SNAPSHOTS).map_err(db_err)?;
        let v = t.get(key).map_err(db_err)?;
        v.map(|g| serde_json::from_slice(g.value()).map_err(db_err)).transpose()
    }

    pub fn put(&self, key: &str, r: &Record) -> Result<()> {
        let mut t = self.tx.open_table(SNAPSHOTS).map_err(db_err)?;
        t.insert(key, serde_json::to_vec(r).expect("serializable").as_slice()).map_err(db_err)?;
        Ok(())
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        let mut t = self.tx.open_table(SNAPSHOTS).map_err(db_err)?;
        t.remove(key).map_err(db_err)?;
        Ok(())
    }

    pub fn all(&self) -> Result<Vec<(String, Record)>> {
        let t = self.tx.open_table(SNAPSHOTS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push((k.value().to_string(), serde_json::from_slice(v.value()).map_err(db_err)?));
        }
        Ok(out)
    }

    pub fn next_id(&self) -> Result<u64> {
        let mut t = self.tx.open_table(COUNTERS).map_err(db_err)?;
        let next = t.get("id").map_err(db_err)?.map(|g| g.value()).unwrap_or(0) + 1;
        t.insert("id", next).map_err(db_err)?;
        Ok(next)
    }

    pub fn commit(self) -> Result<()> {
        self.tx.commit().map_err(db_err)
    }
}

impl Meta {
    pub fn open(path: &Path) -> Result<Meta> {
        let db = Database::create(path).map_err(|e| Error::Meta(format!("opening {}: {e}", path.display())))?;
        let m = Meta { db };
        // Create the tables so that read transactions find them.
        let tx = m.write()?;
        tx.tx.open_table(SNAPSHOTS).map_err(db_err)?;
        tx.tx.open_table(COUNTERS).map_err(db_err)?;
        tx.commit()?;
        Ok(m)
    }

    pub fn write(&self) -> Result<Tx> {
        Ok(Tx { tx: self.db.begin_write().map_err(db_err)? })
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(SNAPSHOTS).map_err(db_err)?;
        let v = t.get(key).map_err(db_err)?;
        v.map(|g| serde_json::from_slice(g.value()).map_err(db_err)).transpose()
    }

    pub fn all(&self) -> Result<Vec<(String, Record)>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(SNAPSHOTS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push((k.value().to_string(), serde_json::from_slice(v.value()).map_err(db_err)?));
        }
        Ok(out)
    }
}
