//! [`RetryPolicy`]: when and how long the client waits before trying a request again.

use std::time::{Duration, SystemTime};

/// How the client retries a request that certainly did not run: when the connection
/// could not be made, or the server answered 429 (over quota) or 503 (overloaded,
/// shutting down). Other failures are returned at once: a request that may have run
/// is never sent twice (send an `idempotency_key` with jobs to make that safe).
///
/// The wait before retry `n` (from 0) is `initial_backoff * 2^n`, at most
/// `max_backoff`, unless the answer carried `Retry-After`, which is honoured up to
/// `max_retry_after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try; 0 turns retrying off.
    pub max_retries: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// The longest `Retry-After` waited for; a longer one ends the retries and returns
    /// the error.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 4,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> RetryPolicy {
        RetryPolicy { max_retries: 0, ..RetryPolicy::default() }
    }

    /// The wait before retry number `retry` (from 0), or `None` when the policy gives
    /// up: retries used up, or a `Retry-After` longer than `max_retry_after`.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if retry >= self.max_retries {
            return None;
        }
        match retry_after {
            Some(d) if d > self.max_retry_after => None,
            Some(d) => Some(d),
            None => {
                let factor = 1u32.checked_shl(retry.min(20)).unwrap_or(u32::MAX);
                Some(self.initial_backoff.saturating_mul(factor).min(self.max_backoff))
            }
        }
    }
}

/// The value of a `Retry-After` header: delay-seconds or an HTTP date (RFC 9110).
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_then_gives_up() {
        let p = RetryPolicy::default();
        let d: Vec<_> = (0..5).map(|n| p.delay(n, None)).collect();
        assert_eq!(
            d,
            [
                Some(Duration::from_millis(200)),
                Some(Duration::from_millis(400)),
                Some(Duration::from_millis(800)),
                Some(Duration::from_millis(1600)),
                None
            ]
        );
        let p = RetryPolicy { max_retries: 40, ..RetryPolicy::default() };
        assert_eq!(p.delay(39, None), Some(Duration::from_secs(5)));
    }

    #[test]
    fn retry_after_is_honoured_within_its_limit() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(0, Some(Duration::from_secs(3))), Some(Duration::from_secs(3)));
        assert_eq!(p.delay(0, Some(Duration::from_secs(61))), None);
        assert_eq!(RetryPolicy::none().delay(0, None), None);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT.
        let later = "Sun, 06 Nov 1994 08:49:47 GMT";
        assert_eq!(parse_retry_after(later, now), Some(Duration::from_secs(10)));
        let past = "Sun, 06 Nov 1994 08:49:00 GMT";
        assert_eq!(parse_retry_after(past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
