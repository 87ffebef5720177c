//! Per-command statistics (a service's `command_stats`): calls by result and reply latency,
//! labelled with the command's name from the command table, so clients can't grow the label
//! set (every command the table lacks counts as `unknown`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::Latency;

/// The label of commands the table doesn't know.
pub const UNKNOWN: &str = "unknown";

/// Labels of per-command call counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// Service name from the config.
    pub service: String,
    /// Command name as Redis's `COMMAND` spells it (`get`, `client|setname`), or `unknown`.
    pub command: String,
    /// `ok`, or `error` for an error reply (from Redis or from the proxy).
    pub result: String,
}

/// Labels of per-command latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// Service name from the config.
    pub service: String,
    /// As in [`CallLabels`].
    pub command: String,
}

/// The metric families, shared by every service and worker.
#[derive(Clone, Default)]
pub struct CommandFamilies {
    /// Calls by command and result.
    pub calls: Family<CallLabels, Counter>,
    /// Reply latency by command.
    pub latency: Family<CommandLabels, Latency>,
}

/// One command's handles.
pub struct CommandHandles {
    /// Replies that were not errors.
    ok: Counter,
    /// Error replies.
    error: Counter,
    /// From reading the request to its reply reaching the session.
    latency: Latency,
}

impl CommandHandles {
    /// Counts one reply that took `elapsed`.
    pub fn record(&self, error: bool, elapsed: Duration) {
        if error {
            self.error.inc();
        } else {
            self.ok.inc();
        }
        self.latency.observe(elapsed);
    }
}

/// One service's per-command handles on one worker, resolved on first use: the families
/// take a lock per lookup, this cache doesn't.
pub struct CommandStats {
    /// Service name, for the labels.
    service: String,
    /// Where new handles come from.
    families: CommandFamilies,
    /// Handles by command name. Bounded: names come from the command table.
    cache: RefCell<HashMap<&'static str, Rc<CommandHandles>>>,
}

impl CommandStats {
    /// Stats of `service`, recorded into `families`.
    pub fn new(service: &str, families: CommandFamilies) -> CommandStats {
        CommandStats {
            service: service.to_owned(),
            families,
            cache: RefCell::default(),
        }
    }

    /// The handles of the command named `name` (a name from the command table, or
    /// [`UNKNOWN`]).
    pub fn handles(&self, name: &'static str) -> Rc<CommandHandles> {
        if let Some(h) = self.cache.borrow().get(name) {
            return Rc::clone(h);
        }
        let call = |result: &str| {
            self.families
                .calls
                .get_or_create(&CallLabels {
                    service: self.service.clone(),
                    command: name.to_owned(),
                    result: result.to_owned(),
                })
                .clone()
        };
        let handles = Rc::new(CommandHandles {
            ok: call("ok"),
            error: call("error"),
            latency: self
                .families
                .latency
                .get_or_create(&CommandLabels {
                    service: self.service.clone(),
                    command: name.to_owned(),
                })
                .clone(),
        });
        self.cache.borrow_mut().insert(name, Rc::clone(&handles));
        handles
    }
}
