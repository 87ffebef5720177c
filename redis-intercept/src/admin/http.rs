//! The admin endpoint's HTTP side: its thread and runtime, the listener, and which request
//! goes where (with the bearer token checked first when one is configured).

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::AdminState;
use crate::locks::RwLockRecovered;

/// A running admin server.
pub struct Admin {
    /// Address actually bound.
    pub addr: SocketAddr,
    /// The server thread.
    pub(super) thread: JoinHandle<()>,
}

impl Admin {
    /// Binds `addr` now (so a bad address fails start-up) and serves on a thread until
    /// `shutdown` turns true.
    ///
    /// # Errors
    /// The address can't be bound, or the thread can't start.
    pub fn start(
        addr: SocketAddr,
        state: Arc<AdminState>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Admin> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("admin: cannot listen on {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let thread = std::thread::Builder::new()
            .name("ri-admin".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        warn!(error = %e, "admin runtime failed to start");
                        return;
                    }
                };
                rt.block_on(serve(listener, state, shutdown));
            })
            .context("spawn admin thread")?;
        Ok(Admin { addr, thread })
    }

    /// Waits for the server thread (after the shutdown signal).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

pub(super) async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "admin listener failed");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = Arc::clone(&state);
                async move {
                    if let Some(token) = &state.token {
                        let auth = req
                            .headers()
                            .get(hyper::header::AUTHORIZATION)
                            .map(|v| v.as_bytes());
                        if !token.allows(req.uri().path(), auth) {
                            let mut resp = respond(
                                StatusCode::UNAUTHORIZED,
                                "text/plain; charset=utf-8",
                                "this endpoint needs the admin token: Authorization: Bearer <token_file's token>\n".into(),
                            );
                            resp.headers_mut().insert(
                                hyper::header::WWW_AUTHENTICATE,
                                hyper::header::HeaderValue::from_static("Bearer"),
                            );
                            return Ok::<_, Infallible>(resp);
                        }
                    }
                    if req.method() == Method::POST && req.uri().path() == "/reload" {
                        let (status, text) = state.reload().await;
                        return Ok::<_, Infallible>(respond(
                            status,
                            "text/plain; charset=utf-8",
                            text,
                        ));
                    }
                    if req.method() == Method::POST && req.uri().path() == "/cgroups" {
                        use http_body_util::BodyExt;
                        // Small bodies only: a command line.
                        let limited = http_body_util::Limited::new(req.into_body(), 64 * 1024);
                        let (status, text) = match limited.collect().await {
                            Ok(b) => state.set_cgroup(&String::from_utf8_lossy(&b.to_bytes())),
                            Err(e) => (StatusCode::BAD_REQUEST, format!("bad body: {e}\n")),
                        };
                        return Ok::<_, Infallible>(respond(
                            status,
                            "text/plain; charset=utf-8",
                            text,
                        ));
                    }
                    Ok::<_, Infallible>(handle(&req, &state))
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "admin connection failed");
            }
        });
    }
}

pub(super) fn respond(
    status: StatusCode,
    content_type: &str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

pub(super) fn handle(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET is served\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            state.copy_intercept_counters();
            respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
            )
        }
        "/ready" => match state.ready() {
            Ok(()) => respond(StatusCode::OK, TEXT, "ready\n".into()),
            Err(why) => respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("not ready:\n{why}\n")),
        },
        "/topology" => respond(StatusCode::OK, TEXT, state.topology()),
        "/cgroups" => {
            let (status, text) = state.cgroups();
            respond(status, TEXT, text)
        }
        "/config" => respond(StatusCode::OK, "application/toml; charset=utf-8", state
            .config_toml
            .read_recovered()
            .clone()),
        "/" => respond(
            StatusCode::OK,
            TEXT,
            "redis-intercept admin\n  /metrics  Prometheus metrics\n  /ready    200 when every upstream is connected\n  /config   effective configuration, secrets redacted\n  /topology each worker's slot map of each cluster upstream\n  /cgroups  interception settings (POST \"enable|disable|clear PATH\" to change one)\n".into(),
        ),
        _ => respond(StatusCode::NOT_FOUND, TEXT, "not found (see /)\n".into()),
    }
}
