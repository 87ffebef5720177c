//! What one service is at run time, on one worker: its routes and their upstreams, mirrors,
//! the settings a reload changes in place (timeouts, limits, faults), and its client
//! credentials. `build` makes these from the config; `session` only reads them.

mod build;

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use build::{
    SharedParts, UpstreamSecrets, Upstreams, client_auths, conn_settings, percent_to_per_10000,
    policy, upstream_auth, upstream_secrets,
};

use crate::config::ReadPolicy;
use crate::metrics::GaugeGuard;
use crate::metrics::ServiceMetrics;
use crate::resp::Limits;
use crate::upstream::cluster_nodes::ClusterNodes;
use crate::upstream::owned::GenerationConns;
use crate::upstream::standalone::Standalone;
use crate::upstream::{Reply, ReplySink};

/// Where a service's requests go.
pub enum Backend {
    /// One server: this worker's shared connections to it (picked by client id) and the
    /// connections it lends to one client at a time, per database.
    Standalone(Rc<Standalone>),
    /// A Redis Cluster: this worker's pool of its nodes, and where reads may go.
    Cluster(Rc<ClusterNodes>, ReadPolicy),
}

/// Everything a session needs from its service, shared by the sessions of one worker.
pub struct ServiceCtx {
    /// Service name, for logs.
    pub name: String,
    /// The service's routes: index 0 is the catch-all (the service's upstream and mirrors),
    /// then each `[[service.route]]` in config order.
    pub routes: Vec<RouteCtx>,
    /// Which route a key falls under.
    pub prefixes: crate::route::Prefixes,
    /// The settings a reload changes in place (see [`Policy`]), shared by every generation
    /// of the service's routes.
    pub policy: PolicyCell,
    /// Request parsing limits.
    pub limits: Limits,
    /// The service's metric handles.
    pub metrics: ServiceMetrics,
    /// Client-facing credentials (`None`: clients need none), shared by every worker and
    /// replaced by a reload.
    pub auth: SharedAuth,
    /// The sink that swallows mirror replies.
    pub discard: Rc<dyn ReplySink>,
    /// The service's newest generation, shared by all of them: a reload that changes
    /// routes, upstreams or mirrors builds a new one, and clients move to it once nothing
    /// ties them to theirs. (Weak: the worker holds the newest; older ones live as long as
    /// their clients.)
    pub newest: Rc<RefCell<Weak<ServiceCtx>>>,
    /// The upstream connections this generation opened, closed when it is dropped.
    pub owned: GenerationConns,
    /// Counts this generation in the service's `generations` gauge while it lives.
    pub generation: GaugeGuard,
    /// The process-wide budget for client input.
    pub query_budget: Arc<crate::budget::QueryBudget>,
}

impl Backend {
    /// The server's name and version, once a connection has learned them.
    pub fn identity(&self) -> Option<(String, String)> {
        let v = match self {
            Backend::Standalone(server) => server.version_source(),
            Backend::Cluster(pool, _) => pool.version_source(),
        };
        Some((v.server()?, v.get()?))
    }
}

/// What the proxy reports as the server's version until a connection has learned the real
/// one: the version of the built-in command table.
const FALLBACK_VERSION: &str = "7.0.0";

impl ServiceCtx {
    /// The name and version of the service's catch-all upstream, as clients see them in
    /// `HELLO` (`redis` and the built-in table's version until a connection has learned).
    pub fn upstream_identity(&self) -> (String, String) {
        self.routes
            .first()
            .and_then(|r| r.backend.identity())
            .unwrap_or_else(|| ("redis".to_owned(), FALLBACK_VERSION.to_owned()))
    }

    /// The service's newest generation when it isn't this one.
    pub fn replaced_by(&self) -> Option<Rc<ServiceCtx>> {
        let newest = self.newest.borrow();
        if std::ptr::eq(newest.as_ptr(), self) {
            None
        } else {
            newest.upgrade()
        }
    }

    /// The service's settings now. Cheap (no atomics): read it where a decision is made,
    /// so a reload reaches clients that are already connected.
    pub fn policy(&self) -> Rc<Policy> {
        Rc::clone(&self.policy.borrow())
    }
}

/// A service's [`Policy`] as every generation of it shares it.
pub type PolicyCell = Rc<RefCell<Rc<Policy>>>;

/// A service's settings that apply to clients already connected when a reload changes them:
/// nothing in here owns a connection. Each worker holds its own copy, replaced whole.
#[derive(Debug, Clone)]
pub struct Policy {
    /// How long a request may wait for its reply (requests sent from now on).
    pub op_timeout: Duration,
    /// Close clients idle this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Most reply bytes held for one client.
    pub max_client_buffer: usize,
    /// Most requests of one client in flight.
    pub max_pipeline: usize,
    /// Most estimated reply bytes one client may have owed upstream.
    pub reply_window: usize,
    /// Most estimated reply bytes owed to big-reply clients on one worker.
    pub big_reply_budget: usize,
    /// Most connected clients of the service (checked at accept).
    pub max_clients: usize,
    /// Without `auth`: refuse AUTH as Redis does when no password is set (else answer OK).
    pub legacy_auth_reject: bool,
    /// Record per-command calls and latency.
    pub command_stats: bool,
    /// Fault injection rules, tried in order; the first that matches and hits applies.
    pub faults: Vec<Fault>,
    /// The commands the service's clients may run (`None`: all).
    pub acl: Option<std::sync::Arc<crate::command::acl::Acl>>,
}

/// Swallows mirror replies: they are read (to keep the connection in step) and dropped,
/// never returned to a client and never waited for.
pub struct Discard;

impl ReplySink for Discard {
    fn deliver(&self, _token: u64, _reply: Reply<'_>) -> bool {
        false
    }

    fn flush(&self) {}
}

/// What an injected fault does.
#[derive(Debug, Clone)]
pub enum FaultAction {
    /// Answer with this error reply instead of forwarding.
    Error(Bytes),
    /// Forward after this delay. Later commands of the same client wait behind it, so the
    /// client's commands still run in order; other clients are not affected.
    Delay(Duration),
}

/// One fault injection rule, resolved from the config.
#[derive(Debug, Clone)]
pub struct Fault {
    /// What happens.
    pub action: FaultAction,
    /// Chance per matching request in hundredths of a percent (0 to 10000).
    pub per_10000: u32,
    /// Command names it applies to (compared ignoring case); empty: every forwarded command.
    pub commands: Vec<Vec<u8>>,
    /// Only requests whose first key starts with this.
    pub key_prefix: Option<Vec<u8>>,
}

/// A service's client credentials as every worker sees them; a reload swaps the value.
pub type SharedAuth = Arc<std::sync::RwLock<Option<ClientAuth>>>;

/// The credentials clients of a service must present.
#[derive(Clone)]
pub struct ClientAuth {
    /// The user name clients authenticate as (`default` for plain `AUTH password`).
    pub username: String,
    /// Accepted passwords; several, so a password can be rotated.
    pub passwords: Vec<Vec<u8>>,
}

impl ClientAuth {
    /// Whether `user`/`pass` are valid. Every password is compared, each in constant time,
    /// so the time taken doesn't reveal how close a guess was or which password matched.
    pub fn check(&self, user: &[u8], pass: &[u8]) -> bool {
        let user_ok = ct_eq(user, self.username.as_bytes());
        let mut pass_ok = false;
        for p in &self.passwords {
            pass_ok |= ct_eq(p, pass);
        }
        user_ok & pass_ok
    }
}

/// Compares two byte strings without an early exit on the first difference.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A traffic mirror of a route, on one worker.
pub struct Mirror {
    /// The mirror upstream on this worker.
    pub backend: Backend,
    /// Chance per request in hundredths of a percent (0 to 10000); a reload may change it.
    pub per_10000: Cell<u32>,
    /// Copy only commands Redis flags `write`; a reload may change it.
    pub exclude_reads: Cell<bool>,
    /// How long a copy may wait in the queue before it is written (`batch_delay`); added to
    /// its deadline, so a long delay doesn't time copies out while they wait.
    pub batch_delay: std::time::Duration,
    /// Copies handed to the mirror.
    pub sent: prometheus_client::metrics::counter::Counter,
    /// Copies dropped: the mirror's queue was full or the mirror was down.
    pub dropped: prometheus_client::metrics::counter::Counter,
}

/// One route of a service on one worker: index 0 is the catch-all (the service's upstream).
pub struct RouteCtx {
    /// Cut the route's prefix from keys before sending.
    pub remove_prefix: bool,
    /// The route's upstream.
    pub backend: Backend,
    /// The route's mirrors.
    pub mirrors: Vec<Mirror>,
}
