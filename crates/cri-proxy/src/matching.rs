//! kubelet's rules for matching images against patterns, as its credential keyring applies
//! them (`pkg/credentialprovider/keyring.go`), and Go's duration syntax.
//!
//! They are reproduced rule for rule rather than "improved" because the same config file and
//! the same plugins are used by kubelet: a pattern must select exactly the images it selects
//! there. Both sides are schemeless URLs, `host[:port][/path]`:
//!
//! - the ports must be equal (no port matches only no port);
//! - the hosts must have the same number of dot-separated parts, each matched as a shell glob
//!   (`*`, `[a-z]`): `*.registry.io` matches `eu.registry.io`, not `registry.io` nor
//!   `a.b.registry.io` (a `?` starts the URL's query there, as in Go, so it matches nothing);
//! - the pattern's path must be a string prefix of the image's path (`r.io/team` matches
//!   `r.io/team/app` and also `r.io/teamx`).

use std::time::Duration;

/// A schemeless URL split the way Go's `url.Parse("https://" + s)` and `net.SplitHostPort`
/// split it; `None` where Go's parser fails (e.g. `busybox:latest`, whose "port" is no number).
#[derive(Debug, PartialEq, Eq)]
struct Url<'a> {
    host: &'a str,
    port: &'a str,
    path: &'a str,
}

fn parse_schemeless(s: &str) -> Option<Url<'_>> {
    let s = &s[..s.find(['?', '#']).unwrap_or(s.len())];
    let (authority, path) = s.find('/').map_or((s, ""), |i| (&s[..i], &s[i..]));
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, ""),
            p => (host, p.strip_prefix(':')?),
        }
    } else {
        authority.rsplit_once(':').unwrap_or((authority, ""))
    };
    if !port.bytes().all(|b| b.is_ascii_digit()) || host.contains(':') && !authority.starts_with('[') {
        return None;
    }
    Some(Url { host, port, path })
}

/// Whether `target` (an image) matches `glob` (a `matchImages` entry or an auth key).
pub fn urls_match(glob: &str, target: &str) -> bool {
    let (Some(g), Some(t)) = (parse_schemeless(glob), parse_schemeless(target)) else { return false };
    if g.port != t.port || !t.path.starts_with(g.path) {
        return false;
    }
    let (gp, tp): (Vec<&str>, Vec<&str>) = (g.host.split('.').collect(), t.host.split('.').collect());
    gp.len() == tp.len() && gp.iter().zip(&tp).all(|(g, t)| glob_match(g, t))
}

/// Go's `filepath.Match` for a name without separators; a malformed pattern matches nothing.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    glob(&p, &n)
}

fn glob(p: &[char], n: &[char]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some('*') => (0..=n.len()).any(|i| glob(&p[1..], &n[i..])),
        Some('?') => !n.is_empty() && glob(&p[1..], &n[1..]),
        Some('[') => match (n.first(), class(&p[1..])) {
            (Some(c), Some((matches, rest))) => matches(*c) && glob(rest, &n[1..]),
            _ => false,
        },
        Some('\\') => p.len() > 1 && n.first() == Some(&p[1]) && glob(&p[2..], &n[1..]),
        Some(c) => n.first() == Some(c) && glob(&p[1..], &n[1..]),
    }
}

type ClassMatch<'a> = (Box<dyn Fn(char) -> bool + 'a>, &'a [char]);

/// A `[...]` class (after the `[`): its predicate and the pattern after the `]`.
fn class(p: &[char]) -> Option<ClassMatch<'_>> {
    let (negated, mut i) = if p.first() == Some(&'^') { (true, 1) } else { (false, 0) };
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let c = *p.get(i)?;
        if c == ']' && !first {
            break;
        }
        first = false;
        let lo = if c == '\\' {
            i += 1;
            *p.get(i)?
        } else {
            c
        };
        i += 1;
        let hi = if p.get(i) == Some(&'-') && p.get(i + 1).is_some_and(|c| *c != ']') {
            i += 1;
            let c = if p[i] == '\\' {
                i += 1;
                *p.get(i)?
            } else {
                p[i]
            };
            i += 1;
            c
        } else {
            lo
        };
        if lo > hi {
            return None;
        }
        ranges.push((lo, hi));
    }
    let rest = &p[i + 1..];
    Some((Box::new(move |c| ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != negated), rest))
}

/// The keyring's key for an auth entry: scheme removed, docker's `/v1/` and `/v2/` API
/// prefixes dropped from the path, a bare `/` path removed.
pub fn keyring_key(location: &str) -> String {
    let rest = location.strip_prefix("https://").or_else(|| location.strip_prefix("http://")).unwrap_or(location);
    let (host, path) = rest.find('/').map_or((rest, ""), |i| (&rest[..i], &rest[i..]));
    let path = if path.starts_with("/v2/") || path.starts_with("/v1/") { &path[3..] } else { path };
    if path.is_empty() || path == "/" {
        host.to_string()
    } else {
        format!("{host}{path}")
    }
}

/// kubelet's `isDefaultRegistryMatch`: whether the image is pulled from Docker Hub.
fn is_default_registry_match(image: &str) -> bool {
    let Some((first, _)) = image.split_once('/') else { return !image.is_empty() };
    !first.is_empty() && (first == "docker.io" || first == "index.docker.io" || !first.contains(['.', ':']))
}

/// The entry for `image` among `(location, value)` pairs, as kubelet's keyring picks it: keys
/// in reverse lexical order (so `quay.io/team` is tried before `quay.io`, and `a.r.io` before
/// `*.r.io`), first match wins; then an `index.docker.io` entry for Docker Hub images. Of
/// entries with the same key the first given wins.
pub fn keyring_lookup<'a, T>(entries: impl IntoIterator<Item = (&'a str, &'a T)>, image: &str) -> Option<&'a T> {
    let mut keyed: Vec<(String, &T)> = Vec::new();
    for (location, value) in entries {
        let key = keyring_key(location);
        if !keyed.iter().any(|(k, _)| *k == key) {
            keyed.push((key, value));
        }
    }
    keyed.sort_by(|a, b| b.0.cmp(&a.0));
    keyed
        .iter()
        .find(|(k, _)| urls_match(k, image))
        .or_else(|| keyed.iter().find(|(k, _)| k == "index.docker.io").filter(|_| is_default_registry_match(image)))
        .map(|(_, v)| *v)
}

/// A Go `time.Duration` string (`"5m0s"`, `"1h"`, `"1.5h"`, `"300ms"`, `"0"`); negative
/// durations are clamped to zero (which means "do not cache" where it is used).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        nanos += value * scale;
        rest = after;
    }
    if negative || nanos <= 0.0 {
        return Some(Duration::ZERO);
    }
    Some(Duration::from_nanos(nanos.min(u64::MAX as f64) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_images_like_kubelet() {
        let yes = [
            ("*.registry.io", "eu.registry.io/app:1"),
            ("registry.io", "registry.io/a/b@sha256:00"),
            ("*.*.registry.io", "a.b.registry.io/x"),
            ("registry.io:5000", "registry.io:5000/x"),
            ("registry.io/team", "registry.io/team/app"),
            ("registry.io/team", "registry.io/teamx"),
            ("reg-[0-9].io", "reg-7.io"),
            ("reg-[^0-9].io", "reg-a.io"),
            ("*.dkr.ecr.*.amazonaws.com", "123.dkr.ecr.eu-west-1.amazonaws.com/app"),
            ("[::1]:5000", "[::1]:5000/x"),
        ];
        for (g, t) in yes {
            assert!(urls_match(g, t), "{g} should match {t}");
        }
        let no = [
            ("*.registry.io", "registry.io/x"),
            ("*.registry.io", "a.b.registry.io/x"),
            ("registry.io", "registry.io:5000/x"),
            ("registry.io:5000", "registry.io/x"),
            ("registry.io:5000", "registry.io:5001/x"),
            ("registry.io/team", "registry.io/other"),
            ("registry.io/team/app", "registry.io/team"),
            ("reg-[0-9].io", "reg-a.io"),
            ("reg-[.io", "reg-[.io"),
            ("docker.io", "busybox:latest"),
            ("busybox", "busybox:latest"),
            ("*.io", "r.com"),
            // As in Go's URL parser, `?` starts a query: the host of this pattern is `reg-`.
            ("reg-?.io", "reg-1.io/x"),
        ];
        for (g, t) in no {
            assert!(!urls_match(g, t), "{g} should not match {t}");
        }
    }

    #[test]
    fn keyring_prefers_most_specific() {
        let entries = [
            ("*.r.io", 1),
            ("a.r.io", 2),
            ("https://q.io/v2/", 3),
            ("q.io/team", 4),
            ("q.io/team/app", 5),
            ("https://index.docker.io/v1/", 6),
        ];
        let get = |image: &str| keyring_lookup(entries.iter().map(|(k, v)| (*k, v)), image).copied();
        assert_eq!(get("a.r.io/x"), Some(2));
        assert_eq!(get("b.r.io/x"), Some(1));
        assert_eq!(get("q.io/team/app:1"), Some(5));
        assert_eq!(get("q.io/team/other"), Some(4));
        assert_eq!(get("q.io/x"), Some(3));
        assert_eq!(get("busybox"), Some(6));
        assert_eq!(get("docker.io/library/busybox:1"), Some(6));
        assert_eq!(get("user/app"), Some(6));
        assert_eq!(get("z.io/x"), None);
        assert_eq!(keyring_key("https://q.io/v1/"), "q.io");
        assert_eq!(keyring_key("q.io/"), "q.io");
        // Same key twice: the first given wins.
        let dup = [("r.io", 1), ("https://r.io", 2)];
        assert_eq!(keyring_lookup(dup.iter().map(|(k, v)| (*k, v)), "r.io/x"), Some(&1));
    }

    #[test]
    fn go_durations() {
        let ok = [
            ("0", 0),
            ("0s", 0),
            ("5m0s", 300_000),
            ("1h", 3_600_000),
            ("1.5h", 5_400_000),
            ("300ms", 300),
            ("1h30m", 5_400_000),
            ("2us", 0),
            ("-1s", 0),
            ("+10s", 10_000),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_go_duration(s).map(|d| d.as_millis()), Some(ms), "{s}");
        }
        for s in ["", "5", "1x", "h", "1.2.3s", "-", "1h 30m"] {
            assert_eq!(parse_go_duration(s), None, "{s:?}");
        }
    }
}
