//! The one clock of every stored timestamp.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch: the one clock of every stored timestamp.
pub type Micros = u64;

/// Now, in [`Micros`].
pub fn now_micros() -> Micros {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// RFC 3339 text of a [`Micros`] timestamp, as the API shows it.
pub fn rfc3339(t: Micros) -> String {
    let ts = time::OffsetDateTime::from_unix_timestamp_nanos(t as i128 * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    ts.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_shows_whole_and_fractional_seconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_500_000), "1970-01-01T00:00:01.5Z");
    }

    #[test]
    fn now_is_after_the_year_2020() {
        assert!(now_micros() > 1_577_836_800_000_000);
    }
}
