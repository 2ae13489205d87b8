//! The node-to-node tunnel (port 15008): how a connection for an endpoint on another node gets
//! there.
//!
//! The client side ([`TunnelClient`]) keeps one HTTP/2 connection with mutual TLS per
//! (source workload identity, peer node address) and opens one `CONNECT` stream per proxied
//! connection, `:authority` = the original destination `ip:port`. It presents the *source
//! workload's* certificate, so the peer node sees who is calling, and accepts only the peer
//! node's own identity. The server side ([`TunnelServer`]) presents this node's certificate,
//! requires a client certificate of the trust domain, reads the caller's SPIFFE ID from it,
//! and enforces this node's own policy snapshot per stream before delivering to a local
//! workload: the target must be an endpoint of an agent registered on this node (never an open
//! relay), and the policy must allow the caller to reach that agent.
//!
//! Where a peer node's tunnel address comes from ([`PeerDirectory`]): static entries
//! (`spec.tunnel.peers`) and, in etcd mode, the node records other agents publish.

mod client;
mod peers;
mod server;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

pub use client::{Freshness, Peer, TunnelClient, TunnelStream};
pub use peers::{LookupFuture, PeerDirectory, PeerLookup};
pub use server::TunnelServer;

use crate::{
    identity::IdentityError,
    telemetry::metrics::{write_counters, write_gauges},
};

/// ALPN protocol of the tunnel.
pub const ALPN_H2: &[u8] = b"h2";

/// How tunnel connections are made and kept.
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    /// Time allowed for the TCP connect to a peer (client) or to a local target (server).
    pub connect_timeout: Duration,
    /// Time allowed for the TLS handshake (both sides).
    pub handshake_timeout: Duration,
    /// HTTP/2 PING interval on idle and busy connections; a peer that does not answer within
    /// `keepalive_timeout` is dropped (and the next stream reconnects).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Concurrent streams the server accepts per connection.
    pub max_streams: u32,
    /// How long a stopping server waits for open streams.
    pub drain_timeout: Duration,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            max_streams: 1024,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a tunnelled connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("no tunnel credentials are configured: cross-node traffic is refused (fail closed)")]
    NoCredentials,
    #[error("credentials for {identity}: {source}")]
    Credentials {
        identity: String,
        source: IdentityError,
    },
    #[error("node {0} has no known tunnel address (spec.tunnel.peers, or its node record)")]
    UnknownNode(String),
    #[error("{0:?} is not a valid workload identity: {1}")]
    Identity(String, String),
    #[error("cannot connect to the tunnel of node {node} at {address}: {reason}")]
    Connect {
        node: String,
        address: SocketAddr,
        reason: String,
    },
    #[error("TLS with node {node} at {address} failed: {reason}")]
    Tls {
        node: String,
        address: SocketAddr,
        reason: String,
    },
    #[error("node {node} at {address} presented identity {presented}, expected {expected}")]
    PeerIdentity {
        node: String,
        address: SocketAddr,
        presented: String,
        expected: String,
    },
    #[error("the tunnel to node {node} failed: {reason}")]
    Protocol { node: String, reason: String },
    #[error("node {node} refused the connection to {target}: {reason}")]
    Denied {
        node: String,
        target: SocketAddr,
        reason: String,
    },
    #[error("node {node} could not reach {target}: {reason}")]
    TargetUnreachable {
        node: String,
        target: SocketAddr,
        reason: String,
    },
}

/// Counters of the tunnel, both sides (process-local).
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Client: TLS connections established to peers.
    pub(crate) client_connections: AtomicU64,
    /// Client: connection attempts that failed (TCP, TLS, identity, HTTP/2 handshake).
    pub(crate) client_connect_failures: AtomicU64,
    /// Client: pooled connections retired because the source's certificate was renewed or
    /// the peer's expired (new streams went on a new connection).
    pub(crate) client_connections_retired: AtomicU64,
    /// Client: streams opened (accepted by the peer).
    pub(crate) client_streams: AtomicU64,
    /// Client: streams the peer refused (403) or could not deliver (502/504).
    pub(crate) client_streams_refused: AtomicU64,
    pub(crate) client_streams_active: AtomicU64,
    /// Server: connections accepted and handshaken.
    pub(crate) server_connections: AtomicU64,
    /// Server: handshakes that failed or timed out, peers refused for their identity.
    pub(crate) server_handshake_failures: AtomicU64,
    /// Server: connections closed because the peer's certificate expired.
    pub(crate) server_connections_expired: AtomicU64,
    /// Server: connections open now (handshaken, not yet closed).
    pub(crate) server_connections_active: AtomicU64,
    pub(crate) server_streams: AtomicU64,
    pub(crate) server_streams_active: AtomicU64,
    /// Server: streams refused by policy or because the target is not a local endpoint.
    pub(crate) server_denied: AtomicU64,
    /// Server: streams whose local target could not be reached.
    pub(crate) server_target_failures: AtomicU64,
    /// Server: requests that were not CONNECT, or had a bad authority.
    pub(crate) server_bad_requests: AtomicU64,
    /// Payload bytes carried by server streams, to and from local targets.
    pub(crate) server_bytes_to_target: AtomicU64,
    pub(crate) server_bytes_from_target: AtomicU64,
}

/// A point-in-time copy of [`TunnelStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TunnelStatsSnapshot {
    pub client_connections: u64,
    pub client_connect_failures: u64,
    pub client_connections_retired: u64,
    pub client_streams: u64,
    pub client_streams_refused: u64,
    pub client_streams_active: u64,
    pub server_connections: u64,
    pub server_handshake_failures: u64,
    pub server_connections_expired: u64,
    pub server_connections_active: u64,
    pub server_streams: u64,
    pub server_streams_active: u64,
    pub server_denied: u64,
    pub server_target_failures: u64,
    pub server_bad_requests: u64,
    pub server_bytes_to_target: u64,
    pub server_bytes_from_target: u64,
}

impl TunnelStats {
    pub fn snapshot(&self) -> TunnelStatsSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        TunnelStatsSnapshot {
            client_connections: load(&self.client_connections),
            client_connect_failures: load(&self.client_connect_failures),
            client_connections_retired: load(&self.client_connections_retired),
            client_streams: load(&self.client_streams),
            client_streams_refused: load(&self.client_streams_refused),
            client_streams_active: load(&self.client_streams_active),
            server_connections: load(&self.server_connections),
            server_handshake_failures: load(&self.server_handshake_failures),
            server_connections_expired: load(&self.server_connections_expired),
            server_connections_active: load(&self.server_connections_active),
            server_streams: load(&self.server_streams),
            server_streams_active: load(&self.server_streams_active),
            server_denied: load(&self.server_denied),
            server_target_failures: load(&self.server_target_failures),
            server_bad_requests: load(&self.server_bad_requests),
            server_bytes_to_target: load(&self.server_bytes_to_target),
            server_bytes_from_target: load(&self.server_bytes_from_target),
        }
    }

    /// Prometheus text exposition of the `mesh_tunnel_*` metrics.
    pub fn render(&self) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let counters: [(&str, &str, u64); 14] = [
            (
                "mesh_tunnel_client_connections_total",
                "TLS connections established to peer nodes' tunnels.",
                s.client_connections,
            ),
            (
                "mesh_tunnel_client_connect_failures_total",
                "Failed attempts to connect to a peer node's tunnel (TCP, TLS, identity, HTTP/2).",
                s.client_connect_failures,
            ),
            (
                "mesh_tunnel_client_connections_retired_total",
                "Pooled connections retired (source certificate renewed, or the peer's expired); new streams went on a new connection.",
                s.client_connections_retired,
            ),
            (
                "mesh_tunnel_client_streams_total",
                "Tunnelled connections the peer node accepted.",
                s.client_streams,
            ),
            (
                "mesh_tunnel_client_streams_refused_total",
                "Tunnelled connections the peer node refused or could not deliver.",
                s.client_streams_refused,
            ),
            (
                "mesh_tunnel_server_connections_total",
                "Tunnel connections accepted from peer nodes (after the TLS handshake).",
                s.server_connections,
            ),
            (
                "mesh_tunnel_server_handshake_failures_total",
                "Tunnel connections refused: TLS handshake failed or timed out, or a foreign identity.",
                s.server_handshake_failures,
            ),
            (
                "mesh_tunnel_server_connections_expired_total",
                "Tunnel connections closed because the peer's certificate expired.",
                s.server_connections_expired,
            ),
            (
                "mesh_tunnel_server_streams_total",
                "CONNECT streams received from peer nodes.",
                s.server_streams,
            ),
            (
                "mesh_tunnel_server_denied_streams_total",
                "CONNECT streams refused (403): target not a local endpoint, or denied by policy.",
                s.server_denied,
            ),
            (
                "mesh_tunnel_server_target_failures_total",
                "CONNECT streams whose local target could not be reached (502/504).",
                s.server_target_failures,
            ),
            (
                "mesh_tunnel_server_bad_requests_total",
                "Requests on the tunnel that were not a valid CONNECT (405/400).",
                s.server_bad_requests,
            ),
            (
                "mesh_tunnel_server_sent_bytes_total",
                "Bytes delivered from peer nodes to local targets.",
                s.server_bytes_to_target,
            ),
            (
                "mesh_tunnel_server_received_bytes_total",
                "Bytes from local targets sent back to peer nodes.",
                s.server_bytes_from_target,
            ),
        ];
        write_counters(&mut out, &counters);
        let gauges: [(&str, &str, u64); 3] = [
            (
                "mesh_tunnel_server_connections_active",
                "Tunnel connections from peer nodes open now.",
                s.server_connections_active,
            ),
            (
                "mesh_tunnel_client_streams_active",
                "Tunnelled connections open to peer nodes.",
                s.client_streams_active,
            ),
            (
                "mesh_tunnel_server_streams_active",
                "CONNECT streams open from peer nodes.",
                s.server_streams_active,
            ),
        ];
        write_gauges(&mut out, &gauges);
        out
    }
}

/// Decrements a gauge however the owner ends.
#[derive(Debug)]
pub(crate) struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    pub(crate) fn up(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connects a TCP socket the kernel programs never capture (the agent's own process is
/// excluded by pid; the mark lets host firewalls tell the agent's sockets apart).
pub(crate) async fn dial_uncaptured(
    destination: SocketAddr,
    timeout: Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(destination),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    if let Err(error) = socket.set_mark(mesh_common::AGENT_SOCKET_MARK) {
        tracing::trace!(%error, "cannot set SO_MARK on a tunnel socket");
    }
    socket.set_tcp_nodelay(true)?;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    tokio::time::timeout(timeout, socket.connect(destination))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect timed out after {timeout:?}"),
            )
        })?
}
