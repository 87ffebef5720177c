//! `MOVED` and `ASK` redirects, as a node sends them.

use std::time::Duration;

use bytes::Bytes;

use super::{Slot, join_host_port};

/// Which kind of redirect a node sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectKind {
    /// The slot moved for good: update the map and resend.
    Moved,
    /// The slot is being migrated: resend once to the target after `ASKING`.
    Ask,
}

/// A `-MOVED slot host:port` or `-ASK slot host:port` error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// Moved or ask.
    pub kind: RedirectKind,
    /// The slot concerned.
    pub slot: Slot,
    /// Where to go (`host:port`; an empty host means the node that answered).
    pub addr: String,
}

impl Redirect {
    /// Parses a redirect from an error reply's bytes (with or without the leading `-` and
    /// trailing CRLF); `None` for any other reply.
    pub fn parse(reply: &[u8], answering_host: &str) -> Option<Redirect> {
        let reply = reply.strip_prefix(b"-").unwrap_or(reply);
        let reply = reply.strip_suffix(b"\r\n").unwrap_or(reply);
        let text = std::str::from_utf8(reply).ok()?;
        let mut words = text.split(' ');
        let kind = match words.next()? {
            "MOVED" => RedirectKind::Moved,
            "ASK" => RedirectKind::Ask,
            _ => return None,
        };
        let slot = Slot::new(words.next()?.parse().ok()?)?;
        let target = words.next()?;
        if words.next().is_some() {
            return None;
        }
        let (host, port) = target.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = if host.is_empty() {
            answering_host
        } else {
            host
        };
        Some(Redirect {
            kind,
            slot,
            addr: join_host_port(host, port),
        })
    }
}

/// Most redirects (MOVED, ASK) one request follows before the client gets an error: a
/// redirect loop ends, however long the request may wait.
pub const MAX_HOPS: u8 = 5;

/// First wait before re-sending after `TRYAGAIN` or `CLUSTERDOWN`; doubles per retry up to
/// [`RETRY_MAX`].
pub const RETRY_START: Duration = Duration::from_millis(20);

/// Longest wait between two retries: a cluster that comes back is seen within this.
pub const RETRY_MAX: Duration = Duration::from_millis(320);

/// How many redirects and retries a request has had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hops {
    /// MOVED and ASK followed.
    pub redirects: u8,
    /// TRYAGAIN and CLUSTERDOWN retried.
    pub retries: u8,
}

/// What to do with a node's error reply to a forwarded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send the request again where the redirect points (after `ASKING` for an ask).
    Follow(Redirect),
    /// Send the request again to the slot's master after this wait (`TRYAGAIN`,
    /// `CLUSTERDOWN`: a failover or migration is under way).
    RetryAfter(Duration),
    /// Give the client this error instead: the request was redirected too often.
    GiveUp(Bytes),
    /// Give the client the reply as it is.
    PassOn,
}

/// Decides what a node's error `reply` means for a request that has had `hops` and has
/// `left` until its deadline. `answering_host` fills a redirect that names no host. Pure:
/// the caller does the sending and the waiting.
///
/// Redirects are bounded by [`MAX_HOPS`]. Retries (`TRYAGAIN`, `CLUSTERDOWN`: a failover or
/// migration under way) are bounded by the deadline alone: the waits grow from
/// [`RETRY_START`] to [`RETRY_MAX`], and the last one ends early enough (one
/// [`RETRY_START`] before the deadline) for the re-sent request to be answered. A cluster
/// that recovers within `op_timeout` is then never seen by the client.
pub fn decide(reply: &[u8], answering_host: &str, hops: Hops, left: Duration) -> Decision {
    if let Some(r) = Redirect::parse(reply, answering_host) {
        if hops.redirects >= MAX_HOPS || left.is_zero() {
            return Decision::GiveUp(too_many(reply));
        }
        return Decision::Follow(r);
    }
    let retry = reply.starts_with(b"-TRYAGAIN") || reply.starts_with(b"-CLUSTERDOWN");
    if !retry {
        return Decision::PassOn;
    }
    retry_wait(hops.retries, left).map_or(Decision::PassOn, Decision::RetryAfter)
}

/// How long to wait before trying a request again for the `retries`+1-th time with `left`
/// until its deadline: 20 ms doubling to [`RETRY_MAX`], the last wait ending early enough for
/// the request's reply; `None` when there is no time for another try. The same rule serves
/// `TRYAGAIN`/`CLUSTERDOWN` and a request held while its node is down.
pub fn retry_wait(retries: u8, left: Duration) -> Option<Duration> {
    if left <= RETRY_START * 2 {
        return None;
    }
    let backoff = (RETRY_START * (1 << retries.min(8))).min(RETRY_MAX);
    Some(backoff.min(left - RETRY_START * 2))
}

/// The error for a request that was redirected too often.
fn too_many(last: &[u8]) -> Bytes {
    let last = String::from_utf8_lossy(last);
    Bytes::from(format!(
        "-ERR too many cluster redirects for one request (last: {})\r\n",
        last.trim_start_matches('-').trim_end()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOVED: &[u8] = b"-MOVED 3999 127.0.0.1:7001\r\n";
    const DOWN: &[u8] = b"-CLUSTERDOWN The cluster is down\r\n";
    const SECOND: Duration = Duration::from_secs(1);

    fn redirects(n: u8) -> Hops {
        Hops {
            redirects: n,
            retries: 0,
        }
    }

    fn retries(n: u8) -> Hops {
        Hops {
            redirects: 0,
            retries: n,
        }
    }

    #[test]
    fn redirects_are_followed_until_the_hop_limit_or_the_deadline() {
        let Decision::Follow(r) = decide(MOVED, "127.0.0.1", Hops::default(), SECOND) else {
            panic!("MOVED not followed");
        };
        assert_eq!(
            (r.kind, r.addr.as_str()),
            (RedirectKind::Moved, "127.0.0.1:7001")
        );
        let ask = decide(b"-ASK 3999 :7002\r\n", "10.0.0.9", redirects(1), SECOND);
        assert!(
            matches!(ask, Decision::Follow(r) if r.kind == RedirectKind::Ask && r.addr == "10.0.0.9:7002")
        );
        let limit = Decision::GiveUp(Bytes::from_static(
            b"-ERR too many cluster redirects for one request (last: MOVED 3999 127.0.0.1:7001)\r\n",
        ));
        assert_eq!(decide(MOVED, "h", redirects(MAX_HOPS), SECOND), limit);
        assert_eq!(decide(MOVED, "h", Hops::default(), Duration::ZERO), limit);
        // Retries so far don't count against redirects.
        assert!(matches!(
            decide(MOVED, "h", retries(40), SECOND),
            Decision::Follow(_)
        ));
    }

    #[test]
    fn retries_back_off_up_to_a_cap_and_go_on_until_the_deadline() {
        assert_eq!(
            decide(DOWN, "h", Hops::default(), SECOND),
            Decision::RetryAfter(RETRY_START)
        );
        assert_eq!(
            decide(
                b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
                "h",
                retries(2),
                SECOND
            ),
            Decision::RetryAfter(RETRY_START * 4)
        );
        // Past five retries (the old hop limit) a request with time left still retries,
        // at the capped wait.
        assert_eq!(
            decide(DOWN, "h", retries(9), Duration::from_secs(2)),
            Decision::RetryAfter(RETRY_MAX)
        );
        // The last wait ends early enough for the re-sent request's reply.
        assert_eq!(
            decide(DOWN, "h", retries(6), Duration::from_millis(150)),
            Decision::RetryAfter(Duration::from_millis(110))
        );
        // No time for another round trip: the client gets the reply.
        assert_eq!(
            decide(DOWN, "h", retries(1), Duration::from_millis(40)),
            Decision::PassOn
        );
    }

    #[test]
    fn a_whole_op_timeout_of_retries_fits_a_two_second_failover() {
        // Walk the decisions over a 2 s op_timeout: the retries cover all of it.
        let mut left = Duration::from_secs(2);
        let mut hops = Hops::default();
        let mut waited = Duration::ZERO;
        while let Decision::RetryAfter(wait) = decide(DOWN, "h", hops, left) {
            left -= wait;
            waited += wait;
            hops.retries += 1;
        }
        assert!(waited >= Duration::from_millis(1900), "waited {waited:?}");
    }

    #[test]
    fn other_errors_pass_on() {
        assert_eq!(
            decide(
                b"-ERR wrong number of arguments for 'get' command\r\n",
                "h",
                Hops::default(),
                SECOND
            ),
            Decision::PassOn
        );
        assert_eq!(
            decide(b"-MOVED nonsense\r\n", "h", Hops::default(), SECOND),
            Decision::PassOn
        );
    }
}
