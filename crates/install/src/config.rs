//! Merging lazypull into containerd's `config.toml` (and taking it out again).
//!
//! # Why `toml_edit`
//!
//! A node's containerd config is hand-tuned (registry mirrors, `SystemdCgroup`, sandbox image)
//! and often commented. Deserializing it into a struct and serializing it back would drop
//! every comment, reorder keys and silently lose settings our struct does not know about.
//! `toml_edit` keeps the document as written: we touch only the handful of keys we own, an
//! existing key keeps its position, indentation and trailing comment, and an untouched
//! document prints back byte for byte. That last property is what makes the merge idempotent:
//! when every value is already what we want, nothing is modified and the output is the input.
//!
//! # Why version 2 (and how version 3 is handled)
//!
//! containerd 1.x reads `version = 2` configs, whose plugin tables are named by full plugin IDs
//! (`plugins."io.containerd.grpc.v1.cri"`); version 1 (containerd < 1.3, still what a file
//! without `version` means) used short names (`plugins.cri`); such configs are rare now and
//! not worth a second code path, so they are a typed error ([`ConfigError::UnsupportedVersion`],
//! [`ConfigError::NoVersion`]). A fresh config is written as version 2: containerd 1.7 needs it
//! and containerd 2.x migrates it in memory. A `version = 3` file (containerd 2.x) is handled
//! rather than refused: the proxy plugin section is the same, and the CRI image settings moved
//! to `plugins."io.containerd.cri.v1.images"` (`snapshotter`, `disable_snapshot_annotations`).
//!
//! # What is set
//!
//! * `proxy_plugins.lazypull`: `type = "snapshot"`, `address = <socket>`, and in its `exports`
//!   `root = <root>` (CRI reports image filesystem usage from it) and
//!   `enable_remote_snapshot_annotations = "true"` (as stargz-snapshotter installs do);
//! * the CRI snapshotter: `snapshotter = "lazypull"` and `disable_snapshot_annotations = false`
//!   (without the annotations the CRI plugin does not pass image refs and layer digests, and no
//!   layer can be mounted lazily).
//!
//! Any TOML spelling of those tables works: `[headers]`, dotted keys, inline tables. New keys
//! are added in the spelling of the table they go into (a key inside an inline table stays
//! inline, inside a dotted table it is dotted). Other proxy plugins are left alone.

use std::fmt;

use toml_edit::{DocumentMut, InlineTable, Item, Key, Table, TableLike, Value};

/// The name containerd knows the snapshotter by (`--snapshotter lazypull`).
pub const PLUGIN: &str = "lazypull";
/// What [`unmerge`] sets the CRI snapshotter back to: containerd's default.
pub const DEFAULT_SNAPSHOTTER: &str = "overlayfs";
/// The CRI plugin's table in a version 2 config.
const CRI_V2: [&str; 3] = ["plugins", "io.containerd.grpc.v1.cri", "containerd"];
/// The CRI image service's table in a version 3 config.
const CRI_V3: [&str; 2] = ["plugins", "io.containerd.cri.v1.images"];

/// What [`merge`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The snapshotter's unix socket (`proxy_plugins.lazypull.address`).
    pub address: String,
    /// The snapshotter's state directory (`proxy_plugins.lazypull.exports.root`).
    pub root: String,
}

/// The `version` of a config we can edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// containerd 1.3 – 1.7 (also read by 2.x).
    V2,
    /// containerd 2.x.
    V3,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V2 => "2",
            Version::V3 => "3",
        })
    }
}

/// The result of [`merge`] or [`unmerge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The new text; exactly the input when `changed` is false.
    pub text: String,
    /// Whether `text` differs from the input (containerd needs a restart only then).
    pub changed: bool,
    /// The version of the config (of the new one when the input was empty).
    pub version: Version,
}

/// Why a config cannot be edited. These carry no path; [`crate::Error::Config`] adds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid TOML at line {line}, column {column}: {message}")]
    Parse { line: usize, column: usize, message: String },
    #[error("containerd config version {found} is not supported: lazypull install edits version 2 (containerd 1.x) and version 3 (containerd 2.x) configs")]
    UnsupportedVersion { found: String },
    #[error("no `version` key, so containerd reads this as a version 1 config{layout}; lazypull install edits version 2 and 3 only: add `version = 2` and name plugins by their full IDs (e.g. `[plugins.\"io.containerd.grpc.v1.cri\"]` for `[plugins.cri]`)")]
    NoVersion {
        /// What gives the version 1 layout away (e.g. a `plugins.cri` table), or empty.
        layout: String,
    },
    #[error("`{key}` is {found}, expected a table")]
    NotATable { key: String, found: &'static str },
    #[error("`{key}` is {found}, expected a plain value")]
    NotAValue { key: String, found: &'static str },
}

/// Merges lazypull's settings into the config text `old` (`""` for a missing file).
///
/// Idempotent: merging the output again returns it unchanged, byte for byte.
pub fn merge(old: &str, settings: &Settings) -> Result<Merged, ConfigError> {
    let mut doc = parse(old)?;
    let version = match detect_version(&doc)? {
        Some(v) => v,
        None => {
            // A comment-only file's comments are the document's trailing text; keep them on top.
            let mut comments = doc.trailing().as_str().unwrap_or_default().trim_start().to_string();
            if !comments.is_empty() && !comments.ends_with('\n') {
                comments.push('\n');
            }
            doc.set_trailing("");
            doc.as_table_mut().insert("version", toml_edit::value(2));
            if let Some(mut key) = doc.as_table_mut().key_mut("version") {
                key.leaf_decor_mut().set_prefix(comments);
            }
            Version::V2
        }
    };
    let plugin = [&["proxy_plugins", PLUGIN][..]].concat();
    set(&mut doc, &plugin, "type", Value::from("snapshot"))?;
    set(&mut doc, &plugin, "address", Value::from(settings.address.as_str()))?;
    let exports = [&plugin[..], &["exports"]].concat();
    set(&mut doc, &exports, "root", Value::from(settings.root.as_str()))?;
    set(&mut doc, &exports, "enable_remote_snapshot_annotations", Value::from("true"))?;
    let cri: &[&str] = match version {
        Version::V2 => &CRI_V2,
        Version::V3 => &CRI_V3,
    };
    set(&mut doc, cri, "snapshotter", Value::from(PLUGIN))?;
    set(&mut doc, cri, "disable_snapshot_annotations", Value::from(false))?;
    Ok(finish(old, doc, version))
}

/// Takes out what [`merge`] put in, for an uninstall without a backup (best effort).
///
/// Removes `proxy_plugins.lazypull` (and `proxy_plugins` if that leaves it empty and it is not
/// written as a `[proxy_plugins]` header) and sets a CRI `snapshotter = "lazypull"` back to
/// containerd's default, `overlayfs`. `disable_snapshot_annotations = false` stays: install
/// cannot know whether it was false before (other remote snapshotters need it too), and it is
/// harmless for overlayfs. A missing or empty config is returned unchanged.
pub fn unmerge(old: &str) -> Result<Merged, ConfigError> {
    let mut doc = parse(old)?;
    let Some(version) = detect_version(&doc)? else {
        return Ok(Merged { text: old.to_string(), changed: false, version: Version::V2 });
    };
    if let Some(proxy) = doc.get_mut("proxy_plugins").and_then(Item::as_table_like_mut) {
        proxy.remove(PLUGIN);
        let keep_header = doc["proxy_plugins"].as_table().is_some_and(|t| !t.is_implicit() && !t.is_dotted());
        if doc["proxy_plugins"].as_table_like().is_some_and(|t| t.is_empty()) && !keep_header {
            doc.remove("proxy_plugins");
        }
    }
    let cri: &[&str] = match version {
        Version::V2 => &CRI_V2,
        Version::V3 => &CRI_V3,
    };
    let ours = lookup(doc.as_item(), cri).and_then(|t| t.get("snapshotter")).and_then(Item::as_str) == Some(PLUGIN);
    if ours {
        set(&mut doc, cri, "snapshotter", Value::from(DEFAULT_SNAPSHOTTER))?;
    }
    Ok(finish(old, doc, version))
}

fn finish(old: &str, doc: DocumentMut, version: Version) -> Merged {
    let text = doc.to_string();
    if text == old {
        Merged { text: old.to_string(), changed: false, version }
    } else {
        Merged { text, changed: true, version }
    }
}

fn parse(text: &str) -> Result<DocumentMut, ConfigError> {
    text.parse::<DocumentMut>().map_err(|e| {
        let at = e.span().map_or(0, |s| s.start.min(text.len()));
        let before = &text[..floor_char_boundary(text, at)];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigError::Parse { line, column, message: e.message().trim().to_string() }
    })
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The config's version; `None` for a document without any key (a fresh config).
fn detect_version(doc: &DocumentMut) -> Result<Option<Version>, ConfigError> {
    match doc.get("version") {
        Some(item) => match item.as_integer() {
            Some(2) => Ok(Some(Version::V2)),
            Some(3) => Ok(Some(Version::V3)),
            _ => {
                let found = item.as_value().map_or_else(|| item.type_name().to_string(), |v| v.to_string().trim().to_string());
                Err(ConfigError::UnsupportedVersion { found })
            }
        },
        None if doc.as_table().is_empty() => Ok(None),
        None => {
            let v1 = lookup(doc.as_item(), &["plugins"]).is_some_and(|p| ["cri", "linux", "opt", "cgroups", "bolt"].iter().any(|k| p.contains_key(k)));
            let layout = if v1 { " (its plugin tables use version 1 names such as `plugins.cri`)".to_string() } else { String::new() };
            Err(ConfigError::NoVersion { layout })
        }
    }
}

/// The table at `path`, if every step exists and is table-like.
fn lookup<'a>(mut item: &'a Item, path: &[&str]) -> Option<&'a dyn TableLike> {
    for key in path {
        item = item.as_table_like()?.get(key)?;
    }
    item.as_table_like()
}

/// Sets `path.key = value` unless it already is exactly that value (same type and contents),
/// creating the tables on the way in the spelling of their parent. A replaced value keeps the
/// old one's surrounding whitespace and comment.
fn set(doc: &mut DocumentMut, path: &[&str], key: &str, mut value: Value) -> Result<(), ConfigError> {
    let (table, inline) = table_at(doc.as_item_mut(), path)?;
    let dotted = dotted_path(path, key);
    match table.get_mut(key) {
        Some(Item::Value(old)) => {
            if same(old, &value) {
                return Ok(());
            }
            *value.decor_mut() = old.decor().clone();
            *old = value;
        }
        Some(Item::None) | None => {
            let indent = if inline { None } else { sibling_indent(table) };
            insert(table, inline, key, Item::Value(value));
            if let (Some(indent), Some(mut k)) = (indent, table.key_mut(key)) {
                k.leaf_decor_mut().set_prefix(indent);
            }
        }
        Some(other) => return Err(ConfigError::NotAValue { key: dotted, found: kind(other) }),
    }
    Ok(())
}

/// Walks (and creates) the tables of `path` below `root`; the flag says it is an inline table.
fn table_at<'a>(root: &'a mut Item, path: &[&str]) -> Result<(&'a mut dyn TableLike, bool), ConfigError> {
    let mut item = root;
    for (i, key) in path.iter().enumerate() {
        let (inline, dotted) = match &*item {
            Item::Table(t) => (false, t.is_dotted()),
            Item::Value(Value::InlineTable(_)) => (true, false),
            other => return Err(ConfigError::NotATable { key: dotted_path(&path[..i], ""), found: kind(other) }),
        };
        let table = item.as_table_like_mut().expect("checked above");
        if matches!(table.get(key), None | Some(Item::None)) {
            let child = if inline {
                Item::Value(Value::InlineTable(InlineTable::new()))
            } else {
                // Implicit: a table we create only to hold another one gets no `[header]`.
                let mut t = Table::new();
                t.set_implicit(true);
                t.set_dotted(dotted);
                Item::Table(t)
            };
            insert(table, inline, key, child);
        }
        item = table.get_mut(key).expect("present");
    }
    match item {
        Item::Table(_) => Ok((item.as_table_like_mut().expect("table"), false)),
        Item::Value(Value::InlineTable(_)) => Ok((item.as_table_like_mut().expect("inline table"), true)),
        other => Err(ConfigError::NotATable { key: dotted_path(path, ""), found: kind(other) }),
    }
}

/// Adds `key = item` at the end of the table. In an inline table the blank before `}` is the
/// last value's suffix: it moves to the new last value.
fn insert(table: &mut dyn TableLike, inline: bool, key: &str, mut item: Item) {
    if let (true, Some(new)) = (inline, item.as_value_mut()) {
        if let Some(last) = table.iter_mut().last().and_then(|(_, item)| item.as_value_mut()) {
            let suffix = last.decor().suffix().cloned();
            if let Some(suffix) = suffix.filter(|s| s.as_str().is_some_and(|s| s.trim().is_empty())) {
                last.decor_mut().set_suffix("");
                new.decor_mut().set_suffix(suffix);
            }
        }
    }
    table.insert(key, item);
}

/// The indentation of the table's first plain key (containerd's own output indents keys), for a
/// key we add.
fn sibling_indent(table: &dyn TableLike) -> Option<String> {
    // (In a dotted table the line's indentation is the leaf key's prefix too.)
    let (first, _) = table.iter().find(|(_, item)| item.is_value())?;
    let prefix = table.key(first)?.leaf_decor().prefix()?.as_str()?;
    (!prefix.is_empty() && prefix.chars().all(|c| c == ' ' || c == '\t')).then(|| prefix.to_string())
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(a), Value::String(b)) => a.value() == b.value(),
        (Value::Boolean(a), Value::Boolean(b)) => a.value() == b.value(),
        (Value::Integer(a), Value::Integer(b)) => a.value() == b.value(),
        _ => false,
    }
}

fn kind(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
        Item::Value(Value::InlineTable(_)) => "an inline table",
        Item::Value(Value::Array(_)) => "an array",
        Item::Value(Value::String(_)) => "a string",
        Item::Value(Value::Integer(_)) => "an integer",
        Item::Value(Value::Float(_)) => "a float",
        Item::Value(Value::Boolean(_)) => "a boolean",
        Item::Value(Value::Datetime(_)) => "a datetime",
    }
}

/// `plugins."io.containerd.grpc.v1.cri".containerd.snapshotter`, for messages.
fn dotted_path(path: &[&str], key: &str) -> String {
    path.iter().chain((!key.is_empty()).then_some(&key)).map(|k| Key::new(*k).display_repr().into_owned()).collect::<Vec<_>>().join(".")
}
