//! A subscribed client: its own connection to one node, with pushed messages copied to the
//! client as they arrive, until the client leaves subscribed mode.
//!
//! Only the commands Redis allows in subscribed mode go to the node: (P|S)SUBSCRIBE,
//! (P|S)UNSUBSCRIBE and PING. Any other command first asks the node whether the client is
//! still subscribed, with a `PING <nonce>` (an array reply while subscribed, a bulk string
//! after). Still subscribed: the command gets Redis's own refusal from the proxy, and RESET or
//! QUIT end the connection to the node. Not subscribed any more (the client unsubscribed from
//! everything): the connection to the node is closed and the session serves the command, and
//! the ones after it, with routing, auth and policies as before. So raw commands never reach
//! the node behind the proxy's back, and a pooled client connection (Jedis returns it to its
//! pool after unsubscribing) is an ordinary one again.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::{End, InputBuf, MAX_QUERY_BUFFER, Session, read_input};
use crate::command;
use crate::resp::{ReplyScanner, RequestParser};
use crate::upstream::tls::Stream;
use crate::upstream::{ConnSettings, error_reply};

/// Most bytes of client commands queued for the node before the client's input is left
/// unread.
const MAX_TO_NODE: usize = 1024 * 1024;

/// How much room a read from the node gets.
const READ_CHUNK: usize = 16 * 1024;

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
    /// `PING <nonce>` went to the node: the replies it may give while subscribed and after.
    Asked {
        /// `*2 pong <nonce>`: still subscribed.
        subscribed: Bytes,
        /// `<nonce>` as a bulk string: not subscribed.
        plain: Bytes,
    },
    /// The node answered: whether the client was still subscribed.
    Answered(bool),
}

/// What the input loop decided.
enum Flow {
    /// Keep piping.
    Go,
    /// Leave subscribed mode; the command that showed it is still in the input.
    Back,
    /// The client broke the protocol: write what is queued, then close.
    Broken,
}

/// What a wait in the pipe ended with.
enum Ev {
    Signal,
    ClientReadable,
    ClientWritable,
    NodeWrote(usize),
    NodeFlushed,
    NodeRead(usize),
    NodeFailed(std::io::Error),
}

/// The node a subscribed client talks to, and what goes each way.
struct Pipe {
    /// `host:port`, for messages and the shard-channel check.
    addr: String,
    /// The connection.
    node: Stream,
    /// Client commands not yet written to the node.
    to_node: BytesMut,
    /// A write to the node may still sit in a TLS buffer.
    unflushed: bool,
    /// Node bytes not yet cut into frames.
    from_node: BytesMut,
    /// Where the next node frame ends.
    scanner: ReplyScanner,
    /// Messages and replies not yet written to the client.
    to_client: BytesMut,
    /// The subscribed-mode check.
    check: Check,
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
        let opened = tokio::time::timeout(
            settings.connect_timeout,
            crate::upstream::open(&addr, &settings),
        )
        .await;
        let node = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err((_, why))) => return self.subscribe_failed(input, &addr, &why),
            Err(_) => return self.subscribe_failed(input, &addr, "connect timed out"),
        };
        let mut pipe = Pipe {
            addr,
            node,
            to_node: BytesMut::new(),
            unflushed: false,
            from_node: BytesMut::new(),
            scanner: ReplyScanner::default(),
            to_client: BytesMut::new(),
            check: Check::None,
        };
        self.svc.metrics.subscribed.inc();
        let piped = self.pipe(client, input, &mut pipe).await;
        self.svc.metrics.subscribed.dec();
        if matches!(piped, Piped::Back) && !pipe.to_client.is_empty() {
            // Messages that came before the answer go out ahead of the next replies.
            self.core.push_ready(pipe.to_client.split().freeze());
        }
        piped
    }

    /// The subscribe command at the start of `input` gets the connect error, and the session
    /// goes on unsubscribed.
    fn subscribe_failed(&mut self, input: &mut InputBuf, addr: &str, why: &str) -> Piped {
        let mut parser = RequestParser::new(self.svc.limits);
        if let Ok(Some(n)) = parser.parse(input.data()) {
            input.consume(n);
            self.commands += 1;
            self.svc.metrics.commands.inc();
        }
        self.core
            .push_ready(error_reply(&format!("upstream {addr} unavailable: {why}")));
        Piped::Back
    }

    async fn pipe(&mut self, client: &TcpStream, input: &mut InputBuf, pipe: &mut Pipe) -> Piped {
        let mut parser = RequestParser::new(self.svc.limits);
        let mut broken = false;
        loop {
            if self.core.shutdown.get() {
                return Piped::End(End::PubSub("proxy shutdown".to_owned()));
            }
            if !broken && !matches!(pipe.check, Check::Asked { .. }) {
                match self.pubsub_input(&mut parser, input, pipe) {
                    Flow::Go => {}
                    Flow::Back => return Piped::Back,
                    Flow::Broken => broken = true,
                }
            }
            if broken && pipe.to_client.is_empty() {
                return Piped::End(End::ProtocolError);
            }
            if pipe.to_client.len() > self.svc.max_client_buffer {
                return Piped::End(End::SlowReader);
            }
            let read_client = !broken
                && !matches!(pipe.check, Check::Asked { .. })
                && input.len() < MAX_QUERY_BUFFER
                && pipe.to_node.len() < MAX_TO_NODE;
            pipe.from_node.reserve(READ_CHUNK);
            let core = &self.core;
            let ev = poll_fn(|cx| {
                if core.signal.poll(cx).is_ready() {
                    return Poll::Ready(Ev::Signal);
                }
                if !pipe.to_client.is_empty() && client.poll_write_ready(cx).is_ready() {
                    return Poll::Ready(Ev::ClientWritable);
                }
                if read_client && client.poll_read_ready(cx).is_ready() {
                    return Poll::Ready(Ev::ClientReadable);
                }
                if !pipe.to_node.is_empty() {
                    match Pin::new(&mut pipe.node).poll_write(cx, &pipe.to_node) {
                        Poll::Ready(Ok(n)) => return Poll::Ready(Ev::NodeWrote(n)),
                        Poll::Ready(Err(e)) => return Poll::Ready(Ev::NodeFailed(e)),
                        Poll::Pending => {}
                    }
                } else if pipe.unflushed {
                    match Pin::new(&mut pipe.node).poll_flush(cx) {
                        Poll::Ready(Ok(())) => return Poll::Ready(Ev::NodeFlushed),
                        Poll::Ready(Err(e)) => return Poll::Ready(Ev::NodeFailed(e)),
                        Poll::Pending => {}
                    }
                }
                match tokio_util::io::poll_read_buf(
                    Pin::new(&mut pipe.node),
                    cx,
                    &mut pipe.from_node,
                ) {
                    Poll::Ready(Ok(n)) => Poll::Ready(Ev::NodeRead(n)),
                    Poll::Ready(Err(e)) => Poll::Ready(Ev::NodeFailed(e)),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            match ev {
                Ev::Signal => {}
                Ev::ClientWritable => match client.try_write(&pipe.to_client) {
                    Ok(n) => pipe.to_client.advance(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Piped::End(End::Io(e.to_string())),
                },
                Ev::ClientReadable => match read_input(client, input) {
                    Ok(Some(0)) => return Piped::End(End::ClientClosed),
                    Ok(_) => {}
                    Err(e) => return Piped::End(End::Io(e.to_string())),
                },
                Ev::NodeWrote(n) => {
                    pipe.to_node.advance(n);
                    pipe.unflushed = true;
                }
                Ev::NodeFlushed => pipe.unflushed = false,
                Ev::NodeRead(0) => {
                    // Whatever the node sent before closing is the client's.
                    let _ = client.try_write(&pipe.to_client);
                    return Piped::End(End::PubSub(format!("{} closed the connection", pipe.addr)));
                }
                Ev::NodeRead(_) => {
                    if let Err(e) = self.node_frames(pipe) {
                        return Piped::End(End::PubSub(e));
                    }
                }
                Ev::NodeFailed(e) => {
                    return Piped::End(End::PubSub(format!("{}: {e}", pipe.addr)));
                }
            }
        }
    }

    /// Moves every complete frame from the node to the client, except the answer to our own
    /// check. `Err` is why the pipe must end.
    fn node_frames(&self, pipe: &mut Pipe) -> Result<(), String> {
        loop {
            let len = match pipe.scanner.scan(&pipe.from_node, &self.svc.limits) {
                Ok(Some(len)) => len,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("protocol error from {}: {e}", pipe.addr)),
            };
            let frame = &pipe.from_node[..len];
            let answer = match &pipe.check {
                Check::Asked { subscribed, .. } if frame == &subscribed[..] => Some(true),
                Check::Asked { plain, .. } if frame == &plain[..] => Some(false),
                _ => None,
            };
            match answer {
                Some(still) => pipe.check = Check::Answered(still),
                None => pipe.to_client.extend_from_slice(frame),
            }
            pipe.from_node.advance(len);
        }
    }

    /// Handles the client's complete commands in `input`: subscribed-mode commands go to the
    /// node; any other starts (or acts on) the subscribed-mode check.
    fn pubsub_input(
        &mut self,
        parser: &mut RequestParser,
        input: &mut InputBuf,
        pipe: &mut Pipe,
    ) -> Flow {
        while pipe.to_node.len() < MAX_TO_NODE {
            let n = match parser.parse(input.data()) {
                Ok(None) => return Flow::Go,
                Ok(Some(n)) => n,
                Err(e) => {
                    pipe.to_client.extend_from_slice(&e.to_reply());
                    input.clear();
                    return Flow::Broken;
                }
            };
            let data = input.data();
            let req = parser.request(&data[..n]);
            if req.is_empty() {
                input.consume(n);
                continue;
            }
            let name = command::lookup(&req).map(|c| c.info.name);
            let forward = match name {
                Some("subscribe" | "psubscribe" | "unsubscribe" | "punsubscribe" | "ping") => {
                    None
                }
                // A shard channel lives on its slot's node: one this connection isn't to
                // would get a MOVED the client can't follow.
                Some("ssubscribe" | "sunsubscribe") => (1..req.len())
                    .filter_map(|i| req.arg(i))
                    .find(|ch| {
                        self.forwarder
                            .pubsub_target(Some(ch))
                            .map_or(true, |(a, _)| a != pipe.addr)
                    })
                    .map(|ch| {
                        error_reply(&format!(
                            "shard channels on more than one master from one connection are not supported by redis-intercept: '{}' is served by another node than this client's other subscriptions ({}); subscribe to it on another connection",
                            String::from_utf8_lossy(ch),
                            pipe.addr
                        ))
                    }),
                _ => Some(error_reply(&format!(
                    "Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                    name.map_or_else(
                        || String::from_utf8_lossy(req.arg(0).unwrap_or_default()).to_lowercase(),
                        str::to_owned
                    )
                ))),
            };
            let Some(refusal) = forward else {
                pipe.to_node.extend_from_slice(&data[..n]);
                self.count_command();
                input.consume(n);
                continue;
            };
            match std::mem::replace(&mut pipe.check, Check::None) {
                Check::None => {
                    self.ask_node(pipe);
                    return Flow::Go;
                }
                // Out of subscribed mode: the session serves this command as any other.
                Check::Answered(false) => return Flow::Back,
                Check::Answered(true) if matches!(name, Some("reset" | "quit")) => {
                    return Flow::Back;
                }
                Check::Answered(true) => {
                    pipe.to_client.extend_from_slice(&refusal);
                    self.count_command();
                    input.consume(n);
                }
                asked @ Check::Asked { .. } => {
                    pipe.check = asked;
                    return Flow::Go;
                }
            }
        }
        Flow::Go
    }

    /// Queues `PING <nonce>` for the node; its reply tells whether the client is subscribed.
    fn ask_node(&mut self, pipe: &mut Pipe) {
        let nonce = format!(
            "redis-intercept-check-{:x}-{:x}",
            self.state.id,
            self.dice.next()
        );
        let plain = Bytes::from(format!("${}\r\n{nonce}\r\n", nonce.len()));
        let mut subscribed = BytesMut::from(&b"*2\r\n$4\r\npong\r\n"[..]);
        subscribed.extend_from_slice(&plain);
        pipe.to_node.extend_from_slice(b"*2\r\n$4\r\nPING\r\n");
        pipe.to_node.extend_from_slice(&plain);
        pipe.check = Check::Asked {
            subscribed: subscribed.freeze(),
            plain,
        };
    }

    fn count_command(&mut self) {
        self.commands += 1;
        self.svc.metrics.commands.inc();
    }
}
