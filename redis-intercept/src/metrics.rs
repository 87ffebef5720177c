//! Prometheus metrics: one registry for the process, with handles resolved once so the data
//! path only does relaxed atomic adds.

mod commands;
mod latency;

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

pub use commands::{CommandFamilies, CommandHandles, CommandStats, UNKNOWN};
pub use latency::{Latency, LatencyBatch};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of per-service metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// Service name from the config.
    pub service: String,
}

/// Labels of per-worker client counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// Service name from the config.
    pub service: String,
    /// Worker thread number.
    pub worker: String,
}

/// Labels of client disconnects.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// Service name from the config.
    pub service: String,
    /// Why the client went away: client_closed, quit, protocol_error, slow_reader, idle,
    /// io_error, shutdown.
    pub reason: String,
}

/// Labels of per-upstream-node metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    /// Upstream name from the config.
    pub upstream: String,
    /// `host:port` of the node.
    pub node: String,
}

/// Labels of mirrored requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    /// Service name from the config.
    pub service: String,
    /// The mirror upstream.
    pub upstream: String,
    /// `sent` or `dropped` (queue full or mirror down).
    pub result: String,
}

/// Labels of cluster events (redirects, topology refreshes).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// Upstream name from the config.
    pub upstream: String,
    /// Redirects: `moved`, `ask`, `tryagain`, `clusterdown`. Refreshes: `ok`, `failed`.
    pub kind: String,
}

/// Labels of injected faults.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    /// Service name from the config.
    pub service: String,
    /// `error` or `delay`.
    pub kind: String,
}

/// Every metric the proxy exports.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    registry: Registry,
    /// Clients connected now.
    pub clients_connected: Family<ServiceLabels, Gauge>,
    /// Clients connected now, per worker thread: shows how evenly connections spread.
    pub worker_clients: Family<WorkerLabels, Gauge>,
    /// Clients in subscribed mode now (each holds a pub/sub connection of its own).
    pub clients_subscribed: Family<ServiceLabels, Gauge>,
    /// Clients accepted since start.
    pub clients_accepted: Family<ServiceLabels, Counter>,
    /// Clients refused because of `max_clients`.
    pub clients_rejected: Family<ServiceLabels, Counter>,
    /// Client connections closed, by reason.
    pub clients_closed: Family<CloseLabels, Counter>,
    /// Commands received from clients.
    pub commands: Family<ServiceLabels, Counter>,
    /// Shared upstream connections up now (summed over workers).
    pub upstream_connections_up: Family<NodeLabels, Gauge<i64, AtomicI64>>,
    /// Dedicated upstream connections up now (transactions, blocking commands; lent or idle
    /// in the pool). Kept apart from the shared ones, which readiness counts.
    pub upstream_dedicated_up: Family<NodeLabels, Gauge<i64, AtomicI64>>,
    /// Upstream connections lost or failed to connect.
    pub upstream_failures: Family<NodeLabels, Counter>,
    /// Upstream connections reset because a request passed its op_timeout.
    pub upstream_timeouts: Family<NodeLabels, Counter>,
    /// How long requests on shared upstream connections waited for their replies.
    pub upstream_latency: Family<NodeLabels, Latency>,
    /// From reading a request to writing its reply, per service (first request of each read
    /// batch).
    pub request_latency: Family<ServiceLabels, Latency>,
    /// Requests copied to mirrors, sent or dropped.
    pub mirror_requests: Family<MirrorLabels, Counter>,
    /// Cluster redirects and retries followed, by kind.
    pub cluster_redirects: Family<ClusterLabels, Counter>,
    /// Cluster topology refreshes, by result.
    pub cluster_refreshes: Family<ClusterLabels, Counter>,
    /// Connects to a VIP seen by the eBPF programs, by what happened (copied from their
    /// per-CPU counters when `/metrics` is read).
    pub intercepted_connects: Family<ResultLabels, Gauge<i64, AtomicI64>>,
    /// With `[intercept] accelerate`: sockets paired, writes handed straight to the peer,
    /// sockets that fell back to TCP, and those sent to TCP by `accelerate_backlog` (copied
    /// from the programs' counters like the above).
    pub accelerated: Family<ResultLabels, Gauge<i64, AtomicI64>>,
    /// Reloads of the config file (SIGHUP or a change seen), `applied` or `failed`: a bad
    /// ConfigMap edit is otherwise only a log line.
    pub config_reloads: Family<ResultLabels, Counter>,
    /// 1 when the last reload was applied (or none was tried), 0 after a failed one.
    pub config_last_reload_successful: Gauge,
    /// Bytes of unparsed client input held now, over all clients (`query_buffer_budget`).
    pub query_buffer_bytes: Gauge,
    /// Times a client stopped being read because `query_buffer_budget` was spent.
    pub query_buffer_paused: Counter,
    /// Generations of each service's routes in use, summed over workers: above the worker
    /// count, some clients are still on routes a reload replaced (in a transaction, a
    /// blocking command or subscribed).
    pub route_generations: Family<ServiceLabels, Gauge>,
    /// Per-command calls and latency (only services with `command_stats` on record them).
    pub command_families: CommandFamilies,
    /// Requests a fault rule hit.
    pub faults: Family<FaultLabels, Counter>,
    /// Keys in the client-side caching tables, summed over workers.
    pub tracking_keys: Gauge,
    /// Invalidation messages sent to tracking clients.
    pub tracking_invalidations: Counter,
}

/// A `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// Intercepted connects: `redirected`, `skipped_mark`, `skipped_policy`,
    /// `skipped_no_pod_address`. Config reloads: `applied`, `failed`.
    pub result: String,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("redis_intercept");
        let m = Metrics {
            clients_connected: Family::default(),
            worker_clients: Family::default(),
            clients_subscribed: Family::default(),
            clients_accepted: Family::default(),
            clients_rejected: Family::default(),
            clients_closed: Family::default(),
            commands: Family::default(),
            upstream_connections_up: Family::default(),
            upstream_dedicated_up: Family::default(),
            upstream_failures: Family::default(),
            upstream_timeouts: Family::default(),
            upstream_latency: Family::default(),
            request_latency: Family::default(),
            mirror_requests: Family::default(),
            cluster_redirects: Family::default(),
            cluster_refreshes: Family::default(),
            intercepted_connects: Family::default(),
            accelerated: Family::default(),
            config_reloads: Family::default(),
            config_last_reload_successful: Gauge::default(),
            query_buffer_bytes: Gauge::default(),
            query_buffer_paused: Counter::default(),
            route_generations: Family::default(),
            command_families: CommandFamilies::default(),
            faults: Family::default(),
            tracking_keys: Gauge::default(),
            tracking_invalidations: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "clients_connected",
            "Clients connected now",
            m.clients_connected.clone(),
        );
        registry.register(
            "clients_subscribed",
            "Clients in subscribed mode now, each on a pub/sub connection of its own",
            m.clients_subscribed.clone(),
        );
        registry.register(
            "clients_accepted",
            "Clients accepted",
            m.clients_accepted.clone(),
        );
        registry.register(
            "clients_rejected",
            "Clients refused because max_clients was reached",
            m.clients_rejected.clone(),
        );
        registry.register(
            "clients_closed",
            "Client connections closed, by reason",
            m.clients_closed.clone(),
        );
        registry.register(
            "commands",
            "Commands received from clients",
            m.commands.clone(),
        );
        registry.register(
            "upstream_connections_up",
            "Shared upstream connections that are up",
            m.upstream_connections_up.clone(),
        );
        registry.register(
            "upstream_dedicated_connections_up",
            "Dedicated upstream connections (transactions, blocking commands) that are up",
            m.upstream_dedicated_up.clone(),
        );
        registry.register(
            "upstream_failures",
            "Upstream connections lost or failed to connect",
            m.upstream_failures.clone(),
        );
        registry.register(
            "upstream_timeouts",
            "Upstream connections reset because a request passed op_timeout",
            m.upstream_timeouts.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from reading a client's request to writing its reply (the first request of \
             each read batch)",
            m.request_latency.clone(),
        );
        registry.register(
            "upstream_request_duration_seconds",
            "Time from queueing a request on a shared upstream connection to reading its reply",
            m.upstream_latency.clone(),
        );
        registry.register(
            "mirror_requests",
            "Requests copied to a mirror: sent, or dropped because its queue was full or it was down",
            m.mirror_requests.clone(),
        );
        registry.register(
            "worker_clients",
            "Clients connected now, per worker thread",
            m.worker_clients.clone(),
        );
        registry.register(
            "cluster_redirects",
            "Cluster redirects and retries the proxy followed (moved, ask, tryagain, clusterdown)",
            m.cluster_redirects.clone(),
        );
        registry.register(
            "cluster_refreshes",
            "Cluster topology refreshes, by result (ok, failed), summed over workers",
            m.cluster_refreshes.clone(),
        );
        registry.register(
            "intercepted_connects",
            "Connects to a VIP seen by the eBPF programs: redirected, or left alone and why",
            m.intercepted_connects.clone(),
        );
        registry.register(
            "accelerated",
            "With [intercept] accelerate: sockets paired, writes spliced to the peer socket, sockets unpaired (using TCP), sockets sent through TCP because their reader held more than accelerate_backlog",
            m.accelerated.clone(),
        );
        registry.register(
            "config_reloads",
            "Reloads of the config file (SIGHUP or a change seen), applied or failed",
            m.config_reloads.clone(),
        );
        registry.register(
            "config_last_reload_successful",
            "1 when the last config reload was applied (or none was tried), 0 after a failed one",
            m.config_last_reload_successful.clone(),
        );
        registry.register(
            "query_buffer_bytes",
            "Bytes of unparsed client input held now, over all clients",
            m.query_buffer_bytes.clone(),
        );
        registry.register(
            "tracking_keys",
            "Keys read by tracking clients (CLIENT TRACKING) that the proxy remembers, over all workers",
            m.tracking_keys.clone(),
        );
        registry.register(
            "tracking_invalidations",
            "Invalidation messages sent to tracking clients",
            m.tracking_invalidations.clone(),
        );
        registry.register(
            "query_buffer_paused",
            "Times a client stopped being read because query_buffer_budget was spent",
            m.query_buffer_paused.clone(),
        );
        registry.register(
            "route_generations",
            "Generations of a service's routes in use, summed over workers (more than the \
             workers: clients still on routes a reload replaced)",
            m.route_generations.clone(),
        );
        registry.register(
            "command_calls",
            "Commands by name and result (ok, error), for services with command_stats on",
            m.command_families.calls.clone(),
        );
        registry.register(
            "command_duration_seconds",
            "Time from reading a command to its reply reaching the client's session, by \
             command, for services with command_stats on",
            m.command_families.latency.clone(),
        );
        registry.register(
            "faults",
            "Requests a fault rule hit, by kind (error, delay)",
            m.faults.clone(),
        );
        m.config_last_reload_successful.set(1);
        Arc::new(Metrics { registry, ..m })
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String can't fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Handles for one service's hot-path metrics.
    pub fn service(&self, service: &str, worker: usize) -> ServiceMetrics {
        let labels = ServiceLabels {
            service: service.to_owned(),
        };
        let worker_labels = WorkerLabels {
            service: service.to_owned(),
            worker: worker.to_string(),
        };
        ServiceMetrics {
            connected: self.clients_connected.get_or_create(&labels).clone(),
            worker_connected: self.worker_clients.get_or_create(&worker_labels).clone(),
            subscribed: self.clients_subscribed.get_or_create(&labels).clone(),
            accepted: self.clients_accepted.get_or_create(&labels).clone(),
            rejected: self.clients_rejected.get_or_create(&labels).clone(),
            commands: self.commands.get_or_create(&labels).clone(),
            generations: self.route_generations.get_or_create(&labels).clone(),
            latency: self.request_latency.get_or_create(&labels).clone(),
            by_command: Rc::new(CommandStats::new(service, self.command_families.clone())),
            fault_errors: self.fault(service, "error"),
            fault_delays: self.fault(service, "delay"),
            service: service.to_owned(),
            closed: self.clients_closed.clone(),
        }
    }

    /// The counter of faults of `kind` injected into `service`'s requests.
    fn fault(&self, service: &str, kind: &str) -> Counter {
        self.faults
            .get_or_create(&FaultLabels {
                service: service.to_owned(),
                kind: kind.to_owned(),
            })
            .clone()
    }

    /// Handles for one mirror of one service: (sent, dropped).
    pub fn mirror(&self, service: &str, upstream: &str) -> (Counter, Counter) {
        let get = |result: &str| {
            self.mirror_requests
                .get_or_create(&MirrorLabels {
                    service: service.to_owned(),
                    upstream: upstream.to_owned(),
                    result: result.to_owned(),
                })
                .clone()
        };
        (get("sent"), get("dropped"))
    }

    /// The counter of cluster events `kind` in `family` for `upstream`.
    pub fn cluster(family: &Family<ClusterLabels, Counter>, upstream: &str, kind: &str) -> Counter {
        family
            .get_or_create(&ClusterLabels {
                upstream: upstream.to_owned(),
                kind: kind.to_owned(),
            })
            .clone()
    }

    /// Handles for one upstream node's metrics.
    pub fn node(&self, upstream: &str, node: &str) -> NodeMetrics {
        let labels = NodeLabels {
            upstream: upstream.to_owned(),
            node: node.to_owned(),
        };
        NodeMetrics {
            up: self.upstream_connections_up.get_or_create(&labels).clone(),
            failures: self.upstream_failures.get_or_create(&labels).clone(),
            timeouts: self.upstream_timeouts.get_or_create(&labels).clone(),
            latency: Some(self.upstream_latency.get_or_create(&labels).clone()),
        }
    }

    /// Like [`Metrics::node`] for a dedicated connection: its `up` is the dedicated gauge,
    /// so lent connections never make a node look ready.
    pub fn dedicated_node(&self, upstream: &str, node: &str) -> NodeMetrics {
        let shared = self.node(upstream, node);
        NodeMetrics {
            up: self
                .upstream_dedicated_up
                .get_or_create(&NodeLabels {
                    upstream: upstream.to_owned(),
                    node: node.to_owned(),
                })
                .clone(),
            // A blocking command waits as long as it likes: not a latency.
            latency: None,
            ..shared
        }
    }
}

/// A gauge counted up for as long as the guard lives, so every path that ends what it counts
/// (an error, an early return, a panic) counts it down.
#[must_use = "the gauge goes down again when the guard is dropped"]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    /// Counts `gauge` up now, and down when the guard is dropped.
    pub fn new(gauge: &Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Pre-resolved metric handles of one service on one worker (cheap to clone: each is an
/// `Arc` or an `Rc`).
#[derive(Clone)]
pub struct ServiceMetrics {
    /// Clients connected now.
    pub connected: Gauge,
    /// Clients connected now on this worker.
    pub worker_connected: Gauge,
    /// Clients in subscribed mode now.
    pub subscribed: Gauge,
    /// Clients accepted.
    pub accepted: Counter,
    /// Clients refused by `max_clients`.
    pub rejected: Counter,
    /// Commands received.
    pub commands: Counter,
    /// Generations of the service's routes in use.
    pub generations: Gauge,
    /// Request latency as the client sees it (sampled once per read batch).
    pub latency: Latency,
    /// Per-command calls and latency, recorded when the service's `command_stats` is on.
    pub by_command: Rc<CommandStats>,
    /// Requests answered with an injected error.
    pub fault_errors: Counter,
    /// Requests held back by an injected delay.
    pub fault_delays: Counter,
    /// Service name, for the close-reason family.
    service: String,
    /// Closes by reason (rare, so looked up when it happens).
    closed: Family<CloseLabels, Counter>,
}

impl ServiceMetrics {
    /// Counts a closed client.
    pub fn closed(&self, reason: &str) {
        self.closed
            .get_or_create(&CloseLabels {
                service: self.service.clone(),
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Pre-resolved metric handles of one upstream node.
#[derive(Clone)]
pub struct NodeMetrics {
    /// Connections up now.
    pub up: Gauge<i64, AtomicI64>,
    /// Connection failures.
    pub failures: Counter,
    /// Timeout resets.
    pub timeouts: Counter,
    /// Reply latency (shared connections only).
    pub latency: Option<Latency>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_prefix_and_labels() {
        let m = Metrics::new();
        let s = m.service("cache", 0);
        s.commands.inc_by(3);
        s.closed("slow_reader");
        m.node("main", "127.0.0.1:6379").up.inc();
        let text = m.encode();
        assert!(
            text.contains("redis_intercept_commands_total{service=\"cache\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "redis_intercept_clients_closed_total{service=\"cache\",reason=\"slow_reader\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("redis_intercept_upstream_connections_up{upstream=\"main\",node=\"127.0.0.1:6379\"} 1"),
            "{text}"
        );
    }
}
