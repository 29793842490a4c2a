//! Sizes as people write them (`4096`, `512M`, `10GiB`, `1.5T`): one
//! parser for every command line and settings file of csv (disk sizes,
//! LUN sizes, VM memory), on the `parse-size` crate with binary units,
//! and sizes for people in return.

/// What a size's text got wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a size.
    #[error("`{text}` is not a size (examples: 4096, 512M, 10G, 1.5T)")]
    NotASize {
        /// The text.
        text: String,
    },
    /// More digits than any size has.
    #[error("`{text}` is too large for a size")]
    TooLarge {
        /// The text.
        text: String,
    },
    /// Zero where a size must be positive.
    #[error("`{text}`: a size of zero")]
    Zero {
        /// The text.
        text: String,
    },
}

/// Parses a size: a number (decimals allowed) with an optional binary
/// unit (K, M, G, T, P, with or without `iB`/`B`: powers of 1024). A bare
/// number is bytes.
pub fn parse(text: &str) -> Result<u64, SizeError> {
    if significant_digits(text) > MAX_DIGITS {
        return Err(SizeError::TooLarge {
            text: text.to_string(),
        });
    }
    parse_size::Config::new()
        .with_binary()
        .parse_size(text.trim())
        .map_err(|_| SizeError::NotASize {
            text: text.to_string(),
        })
}

/// Most significant digits a size's number may have (u64::MAX has 20).
/// Checked before `parse-size` 1.1 sees the text: past u64::MAX its
/// mantissa rounding adds 1 without a check, which panics in a build with
/// overflow checks and gives a wrong size in one without (found by the
/// `config` fuzz target).
const MAX_DIGITS: usize = 20;

/// The digits of the number's mantissa (before any exponent), leading
/// zeros left out.
fn significant_digits(text: &str) -> usize {
    text.split(['e', 'E'])
        .next()
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_digit)
        .skip_while(|c| *c == '0')
        .count()
}

/// As [`parse`], refusing zero.
pub fn parse_positive(text: &str) -> Result<u64, SizeError> {
    match parse(text)? {
        0 => Err(SizeError::Zero {
            text: text.to_string(),
        }),
        n => Ok(n),
    }
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
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("512M"), Ok(512 << 20));
        assert_eq!(parse("10GiB"), Ok(10 << 30));
        assert_eq!(parse("1.5T"), Ok(3 << 39));
        assert_eq!(parse(" 2 g "), Ok(2 << 30));
        assert_eq!(parse("16G"), Ok(16 << 30));
        assert_eq!(parse("4k"), Ok(4096));
    }

    #[test]
    fn numbers_past_the_largest_size_are_refused_not_wrapped() {
        // The largest size still parses; one digit more is too large,
        // however it is written.
        assert_eq!(parse("18446744073709551615"), Ok(u64::MAX));
        for t in [
            "184467440737095516157",
            "1844674407370955161.57",
            "000000000000018446744073709551615 7",
            "18_446_744_073_709_551_615_9K",
        ] {
            assert!(
                matches!(parse(t), Err(SizeError::TooLarge { .. })),
                "{t}: {:?}",
                parse(t)
            );
        }
        assert_eq!(parse("0.000000000000000000000000000001K"), Ok(0));
        assert!(parse("18446744073709551616").is_err());
    }

    #[test]
    fn refuses_nonsense() {
        assert!(parse("").is_err());
        assert!(parse("G").is_err());
        assert!(parse("10X").is_err());
        assert!(parse("99999999999999999999").is_err());
        assert!(parse("18446744073709551615T").is_err());
        assert!(parse("-1").is_err());
        assert_eq!(
            parse_positive("0"),
            Err(SizeError::Zero { text: "0".into() })
        );
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
            let _ = parse(&s);
        }

        #[test]
        fn bytes_round_trip(n in any::<u32>()) {
            prop_assert_eq!(parse(&n.to_string()), Ok(u64::from(n)));
        }
    }
}
