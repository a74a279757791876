//! Modification times as zTOCs store them: RFC 3339 text (Go's `time.MarshalText`).
//!
//! SOCI writes the builder's local zone; we always write UTC (`Z`), which is what the
//! reference fixtures were built with, and read any offset. Fractional seconds are written
//! with trailing zeros trimmed, as Go does (`…:20.25Z`).

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Mtime {
    pub secs: i64,
    pub nanos: u32,
}

impl Mtime {
    /// A PAX `mtime` record: decimal seconds with an optional fraction.
    pub fn parse_pax(value: &str) -> Option<Mtime> {
        let (int, frac) = value.split_once('.').unwrap_or((value, ""));
        let negative = int.starts_with('-');
        let secs: i64 = int.parse().ok()?;
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut nanos: u32 = 0;
        for (i, d) in frac.bytes().take(9).enumerate() {
            nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
        }
        if negative && nanos > 0 {
            // -1.25 is 1.25 s before the epoch: -2 s + 0.75 s.
            return Some(Mtime { secs: secs - 1, nanos: 1_000_000_000 - nanos });
        }
        Some(Mtime { secs, nanos })
    }

    /// Go's `MarshalText` in UTC; outside the four-digit years it is clamped into them (as the
    /// eStargz writer does), so that what is written always parses again.
    pub fn to_rfc3339(self) -> String {
        let whole = estargz::time::format_rfc3339(self.secs);
        let clamped = !(estargz::time::MIN_RFC3339_SECS..=estargz::time::MAX_RFC3339_SECS).contains(&self.secs);
        if self.nanos == 0 || clamped {
            return whole;
        }
        let frac = format!("{:09}", self.nanos);
        format!("{}.{}Z", whole.trim_end_matches('Z'), frac.trim_end_matches('0'))
    }

    /// RFC 3339 with any zone offset; `None` outside the four-digit years (as Go refuses them:
    /// they could not be written back).
    pub fn parse_rfc3339(text: &str) -> Option<Mtime> {
        // The fraction is kept here (the eStargz parser rounds to whole seconds).
        let (whole, nanos) = match text.get(19..).and_then(|rest| rest.strip_prefix('.')) {
            Some(frac) => {
                let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
                if digits == 0 {
                    return None;
                }
                let nanos = frac.bytes().take(digits.min(9)).enumerate().map(|(i, c)| u32::from(c - b'0') * 10u32.pow(8 - i as u32)).sum();
                (format!("{}{}", &text[..19], &frac[digits..]), nanos)
            }
            None => (text.to_owned(), 0),
        };
        let secs = estargz::time::parse_rfc3339(&whole)?;
        (estargz::time::MIN_RFC3339_SECS..=estargz::time::MAX_RFC3339_SECS).contains(&secs).then_some(Mtime { secs, nanos })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_go_marshal_text_in_utc() {
        assert_eq!(Mtime { secs: 1_700_000_000, nanos: 0 }.to_rfc3339(), "2023-11-14T22:13:20Z");
        assert_eq!(Mtime { secs: 1_700_000_000, nanos: 250_000_000 }.to_rfc3339(), "2023-11-14T22:13:20.25Z");
        assert_eq!(Mtime { secs: 0, nanos: 1 }.to_rfc3339(), "1970-01-01T00:00:00.000000001Z");
        assert_eq!(Mtime { secs: -1, nanos: 0 }.to_rfc3339(), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn parses_any_zone_and_pax_fractions() {
        let t = Mtime { secs: 1_700_000_000, nanos: 250_000_000 };
        assert_eq!(Mtime::parse_rfc3339("2023-11-14T22:13:20.25Z"), Some(t));
        assert_eq!(Mtime::parse_rfc3339("2023-11-15T07:13:20.25+09:00"), Some(t));
        assert_eq!(Mtime::parse_pax("1700000000.25"), Some(t));
        assert_eq!(Mtime::parse_pax("-1.25"), Some(Mtime { secs: -2, nanos: 750_000_000 }));
        for bad in ["", "2023-11-14", "2023-13-14T22:13:20Z", "2023-11-14T22:13:20", "2023-11-14T22:13:20.Z"] {
            assert_eq!(Mtime::parse_rfc3339(bad), None, "{bad}");
        }
        for secs in [-86_400 * 365 * 300, -1, 0, 951_782_400, 4_102_444_800] {
            let t = Mtime { secs, nanos: 0 };
            assert_eq!(Mtime::parse_rfc3339(&t.to_rfc3339()), Some(t));
        }
    }
}
