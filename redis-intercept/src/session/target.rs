//! How one client reaches one upstream: its shared connection (or the read targets its
//! read policy allows) on a standalone server, its cluster client on a cluster, and the
//! dedicated connections lent for transactions and blocking commands.

use std::rc::Rc;

use bytes::Bytes;

use super::cluster::{ClientCounts, ClusterClient, ClusterShared};
use super::info::InfoCtx;
use super::merge::{Merge, MergeKind};
use crate::cluster::Slot;
use crate::command::Command;
use crate::config::ReadPolicy;
use crate::resp::Request;
use crate::route;
use crate::service::Backend;
use crate::upstream::dedicated::DedicatedPool;
use crate::upstream::standalone::{Db, Standalone};
use crate::upstream::{ConnSettings, NodeConn, ReplySink, ReplyTo, error_reply, lanes};

/// How one client reaches one upstream.
pub(super) enum Target {
    /// A standalone server: the client's shared connection and the dedicated connections
    /// for its selected database.
    Conn {
        /// The server's connections on this worker, per database.
        server: Rc<Standalone>,
        /// The shared connection this client uses.
        conn: NodeConn,
        /// Where its dedicated connections come from.
        pool: Rc<DedicatedPool>,
        /// The replicas reads may go to (a sentinel upstream with a read policy).
        reads: Option<ReadTargets>,
        /// What INFO says of the service's clients, and whether this client speaks RESP3.
        info: Box<(ClientCounts, bool)>,
    },
    /// Its routing state on a cluster.
    Cluster(ClusterClient),
    /// An upstream with no connection (never configured so; answers with an error).
    None,
}

impl Target {
    pub(super) fn new(
        backend: &Backend,
        client: u64,
        discard: &Rc<dyn ReplySink>,
        counts: &ClientCounts,
    ) -> Target {
        match backend {
            Backend::Standalone(server) => match pick(&server.db(0), client) {
                Some((conn, pool)) => Target::Conn {
                    server: Rc::clone(server),
                    conn,
                    pool,
                    reads: ReadTargets::new(server, 0, client),
                    info: Box::new((counts.clone(), false)),
                },
                None => Target::None,
            },
            Backend::Cluster(pool, policy) => Target::Cluster(ClusterClient::new(ClusterShared {
                pool: Rc::clone(pool),
                policy: *policy,
                client,
                key: std::cell::Cell::new(client),
                discard: Rc::clone(discard),
                counts: counts.clone(),
            })),
        }
    }

    pub(super) fn forward(
        &mut self,
        req: &Request<'_>,
        cmd: Option<Command>,
        to: ReplyTo,
    ) -> Result<(), Bytes> {
        match self {
            Target::Conn {
                conn,
                reads: Some(reads),
                ..
            } if route::is_read(cmd) => Ok(reads.pick(conn)?.send(req, to)?),
            Target::Conn {
                conn, pool, info, ..
            } => match cmd.map(|c| c.info.name) {
                // A server running a script serves nothing more on the connection that sent
                // it, which may be this client's shared one: the kill goes on one of its own.
                Some("script|kill" | "function|kill") => {
                    let alone = pool.take(conn.addr());
                    let sent = alone.send(req, to);
                    alone.retire();
                    Ok(sent?)
                }
                // The server's INFO with the proxy's identity and its count of clients.
                Some("info") => {
                    let (counts, resp3) = &**info;
                    let ctx = InfoCtx {
                        map: None,
                        upstream: String::new(),
                        resp3: *resp3,
                        connected_clients: usize::try_from(counts.connected.get()).unwrap_or(0),
                        max_clients: counts.policy.borrow().max_clients,
                    };
                    let merge = Merge::new(to.sink, to.token, MergeKind::Info(Box::new(ctx)), 1);
                    let sink: Rc<dyn ReplySink> = merge;
                    Ok(conn.send(req, ReplyTo::new(sink, 0, to.deadline))?)
                }
                _ => Ok(conn.send(req, to)?),
            },
            Target::Cluster(cluster) => cluster.forward(req, cmd, to),
            Target::None => Err(error_reply("service has no upstream")),
        }
    }

    /// A connection for this client alone to the node that serves `key` (as sent, prefix
    /// cut), or to the server or any master when there is no key.
    pub(super) fn dedicated(
        &self,
        key: Option<&[u8]>,
    ) -> Result<(NodeConn, Rc<DedicatedPool>), Bytes> {
        match self {
            Target::Conn { conn, pool, .. } => Ok((pool.take(conn.addr()), Rc::clone(pool))),
            Target::Cluster(cluster) => cluster
                .pool()
                .dedicated(key.map(Slot::for_key), cluster.resp3()),
            Target::None => Err(error_reply("service has no upstream")),
        }
    }

    /// Where a client's plain connection of its own goes (pub/sub): the server, the master of
    /// `channel`'s slot (sharded pub/sub), or any master.
    pub(super) fn plain_target(
        &self,
        channel: Option<&[u8]>,
    ) -> Result<(String, ConnSettings), Bytes> {
        match self {
            Target::Conn { conn, pool, .. } => {
                Ok((conn.addr().to_owned(), pool.settings().clone()))
            }
            Target::Cluster(cluster) => cluster
                .pool()
                .plain_target(channel.map(Slot::for_key), cluster.resp3()),
            Target::None => Err(error_reply("service has no upstream")),
        }
    }
}

impl Target {
    /// Moves a standalone target to database `db`'s connections (made now if this worker has
    /// none yet), those that the connection key `client` picks. Other targets stay as they
    /// are.
    pub(super) fn select(&mut self, db: u32, client: u64) {
        if let Target::Conn {
            server,
            conn,
            pool,
            reads,
            info,
        } = self
            && let Some((c, p)) = pick(&server.db(db), client)
        {
            *conn = c;
            *pool = p;
            *reads = ReadTargets::new(server, db, client);
            info.1 = lanes::is_resp3(client);
        }
    }

    /// Moves the target's shared connections to those `key` picks (see `upstream::lanes`),
    /// in database `db`. Only while the client has no request in flight.
    pub(super) fn set_key(&mut self, db: u32, key: u64) {
        match self {
            Target::Conn { .. } => self.select(db, key),
            Target::Cluster(cluster) => cluster.set_key(key),
            Target::None => {}
        }
    }

    /// Whether this is a Redis Cluster (database 0 only).
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster(_))
    }
}

/// Where one client's reads may go on a server with replicas.
pub(super) struct ReadTargets {
    /// The read policy.
    pub(super) policy: ReadPolicy,
    /// The client's shared connection to each replica, for its database.
    pub(super) replicas: Vec<NodeConn>,
    /// Turns, so reads spread over the usable nodes.
    pub(super) roll: usize,
}

impl ReadTargets {
    /// The replicas of `server` (if reads go there) for `client` in database `db`.
    pub(super) fn new(server: &Standalone, db: u32, client: u64) -> Option<ReadTargets> {
        let reads = server.reads()?;
        Some(ReadTargets {
            policy: reads.policy,
            replicas: reads
                .replicas
                .iter()
                .filter_map(|r| pick(&r.db(db), client).map(|(c, _)| c))
                .collect(),
            roll: client as usize,
        })
    }

    /// The connection a read goes to, by the policy (as `route::pick_node` for a cluster
    /// shard): `master`'s or a replica's. A connection that is connecting counts as usable.
    pub(super) fn pick<'a>(&'a mut self, master: &'a NodeConn) -> Result<&'a NodeConn, Bytes> {
        self.roll = self.roll.wrapping_add(1);
        let usable = |c: &&NodeConn| !c.is_down();
        let up = self.replicas.iter().filter(usable).count();
        let nth_up = |n: usize| self.replicas.iter().filter(usable).nth(n);
        let replica = (up > 0).then(|| nth_up(self.roll % up)).flatten();
        let master_up = !master.is_down();
        Ok(match self.policy {
            ReadPolicy::Master => master,
            ReadPolicy::PreferMaster if master_up => master,
            ReadPolicy::PreferMaster | ReadPolicy::PreferReplica => replica.unwrap_or(master),
            ReadPolicy::Replica => match replica {
                Some(r) => r,
                // None usable: one of them anyway, so the client gets that node's error.
                None if !self.replicas.is_empty() => {
                    &self.replicas[self.roll % self.replicas.len()]
                }
                None => {
                    return Err(error_reply(
                        "no replica is known (read_policy = \"replica\"): the sentinels list none that is up",
                    ));
                }
            },
            ReadPolicy::Any => {
                let n = up + usize::from(master_up);
                match self.roll % n.max(1) {
                    i if i < up => nth_up(i).unwrap_or(master),
                    _ => master,
                }
            }
        })
    }
}

/// The shared connection of `db` that `client` uses, and the database's dedicated pool.
pub(super) fn pick(db: &Db, client: u64) -> Option<(NodeConn, Rc<DedicatedPool>)> {
    let n = db.conns.len();
    (n > 0).then(|| {
        (
            db.conns[lanes::index(n, client)].clone(),
            Rc::clone(&db.dedicated[usize::from(lanes::is_resp3(client))]),
        )
    })
}

/// `req` encoded with the first `cut` bytes of each key (at `keys`) removed.
pub(super) fn cut_keys(req: &Request<'_>, keys: &[usize], cut: usize) -> bytes::BytesMut {
    let mut out = bytes::BytesMut::new();
    crate::resp::encode_command(
        req.args().enumerate().map(|(i, a)| {
            if keys.contains(&i) {
                a.get(cut..).unwrap_or_default()
            } else {
                a
            }
        }),
        &mut out,
    );
    out
}
