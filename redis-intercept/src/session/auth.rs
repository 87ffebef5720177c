//! Client authentication in the proxy: AUTH and HELLO's AUTH are checked against the
//! service's client credentials and never reach Redis.

use bytes::Bytes;

use super::ClientState;
use super::local::OK;
use crate::locks::RwLockRecovered;
use crate::resp::Request;
use crate::service::{ClientAuth, ServiceCtx};
use crate::upstream::error_reply;

/// Whether a service asks clients for credentials now.
pub(super) fn auth_required(svc: &ServiceCtx) -> bool {
    svc.auth.read_recovered().is_some()
}

/// Redis's reply to wrong credentials.
const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";

/// Redis's reply to `AUTH password` when the default user has no password.
const NO_PASSWORD_SET: &[u8] = b"-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n";

/// Whether `user`/`pass` are accepted by `auth` (the service's client credentials, `None`
/// when clients need none). Without credentials, AUTH is accepted, or refused with Redis's
/// words when `legacy_reject` (`legacy_auth = "reject"`).
fn verify(
    user: Option<&[u8]>,
    pass: &[u8],
    auth: Option<&ClientAuth>,
    legacy_reject: bool,
) -> Result<(), Bytes> {
    match auth {
        Some(auth) if auth.check(user.unwrap_or(b"default"), pass) => Ok(()),
        Some(_) => Err(Bytes::from_static(WRONGPASS)),
        None if legacy_reject => Err(Bytes::from_static(match user {
            Some(_) => WRONGPASS,
            None => NO_PASSWORD_SET,
        })),
        None => Ok(()),
    }
}

/// Checks credentials against the service's client auth and marks the client
/// authenticated when they are right. A failed attempt leaves an authenticated client
/// authenticated, as in Redis.
pub(super) fn check_credentials(
    user: Option<&[u8]>,
    pass: &[u8],
    state: &mut ClientState,
    svc: &ServiceCtx,
) -> Result<(), Bytes> {
    let auth = svc.auth.read_recovered();
    let required = auth.is_some();
    verify(user, pass, auth.as_ref(), svc.policy().legacy_auth_reject)?;
    if required {
        state.authenticated = true;
    }
    Ok(())
}

/// The user (if given) and password of `AUTH [username] password`.
fn auth_args<'r>(req: &'r Request<'_>) -> Result<(Option<&'r [u8]>, &'r [u8]), Bytes> {
    let arg = |i| req.arg(i).unwrap_or_default();
    match req.len() {
        2 => Ok((None, arg(1))),
        3 => Ok((Some(arg(1)), arg(2))),
        _ => Err(error_reply("syntax error")),
    }
}

/// AUTH [username] password, answered by the proxy: it never reaches Redis.
pub(super) fn auth(req: &Request<'_>, state: &mut ClientState, svc: &ServiceCtx) -> Bytes {
    let result = auth_args(req).and_then(|(user, pass)| check_credentials(user, pass, state, svc));
    match result {
        Ok(()) => Bytes::from_static(OK),
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::{Limits, RequestParser};

    fn creds() -> ClientAuth {
        ClientAuth {
            username: "app".to_owned(),
            passwords: vec![b"new".to_vec(), b"old".to_vec()],
        }
    }

    #[test]
    fn any_listed_password_of_the_user_is_accepted() {
        let c = creds();
        assert_eq!(verify(Some(b"app"), b"new", Some(&c), false), Ok(()));
        assert_eq!(verify(Some(b"app"), b"old", Some(&c), false), Ok(()));
        let wrong = Err(Bytes::from_static(WRONGPASS));
        assert_eq!(verify(Some(b"app"), b"nope", Some(&c), false), wrong);
        assert_eq!(verify(Some(b"other"), b"new", Some(&c), false), wrong);
        // `AUTH password` is the default user's.
        assert_eq!(verify(None, b"new", Some(&c), false), wrong);
    }

    #[test]
    fn without_credentials_auth_passes_unless_legacy_reject() {
        assert_eq!(verify(None, b"x", None, false), Ok(()));
        assert_eq!(
            verify(None, b"x", None, true),
            Err(Bytes::from_static(NO_PASSWORD_SET))
        );
        assert_eq!(
            verify(Some(b"u"), b"x", None, true),
            Err(Bytes::from_static(WRONGPASS))
        );
    }

    #[test]
    fn auth_takes_one_or_two_arguments() {
        let parse = |line: &str, f: &dyn Fn(&Request<'_>)| {
            let input = format!("{line}\r\n");
            let mut p = RequestParser::new(Limits::default());
            let n = p.parse(input.as_bytes()).unwrap().unwrap();
            f(&p.request(&input.as_bytes()[..n]));
        };
        parse("AUTH pw", &|r| {
            assert_eq!(auth_args(r), Ok((None, &b"pw"[..])))
        });
        parse("AUTH u pw", &|r| {
            assert_eq!(auth_args(r), Ok((Some(&b"u"[..]), &b"pw"[..])));
        });
        parse("AUTH u pw x", &|r| {
            assert_eq!(auth_args(r), Err(error_reply("syntax error")));
        });
    }
}
