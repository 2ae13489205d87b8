//! Mesh resource types (`Agent`, `AccessPolicy`, `TrafficPolicy`) as operators write them, the
//! `AgentInstance` records node agents write for registered workloads, their
//! defaults, and the per-resource validation whose messages name the resource, the field path and
//! the problem. Cross-resource checks (duplicate hosts, unknown fallbacks) live in the snapshot.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::SocketAddr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::PolicyError;

/// `apiVersion` of every mesh resource.
pub const API_VERSION: &str = "mesh.agentmesh.dev/v1alpha1";
/// Namespace used when `metadata.namespace` is absent.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Largest number of retry attempts a `TrafficPolicy` may ask for.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;

/// Resource kinds this module understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Agent,
    AccessPolicy,
    TrafficPolicy,
    /// A live instance of an agent, written by its node agent (registration API), held by a
    /// lease in etcd.
    AgentInstance,
}

impl Kind {
    /// The `kind` string as written in a manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Agent => "Agent",
            Kind::AccessPolicy => "AccessPolicy",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::AgentInstance => "AgentInstance",
        }
    }

    /// Parses a `kind` string (exact, case-sensitive as in Kubernetes).
    pub fn parse(kind: &str) -> Option<Kind> {
        match kind {
            "Agent" => Some(Kind::Agent),
            "AccessPolicy" => Some(Kind::AccessPolicy),
            "TrafficPolicy" => Some(Kind::TrafficPolicy),
            "AgentInstance" => Some(Kind::AgentInstance),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of a resource: kind, namespace and name. Two resources with the same key conflict.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// `metadata` of a resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

impl Metadata {
    /// Metadata with a name in the default namespace and no labels.
    pub fn named(name: &str) -> Self {
        Metadata {
            name: name.to_owned(),
            namespace: default_namespace(),
            labels: BTreeMap::new(),
        }
    }
}

/// One resource of any kind: `apiVersion`, `kind`, `metadata` and a kind-specific `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TypedResource<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: S,
}

/// A registry entry: where an agent listens and what it can do.
pub type Agent = TypedResource<AgentSpec>;
/// Who may call an agent, and with which L7 attributes.
pub type AccessPolicy = TypedResource<AccessPolicySpec>;
/// How calls to an agent are carried: timeouts, retries, rate limits, priority, circuit breaking.
pub type TrafficPolicy = TypedResource<TrafficPolicySpec>;
/// A live instance of an agent on one node, written by that node's agent.
pub type AgentInstance = TypedResource<AgentInstanceSpec>;

/// Any resource this module understands.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Resource {
    Agent(Agent),
    AccessPolicy(AccessPolicy),
    TrafficPolicy(TrafficPolicy),
    AgentInstance(AgentInstance),
}

impl Resource {
    /// The resource's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Agent(_) => Kind::Agent,
            Resource::AccessPolicy(_) => Kind::AccessPolicy,
            Resource::TrafficPolicy(_) => Kind::TrafficPolicy,
            Resource::AgentInstance(_) => Kind::AgentInstance,
        }
    }

    /// The resource's metadata.
    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::Agent(r) => &r.metadata,
            Resource::AccessPolicy(r) => &r.metadata,
            Resource::TrafficPolicy(r) => &r.metadata,
            Resource::AgentInstance(r) => &r.metadata,
        }
    }

    /// Kind, namespace and name.
    pub fn key(&self) -> ResourceKey {
        let meta = self.metadata();
        ResourceKey {
            kind: self.kind(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
        }
    }

    /// Checks everything that can be checked on this resource alone. Returns every problem found,
    /// each naming the resource, the field path and the problem.
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        let mut check = Checker::new(&self.key());
        match self {
            Resource::Agent(r) => {
                r.check_header(&mut check, Kind::Agent);
                r.spec.validate(&mut check);
            }
            Resource::AccessPolicy(r) => {
                r.check_header(&mut check, Kind::AccessPolicy);
                r.spec.validate(&mut check);
            }
            Resource::TrafficPolicy(r) => {
                r.check_header(&mut check, Kind::TrafficPolicy);
                r.spec.validate(&mut check);
            }
            Resource::AgentInstance(r) => {
                r.check_header(&mut check, Kind::AgentInstance);
                r.spec.validate(&mut check, &r.metadata.name);
            }
        }
        check.finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Agent

/// Wire protocol an agent speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(alias = "HTTP")]
    Http,
    #[serde(alias = "MCP")]
    Mcp,
    #[serde(alias = "A2A")]
    A2a,
    #[serde(alias = "GRPC", alias = "gRPC")]
    Grpc,
}

/// `spec` of an `Agent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentSpec {
    /// Host names (case-insensitive, no port) that route to this agent, besides its own name.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Instances; at least one.
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub capabilities: Capabilities,
    /// Name of another `Agent` with the same capability to fail over to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

/// One instance of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpec {
    pub address: SocketAddr,
    /// Relative load-balancing weight; 0 drains the instance.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The mesh node the instance runs on (its `Node` record's name). Absent: reachable
    /// directly from every node (an address outside the mesh, or a single-node mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

fn default_weight() -> u32 {
    1
}

/// What an agent offers: MCP tools and A2A skills, by exact name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Capabilities {
    pub mcp_tools: Vec<String>,
    pub a2a_skills: Vec<String>,
}

impl AgentSpec {
    fn validate(&self, check: &mut Checker) {
        let mut seen = HashSet::new();
        for (i, host) in self.hosts.iter().enumerate() {
            let field = format!("spec.hosts[{i}]");
            match host_problem(host) {
                Some(problem) => check.fail(&field, problem),
                None => {
                    if !seen.insert(normalize_host(host)) {
                        check.fail(&field, format!("duplicate host `{host}`"));
                    }
                }
            }
        }
        if self.endpoints.is_empty() {
            check.fail("spec.endpoints", "at least one endpoint is required");
        }
        let mut addresses = HashSet::new();
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if endpoint.address.port() == 0 {
                check.fail(
                    &format!("spec.endpoints[{i}].address"),
                    "port 0 is not a valid port",
                );
            }
            if !addresses.insert(endpoint.address) {
                check.fail(
                    &format!("spec.endpoints[{i}].address"),
                    format!("duplicate endpoint {}", endpoint.address),
                );
            }
        }
        check_names(
            check,
            "spec.capabilities.mcpTools",
            &self.capabilities.mcp_tools,
        );
        check_names(
            check,
            "spec.capabilities.a2aSkills",
            &self.capabilities.a2a_skills,
        );
        if let Some(fallback) = &self.fallback {
            if let Some(problem) = name_problem(fallback, 253) {
                check.fail("spec.fallback", problem);
            } else if *fallback == check.key.name {
                check.fail("spec.fallback", "an agent cannot fall back to itself");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// AgentInstance

/// Availability of a registered instance, as its node's active probe last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Health {
    /// Not probed yet: no traffic, not discovered.
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

impl Health {
    /// Whether the instance gets traffic and is discovered.
    pub fn is_healthy(self) -> bool {
        self == Health::Healthy
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "Unknown",
            Health::Healthy => "Healthy",
            Health::Unhealthy => "Unhealthy",
        }
    }
}

/// `spec` of an `AgentInstance`: one registered, live instance of an agent. Its name is
/// `<agent>.<node>.<id>`, so instances of one agent on several nodes never share a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentInstanceSpec {
    /// The agent this is an instance of (merged into the `Agent` of that name, or an agent of
    /// its own when there is none).
    pub agent: String,
    /// The node whose agent registered it (and probes it).
    pub node: String,
    /// Where the instance listens.
    pub address: SocketAddr,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub capabilities: Capabilities,
    /// The workload's SPIFFE ID, `spiffe://<trust-domain>/agent/<agent>`.
    pub identity: String,
    /// HTTP path probed with GET; absent: a TCP connect is the probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_path: Option<String>,
    #[serde(default)]
    pub health: Health,
    /// When the instance registered (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_at: Option<String>,
}

impl AgentInstanceSpec {
    fn validate(&self, check: &mut Checker, name: &str) {
        if let Some(problem) = name_problem(&self.agent, 253) {
            check.fail("spec.agent", problem);
        }
        if let Some(problem) = name_problem(&self.node, 253) {
            check.fail("spec.node", problem);
        }
        let expected = format!("{}.{}.", self.agent, self.node);
        if !name.starts_with(&expected) || name.len() == expected.len() {
            check.fail(
                "metadata.name",
                format!("must be `<agent>.<node>.<id>` (`{expected}<id>`)"),
            );
        }
        if self.address.port() == 0 {
            check.fail("spec.address", "port 0 is not a valid port");
        }
        if self.address.ip().is_unspecified() || self.address.ip().is_multicast() {
            check.fail("spec.address", "must be a unicast address");
        }
        match self.identity.parse::<crate::identity::SpiffeId>() {
            Ok(id) if id.path() == format!("/agent/{}", self.agent) => {}
            Ok(_) => check.fail(
                "spec.identity",
                format!("must be spiffe://<trust-domain>/agent/{}", self.agent),
            ),
            Err(error) => check.fail("spec.identity", error.to_string()),
        }
        if let Some(path) = &self.health_check_path
            && (!path.starts_with('/')
                || path.len() > 1024
                || path.chars().any(|c| c.is_control() || c.is_whitespace()))
        {
            check.fail(
                "spec.healthCheckPath",
                "must start with `/`, without spaces or control characters (at most 1024 bytes)",
            );
        }
        check_names(
            check,
            "spec.capabilities.mcpTools",
            &self.capabilities.mcp_tools,
        );
        check_names(
            check,
            "spec.capabilities.a2aSkills",
            &self.capabilities.a2a_skills,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// AccessPolicy

/// What a matching policy does. Also the snapshot's default for destinations no `Allow` policy
/// targets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// `spec` of an `AccessPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessPolicySpec {
    /// Agent name, or `*` for every destination (including unregistered ones).
    pub target_agent: String,
    /// With `targetAgent: "*"`: only the agents of this namespace (an `Allow` policy with no
    /// rules is that namespace's default-deny). Absent: the whole mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_namespace: Option<String>,
    #[serde(default)]
    pub action: Action,
    /// An `Allow` policy with no rules allows nothing (it closes its target); a `Deny` policy
    /// with no rules denies nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// One rule: matches when every part it states matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Source workload name patterns; `*` = any. Required.
    pub from: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a2a: Option<A2aMatch>,
}

/// HTTP attributes; an empty list does not constrain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    /// Method patterns, compared case-insensitively.
    pub methods: Vec<String>,
    /// Path patterns (`/api/*`); the query string is not part of the path.
    pub paths: Vec<String>,
}

/// MCP attributes; the part only matches MCP requests. A `tools` list only matches requests
/// naming a tool (`tools/call`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct McpMatch {
    pub methods: Vec<String>,
    pub tools: Vec<String>,
}

/// A2A attributes; the part only matches A2A requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct A2aMatch {
    pub methods: Vec<String>,
}

impl AccessPolicySpec {
    fn validate(&self, check: &mut Checker) {
        if self.target_agent != "*"
            && let Some(problem) = name_problem(&self.target_agent, 253)
        {
            check.fail(
                "spec.targetAgent",
                format!("{problem} (use an agent name or `*`)"),
            );
        }
        if let Some(namespace) = &self.target_namespace {
            if self.target_agent != "*" {
                check.fail(
                    "spec.targetNamespace",
                    "only with targetAgent `*` (a named agent is already in one namespace)",
                );
            } else if let Some(problem) = name_problem(namespace, 63) {
                check.fail("spec.targetNamespace", problem);
            }
        }
        for (r, rule) in self.rules.iter().enumerate() {
            let base = format!("spec.rules[{r}]");
            if rule.from.is_empty() {
                check.fail(
                    &format!("{base}.from"),
                    "at least one source is required (`*` = any)",
                );
            }
            check_patterns(check, &format!("{base}.from"), &rule.from);
            if let Some(http) = &rule.http {
                check_patterns(check, &format!("{base}.http.methods"), &http.methods);
                check_patterns(check, &format!("{base}.http.paths"), &http.paths);
                for (i, path) in http.paths.iter().enumerate() {
                    if path != "*" && !path.starts_with('/') {
                        check.fail(
                            &format!("{base}.http.paths[{i}]"),
                            "a path pattern must start with `/` (or be `*`)",
                        );
                    }
                }
            }
            if let Some(mcp) = &rule.mcp {
                check_patterns(check, &format!("{base}.mcp.methods"), &mcp.methods);
                check_patterns(check, &format!("{base}.mcp.tools"), &mcp.tools);
            }
            if let Some(a2a) = &rule.a2a {
                check_patterns(check, &format!("{base}.a2a.methods"), &a2a.methods);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TrafficPolicy

/// `spec` of a `TrafficPolicy`. Every section is optional and defaults sensibly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// Agent name, or `*` for every agent without a specific `TrafficPolicy`.
    pub target_agent: String,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub retries: Retries,
    #[serde(default)]
    pub rate_limits: Vec<RateLimitSpec>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    #[serde(default)]
    pub dedup: Dedup,
    /// L7 routes, first match wins: requests to the target agent that match go to the
    /// route's backend agents (weighted split). No match: the target agent itself.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    #[serde(default = "default_max_body")]
    pub max_request_body_bytes: u64,
}

/// Default `maxRequestBodyBytes`: 4 MiB.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 4 * 1024 * 1024;

fn default_max_body() -> u64 {
    DEFAULT_MAX_REQUEST_BODY_BYTES
}

/// Timeouts, as humantime strings (`5s`, `250ms`, `1m 30s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// Establishing a connection to an instance (> 0).
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// One request, first byte sent to last byte received, including retries (> 0).
    #[serde(with = "humantime_serde")]
    pub request: Duration,
    /// A connection with no traffic (> 0).
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// A streaming response (SSE, gRPC streams, WebSocket); 0 = no limit.
    #[serde(with = "humantime_serde")]
    pub stream: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
            idle: Duration::from_secs(300),
            stream: Duration::ZERO,
        }
    }
}

/// Conditions under which a request is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RetryOn {
    ConnectFailure,
    Reset,
    Status5xx,
    Status503,
    Timeout,
}

/// Retry settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first try (0..=10).
    pub attempts: u32,
    /// First backoff; doubles per retry, with jitter, up to `backoffMax`.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Retries may add at most this percentage of the request rate (0..=100).
    pub budget_percent: u32,
    /// Defaults to connect failures, resets and 503: failures where the request was not
    /// processed, so retrying non-idempotent agent calls is safe.
    pub retry_on: Vec<RetryOn>,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: 2,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_secs(1),
            budget_percent: 20,
            retry_on: vec![RetryOn::ConnectFailure, RetryOn::Reset, RetryOn::Status503],
        }
    }
}

/// A token-bucket limit per (source workload, destination agent[, tool]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Source workload pattern; `*` = any. Each matching source gets its own bucket.
    #[serde(default = "star")]
    pub from: String,
    /// Restrict the limit to calls of one MCP tool (or A2A skill); absent = every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// Sustained rate (> 0).
    pub requests_per_second: f64,
    /// Bucket size (>= 1).
    pub burst: u32,
}

fn star() -> String {
    "*".to_owned()
}

/// Scheduling class of a request.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum PriorityClass {
    High,
    #[default]
    Normal,
    Low,
}

/// Priority settings: under saturation (`maxConcurrent` requests in flight to the agent),
/// requests wait in per-class queues and the highest class is served first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Priority {
    pub default_class: PriorityClass,
    /// Classes by source workload (first match wins), before `defaultClass`.
    pub sources: Vec<PrioritySource>,
    /// Whether a caller may choose its class with the `x-mesh-priority` header.
    pub header_allowed: bool,
    /// Requests in flight to the agent at once (this node); 0 = no limit, no queueing.
    pub max_concurrent: u32,
    /// Requests queued per agent before new ones are shed (>= 1).
    pub max_queue: u32,
}

/// The class of requests from the sources `from` matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrioritySource {
    pub from: String,
    pub class: PriorityClass,
}

impl Default for Priority {
    fn default() -> Self {
        Priority {
            default_class: PriorityClass::Normal,
            sources: Vec::new(),
            header_allowed: false,
            max_concurrent: 0,
            max_queue: 128,
        }
    }
}

/// Deduplication: identical requests (same `Idempotency-Key`, or the same JSON-RPC request
/// of the same source and session) reach the upstream once and share its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Dedup {
    /// How long a finished response answers duplicates; 0 turns deduplication off.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Largest response body kept for duplicates; a larger one is not shared (duplicates
    /// that arrive after it overflowed get 503 with `Retry-After`).
    pub max_response_bytes: u64,
}

impl Default for Dedup {
    fn default() -> Self {
        Dedup {
            window: Duration::from_secs(5),
            max_response_bytes: 1024 * 1024,
        }
    }
}

/// Outlier ejection per instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Consecutive failures that eject an instance; 0 disables ejection.
    pub consecutive_failures: u32,
    /// How long an ejected instance stays out (> 0).
    #[serde(with = "humantime_serde")]
    pub ejection_time: Duration,
    /// At most this percentage of an agent's instances are ejected at once (0..=100).
    pub max_ejected_percent: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            consecutive_failures: 5,
            ejection_time: Duration::from_secs(10),
            max_ejected_percent: 50,
        }
    }
}

impl Default for TrafficPolicySpec {
    fn default() -> Self {
        TrafficPolicySpec {
            target_agent: star(),
            timeouts: Timeouts::default(),
            retries: Retries::default(),
            rate_limits: Vec::new(),
            priority: Priority::default(),
            circuit_breaker: CircuitBreaker::default(),
            dedup: Dedup::default(),
            routes: Vec::new(),
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
        }
    }
}

/// One L7 route of a `TrafficPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    /// What the request must look like; every stated part must match (empty: anything).
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// Agents that serve matching requests, chosen by weight (at least one).
    pub backends: Vec<RouteBackend>,
}

/// The request attributes a route matches on (patterns: exact, `*`, `prefix*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    pub paths: Vec<String>,
    /// HTTP methods, case-insensitive.
    pub methods: Vec<String>,
    /// Request headers that must be present with a matching value (names case-insensitive).
    pub headers: Vec<HeaderMatch>,
    /// MCP tool (or prompt, or resource URI) the request names.
    pub mcp_tools: Vec<String>,
    /// A2A methods.
    pub a2a_methods: Vec<String>,
}

/// A header a route requires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

/// A backend agent of a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteBackend {
    pub agent: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

impl TrafficPolicySpec {
    fn validate(&self, check: &mut Checker) {
        if self.target_agent != "*"
            && let Some(problem) = name_problem(&self.target_agent, 253)
        {
            check.fail(
                "spec.targetAgent",
                format!("{problem} (use an agent name or `*`)"),
            );
        }
        let t = &self.timeouts;
        for (field, value) in [
            ("spec.timeouts.connect", t.connect),
            ("spec.timeouts.request", t.request),
            ("spec.timeouts.idle", t.idle),
        ] {
            if value.is_zero() {
                check.fail(field, "must be greater than zero");
            }
        }
        if !t.stream.is_zero() && t.stream < t.request {
            check.fail(
                "spec.timeouts.stream",
                "must be 0 (no limit) or at least spec.timeouts.request",
            );
        }
        let r = &self.retries;
        if r.attempts > MAX_RETRY_ATTEMPTS {
            check.fail(
                "spec.retries.attempts",
                format!(
                    "{} is more than the maximum of {MAX_RETRY_ATTEMPTS}",
                    r.attempts
                ),
            );
        }
        if r.attempts > 0 && r.backoff_base.is_zero() {
            check.fail(
                "spec.retries.backoffBase",
                "must be greater than zero when retrying",
            );
        }
        if r.backoff_max < r.backoff_base {
            check.fail(
                "spec.retries.backoffMax",
                "must be at least spec.retries.backoffBase",
            );
        }
        if r.budget_percent > 100 {
            check.fail("spec.retries.budgetPercent", "must be between 0 and 100");
        }
        let mut seen = HashSet::new();
        for (i, limit) in self.rate_limits.iter().enumerate() {
            let base = format!("spec.rateLimits[{i}]");
            if let Err(problem) = Pattern::parse(&limit.from) {
                check.fail(&format!("{base}.from"), problem);
            }
            if let Some(tool) = &limit.tool
                && tool.trim().is_empty()
            {
                check.fail(&format!("{base}.tool"), "empty tool name");
            }
            if !(limit.requests_per_second.is_finite() && limit.requests_per_second > 0.0) {
                check.fail(
                    &format!("{base}.requestsPerSecond"),
                    "must be a finite number greater than zero",
                );
            }
            if limit.burst == 0 {
                check.fail(&format!("{base}.burst"), "must be at least 1");
            }
            if !seen.insert((limit.from.as_str(), limit.tool.as_deref())) {
                check.fail(&base, "duplicate limit for the same `from` and `tool`");
            }
        }
        if self.priority.max_queue == 0 {
            check.fail("spec.priority.maxQueue", "must be at least 1");
        }
        for (index, source) in self.priority.sources.iter().enumerate() {
            if let Err(problem) = Pattern::parse(&source.from) {
                check.fail(&format!("spec.priority.sources[{index}].from"), problem);
            }
        }
        for (index, route) in self.routes.iter().enumerate() {
            let base = format!("spec.routes[{index}]");
            let patterns = [
                ("paths", &route.matches.paths),
                ("methods", &route.matches.methods),
                ("mcpTools", &route.matches.mcp_tools),
                ("a2aMethods", &route.matches.a2a_methods),
            ];
            for (field, list) in patterns {
                for (position, pattern) in list.iter().enumerate() {
                    if let Err(problem) = Pattern::parse(pattern) {
                        check.fail(&format!("{base}.match.{field}[{position}]"), problem);
                    }
                }
            }
            for (position, header) in route.matches.headers.iter().enumerate() {
                if http::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
                    check.fail(
                        &format!("{base}.match.headers[{position}].name"),
                        "not a valid HTTP header name",
                    );
                }
                if let Err(problem) = Pattern::parse(&header.value) {
                    check.fail(&format!("{base}.match.headers[{position}].value"), problem);
                }
            }
            if route.backends.is_empty() {
                check.fail(
                    &format!("{base}.backends"),
                    "at least one backend is needed",
                );
            }
            if !route.backends.is_empty()
                && route.backends.iter().all(|backend| backend.weight == 0)
            {
                check.fail(&format!("{base}.backends"), "every weight is 0");
            }
            for (position, backend) in route.backends.iter().enumerate() {
                if backend.agent.is_empty() {
                    check.fail(
                        &format!("{base}.backends[{position}].agent"),
                        "empty agent name",
                    );
                }
            }
        }
        if self.dedup.max_response_bytes == 0 && !self.dedup.window.is_zero() {
            check.fail(
                "spec.dedup.maxResponseBytes",
                "must be greater than zero while deduplication is on",
            );
        }
        let cb = &self.circuit_breaker;
        if cb.consecutive_failures > 0 && cb.ejection_time.is_zero() {
            check.fail(
                "spec.circuitBreaker.ejectionTime",
                "must be greater than zero",
            );
        }
        if cb.max_ejected_percent > 100 {
            check.fail(
                "spec.circuitBreaker.maxEjectedPercent",
                "must be between 0 and 100",
            );
        }
        if self.max_request_body_bytes == 0 {
            check.fail("spec.maxRequestBodyBytes", "must be greater than zero");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Patterns

/// A match pattern: exact, `*` (anything) or a trailing-`*` prefix (`fs_*`, `/api/*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
}

impl Pattern {
    /// Parses a pattern; the error is the problem, ready for a validation message.
    pub fn parse(text: &str) -> Result<Pattern, &'static str> {
        if text.is_empty() {
            return Err("empty pattern");
        }
        if text.trim() != text {
            return Err("leading or trailing whitespace in pattern");
        }
        if text == "*" {
            return Ok(Pattern::Any);
        }
        match text.find('*') {
            None => Ok(Pattern::Exact(text.to_owned())),
            Some(at) if at == text.len() - 1 => Ok(Pattern::Prefix(text[..at].to_owned())),
            Some(_) => Err("`*` is only allowed alone or at the end of a pattern"),
        }
    }

    /// Case-sensitive match.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(exact) => value == exact,
            Pattern::Prefix(prefix) => value.starts_with(prefix.as_str()),
        }
    }

    /// ASCII case-insensitive match (HTTP methods).
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(exact) => value.eq_ignore_ascii_case(exact),
            Pattern::Prefix(prefix) => value
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix)),
        }
    }

    /// Higher is more specific: exact, then longer prefixes, then `*`.
    pub fn specificity(&self) -> usize {
        match self {
            Pattern::Any => 0,
            Pattern::Prefix(prefix) => 1 + prefix.len(),
            Pattern::Exact(_) => usize::MAX,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validation helpers

/// Collects the problems of one resource.
pub(crate) struct Checker {
    key: ResourceKey,
    label: String,
    errors: Vec<PolicyError>,
}

impl Checker {
    pub(crate) fn new(key: &ResourceKey) -> Self {
        Checker {
            key: key.clone(),
            label: key.to_string(),
            errors: Vec::new(),
        }
    }

    pub(crate) fn fail(&mut self, field: &str, problem: impl Into<String>) {
        self.errors.push(PolicyError::Invalid {
            resource: self.label.clone(),
            field: field.to_owned(),
            problem: problem.into(),
        });
    }

    pub(crate) fn finish(self) -> Result<(), Vec<PolicyError>> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors)
        }
    }
}

impl<S> TypedResource<S> {
    /// Checks what every kind shares: `apiVersion`, `kind` (against the `expected` one) and
    /// `metadata`.
    fn check_header(&self, check: &mut Checker, expected: Kind) {
        let (api_version, kind, meta) = (&self.api_version, &self.kind, &self.metadata);
        if api_version != API_VERSION {
            check.fail(
                "apiVersion",
                format!("`{api_version}` is not supported (expected `{API_VERSION}`)"),
            );
        }
        if kind != expected.as_str() {
            check.fail(
                "kind",
                format!("`{kind}` does not match the {expected} spec"),
            );
        }
        if let Some(problem) = name_problem(&meta.name, 253) {
            check.fail("metadata.name", problem);
        }
        if let Some(problem) = name_problem(&meta.namespace, 63) {
            check.fail("metadata.namespace", problem);
        }
        for key in meta.labels.keys() {
            if key.is_empty() || key.len() > 317 {
                check.fail("metadata.labels", format!("invalid label key `{key}`"));
            }
        }
    }
}

fn check_patterns(check: &mut Checker, field: &str, patterns: &[String]) {
    for (i, pattern) in patterns.iter().enumerate() {
        if let Err(problem) = Pattern::parse(pattern) {
            check.fail(&format!("{field}[{i}]"), problem);
        }
    }
}

fn check_names(check: &mut Checker, field: &str, names: &[String]) {
    let mut seen = HashSet::new();
    for (i, name) in names.iter().enumerate() {
        if name.trim().is_empty() {
            check.fail(&format!("{field}[{i}]"), "empty name");
        } else if !seen.insert(name.as_str()) {
            check.fail(&format!("{field}[{i}]"), format!("duplicate `{name}`"));
        }
    }
}

/// Kubernetes-style name (RFC 1123 subdomain): lowercase letters, digits, `-` and `.`, starting
/// and ending with a letter or digit.
pub(crate) fn name_problem(name: &str, max: usize) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".to_owned());
    }
    if name.len() > max {
        return Some(format!("longer than {max} characters"));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let edge = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let first = name.chars().next().is_some_and(edge);
    let last = name.chars().next_back().is_some_and(edge);
    if !name.chars().all(ok_char) || !first || !last {
        return Some(format!(
            "`{name}` is not a valid name (lowercase letters, digits, `-` and `.`, starting and \
             ending with a letter or digit)"
        ));
    }
    None
}

/// A host name as written in `spec.hosts`: letters, digits, `-`, `_`, `.`; no port.
fn host_problem(host: &str) -> Option<String> {
    if host.is_empty() {
        return Some("empty host".to_owned());
    }
    if host.len() > 253 {
        return Some("host longer than 253 characters".to_owned());
    }
    if host.contains(':') {
        return Some(format!("`{host}` must not include a port"));
    }
    let ok = host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok || host.starts_with('.') || host.starts_with('-') {
        return Some(format!("`{host}` is not a valid host name"));
    }
    None
}

/// Lowercases and drops a trailing dot, so `Tools.Mesh.Local.` and `tools.mesh.local` are equal.
pub(crate) fn normalize_host(host: &str) -> String {
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}
