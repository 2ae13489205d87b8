//! The outbound capture listener: accepts connections the kernel redirected from enrolled
//! workloads, finds out (from the kernel, not the client) who is calling and where it meant to
//! go, dials that destination (directly, or through the node-to-node tunnel when the
//! destination is an endpoint registered on another node) and carries bytes both ways with
//! half-close respected.

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
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tracing::{debug, info, warn};

use super::{
    dialer::{Dialer, Upstream, node_of},
    http::{CallerContext, HttpProxy, HttpVersion},
    prefixed::PrefixedStream,
    redirect_window::{ReadReporter, ReadReporting, RedirectReader},
    sniff::{Detection, MAX_SNIFF, Protocol, detect},
    splice::{Moved, forward_one_way},
    workers::ConnectionWorkers,
};
use crate::{
    datapath::{CapturedConnection, Datapath},
    policy::{PolicyStore, RequestAttributes},
};

/// How long a silent client may wait before the original destination is dialled to see
/// whether it speaks first (server-first protocols: SMTP, MySQL, SSH banners).
const SERVER_FIRST_GRACE: Duration = Duration::from_millis(20);
/// How long a client may take to send enough bytes for the detector to decide.
const DETECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Who spoke first on a captured connection, and what.
#[derive(Debug)]
enum Opening {
    /// The original destination spoke first: opaque TCP.
    ServerFirst(Upstream),
    /// The client spoke: its first bytes (to replay), their protocol, and the upstream
    /// connection if one was dialled while the client was silent.
    Client {
        prefix: Vec<u8>,
        protocol: Protocol,
        upstream: Option<Upstream>,
    },
}

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
    /// Opaque or TLS connections refused by policy.
    denied: AtomicU64,
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
    pub denied: u64,
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
            denied: self.denied.load(Ordering::Relaxed),
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
    /// Serve HTTP/1.1 and HTTP/2 at L7 (off: every connection is carried as opaque bytes).
    l7: bool,
    policy: Arc<PolicyStore>,
    http: Arc<HttpProxy>,
    /// Direct connections, or the tunnel for endpoints on other nodes.
    dialer: Arc<Dialer>,
    /// Threads that serve the accepted connections (none: the caller's runtime does).
    workers: Option<Arc<ConnectionWorkers>>,
    stats: ProxyStats,
}

impl OutboundProxy {
    pub fn new(
        datapath: Arc<Datapath>,
        connect_timeout: Duration,
        own_listeners: Vec<SocketAddr>,
        splice: bool,
        l7: bool,
        policy: Arc<PolicyStore>,
    ) -> Self {
        let dialer = Arc::new(Dialer::direct("", connect_timeout));
        let http = Arc::new(HttpProxy::with_dialer(
            Arc::clone(&policy),
            connect_timeout,
            Arc::clone(&dialer),
        ));
        Self {
            datapath,
            connect_timeout,
            names: RwLock::new(HashMap::new()),
            own_listeners,
            splice,
            l7,
            policy,
            http,
            dialer,
            workers: None,
            stats: ProxyStats::default(),
        }
    }

    /// Serves accepted connections on `workers` (each connection on one worker thread for
    /// its whole life) instead of on the runtime that accepts them.
    pub fn with_workers(mut self, workers: Arc<ConnectionWorkers>) -> Self {
        self.workers = Some(workers);
        self
    }

    /// Reaches endpoints (opaque and L7) through `dialer` (which knows this node's name and
    /// the tunnel) instead of the direct-only default.
    pub fn with_dialer(mut self, dialer: Arc<Dialer>) -> Self {
        self.http = Arc::new(HttpProxy::with_dialer(
            Arc::clone(&self.policy),
            self.connect_timeout,
            Arc::clone(&dialer),
        ));
        self.dialer = dialer;
        self
    }

    /// The policy snapshots this proxy enforces.
    pub fn policy(&self) -> &Arc<PolicyStore> {
        &self.policy
    }

    /// The L7 path's counters.
    pub fn http_stats(&self) -> super::http::HttpStatsSnapshot {
        self.http.stats()
    }

    /// Passive health: whether this node's L7 path has ejected the endpoint at `address`.
    pub fn endpoint_ejected(&self, address: SocketAddr) -> bool {
        self.http.endpoint_ejected(address)
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
                        match &self.workers {
                            // The connection's future itself, not wrapped in a block that
                            // would keep the proxy, stream and peer beside it for its life.
                            Some(workers) => {
                                workers.dispatch(stream, peer, move |stream| {
                                    proxy.handle(stream, peer)
                                });
                            }
                            None => {
                                connections.spawn(proxy.handle(stream, peer));
                            }
                        }
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
        if let Some(workers) = &self.workers {
            workers.drain(drain).await;
        }
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
    pub async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
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
        let caller = CallerContext {
            source: Arc::from(workload.as_str()),
            original_dst: captured.original_dst,
        };
        // Boxed, like the opaque forwarding below: a connection's task is as large as its
        // largest state for its whole life, and an idle keep-alive connection should only
        // hold what serving HTTP needs.
        let opening = match Box::pin(self.read_opening(&client, &captured, &workload)).await {
            Ok(opening) => opening,
            Err(error) => {
                debug!(%peer, %workload, dst = %captured.original_dst, %error, "connection failed before it spoke");
                return;
            }
        };
        let (prefix, protocol, upstream) = match opening {
            Opening::ServerFirst(upstream) => (Vec::new(), Protocol::Opaque, Some(upstream)),
            Opening::Client {
                prefix,
                protocol,
                upstream,
            } => (prefix, protocol, upstream),
        };
        self.count_protocol(protocol.label());
        if self.l7 && matches!(protocol, Protocol::Http1 { .. } | Protocol::Http2) {
            // The L7 path makes its own upstream connections, per request.
            drop(upstream);
            let version = if protocol == Protocol::Http2 {
                HttpVersion::Http2
            } else {
                HttpVersion::Http1
            };
            debug!(%peer, %workload, dst = %captured.original_dst, ?version, "serving captured connection at L7");
            // Keep only the bytes read, not the detector's whole window, for the life of the
            // connection: the buffer itself is dropped here, or it would live in this future
            // until the connection ends.
            let prefix_bytes = bytes::Bytes::copy_from_slice(&prefix);
            drop(prefix);
            let served = if self.datapath.accelerated() {
                // The workload's requests arrive by redirect while the agent reports what it
                // read, and its reads must not stall on a short read.
                let reporter = client.local_addr().ok().map(|agent_end| {
                    ReadReporter::new(
                        Arc::clone(&self.datapath),
                        peer,
                        agent_end,
                        prefix_bytes.len() as u64,
                    )
                });
                let stream =
                    PrefixedStream::new(prefix_bytes, ReadReporting::new(client, reporter));
                // Boxed (once per connection): its stream is the larger, and inline it would
                // size every connection's task, the plain path's included.
                Box::pin(Arc::clone(&self.http).serve_connection(stream, version, caller)).await
            } else {
                Arc::clone(&self.http)
                    .serve_connection(PrefixedStream::new(prefix_bytes, client), version, caller)
                    .await
            };
            if let Err(error) = served {
                debug!(%peer, %workload, %error, "HTTP connection ended with an error");
            }
            return;
        }

        // Opaque TCP and TLS the workload terminates itself: one authorisation per connection.
        let snapshot = self.policy.current();
        let sni = match &protocol {
            Protocol::Tls { sni } => sni.as_deref(),
            _ => None,
        };
        let destination = sni
            .and_then(|host| snapshot.agent_by_host(host))
            .or_else(|| snapshot.agent_by_address(captured.original_dst));
        let decision = snapshot.authorize(&RequestAttributes {
            source: &workload,
            destination: destination.map(|agent| agent.name.as_str()),
            http_method: "",
            path: "",
            mcp_method: None,
            mcp_tool: None,
            a2a_method: None,
        });
        if !decision.allowed {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
            warn!(
                %peer, %workload, dst = %captured.original_dst, protocol = protocol.label(),
                policy = decision.policy.as_deref().unwrap_or("(default)"),
                reason = %decision.reason, "connection denied by policy"
            );
            reset(&client);
            return;
        }
        let (target, node) = destination
            .filter(|agent| {
                sni.is_some()
                    && !agent
                        .endpoints
                        .iter()
                        .any(|e| e.address == captured.original_dst)
            })
            .and_then(|agent| agent.endpoints.iter().find(|endpoint| endpoint.weight > 0))
            .map_or_else(
                || {
                    (
                        captured.original_dst,
                        node_of(&snapshot, captured.original_dst),
                    )
                },
                |endpoint| (endpoint.address, endpoint.node.clone()),
            );
        let upstream = match upstream.filter(|_| target == captured.original_dst) {
            Some(upstream) => upstream,
            None => match Box::pin(self.dialer.connect(&workload, target, node.as_deref())).await {
                Ok(upstream) => upstream,
                Err(error) => {
                    self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        %peer, %workload, dst = %target, node = node.as_deref().unwrap_or(""), %error,
                        "original destination unreachable; resetting the workload's connection"
                    );
                    reset(&client);
                    return;
                }
            },
        };
        debug!(%peer, %workload, dst = %target, protocol = protocol.label(), "forwarding captured connection");
        let mut client = client;
        let copied = Box::pin(self.forward(&mut client, upstream, &prefix)).await;
        match copied {
            Ok((to_upstream, to_workload)) => {
                self.stats
                    .bytes_to_upstream
                    .fetch_add(to_upstream, Ordering::Relaxed);
                self.stats
                    .bytes_to_workload
                    .fetch_add(to_workload, Ordering::Relaxed);
                debug!(
                    %peer, %workload, dst = %target, protocol = protocol.label(),
                    to_upstream, to_workload, "connection closed"
                );
            }
            Err(error) => {
                debug!(
                    %peer, %workload, dst = %target, protocol = protocol.label(), %error,
                    "connection ended with an error"
                );
                reset(&client);
            }
        }
    }

    fn count_protocol(&self, label: &str) {
        if let Some(index) = PROTOCOL_LABELS.iter().position(|known| *known == label) {
            self.stats.by_protocol[index].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Finds out who speaks first and what: the client's first bytes are read (and kept, to
    /// be replayed) until the detector decides. A client that stays silent for
    /// [`SERVER_FIRST_GRACE`] may be talking to a server-first protocol, so the original
    /// destination is dialled then; if it speaks before the client, the connection is opaque.
    async fn read_opening(
        &self,
        client: &TcpStream,
        captured: &CapturedConnection,
        workload: &str,
    ) -> std::io::Result<Opening> {
        if !self.l7 {
            return self.read_opening_dialling(client, captured, workload).await;
        }
        let mut upstream = None;
        // `peek`, not `readable`: a readiness report may be a false positive (a fresh accepted
        // socket often reports readable with nothing to read), and only bytes or an end of
        // stream say the client spoke.
        let mut first = [0u8; 1];
        if tokio::time::timeout(SERVER_FIRST_GRACE, client.peek(&mut first))
            .await
            .is_err()
            && self.may_reach(workload, captured.original_dst)
        {
            let node = node_of(&self.policy.current(), captured.original_dst);
            match self
                .dialer
                .connect(workload, captured.original_dst, node.as_deref())
                .await
            {
                Ok(mut dialled) => {
                    if server_speaks_first(client, &mut dialled).await? {
                        return Ok(Opening::ServerFirst(dialled));
                    }
                    upstream = Some(dialled);
                }
                // Unreachable for now; the client may still speak HTTP to a registry name.
                Err(error) => debug!(dst = %captured.original_dst, %error, "early dial failed"),
            }
        }
        let (prefix, protocol) = sniff_prefix(client).await?;
        Ok(Opening::Client {
            prefix,
            protocol,
            upstream,
        })
    }

    /// [`Self::read_opening`] when every connection is carried as opaque bytes (L7 off), so
    /// the original destination is dialled anyway (when policy lets the workload reach it at
    /// all): the dial starts at once and runs while the client's first bytes are read, and
    /// whichever side speaks first is known without a grace period.
    async fn read_opening_dialling(
        &self,
        client: &TcpStream,
        captured: &CapturedConnection,
        workload: &str,
    ) -> std::io::Result<Opening> {
        if !self.may_reach(workload, captured.original_dst) {
            // Never dialled: the L4 decision below refuses the connection.
            let (prefix, protocol) = sniff_prefix(client).await?;
            return Ok(Opening::Client {
                prefix,
                protocol,
                upstream: None,
            });
        }
        let node = node_of(&self.policy.current(), captured.original_dst);
        let dial = self
            .dialer
            .connect(workload, captured.original_dst, node.as_deref());
        tokio::pin!(dial);
        let mut upstream = None;
        let mut dial_done = false;
        let mut first = [0u8; 1];
        tokio::select! {
            spoke = client.peek(&mut first) => { spoke?; }
            dialled = &mut dial => {
                dial_done = true;
                match dialled {
                    Ok(mut dialled) => {
                        if server_speaks_first(client, &mut dialled).await? {
                            return Ok(Opening::ServerFirst(dialled));
                        }
                        upstream = Some(dialled);
                    }
                    // Dialled again (and reported) once the connection is authorised.
                    Err(error) => debug!(dst = %captured.original_dst, %error, "early dial failed"),
                }
            }
        }
        // The connect started above (its SYN is out); the kernel completes it meanwhile.
        let (prefix, protocol) = sniff_prefix(client).await?;
        if !dial_done {
            match dial.await {
                Ok(dialled) => upstream = Some(dialled),
                Err(error) => debug!(dst = %captured.original_dst, %error, "early dial failed"),
            }
        }
        Ok(Opening::Client {
            prefix,
            protocol,
            upstream,
        })
    }

    /// Whether `workload` may reach `destination` at all, before anything is known of what it
    /// will send: a destination it may not reach is never dialled early (it would see a
    /// connection, and through the tunnel another node would, that policy forbids).
    fn may_reach(&self, workload: &str, destination: SocketAddr) -> bool {
        let snapshot = self.policy.current();
        let request = RequestAttributes {
            source: workload,
            destination: snapshot
                .agent_by_address(destination)
                .map(|agent| agent.name.as_str()),
            ..RequestAttributes::default()
        };
        snapshot.check_reach(&request).allowed
    }

    /// Carries bytes both ways until both sides have finished, after sending the client
    /// bytes the detector read; returns the byte counts (to upstream, to the workload).
    async fn forward(
        &self,
        client: &mut TcpStream,
        mut upstream: Upstream,
        prefix: &[u8],
    ) -> std::io::Result<(u64, u64)> {
        upstream.write_all(prefix).await?;
        let sent_first = prefix.len() as u64;
        if let Upstream::Direct(direct) = &upstream
            && (self.splice || self.datapath.accelerated())
        {
            // The agent's own direction is spliced either way (writes to a redirecting socket
            // go through sk_msg). On an accelerated connection the workload's bytes may arrive
            // by sk_msg redirect, a queue splice(2) does not read, until its socket falls back
            // to TCP.
            let upload = async {
                if self.splice {
                    forward_one_way(&*client, direct).await
                } else {
                    upload_accelerated(&self.datapath, client, direct, sent_first).await
                }
            };
            let (to_upstream, to_workload) =
                tokio::try_join!(upload, forward_one_way(direct, &*client))?;
            self.stats
                .bytes_spliced
                .fetch_add(to_upstream.spliced + to_workload.spliced, Ordering::Relaxed);
            return Ok((sent_first + to_upstream.total, to_workload.total));
        }
        let (to_upstream, to_workload) = tokio::io::copy_bidirectional_with_sizes(
            client,
            &mut upstream,
            COPY_BUFFER,
            COPY_BUFFER,
        )
        .await?;
        Ok((sent_first + to_upstream, to_workload))
    }
}

/// Carries a workload's bytes to the upstream on an accelerated connection, until the
/// workload's EOF (then half-closes the upstream). Its [`RedirectReader`] tells the datapath
/// every quarter window how much it has read, so `sk_msg` keeps redirecting while the agent
/// keeps up; once the workload's socket has fallen back to TCP and everything it redirected
/// has been read, its redirect queue stays empty and the rest moves by splice(2).
async fn upload_accelerated(
    datapath: &Arc<Datapath>,
    client: &TcpStream,
    upstream: &TcpStream,
    already_read: u64,
) -> std::io::Result<Moved> {
    let reporter =
        client
            .peer_addr()
            .ok()
            .zip(client.local_addr().ok())
            .map(|(workload_end, agent_end)| {
                ReadReporter::new(Arc::clone(datapath), workload_end, agent_end, already_read)
            });
    let mut reader = RedirectReader::new(reporter);
    let mut total = 0u64;
    let mut buffer = vec![0u8; COPY_BUFFER];
    loop {
        let count = std::future::poll_fn(|cx| {
            let mut unfilled = tokio::io::ReadBuf::new(&mut buffer);
            reader
                .poll_read(client, cx, &mut unfilled)
                .map_ok(|()| unfilled.filled().len())
        })
        .await?;
        if count == 0 {
            socket2::SockRef::from(upstream).shutdown(std::net::Shutdown::Write)?;
            return Ok(Moved { total, spliced: 0 });
        }
        let mut data = &buffer[..count];
        while !data.is_empty() {
            upstream.writable().await?;
            match upstream.try_write(data) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(written) => data = &data[written..],
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
        total += count as u64;
        if reader.only_tcp_left() {
            // Everything redirected has been read: the rest is TCP only, for splice(2).
            let rest = forward_one_way(client, upstream).await?;
            return Ok(Moved {
                total: total + rest.total,
                spliced: rest.spliced,
            });
        }
    }
}

/// Closes a connection with RST so the workload sees a failure, not a clean end of stream.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Reads the client's first bytes until the detector decides; returns them (to replay) and
/// the protocol. A client that stalls mid-prefix, or finishes, is carried as opaque bytes.
async fn sniff_prefix(client: &TcpStream) -> std::io::Result<(Vec<u8>, Protocol)> {
    let mut prefix = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + DETECTION_TIMEOUT;
    loop {
        if tokio::time::timeout_at(deadline, client.readable())
            .await
            .is_err()
        {
            return Ok((prefix, Protocol::Opaque));
        }
        if prefix.len() == prefix.capacity() {
            // Grow by doubling, never past the detector's window.
            let wanted = (prefix.len() * 2).clamp(1024, MAX_SNIFF);
            prefix.reserve_exact(wanted - prefix.len());
        }
        // Into the spare capacity, without zeroing it first.
        let room = MAX_SNIFF - prefix.len();
        let read = client.try_read_buf(&mut bytes::BufMut::limit(&mut prefix, room));
        let count = match read {
            Ok(count) => count,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        };
        let protocol = if count == 0 {
            // The client finished sending (or never sent): whatever it sent is opaque.
            Protocol::Opaque
        } else {
            match detect(&prefix) {
                Detection::Known(protocol) => protocol,
                Detection::NeedMore if prefix.len() >= MAX_SNIFF => Protocol::Opaque,
                Detection::NeedMore => continue,
            }
        };
        return Ok((prefix, protocol));
    }
}

/// Whether the dialled destination speaks before the client does (a server-first protocol).
async fn server_speaks_first(client: &TcpStream, dialled: &mut Upstream) -> std::io::Result<bool> {
    let mut first = [0u8; 1];
    tokio::select! {
        spoke = client.peek(&mut first) => { spoke?; Ok(false) }
        ready = dialled.wait_readable() => { ready?; Ok(true) }
    }
}
