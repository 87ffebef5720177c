//! A subscribed client: connections of its own to the nodes it subscribed on, with pushed
//! messages copied to the client as they arrive, until the client leaves subscribed mode.
//!
//! A RESP2 client may send only what Redis allows in subscribed mode: (P|S)SUBSCRIBE,
//! (P|S)UNSUBSCRIBE and PING go to the nodes. Any other command first asks the nodes whether
//! the client is still subscribed, with a `PING <nonce>` (an array reply while subscribed, a
//! bulk string after; in RESP3 PING answers alike, and the counts in the confirmations read
//! before the answers tell). Still subscribed: a RESP2 client gets Redis's own refusal, and a
//! RESP3 client's command is served as any other (routed, through the reply slots, which the
//! pipe writes between whole pushes), as Redis allows in RESP3. RESET or QUIT close the node
//! connections. Not subscribed any more (the client unsubscribed from everything): the node
//! connections are closed and the session serves the command, and the ones after it, with
//! routing, auth and policies as before. So raw commands never reach a node behind the
//! proxy's back, and a pooled client connection (Jedis returns it to its pool after
//! unsubscribing) is an ordinary one again.
//!
//! On a cluster each channel lives on its slot's master, where PUBLISH is sent too, so that
//! PUBLISH and PUBSUB NUMSUB count the proxy's subscribers exactly; patterns stay on the
//! first node (the cluster bus brings every message everywhere). Shard channels (SSUBSCRIBE)
//! are subscribed per slot, as Redis Cluster requires. A client's channels may so span
//! masters: the pipe opens a connection to each master it needs, and rewrites the count in
//! confirmations to the client's total, as one Redis would count.

use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::input::{InputBuf, read_input};
use super::pubsub_node::{Counts, Node, confirmation, open_node, placed_by, poll_node};
use super::{End, Session};
use crate::cluster::Slot;
use crate::command;
use crate::metrics::GaugeGuard;
use crate::resp::{Request, RequestParser, encode_command};
use crate::upstream::{ConnSettings, error_reply};

/// Most bytes of client commands queued for one node before the client's input is left
/// unread.
const MAX_TO_NODE: usize = 1024 * 1024;

/// How a pub/sub stretch of a session ended.
pub(super) enum Piped {
    /// The client left subscribed mode: the session goes on from the unconsumed input.
    Back,
    /// The session is over.
    End(End),
}

/// Where the question "is the client still subscribed?" stands.
enum Check {
    /// Not asked.
    None,
    /// `PING <nonce>` went to every node: the replies a node may give while subscribed and
    /// after.
    Asked {
        /// `*2 pong <nonce>`: still subscribed there.
        subscribed: Bytes,
        /// `<nonce>` as a bulk string: not subscribed there.
        plain: Bytes,
        /// Nodes that haven't answered yet.
        waiting: usize,
        /// Some node answered that the client is subscribed there.
        any: bool,
        /// When the session stops waiting for the answers (`op_timeout`).
        deadline: Instant,
    },
    /// The answer: whether the client still has any subscription.
    Answered(bool),
}

/// What the input loop decided.
enum InputFlow {
    /// Keep piping.
    Go,
    /// Leave subscribed mode; the command that showed it is still in the input.
    Back,
    /// The client broke the protocol: write what is queued, then close.
    Broken,
    /// Open a connection to this master for a shard channel, then offer the command again.
    Open(String, Box<ConnSettings>),
}

/// Where one command goes.
enum Destination {
    /// To the first node, as sent.
    Home,
    /// To these nodes (indexes into `Pipe::nodes`), these encoded commands.
    Nodes(Vec<(usize, BytesMut)>),
    /// Not in subscribed mode's set: after the check, this refusal (or back to normal).
    Refuse(Bytes),
    /// A master with no connection yet.
    Open(String, Box<ConnSettings>),
}

/// What a wait in the pipe ended with (`usize`: which node).
pub(super) enum PipeEvent {
    Wake,
    CheckTimedOut,
    ClientReadable,
    ClientWritable,
    NodeWrote(usize, usize),
    NodeFlushed(usize),
    NodeRead(usize, usize),
    NodeFailed(usize, std::io::Error),
}

/// A subscribed client's connections, and what goes to the client.
struct Pipe {
    /// The first node (channels, patterns, PING and the check), then any other master a
    /// shard channel needed.
    nodes: Vec<Node>,
    /// Messages and replies not yet written to the client.
    to_client: BytesMut,
    /// The subscribed-mode check.
    check: Check,
    /// Which node is read first next time, so one busy node can't starve the others.
    turn: usize,
    /// The client counts in the subscribed-clients gauge while this is set: it has a
    /// subscription on some node, as the nodes' last confirmations say.
    counted: Option<GaugeGuard>,
}

impl Session {
    /// Serves a client from its (un)subscribe command (the start of `input`) until it leaves
    /// subscribed mode, closes, or the proxy shuts down.
    pub(super) async fn pubsub(
        &mut self,
        client: &TcpStream,
        input: &mut InputBuf,
        target: (String, ConnSettings),
    ) -> Piped {
        let (addr, settings) = target;
        let stream = match open_node(&addr, &settings).await {
            Ok(stream) => stream,
            Err(reply) => {
                // The subscribe command gets the error, and the session goes on unsubscribed.
                self.skip_command(input);
                self.core.push_ready(reply);
                return Piped::Back;
            }
        };
        let mut pipe = Pipe {
            nodes: vec![Node::new(addr, stream)],
            to_client: BytesMut::new(),
            check: Check::None,
            turn: 0,
            counted: None,
        };
        // Replies to commands a RESP3 client runs while subscribed fill the reply slots as
        // usual, but the pipe writes them, between whole pushes: nobody else may write to
        // the client meanwhile.
        let writer = self.core.stream.borrow_mut().take();
        let piped = self.pipe(client, input, &mut pipe).await;
        *self.core.stream.borrow_mut() = writer;
        pipe.counted = None;
        if matches!(piped, Piped::Back) && !pipe.to_client.is_empty() {
            // Messages that came before the answer go out ahead of the next replies.
            self.core.push_ready(pipe.to_client.split().freeze());
        }
        piped
    }

    /// Consumes the command at the start of `input` (one the proxy answered itself).
    fn skip_command(&mut self, input: &mut InputBuf) {
        let mut parser = RequestParser::new(self.svc.limits);
        if let Ok(Some(n)) = parser.parse(input.data()) {
            input.consume(n);
            self.count_command();
        }
    }

    async fn pipe(&mut self, client: &TcpStream, input: &mut InputBuf, pipe: &mut Pipe) -> Piped {
        let mut parser = RequestParser::new(self.svc.limits);
        let mut broken = false;
        let check_sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(check_sleep);
        loop {
            if self.core.shutdown.get() {
                return Piped::End(End::PubSub("proxy shutdown".to_owned()));
            }
            if !broken && !matches!(pipe.check, Check::Asked { .. }) {
                match self.pubsub_input(&mut parser, input, pipe) {
                    InputFlow::Go => {}
                    InputFlow::Back => return Piped::Back,
                    InputFlow::Broken => broken = true,
                    InputFlow::Open(addr, settings) => {
                        match open_node(&addr, &settings).await {
                            Ok(stream) => pipe.nodes.push(Node::new(addr, stream)),
                            Err(reply) => {
                                self.skip_command(input);
                                pipe.to_client.extend_from_slice(&reply);
                            }
                        }
                        continue;
                    }
                }
            }
            if self.core.killed.get() {
                return Piped::End(End::Killed);
            }
            self.core.write_out();
            self.core.out.borrow_mut().drain_into(&mut pipe.to_client);
            if self.core.failure.get().is_some() {
                return Piped::End(End::SlowReader);
            }
            if broken && pipe.to_client.is_empty() {
                return Piped::End(End::ProtocolError);
            }
            if pipe.to_client.len() > self.svc.policy().max_client_buffer {
                return Piped::End(End::SlowReader);
            }
            let read_client = !broken
                && !matches!(pipe.check, Check::Asked { .. })
                && input.may_read() == Ok(true)
                && pipe.nodes.iter().all(|n| n.to_node.len() < MAX_TO_NODE);
            let check_deadline = match &pipe.check {
                Check::Asked { deadline, .. } => Some(*deadline),
                _ => None,
            };
            if let Some(deadline) = check_deadline
                && check_sleep.deadline() != deadline
            {
                check_sleep.as_mut().reset(deadline);
            }
            let core = &self.core;
            pipe.turn = pipe.turn.wrapping_add(1);
            let (count, first) = (pipe.nodes.len(), pipe.turn % pipe.nodes.len());
            let ev = poll_fn(|cx| {
                if core.signal.poll(cx).is_ready() {
                    return Poll::Ready(PipeEvent::Wake);
                }
                if !pipe.to_client.is_empty() && client.poll_write_ready(cx).is_ready() {
                    return Poll::Ready(PipeEvent::ClientWritable);
                }
                if read_client && client.poll_read_ready(cx).is_ready() {
                    return Poll::Ready(PipeEvent::ClientReadable);
                }
                if check_deadline.is_some() && check_sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(PipeEvent::CheckTimedOut);
                }
                for i in (0..count).map(|k| (first + k) % count) {
                    if let Some(ev) = poll_node(i, &mut pipe.nodes[i], cx) {
                        return Poll::Ready(ev);
                    }
                }
                Poll::Pending
            })
            .await;
            match ev {
                PipeEvent::Wake => {}
                PipeEvent::CheckTimedOut => {
                    // A node that doesn't answer within op_timeout: the command waiting on
                    // the check gets an error, and the connection closes (its state is
                    // unknown).
                    pipe.to_client.extend_from_slice(&error_reply(
                        "operation timed out waiting for a subscriber's upstream connection",
                    ));
                    let _ = client.try_write(&pipe.to_client);
                    return Piped::End(End::PubSub(
                        "a node did not answer within op_timeout".to_owned(),
                    ));
                }
                PipeEvent::ClientWritable => match client.try_write(&pipe.to_client) {
                    Ok(n) => pipe.to_client.advance(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Piped::End(End::Io(e.to_string())),
                },
                PipeEvent::ClientReadable => match read_input(client, input) {
                    Ok(Some(0)) => return Piped::End(End::ClientClosed),
                    Ok(_) => {}
                    Err(e) => return Piped::End(End::Io(e.to_string())),
                },
                PipeEvent::NodeWrote(i, n) => {
                    pipe.nodes[i].to_node.advance(n);
                    pipe.nodes[i].unflushed = true;
                }
                PipeEvent::NodeFlushed(i) => pipe.nodes[i].unflushed = false,
                PipeEvent::NodeRead(i, 0) => {
                    // Whatever the nodes sent before this one closed is the client's.
                    let _ = client.try_write(&pipe.to_client);
                    let addr = &pipe.nodes[i].addr;
                    return Piped::End(End::PubSub(format!("{addr} closed the connection")));
                }
                PipeEvent::NodeRead(i, _) => {
                    if let Err(e) = self.node_frames(pipe, i) {
                        return Piped::End(End::PubSub(e));
                    }
                }
                PipeEvent::NodeFailed(i, e) => {
                    return Piped::End(End::PubSub(format!("{}: {e}", pipe.nodes[i].addr)));
                }
            }
        }
    }

    /// Moves every complete frame from node `i` to the client, except the answer to our own
    /// check, with shard counts made the client's total. `Err` is why the pipe must end.
    fn node_frames(&self, pipe: &mut Pipe, i: usize) -> Result<(), String> {
        loop {
            let node = &mut pipe.nodes[i];
            let len = match node.scanner.scan(&node.from_node, &self.svc.limits) {
                Ok(Some(len)) => len,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("protocol error from {}: {e}", node.addr)),
            };
            let frame = node.from_node.split_to(len);
            if let Check::Asked {
                subscribed,
                plain,
                waiting,
                any,
                ..
            } = &mut pipe.check
                && (frame == *subscribed || frame == *plain)
            {
                // Each node answers after everything sent to it before: the client is
                // subscribed if it is on any of them.
                *any |= frame == *subscribed;
                *waiting = waiting.saturating_sub(1);
                if *waiting == 0 {
                    // In RESP3, PING answers alike in both modes: the counts of the
                    // confirmations that came before the answers tell instead.
                    let subscribed = if self.state.resp3 {
                        pipe.nodes.iter().any(|n| n.shards + n.channels > 0)
                    } else {
                        *any
                    };
                    pipe.check = Check::Answered(subscribed);
                }
                continue;
            }
            match confirmation(&frame) {
                Some((counts, at, n)) if pipe.nodes.len() > 1 => {
                    // One Redis would count all the client's channels (or shard channels).
                    let total: i64 = match counts {
                        Counts::Shards => {
                            pipe.nodes[i].shards = n;
                            pipe.nodes.iter().map(|n| n.shards).sum()
                        }
                        Counts::Channels => {
                            pipe.nodes[i].channels = n;
                            pipe.nodes.iter().map(|n| n.channels).sum()
                        }
                    };
                    pipe.to_client.extend_from_slice(&frame[..at]);
                    pipe.to_client
                        .extend_from_slice(format!(":{total}\r\n").as_bytes());
                }
                Some((counts, _, n)) => {
                    match counts {
                        Counts::Shards => pipe.nodes[i].shards = n,
                        Counts::Channels => pipe.nodes[i].channels = n,
                    }
                    pipe.to_client.extend_from_slice(&frame);
                }
                None => {
                    pipe.to_client.extend_from_slice(&frame);
                    continue;
                }
            }
            self.count_subscribed(pipe);
        }
    }

    /// Keeps the subscribed-clients gauge in step with the nodes' last counts, so a client
    /// that unsubscribed from everything stops counting at once, not at its next command.
    fn count_subscribed(&self, pipe: &mut Pipe) {
        use std::sync::atomic::Ordering::Relaxed;
        let subscribed = pipe.nodes.iter().any(|n| n.shards + n.channels > 0);
        let entry = &self.state.entry;
        let total =
            |f: fn(&Node) -> i64| u32::try_from(pipe.nodes.iter().map(f).sum::<i64>()).unwrap_or(0);
        entry.sub.store(total(|n| n.channels), Relaxed);
        entry.ssub.store(total(|n| n.shards), Relaxed);
        let flags = entry.flags.load(Relaxed);
        let pubsub = super::directory::flag::PUBSUB;
        entry.flags.store(
            if subscribed {
                flags | pubsub
            } else {
                flags & !pubsub
            },
            Relaxed,
        );
        if subscribed != pipe.counted.is_some() {
            pipe.counted = subscribed.then(|| GaugeGuard::new(&self.svc.metrics.subscribed));
        }
    }

    /// Handles the client's complete commands in `input`: subscribed-mode commands go to
    /// their nodes; any other starts (or acts on) the subscribed-mode check.
    fn pubsub_input(
        &mut self,
        parser: &mut RequestParser,
        input: &mut InputBuf,
        pipe: &mut Pipe,
    ) -> InputFlow {
        while pipe.nodes.iter().all(|n| n.to_node.len() < MAX_TO_NODE) {
            let n = match parser.parse(input.data()) {
                Ok(None) => return InputFlow::Go,
                Ok(Some(n)) => n,
                Err(e) => {
                    pipe.to_client.extend_from_slice(&e.to_reply());
                    input.clear();
                    return InputFlow::Broken;
                }
            };
            let data = input.data();
            let req = parser.request(&data[..n]);
            if req.is_empty() {
                input.consume(n);
                continue;
            }
            let name = command::lookup(&req).map(|c| c.info.name);
            let refusal = match self.destination(&req, name, pipe) {
                Destination::Home => {
                    pipe.nodes[0].to_node.extend_from_slice(&data[..n]);
                    pipe.check = Check::None;
                    None
                }
                Destination::Nodes(parts) => {
                    for (i, part) in parts {
                        pipe.nodes[i].to_node.extend_from_slice(&part);
                    }
                    pipe.check = Check::None;
                    None
                }
                Destination::Open(addr, settings) => return InputFlow::Open(addr, settings),
                Destination::Refuse(reply) => Some(reply),
            };
            let Some(refusal) = refusal else {
                self.count_command();
                input.consume(n);
                continue;
            };
            match std::mem::replace(&mut pipe.check, Check::None) {
                Check::None => {
                    self.ask_nodes(pipe);
                    return InputFlow::Go;
                }
                // Out of subscribed mode: the session serves this command as any other.
                Check::Answered(false) => return InputFlow::Back,
                Check::Answered(true) if matches!(name, Some("reset" | "quit")) => {
                    return InputFlow::Back;
                }
                Check::Answered(true) => {
                    match self.resp3_dispatch(&req, name) {
                        // Answered stays: until a command goes to the nodes again, nothing
                        // of theirs is owed before the next command's reply.
                        Ok(()) => pipe.check = Check::Answered(true),
                        Err(Some(why)) => {
                            self.core.push_ready(why);
                            pipe.check = Check::Answered(true);
                        }
                        Err(None) => pipe.to_client.extend_from_slice(&refusal),
                    }
                    self.count_command();
                    input.consume(n);
                }
                asked @ Check::Asked { .. } => {
                    pipe.check = asked;
                    return InputFlow::Go;
                }
            }
        }
        InputFlow::Go
    }

    /// Where a command of a subscribed client goes.
    fn destination(&self, req: &Request<'_>, name: Option<&str>, pipe: &Pipe) -> Destination {
        let (upper, shard): (&[u8], bool) = match name {
            // Patterns match channels of every slot: they stay on the first node, which
            // the cluster bus brings every message to.
            Some("psubscribe" | "punsubscribe" | "ping") => {
                return Destination::Home;
            }
            Some("subscribe") => (b"SUBSCRIBE", false),
            Some("unsubscribe") => (b"UNSUBSCRIBE", false),
            Some("ssubscribe") => (b"SSUBSCRIBE", true),
            Some("sunsubscribe") => (b"SUNSUBSCRIBE", true),
            _ => {
                let name = name.map_or_else(
                    || String::from_utf8_lossy(req.arg(0).unwrap_or_default()).to_lowercase(),
                    str::to_owned,
                );
                return Destination::Refuse(error_reply(&format!(
                    "Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
                )));
            }
        };
        if req.len() < 2 {
            if upper == b"SSUBSCRIBE" || upper == b"SUBSCRIBE" {
                // Redis's arity error.
                return Destination::Home;
            }
            // (S)UNSUBSCRIBE from everything: every node with such channels (the first
            // node alone if none, for Redis's reply that there was nothing).
            let mut with: Vec<usize> = (0..pipe.nodes.len())
                .filter(|&i| {
                    let n = &pipe.nodes[i];
                    if shard { n.shards > 0 } else { n.channels > 0 }
                })
                .collect();
            if with.is_empty() {
                with.push(0);
            }
            let mut cmd = BytesMut::new();
            encode_command([upper].into_iter(), &mut cmd);
            return Destination::Nodes(with.into_iter().map(|i| (i, cmd.clone())).collect());
        }
        // Each channel on its slot's master, so that PUBLISH (sent there too) counts the
        // proxy's subscribers exactly: one command per node for plain channels, per slot
        // for shard channels (Redis Cluster refuses shard channels of several slots in one).
        let mut groups: Vec<(Slot, usize, Vec<&[u8]>)> = Vec::new();
        for ch in (1..req.len()).filter_map(|i| req.arg(i)) {
            let slot = Slot::for_key(ch);
            let (addr, settings) = match self.forwarder.pubsub_target(Some(placed_by(ch))) {
                Ok(target) => target,
                Err(e) => return Destination::Refuse(e),
            };
            let Some(i) = pipe.nodes.iter().position(|n| n.addr == addr) else {
                return Destination::Open(addr, Box::new(settings));
            };
            if let Some(g) = groups
                .iter_mut()
                .find(|g| if shard { g.0 == slot } else { g.1 == i })
            {
                g.2.push(ch);
                continue;
            }
            groups.push((slot, i, vec![ch]));
        }
        Destination::Nodes(
            groups
                .into_iter()
                .map(|(_, i, channels)| {
                    let mut cmd = BytesMut::new();
                    let args = std::iter::once(upper).chain(channels);
                    encode_command(args.collect::<Vec<_>>().into_iter(), &mut cmd);
                    (i, cmd)
                })
                .collect(),
        )
    }

    /// Queues `PING <nonce>` for every node; the replies tell whether the client is still
    /// subscribed anywhere.
    fn ask_nodes(&mut self, pipe: &mut Pipe) {
        let nonce = format!(
            "redis-intercept-check-{:x}-{:x}",
            self.state.id,
            self.dice.next()
        );
        let plain = Bytes::from(format!("${}\r\n{nonce}\r\n", nonce.len()));
        let mut subscribed = BytesMut::from(&b"*2\r\n$4\r\npong\r\n"[..]);
        subscribed.extend_from_slice(&plain);
        for node in &mut pipe.nodes {
            node.to_node.extend_from_slice(b"*2\r\n$4\r\nPING\r\n");
            node.to_node.extend_from_slice(&plain);
        }
        pipe.check = Check::Asked {
            subscribed: subscribed.freeze(),
            plain,
            waiting: pipe.nodes.len(),
            any: false,
            deadline: Instant::now() + self.svc.policy().op_timeout,
        };
    }

    fn count_command(&mut self) {
        self.commands += 1;
        self.svc.metrics.commands.inc();
    }
}
