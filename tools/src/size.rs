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
