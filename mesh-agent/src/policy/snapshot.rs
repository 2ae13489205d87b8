//! The compiled policy snapshot: an immutable, indexed view of the registry (agents by name,
//! host and address), the access policies (authorization per request) and the traffic settings
//! per agent. Built once per configuration change, shared in an `Arc`, read per request.
//!
//! # Registered instances
//!
//! `AgentInstance` records (written by node agents for the workloads that registered with
//! them) are merged into the agents here, the one place every source of resources goes
//! through: an instance adds an endpoint (`node` set to its node; weight 1 when it is
//! `Healthy`, 0 = no traffic otherwise) to the agent of its name, whose capabilities become
//! the union of both; a name with no `Agent` resource becomes an agent of its own. An
//! instance never makes the set fail to compile: one whose name another agent claims as a
//! host, or whose address another agent already serves, is left out with a warning.

use std::{
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use super::{
    Fnv64, PolicyError,
    resources::{
        AccessPolicy, Action, Agent, AgentInstance, Capabilities, CircuitBreaker, Dedup, Kind,
        Pattern, Priority, PriorityClass, Protocol, Resource, ResourceKey, Retries, Timeouts,
        TrafficPolicy, TrafficPolicySpec, normalize_host,
    },
};
use crate::fast_map::FastHashMap;

/// Source of [`PolicySnapshot::generation`]: increases with every snapshot built in the process.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// One instance of an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// Relative weight; 0 = drained.
    pub weight: u32,
    /// The mesh node the instance runs on; `None` when reachable directly from every node.
    pub node: Option<Arc<str>>,
}

/// A registered agent, as the proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEntry {
    pub name: String,
    pub namespace: String,
    /// Normalised (lowercase, no trailing dot) host names, not including the agent's name.
    pub hosts: Vec<String>,
    pub endpoints: Vec<Endpoint>,
    pub protocol: Protocol,
    pub capabilities: Capabilities,
    pub fallback: Option<String>,
}

impl AgentEntry {
    /// Whether the agent offers this MCP tool or A2A skill.
    pub fn has_capability(&self, tool_or_skill: &str) -> bool {
        self.capabilities
            .mcp_tools
            .iter()
            .any(|t| t == tool_or_skill)
            || self
                .capabilities
                .a2a_skills
                .iter()
                .any(|s| s == tool_or_skill)
    }

    fn from_resource(agent: &Agent) -> Self {
        let mut hosts: Vec<String> = Vec::new();
        for host in agent.spec.hosts.iter().map(|h| normalize_host(h)) {
            if host != agent.metadata.name && !hosts.contains(&host) {
                hosts.push(host);
            }
        }
        AgentEntry {
            name: agent.metadata.name.clone(),
            namespace: agent.metadata.namespace.clone(),
            hosts,
            endpoints: agent
                .spec
                .endpoints
                .iter()
                .map(|e| Endpoint {
                    address: e.address,
                    weight: e.weight,
                    node: e.node.as_deref().map(Arc::from),
                })
                .collect(),
            protocol: agent.spec.protocol,
            capabilities: agent.spec.capabilities.clone(),
            fallback: agent.spec.fallback.clone(),
        }
    }
}

/// What the proxy knows about a request when it asks for a decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestAttributes<'a> {
    /// Source workload name (kernel-attested or from the peer's identity).
    pub source: &'a str,
    /// Destination agent name; `None` for an unregistered destination (e.g. a raw IP).
    pub destination: Option<&'a str>,
    /// HTTP method; empty for opaque TCP.
    pub http_method: &'a str,
    /// HTTP path (a query string is ignored); empty for opaque TCP.
    pub path: &'a str,
    /// JSON-RPC method of an MCP request (`tools/call`); `None` when not MCP.
    pub mcp_method: Option<&'a str>,
    /// Tool named by an MCP request (`tools/call` params.name).
    pub mcp_tool: Option<&'a str>,
    /// A2A method (`message/send`); `None` when not A2A.
    pub a2a_method: Option<&'a str>,
}

/// The outcome of [`PolicySnapshot::authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the policy that decided; `None` when no rule did.
    pub policy: Option<String>,
    /// Index of the deciding rule in that policy's `spec.rules`.
    pub rule: Option<usize>,
    /// Human-readable reason, for access logs and denial responses.
    pub reason: String,
}

/// The outcome of [`PolicySnapshot::check`]: borrowed from the snapshot, no text built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict<'s> {
    pub allowed: bool,
    /// `namespace/name` of the policy that decided and the index of its rule; `None` when no
    /// rule did.
    pub rule: Option<(&'s str, usize)>,
    basis: Basis,
}

/// What a [`Verdict`] rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Basis {
    /// A rule of the policy in [`Verdict::rule`] matched.
    Rule,
    /// Allow policies target the destination and none of their rules matched.
    NoRuleAllows,
    /// No Allow policy targets the destination and the default action is Deny.
    DefaultDeny,
    /// No Allow policy targets the destination: it is open.
    Open,
}

impl Verdict<'_> {
    /// The full [`Decision`], with its reason, for `request` (the one this verdict is about).
    pub fn decision(&self, request: &RequestAttributes<'_>) -> Decision {
        let destination = request.destination.unwrap_or("an unregistered destination");
        let reason = match (self.basis, self.rule) {
            (Basis::Rule, Some((policy, rule))) if self.allowed => {
                format!("allowed by AccessPolicy {policy} rule {rule}")
            }
            (Basis::Rule, Some((policy, rule))) => format!(
                "denied by AccessPolicy {policy} rule {rule}: {} may not call {destination}",
                request.source
            ),
            (Basis::NoRuleAllows | Basis::Rule, _) => format!(
                "no AccessPolicy rule allows {} to call {destination} with this request",
                request.source
            ),
            (Basis::DefaultDeny, _) => {
                format!("no AccessPolicy allows calls to {destination} and the default is Deny")
            }
            (Basis::Open, _) => format!("no AccessPolicy restricts calls to {destination}"),
        };
        Decision {
            allowed: self.allowed,
            policy: self.rule.map(|(policy, _)| policy.to_owned()),
            rule: self.rule.map(|(_, rule)| rule),
            reason,
        }
    }
}

/// A compiled rate limit of a [`TrafficSettings`].
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitRule {
    pub from: Pattern,
    pub tool: Option<String>,
    pub requests_per_second: f64,
    pub burst: u32,
}

/// Compiled `TrafficPolicy` settings for one agent (or the defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficSettings {
    /// `namespace/name` of the `TrafficPolicy` these come from; `None` = built-in defaults.
    pub policy: Option<String>,
    pub timeouts: Timeouts,
    pub retries: Retries,
    /// In declaration order (see [`TrafficSettings::rate_limit_for`] for which one applies).
    pub rate_limits: Vec<RateLimitRule>,
    pub priority: Priority,
    /// `priority.sources` compiled, in declaration order (first match wins).
    pub priority_sources: Vec<(Pattern, PriorityClass)>,
    pub circuit_breaker: CircuitBreaker,
    pub dedup: Dedup,
    pub routes: Vec<Route>,
    pub max_request_body_bytes: u64,
}

impl Default for TrafficSettings {
    /// What applies where no `TrafficPolicy` does: the defaults of the resource itself.
    fn default() -> Self {
        TrafficSettings::from_spec(&TrafficPolicySpec::default(), None)
    }
}

/// A compiled L7 route: patterns parsed (validated before compiling; a pattern that does not
/// parse matches nothing).
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub paths: Vec<Pattern>,
    pub methods: Vec<Pattern>,
    pub headers: Vec<(http::HeaderName, Pattern)>,
    pub mcp_tools: Vec<Pattern>,
    pub a2a_methods: Vec<Pattern>,
    /// (agent, weight)
    pub backends: Vec<(String, u32)>,
}

/// What a route looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
    pub mcp_tool: Option<&'a str>,
    pub a2a_method: Option<&'a str>,
}

impl Route {
    fn compile(spec: &crate::policy::RouteSpec) -> Self {
        let patterns = |list: &[String]| -> Vec<Pattern> {
            list.iter()
                .map(|text| Pattern::parse(text).unwrap_or(Pattern::Exact(String::new())))
                .filter(|pattern| *pattern != Pattern::Exact(String::new()))
                .collect()
        };
        Route {
            paths: patterns(&spec.matches.paths),
            methods: patterns(&spec.matches.methods),
            headers: spec
                .matches
                .headers
                .iter()
                .filter_map(|header| {
                    Some((
                        http::HeaderName::from_bytes(header.name.as_bytes()).ok()?,
                        Pattern::parse(&header.value).ok()?,
                    ))
                })
                .collect(),
            mcp_tools: patterns(&spec.matches.mcp_tools),
            a2a_methods: patterns(&spec.matches.a2a_methods),
            backends: spec
                .backends
                .iter()
                .map(|backend| (backend.agent.clone(), backend.weight))
                .collect(),
        }
    }

    /// Whether every part the route states matches the request.
    pub fn matches(&self, request: &RouteRequest<'_>) -> bool {
        let any = |patterns: &[Pattern], value: Option<&str>| {
            patterns.is_empty()
                || value.is_some_and(|value| patterns.iter().any(|pattern| pattern.matches(value)))
        };
        let path = request.path.split('?').next().unwrap_or(request.path);
        any(&self.paths, Some(path))
            && (self.methods.is_empty()
                || self
                    .methods
                    .iter()
                    .any(|pattern| pattern.matches_ignore_case(request.method)))
            && self.headers.iter().all(|(name, pattern)| {
                request
                    .headers
                    .get_all(name)
                    .iter()
                    .any(|value| value.to_str().is_ok_and(|value| pattern.matches(value)))
            })
            && any(&self.mcp_tools, request.mcp_tool)
            && any(&self.a2a_methods, request.a2a_method)
    }
}

impl TrafficSettings {
    /// Whether a route matches on request headers (so a request's header map is needed).
    pub fn routes_read_headers(&self) -> bool {
        self.routes.iter().any(|route| !route.headers.is_empty())
    }

    /// The backend agent for a request: of the first matching route, one backend drawn by
    /// weight with `draw` (a number in `0..total weight`); `None` when no route matches.
    pub fn route(&self, request: &RouteRequest<'_>, draw: impl FnOnce(u64) -> u64) -> Option<&str> {
        let route = self.routes.iter().find(|route| route.matches(request))?;
        let total: u64 = route
            .backends
            .iter()
            .map(|(_, weight)| u64::from(*weight))
            .sum();
        if total == 0 {
            return None;
        }
        let mut ticket = draw(total).min(total - 1);
        for (agent, weight) in &route.backends {
            let weight = u64::from(*weight);
            if ticket < weight {
                return Some(agent);
            }
            ticket -= weight;
        }
        None
    }
}

impl TrafficSettings {
    fn from_resource(policy: &TrafficPolicy) -> Self {
        let name = format!("{}/{}", policy.metadata.namespace, policy.metadata.name);
        TrafficSettings::from_spec(&policy.spec, Some(name))
    }

    /// Compiles a traffic policy's spec; `policy` names the resource it came from.
    pub(crate) fn from_spec(spec: &TrafficPolicySpec, policy: Option<String>) -> Self {
        let limits: Vec<RateLimitRule> = spec
            .rate_limits
            .iter()
            .map(|limit| {
                RateLimitRule {
                    // Validated; an invalid pattern can only come from an unvalidated caller.
                    from: Pattern::parse(&limit.from).unwrap_or(Pattern::Any),
                    tool: limit.tool.clone(),
                    requests_per_second: limit.requests_per_second,
                    burst: limit.burst,
                }
            })
            .collect();
        TrafficSettings {
            policy,
            timeouts: spec.timeouts,
            retries: spec.retries.clone(),
            rate_limits: limits,
            priority: spec.priority.clone(),
            priority_sources: spec
                .priority
                .sources
                .iter()
                // Validated; an invalid pattern can only come from an unvalidated caller,
                // and then matches no source (the request keeps the default class).
                .filter_map(|source| Some((Pattern::parse(&source.from).ok()?, source.class)))
                .collect(),
            circuit_breaker: spec.circuit_breaker,
            dedup: spec.dedup,
            routes: spec.routes.iter().map(Route::compile).collect(),
            max_request_body_bytes: spec.max_request_body_bytes,
        }
    }

    /// The rate limit that applies to a call from `source` (naming `tool`, if any): the most
    /// specific matching one (naming the tool, then exact `from`, then longest prefix, then
    /// `*`; ties in declaration order).
    pub fn rate_limit_for(&self, source: &str, tool: Option<&str>) -> Option<&RateLimitRule> {
        self.rate_limits
            .iter()
            .enumerate()
            .filter(|(_, rule)| {
                rule.from.matches(source)
                    && match &rule.tool {
                        None => true,
                        Some(limited) => tool == Some(limited.as_str()),
                    }
            })
            .min_by_key(|(i, rule)| {
                (
                    std::cmp::Reverse(rule.tool.is_some()),
                    std::cmp::Reverse(rule.from.specificity()),
                    *i,
                )
            })
            .map(|(_, rule)| rule)
    }
}

#[derive(Debug)]
struct CompiledRule {
    from: Vec<Pattern>,
    http: Option<(Vec<Pattern>, Vec<Pattern>)>,
    mcp: Option<(Vec<Pattern>, Vec<Pattern>)>,
    a2a: Option<Vec<Pattern>>,
}

fn patterns(texts: &[String]) -> Vec<Pattern> {
    // Validated before compiling; anything unparsable is dropped rather than widened.
    texts
        .iter()
        .filter_map(|t| Pattern::parse(t).ok())
        .collect()
}

fn any_match(patterns: &[Pattern], value: &str) -> bool {
    patterns.iter().any(|p| p.matches(value))
}

impl CompiledRule {
    /// Whether the rule holds for every request of a matching source (no L7 condition).
    fn unconditional(&self) -> bool {
        self.http
            .as_ref()
            .is_none_or(|(methods, paths)| methods.is_empty() && paths.is_empty())
            && self.mcp.is_none()
            && self.a2a.is_none()
    }

    fn matches(&self, request: &RequestAttributes<'_>) -> bool {
        if !any_match(&self.from, request.source) {
            return false;
        }
        if let Some((methods, paths)) = &self.http {
            if !methods.is_empty()
                && !methods
                    .iter()
                    .any(|m| m.matches_ignore_case(request.http_method))
            {
                return false;
            }
            let path = request.path.split(['?', '#']).next().unwrap_or_default();
            if !paths.is_empty() && !any_match(paths, path) {
                return false;
            }
        }
        if let Some((methods, tools)) = &self.mcp {
            let Some(method) = request.mcp_method else {
                return false;
            };
            if !methods.is_empty() && !any_match(methods, method) {
                return false;
            }
            if !tools.is_empty() && !request.mcp_tool.is_some_and(|tool| any_match(tools, tool)) {
                return false;
            }
        }
        if let Some(methods) = &self.a2a {
            let Some(method) = request.a2a_method else {
                return false;
            };
            if !methods.is_empty() && !any_match(methods, method) {
                return false;
            }
        }
        true
    }
}

#[derive(Debug)]
struct CompiledPolicy {
    /// `namespace/name`.
    id: String,
    rules: Vec<CompiledRule>,
}

impl CompiledPolicy {
    fn from_resource(policy: &AccessPolicy) -> Self {
        let rules = policy
            .spec
            .rules
            .iter()
            .map(|rule| CompiledRule {
                from: patterns(&rule.from),
                http: rule
                    .http
                    .as_ref()
                    .map(|h| (patterns(&h.methods), patterns(&h.paths))),
                mcp: rule
                    .mcp
                    .as_ref()
                    .map(|m| (patterns(&m.methods), patterns(&m.tools))),
                a2a: rule.a2a.as_ref().map(|a| patterns(&a.methods)),
            })
            .collect();
        CompiledPolicy {
            id: format!("{}/{}", policy.metadata.namespace, policy.metadata.name),
            rules,
        }
    }

    fn first_match(&self, request: &RequestAttributes<'_>) -> Option<usize> {
        self.rules.iter().position(|rule| rule.matches(request))
    }
}

/// Policies of one action, indexed by target.
#[derive(Debug, Default)]
struct PolicySet {
    by_target: FastHashMap<String, Vec<usize>>,
    wildcard: Vec<usize>,
    /// `*` policies scoped to one namespace's agents, by namespace.
    by_namespace: FastHashMap<String, Vec<usize>>,
}

impl PolicySet {
    fn add(&mut self, target: &str, namespace: Option<&str>, index: usize) {
        if let (true, Some(namespace)) = (target == "*", namespace) {
            self.by_namespace
                .entry(namespace.to_owned())
                .or_default()
                .push(index);
        } else if target == "*" {
            self.wildcard.push(index);
        } else {
            self.by_target
                .entry(target.to_owned())
                .or_default()
                .push(index);
        }
    }

    /// Policies for `destination` in `namespace` (by name first, then its namespace's `*`,
    /// then the mesh's `*`).
    fn applicable<'s>(
        &'s self,
        destination: Option<&str>,
        namespace: Option<&str>,
    ) -> impl Iterator<Item = usize> + 's {
        let specific = destination.and_then(|d| self.by_target.get(d));
        let scoped = namespace.and_then(|n| self.by_namespace.get(n));
        specific
            .into_iter()
            .flatten()
            .chain(scoped.into_iter().flatten())
            .chain(self.wildcard.iter())
            .copied()
    }
}

/// The compiled, immutable policy state. Cheap to share in an `Arc`; every method is a lookup.
#[derive(Debug)]
pub struct PolicySnapshot {
    generation: u64,
    content_hash: u64,
    default_action: Action,
    resource_count: usize,
    /// Sorted by name.
    agents: Vec<AgentEntry>,
    by_name: FastHashMap<String, usize>,
    by_host: FastHashMap<String, usize>,
    by_address: FastHashMap<SocketAddr, usize>,
    policies: Vec<CompiledPolicy>,
    deny: PolicySet,
    allow: PolicySet,
    traffic_by_agent: FastHashMap<String, TrafficSettings>,
    traffic_wildcard: Option<TrafficSettings>,
    traffic_default: TrafficSettings,
    warnings: Vec<String>,
    /// Registered instances merged into `agents`, in key order.
    instances: Vec<AgentInstance>,
}

impl Default for PolicySnapshot {
    fn default() -> Self {
        PolicySnapshot::empty(Action::Allow)
    }
}

impl PolicySnapshot {
    /// A snapshot with no resources: every destination is open (`Allow`) or closed (`Deny`).
    pub fn empty(default_action: Action) -> Self {
        let mut hasher = Fnv64::default();
        default_action.hash(&mut hasher);
        PolicySnapshot {
            generation: GENERATION.fetch_add(1, Ordering::Relaxed) + 1,
            content_hash: hasher.finish(),
            default_action,
            resource_count: 0,
            agents: Vec::new(),
            by_name: FastHashMap::default(),
            by_host: FastHashMap::default(),
            by_address: FastHashMap::default(),
            policies: Vec::new(),
            deny: PolicySet::default(),
            allow: PolicySet::default(),
            traffic_by_agent: FastHashMap::default(),
            traffic_wildcard: None,
            traffic_default: TrafficSettings::default(),
            warnings: Vec::new(),
            instances: Vec::new(),
        }
    }

    /// Validates every resource and the set as a whole, and builds the indexes.
    ///
    /// Errors: invalid resources, duplicate kind/namespace/name, two agents with the same name
    /// (in any namespace) or claiming the same host, a fallback naming an unknown agent, two
    /// `TrafficPolicy`s for the same target. Warnings (see [`PolicySnapshot::warnings`]): a
    /// policy targeting an agent not (yet) registered, an endpoint shared by two agents, a
    /// fallback sharing no capability with its agent.
    pub fn compile(
        resources: &[Resource],
        default_action: Action,
    ) -> Result<PolicySnapshot, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut warnings = Vec::new();

        // Deterministic order regardless of input order.
        let mut sorted: Vec<&Resource> = resources.iter().collect();
        // One key (two Strings) per resource, not two per comparison.
        sorted.sort_by_cached_key(|r| r.key());
        let mut seen: HashSet<ResourceKey> = HashSet::new();
        for resource in &sorted {
            if let Err(problems) = resource.validate() {
                errors.extend(problems);
            }
            let key = resource.key();
            if seen.contains(&key) {
                errors.push(PolicyError::Duplicate {
                    resource: key.to_string(),
                    first: "the same set".to_owned(),
                });
            }
            seen.insert(key);
        }

        let mut hasher = Fnv64::default();
        default_action.hash(&mut hasher);
        for resource in &sorted {
            hasher.write(&serde_json::to_vec(resource).unwrap_or_default());
            hasher.write_u8(0xff);
        }

        let mut snapshot = PolicySnapshot::empty(default_action);
        snapshot.content_hash = hasher.finish();
        snapshot.resource_count = resources.len();

        // Agents.
        let agents: Vec<&Agent> = sorted
            .iter()
            .filter_map(|r| match r {
                Resource::Agent(agent) => Some(agent),
                _ => None,
            })
            .collect();
        let label =
            |kind: Kind, meta: &super::Metadata| format!("{kind} {}/{}", meta.namespace, meta.name);
        let mut host_owner: HashMap<String, String> = HashMap::new();
        for agent in &agents {
            let entry = AgentEntry::from_resource(agent);
            let this = label(Kind::Agent, &agent.metadata);
            if let Some(&other) = snapshot.by_name.get(&entry.name) {
                let other = &snapshot.agents[other];
                errors.push(PolicyError::Invalid {
                    resource: this.clone(),
                    field: "metadata.name".to_owned(),
                    problem: format!(
                        "agent name `{}` is already used by Agent {}/{} (agent names are unique \
                         across namespaces)",
                        entry.name, other.namespace, other.name
                    ),
                });
                continue;
            }
            let index = snapshot.agents.len();
            snapshot.by_name.insert(entry.name.clone(), index);
            for address in entry.endpoints.iter().map(|e| e.address) {
                if let Some(&other) = snapshot.by_address.get(&address) {
                    warnings.push(format!(
                        "{this}: endpoint {address} is also an endpoint of agent {}; lookups by \
                         address return {}",
                        snapshot.agents[other].name, snapshot.agents[other].name
                    ));
                } else {
                    snapshot.by_address.insert(address, index);
                }
            }
            snapshot.agents.push(entry);
        }
        // Registered instances, before hosts: an agent made of instances gets its name as a
        // host like any other.
        let instances: Vec<&AgentInstance> = sorted
            .iter()
            .filter_map(|r| match r {
                Resource::AgentInstance(instance) => Some(instance),
                _ => None,
            })
            .collect();
        if !instances.is_empty() {
            let claimed: HashSet<String> = agents
                .iter()
                .flat_map(|agent| agent.spec.hosts.iter().map(|host| normalize_host(host)))
                .collect();
            for instance in instances {
                if let Some(warning) = snapshot.merge_instance(instance, &claimed) {
                    warnings.push(warning);
                } else {
                    snapshot.instances.push((*instance).clone());
                }
            }
        }
        // Hosts after names, so a host may not shadow another agent's name in either order.
        for (index, agent) in snapshot.agents.iter().enumerate() {
            host_owner.insert(agent.name.clone(), agent.name.clone());
            snapshot.by_host.insert(agent.name.clone(), index);
        }
        for agent in &agents {
            let name = &agent.metadata.name;
            let Some(&index) = snapshot.by_name.get(name) else {
                continue;
            };
            if snapshot.agents[index].namespace != agent.metadata.namespace {
                continue; // the losing duplicate name, already reported
            }
            for (h, host) in agent.spec.hosts.iter().enumerate() {
                let host = normalize_host(host);
                match host_owner.get(&host) {
                    Some(owner) if owner != name => errors.push(PolicyError::Invalid {
                        resource: label(Kind::Agent, &agent.metadata),
                        field: format!("spec.hosts[{h}]"),
                        problem: format!("host `{host}` is already claimed by agent {owner}"),
                    }),
                    _ => {
                        host_owner.insert(host.clone(), name.clone());
                        snapshot.by_host.insert(host, index);
                    }
                }
            }
        }
        for agent in &snapshot.agents {
            let Some(fallback) = &agent.fallback else {
                continue;
            };
            let this = format!("Agent {}/{}", agent.namespace, agent.name);
            match snapshot.by_name.get(fallback) {
                None => errors.push(PolicyError::Invalid {
                    resource: this,
                    field: "spec.fallback".to_owned(),
                    problem: format!("unknown agent `{fallback}`"),
                }),
                Some(&other) => {
                    let other = &snapshot.agents[other];
                    let caps = &agent.capabilities;
                    let offered = caps.mcp_tools.iter().chain(caps.a2a_skills.iter());
                    let mut offered = offered.peekable();
                    if offered.peek().is_some()
                        && !offered.any(|capability| other.has_capability(capability))
                    {
                        warnings.push(format!(
                            "{this}: spec.fallback: agent {fallback} shares no capability with it"
                        ));
                    }
                }
            }
        }

        // Access policies.
        for resource in &sorted {
            let Resource::AccessPolicy(policy) = resource else {
                continue;
            };
            let target = policy.spec.target_agent.as_str();
            if target != "*" && !snapshot.by_name.contains_key(target) {
                warnings.push(format!(
                    "{}: spec.targetAgent: agent `{target}` is not registered (yet)",
                    label(Kind::AccessPolicy, &policy.metadata)
                ));
            }
            let index = snapshot.policies.len();
            snapshot
                .policies
                .push(CompiledPolicy::from_resource(policy));
            let namespace = policy.spec.target_namespace.as_deref();
            match policy.spec.action {
                Action::Deny => snapshot.deny.add(target, namespace, index),
                Action::Allow => snapshot.allow.add(target, namespace, index),
            }
        }

        // Traffic policies.
        let mut traffic_owner: HashMap<String, String> = HashMap::new();
        for resource in &sorted {
            let Resource::TrafficPolicy(policy) = resource else {
                continue;
            };
            let this = label(Kind::TrafficPolicy, &policy.metadata);
            let target = policy.spec.target_agent.clone();
            if let Some(owner) = traffic_owner.get(&target) {
                errors.push(PolicyError::Invalid {
                    resource: this,
                    field: "spec.targetAgent".to_owned(),
                    problem: format!("`{target}` is already targeted by {owner}"),
                });
                continue;
            }
            if target != "*" && !snapshot.by_name.contains_key(&target) {
                warnings.push(format!(
                    "{this}: spec.targetAgent: agent `{target}` is not registered (yet)"
                ));
            }
            for (index, route) in policy.spec.routes.iter().enumerate() {
                for backend in &route.backends {
                    if !snapshot.by_name.contains_key(&backend.agent) {
                        warnings.push(format!(
                            "{this}: spec.routes[{index}]: backend agent `{}` is not registered (yet); requests it would get are answered 503",
                            backend.agent
                        ));
                    }
                }
            }
            traffic_owner.insert(target.clone(), this);
            let settings = TrafficSettings::from_resource(policy);
            if target == "*" {
                snapshot.traffic_wildcard = Some(settings);
            } else {
                snapshot.traffic_by_agent.insert(target, settings);
            }
        }

        if errors.is_empty() {
            snapshot.warnings = warnings;
            Ok(snapshot)
        } else {
            Err(errors)
        }
    }

    /// Merges one registered instance into its agent (see the module documentation). Returns
    /// why it was left out, if it was.
    fn merge_instance(
        &mut self,
        instance: &AgentInstance,
        claimed_hosts: &HashSet<String>,
    ) -> Option<String> {
        let spec = &instance.spec;
        let this = format!(
            "AgentInstance {}/{}",
            instance.metadata.namespace, instance.metadata.name
        );
        let node: Arc<str> = Arc::from(spec.node.as_str());
        let endpoint = Endpoint {
            address: spec.address,
            weight: u32::from(spec.health.is_healthy()),
            node: Some(Arc::clone(&node)),
        };
        let index = match self.by_name.get(&spec.agent) {
            Some(&index) => index,
            None => {
                if claimed_hosts.contains(&spec.agent) {
                    return Some(format!(
                        "{this}: left out: `{}` is a host name of another agent",
                        spec.agent
                    ));
                }
                let index = self.agents.len();
                self.agents.push(AgentEntry {
                    name: spec.agent.clone(),
                    namespace: instance.metadata.namespace.clone(),
                    hosts: Vec::new(),
                    endpoints: Vec::new(),
                    protocol: spec.protocol,
                    capabilities: Capabilities::default(),
                    fallback: None,
                });
                self.by_name.insert(spec.agent.clone(), index);
                index
            }
        };
        match self.by_address.get(&spec.address) {
            Some(&owner) if owner != index => {
                let owner = self.agents[owner].name.clone();
                self.drop_empty_agent(index);
                return Some(format!(
                    "{this}: left out: {} is an endpoint of agent {owner}",
                    spec.address
                ));
            }
            Some(_) => {
                let agent = &self.agents[index];
                let same = agent
                    .endpoints
                    .iter()
                    .any(|e| e.address == spec.address && e.node.as_deref() == Some(&*node));
                if same
                    || agent
                        .endpoints
                        .iter()
                        .any(|e| e.node.is_none() && e.address == spec.address)
                {
                    return Some(format!(
                        "{this}: left out: agent {} already has the endpoint {}",
                        spec.agent, spec.address
                    ));
                }
            }
            None => {
                self.by_address.insert(spec.address, index);
            }
        }
        let agent = &mut self.agents[index];
        agent.endpoints.push(endpoint);
        let capabilities = &mut agent.capabilities;
        for tool in &spec.capabilities.mcp_tools {
            if !capabilities.mcp_tools.contains(tool) {
                capabilities.mcp_tools.push(tool.clone());
            }
        }
        for skill in &spec.capabilities.a2a_skills {
            if !capabilities.a2a_skills.contains(skill) {
                capabilities.a2a_skills.push(skill.clone());
            }
        }
        None
    }

    /// Removes an agent just created for an instance that was then left out (always the last).
    fn drop_empty_agent(&mut self, index: usize) {
        if index + 1 == self.agents.len() && self.agents[index].endpoints.is_empty() {
            let agent = self.agents.remove(index);
            self.by_name.remove(&agent.name);
        }
    }

    /// Registered instances (merged into [`agents`](Self::agents)), in key order.
    pub fn instances(&self) -> &[AgentInstance] {
        &self.instances
    }

    /// Healthy registered instances that offer this MCP tool or A2A skill.
    pub fn healthy_instances_with_capability(&self, tool_or_skill: &str) -> Vec<&AgentInstance> {
        self.instances
            .iter()
            .filter(|instance| {
                let caps = &instance.spec.capabilities;
                instance.spec.health.is_healthy()
                    && (caps.mcp_tools.iter().any(|tool| tool == tool_or_skill)
                        || caps.a2a_skills.iter().any(|skill| skill == tool_or_skill))
            })
            .collect()
    }

    /// Process-wide sequence number of this snapshot (later snapshots have higher numbers).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Stable hash of the resources and default action: equal content, equal hash, across
    /// restarts and nodes.
    pub fn content_hash(&self) -> u64 {
        self.content_hash
    }

    /// Number of resources compiled in.
    pub fn resource_count(&self) -> usize {
        self.resource_count
    }

    /// Action for destinations no `Allow` policy targets.
    pub fn default_action(&self) -> Action {
        self.default_action
    }

    /// Non-fatal findings of the compilation (e.g. policies targeting unknown agents).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The agent with this name.
    pub fn agent(&self, name: &str) -> Option<&AgentEntry> {
        self.by_name.get(name).map(|&i| &self.agents[i])
    }

    /// The agent a `Host` (or `:authority`) value routes to: case-insensitive, `:port` and a
    /// trailing dot ignored; matches the agent's hosts and its name.
    pub fn agent_by_host(&self, host: &str) -> Option<&AgentEntry> {
        let host = strip_port(host.trim());
        let host = host.strip_suffix('.').unwrap_or(host);
        let index = match self.by_host.get(host) {
            Some(index) => Some(index),
            None if host.bytes().any(|b| b.is_ascii_uppercase()) => {
                self.by_host.get(&host.to_ascii_lowercase())
            }
            None => None,
        };
        index.map(|&i| &self.agents[i])
    }

    /// The agent one of whose endpoints is `address`.
    pub fn agent_by_address(&self, address: SocketAddr) -> Option<&AgentEntry> {
        self.by_address.get(&address).map(|&i| &self.agents[i])
    }

    /// Every agent, sorted by name.
    pub fn agents(&self) -> impl Iterator<Item = &AgentEntry> {
        self.agents.iter()
    }

    /// Agents offering this MCP tool or A2A skill, sorted by name.
    pub fn agents_with_capability(&self, tool_or_skill: &str) -> Vec<&AgentEntry> {
        self.agents
            .iter()
            .filter(|a| a.has_capability(tool_or_skill))
            .collect()
    }

    /// Decides whether a request may proceed (see the module documentation for the semantics).
    pub fn authorize(&self, request: &RequestAttributes<'_>) -> Decision {
        self.check(request).decision(request)
    }

    /// [`authorize`](Self::authorize) without building the decision's texts: the per-request
    /// form, which allocates nothing. [`Verdict::decision`] gives the texts when they are
    /// wanted (a denial to log and answer).
    pub fn check(&self, request: &RequestAttributes<'_>) -> Verdict<'_> {
        self.decide(
            request,
            |policy| policy.first_match(request),
            |policy| policy.first_match(request),
        )
    }

    /// The namespace of a registered destination agent.
    fn namespace_of(&self, destination: Option<&str>) -> Option<&str> {
        let index = *self.by_name.get(destination?)?;
        self.agents.get(index).map(|agent| agent.namespace.as_str())
    }

    /// Whether `request.source` may reach `request.destination` at all (its L7 attributes are
    /// ignored): the check of a connection whose requests were judged one by one elsewhere,
    /// as the node-to-node tunnel's streams are by the calling node. An Allow rule matching
    /// the source allows whatever its L7 conditions; a Deny rule denies only if it has none.
    pub fn check_reach(&self, request: &RequestAttributes<'_>) -> Verdict<'_> {
        let from = |rule: &CompiledRule| any_match(&rule.from, request.source);
        self.decide(
            request,
            |policy| {
                policy
                    .rules
                    .iter()
                    .position(|rule| rule.unconditional() && from(rule))
            },
            |policy| policy.rules.iter().position(from),
        )
    }

    /// Deny policies first (the first whose rule `deny_rule` finds decides), then, when any
    /// Allow policy applies, one of them must have a rule `allow_rule` finds; else the
    /// default.
    fn decide(
        &self,
        request: &RequestAttributes<'_>,
        deny_rule: impl Fn(&CompiledPolicy) -> Option<usize>,
        allow_rule: impl Fn(&CompiledPolicy) -> Option<usize>,
    ) -> Verdict<'_> {
        // A namespace lookup only when some policy is scoped to a namespace.
        let namespace = if self.deny.by_namespace.is_empty() && self.allow.by_namespace.is_empty() {
            None
        } else {
            self.namespace_of(request.destination)
        };
        for index in self.deny.applicable(request.destination, namespace) {
            let policy = &self.policies[index];
            if let Some(rule) = deny_rule(policy) {
                return Verdict {
                    allowed: false,
                    rule: Some((policy.id.as_str(), rule)),
                    basis: Basis::Rule,
                };
            }
        }
        let mut restricted = false;
        for index in self.allow.applicable(request.destination, namespace) {
            restricted = true;
            let policy = &self.policies[index];
            if let Some(rule) = allow_rule(policy) {
                return Verdict {
                    allowed: true,
                    rule: Some((policy.id.as_str(), rule)),
                    basis: Basis::Rule,
                };
            }
        }
        let (allowed, basis) = if restricted {
            (false, Basis::NoRuleAllows)
        } else if self.default_action == Action::Deny {
            (false, Basis::DefaultDeny)
        } else {
            (true, Basis::Open)
        };
        Verdict {
            allowed,
            rule: None,
            basis,
        }
    }

    /// Traffic settings for calls to `agent`: its own `TrafficPolicy`, else the `*` one, else
    /// the defaults.
    pub fn traffic(&self, agent: &str) -> &TrafficSettings {
        self.traffic_by_agent
            .get(agent)
            .or(self.traffic_wildcard.as_ref())
            .unwrap_or(&self.traffic_default)
    }
}

/// `tools:8080` -> `tools`, `[::1]:80` -> `::1`; anything else unchanged.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(host, |(inside, _)| inside);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load::parse_documents;

    const REGISTRY: &str = r#"
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata: {name: tools}
spec:
  hosts: [Tools.Mesh.Local]
  endpoints: [{address: "10.0.0.5:8080"}, {address: "10.0.0.6:8080", weight: 0}]
  protocol: Mcp
  capabilities: {mcpTools: [fs_read, search]}
  fallback: tools-backup
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata: {name: tools-backup}
spec:
  endpoints: [{address: "10.0.0.7:8080"}]
  protocol: Mcp
  capabilities: {mcpTools: [search]}
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata: {name: planner, namespace: agents}
spec:
  hosts: [planner.agents]
  endpoints: [{address: "10.0.1.1:9000"}]
  protocol: A2a
  capabilities: {a2aSkills: [plan]}
"#;

    fn compile(extra: &str, default_action: Action) -> PolicySnapshot {
        let text = format!("{REGISTRY}---\n{extra}");
        let report = parse_documents(&text, "test.yaml");
        assert!(report.is_clean(), "{:?}", report.errors);
        match PolicySnapshot::compile(&report.resources(), default_action) {
            Ok(snapshot) => snapshot,
            Err(errors) => panic!("compile failed: {errors:?}"),
        }
    }

    fn compile_err(text: &str) -> Vec<String> {
        let report = parse_documents(text, "test.yaml");
        assert!(report.is_clean(), "{:?}", report.errors);
        match PolicySnapshot::compile(&report.resources(), Action::Allow) {
            Ok(_) => panic!("compiled"),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    fn mcp<'a>(
        source: &'a str,
        destination: &'a str,
        tool: Option<&'a str>,
    ) -> RequestAttributes<'a> {
        RequestAttributes {
            source,
            destination: Some(destination),
            http_method: "POST",
            path: "/mcp",
            mcp_method: Some(if tool.is_some() {
                "tools/call"
            } else {
                "tools/list"
            }),
            mcp_tool: tool,
            a2a_method: None,
        }
    }

    fn http<'a>(
        source: &'a str,
        destination: Option<&'a str>,
        method: &'a str,
        path: &'a str,
    ) -> RequestAttributes<'a> {
        RequestAttributes {
            source,
            destination,
            http_method: method,
            path,
            ..RequestAttributes::default()
        }
    }

    const POLICIES: &str = r#"
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: planner-tools}
spec:
  targetAgent: tools
  rules:
    - from: [reporter]
      http: {methods: [get], paths: ["/health"]}
    - from: [planner, "research-*"]
      mcp: {tools: ["fs_*", search]}
    - from: [planner]
      mcp: {methods: [tools/list, initialize]}
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: no-writes, namespace: security}
spec:
  targetAgent: tools
  action: Deny
  rules:
    - from: ["*"]
      mcp: {tools: [fs_write]}
    - from: [research-intern]
"#;

    #[test]
    fn allow_list_closes_the_target_and_deny_beats_allow() {
        let snapshot = compile(POLICIES, Action::Allow);

        let d = snapshot.authorize(&mcp("planner", "tools", Some("fs_read")));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.policy.as_deref(), Some("default/planner-tools"));
        assert_eq!(d.rule, Some(1));

        // Matches allow rule 1 (fs_*) but the deny policy wins.
        let d = snapshot.authorize(&mcp("planner", "tools", Some("fs_write")));
        assert!(!d.allowed, "{d:?}");
        assert_eq!(d.policy.as_deref(), Some("security/no-writes"));
        assert_eq!(d.rule, Some(0));
        assert!(
            d.reason
                .contains("denied by AccessPolicy security/no-writes rule 0")
        );

        // Prefix wildcard on the source; a deny rule without L7 parts matches everything.
        assert!(
            snapshot
                .authorize(&mcp("research-7", "tools", Some("search")))
                .allowed
        );
        let d = snapshot.authorize(&mcp("research-intern", "tools", Some("search")));
        assert_eq!((d.allowed, d.rule), (false, Some(1)));

        // Not in any allow rule: the allow-list closes the target.
        let d = snapshot.authorize(&mcp("stranger", "tools", Some("search")));
        assert!(!d.allowed);
        assert_eq!(d.policy, None);
        assert!(
            d.reason.contains("no AccessPolicy rule allows stranger"),
            "{}",
            d.reason
        );

        // Method rule for listing tools.
        let d = snapshot.authorize(&mcp("planner", "tools", None));
        assert_eq!((d.allowed, d.rule), (true, Some(2)));
    }

    #[test]
    fn mcp_rules_do_not_match_other_requests() {
        let snapshot = compile(POLICIES, Action::Allow);
        // Plain HTTP from planner: only MCP rules mention planner.
        assert!(
            !snapshot
                .authorize(&http("planner", Some("tools"), "POST", "/mcp"))
                .allowed
        );
        // A tools list only matches requests naming a tool: tools/list from research is not
        // allowed by rule 1.
        assert!(
            !snapshot
                .authorize(&mcp("research-1", "tools", None))
                .allowed
        );
        // And the fs_write deny does not catch a non-MCP request (which the allow-list refuses
        // anyway).
        let d = snapshot.authorize(&http("reporter", Some("tools"), "GET", "/health?verbose=1"));
        assert_eq!((d.allowed, d.rule), (true, Some(0)), "{d:?}");
        // Methods are case-insensitive.
        assert!(
            snapshot
                .authorize(&http("reporter", Some("tools"), "get", "/health"))
                .allowed
        );
        assert!(
            !snapshot
                .authorize(&http("reporter", Some("tools"), "POST", "/health"))
                .allowed
        );
    }

    #[test]
    fn open_destination_and_default_deny() {
        let snapshot = compile(POLICIES, Action::Allow);
        let d = snapshot.authorize(&http("anyone", Some("planner"), "GET", "/"));
        assert!(d.allowed);
        assert!(
            d.reason
                .contains("no AccessPolicy restricts calls to planner")
        );
        // Unregistered destination with no `*` policy.
        assert!(
            snapshot
                .authorize(&http("anyone", None, "GET", "/"))
                .allowed
        );

        let closed = compile(POLICIES, Action::Deny);
        let d = closed.authorize(&http("anyone", Some("planner"), "GET", "/"));
        assert!(!d.allowed);
        assert!(d.reason.contains("default is Deny"), "{}", d.reason);
        assert!(!closed.authorize(&http("anyone", None, "GET", "/")).allowed);
        // The explicitly allowed traffic still flows.
        assert!(
            closed
                .authorize(&mcp("planner", "tools", Some("search")))
                .allowed
        );
    }

    #[test]
    fn a_namespace_can_default_to_deny_while_the_rest_of_the_mesh_stays_open() {
        let policies = r#"
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata: {name: ledger, namespace: finance}
spec:
  endpoints: [{address: "10.0.9.1:80"}]
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata: {name: payroll, namespace: finance}
spec:
  endpoints: [{address: "10.0.9.2:80"}]
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: default-deny, namespace: finance}
spec:
  targetAgent: "*"
  targetNamespace: finance
  action: Allow
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: ledger-readers, namespace: finance}
spec:
  targetAgent: ledger
  rules:
    - from: [planner]
"#;
        let snapshot = compile(policies, Action::Allow);
        // finance is closed: only what a policy allows passes.
        let d = snapshot.authorize(&http("planner", Some("payroll"), "GET", "/"));
        assert!(!d.allowed, "{d:?}");
        assert!(
            snapshot
                .authorize(&http("planner", Some("ledger"), "GET", "/"))
                .allowed
        );
        assert!(
            !snapshot
                .authorize(&http("reporter", Some("ledger"), "GET", "/"))
                .allowed
        );
        // Other namespaces and unregistered destinations stay open.
        assert!(
            snapshot
                .authorize(&http("reporter", Some("tools"), "GET", "/"))
                .allowed
        );
        assert!(
            snapshot
                .authorize(&http("reporter", None, "GET", "/"))
                .allowed
        );
        // The reach check of the tunnel follows the same scoping.
        assert!(
            !snapshot
                .check_reach(&http("reporter", Some("payroll"), "GET", "/"))
                .allowed
        );

        // targetNamespace goes with targetAgent "*" only.
        let named = "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: p}\nspec: {targetAgent: tools, targetNamespace: finance}\n";
        let report = parse_documents(named, "p.yaml");
        assert!(
            report
                .errors
                .iter()
                .any(|error| error.to_string().contains("spec.targetNamespace")),
            "{:?}",
            report.errors
        );
    }

    #[test]
    fn wildcard_targets_and_unregistered_destinations() {
        let policies = r#"
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: mesh-wide}
spec:
  targetAgent: "*"
  rules:
    - from: [planner]
    - from: ["*"]
      http: {paths: ["/api/*"]}
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: no-admin}
spec:
  targetAgent: "*"
  action: Deny
  rules:
    - from: ["*"]
      http: {paths: ["/admin", "/admin/*"]}
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: only-tools}
spec:
  targetAgent: tools
  action: Deny
  rules:
    - from: [reporter]
"#;
        let snapshot = compile(policies, Action::Allow);
        // "*" allow closes every destination, registered or not.
        assert!(
            snapshot
                .authorize(&http("planner", None, "GET", "/x"))
                .allowed
        );
        assert!(
            !snapshot
                .authorize(&http("reporter", None, "GET", "/x"))
                .allowed
        );
        assert!(
            snapshot
                .authorize(&http("reporter", None, "GET", "/api/v1"))
                .allowed
        );
        assert!(
            snapshot
                .authorize(&http("reporter", Some("planner"), "GET", "/api/v1"))
                .allowed
        );
        // "*" deny applies everywhere.
        let d = snapshot.authorize(&http("planner", None, "GET", "/admin/users"));
        assert_eq!(
            (d.allowed, d.policy.as_deref()),
            (false, Some("default/no-admin"))
        );
        // A name-targeted policy does not apply to unregistered destinations.
        assert!(
            snapshot
                .authorize(&http("reporter", None, "GET", "/api/x"))
                .allowed
        );
        assert!(
            !snapshot
                .authorize(&http("reporter", Some("tools"), "GET", "/api/x"))
                .allowed
        );
    }

    #[test]
    fn allow_policy_without_rules_closes_the_target() {
        let policy = "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: lock}\nspec: {targetAgent: planner}\n";
        let snapshot = compile(policy, Action::Allow);
        assert!(
            !snapshot
                .authorize(&http("x", Some("planner"), "GET", "/"))
                .allowed
        );
        assert!(
            snapshot
                .authorize(&http("x", Some("tools"), "GET", "/"))
                .allowed
        );
    }

    #[test]
    fn host_lookup_with_port_and_case() {
        let snapshot = compile("", Action::Allow);
        for host in [
            "tools",
            "TOOLS:8080",
            "tools.mesh.local",
            "Tools.Mesh.Local:443",
            "tools.mesh.local.",
        ] {
            assert_eq!(
                snapshot.agent_by_host(host).map(|a| a.name.as_str()),
                Some("tools"),
                "{host}"
            );
        }
        assert_eq!(
            snapshot
                .agent_by_host("planner.agents:9000")
                .map(|a| a.namespace.as_str()),
            Some("agents")
        );
        assert!(snapshot.agent_by_host("unknown").is_none());
        assert!(snapshot.agent_by_host("[::1]:80").is_none());
        assert!(snapshot.agent_by_host("").is_none());
    }

    fn instance(
        agent: &str,
        node: &str,
        id: &str,
        address: &str,
        health: &str,
        tools: &str,
    ) -> String {
        format!(
            "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: AgentInstance\nmetadata: {{name: {agent}.{node}.{id}}}\nspec:\n  agent: {agent}\n  node: {node}\n  address: \"{address}\"\n  protocol: A2a\n  identity: spiffe://td/agent/{agent}\n  health: {health}\n  capabilities: {{mcpTools: [{tools}]}}\n"
        )
    }

    #[test]
    fn instances_merge_into_their_agents() {
        let documents = [
            // Two instances of `tools` (which has static endpoints) on two nodes, same port.
            instance(
                "tools",
                "node-a",
                "1",
                "127.0.0.1:9000",
                "Healthy",
                "fs_read, new_tool",
            ),
            instance(
                "tools",
                "node-b",
                "2",
                "127.0.0.1:9000",
                "Unhealthy",
                "other",
            ),
            // A name without an Agent resource: an agent of its own.
            instance("search", "node-a", "3", "127.0.0.1:9100", "Healthy", "find"),
        ];
        let snapshot = compile(&documents.join("---\n"), Action::Allow);
        assert!(snapshot.warnings().is_empty(), "{:?}", snapshot.warnings());
        let tools = snapshot.agent("tools").unwrap();
        assert_eq!(tools.endpoints.len(), 4);
        let registered: Vec<(String, u32, Option<&str>)> = tools.endpoints[2..]
            .iter()
            .map(|e| (e.address.to_string(), e.weight, e.node.as_deref()))
            .collect();
        assert_eq!(
            registered,
            [
                ("127.0.0.1:9000".to_owned(), 1, Some("node-a")),
                // Unhealthy: in the registry, but no traffic.
                ("127.0.0.1:9000".to_owned(), 0, Some("node-b")),
            ]
        );
        // Capabilities: the union, the Agent's own first.
        assert_eq!(
            tools.capabilities.mcp_tools,
            ["fs_read", "search", "new_tool", "other"]
        );
        // The Agent's protocol and hosts stay.
        assert_eq!(tools.protocol, Protocol::Mcp);
        assert_eq!(
            snapshot.agent_by_host("tools.mesh.local").unwrap().name,
            "tools"
        );
        let search = snapshot.agent("search").unwrap();
        assert_eq!(search.protocol, Protocol::A2a);
        assert_eq!(search.endpoints.len(), 1);
        assert_eq!(snapshot.agent_by_host("search").unwrap().name, "search");
        assert_eq!(
            snapshot
                .agent_by_address("127.0.0.1:9100".parse().unwrap())
                .unwrap()
                .name,
            "search"
        );
        assert_eq!(snapshot.instances().len(), 3);
        assert_eq!(snapshot.resource_count(), 6);
        // Discovery sees healthy instances only.
        let found: Vec<&str> = snapshot
            .healthy_instances_with_capability("new_tool")
            .iter()
            .map(|i| i.metadata.name.as_str())
            .collect();
        assert_eq!(found, ["tools.node-a.1"]);
        assert!(
            snapshot
                .healthy_instances_with_capability("other")
                .is_empty()
        );
        // A health change is a content change.
        let healthier = compile(
            &[
                instance(
                    "tools",
                    "node-a",
                    "1",
                    "127.0.0.1:9000",
                    "Healthy",
                    "fs_read, new_tool",
                ),
                instance("tools", "node-b", "2", "127.0.0.1:9000", "Healthy", "other"),
                instance("search", "node-a", "3", "127.0.0.1:9100", "Healthy", "find"),
            ]
            .join("---\n"),
            Action::Allow,
        );
        assert_ne!(healthier.content_hash(), snapshot.content_hash());
    }

    #[test]
    fn an_instance_never_breaks_the_set() {
        let documents = [
            // Its name is another agent's host.
            instance(
                "tools.mesh.local",
                "node-a",
                "1",
                "127.0.0.1:9000",
                "Healthy",
                "x",
            ),
            // Its address is another agent's endpoint.
            instance("thief", "node-a", "2", "10.0.0.7:8080", "Healthy", "x"),
            // The same address and node twice for one agent.
            instance("dup", "node-a", "3", "127.0.0.1:9200", "Healthy", "x"),
            instance("dup", "node-a", "4", "127.0.0.1:9200", "Healthy", "x"),
        ];
        let snapshot = compile(&documents.join("---\n"), Action::Allow);
        let warnings = snapshot.warnings().join("\n");
        assert!(
            warnings.contains("is a host name of another agent"),
            "{warnings}"
        );
        assert!(
            warnings.contains("is an endpoint of agent tools-backup"),
            "{warnings}"
        );
        assert!(
            warnings.contains("already has the endpoint 127.0.0.1:9200"),
            "{warnings}"
        );
        assert_eq!(
            snapshot.agent_by_host("tools.mesh.local").unwrap().name,
            "tools"
        );
        assert!(snapshot.agent("thief").is_none());
        assert_eq!(
            snapshot
                .agent_by_address("10.0.0.7:8080".parse().unwrap())
                .unwrap()
                .name,
            "tools-backup"
        );
        assert_eq!(snapshot.agent("dup").unwrap().endpoints.len(), 1);
        assert_eq!(snapshot.instances().len(), 1);
    }

    #[test]
    fn invalid_instances_are_rejected_with_their_field() {
        let cases = [
            (
                instance("tools", "node-a", "1", "127.0.0.1:0", "Healthy", "x"),
                "spec.address: port 0",
            ),
            (
                instance("tools", "node-a", "1", "0.0.0.0:80", "Healthy", "x"),
                "spec.address: must be a unicast address",
            ),
            (
                instance("tools", "node-a", "1", "127.0.0.1:80", "Healthy", "x")
                    .replace("name: tools.node-a.1", "name: other.node-a.1"),
                "metadata.name: must be `<agent>.<node>.<id>`",
            ),
            (
                instance("tools", "node-a", "1", "127.0.0.1:80", "Healthy", "x")
                    .replace("spiffe://td/agent/tools", "spiffe://td/agent/planner"),
                "spec.identity: must be spiffe://<trust-domain>/agent/tools",
            ),
            (
                instance("tools", "node-a", "1", "127.0.0.1:80", "Healthy", "x").replace(
                    "health: Healthy",
                    "health: Healthy\n  healthCheckPath: health",
                ),
                "spec.healthCheckPath",
            ),
            (
                instance("tools", "Node_A", "1", "127.0.0.1:80", "Healthy", "x"),
                "spec.node",
            ),
        ];
        for (text, expected) in cases {
            let report = parse_documents(&text, "i.yaml");
            let messages: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
            assert!(
                messages.iter().any(|m| m.contains(expected)),
                "expected `{expected}` in {messages:#?}"
            );
        }
    }

    #[test]
    fn registry_lookups() {
        let snapshot = compile("", Action::Allow);
        let names: Vec<&str> = snapshot.agents().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["planner", "tools", "tools-backup"]);
        assert_eq!(snapshot.resource_count(), 3);
        let address: SocketAddr = "10.0.0.6:8080".parse().unwrap();
        assert_eq!(snapshot.agent_by_address(address).unwrap().name, "tools");
        assert!(
            snapshot
                .agent_by_address("10.0.0.6:8081".parse().unwrap())
                .is_none()
        );
        let with_search: Vec<&str> = snapshot
            .agents_with_capability("search")
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        assert_eq!(with_search, ["tools", "tools-backup"]);
        assert_eq!(snapshot.agents_with_capability("plan")[0].name, "planner");
        let tools = snapshot.agent("tools").unwrap();
        assert_eq!(tools.hosts, ["tools.mesh.local"]);
        assert_eq!(tools.endpoints[1].weight, 0);
        assert_eq!(tools.fallback.as_deref(), Some("tools-backup"));
        assert!(snapshot.warnings().is_empty(), "{:?}", snapshot.warnings());
    }

    #[test]
    fn content_hash_is_stable_and_generation_increases() {
        let a = compile(POLICIES, Action::Allow);
        let b = compile(POLICIES, Action::Allow);
        assert_eq!(a.content_hash(), b.content_hash());
        assert!(b.generation() > a.generation());
        assert_ne!(
            a.content_hash(),
            compile(POLICIES, Action::Deny).content_hash()
        );
        assert_ne!(a.content_hash(), compile("", Action::Allow).content_hash());
    }

    #[test]
    fn cross_resource_errors() {
        let dup_host = format!(
            "{REGISTRY}---\napiVersion: mesh.agentmesh.dev/v1alpha1\nkind: Agent\nmetadata: {{name: other}}\nspec:\n  hosts: [TOOLS.mesh.local]\n  endpoints: [{{address: '10.9.9.9:1'}}]\n"
        );
        let errors = compile_err(&dup_host);
        assert!(
            errors.iter().any(|e| e.contains("Agent default/tools: spec.hosts[0]: host `tools.mesh.local` is already claimed by agent other")),
            "{errors:?}"
        );

        let host_is_name = "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: Agent\nmetadata: {name: a}\nspec: {hosts: [b], endpoints: [{address: '10.0.0.1:1'}]}\n---\napiVersion: mesh.agentmesh.dev/v1alpha1\nkind: Agent\nmetadata: {name: b}\nspec: {endpoints: [{address: '10.0.0.2:1'}]}\n";
        let errors = compile_err(host_is_name);
        assert!(
            errors
                .iter()
                .any(|e| e.contains("host `b` is already claimed by agent b")),
            "{errors:?}"
        );

        let bad_fallback = "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: Agent\nmetadata: {name: a}\nspec: {endpoints: [{address: '10.0.0.1:1'}], fallback: ghost}\n";
        let errors = compile_err(bad_fallback);
        assert_eq!(
            errors,
            ["Agent default/a: spec.fallback: unknown agent `ghost`"]
        );

        let same_name = "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: Agent\nmetadata: {name: a}\nspec: {endpoints: [{address: '10.0.0.1:1'}]}\n---\napiVersion: mesh.agentmesh.dev/v1alpha1\nkind: Agent\nmetadata: {name: a, namespace: other}\nspec: {endpoints: [{address: '10.0.0.2:1'}]}\n";
        let errors = compile_err(same_name);
        assert!(
            errors[0].contains("already used by Agent default/a"),
            "{errors:?}"
        );

        let two_traffic = "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: a}\nspec: {targetAgent: x}\n---\napiVersion: mesh.agentmesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: b}\nspec: {targetAgent: x}\n";
        let errors = compile_err(two_traffic);
        assert_eq!(
            errors,
            [
                "TrafficPolicy default/b: spec.targetAgent: `x` is already targeted by TrafficPolicy default/a"
            ]
        );
    }

    #[test]
    fn unknown_policy_target_is_a_warning() {
        let policy = "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: early}\nspec: {targetAgent: later}\n";
        let snapshot = compile(policy, Action::Allow);
        assert_eq!(snapshot.warnings().len(), 1);
        assert!(snapshot.warnings()[0].contains("`later` is not registered"));
        // It still applies by name once traffic for that name shows up.
        assert!(
            !snapshot
                .authorize(&http("x", Some("later"), "GET", "/"))
                .allowed
        );
    }

    #[test]
    fn compile_rejects_invalid_resources_built_in_code() {
        let mut agent = match &parse_documents(REGISTRY, "r.yaml").resources[0].resource {
            Resource::Agent(agent) => agent.clone(),
            other => panic!("{other:?}"),
        };
        agent.spec.endpoints.clear();
        let errors = PolicySnapshot::compile(&[Resource::Agent(agent)], Action::Allow).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "Agent default/tools: spec.endpoints: at least one endpoint is required"
        );
    }

    #[test]
    fn traffic_defaults_and_wildcard_fallback() {
        let snapshot = compile("", Action::Allow);
        let defaults = snapshot.traffic("tools");
        assert_eq!(defaults.policy, None);
        assert_eq!(defaults.timeouts.connect.as_secs(), 5);
        assert_eq!(defaults.timeouts.request.as_secs(), 30);
        assert_eq!(defaults.timeouts.idle.as_secs(), 300);
        assert!(defaults.timeouts.stream.is_zero());
        assert_eq!(defaults.retries.attempts, 2);
        assert_eq!(defaults.retries.backoff_base.as_millis(), 25);
        assert_eq!(defaults.retries.budget_percent, 20);
        assert_eq!(defaults.circuit_breaker.consecutive_failures, 5);
        assert_eq!(defaults.priority.max_queue, 128);
        assert_eq!(defaults.max_request_body_bytes, 4 * 1024 * 1024);

        let policies = r#"
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: everyone}
spec:
  targetAgent: "*"
  timeouts: {request: 2m}
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: tools}
spec:
  targetAgent: tools
  timeouts: {request: 1s, stream: 1h}
  retries: {attempts: 0, retryOn: [Status5xx, Timeout]}
  priority: {defaultClass: High, headerAllowed: true}
  rateLimits:
    - {from: "*", requestsPerSecond: 100, burst: 100}
    - {from: "research-*", requestsPerSecond: 10, burst: 10}
    - {from: planner, requestsPerSecond: 50, burst: 5}
    - {from: "*", tool: search, requestsPerSecond: 1, burst: 1}
"#;
        let snapshot = compile(policies, Action::Allow);
        let tools = snapshot.traffic("tools");
        assert_eq!(tools.policy.as_deref(), Some("default/tools"));
        assert_eq!(tools.timeouts.request.as_secs(), 1);
        assert_eq!(tools.timeouts.connect.as_secs(), 5);
        assert_eq!(tools.timeouts.stream.as_secs(), 3600);
        assert_eq!(tools.retries.attempts, 0);
        assert_eq!(
            tools.priority.default_class,
            crate::policy::PriorityClass::High
        );
        let other = snapshot.traffic("planner");
        assert_eq!(other.policy.as_deref(), Some("default/everyone"));
        assert_eq!(other.timeouts.request.as_secs(), 120);
        assert_eq!(
            snapshot.traffic("not-registered").policy.as_deref(),
            Some("default/everyone")
        );

        let rps = |source, tool| {
            tools
                .rate_limit_for(source, tool)
                .map(|r| r.requests_per_second)
        };
        assert_eq!(rps("planner", Some("search")), Some(1.0));
        assert_eq!(rps("planner", Some("fs_read")), Some(50.0));
        assert_eq!(rps("research-1", None), Some(10.0));
        assert_eq!(rps("someone", None), Some(100.0));
        assert_eq!(other.rate_limit_for("someone", None), None);
    }

    #[test]
    fn strip_port_cases() {
        assert_eq!(strip_port("a:80"), "a");
        assert_eq!(strip_port("a"), "a");
        assert_eq!(strip_port("a:b"), "a:b");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("[bad"), "[bad");
    }

    #[test]
    fn reach_ignores_the_l7_conditions_of_allow_rules_but_not_of_deny_rules() {
        let snapshot = compile(
            r#"
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: tools-access}
spec:
  targetAgent: tools
  action: Allow
  rules:
    - from: [planner]
      mcp: {tools: ["fs_*"]}
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: tools-deny}
spec:
  targetAgent: tools
  action: Deny
  rules:
    - from: [planner]
      mcp: {tools: [fs_write]}
    - from: [intruder]
"#,
            Action::Allow,
        );
        let reach = |source: &'static str, destination: &'static str| {
            let request = RequestAttributes {
                source,
                destination: Some(destination),
                ..RequestAttributes::default()
            };
            snapshot.check_reach(&request).decision(&request)
        };
        // An opaque request is refused (no MCP tool), but the planner may reach the agent.
        let opaque = RequestAttributes {
            source: "planner",
            destination: Some("tools"),
            ..RequestAttributes::default()
        };
        assert!(!snapshot.authorize(&opaque).allowed);
        let planner = reach("planner", "tools");
        assert!(planner.allowed, "{planner:?}");
        assert_eq!(planner.policy.as_deref(), Some("default/tools-access"));
        let intruder = reach("intruder", "tools");
        assert!(!intruder.allowed);
        assert_eq!(intruder.policy.as_deref(), Some("default/tools-deny"));
        let other = reach("writer", "tools");
        assert!(!other.allowed);
        assert!(
            other.reason.contains("no AccessPolicy rule allows writer"),
            "{other:?}"
        );
        assert!(
            reach("anyone", "planner").allowed,
            "no policy restricts planner"
        );
    }
}
