//! Durations ("250ms", "5s") and sizes ("64MiB") as the config writes them, and node
//! addresses (`host:port`, IPv6 in brackets).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as a string with a unit: "250ms", "5s", "1m", "1h".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    /// The duration, or `None` when it is zero ("off").
    pub fn non_zero(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

/// Parses "250ms", "5s", "1.5s", "2m", "1h", "0".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("duration {text:?} needs a unit (ms, s, m, h)"))?;
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("duration {text:?} does not start with a number"))?;
    let secs = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "duration {text:?} has unknown unit {unit:?} (use ms, s, m, h)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration {text:?} is out of range"))
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", self.0.as_millis()))
    }
}

/// A size in bytes, written as a number or a string with a unit: "64MiB", "512KiB", "1GB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

/// Parses "1024", "64KiB", "64MiB", "1GiB", "10MB", "5KB", "1GB".
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: usize = num
        .parse()
        .map_err(|_| format!("size {text:?} does not start with a whole number"))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "size {text:?} has unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => usize::try_from(n)
                .map(ByteSize)
                .map_err(|_| serde::de::Error::custom("size is too large")),
            Raw::Text(t) => parse_size(&t)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0 as u64)
    }
}

/// Splits `host:port` (or `[v6]:port`).
///
/// # Errors
/// A message saying what is malformed.
pub fn split_host_port(node: &str) -> Result<(String, u16), String> {
    let (host, port) = node
        .rsplit_once(':')
        .ok_or_else(|| format!("{node:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{node:?} has no host"));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{node:?} has no valid port"))?;
    Ok((host.to_owned(), port))
}

/// A node's address as written (`host:port`, IPv6 hosts in brackets), with its host split
/// out once, where the address is first read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    /// `host:port` as written.
    text: String,
    /// The host, brackets removed (TLS server names and redirects that name no host use it).
    host: String,
}

impl NodeAddr {
    /// Parses `host:port`.
    ///
    /// # Errors
    /// Why `text` is not `host:port` (see [`split_host_port`]).
    pub fn parse(text: &str) -> Result<NodeAddr, String> {
        let (host, _) = split_host_port(text)?;
        Ok(NodeAddr {
            text: text.to_owned(),
            host,
        })
    }

    /// An address that didn't parse, kept as written with no host (connecting to it fails
    /// with the resolver's words).
    pub fn unparsed(text: String) -> NodeAddr {
        NodeAddr {
            text,
            host: String::new(),
        }
    }

    /// `host:port` as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The host.
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl std::fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_keep_their_text_and_split_the_host_once() {
        let v4 = NodeAddr::parse("10.0.0.5:6379").unwrap();
        assert_eq!((v4.as_str(), v4.host()), ("10.0.0.5:6379", "10.0.0.5"));
        let v6 = NodeAddr::parse("[::1]:7000").unwrap();
        assert_eq!((v6.as_str(), v6.host()), ("[::1]:7000", "::1"));
        assert_eq!(v6.to_string(), "[::1]:7000");
        assert!(NodeAddr::parse("redis").is_err());
        assert!(NodeAddr::parse(":6379").is_err());
        assert_eq!(NodeAddr::unparsed("x".into()).host(), "");
    }
}
