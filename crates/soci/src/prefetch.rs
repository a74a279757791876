//! SOCI prefetch artifacts: which spans of a layer to fetch as soon as it is mounted.
//!
//! Upstream (v0.13+, experimental) keeps the prefetch set *beside* the zTOC, as its own small
//! JSON blob listed in the SOCI index after the zTOCs and annotated with the image layer it
//! belongs to, so that one image can carry different prefetch sets for different workloads
//! without changing any zTOC digest. The document names inclusive span ranges,
//! `{"version":"1.0","prefetch_spans":[{"start_span":N,"end_span":M}]}`, sorted and with
//! adjacent ranges merged; `priority` is reserved ("lower is sooner") and written only when set.
//!
//! Span ranges rather than file names because a span is what SOCI fetches and verifies: a file
//! list would have to be resolved against the zTOC at every mount, and two files in one span
//! cost one fetch either way. The builder side ([`spans_of_files`]) does the resolution once.

use serde::{Deserialize, Serialize};

use crate::ztoc::{EntryKind, Ztoc};

/// The media type of a prefetch artifact blob (and of its descriptor in a SOCI index).
pub const PREFETCH_MEDIA_TYPE: &str = "application/vnd.amazon.soci.prefetch.v1+json";
/// The only document version there is.
pub const PREFETCH_VERSION: &str = "1.0";

/// One inclusive range of span ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchSpan {
    pub start_span: u64,
    pub end_span: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// A prefetch artifact, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchArtifact {
    pub version: String,
    pub prefetch_spans: Vec<PrefetchSpan>,
}

/// Why a prefetch artifact is not usable (the mount then simply does not prefetch).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefetchError {
    #[error("prefetch artifact is not JSON of the expected shape: {0}")]
    Json(String),
    #[error("prefetch artifact version {0:?} is not {PREFETCH_VERSION:?}")]
    Version(String),
    #[error("prefetch artifact lists no spans")]
    Empty,
    #[error("prefetch range {start}..={end} is reversed or beyond the layer's {spans} spans")]
    Range { start: u64, end: u64, spans: usize },
    #[error("prefetch artifact lists {ranges} ranges for a layer of {spans} spans")]
    TooMany { ranges: usize, spans: usize },
}

impl PrefetchArtifact {
    /// The artifact for these inclusive span ranges, sorted, with overlapping and adjacent
    /// ranges merged; `None` when there are none (upstream stores no empty artifact).
    pub fn from_ranges(ranges: impl IntoIterator<Item = (usize, usize)>) -> Option<PrefetchArtifact> {
        let mut ranges: Vec<(u64, u64)> = ranges.into_iter().map(|(a, b)| (a.min(b) as u64, a.max(b) as u64)).collect();
        ranges.sort_unstable();
        let mut merged: Vec<PrefetchSpan> = Vec::new();
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.end_span.saturating_add(1) => last.end_span = last.end_span.max(end),
                _ => merged.push(PrefetchSpan { start_span: start, end_span: end, priority: 0 }),
            }
        }
        (!merged.is_empty()).then(|| PrefetchArtifact { version: PREFETCH_VERSION.to_owned(), prefetch_spans: merged })
    }

    /// The blob's bytes (compact JSON, fields in upstream's order).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a prefetch artifact serialises")
    }

    /// Parses an artifact (version and emptiness checked; ranges by [`Self::check`]).
    pub fn parse(bytes: &[u8]) -> Result<PrefetchArtifact, PrefetchError> {
        let a: PrefetchArtifact = serde_json::from_slice(bytes).map_err(|e| PrefetchError::Json(e.to_string()))?;
        if a.version != PREFETCH_VERSION {
            return Err(PrefetchError::Version(a.version));
        }
        if a.prefetch_spans.is_empty() {
            return Err(PrefetchError::Empty);
        }
        Ok(a)
    }

    /// Checks every range against the layer's zTOC: a range past its last span is a lie about
    /// the layer, not a hint to trim.
    pub fn check(&self, ztoc: &Ztoc) -> Result<(), PrefetchError> {
        let spans = ztoc.spans.span_count();
        // More ranges than spans can only repeat them: work for the fill thread, nothing else.
        if self.prefetch_spans.len() > spans {
            return Err(PrefetchError::TooMany { ranges: self.prefetch_spans.len(), spans });
        }
        match self.prefetch_spans.iter().find(|s| s.start_span > s.end_span || s.end_span >= spans as u64) {
            Some(s) => Err(PrefetchError::Range { start: s.start_span, end: s.end_span, spans }),
            None => Ok(()),
        }
    }

    /// The compressed byte ranges `[start, end)` of the layer blob the listed spans occupy
    /// (each range from its first span's fetch start to its last span's end), for a layer
    /// whose zTOC passed [`Self::check`].
    pub fn blob_ranges(&self, ztoc: &Ztoc) -> Vec<std::ops::Range<u64>> {
        self.prefetch_spans
            .iter()
            .map(|s| {
                let (start, _) = ztoc.spans.compressed_range(s.start_span as usize, ztoc.compressed_size);
                let (_, end) = ztoc.spans.compressed_range(s.end_span as usize, ztoc.compressed_size);
                start..end
            })
            .collect()
    }
}

/// A path as users and tar writers spell it, reduced to the zTOC's form: no leading `/` or
/// `./`, no trailing `/`.
pub fn normalize_path(p: &str) -> &str {
    let mut s = p;
    loop {
        let t = s.trim_start_matches('/');
        let t = t.strip_prefix("./").unwrap_or(t);
        if t.len() == s.len() {
            break;
        }
        s = t;
    }
    if s == "." {
        return "";
    }
    s.trim_end_matches('/')
}

/// For each of `paths` this layer has as a regular file: the path's position in `paths` and
/// the inclusive span range holding its data. Paths are compared after [`normalize_path`]; an
/// empty file still names its span (it is where a reader would look).
pub fn spans_of_files<S: AsRef<str>>(ztoc: &Ztoc, paths: &[S]) -> Vec<(usize, (usize, usize))> {
    let by_name: std::collections::HashMap<&str, &crate::ztoc::Entry> =
        ztoc.entries.iter().filter(|e| e.kind == EntryKind::Reg).map(|e| (normalize_path(&e.name), e)).collect();
    paths.iter().enumerate().filter_map(|(i, p)| by_name.get(normalize_path(p.as_ref())).map(|e| (i, ztoc.spans_of(e)))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_sorted_and_merged_like_upstream() {
        let a = PrefetchArtifact::from_ranges([(7, 9), (0, 0), (1, 2), (8, 8), (4, 4)]).unwrap();
        let got: Vec<(u64, u64)> = a.prefetch_spans.iter().map(|s| (s.start_span, s.end_span)).collect();
        assert_eq!(got, vec![(0, 2), (4, 4), (7, 9)]);
        assert_eq!(
            String::from_utf8(PrefetchArtifact::from_ranges([(0, 2)]).unwrap().to_bytes()).unwrap(),
            r#"{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":2}]}"#
        );
        assert!(PrefetchArtifact::from_ranges([]).is_none());
    }

    #[test]
    fn parse_refuses_other_versions_empty_sets_and_junk() {
        let ok = br#"{"version":"1.0","prefetch_spans":[{"start_span":1,"end_span":3,"priority":2}]}"#;
        assert_eq!(PrefetchArtifact::parse(ok).unwrap().prefetch_spans[0], PrefetchSpan { start_span: 1, end_span: 3, priority: 2 });
        assert_eq!(PrefetchArtifact::parse(br#"{"version":"2.0","prefetch_spans":[{"start_span":0,"end_span":0}]}"#), Err(PrefetchError::Version("2.0".into())));
        assert_eq!(PrefetchArtifact::parse(br#"{"version":"1.0","prefetch_spans":[]}"#), Err(PrefetchError::Empty));
        assert!(matches!(PrefetchArtifact::parse(br#"{"version":"1.0","prefetch_spans":[{"start_span":-1,"end_span":0}]}"#), Err(PrefetchError::Json(_))));
        assert!(matches!(PrefetchArtifact::parse(b"\xff"), Err(PrefetchError::Json(_))));
    }

    #[test]
    fn paths_are_compared_in_the_ztoc_form() {
        assert_eq!(normalize_path("/usr/bin/ls"), "usr/bin/ls");
        assert_eq!(normalize_path("./usr/bin/ls"), "usr/bin/ls");
        assert_eq!(normalize_path("//./etc/"), "etc");
        assert_eq!(normalize_path("./"), "");
    }
}
