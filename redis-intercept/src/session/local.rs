//! Commands the proxy answers itself, as Redis would for one connection: PING, ECHO, QUIT,
//! SELECT, CLIENT ID/GETNAME/SETNAME/SETINFO, RESET and HELLO.

use bytes::{Bytes, BytesMut};

use super::auth::{auth, auth_required, check_credentials};
use super::{ClientState, directory, forward};
use crate::command::Local;
use crate::locks::RwLockRecovered;
use crate::resp::Request;
use crate::service::ServiceCtx;
use crate::upstream::error_reply;

/// `SELECT db`: the client's standalone upstreams move to that database's connections.
pub(super) fn select(req: &Request<'_>, forwarder: &mut forward::Forwarder) -> Bytes {
    let db = std::str::from_utf8(req.arg(1).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse::<i64>().ok());
    match db.map(|db| forwarder.select(db)) {
        Some(Ok(())) => Bytes::from_static(OK),
        Some(Err(reply)) => reply,
        None => error_reply("value is not an integer or out of range"),
    }
}

/// `config|set` → `CONFIG SET`.
pub(super) fn display_name(name: &str) -> String {
    name.replace('|', " ").to_uppercase()
}

/// PING's own rule beyond its arity: at most one message.
pub(super) fn wrong_ping_arity() -> Bytes {
    error_reply("wrong number of arguments for 'ping' command")
}

/// Encodes a bulk string reply.
pub(super) fn bulk(data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 16);
    crate::resp::Frame::Bulk(Bytes::copy_from_slice(data)).encode(&mut out);
    out.freeze()
}

pub(super) const OK: &[u8] = b"+OK\r\n";

/// A null reply in the client's protocol.
pub(super) fn null(resp3: bool) -> Bytes {
    Bytes::from_static(if resp3 { b"_\r\n" } else { b"$-1\r\n" })
}

/// `ACL CAT [category]`: Redis 7.0's categories, or the commands (and subcommands) of one.
fn acl_cat(category: Option<&[u8]>) -> Bytes {
    use crate::command::acl;
    use crate::resp::Frame;
    let names: Vec<&str> = match category {
        None => acl::CATEGORIES.to_vec(),
        Some(c) => match acl::commands_in(&String::from_utf8_lossy(c)) {
            Some(names) => names,
            None => {
                return error_reply(&format!(
                    "Unknown category '{}'",
                    String::from_utf8_lossy(c)
                ));
            }
        },
    };
    Frame::Array(
        names
            .into_iter()
            .map(|n| Frame::Bulk(Bytes::copy_from_slice(n.as_bytes())))
            .collect(),
    )
    .to_bytes()
}

/// Answers a command the proxy handles itself. Arity was checked by the caller.
pub(super) fn local_reply(
    local: Local,
    req: &Request<'_>,
    state: &mut ClientState,
    svc: &ServiceCtx,
) -> Bytes {
    use crate::resp::Frame;
    let arg = |i| req.arg(i).unwrap_or_default();
    match local {
        Local::Ping if req.len() > 2 => wrong_ping_arity(),
        Local::Ping if req.len() == 1 => Bytes::from_static(b"+PONG\r\n"),
        Local::Ping | Local::Echo => bulk(arg(1)),
        Local::Quit => {
            state.closing = true;
            Bytes::from_static(OK)
        }
        // Answered by `select`, which moves the client's connections.
        Local::Select => Bytes::from_static(OK),
        Local::Auth => auth(req, state, svc),
        Local::ClientId => Frame::Integer(state.id as i64).to_bytes(),
        Local::ClientGetName => match &state.name {
            Some(name) => bulk(name),
            None => null(state.resp3),
        },
        Local::ClientSetName => match set_name(state, arg(2)) {
            Ok(()) => Bytes::from_static(OK),
            Err(e) => e,
        },
        Local::ClientSetInfo => match state.entry.set_lib(arg(2), arg(3)) {
            Ok(()) => Bytes::from_static(OK),
            Err(e) => e,
        },
        Local::ClientList => {
            let args: Vec<&[u8]> = req.args().skip(2).collect();
            match directory::list(&svc.name, &args) {
                Ok(text) => verbatim_or_bulk(text, state.resp3),
                Err(e) => e,
            }
        }
        Local::ClientInfo => verbatim_or_bulk(state.entry.line(), state.resp3),
        Local::ClientKill => {
            let args: Vec<&[u8]> = req.args().skip(2).collect();
            match directory::kill(&svc.name, state.id, &args) {
                Ok(reply) | Err(reply) => reply,
            }
        }
        Local::Reset => {
            super::monitor::stop(state.id);
            state.name = None;
            state.entry.set_name(None);
            state
                .entry
                .resp
                .store(2, std::sync::atomic::Ordering::Relaxed);
            state.resp3 = false;
            state.authenticated = !auth_required(svc);
            Bytes::from_static(b"+RESET\r\n")
        }
        Local::Hello => hello(req, state, svc),
        Local::ClientReply => super::modes::reply(req),
        Local::ClientPause => super::modes::pause(state.service_key, req),
        Local::ClientUnpause => super::modes::unpause(state.service_key),
        Local::ClientNoEvict => super::modes::no_evict(req, &state.entry),
        Local::AclWhoami => {
            let auth = svc.auth.read_recovered();
            let user = auth.as_ref().map_or("default", |a| a.username.as_str());
            bulk(user.as_bytes())
        }
        Local::AclCat => acl_cat(req.arg(2)),
        Local::Monitor => {
            super::monitor::start(state.service_key, &state.entry);
            Bytes::from_static(OK)
        }
        // Answered by `tracking::command`, which may answer later.
        Local::ClientTracking
        | Local::ClientCaching
        | Local::ClientGetRedir
        | Local::ClientTrackingInfo
        | Local::ClientUnblock => error_reply("internal error: command misrouted"),
    }
}

/// CLIENT SETNAME's rule: printable ASCII without spaces; empty clears the name.
pub(super) fn set_name(state: &mut ClientState, name: &[u8]) -> Result<(), Bytes> {
    state.name = valid_name(name)?;
    state.entry.set_name(state.name.clone());
    Ok(())
}

/// CLIENT LIST / CLIENT INFO text: a verbatim string in RESP3, a bulk string in RESP2, as
/// Redis sends them.
fn verbatim_or_bulk(text: String, resp3: bool) -> Bytes {
    use crate::resp::Frame;
    if resp3 {
        Frame::Verbatim(Bytes::from(format!("txt:{text}"))).to_bytes()
    } else {
        Frame::Bulk(Bytes::from(text)).to_bytes()
    }
}

/// The name a client asked for, as kept (`None`: cleared), or Redis's error.
fn valid_name(name: &[u8]) -> Result<Option<Bytes>, Bytes> {
    if name.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
        return Err(error_reply(
            "Client names cannot contain spaces, newlines or special characters.",
        ));
    }
    Ok((!name.is_empty()).then(|| Bytes::copy_from_slice(name)))
}

/// What `HELLO [protover [AUTH user pass] [SETNAME name]]` asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct HelloArgs<'r> {
    /// The protocol asked for (`None`: keep the current one).
    pub(super) protocol: Option<u8>,
    /// AUTH's user and password.
    pub(super) credentials: Option<(&'r [u8], &'r [u8])>,
    /// SETNAME's name.
    pub(super) name: Option<&'r [u8]>,
}

/// Parses HELLO's arguments, with Redis's errors for a protocol version it doesn't know and
/// for unknown options.
pub(super) fn hello_args<'r>(req: &'r Request<'_>) -> Result<HelloArgs<'r>, Bytes> {
    let mut args = HelloArgs::default();
    if let Some(ver) = req.arg(1) {
        match std::str::from_utf8(ver)
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
        {
            Some(2) => args.protocol = Some(2),
            Some(3) => args.protocol = Some(3),
            Some(_) => {
                return Err(Bytes::from_static(
                    b"-NOPROTO unsupported protocol version\r\n",
                ));
            }
            None => {
                return Err(error_reply(
                    "Protocol version is not an integer or out of range",
                ));
            }
        }
    }
    let mut i = 2;
    while let Some(opt) = req.arg(i) {
        if opt.eq_ignore_ascii_case(b"AUTH") && req.len() > i + 2 {
            args.credentials = Some((
                req.arg(i + 1).unwrap_or_default(),
                req.arg(i + 2).unwrap_or_default(),
            ));
            i += 3;
        } else if opt.eq_ignore_ascii_case(b"SETNAME") && req.len() > i + 1 {
            args.name = req.arg(i + 1);
            i += 2;
        } else {
            return Err(error_reply(&format!(
                "Syntax error in HELLO option '{}'",
                String::from_utf8_lossy(opt)
            )));
        }
    }
    Ok(args)
}

/// HELLO: authenticates and names the client as asked, then describes the server.
pub(super) fn hello(req: &Request<'_>, state: &mut ClientState, svc: &ServiceCtx) -> Bytes {
    use crate::resp::Frame;
    let HelloArgs {
        protocol,
        credentials,
        name,
    } = match hello_args(req) {
        Ok(args) => args,
        Err(e) => return e,
    };
    if let Some((user, pass)) = credentials
        && let Err(e) = check_credentials(Some(user), pass, state, svc)
    {
        return e;
    }
    if !state.authenticated {
        return Bytes::from_static(
            b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n",
        );
    }
    if let Some(name) = name
        && let Err(e) = set_name(state, name)
    {
        return e;
    }
    if let Some(p) = protocol {
        state.resp3 = p == 3;
        state
            .entry
            .resp
            .store(p, std::sync::atomic::Ordering::Relaxed);
    }
    let s = |t: &'static str| Frame::Bulk(Bytes::from_static(t.as_bytes()));
    let (server, version) = svc.upstream_identity();
    let pairs = vec![
        (s("server"), Frame::Bulk(Bytes::from(server))),
        (s("version"), Frame::Bulk(Bytes::from(version))),
        (s("proto"), Frame::Integer(if state.resp3 { 3 } else { 2 })),
        (s("id"), Frame::Integer(state.id as i64)),
        (s("mode"), s("standalone")),
        (s("role"), s("master")),
        (s("modules"), Frame::Array(vec![])),
        (
            s("proxy"),
            Frame::Bulk(Bytes::from(format!(
                "redis-intercept {}",
                env!("CARGO_PKG_VERSION")
            ))),
        ),
    ];
    if state.resp3 {
        Frame::Map(pairs).to_bytes()
    } else {
        Frame::Array(pairs.into_iter().flat_map(|(k, v)| [k, v]).collect()).to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::{Limits, RequestParser};

    fn with_request(line: &str, f: impl FnOnce(&Request<'_>)) {
        let input = format!("{line}\r\n");
        let mut p = RequestParser::new(Limits::default());
        let n = p.parse(input.as_bytes()).unwrap().unwrap();
        f(&p.request(&input.as_bytes()[..n]));
    }

    #[test]
    fn hello_options_parse_as_in_redis() {
        with_request("HELLO", |r| {
            assert_eq!(hello_args(r), Ok(HelloArgs::default()))
        });
        with_request("HELLO 2 AUTH u p SETNAME n", |r| {
            assert_eq!(
                hello_args(r),
                Ok(HelloArgs {
                    protocol: Some(2),
                    credentials: Some((&b"u"[..], &b"p"[..])),
                    name: Some(&b"n"[..]),
                })
            );
        });
        with_request("HELLO 2 setname n auth u p", |r| {
            let args = hello_args(r).unwrap();
            assert_eq!(args.credentials, Some((&b"u"[..], &b"p"[..])));
        });
        with_request("HELLO 2 AUTH u", |r| {
            assert_eq!(
                hello_args(r),
                Err(error_reply("Syntax error in HELLO option 'AUTH'"))
            );
        });
        with_request("HELLO x", |r| {
            assert_eq!(
                hello_args(r),
                Err(error_reply(
                    "Protocol version is not an integer or out of range"
                ))
            );
        });
        with_request("HELLO 4", |r| {
            assert_eq!(
                hello_args(r),
                Err(Bytes::from_static(
                    b"-NOPROTO unsupported protocol version\r\n"
                ))
            );
        });
    }

    #[test]
    fn client_names_follow_redis_rules() {
        assert_eq!(
            valid_name(b"worker-1"),
            Ok(Some(Bytes::from_static(b"worker-1")))
        );
        assert_eq!(valid_name(b""), Ok(None));
        assert!(valid_name(b"a b").is_err());
        assert!(valid_name(b"a\nb").is_err());
    }

    #[test]
    fn display_names_of_subcommands() {
        assert_eq!(display_name("config|set"), "CONFIG SET");
        assert_eq!(display_name("get"), "GET");
    }
}
