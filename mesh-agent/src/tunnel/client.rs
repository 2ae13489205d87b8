//! Client side of the tunnel: one pooled HTTP/2 connection with mutual TLS per (source
//! identity, peer address), one `CONNECT` stream per proxied connection.
//!
//! A connection is made on first use and shared by every stream of its key (HTTP/2
//! multiplexing); concurrent first uses wait for the one handshake. A connection that closed
//! (peer restarted, keepalive PING unanswered) is replaced on the next use; a stream refused
//! because its connection had just died is tried once more on a fresh connection.
//!
//! # Rotation
//!
//! A pooled connection remembers the client configuration (the source's certificate) it was
//! handshaken with and the peer certificate's expiry. Before each stream the pool asks the
//! credentials for the source's current configuration: when it is another one (the
//! certificate was renewed, e.g. by the new CA after a rotation), or the peer's certificate
//! has expired, the connection is **retired**: new streams go on a new connection made with
//! the current certificate, and the old one closes by itself once its streams have finished
//! (the pool drops its handle; HTTP/2 ends the connection when no stream and no handle is
//! left), so no stream fails. Each stream carries a [`Freshness`] handle with the same test,
//! so what is pooled on top of streams (the proxy's HTTP/1.1 and HTTP/2 upstream connections)
//! stops reusing a stream of a retired connection too.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock, PoisonError, atomic::Ordering},
    task::{Context, Poll},
    time::SystemTime,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{body::Incoming, client::conn::http2::SendRequest, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, info, warn};

use super::{TunnelError, TunnelSettings, TunnelStats, dial_uncaptured};
use crate::identity::{SpiffeId, TlsCredentials, ca::validity, spiffe_id_of_certificate};

/// Largest refusal reason read from a peer's error response.
const MAX_REASON: usize = 1024;
/// HTTP/2 flow-control windows: large enough for bulk transfers across a data-centre RTT.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;

/// The peer node a stream goes to.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// Its node name: the tunnel accepts only the certificate of `spiffe://<td>/node/<name>`.
    pub node: &'a str,
    /// Its tunnel listener.
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: SpiffeId,
    peer: SocketAddr,
}

type Sender = SendRequest<Empty<Bytes>>;

/// A pooled connection and what it was made with.
struct Pooled {
    sender: Sender,
    freshness: Freshness,
}

impl Pooled {
    fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// Whether a tunnel connection (and so every stream on it) may still be used for new work:
/// not once the source's certificate was renewed (another client configuration is current)
/// or the peer's certificate expired. Cheap to clone and to ask.
#[derive(Clone)]
pub struct Freshness(Arc<FreshnessInner>);

struct FreshnessInner {
    credentials: Arc<dyn TlsCredentials>,
    source: SpiffeId,
    /// The client configuration (source certificate) of the connection's handshake.
    config: Arc<rustls::ClientConfig>,
    /// When the peer's certificate expires.
    peer_not_after: SystemTime,
    /// 0 while current, else the index of the reason in [`RETIREMENT_REASONS`] plus one.
    retired: std::sync::atomic::AtomicU8,
}

/// Why a connection was retired.
const RETIREMENT_REASONS: [&str; 2] = [
    "the source's certificate was renewed",
    "the peer's certificate expired",
];

impl std::fmt::Debug for Freshness {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Freshness")
            .field("source", &self.0.source)
            .field("retired", &(self.0.retired.load(Ordering::Relaxed) != 0))
            .finish_non_exhaustive()
    }
}

impl Freshness {
    /// True while the connection may carry new streams (and pooled work on its streams).
    pub fn is_current(&self) -> bool {
        let current = self.0.credentials.current_client_config(&self.0.source);
        self.retirement(current.as_ref(), SystemTime::now())
            .is_none()
    }

    /// Why the connection must not carry new work any more, if it must not; `current` is
    /// the source's configuration of the moment, if known. Once retired, always retired.
    fn retirement(
        &self,
        current: Option<&Arc<rustls::ClientConfig>>,
        now: SystemTime,
    ) -> Option<&'static str> {
        let retired = self.0.retired.load(Ordering::Relaxed);
        if retired != 0 {
            return RETIREMENT_REASONS.get(usize::from(retired) - 1).copied();
        }
        let reason = if current.is_some_and(|current| !Arc::ptr_eq(&self.0.config, current)) {
            Some(0)
        } else if now >= self.0.peer_not_after {
            Some(1)
        } else {
            None
        };
        let index: u8 = reason?;
        self.0.retired.store(index + 1, Ordering::Relaxed);
        RETIREMENT_REASONS.get(usize::from(index)).copied()
    }
}

/// The pooled connection of one key; its lock is held while that connection is made.
type Slot = Arc<tokio::sync::Mutex<Option<Pooled>>>;

/// Opens tunnelled connections to peer nodes.
pub struct TunnelClient {
    /// Set once, when the identities are ready (possibly after the proxy started).
    credentials: OnceLock<Arc<dyn TlsCredentials>>,
    settings: TunnelSettings,
    slots: Mutex<HashMap<PoolKey, Slot>>,
    stats: Arc<TunnelStats>,
}

impl std::fmt::Debug for TunnelClient {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TunnelClient")
            .field("credentials", &self.credentials.get().is_some())
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl TunnelClient {
    /// Without credentials every [`TunnelClient::open`] fails with
    /// [`TunnelError::NoCredentials`]: cross-node traffic never goes out in plaintext.
    pub fn new(
        credentials: Option<Arc<dyn TlsCredentials>>,
        settings: TunnelSettings,
        stats: Arc<TunnelStats>,
    ) -> Self {
        let cell = OnceLock::new();
        if let Some(credentials) = credentials {
            let _ = cell.set(credentials);
        }
        Self {
            credentials: cell,
            settings,
            slots: Mutex::new(HashMap::new()),
            stats,
        }
    }

    /// Provides the credentials once they are ready; `false` when some were already set
    /// (they are kept).
    pub fn set_credentials(&self, credentials: Arc<dyn TlsCredentials>) -> bool {
        self.credentials.set(credentials).is_ok()
    }

    /// The trust domain workload identities are made in, when credentials are configured.
    pub fn trust_domain(&self) -> Option<&str> {
        self.credentials
            .get()
            .map(|credentials| credentials.trust_domain())
    }

    /// Pooled connections open now.
    pub fn connections(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots
            .values()
            .filter(|slot| {
                slot.try_lock()
                    .map(|pooled| pooled.as_ref().is_some_and(Pooled::is_open))
                    .unwrap_or(true)
            })
            .count()
    }

    /// Opens a stream to `target` (an endpoint on `peer`), as `source`.
    pub async fn open(
        &self,
        source: &SpiffeId,
        peer: Peer<'_>,
        target: SocketAddr,
    ) -> Result<TunnelStream, TunnelError> {
        let credentials = self.credentials.get().ok_or(TunnelError::NoCredentials)?;
        // The source's configuration of the moment: a pooled connection made with another one
        // is retired (see the module documentation). Asking also marks the identity as in use.
        let config = credentials
            .client_config(source)
            .await
            .map_err(|source_error| TunnelError::Credentials {
                identity: source.to_string(),
                source: source_error,
            })?;
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            // Forget keys whose connection is gone, so the map does not grow without bound.
            if slots.len() > 64 {
                slots.retain(|_, slot| {
                    slot.try_lock()
                        .map(|pooled| pooled.as_ref().is_some_and(Pooled::is_open))
                        .unwrap_or(true)
                });
            }
            Arc::clone(
                slots
                    .entry(PoolKey {
                        source: source.clone(),
                        peer: peer.address,
                    })
                    .or_default(),
            )
        };
        let mut last_error = None;
        for _ in 0..2 {
            let (mut sender, fresh, freshness) = self
                .sender(&slot, credentials, &config, source, peer)
                .await?;
            let request = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .body(Empty::<Bytes>::new())
                .map_err(|error| TunnelError::Protocol {
                    node: peer.node.to_owned(),
                    reason: error.to_string(),
                })?;
            let sent = match sender.ready().await {
                Ok(()) => sender.send_request(request).await,
                Err(error) => Err(error),
            };
            match sent {
                Ok(response) => return self.finish(peer, target, response, freshness).await,
                Err(error) => {
                    // The connection is broken (or going away): the next stream makes a new
                    // one; streams still open on it finish there.
                    debug!(node = peer.node, peer = %peer.address, %error, fresh, "tunnel connection failed; forgetting it");
                    *slot.lock().await = None;
                    last_error = Some(error);
                    if fresh {
                        break;
                    }
                }
            }
        }
        Err(TunnelError::Protocol {
            node: peer.node.to_owned(),
            reason: last_error.map_or_else(|| "no connection".to_owned(), |e| e.to_string()),
        })
    }

    /// The pooled connection of `slot`, made when missing, closed or retired; `true` when new;
    /// and its freshness.
    async fn sender(
        &self,
        slot: &Slot,
        credentials: &Arc<dyn TlsCredentials>,
        config: &Arc<rustls::ClientConfig>,
        source: &SpiffeId,
        peer: Peer<'_>,
    ) -> Result<(Sender, bool, Freshness), TunnelError> {
        let mut pooled = slot.lock().await;
        if let Some(current) = pooled.as_ref()
            && current.is_open()
        {
            match current
                .freshness
                .retirement(Some(config), SystemTime::now())
            {
                None => return Ok((current.sender.clone(), false, current.freshness.clone())),
                Some(reason) => {
                    self.stats
                        .client_connections_retired
                        .fetch_add(1, Ordering::Relaxed);
                    info!(node = peer.node, peer = %peer.address, %source, reason, "tunnel connection retired: new streams go on a new connection, open ones finish on it");
                }
            }
        }
        // Dropping the handle lets the old connection close once its streams are done.
        *pooled = None;
        match self.connect(credentials, config, source, peer).await {
            Ok(connection) => {
                self.stats
                    .client_connections
                    .fetch_add(1, Ordering::Relaxed);
                let sender = connection.sender.clone();
                let freshness = connection.freshness.clone();
                *pooled = Some(connection);
                Ok((sender, true, freshness))
            }
            Err(error) => {
                self.stats
                    .client_connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                warn!(node = peer.node, peer = %peer.address, %source, %error, "cannot reach peer node's tunnel");
                Err(error)
            }
        }
    }

    async fn connect(
        &self,
        credentials: &Arc<dyn TlsCredentials>,
        config: &Arc<rustls::ClientConfig>,
        source: &SpiffeId,
        peer: Peer<'_>,
    ) -> Result<Pooled, TunnelError> {
        let node = peer.node.to_owned();
        let address = peer.address;
        let expected = SpiffeId::for_node(credentials.trust_domain(), peer.node)
            .map_err(|error| TunnelError::Identity(peer.node.to_owned(), error.to_string()))?;
        let tcp = dial_uncaptured(address, self.settings.connect_timeout)
            .await
            .map_err(|error| TunnelError::Connect {
                node: node.clone(),
                address,
                reason: error.to_string(),
            })?;
        let tls_error = |reason: String| TunnelError::Tls {
            node: node.clone(),
            address,
            reason,
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
        let name = ServerName::IpAddress(address.ip().into());
        let tls = tokio::time::timeout(
            self.settings.handshake_timeout,
            connector.connect(name, tcp),
        )
        .await
        .map_err(|_| {
            tls_error(format!(
                "handshake timed out after {:?}",
                self.settings.handshake_timeout
            ))
        })?
        .map_err(|error| tls_error(error.to_string()))?;
        // The verifier checked the chain; this checks it is the node we meant to reach.
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certificates| certificates.first())
            .ok_or_else(|| tls_error("the peer presented no certificate".to_owned()))?;
        let presented =
            spiffe_id_of_certificate(leaf).map_err(|error| tls_error(error.to_string()))?;
        let (_, peer_not_after) = validity(leaf).map_err(|error| tls_error(error.to_string()))?;
        if presented != expected {
            return Err(TunnelError::PeerIdentity {
                node,
                address,
                presented: presented.to_string(),
                expected: expected.to_string(),
            });
        }
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.settings.keepalive_interval)
            .keep_alive_timeout(self.settings.keepalive_timeout)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(|error| TunnelError::Protocol {
                node: node.clone(),
                reason: format!("HTTP/2 handshake: {error}"),
            })?;
        info!(%node, peer = %address, %source, peer_not_after = %humantime::format_rfc3339_seconds(peer_not_after), "tunnel connection established");
        tokio::spawn(async move {
            match connection.await {
                Ok(()) => debug!(%node, peer = %address, "tunnel connection closed"),
                Err(error) => {
                    info!(%node, peer = %address, %error, "tunnel connection ended with an error")
                }
            }
        });
        Ok(Pooled {
            sender,
            freshness: Freshness(Arc::new(FreshnessInner {
                credentials: Arc::clone(credentials),
                source: source.clone(),
                config: Arc::clone(config),
                peer_not_after,
                retired: std::sync::atomic::AtomicU8::new(0),
            })),
        })
    }

    async fn finish(
        &self,
        peer: Peer<'_>,
        target: SocketAddr,
        mut response: Response<Incoming>,
        freshness: Freshness,
    ) -> Result<TunnelStream, TunnelError> {
        let status = response.status();
        if status == StatusCode::OK {
            let upgraded =
                hyper::upgrade::on(&mut response)
                    .await
                    .map_err(|error| TunnelError::Protocol {
                        node: peer.node.to_owned(),
                        reason: format!("CONNECT stream: {error}"),
                    })?;
            self.stats.client_streams.fetch_add(1, Ordering::Relaxed);
            self.stats
                .client_streams_active
                .fetch_add(1, Ordering::Relaxed);
            return Ok(TunnelStream {
                io: TokioIo::new(upgraded),
                stats: Arc::clone(&self.stats),
                freshness,
            });
        }
        self.stats
            .client_streams_refused
            .fetch_add(1, Ordering::Relaxed);
        let reason = match tokio::time::timeout(
            self.settings.connect_timeout,
            Limited::new(response.into_body(), MAX_REASON).collect(),
        )
        .await
        {
            Ok(Ok(body)) => String::from_utf8_lossy(&body.to_bytes()).trim().to_owned(),
            _ => String::new(),
        };
        let reason = if reason.is_empty() {
            status.to_string()
        } else {
            format!("{status}: {reason}")
        };
        let node = peer.node.to_owned();
        Err(match status {
            StatusCode::FORBIDDEN => TunnelError::Denied {
                node,
                target,
                reason,
            },
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => {
                TunnelError::TargetUnreachable {
                    node,
                    target,
                    reason,
                }
            }
            _ => TunnelError::Protocol { node, reason },
        })
    }
}

/// One tunnelled connection: bytes both ways, half-close (shutdown sends END_STREAM),
/// backpressure from HTTP/2 flow control.
pub struct TunnelStream {
    io: TokioIo<Upgraded>,
    stats: Arc<TunnelStats>,
    freshness: Freshness,
}

impl TunnelStream {
    /// Whether this stream's connection may still be used for new work (see [`Freshness`]).
    pub fn freshness(&self) -> Freshness {
        self.freshness.clone()
    }
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TunnelStream")
            .finish_non_exhaustive()
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        self.stats
            .client_streams_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
