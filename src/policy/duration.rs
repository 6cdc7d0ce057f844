//! Durations in the Gateway API string format (GEP-2257): one to four `<digits><unit>` parts,
//! each with at most five digits, units `h`, `m`, `s` and `ms`, e.g. `1s`, `800ms`, `1m30s`.
//! The format is a strict subset of Go's `time.ParseDuration`, so the API server's CEL
//! `duration()` function accepts every value this parser accepts.

use std::time::Duration;

/// The OpenAPI pattern of a Gateway API duration, as placed in the CRD schema.
pub const DURATION_PATTERN: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";

/// Why a string is not a Gateway API duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration; expected e.g. \"500ms\", \"2s\" or \"1m30s\"")]
    Empty,
    #[error(
        "{0:?} is not a duration: expected one to four <number><unit> parts, units h, m, s or ms (e.g. \"500ms\", \"1m30s\")"
    )]
    Malformed(String),
    #[error("{0:?} has a number with more than 5 digits")]
    TooManyDigits(String),
    #[error("{0:?} has more than 4 parts")]
    TooManyParts(String),
}

/// Parses a Gateway API duration such as `800ms` or `1m30s`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let malformed = || DurationError::Malformed(text.to_owned());
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut parts = 0;
    let mut total = Duration::ZERO;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &text[start..i];
        if digits.is_empty() {
            return Err(malformed());
        }
        if digits.len() > 5 {
            return Err(DurationError::TooManyDigits(text.to_owned()));
        }
        let n: u64 = digits.parse().map_err(|_| malformed())?;
        let unit = match bytes.get(i) {
            Some(b'h') => {
                i += 1;
                Duration::from_secs(3600)
            }
            Some(b'm') if bytes.get(i + 1) == Some(&b's') => {
                i += 2;
                Duration::from_millis(1)
            }
            Some(b'm') => {
                i += 1;
                Duration::from_secs(60)
            }
            Some(b's') => {
                i += 1;
                Duration::from_secs(1)
            }
            _ => return Err(malformed()),
        };
        parts += 1;
        if parts > 4 {
            return Err(DurationError::TooManyParts(text.to_owned()));
        }
        // At most 4 × 99999 h: far from overflowing a Duration.
        total += unit * u32::try_from(n).map_err(|_| malformed())?;
    }
    Ok(total)
}

/// The longest duration [`format_duration`] writes exactly: every part at most five digits
/// (`99999h59m59s999ms`, about 11.4 years).
pub const MAX_FORMATTED: Duration = Duration::from_millis(99_999 * 3_600_000 + 3_599_999);

/// Writes `d` as a Gateway API duration that [`parse_duration`] reads back as `d`, for every
/// `d` in whole milliseconds up to [`MAX_FORMATTED`]: the largest units first, zero parts left
/// out (`100800s` is written `28h`, which the five-digit grammar accepts). A fraction of a
/// millisecond is rounded up, and longer durations are written as [`MAX_FORMATTED`]: a
/// timeout is never shortened by more than its remainder past 11 years.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    let ms = u64::try_from(ms)
        .unwrap_or(u64::MAX)
        .min(MAX_FORMATTED.as_millis() as u64);
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, ms) = (rest / 1000, rest % 1000);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_in_the_largest_units_within_five_digits() {
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_secs(100_800)), "28h");
        assert_eq!(format_duration(Duration::from_secs(601)), "10m1s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s500ms");
        assert_eq!(format_duration(Duration::from_nanos(1)), "1ms");
        assert_eq!(
            format_duration(Duration::from_secs(u64::MAX)),
            "99999h59m59s999ms"
        );
        assert_eq!(
            parse_duration(&format_duration(Duration::MAX)),
            Ok(MAX_FORMATTED)
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_reads_back_what_format_writes(ms in 0..=MAX_FORMATTED.as_millis() as u64) {
            let d = Duration::from_millis(ms);
            proptest::prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }

        #[test]
        fn every_duration_of_the_crd_pattern_formats_to_one_the_parser_accepts(
            text in "([0-9]{1,5}(h|m|s|ms)){1,4}"
        ) {
            let d = parse_duration(&text).unwrap();
            let back = parse_duration(&format_duration(d)).unwrap();
            proptest::prop_assert_eq!(back, d.min(MAX_FORMATTED));
        }
    }

    #[test]
    fn parses_every_unit_and_combinations() {
        assert_eq!(parse_duration("800ms"), Ok(Duration::from_millis(800)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_duration("1h2m3s4ms"),
            Ok(Duration::from_millis(3_723_004))
        );
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("99999ms"), Ok(Duration::from_millis(99_999)));
    }

    #[test]
    fn rejects_what_the_gateway_api_pattern_rejects() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        for bad in [
            "1", "s", "1.5s", "-1s", "1 s", "1S", "1us", "1d", "ms", "1s ", "+1s",
        ] {
            assert!(
                matches!(parse_duration(bad), Err(DurationError::Malformed(_))),
                "{bad:?} should be malformed, got {:?}",
                parse_duration(bad)
            );
        }
        assert_eq!(
            parse_duration("100000ms"),
            Err(DurationError::TooManyDigits("100000ms".into()))
        );
        assert_eq!(
            parse_duration("1h1m1s1ms1ms"),
            Err(DurationError::TooManyParts("1h1m1s1ms1ms".into()))
        );
    }

    #[test]
    fn error_messages_quote_the_input_and_give_an_example() {
        let msg = parse_duration("fast").unwrap_err().to_string();
        assert!(msg.contains("\"fast\""), "{msg}");
        assert!(msg.contains("500ms"), "{msg}");
    }
}
