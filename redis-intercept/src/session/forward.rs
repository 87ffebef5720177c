//! Where a client's forwarded request goes: the route its keys fall under (longest key
//! prefix, else the service's catch-all upstream), that route's upstream (a standalone
//! server or a cluster), and copies to that route's mirrors.
//!
//! A multi-key command whose keys fall under different routes is split by route (and each
//! part again by slot on a cluster) and merged; other commands whose keys span routes are
//! refused. With `remove_prefix` the route's prefix is cut from every key before sending.
//!
//! A client in a transaction or a blocking command is *pinned*: one route's upstream lends it a
//! dedicated connection (to the node of its first key on a cluster), and everything it sends
//! goes there, unsplit and unmirrored, until the session gives the connection back.

use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use super::Sampler;
use super::cluster::ClientCounts;
use super::merge::{Merge, MergeKind, Positions};
use super::mirror::mirror;
use super::target::{Target, cut_keys};
use crate::cluster::{Redirect, RedirectKind, Slot};
use crate::command::Command;
use crate::resp::{Limits, Request, RequestParser, encode_command};
use crate::route::{self, Prefixes, SplitKind};
use crate::service::RouteCtx;
use crate::upstream::dedicated::DedicatedPool;
use crate::upstream::{ConnSettings, NodeConn, ReplySink, ReplyTo, error_reply, lanes};

/// A connection lent to one client (a transaction, a blocking command), on one route.
struct Pinned {
    /// The route whose upstream lent it.
    route: usize,
    /// The connection.
    conn: NodeConn,
    /// Where it goes back.
    pool: Rc<DedicatedPool>,
    /// The route's upstream is a cluster: every key must then be in `slot`.
    cluster: bool,
    /// The slot of the first key sent on it (cluster only).
    slot: Option<Slot>,
}

/// One client's targets for one route: the route's upstream and each of its mirrors.
struct RouteTargets {
    /// The route's upstream.
    main: Target,
    /// The route's mirrors, in the order of [`RouteCtx::mirrors`].
    mirrors: Vec<Target>,
}

/// A client's way to every upstream of its service.
pub struct Forwarder {
    /// By route index (0: the catch-all).
    routes: Vec<RouteTargets>,
    /// Key indexes of the current request (reused).
    keys: Vec<usize>,
    /// The connection this client has to itself, if any: every request goes there.
    pinned: Option<Pinned>,
    /// The client's id, which picks its shared connections.
    client: u64,
    /// The database the client selected (standalone upstreams; a cluster has only 0).
    db: u32,
    /// The client's requests go on the bulk lane (see `upstream::lanes`).
    bulk: bool,
    /// The client speaks RESP3: its requests go on RESP3 connections.
    resp3: bool,
}

/// Everything of the service a forward needs.
pub struct Routing<'a> {
    /// The routes, catch-all first.
    pub routes: &'a [RouteCtx],
    /// The prefix matcher (empty: everything goes to the catch-all).
    pub prefixes: &'a Prefixes,
    /// Swallows mirror replies.
    pub discard: &'a Rc<dyn ReplySink>,
    /// Limits for re-parsing rewritten requests.
    pub limits: Limits,
}

/// The per-request context of a forward.
pub struct Ctx<'a, 'd> {
    /// The service's routes.
    pub svc: &'a Routing<'a>,
    /// Random draws for mirror sampling.
    pub dice: &'d mut Sampler,
}

impl Forwarder {
    /// A client's targets.
    pub fn new(
        routes: &[RouteCtx],
        client: u64,
        discard: &Rc<dyn ReplySink>,
        counts: &ClientCounts,
    ) -> Forwarder {
        Forwarder {
            routes: routes
                .iter()
                .map(|r| RouteTargets {
                    main: Target::new(&r.backend, client, discard, counts),
                    mirrors: r
                        .mirrors
                        .iter()
                        .map(|m| Target::new(&m.backend, client, discard, counts))
                        .collect(),
                })
                .collect(),
            keys: Vec::new(),
            pinned: None,
            client,
            db: 0,
            bulk: false,
            resp3: false,
        }
    }

    /// `SELECT db`: every standalone upstream of the client's routes and mirrors moves to
    /// that database. Checks the number against the catch-all upstream's `databases`.
    ///
    /// # Errors
    /// Redis's reply for a database out of range; a refusal while the client holds a
    /// connection of its own (WATCH, a blocking command), or when its catch-all upstream is
    /// a cluster.
    pub fn select(&mut self, db: i64) -> Result<(), Bytes> {
        let catch_all = self.routes.first().map(|r| &r.main);
        if let Some(Target::Conn { server, .. }) = catch_all {
            if db < 0 || db >= i64::from(server.databases()) {
                return Err(error_reply("DB index is out of range"));
            }
        } else if db != 0 {
            return Err(error_reply(&format!(
                "redis-intercept serves database 0 only on a Redis Cluster; SELECT {db} is not supported"
            )));
        }
        let Ok(db) = u32::try_from(db) else {
            return Err(error_reply("DB index is out of range"));
        };
        if db == self.db {
            return Ok(());
        }
        if self.pinned.is_some() {
            return Err(error_reply(
                "SELECT while a WATCH or blocking command holds a connection is not supported by redis-intercept",
            ));
        }
        let key = self.conn_key();
        for r in &mut self.routes {
            r.main.select(db, key);
            for m in &mut r.mirrors {
                m.select(db, self.client);
            }
        }
        self.db = db;
        Ok(())
    }

    /// Whether the client's requests go on the bulk lane.
    pub fn is_bulk(&self) -> bool {
        self.bulk
    }

    /// Moves the client's requests to the bulk lane or back, only while none is in flight;
    /// mirrors stay (their requests are never waited for).
    pub fn set_bulk(&mut self, bulk: bool) {
        self.bulk = bulk;
        self.rekey();
    }

    /// Moves the client's requests to connections in RESP3 or back to RESP2, so that replies
    /// reach it in its protocol. Only while none is in flight (the session waits for them
    /// before HELLO or RESET), and never while pinned (refused before).
    pub fn set_protocol(&mut self, resp3: bool) {
        self.resp3 = resp3;
        self.rekey();
    }

    fn rekey(&mut self) {
        let key = self.conn_key();
        for r in &mut self.routes {
            r.main.set_key(self.db, key);
        }
    }

    /// What picks the client's shared connections of its main upstreams.
    fn conn_key(&self) -> u64 {
        lanes::key(self.client, self.bulk, self.resp3)
    }

    /// The database the client selected.
    pub fn db(&self) -> u32 {
        self.db
    }

    /// Whether the client has a connection of its own.
    pub fn is_pinned(&self) -> bool {
        self.pinned.is_some()
    }

    /// Where a subscribing client's own connection goes: the catch-all upstream (channels
    /// aren't keys), at the owner of `channel` on a cluster for sharded pub/sub.
    ///
    /// # Errors
    /// No node to connect to.
    pub fn pubsub_target(&self, channel: Option<&[u8]>) -> Result<(String, ConnSettings), Bytes> {
        match self.routes.first() {
            Some(r) => r.main.plain_target(channel),
            None => Err(error_reply("service has no upstream")),
        }
    }

    /// The connection pinned to the client, if any (CLIENT UNBLOCK reaches its node).
    pub fn pinned_conn(&self) -> Option<&NodeConn> {
        self.pinned.as_ref().map(|p| &p.conn)
    }

    /// Whether a transaction's connection can be picked before any key is seen: the service
    /// has one route, to a standalone server.
    pub fn pins_without_key(&self, svc: &Routing<'_>) -> bool {
        svc.prefixes.is_empty()
            && matches!(
                self.routes.first().map(|r| &r.main),
                Some(Target::Conn { .. })
            )
    }

    /// The one route `req`'s keys fall under; `None` for a keyless command.
    ///
    /// # Errors
    /// The keys fall under different routes.
    pub fn route_of(
        &mut self,
        svc: &Routing<'_>,
        req: &Request<'_>,
        cmd: Option<Command>,
    ) -> Result<Option<usize>, Bytes> {
        let mut keys = std::mem::take(&mut self.keys);
        keys.clear();
        if let Some(c) = cmd {
            c.info.key_indexes(req, &mut keys);
        }
        let route_of = |k: usize| svc.prefixes.route_of(req.arg(k).unwrap_or_default());
        let first = keys.first().map(|&k| route_of(k));
        let result = match first {
            Some(r) if keys.iter().any(|&k| route_of(k) != r) => Err(error_reply(&format!(
                "the keys of '{}' fall under different routes of this service, and a transaction or blocking command runs on one",
                String::from_utf8_lossy(req.arg(0).unwrap_or_default()).to_uppercase()
            ))),
            first => Ok(first),
        };
        self.keys = keys;
        result
    }

    /// Lends the client a connection of its own from `route`'s upstream: to the node of
    /// `req`'s first key on a cluster (any master without one).
    ///
    /// # Errors
    /// The route has no such node (an unserved slot, no upstream).
    pub fn pin(
        &mut self,
        svc: &Routing<'_>,
        route: usize,
        req: Option<(&Request<'_>, Option<Command>)>,
    ) -> Result<(), Bytes> {
        let mut keys = std::mem::take(&mut self.keys);
        keys.clear();
        if let Some((req, Some(c))) = req {
            c.info.key_indexes(req, &mut keys);
        }
        let cut = Self::cut(svc, route);
        let key = match (req, keys.first()) {
            (Some((req, _)), Some(&k)) => req.arg(k).map(|a| a.get(cut..).unwrap_or_default()),
            _ => None,
        };
        self.keys = keys;
        let Some(targets) = self.routes.get(route) else {
            return Err(error_reply("internal error: unknown route"));
        };
        if self.db != 0 && targets.main.is_cluster() {
            return Err(other_db_on_cluster(self.db));
        }
        let (conn, pool) = targets.main.dedicated(key)?;
        let cluster = matches!(targets.main, Target::Cluster(_));
        let slot = key.filter(|_| cluster).map(Slot::for_key);
        let pinned = Pinned {
            route,
            conn,
            pool,
            cluster,
            slot,
        };
        if let Some(old) = self.pinned.replace(pinned) {
            old.pool.give_back(old.conn, false);
        }
        Ok(())
    }

    /// Whether the client is pinned to a cluster node (whose slots can move).
    pub fn pinned_to_cluster(&self) -> bool {
        self.pinned.as_ref().is_some_and(|p| p.cluster)
    }

    /// The first keyed command on the client's cluster connection got `reply`: if it is a
    /// MOVED, the slot map learns the new owner and the client is pinned to that node instead
    /// (the old connection, with whatever the command left on it, is closed). False if
    /// `reply` is not a MOVED this can follow.
    pub fn follow_moved(&mut self, reply: &[u8]) -> bool {
        let Some(p) = &self.pinned else {
            return false;
        };
        let redirect = match Redirect::parse(reply, p.conn.host()) {
            Some(r) if p.cluster && r.kind == RedirectKind::Moved => r,
            _ => return false,
        };
        let Some(Target::Cluster(cluster)) = self.routes.get(p.route).map(|t| &t.main) else {
            return false;
        };
        let pool = cluster.pool();
        pool.note_moved(redirect.slot, &redirect.addr);
        let Ok((conn, dedicated)) = pool.dedicated(Some(redirect.slot), cluster.resp3()) else {
            return false;
        };
        let route = p.route;
        let old = self.pinned.replace(Pinned {
            route,
            conn,
            pool: dedicated,
            cluster: true,
            slot: Some(redirect.slot),
        });
        if let Some(old) = old {
            old.pool.give_back(old.conn, false);
        }
        true
    }

    /// Gives the client's own connection back: kept for the next client if `clean` (no
    /// transaction, WATCH or reply pending on it), else closed.
    pub fn unpin(&mut self, clean: bool) {
        if let Some(p) = self.pinned.take() {
            p.pool.give_back(p.conn, clean);
        }
    }

    /// Sends `req` on the pinned connection, cutting the route's prefix if asked.
    fn send_pinned(
        &mut self,
        cx: &mut Ctx<'_, '_>,
        req: &Request<'_>,
        cmd: Option<Command>,
        to: ReplyTo,
    ) -> Result<(), Bytes> {
        let route = self.route_of(cx.svc, req, cmd)?;
        let Some(pinned) = &mut self.pinned else {
            return Err(error_reply("internal error: no dedicated connection"));
        };
        if route.is_some_and(|r| r != pinned.route) {
            return Err(error_reply(&format!(
                "'{}' has keys under another route than the transaction or blocking command before it",
                String::from_utf8_lossy(req.arg(0).unwrap_or_default()).to_uppercase()
            )));
        }
        let cut = Self::cut(cx.svc, pinned.route);
        let mut keys = std::mem::take(&mut self.keys);
        keys.clear();
        if let Some(c) = cmd {
            c.info.key_indexes(req, &mut keys);
        }
        let result = pinned_send(pinned, req, &keys, cut, to);
        self.keys = keys;
        result
    }

    /// Sends `req` to the route(s) its keys fall under; the reply goes to `sink` as `token`.
    ///
    /// # Errors
    /// A reply to give the client at once.
    pub fn forward(
        &mut self,
        cx: &mut Ctx<'_, '_>,
        req: &Request<'_>,
        cmd: Option<Command>,
        to: ReplyTo,
    ) -> Result<(), Bytes> {
        if self.pinned.is_some() {
            return self.send_pinned(cx, req, cmd, to);
        }
        if cx.svc.prefixes.is_empty() {
            return self.send_to(cx, 0, req, cmd, to);
        }
        let mut keys = std::mem::take(&mut self.keys);
        keys.clear();
        if let Some(c) = cmd {
            c.info.key_indexes(req, &mut keys);
        }
        let prefixes = cx.svc.prefixes;
        let route_of = |k: usize| prefixes.route_of(req.arg(k).unwrap_or_default());
        let first = keys.first().map_or(0, |&k| route_of(k));
        let result = if keys.iter().all(|&k| route_of(k) == first) {
            self.send_routed(cx, first, req, cmd, &keys, to)
        } else {
            self.split(cx, req, cmd, &keys, to)
        };
        self.keys = keys;
        result
    }

    /// The length of `route`'s prefix if it is cut from keys, else 0.
    fn cut(svc: &Routing<'_>, route: usize) -> usize {
        let strip = route != 0 && svc.routes.get(route).is_some_and(|r| r.remove_prefix);
        if strip {
            svc.prefixes.prefix_len(route)
        } else {
            0
        }
    }

    /// Sends a request whose keys are all under `route`, cutting the prefix if asked.
    fn send_routed(
        &mut self,
        cx: &mut Ctx<'_, '_>,
        route: usize,
        req: &Request<'_>,
        cmd: Option<Command>,
        keys: &[usize],
        to: ReplyTo,
    ) -> Result<(), Bytes> {
        let cut = Self::cut(cx.svc, route);
        if cut == 0 {
            return self.send_to(cx, route, req, cmd, to);
        }
        let out = cut_keys(req, keys, cut);
        self.send_encoded(cx, route, &out, cmd, to)
    }

    /// Splits a multi-key command over routes and merges the parts' replies; commands that
    /// can't be split are refused.
    fn split(
        &mut self,
        cx: &mut Ctx<'_, '_>,
        req: &Request<'_>,
        cmd: Option<Command>,
        keys: &[usize],
        to: ReplyTo,
    ) -> Result<(), Bytes> {
        let name = req.arg(0).unwrap_or_default();
        let Some(kind) = cmd.and_then(|c| route::split_kind(c.info.name)) else {
            return Err(error_reply(&format!(
                "the keys of '{}' fall under different routes of this service, and it can't be split",
                String::from_utf8_lossy(name).to_uppercase()
            )));
        };
        let groups = cx.svc.prefixes.group_keys(req, keys);
        let positions = match kind {
            SplitKind::Values => Positions::new(
                groups.iter().map(|(_, idx)| idx.iter().copied()),
                req.len() - 1,
            ),
            _ => Positions::default(),
        };
        let deadline = to.deadline;
        let merge = Merge::new(
            to.sink,
            to.token,
            MergeKind::Split(kind, positions),
            groups.len(),
        );
        let parent: Rc<dyn ReplySink> = merge.clone();
        for (i, (route, idx)) in groups.iter().enumerate() {
            let cut = Self::cut(cx.svc, *route);
            let mut args: Vec<&[u8]> = vec![name];
            for &k in idx {
                args.push(
                    req.arg(k)
                        .unwrap_or_default()
                        .get(cut..)
                        .unwrap_or_default(),
                );
                if kind == SplitKind::AllOk {
                    args.push(req.arg(k + 1).unwrap_or_default());
                }
            }
            let mut out = BytesMut::new();
            encode_command(args.into_iter(), &mut out);
            let part = ReplyTo::new(Rc::clone(&parent), i as u64, deadline);
            if let Err(e) = self.send_encoded(cx, *route, &out, cmd, part) {
                let _ = merge.deliver(i as u64, e.into());
            }
        }
        Ok(())
    }

    /// Parses a command the proxy encoded and sends it to `route`.
    fn send_encoded(
        &mut self,
        cx: &mut Ctx<'_, '_>,
        route: usize,
        encoded: &[u8],
        cmd: Option<Command>,
        to: ReplyTo,
    ) -> Result<(), Bytes> {
        let mut parser = RequestParser::new(cx.svc.limits);
        match parser.parse(encoded) {
            Ok(Some(n)) => {
                let req = parser.request(&encoded[..n]);
                self.send_to(cx, route, &req, cmd, to)
            }
            _ => Err(error_reply(
                "internal error: a rewritten request did not parse",
            )),
        }
    }

    /// Sends to `route`'s upstream, then copies to its mirrors.
    fn send_to(
        &mut self,
        cx: &mut Ctx<'_, '_>,
        route: usize,
        req: &Request<'_>,
        cmd: Option<Command>,
        to: ReplyTo,
    ) -> Result<(), Bytes> {
        let (Some(targets), Some(ctx)) = (self.routes.get_mut(route), cx.svc.routes.get(route))
        else {
            return Err(error_reply("internal error: unknown route"));
        };
        if self.db != 0 && targets.main.is_cluster() {
            return Err(other_db_on_cluster(self.db));
        }
        let deadline = to.deadline;
        let result = targets.main.forward(req, cmd, to);
        if result.is_ok() && !ctx.mirrors.is_empty() {
            mirror(
                req,
                cmd,
                ctx,
                &mut targets.mirrors,
                self.db,
                cx.svc.discard,
                cx.dice,
                deadline,
            );
        }
        result
    }
}

/// Sends `req` (keys at `keys`, `cut` bytes of prefix to remove) on a pinned connection. On a
/// cluster every key must be in the slot the connection was pinned for, as Redis Cluster
/// requires of a transaction: a key elsewhere gets `-CROSSSLOT` here rather than a `MOVED`
/// from the node, which a client that sees one server can't follow.
fn pinned_send(
    pinned: &mut Pinned,
    req: &Request<'_>,
    keys: &[usize],
    cut: usize,
    to: ReplyTo,
) -> Result<(), Bytes> {
    if pinned.cluster {
        for &k in keys {
            let key = req.arg(k).unwrap_or_default();
            let slot = Slot::for_key(key.get(cut..).unwrap_or_default());
            match pinned.slot {
                None => pinned.slot = Some(slot),
                Some(s) if s != slot => {
                    return Err(Bytes::from_static(
                        b"-CROSSSLOT Keys in request don't hash to the same slot\r\n",
                    ));
                }
                Some(_) => {}
            }
        }
    }
    if cut == 0 {
        return pinned.conn.send(req, to).map_err(Bytes::from);
    }
    let out = cut_keys(req, keys, cut);
    pinned.conn.send_encoded(&out, to).map_err(Bytes::from)
}

/// The refusal for a request routed to a cluster while the client has another database
/// selected.
fn other_db_on_cluster(db: u32) -> Bytes {
    error_reply(&format!(
        "database {db} is selected, and this key's route leads to a Redis Cluster, which has database 0 only"
    ))
}
