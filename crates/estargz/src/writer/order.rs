//! Entry order of a converted layer: de-duplication, prioritized files and the landmark.
//!
//! Mirrors the reference converter so optimized images behave identically in either
//! snapshotter: existing TOC/landmark entries are dropped, a name that occurs twice keeps its
//! last occurrence (at that position), prioritized files come first in the order given, each
//! preceded by its missing parent directories and (for hardlinks) the link target, then the
//! landmark, then everything else in input order.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::path::{normalize, parent};
use crate::tar::{IndexedEntry, TarKind};
use crate::toc::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME};

/// One output item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// Index into the input's entries.
    Entry(usize),
    /// A synthetic landmark file with this name.
    Landmark(&'static str),
}

/// The ordered output plus the prioritized paths that were not found.
#[derive(Debug)]
pub struct Ordered {
    pub items: Vec<Item>,
    pub missing: Vec<String>,
}

/// Orders `entries` for output. Fails on unsafe names (absolute, `..`) in names or hardlink
/// targets, because a converted layer must never carry them further.
pub fn order(entries: &[IndexedEntry], prioritized: &[String]) -> Result<Ordered> {
    let mut names = Vec::with_capacity(entries.len());
    let mut last: HashMap<String, usize> = HashMap::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let n = normalize(&e.meta.name, "tar entry name")?;
        // `.`, `./` and the like name the layer root, which readers require to be a directory
        // (found by `make fuzz`: a FIFO named `./` made a blob nobody could open).
        if n.is_empty() && e.meta.kind() != TarKind::Dir {
            return Err(Error::InvalidArgument(format!("tar entry {:?} names the layer root but is not a directory", e.meta.name)));
        }
        if e.meta.kind() == TarKind::Hardlink {
            normalize(&e.meta.link_name, "hardlink target")?;
        }
        last.insert(n.clone(), i);
        names.push(n);
    }
    let reserved = |n: &str| n == TOC_TAR_NAME || n == PREFETCH_LANDMARK || n == NO_PREFETCH_LANDMARK;
    let kept = |i: usize| last.get(&names[i]) == Some(&i) && !reserved(&names[i]);

    // A hardlink must name a non-directory the layer keeps: readers (ours and the reference)
    // refuse a TOC whose hardlink dangles, so such a layer must fail here, not at mount time.
    for (i, e) in entries.iter().enumerate() {
        if !kept(i) || e.meta.kind() != TarKind::Hardlink {
            continue;
        }
        let target = normalize(&e.meta.link_name, "hardlink target")?;
        let problem = match last.get(&target) {
            None => Some("which is not in the layer"),
            Some(_) if reserved(&target) => Some("which is a reserved eStargz name"),
            Some(&t) if entries[t].meta.kind() == TarKind::Dir => Some("which is a directory"),
            Some(&t) if t == i => Some("itself"),
            Some(_) => None,
        };
        if let Some(p) = problem {
            return Err(Error::InvalidTar {
                offset: e.header_start,
                reason: format!("hardlink {:?} points at {:?}, {p}", e.meta.name, e.meta.link_name),
            });
        }
    }

    // An entry below a name the layer keeps as a non-directory: no reader can place it (found by
    // `make fuzz`: such a blob did not open). Refused, naming both.
    for (i, e) in entries.iter().enumerate() {
        if !kept(i) {
            continue;
        }
        let mut p = parent(&names[i]);
        while let Some(dir) = p.filter(|d| !d.is_empty()) {
            if let Some(&d) = last.get(dir) {
                if !reserved(dir) && entries[d].meta.kind() != TarKind::Dir {
                    return Err(Error::InvalidTar {
                        offset: e.header_start,
                        reason: format!("entry {:?} is inside {:?}, which the layer has as a non-directory", e.meta.name, entries[d].meta.name),
                    });
                }
            }
            p = parent(dir);
        }
    }

    let mut taken: HashSet<usize> = HashSet::new();
    let mut first: Vec<Item> = Vec::new();
    let mut missing = Vec::new();

    fn take(i: usize, entries: &[IndexedEntry], names: &[String], last: &HashMap<String, usize>, taken: &mut HashSet<usize>, out: &mut Vec<Item>, depth: usize) {
        if taken.contains(&i) || depth > 64 {
            return;
        }
        // Parents first (only those the archive has; implicit ones need no entry).
        let mut ancestors = Vec::new();
        let mut p = parent(&names[i]);
        while let Some(dir) = p {
            if dir.is_empty() {
                break;
            }
            if let Some(&d) = last.get(dir) {
                ancestors.push(d);
            }
            p = parent(dir);
        }
        for &d in ancestors.iter().rev() {
            if taken.insert(d) {
                out.push(Item::Entry(d));
            }
        }
        if entries[i].meta.kind() == TarKind::Hardlink {
            if let Ok(t) = normalize(&entries[i].meta.link_name, "hardlink target") {
                if let Some(&ti) = last.get(&t) {
                    take(ti, entries, names, last, taken, out, depth + 1);
                }
            }
        }
        if taken.insert(i) {
            out.push(Item::Entry(i));
        }
    }

    for p in prioritized {
        // Lists recorded from a running container hold absolute paths.
        let key = match normalize(p.trim_start_matches('/'), "prioritized path") {
            Ok(k) => k,
            Err(_) => {
                missing.push(p.clone());
                continue;
            }
        };
        match last.get(&key) {
            Some(&i) if !reserved(&key) => take(i, entries, &names, &last, &mut taken, &mut first, 0),
            _ => missing.push(p.clone()),
        }
    }

    let mut items = Vec::with_capacity(entries.len() + 1);
    if first.is_empty() {
        items.push(Item::Landmark(NO_PREFETCH_LANDMARK));
    } else {
        items.append(&mut first);
        items.push(Item::Landmark(PREFETCH_LANDMARK));
    }
    items.extend((0..entries.len()).filter(|&i| kept(i) && !taken.contains(&i)).map(Item::Entry));
    Ok(Ordered { items, missing })
}
