//! Asks Redis Sentinel where a master and its replicas are (`SENTINEL
//! get-master-addr-by-name` and `SENTINEL replicas`), for upstreams in sentinel mode.

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use super::UpstreamError;
use super::{ConnSettings, open, read_replies};
use crate::config::NodeAddr;
use crate::resp::Frame;
use crate::resp::encode_command;

/// What one sentinel says of a master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The master, `host:port`.
    pub master: String,
    /// Its replicas that are up and in sync, `host:port`, in the sentinel's order.
    pub replicas: Vec<String>,
}

/// Asks the sentinels in order about the master monitored as `name`; the first answer wins.
/// `settings` say how to reach a sentinel (its credentials, TLS, mark); `READONLY` and a
/// database are never sent. The error lists each sentinel's failure.
pub async fn ask(
    sentinels: &[String],
    name: &str,
    settings: &ConnSettings,
) -> Result<View, String> {
    let settings = ConnSettings {
        readonly: false,
        db: 0,
        ..settings.clone()
    };
    let mut errors = Vec::new();
    for sentinel in sentinels {
        // The connect and the answer together get one connect timeout (at least 1 s).
        let wait = settings
            .connect_timeout
            .max(std::time::Duration::from_secs(1));
        let answer = tokio::time::timeout(wait, ask_one(sentinel, name, &settings)).await;
        match answer {
            Ok(Ok(addr)) => return Ok(addr),
            Ok(Err(e)) => errors.push(format!("{sentinel}: {e}")),
            Err(_) => errors.push(format!("{sentinel}: no answer within {wait:?}")),
        }
    }
    Err(errors.join("; "))
}

/// One sentinel's answer.
async fn ask_one(sentinel: &str, name: &str, settings: &ConnSettings) -> Result<View, String> {
    let sentinel = NodeAddr::parse(sentinel)?;
    let mut stream = open(&sentinel, settings).await.map_err(|e| match e {
        UpstreamError::Connect { reason, .. } => reason,
        other => other.to_string(),
    })?;
    let mut out = BytesMut::new();
    for sub in [&b"get-master-addr-by-name"[..], b"replicas"] {
        encode_command(
            [&b"SENTINEL"[..], sub, name.as_bytes()].into_iter(),
            &mut out,
        );
    }
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("write failed: {e}"))?;
    let replies = read_replies(&mut stream, 2, &settings.limits).await?;
    let frames: Vec<Frame> = replies
        .iter()
        .map(
            |reply: &Bytes| match Frame::parse(reply, &settings.limits) {
                Ok(Some((frame, _))) => Ok(frame),
                _ => Err("malformed reply".to_owned()),
            },
        )
        .collect::<Result<_, _>>()?;
    let [master, replicas] = frames.as_slice() else {
        return Err("malformed reply".to_owned());
    };
    Ok(View {
        master: master_addr(master, name)?,
        // A sentinel that can't list replicas still gives the master.
        replicas: healthy_replicas(replicas),
    })
}

/// `host:port`, with brackets around an IPv6 host.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The replicas in a `SENTINEL replicas` reply (one flat `[field, value, …]` array each)
/// that are up and whose link to the master is ok.
fn healthy_replicas(frame: &Frame) -> Vec<String> {
    let Frame::Array(entries) = frame else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries {
        let Frame::Array(fields) = entry else {
            continue;
        };
        let field = |name: &str| {
            fields.chunks(2).find_map(|kv| match kv {
                [Frame::Bulk(k), Frame::Bulk(v)] if k.as_ref() == name.as_bytes() => {
                    std::str::from_utf8(v).ok()
                }
                _ => None,
            })
        };
        let down = field("flags").is_none_or(|f| {
            f.split(',')
                .any(|flag| matches!(flag, "s_down" | "o_down" | "disconnected"))
        });
        let linked = field("master-link-status").is_none_or(|s| s == "ok");
        let port = field("port").and_then(|p| p.parse().ok());
        if let (Some(ip), Some(port), false, true) = (field("ip"), port, down, linked) {
            out.push(host_port(ip, port));
        }
    }
    out
}

/// The `host:port` in a `get-master-addr-by-name` reply (`[host, port]`; an IPv6 host gets
/// brackets).
fn master_addr(frame: &Frame, name: &str) -> Result<String, String> {
    match frame {
        Frame::Array(parts) => match parts.as_slice() {
            [Frame::Bulk(host), Frame::Bulk(port)] => {
                let host = std::str::from_utf8(host).map_err(|_| "host is not UTF-8")?;
                let port: u16 = std::str::from_utf8(port)
                    .ok()
                    .and_then(|p| p.parse().ok())
                    .ok_or("port is not a number")?;
                Ok(host_port(host, port))
            }
            _ => Err("reply is not [host, port]".to_owned()),
        },
        Frame::NullArray | Frame::NullBulk | Frame::Null => {
            Err(format!("does not monitor a master named {name:?}"))
        }
        Frame::Error(e) => Err(String::from_utf8_lossy(e).into_owned()),
        _ => Err("reply is not [host, port]".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Frame {
        Frame::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn replica(ip: &str, port: &str, flags: &str, link: &str) -> Frame {
        Frame::Array(
            [
                ("name", "x"),
                ("ip", ip),
                ("port", port),
                ("flags", flags),
                ("master-link-status", link),
            ]
            .iter()
            .flat_map(|(k, v)| [bulk(k), bulk(v)])
            .collect(),
        )
    }

    #[test]
    fn keeps_the_replicas_that_are_up_and_in_sync() {
        let reply = Frame::Array(vec![
            replica("10.0.0.6", "6379", "slave", "ok"),
            replica("10.0.0.7", "6379", "s_down,slave", "ok"),
            replica("10.0.0.8", "6379", "slave,disconnected", "ok"),
            replica("10.0.0.9", "6379", "slave", "err"),
            replica("fd00::6", "6380", "slave", "ok"),
        ]);
        assert_eq!(
            healthy_replicas(&reply),
            vec!["10.0.0.6:6379".to_owned(), "[fd00::6]:6380".to_owned()]
        );
        assert!(healthy_replicas(&Frame::Error(Bytes::from_static(b"ERR"))).is_empty());
    }

    #[test]
    fn reads_the_master_address_or_says_why_not() {
        let reply = Frame::Array(vec![bulk("10.0.0.5"), bulk("6379")]);
        assert_eq!(master_addr(&reply, "m"), Ok("10.0.0.5:6379".to_owned()));
        let v6 = Frame::Array(vec![bulk("fd00::5"), bulk("6380")]);
        assert_eq!(master_addr(&v6, "m"), Ok("[fd00::5]:6380".to_owned()));
        let unknown = master_addr(&Frame::NullArray, "cache").unwrap_err();
        assert!(unknown.contains("\"cache\""), "{unknown}");
        let bad_port = Frame::Array(vec![bulk("h"), bulk("x")]);
        assert!(master_addr(&bad_port, "m").is_err());
        let err = Frame::Error(Bytes::from_static(b"NOAUTH Authentication required."));
        assert_eq!(
            master_addr(&err, "m"),
            Err("NOAUTH Authentication required.".to_owned())
        );
    }
}
