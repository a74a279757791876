//! containerd config merging on realistic configs and on every TOML spelling.

use std::collections::BTreeMap;

use install::{merge, unmerge, ConfigError, Settings, Version};

const V17: &str = include_str!("data/containerd-1.7-default.toml");
const V3: &str = include_str!("data/containerd-2.0-v3.toml");
const PEER: &str = include_str!("data/peer-containerd.toml");
const PEER_NOCRI: &str = include_str!("data/peer-containerd-nocri.toml");

const V2_CRI: &str = "plugins.io.containerd.grpc.v1.cri.containerd";
const V3_CRI: &str = "plugins.io.containerd.cri.v1.images";

fn settings() -> Settings {
    Settings { address: "/run/lazypull/lazypull.sock".into(), root: "/var/lib/lazypull/snapshotter".into() }
}

/// Every leaf value by its path (keys joined with `.`, unquoted: unambiguous enough here).
fn leaves(text: &str) -> BTreeMap<String, toml::Value> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    walk(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let table: toml::Table = toml::from_str(text).unwrap_or_else(|e| panic!("does not parse: {e}\n{text}"));
    let mut out = BTreeMap::new();
    walk("", &toml::Value::Table(table), &mut out);
    out
}

/// The leaves a merge must set, for the version's CRI table.
fn ours(cri: &str) -> BTreeMap<String, toml::Value> {
    let s = |v: &str| toml::Value::String(v.into());
    BTreeMap::from([
        ("proxy_plugins.lazypull.type".to_string(), s("snapshot")),
        ("proxy_plugins.lazypull.address".to_string(), s("/run/lazypull/lazypull.sock")),
        ("proxy_plugins.lazypull.exports.root".to_string(), s("/var/lib/lazypull/snapshotter")),
        ("proxy_plugins.lazypull.exports.enable_remote_snapshot_annotations".to_string(), s("true")),
        (format!("{cri}.snapshotter"), s("lazypull")),
        (format!("{cri}.disable_snapshot_annotations"), toml::Value::Boolean(false)),
    ])
}

/// The merge of `old` keeps every other leaf, sets ours and adds nothing else.
fn check_merge(old: &str, cri: &str) -> String {
    let m = merge(old, &settings()).unwrap();
    assert!(m.changed);
    let before = leaves(old);
    let after = leaves(&m.text);
    let ours = ours(cri);
    for (k, v) in &ours {
        assert_eq!(after.get(k), Some(v), "{k} in\n{}", m.text);
    }
    for (k, v) in &before {
        if !ours.contains_key(k) {
            assert_eq!(after.get(k), Some(v), "{k} changed or lost");
        }
    }
    for k in after.keys() {
        assert!(before.contains_key(k) || ours.contains_key(k) || k == "version", "{k} added");
    }
    m.text
}

fn comments(text: &str) -> Vec<&str> {
    // Whole-line comments, and trailing ones (` # ` after a value; no value here contains it).
    text.lines().filter_map(|l| if l.trim_start().starts_with('#') { Some(l.trim()) } else { l.find(" # ").map(|i| l[i..].trim()) }).collect()
}

#[test]
fn realistic_configs_keep_every_setting() {
    for (old, cri) in [(V17, V2_CRI), (V3, V3_CRI), (PEER, V2_CRI), (PEER_NOCRI, V2_CRI)] {
        let new = check_merge(old, cri);
        for c in comments(old) {
            assert!(new.contains(c), "comment {c:?} lost");
        }
    }
}

#[test]
fn merge_is_idempotent_and_byte_identical() {
    for old in [V17, V3, PEER, PEER_NOCRI, "", "# nothing yet\n"] {
        let once = merge(old, &settings()).unwrap();
        let twice = merge(&once.text, &settings()).unwrap();
        assert!(!twice.changed, "second merge changed:\n{}", once.text);
        assert_eq!(twice.text, once.text);
    }
}

#[test]
fn default_config_changes_only_the_lines_we_own() {
    let new = merge(V17, &settings()).unwrap().text;
    let diff = install::unified_diff(V17, &new, "a", "b", 0);
    let removed: Vec<&str> = diff.lines().filter(|l| l.starts_with('-') && !l.starts_with("---")).collect();
    assert_eq!(removed, ["-      disable_snapshot_annotations = true", "-      snapshotter = \"overlayfs\" # the default snapshotter for CRI pulls"], "{diff}");
    // Replaced values keep their indentation and trailing comment, in place.
    assert!(new.contains("\n      disable_snapshot_annotations = false\n      discard_unpacked_layers"), "{new}");
    assert!(new.contains("\n      snapshotter = \"lazypull\" # the default snapshotter for CRI pulls\n"), "{new}");
    // The new plugin goes under the existing `[proxy_plugins]`, before `[stream_processors]`.
    let (p, l, s) = (new.find("\n[proxy_plugins]\n").unwrap(), new.find("[proxy_plugins.lazypull]").unwrap(), new.find("\n[stream_processors]").unwrap());
    assert!(p < l && l < s, "{new}");
    assert!(new.contains("[proxy_plugins.lazypull]\ntype = \"snapshot\"\naddress = \"/run/lazypull/lazypull.sock\"\n"), "{new}");
    // Settings the node depends on are still there, verbatim.
    assert!(new.contains("            # kubelet's cgroupDriver is systemd\n            SystemdCgroup = true\n"));
    assert!(new.contains("      config_path = \"/etc/containerd/certs.d\"\n"));
}

#[test]
fn version_3_sets_the_cri_images_plugin() {
    let m = merge(V3, &settings()).unwrap();
    assert_eq!(m.version, Version::V3);
    let after = leaves(&m.text);
    assert!(!after.keys().any(|k| k.starts_with("plugins.io.containerd.grpc.v1.cri.containerd")), "v2 table added to a v3 config");
    assert!(m.text.contains("    snapshotter = \"lazypull\"\n    disable_snapshot_annotations = false\n"), "{}", m.text);
}

#[test]
fn missing_or_empty_file_gives_a_minimal_v2_config() {
    for old in ["", "\n", "# containerd config\n"] {
        let m = merge(old, &settings()).unwrap();
        assert!(m.changed);
        assert_eq!(m.version, Version::V2);
        let after = leaves(&m.text);
        assert_eq!(after.get("version"), Some(&toml::Value::Integer(2)));
        let want = ours(V2_CRI);
        assert_eq!(after.len(), want.len() + 1, "{}", m.text);
        for (k, v) in want {
            assert_eq!(after.get(&k), Some(&v));
        }
        assert!(m.text.starts_with(&format!("{}version = 2\n", old.trim_start())), "{}", m.text);
        assert!(!m.text.contains("[proxy_plugins]") && !m.text.contains("[plugins]"), "implicit parents get no header:\n{}", m.text);
    }
}

#[test]
fn inline_tables_stay_inline() {
    let old = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  containerd = { snapshotter = \"overlayfs\" } # CRI\n\n[proxy_plugins]\n  stargz = { type = \"snapshot\", address = \"/run/stargz.sock\" }\n";
    let new = check_merge(old, V2_CRI);
    assert!(new.contains("  containerd = { snapshotter = \"lazypull\", disable_snapshot_annotations = false } # CRI\n"), "{new}");
    assert!(new.contains("  stargz = { type = \"snapshot\", address = \"/run/stargz.sock\" }\n"), "{new}");

    // A whole section as one inline table: what we add goes into it.
    let old = "version = 2\nproxy_plugins = { stargz = { type = \"snapshot\", address = \"/s\" } }\n";
    let new = check_merge(old, V2_CRI);
    assert!(new.contains("proxy_plugins = { stargz = { type = \"snapshot\", address = \"/s\" }, lazypull = {"), "{new}");
}

#[test]
fn dotted_keys_stay_dotted() {
    let old = "version = 2\nplugins.\"io.containerd.grpc.v1.cri\".containerd.snapshotter = \"overlayfs\"\nproxy_plugins.lazypull.type = \"snapshot\"\n";
    let new = check_merge(old, V2_CRI);
    assert!(!new.contains('['), "a header was added:\n{new}");
    assert!(new.contains("plugins.\"io.containerd.grpc.v1.cri\".containerd.snapshotter = \"lazypull\"\n"), "{new}");
    assert!(new.contains("proxy_plugins.lazypull.exports.root = \"/var/lib/lazypull/snapshotter\"\n"), "{new}");

    // Dotted keys inside a header table.
    let old = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  containerd.snapshotter = \"overlayfs\"\n  sandbox_image = \"pause:3.9\"\n";
    let new = check_merge(old, V2_CRI);
    assert!(new.contains("\n  containerd.snapshotter = \"lazypull\"\n  containerd.disable_snapshot_annotations = false\n  sandbox_image"), "{new}");
    assert_eq!(merge(&new, &settings()).unwrap().text, new);
}

#[test]
fn other_proxy_plugins_are_kept_and_our_address_updated() {
    let new = check_merge(PEER, V2_CRI);
    assert!(new.contains("  [proxy_plugins.stargz]\n    type = \"snapshot\"\n    address = \"/run/containerd-test/stargz/stargz.sock\"\n"), "{new}");
    assert!(new.contains("  [proxy_plugins.lazypull]\n    type = \"snapshot\"\n    address = \"/run/lazypull/lazypull.sock\"\n"), "{new}");
    assert_eq!(new.matches("[proxy_plugins.lazypull]").count(), 1);
    // A plugin of ours registered with another type is corrected; its extra keys stay.
    let old = "version = 2\n[proxy_plugins.lazypull]\ntype = \"content\"\naddress = \"/old.sock\"\nplatform = \"linux/amd64\"\n[proxy_plugins.lazypull.exports]\nroot = \"/old\"\nenable_remote_snapshot_annotations = true\n";
    let new = check_merge(old, V2_CRI);
    assert!(new.contains("platform = \"linux/amd64\""));
    assert!(new.contains("enable_remote_snapshot_annotations = \"true\""), "exports are strings:\n{new}");
}

#[test]
fn wrong_versions_are_typed_errors() {
    let err = |t: &str| merge(t, &settings()).unwrap_err();
    assert_eq!(err("version = 1\n[plugins.cri]\n"), ConfigError::UnsupportedVersion { found: "1".into() });
    assert_eq!(err("version = 4\n"), ConfigError::UnsupportedVersion { found: "4".into() });
    assert_eq!(err("version = \"2\"\n"), ConfigError::UnsupportedVersion { found: "\"2\"".into() });
    match err("root = \"/var/lib/containerd\"\n[plugins.cri.containerd]\nsnapshotter = \"overlayfs\"\n") {
        ConfigError::NoVersion { layout } => assert!(layout.contains("plugins.cri"), "{layout}"),
        e => panic!("{e:?}"),
    }
    let e = err("root = \"/var/lib/containerd\"\n");
    assert!(matches!(e, ConfigError::NoVersion { ref layout } if layout.is_empty()), "{e:?}");
    assert!(e.to_string().contains("version 1"), "{e}");
    assert!(err("version = 1\n").to_string().contains("version 1 is not supported"));
}

#[test]
fn invalid_toml_reports_the_line() {
    match merge("version = 2\n\n[plugins\nx = 1\n", &settings()).unwrap_err() {
        ConfigError::Parse { line, message, .. } => {
            assert_eq!(line, 3);
            assert!(!message.is_empty());
        }
        e => panic!("{e:?}"),
    }
    match merge("version = 2\n[grpc]\naddress = \"a\"\naddress = \"b\"\n", &settings()).unwrap_err() {
        ConfigError::Parse { line, .. } => assert_eq!(line, 4),
        e => panic!("{e:?}"),
    }
}

#[test]
fn keys_of_the_wrong_kind_are_typed_errors() {
    let e = merge("version = 2\nproxy_plugins = \"none\"\n", &settings()).unwrap_err();
    assert_eq!(e, ConfigError::NotATable { key: "proxy_plugins".into(), found: "a string" });
    let e = merge("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.snapshotter]\nx = 1\n", &settings()).unwrap_err();
    assert_eq!(e, ConfigError::NotAValue { key: "plugins.\"io.containerd.grpc.v1.cri\".containerd.snapshotter".into(), found: "a table" });
}

#[test]
fn unmerge_takes_out_what_merge_added() {
    for (old, cri) in [(V17, V2_CRI), (V3, V3_CRI), (PEER_NOCRI, V2_CRI)] {
        let merged = merge(old, &settings()).unwrap().text;
        let back = unmerge(&merged).unwrap();
        assert!(back.changed);
        let after = leaves(&back.text);
        assert!(!after.keys().any(|k| k.starts_with("proxy_plugins.lazypull")), "{}", back.text);
        if after.contains_key(&format!("{cri}.snapshotter")) {
            assert_eq!(after[&format!("{cri}.snapshotter")], toml::Value::String("overlayfs".into()));
        }
        // Everything else as before (disable_snapshot_annotations stays false by design).
        let before = leaves(old);
        for (k, v) in &before {
            if !k.ends_with("disable_snapshot_annotations") {
                assert_eq!(after.get(k), Some(v), "{k}");
            }
        }
        assert!(!unmerge(&back.text).unwrap().changed);
    }
    // The 1.7 default keeps its explicit `[proxy_plugins]` header.
    let back = unmerge(&merge(V17, &settings()).unwrap().text).unwrap().text;
    assert!(back.contains("\n[proxy_plugins]\n\n[stream_processors]"), "{back}");
    // A config we created from nothing loses its proxy_plugins section entirely.
    let back = unmerge(&merge("", &settings()).unwrap().text).unwrap().text;
    assert!(!back.contains("proxy_plugins"), "{back}");
    assert!(!unmerge("").unwrap().changed);
    assert!(!unmerge(V17).unwrap().changed);
}
