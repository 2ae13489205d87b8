//! Pooled HTTP/1.1 connections to upstream endpoints, keyed by endpoint address (and, for an
//! endpoint on another node, by the source workload whose identity the tunnel carries), on
//! hyper's low-level client (`hyper::client::conn::http1`). Connections are made by the
//! proxy's [`Dialer`]: directly, or through the node-to-node tunnel.
//!
//! The request goes out in origin form as the caller sent it: no absolute URI is formatted and
//! parsed again, no pool key is built, and a connection goes back to the pool when its
//! response body has been passed on in full (when the response body is dropped), not from a
//! task spawned per request. Each connection is driven by its own task, which also notices an
//! upstream that closes an idle connection. A request that a reused connection refused
//! before sending a byte (it closed meanwhile) is sent again on a fresh one, as the pooled
//! client of `hyper-util` does; anything else is the caller's to retry. A tunnelled connection
//! is not reused once its tunnel connection is retired (the source's certificate was renewed):
//! the next request makes a new one, on the new certificate.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::SendRequest,
};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::{
    dialer::{DialError, Dialer, Upstream},
    h1_client::{H1Error, RawBody, RawConnection, SendFailure, encode_request},
    http::{BodyError, ProxyBody},
    request_headers::RequestHeaders,
    workers::{MAX_WORKERS, current_worker},
};
use crate::{
    fast_map::FastHashMap,
    tunnel::{Freshness, TunnelError},
};

/// What a pooled connection is tied to: its endpoint, and the source workload when the
/// connection goes through the tunnel (the peer node authorised that source, so it must not
/// carry another's requests).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamKey {
    pub endpoint: SocketAddr,
    pub via: Option<Arc<str>>,
}

/// Why an upstream request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: nothing was sent, so any request may be sent again.
    #[error("{0}")]
    Connect(String),
    /// The connection failed after the request was (or may have been) sent.
    #[error(transparent)]
    Failed(hyper::Error),
    /// The endpoint's node refused this source (its own policy): nothing was sent, and
    /// another try would be refused too.
    #[error("{0}")]
    Refused(String),
    /// A request sent on a raw connection failed after (or while) it went out.
    #[error(transparent)]
    Exchange(H1Error),
    /// No response head by the request's deadline.
    #[error("no response by the deadline")]
    TimedOut,
}

/// A pooled connection: driven by hyper's client (its own task), or by the request's task
/// ([`RawConnection`]).
enum PooledConn {
    Hyper(SendRequest<ProxyBody>),
    Raw(Box<RawConnection>),
}

impl PooledConn {
    fn is_raw(&self) -> bool {
        matches!(self, Self::Raw(_))
    }

    /// Whether the upstream still has it open (and, for a raw one, sent nothing unasked).
    fn is_open(&mut self) -> bool {
        match self {
            Self::Hyper(sender) => !sender.is_closed(),
            Self::Raw(conn) => conn.idle_usable(),
        }
    }
}

/// One idle connection.
struct Idle {
    conn: PooledConn,
    since: Instant,
    /// For a tunnelled connection: whether its tunnel connection is still current.
    freshness: Option<Freshness>,
}

impl Idle {
    fn reusable(&mut self, now: Instant, idle_timeout: Duration) -> bool {
        now.duration_since(self.since) < idle_timeout
            && self.freshness.as_ref().is_none_or(Freshness::is_current)
            && self.conn.is_open()
    }
}

/// Idle connections by endpoint, most recently used last.
#[derive(Default)]
struct IdleSet {
    by_endpoint: FastHashMap<UpstreamKey, Vec<Idle>>,
    count: usize,
    last_sweep: Option<Instant>,
}

impl IdleSet {
    /// Drops expired and closed connections everywhere (at most every `every`).
    fn sweep(&mut self, now: Instant, idle_timeout: Duration, every: Duration) {
        if self
            .last_sweep
            .is_some_and(|last| now.duration_since(last) < every)
        {
            return;
        }
        self.last_sweep = Some(now);
        let mut count = 0;
        self.by_endpoint.retain(|_, idle| {
            idle.retain_mut(|conn| conn.reusable(now, idle_timeout));
            count += idle.len();
            !idle.is_empty()
        });
        self.count = count;
    }
}

/// The shared part of a [`Http1Pool`]; pooled bodies hold it weakly.
struct PoolInner {
    /// Idle connections by connection worker (see [`super::workers`]; index 0 for any other
    /// thread): a connection is driven by a task on the worker that made it, so it is only
    /// handed to requests on that worker, and no request wakes another thread.
    idle: Box<[Mutex<IdleSet>]>,
    dialer: Arc<Dialer>,
    idle_timeout: Duration,
    max_idle_per_endpoint: usize,
}

impl PoolInner {
    fn idle_of(&self, worker: usize) -> &Mutex<IdleSet> {
        &self.idle[worker % self.idle.len()]
    }

    fn put_back(
        &self,
        worker: usize,
        endpoint: UpstreamKey,
        conn: PooledConn,
        freshness: Option<Freshness>,
    ) {
        let now = Instant::now();
        // Whether the upstream has closed it since is checked when it is taken (and by the
        // sweep), not here: it was open a moment ago, when its response ended.
        if freshness.as_ref().is_some_and(|fresh| !fresh.is_current()) {
            return;
        }
        let conn = Idle {
            conn,
            since: now,
            freshness,
        };
        let mut guard = self
            .idle_of(worker)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let idle = &mut *guard;
        idle.sweep(now, self.idle_timeout, self.idle_timeout / 4);
        let list = idle.by_endpoint.entry(endpoint).or_default();
        if list.len() >= self.max_idle_per_endpoint {
            // Full: the oldest goes (dropping its sender closes the connection).
            list.remove(0);
            idle.count -= 1;
        }
        list.push(conn);
        idle.count += 1;
    }

    /// The most recently used idle connection to `endpoint` of the wanted kind (raw or not)
    /// still open and within the idle timeout.
    fn take(
        &self,
        worker: usize,
        endpoint: &UpstreamKey,
        raw: bool,
    ) -> Option<(PooledConn, Option<Freshness>)> {
        let now = Instant::now();
        let mut idle = self
            .idle_of(worker)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let list = idle.by_endpoint.get_mut(endpoint)?;
        let mut taken = None;
        let mut dropped = 0;
        while let Some(position) = list.iter().rposition(|idle| idle.conn.is_raw() == raw) {
            let mut conn = list.remove(position);
            dropped += 1;
            if conn.reusable(now, self.idle_timeout) {
                taken = Some((conn.conn, conn.freshness));
                break;
            }
        }
        // An emptied list stays (the sweep drops it if it stays empty): the connection taken
        // usually comes back within the request, and would otherwise allocate it again.
        idle.count -= dropped;
        taken
    }
}

/// HTTP/1.1 connections to upstream endpoints, reused across requests and callers.
pub struct Http1Pool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for Http1Pool {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Http1Pool")
            .field("idle", &self.idle())
            .finish_non_exhaustive()
    }
}

impl Http1Pool {
    /// A pool of direct connections only (endpoints on other nodes fail closed).
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle_per_endpoint: usize,
    ) -> Self {
        let dialer = Arc::new(Dialer::direct("", connect_timeout));
        Self::with_dialer(dialer, idle_timeout, max_idle_per_endpoint)
    }

    /// A pool whose connections `dialer` makes.
    pub fn with_dialer(
        dialer: Arc<Dialer>,
        idle_timeout: Duration,
        max_idle_per_endpoint: usize,
    ) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                idle: (0..=MAX_WORKERS)
                    .map(|_| Mutex::new(IdleSet::default()))
                    .collect(),
                dialer,
                idle_timeout,
                max_idle_per_endpoint,
            }),
        }
    }

    /// Idle connections held now.
    pub fn idle(&self) -> usize {
        self.inner
            .idle
            .iter()
            .map(|idle| idle.lock().unwrap_or_else(PoisonError::into_inner).count)
            .sum()
    }

    /// Sends `request` (origin-form URI, `Host` set) to `endpoint` on an idle connection, or
    /// a new one. The connection returns to the pool when the response body is dropped after
    /// its end.
    pub async fn send(
        &self,
        endpoint: SocketAddr,
        request: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        self.send_as(&Arc::from(""), endpoint, None, request).await
    }

    /// [`Http1Pool::send`] on behalf of workload `source`, to an endpoint on `node`.
    pub async fn send_as(
        &self,
        source: &Arc<str>,
        address: SocketAddr,
        node: Option<&str>,
        request: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        let endpoint = UpstreamKey {
            endpoint: address,
            via: self.inner.dialer.identity_key(source, node),
        };
        let worker = current_worker();
        let mut request = Some(request);
        // Reused connections first; one that turns out closed gives the request back. One
        // still busy (its request body still going out after the response ended) is not
        // waited for: it goes back to the pool afterwards.
        let mut busy = Vec::new();
        let sent = loop {
            let Some(unsent) = request.take() else {
                break None;
            };
            let Some((PooledConn::Hyper(mut sender), freshness)) =
                self.inner.take(worker, &endpoint, false)
            else {
                request = Some(unsent);
                break None;
            };
            match std::future::poll_fn(|cx| Poll::Ready(sender.poll_ready(cx))).await {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(error)) => {
                    debug!(endpoint = %address, %error, "pooled upstream connection closed");
                    request = Some(unsent);
                    continue;
                }
                Poll::Pending => {
                    busy.push((sender, freshness));
                    request = Some(unsent);
                    continue;
                }
            }
            match sender.try_send_request(unsent).await {
                Ok(response) => {
                    let response = response.map(|body| Inner::Hyper {
                        body,
                        sender: Some(sender),
                    });
                    break Some(Ok(self.pooled(
                        worker,
                        endpoint.clone(),
                        freshness,
                        response,
                    )));
                }
                Err(mut error) => match error.take_message() {
                    // Never sent: the connection closed meanwhile; try another.
                    Some(unsent) => {
                        debug!(endpoint = %address, error = %error.error(), "pooled upstream connection refused the request; trying another");
                        request = Some(unsent);
                    }
                    None => break Some(Err(SendError::Failed(error.into_error()))),
                },
            }
        };
        for (sender, freshness) in busy {
            self.inner.put_back(
                worker,
                endpoint.clone(),
                PooledConn::Hyper(sender),
                freshness,
            );
        }
        if let Some(sent) = sent {
            return sent;
        }
        // The loop ends without an answer only with the request back in hand.
        let Some(request) = request else {
            return Err(SendError::Connect("no request left to send".to_owned()));
        };
        let (mut sender, freshness) = self.connect(source, &endpoint, node).await?;
        match sender.send_request(request).await {
            Ok(response) => {
                let response = response.map(|body| Inner::Hyper {
                    body,
                    sender: Some(sender),
                });
                Ok(self.pooled(worker, endpoint, freshness, response))
            }
            Err(error) => Err(SendError::Failed(error)),
        }
    }

    /// [`Http1Pool::send_as`] for a request whose body is all in hand: sent and answered on
    /// a [`RawConnection`], inside the calling task. `target` is the origin-form request
    /// target, `headers` the caller's (hop-by-hop ones are left out), `host` the `Host` to
    /// send when they hold none. [`SendError::TimedOut`] when the response head has not come
    /// by `deadline`: the bound is checked by a timer each connection keeps from request to
    /// request (see [`ReusedTimer`](super::reused_timer::ReusedTimer)), not one made per
    /// request.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_buffered_as(
        &self,
        source: &Arc<str>,
        address: SocketAddr,
        node: Option<&str>,
        method: &Method,
        target: &str,
        headers: &RequestHeaders,
        host: Option<&HeaderValue>,
        body: &Bytes,
        deadline: tokio::time::Instant,
    ) -> Result<Response<PooledBody>, SendError> {
        let endpoint = UpstreamKey {
            endpoint: address,
            via: self.inner.dialer.identity_key(source, node),
        };
        let worker = current_worker();
        let mut head = BytesMut::new();
        encode_request(method, target, headers, host, body, &mut head);
        // Reused connections first; one the upstream closed before taking a byte of the
        // request gives it back for the next.
        while let Some((PooledConn::Raw(conn), freshness)) =
            self.inner.take(worker, &endpoint, true)
        {
            match conn.send(method, &head, body, deadline).await {
                Ok(response) => {
                    return Ok(self.pooled(worker, endpoint, freshness, response.map(Inner::Raw)));
                }
                Err(SendFailure::NotSent(error)) => {
                    debug!(endpoint = %address, %error, "pooled upstream connection refused the request; trying another");
                }
                Err(SendFailure::Failed(error)) => return Err(SendError::Exchange(error)),
                Err(SendFailure::TimedOut) => return Err(SendError::TimedOut),
            }
        }
        let stream = tokio::time::timeout_at(deadline, self.dial(source, address, node))
            .await
            .map_err(|_| SendError::TimedOut)??;
        let freshness = stream.freshness();
        match Box::new(RawConnection::new(stream))
            .send(method, &head, body, deadline)
            .await
        {
            Ok(response) => Ok(self.pooled(worker, endpoint, freshness, response.map(Inner::Raw))),
            Err(SendFailure::NotSent(error) | SendFailure::Failed(error)) => {
                Err(SendError::Exchange(error))
            }
            Err(SendFailure::TimedOut) => Err(SendError::TimedOut),
        }
    }

    /// A response whose connection goes back to this pool once its body has ended.
    fn pooled(
        &self,
        worker: usize,
        endpoint: UpstreamKey,
        freshness: Option<Freshness>,
        response: Response<Inner>,
    ) -> Response<PooledBody> {
        response.map(|inner| PooledBody {
            inner,
            back: Some(Back {
                pool: Arc::downgrade(&self.inner),
                worker,
                endpoint,
                freshness,
            }),
        })
    }

    async fn dial(
        &self,
        source: &str,
        endpoint: SocketAddr,
        node: Option<&str>,
    ) -> Result<Upstream, SendError> {
        self.inner
            .dialer
            .connect(source, endpoint, node)
            .await
            .map_err(|error| match error {
                DialError::Tunnel(TunnelError::Denied { .. }) => {
                    SendError::Refused(error.to_string())
                }
                other => SendError::Connect(other.to_string()),
            })
    }

    async fn connect(
        &self,
        source: &str,
        key: &UpstreamKey,
        node: Option<&str>,
    ) -> Result<(SendRequest<ProxyBody>, Option<Freshness>), SendError> {
        let endpoint = key.endpoint;
        let stream = self.dial(source, endpoint, node).await?;
        let freshness = stream.freshness();
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, ProxyBody>(TokioIo::new(stream))
            .await
            .map_err(|error| SendError::Connect(format!("HTTP/1.1 handshake: {error}")))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%endpoint, %error, "upstream connection ended with an error");
            }
        });
        Ok((sender, freshness))
    }
}

/// Where a finished response's connection goes back to.
struct Back {
    pool: Weak<PoolInner>,
    /// The worker whose pool the connection belongs to (its task runs there).
    worker: usize,
    endpoint: UpstreamKey,
    freshness: Option<Freshness>,
}

/// A response body from the pool: the upstream's body, and the connection it came on, which
/// goes back to the pool once the body has ended (dropped before its end, the connection
/// closes: its state is unknown).
pub struct PooledBody {
    inner: Inner,
    back: Option<Back>,
}

/// The body, and with it the connection's handle: hyper's (none when the body is not from
/// the pool), or the raw connection itself, which the body reads from.
enum Inner {
    Hyper {
        body: Incoming,
        sender: Option<SendRequest<ProxyBody>>,
    },
    Raw(RawBody),
}

impl PooledBody {
    /// A body not tied to a pooled connection.
    pub fn unpooled(inner: Incoming) -> Self {
        Self {
            inner: Inner::Hyper {
                body: inner,
                sender: None,
            },
            back: None,
        }
    }
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PooledBody")
            .field("pooled", &self.back.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        let Some(back) = self.back.take() else {
            return;
        };
        let conn = match &mut self.inner {
            Inner::Hyper { body, sender } if body.is_end_stream() => {
                sender.take().map(PooledConn::Hyper)
            }
            Inner::Hyper { .. } => None,
            Inner::Raw(body) => body.finished_connection().map(|mut conn| {
                conn.release_buffer();
                PooledConn::Raw(conn)
            }),
        };
        if let (Some(conn), Some(pool)) = (conn, back.pool.upgrade()) {
            pool.put_back(back.worker, back.endpoint, conn, back.freshness);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = match &mut self.inner {
            Inner::Hyper { body, .. } => Pin::new(body).poll_frame(cx).map_err(BodyError::from),
            Inner::Raw(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::from),
        };
        if let Poll::Ready(Some(Err(_))) = &polled {
            // A failed body: its connection is not to be reused.
            self.back = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Hyper { body, .. } => body.is_end_stream(),
            Inner::Raw(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Hyper { body, .. } => body.size_hint(),
            Inner::Raw(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A keep-alive upstream that answers every request on a connection with `body`, and
    /// counts the connections it accepted.
    async fn upstream(body: &'static str) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let read = match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => read,
                        };
                        seen.extend_from_slice(&buffer[..read]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let reply = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if stream.write_all(reply.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (address, accepted)
    }

    fn get() -> Request<ProxyBody> {
        let mut request = Request::new(super::super::http::empty_body());
        *request.uri_mut() = http::Uri::from_static("/hello");
        request
            .headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("up"));
        request
    }

    async fn body_text(response: Response<PooledBody>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_finished_response_returns_its_connection_for_the_next_request() {
        let (address, accepted) = upstream("hello").await;
        let pool = Http1Pool::new(Duration::from_secs(1), Duration::from_secs(90), 8);
        for _ in 0..5 {
            let response = pool.send(address, get()).await.unwrap();
            assert_eq!(body_text(response).await, "hello");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn an_abandoned_body_does_not_return_its_connection() {
        let (address, accepted) = upstream("hello").await;
        let pool = Http1Pool::new(Duration::from_secs(1), Duration::from_secs(90), 8);
        // Status and headers only; the body is dropped before its end was seen.
        let response = pool.send(address, get()).await.unwrap();
        drop(response);
        assert_eq!(pool.idle(), 0);
        let response = pool.send(address, get()).await.unwrap();
        assert_eq!(body_text(response).await, "hello");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// An upstream that answers one request per connection (`ok`), then closes it.
    async fn closing_upstream() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 4096];
                    let _ = stream.read(&mut buffer).await;
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        address
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_reused() {
        let address = closing_upstream().await;
        let pool = Http1Pool::new(Duration::from_secs(1), Duration::from_secs(90), 8);
        for _ in 0..3 {
            let response = pool.send(address, get()).await.unwrap();
            assert_eq!(body_text(response).await, "ok");
            // Let the connection's task see the close.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A GET with its body in hand, through the raw (in-task) path.
    async fn send_buffered(pool: &Http1Pool, address: SocketAddr) -> Response<PooledBody> {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::HOST,
            http::HeaderValue::from_static("upstream"),
        );
        let headers = RequestHeaders::Map(headers);
        pool.send_buffered_as(
            &Arc::from(""),
            address,
            None,
            &Method::GET,
            "/",
            &headers,
            None,
            &Bytes::new(),
            tokio::time::Instant::now() + Duration::from_secs(30),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_finished_raw_response_returns_its_connection_for_the_next_request() {
        let (address, accepted) = upstream("hello").await;
        let pool = Http1Pool::new(Duration::from_secs(1), Duration::from_secs(90), 8);
        for _ in 0..3 {
            let response = send_buffered(&pool, address).await;
            assert_eq!(body_text(response).await, "hello");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn an_abandoned_raw_body_does_not_return_its_connection() {
        let (address, accepted) = upstream("hello").await;
        let pool = Http1Pool::new(Duration::from_secs(1), Duration::from_secs(90), 8);
        drop(send_buffered(&pool, address).await);
        assert_eq!(pool.idle(), 0);
        let response = send_buffered(&pool, address).await;
        assert_eq!(body_text(response).await, "hello");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_raw_connection_the_upstream_closed_is_not_reused() {
        let address = closing_upstream().await;
        let pool = Http1Pool::new(Duration::from_secs(1), Duration::from_secs(90), 8);
        for _ in 0..3 {
            let response = send_buffered(&pool, address).await;
            assert_eq!(body_text(response).await, "ok");
            // Let the close arrive.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_still_sending_its_request_body_is_not_waited_for() {
        let (address, accepted) = upstream("hello").await;
        let pool = Http1Pool::new(Duration::from_secs(1), Duration::from_secs(90), 8);
        // A request body that never ends: the upstream answers after the head anyway.
        let endless = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, super::super::http::BodyError>,
        >());
        let mut request = get();
        *request.method_mut() = http::Method::POST;
        *request.body_mut() = endless.boxed();
        let response = pool.send(address, request).await.unwrap();
        assert_eq!(body_text(response).await, "hello");
        let next = tokio::time::timeout(Duration::from_secs(2), pool.send(address, get()))
            .await
            .expect("a busy pooled connection must not hold up the next request")
            .unwrap();
        assert_eq!(body_text(next).await, "hello");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connect_failures_are_reported_as_such() {
        let unused = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let pool = Http1Pool::new(Duration::from_secs(1), Duration::from_secs(90), 8);
        let error = pool.send(unused, get()).await.unwrap_err();
        assert!(matches!(error, SendError::Connect(_)), "{error}");
    }

    #[tokio::test]
    async fn idle_connections_past_the_timeout_are_not_reused() {
        let (address, accepted) = upstream("hello").await;
        let pool = Http1Pool::new(Duration::from_secs(1), Duration::from_millis(30), 8);
        let response = pool.send(address, get()).await.unwrap();
        assert_eq!(body_text(response).await, "hello");
        tokio::time::sleep(Duration::from_millis(60)).await;
        let response = pool.send(address, get()).await.unwrap();
        assert_eq!(body_text(response).await, "hello");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// An HTTP/1.1 connection pooled on a tunnel stream is reused until the source's
    /// certificate is renewed; then the next request goes on a new tunnel connection (and the
    /// old upstream connection is dropped, not reused).
    #[tokio::test]
    async fn tunnelled_connections_are_not_reused_after_the_source_certificate_is_renewed() {
        use crate::{
            identity::{SpiffeId, TlsCredentials},
            policy::{Action, PolicySnapshot, PolicyStore, parse_documents},
            tunnel::{
                PeerDirectory, TunnelClient, TunnelServer, TunnelSettings, TunnelStats,
                testing::{TestCa, TestCredentials},
            },
        };
        let (address, accepted) = upstream("hello").await;
        let text = format!(
            "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: Agent\nmetadata: {{name: up}}\nspec: {{endpoints: [{{address: \"{address}\", node: node-b}}]}}\n"
        );
        let report = parse_documents(&text, "test.yaml");
        let snapshot = PolicySnapshot::compile(&report.resources(), Action::Allow).unwrap();
        let ca = TestCa::new();
        let server_stats = Arc::new(TunnelStats::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tunnel_address = listener.local_addr().unwrap();
        let server = Arc::new(TunnelServer::new(
            TestCredentials::new(&ca, "mesh.test", "node-b"),
            Arc::new(PolicyStore::new(snapshot)),
            "node-b",
            TunnelSettings::default(),
            Arc::clone(&server_stats),
        ));
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(server.serve(listener, stopped));
        let credentials = TestCredentials::new(&ca, "mesh.test", "node-a");
        let client_stats = Arc::new(TunnelStats::default());
        let tunnel = TunnelClient::new(
            Some(Arc::clone(&credentials) as Arc<dyn TlsCredentials>),
            TunnelSettings::default(),
            Arc::clone(&client_stats),
        );
        let dialer = Arc::new(Dialer::new(
            "node-a",
            Duration::from_secs(2),
            Arc::new(tunnel),
            PeerDirectory::new([("node-b".to_owned(), tunnel_address)]),
        ));
        let pool = Http1Pool::with_dialer(dialer, Duration::from_secs(90), 8);
        let source: Arc<str> = Arc::from("client");
        let three_requests = || async {
            for _ in 0..3 {
                let response = pool
                    .send_as(&source, address, Some("node-b"), get())
                    .await
                    .unwrap();
                assert_eq!(body_text(response).await, "hello");
            }
        };
        three_requests().await;
        assert_eq!(client_stats.snapshot().client_connections, 1);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

        credentials.renew(&SpiffeId::for_agent("mesh.test", "client").unwrap());
        three_requests().await;
        let snapshot = client_stats.snapshot();
        assert_eq!(snapshot.client_connections, 2, "{snapshot:?}");
        assert_eq!(snapshot.client_connections_retired, 1, "{snapshot:?}");
        // One new upstream connection (on the new tunnel stream), reused after that.
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(pool.idle(), 1);
        // The old upstream connection was dropped, so the old tunnel connection closes.
        let start = std::time::Instant::now();
        while server_stats.snapshot().server_connections_active != 1 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{:?}",
                server_stats.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
