//! The etcd key layout of the control plane.
//!
//! ```text
//! <prefix>/<segment>/<namespace>/<name>     namespaced resources
//! <prefix>/nodes/<name>                     node records (cluster-scoped)
//! ```
//!
//! `<prefix>` is `/mesh/v1` unless configured otherwise; `<segment>` is the kind in lower case
//! and plural, as in a Kubernetes API path: `agents`, `accesspolicies`, `trafficpolicies`,
//! `agentinstances` (registered instances, each held by its node's lease), `nodes`. One segment per kind lets every reader list or watch exactly the kinds it needs
//! (agents never see node heartbeats or, later, certificate requests). Names and namespaces
//! are validated names (lowercase letters, digits, `-`, `.`), so they never contain `/`.

use crate::policy::{Kind, ResourceKey};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/mesh/v1";

/// Segment of node records.
pub const NODES_SEGMENT: &str = "nodes";

/// Kinds the agent compiles into its policy snapshot, in key order of their segments.
pub const SYNCED_KINDS: [Kind; 4] = [
    Kind::AccessPolicy,
    Kind::AgentInstance,
    Kind::Agent,
    Kind::TrafficPolicy,
];

/// The key segment of a resource kind.
pub fn segment(kind: Kind) -> &'static str {
    match kind {
        Kind::Agent => "agents",
        Kind::AccessPolicy => "accesspolicies",
        Kind::TrafficPolicy => "trafficpolicies",
        Kind::AgentInstance => "agentinstances",
    }
}

/// Why a prefix cannot be used.
pub fn prefix_problem(prefix: &str) -> Option<&'static str> {
    if !prefix.starts_with('/') {
        Some("must start with `/` (e.g. /mesh/v1)")
    } else if prefix.len() > 1 && prefix.ends_with('/') {
        Some("must not end with `/`")
    } else if prefix.contains("//") {
        Some("must not contain `//`")
    } else if prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
        Some("must not contain spaces or control characters")
    } else {
        None
    }
}

/// `<prefix>/<segment>/` : every resource of a kind.
pub fn kind_prefix(prefix: &str, kind: Kind) -> String {
    format!("{}/{}/", prefix.trim_end_matches('/'), segment(kind))
}

/// `<prefix>/<segment>/<namespace>/` : every resource of a kind in one namespace.
pub fn namespace_prefix(prefix: &str, kind: Kind, namespace: &str) -> String {
    format!("{}{namespace}/", kind_prefix(prefix, kind))
}

/// The key of one resource.
pub fn resource_key(prefix: &str, key: &ResourceKey) -> String {
    format!(
        "{}{}/{}",
        kind_prefix(prefix, key.kind),
        key.namespace,
        key.name
    )
}

/// `<prefix>/nodes/` : every node record.
pub fn nodes_prefix(prefix: &str) -> String {
    format!("{}/{NODES_SEGMENT}/", prefix.trim_end_matches('/'))
}

/// The key of a node record.
pub fn node_key(prefix: &str, node: &str) -> String {
    format!("{}{node}", nodes_prefix(prefix))
}

/// Reads kind, namespace and name back from a resource key. `None` for a key outside the
/// layout (another segment, a missing or extra part).
pub fn parse_resource_key(prefix: &str, key: &str) -> Option<ResourceKey> {
    let rest = key
        .strip_prefix(prefix.trim_end_matches('/'))?
        .strip_prefix('/')?;
    let mut parts = rest.split('/');
    let (segment_name, namespace, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || namespace.is_empty() || name.is_empty() {
        return None;
    }
    let kind = SYNCED_KINDS
        .into_iter()
        .find(|kind| segment(*kind) == segment_name)?;
    Some(ResourceKey {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// Parses a kind as operators type it: `Agent`, `agent`, `agents`, `AccessPolicy`,
/// `accesspolicy`, `accesspolicies`, `ap`, `TrafficPolicy`, `trafficpolicy`,
/// `trafficpolicies`, `tp`, `AgentInstance`, `agentinstances`, `instances` (case-insensitive).
pub fn parse_kind_argument(text: &str) -> Option<Kind> {
    match text.to_ascii_lowercase().as_str() {
        "agent" | "agents" => Some(Kind::Agent),
        "accesspolicy" | "accesspolicies" | "ap" => Some(Kind::AccessPolicy),
        "trafficpolicy" | "trafficpolicies" | "tp" => Some(Kind::TrafficPolicy),
        "agentinstance" | "agentinstances" | "instance" | "instances" => Some(Kind::AgentInstance),
        _ => None,
    }
}

/// The first key after every key starting with `prefix` (etcd's `range_end` for a prefix).
pub fn prefix_range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: the range is open-ended.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: Kind, namespace: &str, name: &str) -> ResourceKey {
        ResourceKey {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    #[test]
    fn keys_follow_the_layout_and_parse_back() {
        let cases = [
            (
                key(Kind::Agent, "default", "tools"),
                "/mesh/v1/agents/default/tools",
            ),
            (
                key(Kind::AccessPolicy, "team-a", "planner.tools"),
                "/mesh/v1/accesspolicies/team-a/planner.tools",
            ),
            (
                key(Kind::TrafficPolicy, "default", "all"),
                "/mesh/v1/trafficpolicies/default/all",
            ),
            (
                key(Kind::AgentInstance, "default", "tools.node-a.0c32d4d0"),
                "/mesh/v1/agentinstances/default/tools.node-a.0c32d4d0",
            ),
        ];
        for (resource, text) in cases {
            assert_eq!(resource_key(DEFAULT_PREFIX, &resource), text);
            assert_eq!(parse_resource_key(DEFAULT_PREFIX, text), Some(resource));
        }
        // A custom prefix, with or without a trailing slash given.
        let tools = key(Kind::Agent, "default", "tools");
        assert_eq!(resource_key("/x", &tools), "/x/agents/default/tools");
        assert_eq!(resource_key("/x/", &tools), "/x/agents/default/tools");
        assert_eq!(
            parse_resource_key("/x", "/x/agents/default/tools"),
            Some(tools)
        );
    }

    #[test]
    fn foreign_keys_do_not_parse() {
        for text in [
            "/mesh/v1/nodes/node-a",
            "/mesh/v1/agents/default",
            "/mesh/v1/agents/default/tools/extra",
            "/mesh/v1/agents//tools",
            "/mesh/v1/workflows/default/w",
            "/mesh/v2/agents/default/tools",
            "/mesh/v1agents/default/tools",
        ] {
            assert_eq!(parse_resource_key(DEFAULT_PREFIX, text), None, "{text}");
        }
    }

    #[test]
    fn prefixes_and_ranges() {
        assert_eq!(kind_prefix(DEFAULT_PREFIX, Kind::Agent), "/mesh/v1/agents/");
        assert_eq!(
            namespace_prefix(DEFAULT_PREFIX, Kind::TrafficPolicy, "ns"),
            "/mesh/v1/trafficpolicies/ns/"
        );
        assert_eq!(node_key(DEFAULT_PREFIX, "node-a"), "/mesh/v1/nodes/node-a");
        assert_eq!(prefix_range_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_range_end("a\u{7f}"), b"a\x80".to_vec());
        assert_eq!(prefix_range_end(""), vec![0]);
        assert_eq!(prefix_problem("/mesh/v1"), None);
        assert!(prefix_problem("mesh").is_some());
        assert!(prefix_problem("/mesh/").is_some());
        assert!(prefix_problem("/a//b").is_some());
        // Synced kinds come in the order of their segments.
        let segments: Vec<&str> = SYNCED_KINDS.iter().map(|kind| segment(*kind)).collect();
        let mut sorted = segments.clone();
        sorted.sort_unstable();
        assert_eq!(segments, sorted);
    }

    #[test]
    fn kind_arguments() {
        assert_eq!(parse_kind_argument("agents"), Some(Kind::Agent));
        assert_eq!(parse_kind_argument("Agent"), Some(Kind::Agent));
        assert_eq!(
            parse_kind_argument("AccessPolicies"),
            Some(Kind::AccessPolicy)
        );
        assert_eq!(parse_kind_argument("tp"), Some(Kind::TrafficPolicy));
        assert_eq!(parse_kind_argument("instances"), Some(Kind::AgentInstance));
        assert_eq!(parse_kind_argument("pods"), None);
    }
}
