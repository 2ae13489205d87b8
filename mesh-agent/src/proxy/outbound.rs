//! The outbound capture listener: accepts connections the kernel redirected from enrolled
//! workloads, finds out (from the kernel, not the client) who is calling and where it meant to
//! go, dials that destination and carries bytes both ways with half-close respected.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tracing::{debug, info, warn};

use super::{
    sniff::{Protocol, Sniffer, SniffingStream},
    splice::forward_one_way,
};
use crate::datapath::{CapturedConnection, Datapath};

/// Buffer size per direction for the byte copy.
const COPY_BUFFER: usize = 64 * 1024;

/// Counters of the outbound proxy (process-local; the kernel keeps the per-workload ones).
#[derive(Debug, Default)]
pub struct ProxyStats {
    accepted: AtomicU64,
    active: AtomicU64,
    uncaptured: AtomicU64,
    upstream_failures: AtomicU64,
    bytes_to_upstream: AtomicU64,
    bytes_to_workload: AtomicU64,
    /// Part of the bytes carried that moved by splice(2) without a copy through the agent.
    bytes_spliced: AtomicU64,
    /// Finished connections by detected protocol, in [`PROTOCOL_LABELS`] order.
    by_protocol: [AtomicU64; PROTOCOL_LABELS.len()],
}

/// Protocol labels of [`ProxyStats`]; "undetected" is a connection that closed before the
/// client sent enough to tell.
pub const PROTOCOL_LABELS: [&str; 5] = ["tls", "http2", "http1", "opaque", "undetected"];

/// A point-in-time copy of [`ProxyStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProxyStatsSnapshot {
    pub accepted: u64,
    pub active: u64,
    pub uncaptured: u64,
    pub upstream_failures: u64,
    pub bytes_to_upstream: u64,
    pub bytes_to_workload: u64,
    pub bytes_spliced: u64,
    /// Finished connections by detected protocol, in [`PROTOCOL_LABELS`] order.
    pub by_protocol: [u64; PROTOCOL_LABELS.len()],
}

impl ProxyStats {
    pub fn snapshot(&self) -> ProxyStatsSnapshot {
        ProxyStatsSnapshot {
            accepted: self.accepted.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            uncaptured: self.uncaptured.load(Ordering::Relaxed),
            upstream_failures: self.upstream_failures.load(Ordering::Relaxed),
            bytes_to_upstream: self.bytes_to_upstream.load(Ordering::Relaxed),
            bytes_to_workload: self.bytes_to_workload.load(Ordering::Relaxed),
            bytes_spliced: self.bytes_spliced.load(Ordering::Relaxed),
            by_protocol: std::array::from_fn(|index| {
                self.by_protocol[index].load(Ordering::Relaxed)
            }),
        }
    }
}

/// Decrements the active-connection gauge however a connection task ends.
struct ActiveGuard<'a>(&'a AtomicU64);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The outbound proxy shared by its listeners.
#[derive(Debug)]
pub struct OutboundProxy {
    datapath: Arc<Datapath>,
    connect_timeout: Duration,
    /// Workload names by cgroup id, for logs.
    names: RwLock<HashMap<u64, String>>,
    /// The agent's own listeners: a captured connection must never be sent back to them.
    own_listeners: Vec<SocketAddr>,
    /// Forward with splice(2) (no copy through user space); off when sk_msg acceleration
    /// is on, because accelerated sockets queue their bytes where splice cannot read them.
    splice: bool,
    stats: ProxyStats,
}

impl OutboundProxy {
    pub fn new(
        datapath: Arc<Datapath>,
        connect_timeout: Duration,
        own_listeners: Vec<SocketAddr>,
        splice: bool,
    ) -> Self {
        Self {
            datapath,
            connect_timeout,
            names: RwLock::new(HashMap::new()),
            own_listeners,
            splice,
            stats: ProxyStats::default(),
        }
    }

    /// Records a workload's name for logs.
    pub fn name_workload(&self, cgroup_id: u64, name: &str) {
        if let Ok(mut names) = self.names.write() {
            names.insert(cgroup_id, name.to_owned());
        }
    }

    /// A workload's name for logs and metrics (`cgroup:<id>` when it was enrolled by hand).
    pub fn workload_name(&self, cgroup_id: u64) -> String {
        self.names
            .read()
            .ok()
            .and_then(|names| names.get(&cgroup_id).cloned())
            .unwrap_or_else(|| format!("cgroup:{cgroup_id}"))
    }

    pub fn stats(&self) -> ProxyStatsSnapshot {
        self.stats.snapshot()
    }

    /// Accepts until `shutdown` turns true, then waits up to `drain` for open connections.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
        drain: Duration,
    ) {
        let local = listener.local_addr().ok();
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let proxy = Arc::clone(&self);
                        connections.spawn(async move { proxy.handle(stream, peer).await });
                    }
                    Err(error) => {
                        // EMFILE and friends: keep serving, but do not spin.
                        warn!(listener = ?local, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        drop(listener);
        let open = connections.len();
        if open > 0 {
            info!(listener = ?local, open, "draining open connections");
            let drained = tokio::time::timeout(drain, async {
                while connections.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                warn!(listener = ?local, remaining = connections.len(), "drain timeout; closing connections");
                connections.abort_all();
            }
        }
    }

    /// Serves one accepted connection.
    pub async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        let _active = ActiveGuard(&self.stats.active);
        let _ = client.set_nodelay(true);
        let captured = match self.datapath.lookup(peer) {
            Ok(Some(captured)) => captured,
            Ok(None) => {
                self.stats.uncaptured.fetch_add(1, Ordering::Relaxed);
                warn!(%peer, "connection was not redirected by the kernel (no original destination); closing it");
                return;
            }
            Err(error) => {
                self.stats.uncaptured.fetch_add(1, Ordering::Relaxed);
                warn!(%peer, %error, "original-destination lookup failed; closing the connection");
                return;
            }
        };
        let workload = self.workload_name(captured.workload_cgroup);
        if self.own_listeners.contains(&captured.original_dst) {
            warn!(%peer, %workload, dst = %captured.original_dst, "refusing a connection to the agent's own listener (would loop)");
            reset(&client);
            return;
        }
        let upstream = match self.dial(&captured).await {
            Ok(upstream) => upstream,
            Err(error) => {
                self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
                warn!(
                    %peer, %workload, dst = %captured.original_dst, %error,
                    "original destination unreachable; resetting the workload's connection"
                );
                reset(&client);
                return;
            }
        };
        debug!(%peer, %workload, dst = %captured.original_dst, "forwarding captured connection");
        let mut client = client;
        let (copied, protocol) = self.forward(&mut client, upstream).await;
        let label = protocol.as_ref().map_or("undetected", Protocol::label);
        if let Some(index) = PROTOCOL_LABELS.iter().position(|known| *known == label) {
            self.stats.by_protocol[index].fetch_add(1, Ordering::Relaxed);
        }
        match copied {
            Ok((to_upstream, to_workload)) => {
                self.stats
                    .bytes_to_upstream
                    .fetch_add(to_upstream, Ordering::Relaxed);
                self.stats
                    .bytes_to_workload
                    .fetch_add(to_workload, Ordering::Relaxed);
                debug!(
                    %peer, %workload, dst = %captured.original_dst, protocol = ?protocol,
                    to_upstream, to_workload, "connection closed"
                );
            }
            Err(error) => {
                debug!(
                    %peer, %workload, dst = %captured.original_dst, protocol = ?protocol, %error,
                    "connection ended with an error"
                );
                reset(&client);
            }
        }
    }

    /// Carries bytes both ways until both sides have finished; returns the byte counts (to
    /// upstream, to the workload) and the protocol the client spoke.
    async fn forward(
        &self,
        client: &mut TcpStream,
        upstream: TcpStream,
    ) -> (std::io::Result<(u64, u64)>, Option<Protocol>) {
        if self.splice {
            let mut sniffer = Sniffer::default();
            let moved = tokio::try_join!(
                forward_one_way(&*client, &upstream, Some(&mut sniffer)),
                forward_one_way(&upstream, &*client, None),
            );
            let copied = moved.map(|(to_upstream, to_workload)| {
                self.stats
                    .bytes_spliced
                    .fetch_add(to_upstream.spliced + to_workload.spliced, Ordering::Relaxed);
                (to_upstream.total, to_workload.total)
            });
            return (copied, sniffer.protocol().cloned());
        }
        let mut client = SniffingStream::new(client);
        let mut upstream = upstream;
        let copied = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut upstream,
            COPY_BUFFER,
            COPY_BUFFER,
        )
        .await;
        (copied, client.protocol().cloned())
    }

    /// Connects to the original destination from a socket the kernel programs never capture.
    async fn dial(&self, captured: &CapturedConnection) -> std::io::Result<TcpStream> {
        let destination = captured.original_dst;
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(destination),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_nonblocking(true)?;
        // The mark identifies the agent's own sockets (e.g. for host firewall rules); capture
        // already skips the agent by its process id.
        if let Err(error) = socket.set_mark(mesh_common::AGENT_SOCKET_MARK) {
            debug!(%error, "cannot set SO_MARK on upstream socket");
        }
        socket.set_tcp_nodelay(true)?;
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
        let stream = tokio::time::timeout(self.connect_timeout, socket.connect(destination))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        Ok(stream)
    }
}

/// Closes a connection with RST so the workload sees a failure, not a clean end of stream.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
