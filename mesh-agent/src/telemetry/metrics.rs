//! Prometheus text exposition (format 0.0.4) of the datapath and proxy counters. Values are
//! read when scraped, so the kernel's per-CPU maps stay the single source of truth.

use std::fmt::Write as _;

use mesh_common::{DatapathEvent, TrafficCounters};

use crate::proxy::{PROTOCOL_LABELS, ProxyStatsSnapshot, http::HttpStatsSnapshot};

/// One workload's counters with the labels that identify it.
#[derive(Debug, Clone)]
pub struct WorkloadSample {
    pub workload: String,
    pub cgroup: String,
    pub counters: TrafficCounters,
}

/// Escapes a label value as the exposition format requires.
pub fn escape_label(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for character in value.chars() {
        match character {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            other => escaped.push(other),
        }
    }
    escaped
}

type CounterField = fn(&TrafficCounters) -> u64;

/// (metric name, help, field) of every per-workload counter.
const WORKLOAD_COUNTERS: [(&str, &str, CounterField); 10] = [
    (
        "mesh_workload_transmit_bytes_total",
        "IP bytes sent by the workload (headers included).",
        |c| c.tx_bytes,
    ),
    (
        "mesh_workload_receive_bytes_total",
        "IP bytes received by the workload (headers included).",
        |c| c.rx_bytes,
    ),
    (
        "mesh_workload_transmit_packets_total",
        "IP packets sent by the workload.",
        |c| c.tx_packets,
    ),
    (
        "mesh_workload_receive_packets_total",
        "IP packets received by the workload.",
        |c| c.rx_packets,
    ),
    (
        "mesh_workload_transmit_payload_bytes_total",
        "TCP/UDP payload bytes sent (retransmissions once, in-kernel redirection included).",
        |c| c.tx_payload_bytes,
    ),
    (
        "mesh_workload_receive_payload_bytes_total",
        "TCP/UDP payload bytes received (retransmissions once, in-kernel redirection included).",
        |c| c.rx_payload_bytes,
    ),
    (
        "mesh_workload_connections_opened_total",
        "TCP connections the workload opened.",
        |c| c.connections_out,
    ),
    (
        "mesh_workload_connections_accepted_total",
        "TCP connections the workload accepted.",
        |c| c.connections_in,
    ),
    (
        "mesh_workload_connections_captured_total",
        "Outbound connections redirected to the agent.",
        |c| c.connections_captured,
    ),
    (
        "mesh_workload_redirected_bytes_total",
        "Payload bytes spliced socket to socket by sk_msg.",
        |c| c.redirected_bytes,
    ),
];

/// Renders every metric family.
pub fn render(
    workloads: &[WorkloadSample],
    events: &[(DatapathEvent, u64)],
    proxy: &ProxyStatsSnapshot,
    ready: bool,
) -> String {
    let mut out = String::new();
    for (name, help, field) in WORKLOAD_COUNTERS {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for sample in workloads {
            let _ = writeln!(
                out,
                "{name}{{workload=\"{}\",cgroup=\"{}\"}} {}",
                escape_label(&sample.workload),
                escape_label(&sample.cgroup),
                field(&sample.counters)
            );
        }
    }
    let name = "mesh_datapath_events_total";
    let _ = writeln!(
        out,
        "# HELP {name} Datapath events counted by the kernel programs.\n# TYPE {name} counter"
    );
    for (event, count) in events {
        let _ = writeln!(out, "{name}{{event=\"{}\"}} {count}", event.name());
    }
    let proxy_counters: [(&str, &str, u64); 5] = [
        (
            "mesh_proxy_connections_accepted_total",
            "Connections accepted by the capture listeners.",
            proxy.accepted,
        ),
        (
            "mesh_proxy_uncaptured_connections_total",
            "Accepted connections with no kernel record (closed).",
            proxy.uncaptured,
        ),
        (
            "mesh_proxy_upstream_failures_total",
            "Captured connections whose original destination failed.",
            proxy.upstream_failures,
        ),
        (
            "mesh_proxy_denied_connections_total",
            "Opaque or TLS connections refused by access policy (reset).",
            proxy.denied,
        ),
        (
            "mesh_proxy_upstream_bytes_total",
            "Bytes carried from workloads to their destinations.",
            proxy.bytes_to_upstream,
        ),
    ];
    write_counters(&mut out, &proxy_counters);
    let name = "mesh_proxy_downstream_bytes_total";
    let _ = writeln!(
        out,
        "# HELP {name} Bytes carried from destinations back to workloads.\n# TYPE {name} counter\n{name} {}",
        proxy.bytes_to_workload
    );
    let name = "mesh_proxy_spliced_bytes_total";
    let _ = writeln!(
        out,
        "# HELP {name} Part of the carried bytes that moved by splice(2), without a copy through the agent.\n# TYPE {name} counter\n{name} {}",
        proxy.bytes_spliced
    );
    let name = "mesh_proxy_connections_by_protocol_total";
    let _ = writeln!(
        out,
        "# HELP {name} Captured connections by the protocol detected from the client's first bytes.\n# TYPE {name} counter"
    );
    for (label, count) in PROTOCOL_LABELS.iter().zip(proxy.by_protocol) {
        let _ = writeln!(out, "{name}{{protocol=\"{label}\"}} {count}");
    }
    let name = "mesh_proxy_connections_active";
    let _ = writeln!(
        out,
        "# HELP {name} Connections being forwarded now.\n# TYPE {name} gauge\n{name} {}",
        proxy.active
    );
    let name = "mesh_agent_ready";
    let _ = writeln!(
        out,
        "# HELP {name} 1 when the datapath is attached and the listeners serve.\n# TYPE {name} gauge\n{name} {}",
        u8::from(ready)
    );
    out
}

/// The policy store's state for [`render_l7`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicySample {
    pub reloads_ok: u64,
    pub reloads_rejected: u64,
    pub resources: usize,
    pub content_hash: u64,
}

/// The L7 path's counters and the policy store's state, in the exposition format.
pub fn render_l7(http: &HttpStatsSnapshot, policy: &PolicySample) -> String {
    let mut out = String::new();
    let counters = [
        (
            "mesh_http_requests_total",
            "HTTP requests (HTTP/1.1 and HTTP/2) received from captured workloads.",
            http.requests,
        ),
        (
            "mesh_http_denied_requests_total",
            "Requests refused by access policy.",
            http.denied,
        ),
        (
            "mesh_http_rate_limited_requests_total",
            "Requests refused by a rate limit (429 or the protocol's equivalent).",
            http.rate_limited,
        ),
        (
            "mesh_http_retries_total",
            "Upstream attempts repeated after a retryable failure.",
            http.retries,
        ),
        (
            "mesh_http_upstream_errors_total",
            "Requests answered by the mesh because no upstream response could be had.",
            http.upstream_errors,
        ),
        (
            "mesh_http_upstream_timeouts_total",
            "Requests whose upstream did not answer in time.",
            http.timeouts,
        ),
        (
            "mesh_http_rejected_requests_total",
            "Malformed or oversized requests refused before policy.",
            http.rejected,
        ),
        (
            "mesh_http_shed_requests_total",
            "Requests refused by the priority queues of a saturated agent (503, Retry-After).",
            http.shed,
        ),
        (
            "mesh_http_deduplicated_requests_total",
            "Duplicate requests answered with the original request's response.",
            http.deduplicated,
        ),
        (
            "mesh_http_websocket_upgrades_total",
            "WebSocket upgrades joined end to end.",
            http.websocket_upgrades,
        ),
        (
            "mesh_policy_reloads_total",
            "Policy reloads (folder or etcd) that compiled; the snapshot is replaced when its content changed.",
            policy.reloads_ok,
        ),
        (
            "mesh_policy_rejected_reloads_total",
            "Policy reloads (folder or etcd) refused (the last good snapshot stayed active).",
            policy.reloads_rejected,
        ),
    ];
    write_counters(&mut out, &counters);
    let name = "mesh_jsonrpc_requests_total";
    let _ = writeln!(
        out,
        "# HELP {name} JSON-RPC requests seen on the L7 path, by protocol family.\n# TYPE {name} counter\n{name}{{family=\"mcp\"}} {}\n{name}{{family=\"a2a\"}} {}",
        http.mcp_requests, http.a2a_requests
    );
    let name = "mesh_policy_resources";
    let _ = writeln!(
        out,
        "# HELP {name} Resources in the active policy snapshot, labelled with its content hash.\n# TYPE {name} gauge\n{name}{{hash=\"{:016x}\"}} {}",
        policy.content_hash, policy.resources
    );
    out
}

/// Registered instances in the active snapshot (every node's), by health.
pub fn render_instances(instances: &[crate::policy::AgentInstance]) -> String {
    use crate::policy::Health;
    let name = "mesh_registry_instances";
    let mut out = format!(
        "# HELP {name} Registered agent instances in the active snapshot (all nodes), by health.\n# TYPE {name} gauge\n"
    );
    for health in [Health::Healthy, Health::Unhealthy, Health::Unknown] {
        let count = instances
            .iter()
            .filter(|instance| instance.spec.health == health)
            .count();
        let _ = writeln!(out, "{name}{{health=\"{}\"}} {count}", health.as_str());
    }
    out
}

/// The etcd control plane's state (etcd mode only).
pub fn render_control(control: &crate::control::ControlStatusSample) -> String {
    let mut out = String::new();
    let gauges: [(&str, &str, String); 6] = [
        (
            "mesh_control_connected",
            "1 while the agent is connected to etcd and watching.",
            u8::from(control.connected).to_string(),
        ),
        (
            "mesh_control_serving_cache",
            "1 while the active resources come from the local cache file (etcd unreachable since start).",
            u8::from(control.serving_cache).to_string(),
        ),
        (
            "mesh_control_sync_revision",
            "Highest etcd revision the agent has seen (events and progress notifications).",
            control.revision.to_string(),
        ),
        (
            "mesh_control_snapshot_revision",
            "etcd revision of the resources the active snapshot was built from: what requests are checked against.",
            control.snapshot_revision.to_string(),
        ),
        (
            "mesh_control_snapshot_age_seconds",
            "Seconds since the resources were last known to match etcd (grows while etcd is away); -1 before the first sync.",
            control
                .snapshot_age_seconds
                .map_or_else(|| "-1".to_owned(), |age| format!("{age:.3}")),
        ),
        (
            "mesh_control_invalid_resources",
            "Keys in etcd whose current value is invalid (their last good version stays in force).",
            control.invalid_resources.to_string(),
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    let counters: [(&str, &str, u64); 4] = [
        (
            "mesh_control_rejected_updates_total",
            "Updates from etcd refused: invalid values, or sets that do not compile.",
            control.rejected_updates,
        ),
        (
            "mesh_control_snapshots_total",
            "Snapshots built from etcd.",
            control.snapshots,
        ),
        (
            "mesh_control_relists_total",
            "Full listings of the resources (start, reconnection, compaction).",
            control.relists,
        ),
        (
            "mesh_control_connection_failures_total",
            "Times etcd could not be reached or the watch broke.",
            control.connection_failures,
        ),
    ];
    write_counters(&mut out, &counters);
    out
}

/// The configured workloads' enrolment (`spec.workloads`, kept enrolled as their cgroups come
/// and go).
pub fn render_configured_workloads(workloads: &crate::workloads::WorkloadKeeperSample) -> String {
    let mut out = String::new();
    write_gauges(
        &mut out,
        &[
            (
                "mesh_configured_workloads_enrolled",
                "Configured workloads whose cgroup is enrolled.",
                workloads.enrolled,
            ),
            (
                "mesh_configured_workloads_missing",
                "Configured workloads whose cgroup does not exist (enrolled when it appears).",
                workloads.missing,
            ),
            (
                "mesh_configured_workloads_failing",
                "Configured workloads whose cgroup exists but could not be enrolled.",
                workloads.failing,
            ),
        ],
    );
    write_counters(
        &mut out,
        &[
            (
                "mesh_configured_workload_enrolments_total",
                "Enrolments of configured workloads' cgroups (at start, late, or created anew).",
                workloads.enrolments,
            ),
            (
                "mesh_configured_workload_removals_total",
                "Cgroup ids of configured workloads unenrolled because the cgroup went or was created anew.",
                workloads.removals,
            ),
        ],
    );
    out
}

/// Pod enrolment's state (Kubernetes only).
pub fn render_pods(pods: &crate::kube::PodEnrolmentSample) -> String {
    let mut out = String::new();
    let gauges: [(&str, &str, u64); 3] = [
        (
            "mesh_kubernetes_connected",
            "1 while the agent lists and watches its node's pods.",
            u64::from(pods.connected),
        ),
        (
            "mesh_kubernetes_pods_enrolled",
            "Pods of this node in the mesh (their cgroups captured).",
            pods.enrolled,
        ),
        (
            "mesh_kubernetes_pods_pending",
            "Selected pods whose cgroup has not appeared yet.",
            pods.pending,
        ),
    ];
    write_gauges(&mut out, &gauges);
    write_counters(
        &mut out,
        &[
            (
                "mesh_kubernetes_lists_total",
                "Full listings of the node's pods (start, expired watches, reconnections).",
                pods.lists,
            ),
            (
                "mesh_kubernetes_failures_total",
                "Times the API server could not be reached or a watch broke.",
                pods.failures,
            ),
            (
                "mesh_kubernetes_enrol_errors_total",
                "Pods the datapath refused to enrol (e.g. the agent's own pod).",
                pods.enrol_errors,
            ),
        ],
    );
    out
}

/// Writes unlabelled counters: `(name, help, value)` each.
pub(crate) fn write_counters(out: &mut String, counters: &[(&str, &str, u64)]) {
    write_unlabelled(out, "counter", counters);
}

/// Writes unlabelled gauges: `(name, help, value)` each.
pub(crate) fn write_gauges(out: &mut String, gauges: &[(&str, &str, u64)]) {
    write_unlabelled(out, "gauge", gauges);
}

fn write_unlabelled(out: &mut String, kind: &str, series: &[(&str, &str, u64)]) {
    for (name, help, value) in series {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("line\nbreak"), "line\\nbreak");
    }

    #[test]
    fn exposition_has_help_type_and_samples() {
        let sample = WorkloadSample {
            workload: "planner".into(),
            cgroup: "/agents/planner".into(),
            counters: TrafficCounters {
                tx_payload_bytes: 42,
                connections_captured: 3,
                ..Default::default()
            },
        };
        let text = render(
            &[sample],
            &[(DatapathEvent::Captured, 3)],
            &ProxyStatsSnapshot {
                accepted: 3,
                active: 1,
                ..Default::default()
            },
            true,
        );
        assert!(text.contains("# TYPE mesh_workload_transmit_payload_bytes_total counter"));
        assert!(text.contains(
            "mesh_workload_transmit_payload_bytes_total{workload=\"planner\",cgroup=\"/agents/planner\"} 42"
        ));
        assert!(text.contains("mesh_datapath_events_total{event=\"captured\"} 3"));
        assert!(text.contains("mesh_proxy_connections_active 1"));
        assert!(text.contains("mesh_agent_ready 1"));
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let family = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "undeclared family in {line}"
            );
        }
    }
}
