//! RFC 3339 formatting/parsing for TOC `modtime`, without a date crate: the TOC only ever needs
//! whole-second UTC timestamps, and a 40-line civil-calendar conversion is easier to audit than a
//! dependency.

/// Earliest and latest instants with a four-digit year (0000-01-01T00:00:00Z,
/// 9999-12-31T23:59:59Z): all RFC 3339 — and Go's `time.RFC3339` parser, which the ecosystem's
/// readers use — can express.
pub const MIN_RFC3339_SECS: i64 = -62_167_219_200;
pub const MAX_RFC3339_SECS: i64 = 253_402_300_799;

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`. A time outside the four-digit
/// years (a tar header can hold one) is clamped into them, so that what is written always
/// parses again (found by `make fuzz`: year 58888 made a blob we could not open).
pub fn format_rfc3339(secs: i64) -> String {
    let secs = secs.clamp(MIN_RFC3339_SECS, MAX_RFC3339_SECS);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` into whole seconds since the epoch (rounded).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b't') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut round_up = false;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        round_up = b[start] >= b'5';
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        c @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let o = oh * 3600 + om * 60;
            if *c == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    Some(days * 86_400 + h * 3600 + mi * 60 + se - offset + i64::from(round_up))
}

// Howard Hinnant's algorithms for the proleptic Gregorian calendar.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(format_rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(format_rfc3339(MAX_RFC3339_SECS), "9999-12-31T23:59:59Z");
        assert_eq!(format_rfc3339(MIN_RFC3339_SECS), "0000-01-01T00:00:00Z");
        // The fuzz finding: a far-future tar mtime is clamped and still parses.
        assert_eq!(format_rfc3339(1_796_000_000_000), "9999-12-31T23:59:59Z");
        assert_eq!(parse_rfc3339(&format_rfc3339(i64::MAX)), Some(MAX_RFC3339_SECS));
        assert_eq!(parse_rfc3339(&format_rfc3339(i64::MIN)), Some(MIN_RFC3339_SECS));
        for t in [0, 1, 951_782_400, 1_700_000_000, 4_102_444_800, -86_401] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
        }
        assert_eq!(parse_rfc3339("2023-11-14T23:13:20+01:00"), Some(1_700_000_000));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:19.6Z"), Some(1_700_000_000));
        assert_eq!(parse_rfc3339("2023-13-14T22:13:19Z"), None);
        assert_eq!(parse_rfc3339("garbage"), None);
    }
}
