//! Pods of this node, as the API server describes them, and where the kubelet put them in the
//! cgroup tree. Pure functions (parsing, selection, cgroup lookup) kept apart from the loop
//! in [`super::PodEnroller`] so they can be tested and fuzzed on their own.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::identity::SpiffeId;

/// A pod, reduced to the fields enrolment needs. Unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub resource_version: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Set when the pod is being deleted: the time by which it is to be gone (RFC 3339).
    #[serde(default)]
    pub deletion_timestamp: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub host_network: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub phase: Option<String>,
}

/// `GET /api/v1/pods`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodList {
    #[serde(default)]
    pub metadata: ListMeta,
    #[serde(default)]
    pub items: Vec<Pod>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListMeta {
    #[serde(default)]
    pub resource_version: String,
}

/// One line of a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Added(Pod),
    Modified(Pod),
    Deleted(Pod),
    /// Progress: the watch is at this resource version.
    Bookmark(String),
    /// The watch cannot go on from its resource version (410 Gone): list again.
    Expired,
    /// Another error the server reported in the stream.
    Error(String),
}

/// Parses one watch line. Errors name the problem; the caller logs and relists.
pub fn parse_watch_event(line: &[u8]) -> Result<WatchEvent, String> {
    #[derive(Deserialize)]
    struct Raw {
        #[serde(rename = "type")]
        kind: String,
        object: serde_json::Value,
    }
    let raw: Raw =
        serde_json::from_slice(line).map_err(|error| format!("not a watch event: {error}"))?;
    let pod = |object: serde_json::Value| {
        serde_json::from_value::<Pod>(object).map_err(|error| format!("not a pod: {error}"))
    };
    match raw.kind.as_str() {
        "ADDED" => pod(raw.object).map(WatchEvent::Added),
        "MODIFIED" => pod(raw.object).map(WatchEvent::Modified),
        "DELETED" => pod(raw.object).map(WatchEvent::Deleted),
        "BOOKMARK" => Ok(WatchEvent::Bookmark(
            raw.object["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )),
        "ERROR" => {
            if raw.object["code"].as_u64() == Some(410) {
                Ok(WatchEvent::Expired)
            } else {
                Ok(WatchEvent::Error(
                    raw.object["message"]
                        .as_str()
                        .unwrap_or("no message")
                        .to_owned(),
                ))
            }
        }
        other => Err(format!("unknown watch event type {other:?}")),
    }
}

/// What the mesh knows a pod by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub identity: SpiffeId,
}

/// Whether a pod is to be in the mesh, and as whom. Pods on another node, on the host
/// network (they share the node's sockets; capturing them would capture node services),
/// finished pods and pods whose namespace or service account cannot form a SPIFFE ID are not.
pub fn selected(pod: &Pod, node: &str, trust_domain: &str) -> Result<PodIdentity, &'static str> {
    if pod.spec.node_name.as_deref() != Some(node) {
        return Err("scheduled on another node");
    }
    if pod.spec.host_network {
        return Err("on the host network");
    }
    if matches!(pod.status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Err("finished");
    }
    if pod.metadata.uid.is_empty()
        || !pod
            .metadata
            .uid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-')
    {
        return Err("no valid uid");
    }
    let account = pod
        .spec
        .service_account_name
        .as_deref()
        .filter(|account| !account.is_empty())
        .unwrap_or("default");
    let identity = SpiffeId::for_service_account(trust_domain, &pod.metadata.namespace, account)
        .map_err(|_| "namespace or service account not valid in a SPIFFE ID")?;
    Ok(PodIdentity {
        uid: pod.metadata.uid.clone(),
        namespace: pod.metadata.namespace.clone(),
        name: pod.metadata.name.clone(),
        identity,
    })
}

/// The pod's cgroup under `root` (an absolute directory in the cgroup2 mount), as the
/// kubelet names it with either cgroup driver: `kubepods-<qos>-pod<uid_with_underscores>.slice`
/// (systemd) or `pod<uid>` (cgroupfs), at most `max_depth` levels down. Containers are
/// cgroups below it, so enrolling it covers all of them.
pub fn find_pod_cgroup(root: &Path, uid: &str, max_depth: usize) -> Option<PathBuf> {
    let systemd = format!("pod{}.slice", uid.replace('-', "_"));
    let cgroupfs = format!("pod{uid}");
    let matches =
        |name: &str| name == cgroupfs || name.ends_with(&systemd) && name.starts_with("kubepods");
    let mut level = vec![root.to_path_buf()];
    for _ in 0..max_depth {
        let mut next = Vec::new();
        for dir in level {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if matches(&name) {
                    return Some(entry.path());
                }
                // Pods live under kubepods*; don't wander through the rest of the node.
                if name.starts_with("kubepods") || dir != root {
                    next.push(entry.path());
                }
            }
        }
        level = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(node: &str, uid: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: "planner-0".into(),
                namespace: "prod".into(),
                uid: uid.into(),
                ..ObjectMeta::default()
            },
            spec: PodSpec {
                service_account_name: Some("planner".into()),
                node_name: Some(node.into()),
                host_network: false,
            },
            status: PodStatus {
                phase: Some("Running".into()),
            },
        }
    }

    const UID: &str = "3f2c1e4a-1b2c-4d5e-8f90-0123456789ab";

    #[test]
    fn pods_of_this_node_get_their_service_account_identity() {
        let selected = selected(&pod("node-a", UID), "node-a", "cluster.local").unwrap();
        assert_eq!(
            selected.identity.as_str(),
            "spiffe://cluster.local/ns/prod/sa/planner"
        );
        let mut no_account = pod("node-a", UID);
        no_account.spec.service_account_name = None;
        assert_eq!(
            super::selected(&no_account, "node-a", "cluster.local")
                .unwrap()
                .identity
                .as_str(),
            "spiffe://cluster.local/ns/prod/sa/default"
        );
    }

    #[test]
    fn other_nodes_host_network_finished_and_odd_pods_are_left_alone() {
        assert!(selected(&pod("node-b", UID), "node-a", "td").is_err());
        let mut host = pod("node-a", UID);
        host.spec.host_network = true;
        assert!(selected(&host, "node-a", "td").is_err());
        let mut done = pod("node-a", UID);
        done.status.phase = Some("Succeeded".into());
        assert!(selected(&done, "node-a", "td").is_err());
        assert!(selected(&pod("node-a", "../../etc"), "node-a", "td").is_err());
        let mut bad_ns = pod("node-a", UID);
        bad_ns.metadata.namespace = "a/b".into();
        assert!(selected(&bad_ns, "node-a", "td").is_err());
    }

    #[test]
    fn watch_lines_parse_into_events() {
        let added = br#"{"type":"ADDED","object":{"kind":"Pod","metadata":{"name":"p","namespace":"prod","uid":"ab-12","resourceVersion":"7"},"spec":{"nodeName":"n","serviceAccountName":"sa","containers":[]},"status":{"phase":"Pending"}}}"#;
        match parse_watch_event(added).unwrap() {
            WatchEvent::Added(pod) => {
                assert_eq!(pod.metadata.uid, "ab-12");
                assert_eq!(pod.spec.service_account_name.as_deref(), Some("sa"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_watch_event(br#"{"type":"BOOKMARK","object":{"kind":"Pod","metadata":{"resourceVersion":"42"}}}"#),
            Ok(WatchEvent::Bookmark("42".into()))
        );
        assert_eq!(
            parse_watch_event(
                br#"{"type":"ERROR","object":{"kind":"Status","code":410,"message":"too old"}}"#
            ),
            Ok(WatchEvent::Expired)
        );
        assert_eq!(
            parse_watch_event(
                br#"{"type":"ERROR","object":{"kind":"Status","code":500,"message":"boom"}}"#
            ),
            Ok(WatchEvent::Error("boom".into()))
        );
        assert!(parse_watch_event(b"{").is_err());
        assert!(parse_watch_event(br#"{"type":"ADDED","object":{"metadata":5}}"#).is_err());
        assert!(parse_watch_event(br#"{"type":"WHAT","object":{}}"#).is_err());
    }

    #[test]
    fn pod_cgroups_are_found_with_either_cgroup_driver() {
        let root = tempfile::tempdir().unwrap();
        let systemd = root
            .path()
            .join("kubepods.slice/kubepods-burstable.slice")
            .join(format!(
                "kubepods-burstable-pod{}.slice",
                UID.replace('-', "_")
            ));
        std::fs::create_dir_all(systemd.join("cri-containerd-0123.scope")).unwrap();
        assert_eq!(find_pod_cgroup(root.path(), UID, 4), Some(systemd));

        let root = tempfile::tempdir().unwrap();
        let guaranteed = root.path().join("kubepods").join(format!("pod{UID}"));
        std::fs::create_dir_all(&guaranteed).unwrap();
        std::fs::create_dir_all(root.path().join("system.slice/pod-lookalike")).unwrap();
        assert_eq!(find_pod_cgroup(root.path(), UID, 4), Some(guaranteed));
        assert_eq!(find_pod_cgroup(root.path(), "0000", 4), None);
        // Outside kubepods* at the top level: not searched.
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join(format!("elsewhere/pod{UID}"))).unwrap();
        assert_eq!(find_pod_cgroup(root.path(), UID, 4), None);
    }
}
