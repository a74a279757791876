//! `lazypull cache`: what the node's chunk store holds, per image and layer, and pruning it.
//!
//! The store is shared by every mount of a state directory (and by every layer daemon of the
//! snapshotter, whose daemons use its layer state directory). What a layer keeps in it is in
//! its reference file (`node::refs`); which layers are in use, and by which image, is in the
//! status files of mounts whose daemon is alive (`node::Record`). So usage is computed from
//! those files and the store's own files, without talking to any daemon, and pruning removes
//! exactly what no running mount references — a layer mounted again later fetches its chunks
//! again, as after an eviction.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use node::{MountStatus, Record, StateDir, StoredItem};
use serde::Serialize;
use store::{ChunkStore, StoreConfig};

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Show what the chunk store holds, per image and per layer.
    Usage {
        #[arg(long, default_value = "/var/lib/lazypull", value_name = "DIR")]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove every chunk no running mount uses; with --max-size, then evict the least
    /// recently used chunks (in use or not) until the store fits.
    Prune {
        #[arg(long, default_value = "/var/lib/lazypull", value_name = "DIR")]
        state_dir: PathBuf,
        /// Evict down to this many bytes after removing unused chunks.
        #[arg(long, value_name = "BYTES")]
        max_size: Option<u64>,
    },
}

pub fn run(c: CacheCommand) -> Result<()> {
    match c {
        CacheCommand::Usage { state_dir, json } => usage(&StateDir::new(state_dir), json),
        CacheCommand::Prune { state_dir, max_size } => prune(&StateDir::new(state_dir), max_size),
    }
}

#[derive(Serialize, Debug)]
struct LayerUsage {
    digest: String,
    /// Items (chunks and file objects) the layer keeps in the store, and how many are there.
    items: usize,
    items_present: usize,
    /// Bytes of the layer's items on disk (items shared with other layers count in each).
    bytes: u64,
    /// Images of running mounts that use the layer.
    images: Vec<String>,
}

#[derive(Serialize, Debug)]
struct ImageUsage {
    image: String,
    layers: usize,
    bytes: u64,
}

#[derive(Serialize, Debug)]
struct Usage {
    state_dir: PathBuf,
    /// Everything in the store (all layers, and items no reference file names).
    store_bytes: u64,
    store_items: usize,
    layers: Vec<LayerUsage>,
    images: Vec<ImageUsage>,
}

fn open_store(state: &StateDir) -> Result<std::sync::Arc<ChunkStore>> {
    let mut cfg = StoreConfig::new(state.cache_dir());
    cfg.memory_limit = 0;
    ChunkStore::open(cfg).with_context(|| format!("opening the chunk store in {}", state.cache_dir().display()))
}

/// Layer digest → images (sources) of the running mounts that use it.
fn layers_in_use(state: &StateDir) -> BTreeMap<String, BTreeSet<String>> {
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(state.mounts_dir()) else { return used };
    for e in rd.flatten() {
        let dir = e.path();
        let (Ok(rec), Ok(st)) = (Record::load(&dir), MountStatus::load(&dir)) else { continue };
        if !rec.daemon_alive() {
            continue;
        }
        for l in &st.layers {
            used.entry(l.digest.clone()).or_default().insert(st.source.clone());
        }
    }
    used
}

/// Every layer with a reference file: (digest, items).
fn recorded_layers(state: &StateDir) -> Vec<(String, Vec<StoredItem>)> {
    let Ok(rd) = std::fs::read_dir(state.refs_dir()) else { return Vec::new() };
    let mut out: Vec<(String, Vec<StoredItem>)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            // Reference files are named by the blob's hex digest; anything else is a temp file.
            (name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("sha256:{name}"))
        })
        .filter_map(|d| Some((d.clone(), node::read_refs(state, &d)?)))
        .collect();
    out.sort();
    out
}

fn item_bytes(store: &ChunkStore, item: &StoredItem) -> Option<u64> {
    match item {
        StoredItem::Chunk(d) => store.stored_bytes(d, false),
        StoredItem::Object(d) => store.stored_bytes(d, true),
    }
}

fn usage(state: &StateDir, json: bool) -> Result<()> {
    let store = open_store(state)?;
    let in_use = layers_in_use(state);
    let mut layers = Vec::new();
    let mut images: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for (digest, items) in recorded_layers(state) {
        let sizes: Vec<u64> = items.iter().filter_map(|i| item_bytes(&store, i)).collect();
        let bytes = sizes.iter().sum();
        let users: Vec<String> = in_use.get(&digest).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        for image in &users {
            let e = images.entry(image.clone()).or_default();
            e.0 += 1;
            e.1 += bytes;
        }
        layers.push(LayerUsage { digest, items: items.len(), items_present: sizes.len(), bytes, images: users });
    }
    let total = store.usage();
    let u = Usage {
        state_dir: state.path().to_path_buf(),
        store_bytes: total.disk_bytes,
        store_items: total.disk_chunks,
        layers,
        images: images.into_iter().map(|(image, (layers, bytes))| ImageUsage { image, layers, bytes }).collect(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&u)?);
        return Ok(());
    }
    println!("chunk store {}: {:.1} MB in {} items", state.cache_dir().display(), u.store_bytes as f64 / 1e6, u.store_items);
    for i in &u.images {
        println!("  image {}: {} layers, {:.1} MB", i.image, i.layers, i.bytes as f64 / 1e6);
    }
    for l in &u.layers {
        let users = if l.images.is_empty() { "not in use".to_string() } else { format!("used by {}", l.images.join(", ")) };
        println!("  layer {}: {:.1} MB, {}/{} items present, {users}", &l.digest[..19.min(l.digest.len())], l.bytes as f64 / 1e6, l.items_present, l.items);
    }
    Ok(())
}

fn prune(state: &StateDir, max_size: Option<u64>) -> Result<()> {
    let store = open_store(state)?;
    let in_use = layers_in_use(state);
    let mut keep: HashSet<StoredItem> = HashSet::new();
    for digest in in_use.keys() {
        match node::read_refs(state, digest) {
            Some(items) => keep.extend(items),
            // A running layer whose references are unknown: prune nothing rather than guess.
            None => anyhow::bail!("layer {digest} is in use but has no reference file in {}; nothing pruned", state.refs_dir().display()),
        }
    }
    let (n, bytes) = store.retain(|d, object| keep.contains(&if object { StoredItem::Object(*d) } else { StoredItem::Chunk(*d) }));
    println!("pruned {n} unused items ({:.1} MB); {} layers in use kept", bytes as f64 / 1e6, in_use.len());
    if let Some(target) = max_size {
        let (n, bytes) = store.shrink_to(target)?;
        println!("evicted {n} least recently used items ({:.1} MB) to fit {target} bytes", bytes as f64 / 1e6);
    }
    Ok(())
}
