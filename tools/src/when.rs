//! Times on the command line: durations (`90s`, `30m`, `24h`, `7d`) and
//! points in time (`2027-03-31`, `2027-03-31T12:00:00Z`, `+30d`). Sizes
//! are `vhd::size`'s.
//!
//! Our own small parsers rather than `humantime`: the forms operators
//! type here (a bare number of seconds, a date without a time, `+30d`
//! from now) are not the ones `humantime` reads, and each is a few lines
//! with its tests beside it.

/// Parses a duration such as `90s`, `30m`, `24h`, `7d` or `2w` (a bare
/// number is seconds).
pub fn parse_age(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (examples: 90s, 30m, 24h, 7d)"))?;
    let secs = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        u => {
            return Err(format!(
                "unknown duration unit `{u}` in `{s}` (s, m, h, d or w)"
            ))
        }
    };
    n.checked_mul(secs)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("`{s}` is too long"))
}

/// A duration as `parse_age` reads it: the largest whole unit (`15m`,
/// `2h`, `90s`).
pub fn show_age(d: std::time::Duration) -> String {
    let s = d.as_secs();
    for (unit, n) in [("w", 7 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)] {
        if s >= n && s % n == 0 {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

#[cfg(test)]
mod age_tests {
    use super::parse_age;
    use std::time::Duration;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_age("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_age(" 7d "), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_age("7y").unwrap_err().contains("unit"));
        assert!(parse_age("h").is_err());
        assert!(parse_age("99999999999999999w").is_err());
    }
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A point in time, as ms since the Unix epoch: `2027-03-31` (midnight
/// UTC), `2027-03-31T12:00:00Z`, or `+30d` from `now_ms` (any duration
/// [`parse_age`] takes).
pub fn parse_when(s: &str, now_ms: u64) -> Result<u64, String> {
    let t = s.trim();
    if let Some(rel) = t.strip_prefix('+') {
        return Ok(now_ms.saturating_add(parse_age(rel)?.as_millis() as u64));
    }
    let bad = || format!("`{s}` is not a date (YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ, or +30d)");
    let (date, time) = t.split_once('T').unwrap_or((t, "00:00:00Z"));
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let time = time.strip_suffix('Z').ok_or_else(bad)?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let ([y, m, day], [h, mi, sec]) = (d.as_slice(), hms.as_slice()) else {
        return Err(bad());
    };
    if !(1970..=9999).contains(y)
        || !(1..=12).contains(m)
        || !(1..=31).contains(day)
        || *h > 23
        || *mi > 59
        || *sec > 60
        || *h < 0
        || *mi < 0
        || *sec < 0
    {
        return Err(bad());
    }
    let secs = days_from_civil(*y, *m, *day) * 86_400 + h * 3600 + mi * 60 + sec;
    Ok(secs as u64 * 1000)
}

#[cfg(test)]
mod when_tests {
    #[test]
    fn dates_and_offsets_parse() {
        assert_eq!(super::parse_when("1970-01-02", 0), Ok(86_400_000));
        assert_eq!(
            super::parse_when("2026-11-21T17:00:00Z", 0),
            Ok(1_795_280_400_000)
        );
        assert_eq!(super::parse_when("+1h", 5), Ok(3_600_005));
        assert!(super::parse_when("2026-13-01", 0).is_err());
        assert!(super::parse_when("tomorrow", 0).is_err());
        assert!(super::parse_when("2026-11-21T17:00:00", 0).is_err());
    }
}
