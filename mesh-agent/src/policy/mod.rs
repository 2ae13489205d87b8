//! Policy: mesh resources (`Agent`, `AccessPolicy`, `TrafficPolicy`, and the `AgentInstance`
//! records of registered workloads), their validation, and the
//! compiled, immutable snapshot the proxy reads per request. This module owns the resource
//! types, the loader (text and directories), the compiled [`PolicySnapshot`] with authorization
//! and traffic settings, the [`PolicyStore`] that swaps snapshots atomically and watches a
//! directory, and the per-key [`RateLimiter`].
//!
//! # Resources
//!
//! Kubernetes-style documents (`apiVersion: mesh.agentmesh.dev/v1alpha1`, `kind`,
//! `metadata: {name, namespace, labels}`, `spec`), camelCase, unknown fields rejected. A file may
//! hold several documents separated by `---`; JSON is accepted too. Every validation message
//! names the resource, the field path and the problem, e.g.
//! `AccessPolicy default/planner-tools: spec.rules[0].mcp.tools[1]: empty pattern`.
//!
//! Agents are looked up by name across namespaces, so agent names are unique mesh-wide.
//!
//! # Authorization semantics (Istio-like)
//!
//! The policies that apply to a request are those whose `targetAgent` is the destination's name
//! or `*`. For an unregistered destination (a raw IP) only `*` policies apply.
//!
//! 1. `Deny` policies first: if any rule of any applicable `Deny` policy matches, the request is
//!    denied.
//! 2. If at least one applicable `Allow` policy exists, the request must match one of their
//!    rules, otherwise it is denied ("no rule allows it"). An `Allow` policy with no rules thus
//!    closes its target.
//! 3. If no `Allow` policy applies, the destination is open: the request is allowed, unless the
//!    snapshot was compiled with `default_action = Deny`, in which case it is denied.
//!
//! A rule matches when its `from` list matches the source workload and every part it states
//! matches: `http` (methods, case-insensitive; paths, query string ignored), `mcp` (only MCP
//! requests; a `tools` list only matches requests that name a tool), `a2a` (only A2A requests).
//! An empty list inside a part does not constrain. Patterns are exact, `*`, or a prefix ending
//! in `*` (`fs_*`, `/api/*`). Paths are matched as the proxy hands them over: the proxy is
//! expected to normalise them (dot segments, percent-encoding) before asking.
//!
//! The [`Decision`] names the policy (`namespace/name`) and rule index that decided, and a
//! human-readable reason for access logs.
//!
//! # Traffic settings
//!
//! [`PolicySnapshot::traffic`] returns the `TrafficPolicy` that targets the agent by name, else
//! the `*` one, else the defaults. Rate limits are per (source workload, destination agent,
//! tool when the limit names one); when several limits match a request, the most specific wins
//! (a limit naming the tool, then an exact `from`, then the longest `from` prefix, then `*`).
//!
//! # Reloads
//!
//! The [`PolicyStore`] reloads all-or-nothing: if any resource of the directory is rejected or
//! the set does not compile, the previous snapshot stays active, the problems are logged and
//! kept for the admin endpoint. Dropping only the bad resource could silently remove a `Deny`
//! policy, so a partial reload is never applied. The loader itself still returns the good
//! resources with the errors, for `meshctl` and for callers that decide otherwise.

mod load;
mod ratelimit;
mod resources;
mod snapshot;
mod store;

use std::hash::Hasher;

pub use load::{
    LoadError, LoadReport, Loaded, Origin, dir_fingerprint, load_dir, load_file, parse_documents,
};
pub use ratelimit::{DEFAULT_MAX_KEYS, RateLimit, RateLimitKey, RateLimiter};
pub(crate) use resources::name_problem;
pub use resources::{
    A2aMatch, API_VERSION, AccessPolicy, AccessPolicySpec, Action, Agent, AgentInstance,
    AgentInstanceSpec, AgentSpec, Capabilities, CircuitBreaker, DEFAULT_MAX_REQUEST_BODY_BYTES,
    DEFAULT_NAMESPACE, Dedup, EndpointSpec, HeaderMatch, Health, HttpMatch, Kind,
    MAX_RETRY_ATTEMPTS, McpMatch, Metadata, Pattern, Priority, PriorityClass, PrioritySource,
    Protocol, RateLimitSpec, Resource, ResourceKey, Retries, RetryOn, RouteBackend, RouteMatch,
    RouteSpec, Rule, Timeouts, TrafficPolicy, TrafficPolicySpec, TypedResource,
};
pub use snapshot::{
    AgentEntry, Decision, Endpoint, PolicySnapshot, RateLimitRule, RequestAttributes, Route,
    RouteRequest, TrafficSettings, Verdict,
};
pub use store::PolicyStore;

/// A problem with one resource, or between resources.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A field of a resource is wrong (also used for cross-resource conflicts).
    #[error("{resource}: {field}: {problem}")]
    Invalid {
        /// `Kind namespace/name`.
        resource: String,
        /// Field path, e.g. `spec.rules[0].mcp.tools[1]`.
        field: String,
        problem: String,
    },
    /// The document is not a well-formed resource (syntax, types, unknown fields or kinds).
    #[error("{resource}: {message}")]
    Parse {
        /// `Kind namespace/name` when the document says, else `document`.
        resource: String,
        message: String,
    },
    /// The same kind/namespace/name appears twice.
    #[error("{resource}: defined again (first defined in {first})")]
    Duplicate { resource: String, first: String },
    /// A file or directory could not be read.
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
}

/// 64-bit FNV-1a: a stable (cross-version, cross-process) hash for fingerprints and content
/// hashes that operators compare in logs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv64 {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}
