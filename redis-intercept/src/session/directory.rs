//! The proxy's clients as `CLIENT LIST`, `CLIENT INFO` and `CLIENT KILL` see them, across
//! worker threads: an entry per connected client, registered when it connects and removed
//! when it leaves, with what those commands show (updated by the client's own session with
//! relaxed atomic stores, so the request path takes no lock). `CLIENT KILL` reaches a
//! client on another worker through that worker's kill channel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use bytes::Bytes;

use crate::command::{Command, CommandInfo};
use crate::locks::LockRecovered;
use crate::upstream::error_reply;

/// Messages a worker may have waiting from other workers (kills, invalidations). A kill
/// past it is dropped (and not counted as killed); an invalidation past it turns into an
/// "invalidate everything" for its client (`ClientEntry::lost`).
pub(super) const MAIL_QUEUE: usize = 16 * 1024;

/// What reaches a worker's clients from other workers.
pub(super) enum Mail {
    /// CLIENT KILL named this client.
    Kill(u64),
    /// An invalidation message, encoded for the client.
    Push(u64, Bytes),
    /// Look for clients whose invalidations didn't fit in the queue.
    Lost,
}

/// A worker's mail queue.
#[derive(Clone)]
pub(super) struct Mailbox {
    /// The queue.
    pub(super) tx: tokio::sync::mpsc::Sender<Mail>,
    /// Some client of the worker has [`ClientEntry::lost`] set.
    pub(super) lost: Arc<AtomicBool>,
}

/// Every connected client of the process, by id. Bounded by the services' `max_clients`.
static CLIENTS: LazyLock<Mutex<HashMap<u64, Arc<ClientEntry>>>> = LazyLock::new(Default::default);

/// Flags shown in `flags=`.
pub(super) mod flag {
    /// In MULTI (`x`).
    pub const MULTI: u8 = 1;
    /// Subscribed (`P`).
    pub const PUBSUB: u8 = 2;
    /// Waiting on a blocking command (`b`).
    pub const BLOCKED: u8 = 4;
    /// CLIENT TRACKING on (`t`).
    pub const TRACKING: u8 = 8;
    /// Its tracking redirect is gone (`R`).
    pub const BROKEN_REDIRECT: u8 = 16;
    /// Tracking in BCAST mode (`B`).
    pub const BCAST: u8 = 32;
}

/// Names a client gave itself.
#[derive(Default)]
struct Names {
    /// CLIENT SETNAME.
    name: Option<Bytes>,
    /// CLIENT SETINFO LIB-NAME.
    lib_name: Option<Bytes>,
    /// CLIENT SETINFO LIB-VER.
    lib_ver: Option<Bytes>,
}

/// One connected client, as CLIENT LIST shows it.
pub(super) struct ClientEntry {
    /// CLIENT ID.
    pub(super) id: u64,
    /// Its service: CLIENT LIST shows the clients of the caller's service, as one Redis
    /// shows its own.
    service: Arc<str>,
    /// The client's address and the proxy's end.
    addr: Option<SocketAddr>,
    laddr: Option<SocketAddr>,
    /// The proxy's file descriptor for it.
    fd: i32,
    /// When it connected.
    created: Instant,
    /// Milliseconds from `created` to its last command.
    last_active: AtomicU64,
    /// Its selected database.
    pub(super) db: AtomicU32,
    /// 2 or 3.
    pub(super) resp: AtomicU8,
    /// [`flag`] bits.
    pub(super) flags: AtomicU8,
    /// Channels and patterns, and shard channels, it is subscribed to.
    pub(super) sub: AtomicU32,
    pub(super) ssub: AtomicU32,
    /// The address of its last command's table entry (0: none yet).
    last_cmd: AtomicUsize,
    /// Names it gave itself (changed rarely).
    names: Mutex<Names>,
    /// Its worker's mail queue.
    mailbox: Mailbox,
    /// An invalidation for it didn't fit in its worker's queue: it must be told to drop
    /// everything.
    pub(super) lost: AtomicBool,
    /// CLIENT NO-EVICT ON (`e`).
    pub(super) no_evict: AtomicBool,
    /// The dedicated connection of its last blocking command (CLIENT UNBLOCK).
    pub(super) blocked_on: Mutex<Option<BlockedOn>>,
}

/// Where a client's blocking command runs: its dedicated connection's node and id there.
#[derive(Clone)]
pub(super) struct BlockedOn {
    /// The node.
    pub(super) addr: String,
    /// How to reach it.
    pub(super) settings: crate::upstream::ConnSettings,
    /// The connection's CLIENT ID on the node.
    pub(super) upstream_id: i64,
}

impl ClientEntry {
    /// Registers a new client; [`ClientEntry::unregister`] removes it.
    pub(super) fn register(
        id: u64,
        service: Arc<str>,
        stream: &tokio::net::TcpStream,
        mailbox: Mailbox,
    ) -> Arc<ClientEntry> {
        use std::os::fd::AsRawFd;
        let entry = Arc::new(ClientEntry {
            id,
            service,
            addr: stream.peer_addr().ok(),
            laddr: stream.local_addr().ok(),
            fd: stream.as_raw_fd(),
            created: Instant::now(),
            last_active: AtomicU64::new(0),
            db: AtomicU32::new(0),
            resp: AtomicU8::new(2),
            flags: AtomicU8::new(0),
            sub: AtomicU32::new(0),
            ssub: AtomicU32::new(0),
            last_cmd: AtomicUsize::new(0),
            names: Mutex::new(Names::default()),
            mailbox,
            lost: AtomicBool::new(false),
            no_evict: AtomicBool::new(false),
            blocked_on: Mutex::new(None),
        });
        CLIENTS.locked().insert(id, Arc::clone(&entry));
        entry
    }

    /// Whether it speaks RESP3, and whether it is subscribed.
    pub(super) fn protocol(&self) -> (bool, bool) {
        (
            self.resp.load(Ordering::Relaxed) == 3,
            self.flags.load(Ordering::Relaxed) & flag::PUBSUB != 0,
        )
    }

    /// Queues `push` for this client on another worker. If the queue is full, the client is
    /// marked so that it is told to drop everything instead.
    pub(super) fn post(&self, push: Bytes) {
        if self.mailbox.tx.try_send(Mail::Push(self.id, push)).is_err() {
            self.lost.store(true, Ordering::Release);
            self.mailbox.lost.store(true, Ordering::Release);
            // Wakes the worker if it emptied the queue meanwhile; if the queue is still
            // full, the worker is busy with it and sees the mark after.
            let _ = self.mailbox.tx.try_send(Mail::Lost);
        }
    }

    /// A MONITOR line for this client on another worker; a monitor that can't keep up is
    /// closed, as Redis closes a monitor past its output limit.
    pub(super) fn post_or_close(&self, line: Bytes) {
        if self.mailbox.tx.try_send(Mail::Push(self.id, line)).is_err() {
            let _ = self.mailbox.tx.try_send(Mail::Kill(self.id));
        }
    }

    /// Whether `other` is a client of the same service.
    pub(super) fn same_service(&self, other: &ClientEntry) -> bool {
        self.service == other.service
    }

    /// Its address as CLIENT LIST and MONITOR show it.
    pub(super) fn addr_text(&self) -> String {
        self.addr.map(|a| a.to_string()).unwrap_or_default()
    }

    /// Removes the client (it left).
    pub(super) fn unregister(&self) {
        CLIENTS.locked().remove(&self.id);
    }

    /// Notes a command the client sent, read at `at` (the batch's clock reading: no clock
    /// read per command).
    pub(super) fn ran(&self, cmd: Option<Command>, at: Instant) {
        let info = cmd.map_or(0, |c| std::ptr::from_ref::<CommandInfo>(c.info) as usize);
        self.last_cmd.store(info, Ordering::Relaxed);
        let ms = u64::try_from(at.saturating_duration_since(self.created).as_millis())
            .unwrap_or(u64::MAX);
        self.last_active.store(ms, Ordering::Relaxed);
    }

    /// CLIENT SETNAME (`None`: cleared).
    pub(super) fn set_name(&self, name: Option<Bytes>) {
        self.names.locked().name = name;
    }

    /// CLIENT SETINFO `LIB-NAME` or `LIB-VER`.
    pub(super) fn set_lib(&self, attr: &[u8], value: &[u8]) -> Result<(), Bytes> {
        if value.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
            return Err(error_reply(&format!(
                "{} cannot contain spaces, newlines or special characters.",
                String::from_utf8_lossy(attr).to_lowercase()
            )));
        }
        let value = (!value.is_empty()).then(|| Bytes::copy_from_slice(value));
        let mut names = self.names.locked();
        if attr.eq_ignore_ascii_case(b"lib-name") {
            names.lib_name = value;
        } else if attr.eq_ignore_ascii_case(b"lib-ver") {
            names.lib_ver = value;
        } else {
            return Err(error_reply(&format!(
                "Unrecognized option '{}'",
                String::from_utf8_lossy(attr)
            )));
        }
        Ok(())
    }

    /// The client's CLIENT LIST line (with its newline): every field of Redis 7.0 to 7.4's
    /// and Valkey 8's lines, in their order (a client reads the ones its server has).
    pub(super) fn line(&self) -> String {
        let names = self.names.locked();
        let text = |b: &Option<Bytes>| {
            b.as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let addr = |a: &Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
        let flags = self.flags.load(Ordering::Relaxed);
        let mut f = String::new();
        for (bit, c) in [
            (flag::MULTI, 'x'),
            (flag::PUBSUB, 'P'),
            (flag::BLOCKED, 'b'),
            (flag::TRACKING, 't'),
            (flag::BROKEN_REDIRECT, 'R'),
            (flag::BCAST, 'B'),
        ] {
            if flags & bit != 0 {
                f.push(c);
            }
        }
        if self.no_evict.load(Ordering::Relaxed) {
            f.push('e');
        }
        if f.is_empty() {
            f.push('N');
        }
        let age = self.created.elapsed().as_secs();
        let idle = age.saturating_sub(self.last_active.load(Ordering::Relaxed) / 1000);
        format!(
            "id={} addr={} laddr={} fd={} name={} age={age} idle={idle} flags={f} capa= db={} sub={} psub=0 ssub={} multi={} watch=0 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd={} user=default redir=-1 resp={} lib-name={} lib-ver={} tot-net-in=0 tot-net-out=0 tot-cmds=0\n",
            self.id,
            addr(&self.addr),
            addr(&self.laddr),
            self.fd,
            text(&names.name),
            self.db.load(Ordering::Relaxed),
            self.sub.load(Ordering::Relaxed),
            self.ssub.load(Ordering::Relaxed),
            if flags & flag::MULTI != 0 { 0 } else { -1 },
            last_command(self.last_cmd.load(Ordering::Relaxed)),
            self.resp.load(Ordering::Relaxed),
            text(&names.lib_name),
            text(&names.lib_ver),
        )
    }

    /// Whether it is subscribed (CLIENT LIST/KILL `TYPE pubsub`).
    fn is_pubsub(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & flag::PUBSUB != 0
    }
}

/// The name of the command whose table entry is at `at`, as CLIENT LIST shows it.
fn last_command(at: usize) -> &'static str {
    if at == 0 {
        return "NULL";
    }
    crate::command::all()
        .find(|c| std::ptr::from_ref::<CommandInfo>(c.info) as usize == at)
        .map_or("NULL", |c| c.info.name)
}

/// The connected client `id`, on any worker.
pub(super) fn find(id: u64) -> Option<Arc<ClientEntry>> {
    CLIENTS.locked().get(&id).cloned()
}

/// CLIENT LIST for a client of `service`: its service's clients, `args` filtering them
/// (`TYPE normal|pubsub|master|replica`, `ID id …`), as Redis does.
pub(super) fn list(service: &str, args: &[&[u8]]) -> Result<String, Bytes> {
    let mut ids: Option<Vec<u64>> = None;
    let mut pubsub: Option<bool> = None;
    let mut i = 0;
    while i < args.len() {
        let opt = args[i];
        if opt.eq_ignore_ascii_case(b"type") && i + 1 < args.len() {
            pubsub = Some(match args[i + 1].to_ascii_lowercase().as_slice() {
                b"normal" => false,
                b"pubsub" => true,
                // The proxy's clients are never replicas or masters.
                b"master" | b"replica" | b"slave" => return Ok(String::new()),
                other => {
                    return Err(error_reply(&format!(
                        "Unknown client type '{}'",
                        String::from_utf8_lossy(other)
                    )));
                }
            });
            i += 2;
        } else if opt.eq_ignore_ascii_case(b"id") && i + 1 < args.len() {
            let mut list = Vec::new();
            for a in &args[i + 1..] {
                match std::str::from_utf8(a)
                    .ok()
                    .and_then(|a| a.parse::<u64>().ok())
                {
                    Some(id) if id > 0 => list.push(id),
                    _ => return Err(error_reply("Invalid client ID")),
                }
            }
            ids = Some(list);
            i = args.len();
        } else {
            return Err(error_reply("syntax error"));
        }
    }
    let clients = CLIENTS.locked();
    let mut entries: Vec<&Arc<ClientEntry>> = clients
        .values()
        .filter(|e| *e.service == *service)
        .filter(|e| ids.as_ref().is_none_or(|ids| ids.contains(&e.id)))
        .filter(|e| pubsub.is_none_or(|p| e.is_pubsub() == p))
        .collect();
    entries.sort_by_key(|e| e.id);
    Ok(entries.iter().map(|e| e.line()).collect())
}

/// CLIENT KILL for client `me` of `service`: the old form (`addr`, an error when no client
/// has it) or filters (`ID`, `ADDR`, `LADDR`, `TYPE`, `USER`, `SKIPME`, `MAXAGE`; the number
/// killed). Only the service's own clients, never the proxy's upstream connections.
pub(super) fn kill(service: &str, me: u64, args: &[&[u8]]) -> Result<Bytes, Bytes> {
    type Filter = Box<dyn Fn(&ClientEntry) -> bool>;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let old_form = args.len() == 1;
    let mut filters: Vec<Filter> = Vec::new();
    let mut skip_me = true;
    if old_form {
        let addr = text(args[0]);
        filters.push(Box::new(move |e| {
            e.addr.is_some_and(|a| a.to_string() == addr)
        }));
        skip_me = false;
    } else {
        if !args.len().is_multiple_of(2) || args.is_empty() {
            return Err(error_reply("syntax error"));
        }
        for pair in args.chunks(2) {
            let (opt, value) = (pair[0].to_ascii_lowercase(), text(pair[1]));
            match opt.as_slice() {
                b"id" => {
                    let Ok(id) = value.parse::<u64>() else {
                        return Err(error_reply("client-id should be greater than 0"));
                    };
                    filters.push(Box::new(move |e| e.id == id));
                }
                b"addr" => filters.push(Box::new(move |e| {
                    e.addr.is_some_and(|a| a.to_string() == value)
                })),
                b"laddr" => filters.push(Box::new(move |e| {
                    e.laddr.is_some_and(|a| a.to_string() == value)
                })),
                b"type" => match value.to_ascii_lowercase().as_str() {
                    "normal" => filters.push(Box::new(|e| !e.is_pubsub())),
                    "pubsub" => filters.push(Box::new(ClientEntry::is_pubsub)),
                    "master" | "replica" | "slave" => filters.push(Box::new(|_| false)),
                    _ => {
                        return Err(error_reply(&format!("Unknown client type '{value}'")));
                    }
                },
                b"user" => filters.push(Box::new(move |_| value == "default")),
                b"skipme" => match value.to_ascii_lowercase().as_str() {
                    "yes" => skip_me = true,
                    "no" => skip_me = false,
                    _ => return Err(error_reply("syntax error")),
                },
                b"maxage" => {
                    let Ok(secs) = value.parse::<u64>() else {
                        return Err(error_reply("syntax error"));
                    };
                    filters.push(Box::new(move |e| e.created.elapsed().as_secs() >= secs));
                }
                _ => return Err(error_reply("syntax error")),
            }
        }
    }
    let mut killed = 0;
    for e in CLIENTS.locked().values() {
        if *e.service != *service || (skip_me && e.id == me) || !filters.iter().all(|f| f(e)) {
            continue;
        }
        if e.mailbox.tx.try_send(Mail::Kill(e.id)).is_ok() {
            killed += 1;
        }
    }
    if old_form {
        return if killed > 0 {
            Ok(Bytes::from_static(b"+OK\r\n"))
        } else {
            Err(error_reply("No such client"))
        };
    }
    Ok(crate::resp::Frame::Integer(killed).to_bytes())
}
