//! Server side of the tunnel: accepts peer nodes' connections on the tunnel listener, requires
//! a client certificate of the trust domain (its SPIFFE ID is the caller), serves HTTP/2 and
//! answers each `CONNECT` stream after this node's own checks: the target must be an endpoint
//! of an agent registered on this node, and the policy must let the caller reach that agent.
//! Anything else is refused (403, logged); a target that does not answer is a 502 (504 on
//! timeout); a method other than CONNECT is a 405.
//!
//! A connection lives no longer than the caller's certificate: one drain timeout before it
//! expires the server sends GOAWAY (no new streams; the caller's pool has normally retired the
//! connection long before, at its renewal), and at expiry it closes what is left.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError, atomic::Ordering},
    time::SystemTime,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{debug, info, warn};

use super::{GaugeGuard, TunnelSettings, TunnelStats, dial_uncaptured};
use crate::{
    identity::{SpiffeId, TlsCredentials, ca::validity, spiffe_id_of_certificate},
    policy::{PolicyStore, RequestAttributes},
};

const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Buffer per direction for the copy between a stream and its local target.
const COPY_BUFFER: usize = 64 * 1024;

/// The tunnel listener's server.
pub struct TunnelServer {
    credentials: Arc<dyn TlsCredentials>,
    policy: Arc<PolicyStore>,
    node: String,
    settings: TunnelSettings,
    stats: Arc<TunnelStats>,
    /// Streams being carried, so a stopping server can wait for them.
    streams: Mutex<JoinSet<()>>,
}

impl std::fmt::Debug for TunnelServer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TunnelServer")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl TunnelServer {
    /// A server for node `node` (its `metadata.name`: endpoints registered with this node
    /// name are the only targets it delivers to).
    pub fn new(
        credentials: Arc<dyn TlsCredentials>,
        policy: Arc<PolicyStore>,
        node: &str,
        settings: TunnelSettings,
        stats: Arc<TunnelStats>,
    ) -> Self {
        Self {
            credentials,
            policy,
            node: node.to_owned(),
            settings,
            stats,
            streams: Mutex::new(JoinSet::new()),
        }
    }

    /// Accepts until `shutdown` turns true, then lets open streams finish (GOAWAY on every
    /// connection) for up to the drain timeout.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let local = listener.local_addr().ok();
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, remote)) => {
                        let server = Arc::clone(&self);
                        let stop = shutdown.clone();
                        connections.spawn(async move { server.connection(stream, remote, stop).await });
                    }
                    Err(error) => {
                        warn!(listener = ?local, %error, "tunnel accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        drop(listener);
        let mut streams =
            std::mem::take(&mut *self.streams.lock().unwrap_or_else(PoisonError::into_inner));
        if !connections.is_empty() || !streams.is_empty() {
            info!(listener = ?local, connections = connections.len(), streams = streams.len(), "draining tunnel");
        }
        let drained = tokio::time::timeout(self.settings.drain_timeout, async {
            while connections.join_next().await.is_some() {}
            while streams.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(listener = ?local, "tunnel drain timeout; closing what is left");
            connections.abort_all();
            streams.abort_all();
        }
    }

    /// One peer connection: TLS, the caller's identity, then HTTP/2 until it ends or the
    /// server stops.
    async fn connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let _ = tcp.set_nodelay(true);
        let config = match self.credentials.server_config() {
            Ok(config) => config,
            Err(error) => {
                self.stats
                    .server_handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                warn!(%remote, %error, "no server credentials for the tunnel; refusing the connection");
                return;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let tls = match tokio::time::timeout(self.settings.handshake_timeout, acceptor.accept(tcp))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                self.stats
                    .server_handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                info!(%remote, %error, "tunnel TLS handshake failed");
                return;
            }
            Err(_) => {
                self.stats
                    .server_handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                info!(%remote, timeout = ?self.settings.handshake_timeout, "tunnel TLS handshake timed out");
                return;
            }
        };
        let (caller, caller_not_after, serial) = match self.caller_of(&tls) {
            Ok(caller) => caller,
            Err(reason) => {
                self.stats
                    .server_handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                warn!(%remote, %reason, "tunnel peer refused");
                return;
            }
        };
        self.stats
            .server_connections
            .fetch_add(1, Ordering::Relaxed);
        let stats = Arc::clone(&self.stats);
        let _active = GaugeGuard::up(&stats.server_connections_active);
        debug!(%remote, %caller, %serial, "tunnel connection accepted");
        let server = Arc::clone(&self);
        let service_caller = Arc::new(caller.clone());
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let server = Arc::clone(&server);
            let caller = Arc::clone(&service_caller);
            async move { Ok::<_, Infallible>(server.stream(&caller, remote, request).await) }
        });
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.settings.max_streams)
            .keep_alive_interval(Some(self.settings.keepalive_interval))
            .keep_alive_timeout(self.settings.keepalive_timeout)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(16 * 1024)
            .serve_connection(TokioIo::new(tls), service);
        tokio::pin!(connection);
        let stopping = async move {
            // The guard `wait_for` returns is not `Send`: drop it here.
            let _ = shutdown.wait_for(|stop| *stop).await.is_ok();
        };
        // The caller's certificate bounds the connection: GOAWAY one drain timeout before it
        // expires, closed at expiry.
        let deadline = |at: SystemTime| {
            tokio::time::Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default()
        };
        let expiry = deadline(caller_not_after);
        let goaway = deadline(
            caller_not_after
                .checked_sub(self.settings.drain_timeout)
                .unwrap_or(caller_not_after),
        );
        let finished = tokio::select! {
            result = connection.as_mut() => Ok(result),
            () = stopping => Err(false),
            () = tokio::time::sleep_until(goaway) => Err(true),
        };
        let result = match finished {
            Ok(result) => result,
            Err(false) => {
                // GOAWAY: open streams finish, no new ones start.
                connection.as_mut().graceful_shutdown();
                connection.await
            }
            Err(true) => {
                self.stats
                    .server_connections_expired
                    .fetch_add(1, Ordering::Relaxed);
                info!(%remote, %caller, not_after = %humantime::format_rfc3339_seconds(caller_not_after), "the caller's certificate expires: closing its tunnel connection (GOAWAY; open streams end at expiry)");
                connection.as_mut().graceful_shutdown();
                match tokio::time::timeout_at(expiry, connection.as_mut()).await {
                    Ok(result) => result,
                    Err(_) => {
                        warn!(%remote, %caller, "the caller's certificate expired: tunnel connection closed with streams open");
                        return;
                    }
                }
            }
        };
        match result {
            Ok(()) => debug!(%remote, %caller, "tunnel connection closed"),
            Err(error) => debug!(%remote, %caller, %error, "tunnel connection ended with an error"),
        }
    }

    /// The caller's SPIFFE ID, from its verified certificate (it must be of our trust domain),
    /// when that certificate expires, and its serial number (hex, for logs).
    fn caller_of(
        &self,
        tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    ) -> Result<(SpiffeId, SystemTime, String), String> {
        let certificate = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certificates| certificates.first())
            .ok_or("no client certificate")?;
        let caller = spiffe_id_of_certificate(certificate).map_err(|error| error.to_string())?;
        let trust_domain = self.credentials.trust_domain();
        if caller.trust_domain() != trust_domain {
            return Err(format!(
                "identity {caller} is outside the trust domain {trust_domain}"
            ));
        }
        let (_, not_after) = validity(certificate).map_err(|error| error.to_string())?;
        let serial = {
            use x509_parser::prelude::FromDer;
            x509_parser::certificate::X509Certificate::from_der(certificate.as_ref())
                .map(|(_, parsed)| parsed.tbs_certificate.raw_serial_as_string())
                .unwrap_or_default()
        };
        Ok((caller, not_after, serial))
    }

    /// One stream: checks, dial, then the byte copy in a task of its own.
    async fn stream(
        &self,
        caller: &SpiffeId,
        remote: SocketAddr,
        request: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        self.stats.server_streams.fetch_add(1, Ordering::Relaxed);
        if request.method() != Method::CONNECT {
            self.stats
                .server_bad_requests
                .fetch_add(1, Ordering::Relaxed);
            debug!(%remote, %caller, method = %request.method(), "tunnel request is not CONNECT");
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "the tunnel only serves CONNECT",
            );
        }
        let Some(target) = request
            .uri()
            .authority()
            .and_then(|authority| authority.as_str().parse::<SocketAddr>().ok())
        else {
            self.stats
                .server_bad_requests
                .fetch_add(1, Ordering::Relaxed);
            return reply(
                StatusCode::BAD_REQUEST,
                "CONNECT authority must be an ip:port",
            );
        };
        let agent = match self.authorize(caller, target) {
            Ok(agent) => agent,
            Err(reason) => {
                self.stats.server_denied.fetch_add(1, Ordering::Relaxed);
                warn!(%remote, source = %caller, %target, %reason, "tunnel stream denied");
                return reply(StatusCode::FORBIDDEN, &reason);
            }
        };
        let upstream = match dial_uncaptured(target, self.settings.connect_timeout).await {
            Ok(upstream) => upstream,
            Err(error) => {
                self.stats
                    .server_target_failures
                    .fetch_add(1, Ordering::Relaxed);
                warn!(%remote, source = %caller, %target, %agent, %error, "tunnel target unreachable");
                let status = if error.kind() == std::io::ErrorKind::TimedOut {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::BAD_GATEWAY
                };
                return reply(status, &format!("{target}: {error}"));
            }
        };
        debug!(%remote, source = %caller, %target, %agent, "tunnel stream accepted");
        let stats = Arc::clone(&self.stats);
        let source = caller.clone();
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        while streams.try_join_next().is_some() {}
        streams.spawn(async move {
            let _active = GaugeGuard::up(&stats.server_streams_active);
            let upgraded = match hyper::upgrade::on(request).await {
                Ok(upgraded) => upgraded,
                Err(error) => {
                    debug!(%source, %target, %error, "tunnel stream ended before it opened");
                    return;
                }
            };
            let mut tunnel = TokioIo::new(upgraded);
            let mut upstream = upstream;
            match tokio::io::copy_bidirectional_with_sizes(
                &mut tunnel,
                &mut upstream,
                COPY_BUFFER,
                COPY_BUFFER,
            )
            .await
            {
                Ok((sent, received)) => {
                    stats
                        .server_bytes_to_target
                        .fetch_add(sent, Ordering::Relaxed);
                    stats
                        .server_bytes_from_target
                        .fetch_add(received, Ordering::Relaxed);
                    debug!(%source, %target, sent, received, "tunnel stream closed");
                }
                Err(error) => debug!(%source, %target, %error, "tunnel stream ended with an error"),
            }
        });
        reply(StatusCode::OK, "")
    }

    /// The agent `target` belongs to when it is an endpoint registered on this node and the
    /// policy lets `caller` reach it; else why not.
    fn authorize(&self, caller: &SpiffeId, target: SocketAddr) -> Result<String, String> {
        let snapshot = self.policy.current();
        let node = self.node.as_str();
        let Some(agent) = snapshot.agents().find(|agent| {
            agent.endpoints.iter().any(|endpoint| {
                endpoint.address == target && endpoint.node.as_deref() == Some(node)
            })
        }) else {
            return Err(format!(
                "{target} is not an endpoint of an agent registered on node {node}"
            ));
        };
        // Requests inside the stream were judged at L7 by the calling node; this node decides
        // whether the caller may reach the agent at all.
        let request = RequestAttributes {
            source: caller.short_name(),
            destination: Some(&agent.name),
            ..RequestAttributes::default()
        };
        let decision = snapshot.check_reach(&request).decision(&request);
        if !decision.allowed {
            return Err(format!(
                "denied by policy {}: {}",
                decision.policy.as_deref().unwrap_or("(default)"),
                decision.reason
            ));
        }
        Ok(agent.name.clone())
    }
}

fn reply(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::copy_from_slice(message.as_bytes())));
    *response.status_mut() = status;
    response
}
