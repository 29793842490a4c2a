//! Sizes on the command line: `10G`, `512MiB`, `1.5T`, `4096`.

/// Parses a size: a number with an optional binary unit (K, M, G, T, with
/// or without `iB`/`B`; powers of 1024). A bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "`{s}` is not a size (examples: 4096, 512M, 10G, 1.5T)"
        ));
    }
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        u => {
            return Err(format!(
                "unknown size unit `{u}` in `{s}` (use K, M, G or T)"
            ))
        }
    };
    let bytes = if num.contains('.') {
        let f: f64 = num.parse().map_err(|_| format!("`{s}` is not a size"))?;
        let b = f * mult as f64;
        if !b.is_finite() || b < 0.0 || b > u64::MAX as f64 {
            return Err(format!("`{s}` is out of range"));
        }
        b.round() as u64
    } else {
        let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size"))?;
        n.checked_mul(mult)
            .ok_or_else(|| format!("`{s}` is out of range"))?
    };
    Ok(bytes)
}

/// A size for people: `10 GiB`, `1.5 MiB`, `512 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1.5T"), Ok(3 << 39));
        assert_eq!(parse_size(" 2 g "), Ok(2 << 30));
    }

    #[test]
    fn refuses_nonsense() {
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("10X").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("18446744073709551615T").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(10 << 30), "10 GiB");
        assert_eq!(human(1536 << 10), "1.5 MiB");
    }

    proptest! {
        #[test]
        fn any_text_parses_or_errs(s in ".{0,24}") {
            let _ = parse_size(&s);
        }

        #[test]
        fn bytes_round_trip(n in any::<u32>()) {
            prop_assert_eq!(parse_size(&n.to_string()), Ok(u64::from(n)));
        }
    }
}

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
