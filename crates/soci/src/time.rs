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

    pub fn to_rfc3339(self) -> String {
        let days = self.secs.div_euclid(86_400);
        let rem = self.secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let mut s = format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        );
        if self.nanos != 0 {
            let frac = format!("{:09}", self.nanos);
            s.push('.');
            s.push_str(frac.trim_end_matches('0'));
        }
        s.push('Z');
        s
    }

    pub fn parse_rfc3339(text: &str) -> Option<Mtime> {
        let b = text.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || (b[10] != b'T' && b[10] != b't') || b[13] != b':' || b[16] != b':' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<i64> {
            let s = text.get(r)?;
            s.bytes().all(|c| c.is_ascii_digit()).then(|| s.parse().ok())?
        };
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        let mut rest = &text[19..];
        let mut nanos = 0u32;
        if let Some(frac) = rest.strip_prefix('.') {
            let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return None;
            }
            for (i, c) in frac.bytes().take(digits.min(9)).enumerate() {
                nanos += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
            }
            rest = &frac[digits..];
        }
        let offset = match rest {
            "Z" | "z" => 0,
            _ => {
                let rb = rest.as_bytes();
                if rb.len() != 6 || rb[3] != b':' || (rb[0] != b'+' && rb[0] != b'-') {
                    return None;
                }
                let oh: i64 = rest[1..3].parse().ok()?;
                let om: i64 = rest[4..6].parse().ok()?;
                let o = oh * 3600 + om * 60;
                if rb[0] == b'-' { -o } else { o }
            }
        };
        let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset;
        // Go refuses years outside 0000..=9999 too; we could not write them back.
        let (utc_year, _, _) = civil_from_days(secs.div_euclid(86_400));
        if !(0..=9999).contains(&utc_year) {
            return None;
        }
        Some(Mtime { secs, nanos })
    }
}

// Howard Hinnant's civil-date algorithms (public domain).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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
