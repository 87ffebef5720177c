//! Asks Redis Sentinel where a master is (`SENTINEL get-master-addr-by-name`), for upstreams
//! in sentinel mode.

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use super::{ConnSettings, open, read_replies};
use crate::resp::Frame;
use crate::resp::encode_command;

/// Asks the sentinels in order for the master monitored as `name`; the first answer wins.
/// `settings` say how to reach a sentinel (its credentials, TLS, mark); `READONLY` and a
/// database are never sent. The error lists each sentinel's failure.
pub async fn ask_master(
    sentinels: &[String],
    name: &str,
    settings: &ConnSettings,
) -> Result<String, String> {
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
async fn ask_one(sentinel: &str, name: &str, settings: &ConnSettings) -> Result<String, String> {
    let mut stream = open(sentinel, settings).await.map_err(|(_, e)| e)?;
    let mut out = BytesMut::new();
    encode_command(
        [
            &b"SENTINEL"[..],
            b"get-master-addr-by-name",
            name.as_bytes(),
        ]
        .into_iter(),
        &mut out,
    );
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("write failed: {e}"))?;
    let reply: Bytes = read_replies(&mut stream, 1, &settings.limits)
        .await?
        .into_iter()
        .next()
        .unwrap_or_default();
    let frame = match Frame::parse(&reply, &settings.limits) {
        Ok(Some((frame, _))) => frame,
        _ => return Err("malformed reply".to_owned()),
    };
    master_addr(&frame, name)
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
                Ok(if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                })
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
