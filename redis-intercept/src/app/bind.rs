//! Listening sockets: each service's listener, one per worker with `reuse_port`, else one
//! the workers share; bound the same way at start and by a reload that adds a service.

use std::net::{SocketAddr, TcpListener};

use anyhow::{Context, Result};

/// A service's bound listener: where it listens, and one socket handle per worker.
pub(super) struct ServiceSockets {
    /// The address bound (port 0 resolved).
    pub(super) addr: SocketAddr,
    /// Worker `i`'s handle: its own socket with `reuse_port`, else a handle of the shared one.
    pub(super) per_worker: Vec<TcpListener>,
}

/// Binds `svc`'s listener for `workers` workers, or says which service couldn't listen.
pub(super) fn bind_service(
    svc: &crate::config::ServiceConfig,
    workers: usize,
    reuse_port: bool,
) -> Result<ServiceSockets> {
    let bound = bind_for_workers(svc.listen, workers, reuse_port)
        .with_context(|| format!("service {:?}: cannot listen on {}", svc.name, svc.listen))?;
    let addr = bound
        .first()
        .context("no listener was bound")?
        .local_addr()?;
    let per_worker = (0..workers)
        .map(|i| {
            // Without a socket of its own, a worker gets a handle of the shared one.
            bound
                .get(i)
                .or(bound.first())
                .ok_or_else(|| std::io::Error::other("no listener was bound"))?
                .try_clone()
        })
        .collect::<std::io::Result<Vec<_>>>()
        .context("clone listener for a worker")?;
    Ok(ServiceSockets { addr, per_worker })
}

/// The listening sockets of one service: one per worker with `reuse_port` (and more than
/// one worker), otherwise one that the workers share.
///
/// `SO_REUSEPORT` would also let this proxy join another process's sockets on the same port
/// without an error, so the port is first bound once without it: that fails if anything
/// holds the port. The probe also resolves port 0.
fn bind_for_workers(
    addr: SocketAddr,
    workers: usize,
    reuse_port: bool,
) -> std::io::Result<Vec<TcpListener>> {
    if !reuse_port || workers <= 1 {
        return Ok(vec![bind(addr, false)?]);
    }
    let addr = {
        let probe = socket(addr)?;
        probe.bind(&addr.into())?;
        probe
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("listener has no IP address"))?
    };
    (0..workers).map(|_| bind(addr, true)).collect()
}

/// A non-blocking TCP socket for `addr`'s family with SO_REUSEADDR, so a restarted proxy can
/// bind at once.
pub(super) fn socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Binds a listener, with SO_REUSEPORT if `reuse_port`.
pub(super) fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = socket(addr)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}
