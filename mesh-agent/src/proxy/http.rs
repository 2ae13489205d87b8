//! The L7 path for HTTP/1.1 and HTTP/2 (h2c, gRPC) on captured connections: per request it
//! resolves the destination in the registry (by `Host`/`:authority`, else by the original
//! destination address), extracts MCP and A2A JSON-RPC attributes from bounded request bodies,
//! checks the policy snapshot and rate limits, picks an endpoint, and forwards through pooled
//! upstream connections with timeouts and budgeted retries. Responses, SSE streams included,
//! are passed through frame by frame with no added buffering; WebSocket upgrades are joined
//! into a two-way byte pipe.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use rand::Rng;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use super::{
    balance::{Balancer, Outcome},
    dedup::{self, Deduplicator, Role, follow},
    dialer::{DialError, Dialer, Upstream},
    h1_client::{self, HOP_BY_HOP},
    h1_server,
    jsonrpc::{self, JsonRpcRequest, Message},
    prefixed::PrefixedStream,
    priority::{Admission, class_of},
    request_headers::{KnownHeaders, RequestHeaders, RequestParts},
    reused_timer,
    upstream::{Http1Pool, PooledBody, SendError, UpstreamKey},
};
use crate::{
    fast_map::FastHashMap,
    policy::{
        AgentEntry, PolicySnapshot, PolicyStore, RateLimit, RateLimitKey, RateLimiter,
        RequestAttributes, RetryOn, RouteRequest, TrafficSettings,
    },
    tunnel::TunnelError,
};

/// Error type of proxied bodies.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;
/// A request or response body as the proxy carries it: streamed or buffered.
pub type ProxyBody = BoxBody<Bytes, BodyError>;

/// Longest idle time of a pooled upstream connection.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// Idle upstream connections kept per endpoint.
const POOL_MAX_IDLE_PER_ENDPOINT: usize = 256;
/// Window over which the retry budget compares retries with requests.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Retries always allowed per window, so a quiet destination can still retry.
const BUDGET_MIN_RETRIES: u64 = 10;
/// Largest bodyless-or-small request body buffered so it can be retried, when the body is not
/// JSON (JSON bodies are buffered up to the traffic policy's limit for inspection).
const RETRY_BUFFER: u64 = 64 * 1024;

/// Which HTTP version the client spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// Who is calling and where it meant to go, from the kernel.
#[derive(Debug, Clone)]
pub struct CallerContext {
    /// The source workload's name (its identity for policy).
    pub source: Arc<str>,
    /// The destination the workload dialled.
    pub original_dst: SocketAddr,
}

/// Counters of the L7 path.
#[derive(Debug, Default)]
pub struct HttpStats {
    requests: AtomicU64,
    denied: AtomicU64,
    rate_limited: AtomicU64,
    retries: AtomicU64,
    upstream_errors: AtomicU64,
    timeouts: AtomicU64,
    rejected: AtomicU64,
    mcp_requests: AtomicU64,
    a2a_requests: AtomicU64,
    websocket_upgrades: AtomicU64,
    shed: AtomicU64,
    deduplicated: AtomicU64,
}

/// A point-in-time copy of [`HttpStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HttpStatsSnapshot {
    pub requests: u64,
    pub denied: u64,
    pub rate_limited: u64,
    pub retries: u64,
    pub upstream_errors: u64,
    pub timeouts: u64,
    pub rejected: u64,
    pub mcp_requests: u64,
    pub a2a_requests: u64,
    pub websocket_upgrades: u64,
    pub shed: u64,
    pub deduplicated: u64,
}

impl HttpStats {
    pub fn snapshot(&self) -> HttpStatsSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        HttpStatsSnapshot {
            requests: load(&self.requests),
            denied: load(&self.denied),
            rate_limited: load(&self.rate_limited),
            retries: load(&self.retries),
            upstream_errors: load(&self.upstream_errors),
            timeouts: load(&self.timeouts),
            rejected: load(&self.rejected),
            mcp_requests: load(&self.mcp_requests),
            a2a_requests: load(&self.a2a_requests),
            websocket_upgrades: load(&self.websocket_upgrades),
            shed: load(&self.shed),
            deduplicated: load(&self.deduplicated),
        }
    }
}

/// Retries against requests over a sliding window, per destination.
#[derive(Debug)]
struct RetryBudget {
    window_start: Instant,
    requests: u64,
    retries: u64,
}

impl RetryBudget {
    fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            requests: 0,
            retries: 0,
        }
    }

    fn roll(&mut self, now: Instant) {
        if now.duration_since(self.window_start) >= BUDGET_WINDOW {
            *self = Self::new(now);
        }
    }

    fn record_request(&mut self, now: Instant) {
        self.roll(now);
        self.requests += 1;
    }

    /// Takes one retry if the budget allows it.
    fn try_retry(&mut self, now: Instant, percent: u32) -> bool {
        self.roll(now);
        let allowed = (self.requests * u64::from(percent) / 100).max(BUDGET_MIN_RETRIES);
        if self.retries < allowed {
            self.retries += 1;
            true
        } else {
            false
        }
    }
}

/// Whose retry budget: a registered agent's, or an unregistered destination address's.
#[derive(Debug, Clone, Copy)]
enum BudgetKey<'a> {
    Agent(&'a str),
    Address(SocketAddr),
}

/// Retry budgets of every destination; looking one up allocates nothing once it exists.
#[derive(Debug, Default)]
struct RetryBudgets {
    /// hashbrown's map: its `entry_ref` finds or makes a budget in one lookup.
    agents: hashbrown::HashMap<String, RetryBudget, foldhash::fast::RandomState>,
    addresses: FastHashMap<SocketAddr, RetryBudget>,
}

impl RetryBudgets {
    /// Destinations remembered before idle ones are forgotten.
    const MAX: usize = 65_536;

    /// The budget of `key`, made when missing (`None` cannot happen: it is there once
    /// inserted).
    fn get(&mut self, key: BudgetKey<'_>, now: Instant) -> Option<&mut RetryBudget> {
        if self.agents.len() + self.addresses.len() > Self::MAX {
            // Bounded memory: forget idle destinations.
            let live =
                |budget: &mut RetryBudget| now.duration_since(budget.window_start) < BUDGET_WINDOW;
            self.agents.retain(|_, budget| live(budget));
            self.addresses.retain(|_, budget| live(budget));
        }
        match key {
            // Only a new destination's name is copied.
            BudgetKey::Agent(name) => Some(
                self.agents
                    .entry_ref(name)
                    .or_insert_with(|| RetryBudget::new(now)),
            ),
            BudgetKey::Address(address) => Some(
                self.addresses
                    .entry(address)
                    .or_insert_with(|| RetryBudget::new(now)),
            ),
        }
    }
}

/// The L7 proxy shared by all captured HTTP connections.
pub struct HttpProxy {
    policy: Arc<PolicyStore>,
    limiter: RateLimiter,
    http1: Client<HttpConnector, ProxyBody>,
    http2: Client<HttpConnector, ProxyBody>,
    /// HTTP/1.1 upstream connections (HTTP/2 and upgrades go through `http1`/`http2`).
    pool: Http1Pool,
    /// Direct or tunnelled connections; upgrades to endpoints on other nodes use it per
    /// request (HTTP/1.1 goes through `pool`, which uses it too).
    dialer: Arc<Dialer>,
    /// HTTP/2 connections to endpoints on other nodes, by endpoint and source.
    /// With each: whether its tunnel connection is still current (not reused once retired).
    tunnel_h2: Mutex<FastHashMap<UpstreamKey, PooledH2>>,
    balancer: Balancer,
    sessions: SessionAffinity,
    admission: Arc<Admission>,
    dedup: Arc<Deduplicator>,
    budgets: Mutex<RetryBudgets>,
    stats: HttpStats,
}

impl std::fmt::Debug for HttpProxy {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("HttpProxy")
            .field("stats", &self.stats.snapshot())
            .finish_non_exhaustive()
    }
}

/// Why a request got no upstream response.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        endpoint: SocketAddr,
        reason: String,
    },
    #[error("{endpoint} failed: {reason}")]
    Failed {
        endpoint: SocketAddr,
        reason: String,
    },
    #[error("{endpoint} did not answer within {timeout:?}")]
    Timeout {
        endpoint: SocketAddr,
        timeout: Duration,
    },
    #[error("no endpoint of agent {0} is available")]
    NoEndpoint(String),
    /// The endpoint's node refused the caller (its own policy, through the tunnel).
    #[error("{reason}")]
    Refused {
        endpoint: SocketAddr,
        reason: String,
    },
}

/// What one request is, for policy, telemetry and retries: the headers the proxy acts on
/// (borrowed from the request's), and what its body says.
#[derive(Debug, Default)]
struct RequestFacts<'h> {
    headers: KnownHeaders<'h>,
    jsonrpc: Option<JsonRpcRequest>,
    grpc: bool,
}

impl RequestFacts<'_> {
    fn first(&self) -> Option<&Message> {
        self.jsonrpc
            .as_ref()
            .and_then(|request| request.messages.first())
    }
}

impl HttpProxy {
    /// An L7 proxy whose upstreams are all dialled directly (endpoints registered on another
    /// node fail closed).
    pub fn new(policy: Arc<PolicyStore>, connect_timeout: Duration) -> Self {
        let dialer = Arc::new(Dialer::direct("", connect_timeout));
        Self::with_dialer(policy, connect_timeout, dialer)
    }

    /// An L7 proxy reaching endpoints through `dialer`.
    pub fn with_dialer(
        policy: Arc<PolicyStore>,
        connect_timeout: Duration,
        dialer: Arc<Dialer>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_ENDPOINT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new());
        let http1 = builder.build(connector.clone());
        let http2 = builder.http2_only(true).build(connector);
        Self {
            policy,
            limiter: RateLimiter::default(),
            http1,
            http2,
            pool: Http1Pool::with_dialer(
                Arc::clone(&dialer),
                POOL_IDLE,
                POOL_MAX_IDLE_PER_ENDPOINT,
            ),
            dialer,
            tunnel_h2: Mutex::new(FastHashMap::default()),
            balancer: Balancer::default(),
            sessions: SessionAffinity::default(),
            admission: Arc::new(Admission::default()),
            dedup: Arc::new(Deduplicator::default()),
            budgets: Mutex::new(RetryBudgets::default()),
            stats: HttpStats::default(),
        }
    }

    pub fn stats(&self) -> HttpStatsSnapshot {
        self.stats.snapshot()
    }

    /// Whether the balancer has ejected the endpoint at `address` after failed requests.
    pub fn endpoint_ejected(&self, address: std::net::SocketAddr) -> bool {
        self.balancer.is_ejected(address)
    }

    /// Serves one client connection (already known to speak `version`) until it closes.
    /// HTTP/1.1 starts on the in-task server ([`h1_server`]), which hands the connection to
    /// hyper's at the first request it does not serve itself; HTTP/2 is hyper's.
    pub async fn serve_connection<S>(
        self: Arc<Self>,
        stream: S,
        version: HttpVersion,
        caller: CallerContext,
    ) -> Result<(), ServeError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let caller = Arc::new(caller);
        if version == HttpVersion::Http1 {
            let (proxy, caller_ref) = (&self, &caller);
            let served = h1_server::serve(stream, |request: h1_server::ServedRequest| {
                let parts = RequestParts {
                    method: request.method,
                    uri: request.uri,
                    version: http::Version::HTTP_11,
                    headers: RequestHeaders::Raw(request.headers),
                    extensions: http::Extensions::new(),
                };
                // Boxed: the connection's future would otherwise keep room for a request's
                // state (about 3.5 KiB) while it waits idle between requests.
                Box::pin(proxy.handle(
                    caller_ref,
                    parts,
                    RequestBody::Inline(request.body),
                    HttpVersion::Http1,
                ))
            })
            .await?;
            let (io, buffered) = match served {
                h1_server::Served::Closed => return Ok(()),
                h1_server::Served::Handoff { io, buffered } => (io, buffered),
            };
            let service = self.hyper_service(caller, version);
            return Box::pin(
                hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(h1_server::HEADER_READ_TIMEOUT)
                    .max_buf_size(1 << 20)
                    .serve_connection(TokioIo::new(PrefixedStream::new(buffered, io)), service)
                    .with_upgrades(),
            )
            .await
            .map_err(ServeError::Hyper);
        }
        let service = self.hyper_service(caller, version);
        // Boxed: the HTTP/2 connection state is several times the HTTP/1.1 one, and unboxed
        // it would size every connection's task, HTTP/1.1 ones included.
        Box::pin(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service),
        )
        .await
        .map_err(ServeError::Hyper)
    }

    /// The proxy as a hyper service, for the connections hyper's server serves.
    fn hyper_service(
        self: Arc<Self>,
        caller: Arc<CallerContext>,
        version: HttpVersion,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<ProxyBody>,
        Error = Infallible,
        Future = HandlerFuture,
    > + Clone {
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let proxy = Arc::clone(&self);
            let caller = Arc::clone(&caller);
            // Boxed: hyper keeps room for one in-flight future per connection for the
            // connection's whole life, so an idle keep-alive connection would hold a
            // request's worth of state (about 3 KiB) it does not use.
            Box::pin(async move {
                let (parts, body) = request.into_parts();
                Ok::<_, Infallible>(
                    proxy
                        .handle(&caller, parts.into(), RequestBody::Hyper(body), version)
                        .await,
                )
            }) as HandlerFuture
        })
    }

    async fn handle(
        &self,
        caller: &CallerContext,
        mut parts: RequestParts,
        incoming: RequestBody,
        version: HttpVersion,
    ) -> Response<ProxyBody> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let snapshot = self.policy.current();
        let headers = parts.headers.known();
        let destination = request_host(&parts.uri, headers.host)
            .and_then(|host| snapshot.agent_by_host(host))
            .or_else(|| snapshot.agent_by_address(caller.original_dst));
        let traffic = snapshot.traffic(destination.map_or("", |agent| agent.name.as_str()));
        let client_upgrade = if headers.is_websocket_upgrade(parts.version) {
            // hyper's server gives every HTTP/1.1 request with `Upgrade` the means to switch
            // (the raw HTTP/1.1 server hands such requests to it).
            let Some(upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
                debug!(source = %caller.source, "WebSocket upgrade on a connection that cannot switch protocols");
                return plain_error(
                    StatusCode::BAD_REQUEST,
                    "WebSocket upgrade on a connection that cannot switch protocols",
                );
            };
            Some(upgrade)
        } else {
            None
        };

        // Read what policy needs to see before a byte goes upstream.
        let mut facts = RequestFacts {
            headers,
            grpc: headers.is_grpc(),
            jsonrpc: None,
        };
        let body = match inspect_body(&parts, &mut facts, incoming, traffic).await {
            Ok(inspected) => inspected,
            Err(response) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                return response;
            }
        };
        match facts.first().map(|message| message.protocol) {
            Some(jsonrpc::Family::Mcp) => self.stats.mcp_requests.fetch_add(1, Ordering::Relaxed),
            Some(jsonrpc::Family::A2a) => self.stats.a2a_requests.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        if let Some(response) = check_mcp_headers(&facts) {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return response;
        }

        let destination_name = destination.map(|agent| agent.name.as_str());
        if let Some(response) = self.authorize(&snapshot, caller, destination_name, &parts, &facts)
        {
            return response;
        }
        // Identical requests reach the upstream once; duplicates share the answer.
        let admission_key: std::borrow::Cow<'_, str> = match destination_name {
            Some(name) => name.into(),
            None => caller.original_dst.to_string().into(),
        };
        let deduplicate = !traffic.dedup.window.is_zero() && client_upgrade.is_none();
        let leader = match deduplicate
            .then(|| dedup_key(caller, &admission_key, &parts, &body, &facts))
            .flatten()
        {
            Some(key) => match self.dedup.join(
                key,
                traffic.dedup.window,
                traffic.dedup.max_response_bytes,
                Instant::now(),
            ) {
                Role::Leader(leader) => Some(leader),
                Role::Follower(shared) => {
                    self.stats.deduplicated.fetch_add(1, Ordering::Relaxed);
                    debug!(source = %caller.source, destination = %admission_key, "duplicate request; sharing the original's response");
                    return match follow(shared, traffic.timeouts.request).await {
                        Ok(response) => response,
                        Err(error) => error_for(
                            &facts,
                            StatusCode::SERVICE_UNAVAILABLE,
                            jsonrpc::UNAVAILABLE,
                            &error.to_string(),
                            GrpcCode::Unavailable,
                            Some(Duration::from_secs(1)),
                        ),
                    };
                }
            },
            None => None,
        };
        if let Some(response) = self.rate_limit(caller, destination_name, traffic, &facts) {
            return response;
        }
        // Priority admission: under saturation, the highest class is served first.
        let admitted = if traffic.priority.max_concurrent == 0 {
            // No limit: admitted at once, no queue to wait in (and no class to find).
            Ok(Ok(None))
        } else {
            let class = class_of(
                traffic,
                &caller.source,
                KnownHeaders::text(facts.headers.priority),
            );
            tokio::time::timeout(
                traffic.timeouts.request,
                self.admission
                    .admit(&admission_key, class, &traffic.priority),
            )
            .await
        };
        let slot = match admitted {
            Ok(Ok(slot)) => slot,
            Ok(Err(shed)) => return self.shed(caller, &admission_key, &facts, &shed.to_string()),
            Err(_) => {
                return self.shed(
                    caller,
                    &admission_key,
                    &facts,
                    "waited in the priority queue past the request timeout",
                );
            }
        };
        if let Some(client_upgrade) = client_upgrade {
            // Boxed, like the other paths off the common one (HTTP/2, CONNECT, streamed
            // bodies): inline, their futures would size (and be copied with) every request's.
            return Box::pin(self.upgrade(
                caller,
                destination,
                parts,
                client_upgrade,
                body,
                traffic,
            ))
            .await;
        }
        let response = self
            .forward(
                caller,
                &snapshot,
                destination,
                &parts,
                body,
                &facts,
                traffic,
                version,
            )
            .await;
        let response = match leader {
            Some(leader) => leader.publish(response),
            None => response,
        };
        // A streamed answer (SSE, gRPC stream) may last at most `timeouts.stream`.
        let stream_limit = traffic.timeouts.stream;
        let response = if stream_limit.is_zero() {
            response
        } else {
            response.map(|body| {
                DeadlineBody {
                    inner: body,
                    deadline: Box::pin(tokio::time::sleep(stream_limit)),
                    limit: stream_limit,
                }
                .boxed()
            })
        };
        match slot {
            // The slot is held until the response body has been passed on in full.
            Some(slot) => response.map(|body| {
                body.map_frame(move |frame| {
                    let _held = &slot;
                    frame
                })
                .boxed()
            }),
            None => response,
        }
    }

    /// Refuses a request the priority queues could not take: 503 with `Retry-After`.
    fn shed(
        &self,
        caller: &CallerContext,
        destination: &str,
        facts: &RequestFacts,
        reason: &str,
    ) -> Response<ProxyBody> {
        self.stats.shed.fetch_add(1, Ordering::Relaxed);
        info!(source = %caller.source, destination, reason, "request shed");
        error_for(
            facts,
            StatusCode::SERVICE_UNAVAILABLE,
            jsonrpc::UNAVAILABLE,
            &format!("shed by the mesh: {reason}"),
            GrpcCode::Unavailable,
            Some(Duration::from_secs(1)),
        )
    }

    fn authorize(
        &self,
        snapshot: &PolicySnapshot,
        caller: &CallerContext,
        destination: Option<&str>,
        parts: &RequestParts,
        facts: &RequestFacts,
    ) -> Option<Response<ProxyBody>> {
        let method = parts.method.as_str();
        let path = parts.uri.path();
        let mut attributes = RequestAttributes {
            source: &caller.source,
            destination,
            http_method: method,
            path,
            mcp_method: None,
            mcp_tool: None,
            a2a_method: None,
        };
        let messages: &[Message] = facts
            .jsonrpc
            .as_ref()
            .map_or(&[], |request| request.messages.as_slice());
        // Every message of a batch must be allowed; a body without messages is checked once.
        let checks = messages
            .iter()
            .map(Some)
            .chain(messages.is_empty().then_some(None));
        for message in checks {
            attributes.mcp_method = None;
            attributes.mcp_tool = None;
            attributes.a2a_method = None;
            if let Some(message) = message {
                match message.protocol {
                    jsonrpc::Family::Mcp => {
                        attributes.mcp_method = message.method.as_deref();
                        attributes.mcp_tool = message.tool.as_deref();
                    }
                    jsonrpc::Family::A2a => attributes.a2a_method = message.method.as_deref(),
                    jsonrpc::Family::Unknown => {}
                }
            }
            let verdict = snapshot.check(&attributes);
            if !verdict.allowed {
                let decision = verdict.decision(&attributes);
                self.stats.denied.fetch_add(1, Ordering::Relaxed);
                warn!(
                    source = %caller.source,
                    destination = destination.unwrap_or("(unregistered)"),
                    original_dst = %caller.original_dst,
                    method, path,
                    mcp_method = attributes.mcp_method, mcp_tool = attributes.mcp_tool,
                    a2a_method = attributes.a2a_method,
                    policy = decision.policy.as_deref().unwrap_or("(default)"),
                    reason = %decision.reason,
                    "request denied by policy"
                );
                let detail = format!("denied by mesh policy: {}", decision.reason);
                return Some(error_for(
                    facts,
                    StatusCode::FORBIDDEN,
                    jsonrpc::FORBIDDEN,
                    &detail,
                    GrpcCode::PermissionDenied,
                    None,
                ));
            }
        }
        None
    }

    fn rate_limit(
        &self,
        caller: &CallerContext,
        destination: Option<&str>,
        traffic: &TrafficSettings,
        facts: &RequestFacts,
    ) -> Option<Response<ProxyBody>> {
        let tool = facts.first().and_then(|message| message.tool.as_deref());
        let destination_key = destination.unwrap_or("");
        let key = RateLimitKey {
            source: &caller.source,
            destination: destination_key,
            tool,
        };
        match self.limiter.check(traffic, &key, Instant::now()) {
            Ok(()) => None,
            Err(retry_after) => {
                self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                info!(source = %caller.source, destination = destination_key, tool, ?retry_after, "request rate-limited");
                Some(error_for(
                    facts,
                    StatusCode::TOO_MANY_REQUESTS,
                    jsonrpc::RATE_LIMITED,
                    "rate limit of the mesh exceeded",
                    GrpcCode::ResourceExhausted,
                    Some(retry_after),
                ))
            }
        }
    }

    /// Sends the request upstream with timeouts and budgeted retries, then passes the
    /// response back as it streams in.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        caller: &CallerContext,
        snapshot: &PolicySnapshot,
        destination: Option<&AgentEntry>,
        parts: &RequestParts,
        body: Body,
        facts: &RequestFacts<'_>,
        traffic: &TrafficSettings,
        version: HttpVersion,
    ) -> Response<ProxyBody> {
        let retryable_request = body.is_buffered()
            && (is_idempotent(&parts.method) || facts.headers.idempotency_key.is_some());
        let budget_key = destination.map_or(BudgetKey::Address(caller.original_dst), |agent| {
            BudgetKey::Agent(&agent.name)
        });
        self.with_budget(budget_key, |budget| budget.record_request(Instant::now()));
        // An L7 route of the destination's traffic policy may send the request elsewhere.
        let message = facts.first();
        // Header maps are built for routes that match on headers only.
        let route_headers = if traffic.routes_read_headers() {
            match parts.headers.to_map() {
                Ok(map) => map,
                Err(reason) => return plain_error(StatusCode::BAD_REQUEST, reason),
            }
        } else {
            std::borrow::Cow::Owned(HeaderMap::new())
        };
        let routed = traffic.route(
            &RouteRequest {
                method: parts.method.as_str(),
                path: parts.uri.path(),
                headers: &route_headers,
                mcp_tool: message
                    .filter(|message| message.protocol == jsonrpc::Family::Mcp)
                    .and_then(|message| message.tool.as_deref()),
                a2a_method: message
                    .filter(|message| message.protocol == jsonrpc::Family::A2a)
                    .and_then(|message| message.method.as_deref()),
            },
            |total| rand::rng().random_range(0..total),
        );
        let destination = match routed {
            Some(backend) => match snapshot.agent(backend) {
                Some(agent) => {
                    debug!(source = %caller.source, backend, "routed by the traffic policy");
                    Some(agent)
                }
                None => {
                    self.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    return error_for(
                        facts,
                        StatusCode::SERVICE_UNAVAILABLE,
                        jsonrpc::UNAVAILABLE,
                        &UpstreamError::NoEndpoint(backend.to_owned()).to_string(),
                        GrpcCode::Unavailable,
                        None,
                    );
                }
            },
            None => destination,
        };
        let timeout = request_timeout(&facts.headers, traffic);
        let mut body = Some(body);
        // Endpoints tried so far (a few at most, unless the policy allows many retries).
        let mut tried: smallvec::SmallVec<[SocketAddr; 4]> = smallvec::SmallVec::new();
        let mut attempt: u32 = 0;
        let session = KnownHeaders::text(facts.headers.mcp_session);
        let mut agent = destination;
        let mut failed_over = false;
        loop {
            // An MCP session stays on the instance that issued it, while that one serves.
            let pinned = agent.zip(session).and_then(|(agent, session)| {
                let address = self.sessions.endpoint(&agent.name, session)?;
                self.balancer
                    .pick_pinned(agent, address, &tried, Instant::now())
            });
            let pick = pinned.or_else(|| {
                agent.and_then(|agent| {
                    self.balancer
                        .pick(agent, &tried, &traffic.circuit_breaker, Instant::now())
                })
            });
            let endpoint = match (&pick, agent) {
                (Some(pick), _) => Some(pick.address()),
                (None, Some(_)) => None,
                (None, None) => Some(caller.original_dst),
            };
            let Some(endpoint) = endpoint else {
                // No endpoint of this agent is available: fail over to its fallback, once.
                if let Some(fallback) = fallback_once(snapshot, caller, agent, &mut failed_over) {
                    agent = Some(fallback);
                    tried.clear();
                    continue;
                }
                let error = UpstreamError::NoEndpoint(
                    agent.map_or_else(|| caller.original_dst.to_string(), |a| a.name.clone()),
                );
                self.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                return error_for(
                    facts,
                    StatusCode::SERVICE_UNAVAILABLE,
                    jsonrpc::UNAVAILABLE,
                    &error.to_string(),
                    GrpcCode::Unavailable,
                    None,
                );
            };
            tried.push(endpoint);
            let node = node_of_endpoint(agent, endpoint);
            let this_body = match body.as_ref() {
                Some(Body::Buffered(bytes)) => Body::Buffered(bytes.clone()),
                _ => body.take().unwrap_or(Body::Buffered(Bytes::new())),
            };
            let outcome = self
                .send(
                    parts,
                    facts.headers.host.is_some(),
                    this_body,
                    (endpoint, node.as_deref(), &caller.source),
                    timeout,
                    facts.grpc || version == HttpVersion::Http2,
                )
                .await;
            if let Some(pick) = pick {
                let health = match &outcome {
                    Ok(response) if !is_gateway_failure(response.status()) => Outcome::Success,
                    // A refusal by the endpoint's node is policy, not the endpoint failing.
                    Err(UpstreamError::Refused { .. }) => Outcome::Success,
                    _ => Outcome::Failure,
                };
                self.balancer.record(pick, health, &traffic.circuit_breaker);
            }
            if let (Some(agent), Ok(response)) = (agent, &outcome) {
                self.sessions
                    .observe(&agent.name, &parts.method, session, response, endpoint);
            }
            let failure = match outcome {
                Ok(response) => {
                    let status = response.status();
                    let retry_status = (status.is_server_error()
                        && traffic.retries.retry_on.contains(&RetryOn::Status5xx))
                        || (status == StatusCode::SERVICE_UNAVAILABLE
                            && traffic.retries.retry_on.contains(&RetryOn::Status503));
                    if !retry_status {
                        return response.map(|incoming| incoming.map_err(BodyError::from).boxed());
                    }
                    Attempt::Status(response)
                }
                Err(error) => Attempt::Error(error),
            };
            let retry_on_error = match &failure {
                Attempt::Error(UpstreamError::Connect { .. }) => {
                    traffic.retries.retry_on.contains(&RetryOn::ConnectFailure)
                }
                Attempt::Error(UpstreamError::Timeout { .. }) => {
                    traffic.retries.retry_on.contains(&RetryOn::Timeout)
                }
                Attempt::Error(UpstreamError::Failed { .. }) => {
                    traffic.retries.retry_on.contains(&RetryOn::Reset)
                }
                Attempt::Error(UpstreamError::NoEndpoint(_) | UpstreamError::Refused { .. }) => {
                    false
                }
                Attempt::Status(_) => true,
            };
            // A connect failure sent nothing, so it is safe to repeat whatever the method.
            let safe = retryable_request
                || (matches!(failure, Attempt::Error(UpstreamError::Connect { .. }))
                    && body.is_some());
            let can_retry = retry_on_error
                && safe
                && attempt < traffic.retries.attempts
                && self.with_budget(budget_key, |budget| {
                    budget.try_retry(Instant::now(), traffic.retries.budget_percent)
                });
            if !can_retry {
                // Out of tries here: an agent's fallback (same capability, named by policy)
                // gets the request when the failure left it safe to send again.
                if retry_on_error
                    && safe
                    && let Some(fallback) = fallback_once(snapshot, caller, agent, &mut failed_over)
                {
                    agent = Some(fallback);
                    tried.clear();
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                return match failure {
                    Attempt::Status(response) => {
                        response.map(|incoming| incoming.map_err(BodyError::from).boxed())
                    }
                    Attempt::Error(error) => self.upstream_failure(caller, facts, &error),
                };
            }
            attempt += 1;
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            let delay = backoff(attempt, traffic);
            debug!(source = %caller.source, %endpoint, attempt, ?delay, "retrying request");
            tokio::time::sleep(delay).await;
            if let Some(agent) = agent
                && tried.len() >= agent.endpoints.len()
            {
                // Every endpoint had its try: go round again.
                tried.clear();
            }
        }
    }

    fn upstream_failure(
        &self,
        caller: &CallerContext,
        facts: &RequestFacts,
        error: &UpstreamError,
    ) -> Response<ProxyBody> {
        let (status, code) = match error {
            UpstreamError::Timeout { .. } => {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                (StatusCode::GATEWAY_TIMEOUT, GrpcCode::DeadlineExceeded)
            }
            UpstreamError::NoEndpoint(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, GrpcCode::Unavailable)
            }
            UpstreamError::Connect { .. } | UpstreamError::Failed { .. } => {
                (StatusCode::BAD_GATEWAY, GrpcCode::Unavailable)
            }
            UpstreamError::Refused { .. } => (StatusCode::FORBIDDEN, GrpcCode::PermissionDenied),
        };
        let rpc_code = if matches!(error, UpstreamError::Refused { .. }) {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
            warn!(source = %caller.source, original_dst = %caller.original_dst, %error, "request refused by the destination's node");
            jsonrpc::FORBIDDEN
        } else {
            self.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
            warn!(source = %caller.source, original_dst = %caller.original_dst, %error, "upstream request failed");
            jsonrpc::UNAVAILABLE
        };
        error_for(facts, status, rpc_code, &error.to_string(), code, None)
    }

    /// Sends to `target` (endpoint address, its node, the source workload).
    async fn send(
        &self,
        parts: &RequestParts,
        has_host: bool,
        body: Body,
        target: (SocketAddr, Option<&str>, &Arc<str>),
        timeout: Duration,
        http2: bool,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let (endpoint, node, source) = target;
        let sent = if (http2 || parts.method == Method::CONNECT) && self.dialer.is_remote(node) {
            Box::pin(self.send_unpooled(parts, body, target, timeout, http2)).await?
        } else if http2 || parts.method == Method::CONNECT {
            Box::pin(self.send_legacy(parts, body, endpoint, timeout, http2)).await?
        } else {
            // HTTP/1.1 through the endpoint-keyed pool: origin-form target, `Host` kept (or
            // made from the URI's authority, else the endpoint).
            let host = || {
                parts
                    .uri
                    .authority()
                    .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok())
                    .or_else(|| HeaderValue::from_str(&host_of(endpoint)).ok())
            };
            let sent = match body {
                // A small body in hand (none, or one the proxy inspected): sent with its head in
                // one write and answered in this task, on a raw connection. A larger one goes
                // through hyper's client, which reads an early answer (a 413, say) while the
                // body is still going out.
                Body::Buffered(bytes) if bytes.len() <= h1_client::INLINE_BODY => {
                    let target = parts
                        .uri
                        .path_and_query()
                        .map_or("/", http::uri::PathAndQuery::as_str);
                    let target = if target.is_empty() { "/" } else { target };
                    let host = if has_host { None } else { host() };
                    let send = self.pool.send_buffered_as(
                        source,
                        endpoint,
                        node,
                        &parts.method,
                        target,
                        &parts.headers,
                        host.as_ref(),
                        &bytes,
                        reused_timer::deadline_after(timeout),
                    );
                    // The pool bounds the exchange itself, on a timer each connection keeps.
                    Ok(send.await)
                }
                body => {
                    let mut headers =
                        forwarded_headers(&parts.headers, false).map_err(|reason| {
                            UpstreamError::Failed {
                                endpoint,
                                reason: reason.to_owned(),
                            }
                        })?;
                    if !headers.contains_key(header::HOST)
                        && let Some(host) = host()
                    {
                        headers.insert(header::HOST, host);
                    }
                    let mut request = Request::new(body.into_proxy_body());
                    *request.method_mut() = parts.method.clone();
                    *request.uri_mut() = origin_form(&parts.uri);
                    *request.headers_mut() = headers;
                    let send = Box::pin(self.pool.send_as(source, endpoint, node, request));
                    tokio::time::timeout(timeout, send).await
                }
            };
            match sent {
                Err(_) => return Err(UpstreamError::Timeout { endpoint, timeout }),
                Ok(Ok(response)) => response,
                Ok(Err(SendError::Connect(reason))) => {
                    return Err(UpstreamError::Connect { endpoint, reason });
                }
                Ok(Err(SendError::Refused(reason))) => {
                    return Err(UpstreamError::Refused { endpoint, reason });
                }
                Ok(Err(SendError::TimedOut)) => {
                    return Err(UpstreamError::Timeout { endpoint, timeout });
                }
                // Both are transparent: the chain is the underlying error's.
                Ok(Err(error @ (SendError::Failed(_) | SendError::Exchange(_)))) => {
                    return Err(UpstreamError::Failed {
                        endpoint,
                        reason: error_chain(&error),
                    });
                }
            }
        };
        let (mut parts, body) = sent.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body))
    }

    /// HTTP/2 and `CONNECT` to an endpoint on another node: one connection per request
    /// through the tunnel (the tunnel's own connection to the peer is pooled).
    async fn send_unpooled(
        &self,
        parts: &RequestParts,
        body: Body,
        target: (SocketAddr, Option<&str>, &Arc<str>),
        timeout: Duration,
        http2: bool,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let (endpoint, node, source) = target;
        let uri = if http2 {
            upstream_uri(parts, endpoint)
        } else {
            parts.uri.to_string()
        };
        let request = upstream_request(parts, uri, body, endpoint, http2)?;
        let dial = || async {
            self.dialer
                .connect(source, endpoint, node)
                .await
                .map_err(|error| match error {
                    DialError::Tunnel(TunnelError::Denied { .. }) => UpstreamError::Refused {
                        endpoint,
                        reason: error.to_string(),
                    },
                    other => UpstreamError::Connect {
                        endpoint,
                        reason: other.to_string(),
                    },
                })
        };
        let failed = |error: hyper::Error| UpstreamError::Failed {
            endpoint,
            reason: error_chain(&error),
        };
        let sent = tokio::time::timeout(timeout, async {
            if !http2 {
                return request_over(dial().await?, request).await.map_err(failed);
            }
            // HTTP/2 multiplexes: one connection per (endpoint, source) carries every request.
            let key = UpstreamKey {
                endpoint,
                via: Some(Arc::clone(source)),
            };
            let pooled = self
                .tunnel_h2
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&key)
                .filter(|pooled| usable_h2(pooled))
                .map(|(sender, _)| sender.clone());
            let mut sender = match pooled {
                Some(sender) => sender,
                None => {
                    let stream = dial().await?;
                    let freshness = stream.freshness();
                    let sender = h2_connection(stream).await.map_err(failed)?;
                    let mut pool = self
                        .tunnel_h2
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    // Dropping a closed or retired sender lets its connection end once its
                    // requests are done.
                    pool.retain(|_, pooled| usable_h2(pooled));
                    pool.insert(key, (sender.clone(), freshness));
                    sender
                }
            };
            sender.ready().await.map_err(failed)?;
            sender.send_request(request).await.map_err(failed)
        })
        .await;
        match sent {
            Err(_) => Err(UpstreamError::Timeout { endpoint, timeout }),
            Ok(result) => result.map(|response| response.map(PooledBody::unpooled)),
        }
    }

    /// HTTP/2 (h2c, gRPC) and `CONNECT` go through hyper-util's pooled client.
    async fn send_legacy(
        &self,
        parts: &RequestParts,
        body: Body,
        endpoint: SocketAddr,
        timeout: Duration,
        http2: bool,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let request =
            upstream_request(parts, upstream_uri(parts, endpoint), body, endpoint, http2)?;
        let client = if http2 { &self.http2 } else { &self.http1 };
        let sent = tokio::time::timeout(timeout, client.request(request)).await;
        match sent {
            Err(_) => Err(UpstreamError::Timeout { endpoint, timeout }),
            Ok(Ok(response)) => Ok(response.map(PooledBody::unpooled)),
            Ok(Err(error)) if error.is_connect() => Err(UpstreamError::Connect {
                endpoint,
                reason: error_chain(&error),
            }),
            Ok(Err(error)) => Err(UpstreamError::Failed {
                endpoint,
                reason: error_chain(&error),
            }),
        }
    }

    /// Joins a client's WebSocket upgrade with the upstream's: the handshake goes through
    /// policy like any request, then frames flow both ways as bytes, with backpressure.
    async fn upgrade(
        &self,
        caller: &CallerContext,
        destination: Option<&AgentEntry>,
        parts: RequestParts,
        client_upgrade: hyper::upgrade::OnUpgrade,
        body: Body,
        traffic: &TrafficSettings,
    ) -> Response<ProxyBody> {
        let pick = destination.and_then(|agent| {
            self.balancer
                .pick(agent, &[], &traffic.circuit_breaker, Instant::now())
        });
        let endpoint = match (&pick, destination) {
            (Some(pick), _) => pick.address(),
            (None, None) => caller.original_dst,
            (None, Some(agent)) => {
                return plain_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &UpstreamError::NoEndpoint(agent.name.clone()).to_string(),
                );
            }
        };
        let mut upstream_request = match Request::builder()
            .method(parts.method.clone())
            .uri(upstream_uri(&parts, endpoint))
            .body(body.into_proxy_body())
        {
            Ok(built) => built,
            Err(error) => return plain_error(StatusCode::BAD_REQUEST, &error.to_string()),
        };
        // Keep Connection/Upgrade: they are the point of this request.
        *upstream_request.headers_mut() = match parts.headers.to_map() {
            Ok(map) => map.into_owned(),
            Err(reason) => return plain_error(StatusCode::BAD_REQUEST, reason),
        };
        let node = node_of_endpoint(destination, endpoint);
        let sent = tokio::time::timeout(traffic.timeouts.request, async {
            if self.dialer.is_remote(node.as_deref()) {
                *upstream_request.uri_mut() = origin_form(upstream_request.uri());
                let stream = self
                    .dialer
                    .connect(&caller.source, endpoint, node.as_deref())
                    .await
                    .map_err(|error| error.to_string())?;
                request_over(stream, upstream_request)
                    .await
                    .map_err(|error| error_chain(&error))
            } else {
                self.http1
                    .request(upstream_request)
                    .await
                    .map_err(|error| error_chain(&error))
            }
        })
        .await;
        if let Some(pick) = pick {
            let health = match &sent {
                Ok(Ok(response)) if !is_gateway_failure(response.status()) => Outcome::Success,
                _ => Outcome::Failure,
            };
            self.balancer.record(pick, health, &traffic.circuit_breaker);
        }
        let mut response = match sent {
            Ok(Ok(response)) => response,
            Ok(Err(reason)) => {
                return self.upstream_failure(
                    caller,
                    &RequestFacts::default(),
                    &UpstreamError::Connect { endpoint, reason },
                );
            }
            Err(_) => {
                return self.upstream_failure(
                    caller,
                    &RequestFacts::default(),
                    &UpstreamError::Timeout {
                        endpoint,
                        timeout: traffic.timeouts.request,
                    },
                );
            }
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return response.map(|incoming| incoming.map_err(BodyError::from).boxed());
        }
        self.stats
            .websocket_upgrades
            .fetch_add(1, Ordering::Relaxed);
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let source = Arc::clone(&caller.source);
        tokio::spawn(async move {
            let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok(both) => both,
                Err(error) => {
                    warn!(%source, %endpoint, %error, "WebSocket upgrade failed");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                Ok((sent, received)) => {
                    debug!(%source, %endpoint, sent, received, "WebSocket closed");
                }
                Err(error) => debug!(%source, %endpoint, %error, "WebSocket ended with an error"),
            }
        });
        let (parts, _) = response.into_parts();
        Response::from_parts(parts, empty_body())
    }

    fn with_budget<T>(&self, key: BudgetKey<'_>, action: impl FnOnce(&mut RetryBudget) -> T) -> T {
        let now = Instant::now();
        let mut budgets = self
            .budgets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match budgets.get(key, now) {
            Some(budget) => action(budget),
            None => action(&mut RetryBudget::new(now)),
        }
    }
}

/// The node an endpoint of `agent` runs on (none for an unregistered destination).
fn node_of_endpoint(agent: Option<&AgentEntry>, endpoint: SocketAddr) -> Option<Arc<str>> {
    agent
        .and_then(|agent| {
            agent
                .endpoints
                .iter()
                .find(|candidate| candidate.address == endpoint)
        })
        .and_then(|found| found.node.clone())
}

/// A tunnelled HTTP/2 upstream connection and the freshness of its tunnel connection.
type PooledH2 = (
    hyper::client::conn::http2::SendRequest<ProxyBody>,
    Option<crate::tunnel::Freshness>,
);

/// Whether a pooled tunnelled HTTP/2 connection may take new requests: open, and its tunnel
/// connection not retired.
fn usable_h2((sender, freshness): &PooledH2) -> bool {
    !sender.is_closed()
        && freshness
            .as_ref()
            .is_none_or(crate::tunnel::Freshness::is_current)
}

/// An HTTP/2 connection over `stream`, driven by a task of its own.
async fn h2_connection(
    stream: Upstream,
) -> Result<hyper::client::conn::http2::SendRequest<ProxyBody>, hyper::Error> {
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(%error, "tunnelled HTTP/2 upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// Sends one HTTP/1.1 request on a connection of its own over `stream` (the connection ends
/// with the response, or carries the upgraded protocol).
async fn request_over(
    stream: Upstream,
    request: Request<ProxyBody>,
) -> Result<Response<Incoming>, hyper::Error> {
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            debug!(%error, "tunnelled upstream connection ended with an error");
        }
    });
    sender.send_request(request).await
}

/// Buffers a JSON request body (bounded by the traffic policy) and extracts its JSON-RPC
/// messages; buffers small bodies of other requests so they can be retried; streams the rest
/// (gRPC, large or unknown-length bodies) untouched.
async fn inspect_body(
    parts: &RequestParts,
    facts: &mut RequestFacts<'_>,
    body: RequestBody,
    traffic: &TrafficSettings,
) -> Result<Body, Response<ProxyBody>> {
    let headers = &facts.headers;
    let json = KnownHeaders::text(headers.content_type).is_some_and(jsonrpc::is_json_content_type);
    let declared = headers.content_length();
    let limit = if json {
        traffic.max_request_body_bytes
    } else {
        RETRY_BUFFER
    };
    let too_large = || {
        plain_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body over the {limit}-byte limit of the mesh"),
        )
    };
    let collected = match body {
        // Read whole by the HTTP/1.1 server already (small, with a Content-Length).
        RequestBody::Inline(bytes) if bytes.is_empty() => {
            return Ok(Body::Buffered(bytes));
        }
        RequestBody::Inline(bytes) if json && bytes.len() as u64 > limit => {
            return Err(too_large());
        }
        RequestBody::Inline(bytes) => bytes,
        RequestBody::Hyper(incoming) => {
            if hyper::body::Body::is_end_stream(&incoming) {
                return Ok(Body::Buffered(Bytes::new()));
            }
            let bufferable = json || declared.is_some_and(|length| length <= limit);
            if !bufferable || facts.grpc {
                return Ok(Body::Streamed(incoming));
            }
            if declared.is_some_and(|length| length > limit) {
                return Err(too_large());
            }
            let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
            match Limited::new(incoming, limit_usize).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                    return Err(too_large());
                }
                Err(error) => {
                    return Err(plain_error(
                        StatusCode::BAD_REQUEST,
                        &format!("reading the request body failed: {error}"),
                    ));
                }
            }
        }
    };
    if json && parts.method == Method::POST {
        match jsonrpc::parse_request(&collected) {
            Ok(parsed) => facts.jsonrpc = Some(parsed),
            Err(error) => debug!(%error, "JSON body is not JSON-RPC; forwarded as plain HTTP"),
        }
    }
    Ok(Body::Buffered(collected))
}

enum Attempt {
    Status(Response<PooledBody>),
    Error(UpstreamError),
}

/// A response body cut off with an error once its stream timeout has passed: the caller sees
/// a failed stream, never a clean but truncated end.
struct DeadlineBody {
    inner: ProxyBody,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BodyError>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            let limit = self.limit;
            return std::task::Poll::Ready(Some(Err(BodyError::from(format!(
                "stream timeout of the mesh ({limit:?}) reached"
            )))));
        }
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request's handling, as hyper's server runs it.
type HandlerFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

/// Why serving a client connection ended in an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Http1(#[from] h1_server::ServerError),
    #[error(transparent)]
    Hyper(hyper::Error),
}

/// A request body as the client's connection delivers it: read whole by the HTTP/1.1
/// server ([`h1_server`]), or streamed by hyper's (HTTP/2, and the HTTP/1.1 requests it
/// takes).
#[derive(Debug)]
pub enum RequestBody {
    Inline(Bytes),
    Hyper(Incoming),
}

/// A request body: buffered (inspectable, repeatable) or streamed straight through.
enum Body {
    Buffered(Bytes),
    Streamed(Incoming),
}

impl Body {
    fn is_buffered(&self) -> bool {
        matches!(self, Self::Buffered(_))
    }

    fn into_proxy_body(self) -> ProxyBody {
        match self {
            Self::Buffered(bytes) if bytes.is_empty() => empty_body(),
            Self::Buffered(bytes) => Full::new(bytes).map_err(|never| match never {}).boxed(),
            Self::Streamed(incoming) => incoming.map_err(BodyError::from).boxed(),
        }
    }
}

pub(crate) fn empty_body() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

fn full_body(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// The deduplication key of a request, if it has one: an `Idempotency-Key` (with the
/// source, destination, method and target), or a single JSON-RPC request with an id (with
/// the source, destination, target, MCP session and the whole body). `initialize` is never
/// shared: each client must get its own session.
fn dedup_key(
    caller: &CallerContext,
    destination: &str,
    parts: &RequestParts,
    body: &Body,
    facts: &RequestFacts,
) -> Option<u64> {
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |path_and_query| path_and_query.as_str());
    let [source, destination, method, target] = [
        caller.source.as_bytes(),
        destination.as_bytes(),
        parts.method.as_str().as_bytes(),
        target.as_bytes(),
    ];
    if let Some(idempotency) = facts.headers.idempotency_key {
        return Some(dedup::key(&[
            source,
            destination,
            method,
            target,
            b"idempotency",
            idempotency,
        ]));
    }
    let request = facts.jsonrpc.as_ref()?;
    let [message] = request.messages.as_slice() else {
        return None;
    };
    let Body::Buffered(bytes) = body else {
        return None;
    };
    if request.batch
        || message.kind != jsonrpc::MessageKind::Request
        || message.method.as_deref() == Some("initialize")
    {
        return None;
    }
    let session = facts.headers.mcp_session.unwrap_or(b"");
    Some(dedup::key(&[
        source,
        destination,
        method,
        target,
        b"jsonrpc",
        session,
        bytes,
    ]))
}

/// The host a request names, without port: `:authority` for HTTP/2 (and absolute-form
/// targets), else `Host`.
fn request_host<'r>(uri: &'r http::Uri, host: Option<&'r [u8]>) -> Option<&'r str> {
    uri.authority()
        .map(http::uri::Authority::host)
        .or_else(|| KnownHeaders::text(host).map(host_without_port))
}

fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|byte| byte.is_ascii_digit()))
        .map_or(host, |(name, _)| name)
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The time allowed for the response headers: the traffic policy's request timeout, shortened
/// by a gRPC deadline (`grpc-timeout`) the caller propagated.
fn request_timeout(headers: &KnownHeaders<'_>, traffic: &TrafficSettings) -> Duration {
    let policy = traffic.timeouts.request;
    KnownHeaders::text(headers.grpc_timeout)
        .and_then(parse_grpc_timeout)
        .map_or(policy, |deadline| deadline.min(policy))
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Exponential backoff with full jitter: uniform in [0, min(max, base * 2^(attempt-1))].
fn backoff(attempt: u32, traffic: &TrafficSettings) -> Duration {
    let base = traffic.retries.backoff_base;
    let ceiling = base
        .checked_mul(1u32 << attempt.saturating_sub(1).min(16))
        .unwrap_or(traffic.retries.backoff_max)
        .min(traffic.retries.backoff_max);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(0..=nanos))
}

/// The MCP session header (Streamable HTTP, 2025-11-25).
static MCP_SESSION_HEADER: HeaderName = HeaderName::from_static("mcp-session-id");
/// Sessions remembered at most; past this the oldest half is forgotten (their requests are
/// then balanced like any other, which a stateless server handles and a stateful one answers
/// with its own "unknown session" error).
const MAX_SESSIONS: usize = 65_536;

/// Which endpoint issued each MCP session: a stateful MCP server only knows its own sessions,
/// so a session's requests go back to the instance that created it.
#[derive(Debug, Default)]
struct SessionAffinity {
    /// Keyed by (agent, session id); SipHash, since a peer chooses session ids. hashbrown's
    /// map, so a lookup takes the request's strings as they are ([`SessionRef`]).
    sessions: Mutex<SessionMap>,
}

/// Where each (agent, session id) was issued, and when.
type SessionMap =
    hashbrown::HashMap<(String, String), (SocketAddr, Instant), std::hash::RandomState>;

/// An (agent, session id) key borrowed from a request: hashes as the owned pair does.
#[derive(Hash)]
struct SessionRef<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<(String, String)> for SessionRef<'_> {
    fn equivalent(&self, key: &(String, String)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

impl SessionAffinity {
    fn endpoint(&self, agent: &str, session: &str) -> Option<SocketAddr> {
        let sessions = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sessions
            .get(&SessionRef(agent, session))
            .map(|(address, _)| *address)
    }

    /// Learns a session from a response that issues one; forgets it when the client ends it
    /// (DELETE) or the server no longer knows it (404).
    fn observe<B>(
        &self,
        agent: &str,
        method: &Method,
        sent_session: Option<&str>,
        response: &Response<B>,
        endpoint: SocketAddr,
    ) {
        let issued = response
            .headers()
            .get(&MCP_SESSION_HEADER)
            .and_then(|value| value.to_str().ok());
        if sent_session.is_none() && issued.is_none() {
            // Nothing to learn or forget (most requests): the shared map is not locked.
            return;
        }
        let mut sessions = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(session) = sent_session
            && (*method == Method::DELETE || response.status() == StatusCode::NOT_FOUND)
        {
            sessions.remove(&SessionRef(agent, session));
            return;
        }
        let Some(issued) = issued.filter(|_| response.status().is_success()) else {
            return;
        };
        if sessions.len() >= MAX_SESSIONS {
            let mut by_age: Vec<Instant> = sessions.values().map(|(_, at)| *at).collect();
            by_age.sort_unstable();
            let cutoff = by_age[by_age.len() / 2];
            sessions.retain(|_, (_, at)| *at > cutoff);
        }
        sessions.insert(
            (agent.to_owned(), issued.to_owned()),
            (endpoint, Instant::now()),
        );
    }
}

/// The fallback agent of `agent` (same capability, named by policy), at most once per
/// request: `failed_over` records that it was used.
fn fallback_once<'s>(
    snapshot: &'s PolicySnapshot,
    caller: &CallerContext,
    agent: Option<&AgentEntry>,
    failed_over: &mut bool,
) -> Option<&'s AgentEntry> {
    if *failed_over {
        return None;
    }
    let agent = agent?;
    let fallback = snapshot.agent(agent.fallback.as_deref()?)?;
    info!(
        source = %caller.source,
        from = %agent.name,
        to = %fallback.name,
        "failing over to the fallback agent"
    );
    *failed_over = true;
    Some(fallback)
}

/// Statuses that say the endpoint (or what stands behind it) is failing, for outlier
/// detection: other errors are the application's answers.
fn is_gateway_failure(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// The request target in origin form (path and query), as an HTTP/1.1 upstream expects it
/// from a client that is not a forward proxy.
fn origin_form(uri: &http::Uri) -> http::Uri {
    match uri.path_and_query() {
        Some(path) if path.as_str() != "/" => http::Uri::from(path.clone()),
        _ => http::Uri::default(),
    }
}

/// `Host` for an endpoint when the caller named none: the address, without the default port.
fn host_of(endpoint: SocketAddr) -> String {
    match (endpoint.port(), endpoint) {
        (80, SocketAddr::V4(v4)) => v4.ip().to_string(),
        (80, SocketAddr::V6(v6)) => format!("[{}]", v6.ip()),
        _ => endpoint.to_string(),
    }
}

/// The request sent upstream: the caller's method, `uri`, the forwarded headers, and on
/// HTTP/1.1 a `Host` taken from the caller's authority when it had none.
fn upstream_request(
    parts: &RequestParts,
    uri: String,
    body: Body,
    endpoint: SocketAddr,
    http2: bool,
) -> Result<Request<ProxyBody>, UpstreamError> {
    let mut request = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .body(body.into_proxy_body())
        .map_err(|error| UpstreamError::Failed {
            endpoint,
            reason: error.to_string(),
        })?;
    *request.headers_mut() =
        forwarded_headers(&parts.headers, http2).map_err(|reason| UpstreamError::Failed {
            endpoint,
            reason: reason.to_owned(),
        })?;
    if !http2
        && !request.headers().contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        request.headers_mut().insert(header::HOST, value);
    }
    Ok(request)
}

fn upstream_uri(parts: &RequestParts, endpoint: SocketAddr) -> String {
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |path_and_query| path_and_query.as_str());
    format!("http://{endpoint}{path}")
}

/// Hop-by-hop headers (RFC 9110, section 7.6.1) are the proxy's business, not the upstream's.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there is none: one pass over the names, no lookup by (parsed) name.
    if !headers
        .keys()
        .any(|name| h1_client::is_hop_by_hop(name.as_str().as_bytes()))
    {
        return;
    }
    let named: Vec<HeaderName> = h1_client::connection_tokens(headers)
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The caller's headers less the hop-by-hop ones, for a request hyper's client sends (a
/// header map of raw fields can only fail to build if httparse let through a field `http`
/// refuses).
fn forwarded_headers(headers: &RequestHeaders, http2: bool) -> Result<HeaderMap, &'static str> {
    let headers = headers.to_map()?;
    let trailers = headers
        .get(header::TE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.contains("trailers"));
    let mut forwarded = headers.into_owned();
    strip_hop_by_hop(&mut forwarded);
    if http2 {
        // The upstream request carries its authority in the URI.
        forwarded.remove(header::HOST);
        if trailers {
            forwarded.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    Ok(forwarded)
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// gRPC status codes the mesh answers with.
#[derive(Debug, Clone, Copy)]
enum GrpcCode {
    ResourceExhausted = 8,
    PermissionDenied = 7,
    Unavailable = 14,
    DeadlineExceeded = 4,
}

fn plain_error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(full_body(format!("{message}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
        .headers_mut()
        .insert("x-mesh-error", HeaderValue::from_static("true"));
    response
}

/// An error in the caller's own protocol: a JSON-RPC error for MCP and A2A (with the
/// request's id), a trailers-only gRPC status for gRPC, plain text otherwise.
fn error_for(
    facts: &RequestFacts,
    status: StatusCode,
    rpc_code: i64,
    message: &str,
    grpc_code: GrpcCode,
    retry_after: Option<Duration>,
) -> Response<ProxyBody> {
    let mut response = if facts.grpc {
        let mut response = Response::new(empty_body());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(grpc_code as u16));
        if let Ok(value) = HeaderValue::from_str(&percent_encode_grpc(message)) {
            headers.insert("grpc-message", value);
        }
        response
    } else if let Some(request) = &facts.jsonrpc {
        // Notifications alone expect no body: the status code says it.
        let body = request.error_body(rpc_code, message, Some(jsonrpc::mesh_error_data(message)));
        // A2A's JSON-RPC binding answers errors in the body of a 200 response, and the A2A
        // SDKs read a JSON-RPC error only from a 2xx response (a 403 would reach the caller as
        // a bare HTTP error, without code, message or id).
        let a2a = body.is_some()
            && request
                .messages
                .iter()
                .any(|message| message.protocol == jsonrpc::Family::A2a);
        let mut response = Response::new(body.map_or_else(empty_body, full_body));
        *response.status_mut() = if a2a { StatusCode::OK } else { status };
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    } else {
        plain_error(status, message)
    };
    if let Some(retry_after) = retry_after {
        let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    }
    response
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
fn percent_encode_grpc(message: &str) -> String {
    let mut encoded = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// The 2026-07-28 MCP generation repeats the method and tool name in headers; a request
/// whose headers disagree with its body is refused (a policy decision on the header alone
/// would otherwise be spoofable).
fn check_mcp_headers(facts: &RequestFacts<'_>) -> Option<Response<ProxyBody>> {
    let method = KnownHeaders::text(facts.headers.mcp_method);
    let name = KnownHeaders::text(facts.headers.mcp_name);
    if method.is_none() && name.is_none() {
        return None;
    }
    let Some(request) = &facts.jsonrpc else {
        return Some(plain_error(
            StatusCode::BAD_REQUEST,
            "Mcp-Method/Mcp-Name headers on a request without a JSON-RPC body",
        ));
    };
    let mismatch = request.check_mcp_headers(method, name).err()?;
    Some(error_for(
        facts,
        StatusCode::BAD_REQUEST,
        jsonrpc::INVALID_REQUEST,
        &mismatch.to_string(),
        GrpcCode::PermissionDenied,
        None,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_learnt_found_by_borrowed_keys_and_forgotten() {
        let affinity = SessionAffinity::default();
        let endpoint: SocketAddr = "10.0.0.7:8080".parse().unwrap();
        let mut issued = Response::new(());
        issued
            .headers_mut()
            .insert(&MCP_SESSION_HEADER, HeaderValue::from_static("s-1"));
        affinity.observe("tools", &Method::POST, None, &issued, endpoint);
        assert_eq!(affinity.endpoint("tools", "s-1"), Some(endpoint));
        assert_eq!(affinity.endpoint("tools", "s-2"), None);
        assert_eq!(affinity.endpoint("other", "s-1"), None);
        // The pair is the key: moving a character between its parts is another key.
        assert_eq!(affinity.endpoint("tool", "ss-1"), None);
        let ended = Response::new(());
        affinity.observe("tools", &Method::DELETE, Some("s-1"), &ended, endpoint);
        assert_eq!(affinity.endpoint("tools", "s-1"), None);
    }

    /// A body that never produces a frame.
    struct Silent;

    impl hyper::body::Body for Silent {
        type Data = Bytes;
        type Error = BodyError;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BodyError>>> {
            std::task::Poll::Pending
        }
    }

    fn with_deadline(inner: ProxyBody, limit: Duration) -> DeadlineBody {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
        }
    }

    #[tokio::test]
    async fn a_ready_body_passes_and_a_waiting_one_is_cut_at_its_deadline() {
        let ready = with_deadline(full_body("all here"), Duration::from_secs(30));
        let collected = ready.collect().await.expect("a ready body").to_bytes();
        assert_eq!(collected, "all here");

        let limit = Duration::from_millis(50);
        let started = tokio::time::Instant::now();
        let waiting = with_deadline(Silent.boxed(), limit);
        let error = waiting.collect().await.expect_err("cut at the deadline");
        assert!(error.to_string().contains("stream timeout"), "{error}");
        assert!(started.elapsed() >= limit, "not cut before its deadline");

        // A body still unread at its deadline is cut, though its frames are ready.
        let mut late = with_deadline(full_body("late"), Duration::from_millis(1));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let frame = std::future::poll_fn(|cx| {
            hyper::body::Body::poll_frame(std::pin::Pin::new(&mut late), cx)
        })
        .await;
        assert!(
            matches!(frame, Some(Err(_))),
            "expired before its first frame"
        );
    }

    #[test]
    fn grpc_timeouts_parse_every_unit_and_reject_garbage() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "1x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hosts_lose_their_port_but_keep_ipv6_brackets_content() {
        assert_eq!(host_without_port("tools.mesh:8080"), "tools.mesh");
        assert_eq!(host_without_port("tools"), "tools");
        assert_eq!(host_without_port("[::1]:80"), "::1");
        assert_eq!(host_without_port("[fd00::2]"), "fd00::2");
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("mcp-session-id", HeaderValue::from_static("abc"));
        strip_hop_by_hop(&mut headers);
        assert!(headers.get("x-secret").is_none());
        assert!(headers.get(header::TRANSFER_ENCODING).is_none());
        assert!(headers.get(header::CONNECTION).is_none());
        assert_eq!(headers.get("mcp-session-id").unwrap(), "abc");
    }

    #[test]
    fn retry_budget_allows_a_floor_then_a_share_of_requests() {
        let start = Instant::now();
        let mut budget = RetryBudget::new(start);
        let granted = (0..100).filter(|_| budget.try_retry(start, 20)).count();
        assert_eq!(granted as u64, BUDGET_MIN_RETRIES, "floor with no requests");
        for _ in 0..200 {
            budget.record_request(start);
        }
        let more = (0..100).filter(|_| budget.try_retry(start, 20)).count();
        assert_eq!(
            more as u64,
            40 - BUDGET_MIN_RETRIES,
            "20% of 200 requests in all"
        );
        let later = start + BUDGET_WINDOW;
        assert!(budget.try_retry(later, 20), "a new window starts afresh");
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(percent_encode_grpc("a b%c\n"), "a b%25c%0A");
    }
}
