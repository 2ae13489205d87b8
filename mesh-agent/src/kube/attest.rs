//! Pod attestation for the signer (`mesh-agent ca run --kubernetes ...`): before it issues
//! `spiffe://<td>/ns/<ns>/sa/<sa>` to node N, the signer asks the Kubernetes API server whether
//! a pod of that service account really is scheduled on N, instead of taking the node's own
//! `WorkloadIdentity` record for it. This module owns that question: the command-line settings,
//! the request (`GET /api/v1/namespaces/<ns>/pods?fieldSelector=spec.nodeName=N`, one per
//! certificate request, bounded by a timeout) and the reading of the answer.
//!
//! A pod counts when it is in the namespace, names the service account
//! (`spec.serviceAccountName`, `default` when empty, as the agent names it), is bound to the
//! node (`spec.nodeName`), has not finished (phase neither `Succeeded` nor `Failed`), is not a
//! static (mirror) pod (which the node itself declares) and, if it is being deleted, is still
//! within its grace period (its `deletionTimestamp`, plus [`DELETION_TOLERANCE`] for clock
//! differences). Anything else, including an API server that cannot be reached or refuses the
//! signer, is a refusal: fail closed.
//!
//! One query per request rather than a watch-fed cache of every pod in the cluster: requests
//! are rare (one per identity and node per half certificate lifetime), the answer is the API
//! server's current view rather than a cache's, a failure is visible as a failure (a cache
//! would have to decide how stale is too stale), and the signer holds no cluster-wide state.
//!
//! The signer answers requests one at a time, so an API server that does not answer at all
//! would cost every request the whole timeout. After such a failure (unreachable, no answer in
//! time) the API server is not asked again for one timeout: requests meanwhile are refused at
//! once with the same cause (agents retry with backoff). A 401 or another answer is not held.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use super::{KubeClient, KubeError, KubeSettings, encode_query, pods::PodList};

/// The service account token where Kubernetes mounts it in a pod.
pub const IN_CLUSTER_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The API server's CA where Kubernetes mounts it in a pod.
pub const IN_CLUSTER_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// How long past its `deletionTimestamp` a pod being deleted still counts (clock differences
/// between the API server and the signer).
pub const DELETION_TOLERANCE: Duration = Duration::from_secs(60);
/// The annotation the kubelet puts on the API's copy of a static pod.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// `mesh-agent ca run` flags: where the Kubernetes API server is, and how to authenticate.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KubernetesArgs {
    /// Check every `/ns/<ns>/sa/<sa>` request against the Kubernetes API server: `in-cluster`
    /// (address from KUBERNETES_SERVICE_HOST/PORT, token and CA from the pod's service account
    /// mount) or `https://HOST[:PORT]`. Absent: no Kubernetes check (bare metal).
    #[arg(
        long,
        env = "MESH_KUBERNETES",
        value_name = "in-cluster|https://HOST[:PORT]"
    )]
    pub kubernetes: Option<String>,
    /// Bearer token file, re-read for every request (default: the service account mount's).
    #[arg(long, env = "MESH_KUBERNETES_TOKEN_FILE", requires = "kubernetes")]
    pub kubernetes_token_file: Option<PathBuf>,
    /// CA certificate(s) of the API server (default: the service account mount's).
    #[arg(long, env = "MESH_KUBERNETES_CA_FILE", requires = "kubernetes")]
    pub kubernetes_ca_file: Option<PathBuf>,
    /// Time allowed for one pod query, answer included; past it the request is refused.
    #[arg(long, env = "MESH_KUBERNETES_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub kubernetes_timeout: Duration,
}

impl KubernetesArgs {
    /// The client settings, `None` without `--kubernetes`. `in-cluster` reads
    /// KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT.
    pub fn settings(&self) -> Result<Option<KubeSettings>, KubeError> {
        let Some(api) = &self.kubernetes else {
            return Ok(None);
        };
        let api_server = if api == "in-cluster" {
            in_cluster_address(
                std::env::var("KUBERNETES_SERVICE_HOST").ok(),
                std::env::var("KUBERNETES_SERVICE_PORT").ok(),
            )?
        } else {
            api.clone()
        };
        if self.kubernetes_timeout.is_zero() {
            return Err(KubeError::Address(format!(
                "{api_server} with a zero --kubernetes-timeout"
            )));
        }
        Ok(Some(KubeSettings {
            api_server,
            token_file: self
                .kubernetes_token_file
                .clone()
                .unwrap_or_else(|| PathBuf::from(IN_CLUSTER_TOKEN_FILE)),
            ca_file: self
                .kubernetes_ca_file
                .clone()
                .unwrap_or_else(|| PathBuf::from(IN_CLUSTER_CA_FILE)),
            request_timeout: self.kubernetes_timeout,
        }))
    }
}

/// The in-cluster API server address from the service's environment variables.
fn in_cluster_address(host: Option<String>, port: Option<String>) -> Result<String, KubeError> {
    let host = host
        .filter(|host| !host.is_empty())
        .ok_or(KubeError::NotInCluster)?;
    let port = port
        .filter(|port| !port.is_empty())
        .unwrap_or_else(|| "443".to_owned());
    Ok(if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    })
}

/// What the API server says about a service account on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attestation {
    /// This pod of the account runs (or is starting, or is terminating in its grace period)
    /// on the node.
    Runs { pod: String },
    /// No pod counts; the reason names the pods passed over, if any.
    NoPod { reason: String },
}

/// Asks the API server about pods. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PodAttestor {
    client: KubeClient,
    api_server: String,
    timeout: Duration,
    outage: Arc<Mutex<Outage>>,
}

/// The last time the API server could not be reached, held for a while (see the module
/// comment).
#[derive(Debug, Default)]
struct Outage {
    last: Option<(Instant, String)>,
}

impl Outage {
    /// The cause of an outage seen less than `hold` before `now`.
    fn current(&self, now: Instant, hold: Duration) -> Option<(Duration, &str)> {
        let (at, cause) = self.last.as_ref()?;
        let ago = now.saturating_duration_since(*at);
        (ago < hold).then_some((ago, cause.as_str()))
    }

    fn record(&mut self, now: Instant, result: &Result<PodList, KubeError>) {
        match result {
            Err(KubeError::Unreachable { cause, .. }) => self.last = Some((now, cause.clone())),
            _ => self.last = None,
        }
    }
}

impl PodAttestor {
    /// Reads the CA and checks the address; does not connect.
    pub fn new(settings: &KubeSettings) -> Result<Self, KubeError> {
        Ok(PodAttestor {
            client: KubeClient::new(settings)?,
            api_server: settings.api_server.clone(),
            timeout: settings.request_timeout,
            outage: Arc::default(),
        })
    }

    /// The API server's address, for logs.
    pub fn api_server(&self) -> &str {
        &self.api_server
    }

    /// The path of the query for `namespace`'s pods bound to `node`.
    pub fn query_path(namespace: &str, node: &str) -> String {
        format!(
            "/api/v1/namespaces/{}/pods?fieldSelector={}",
            encode_query(namespace),
            encode_query(&format!("spec.nodeName={node}"))
        )
    }

    /// Whether a pod of `namespace`/`account` runs on `node`, as of the API server's answer.
    /// An `Err` is an API server that could not be asked (unreachable, too slow, a non-2xx
    /// answer such as 401 or 403, an undecodable body).
    pub async fn attest(
        &self,
        namespace: &str,
        account: &str,
        node: &str,
    ) -> Result<Attestation, KubeError> {
        {
            let outage = self.outage.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((ago, cause)) = outage.current(Instant::now(), self.timeout) {
                return Err(KubeError::Unreachable {
                    address: self.api_server.clone(),
                    cause: format!(
                        "{cause} ({}s ago; not asked again for {:?} after that)",
                        ago.as_secs(),
                        self.timeout
                    ),
                });
            }
        }
        let path = Self::query_path(namespace, node);
        let result = tokio::time::timeout(self.timeout, self.client.get_json(&path))
            .await
            .unwrap_or_else(|_| {
                Err(KubeError::Unreachable {
                    address: self.api_server.clone(),
                    cause: format!("no complete answer to {path} within {:?}", self.timeout),
                })
            });
        self.outage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(Instant::now(), &result);
        let list = result?;
        Ok(attestation(
            &list,
            namespace,
            account,
            node,
            SystemTime::now(),
        ))
    }
}

/// Reads a pod list (see the module comment for what counts). `now` is the signer's clock.
pub fn attestation(
    list: &PodList,
    namespace: &str,
    account: &str,
    node: &str,
    now: SystemTime,
) -> Attestation {
    let mut passed_over = Vec::new();
    for pod in &list.items {
        // The field selector's work, checked again: the answer is input too.
        if pod.metadata.namespace != namespace || pod.spec.node_name.as_deref() != Some(node) {
            continue;
        }
        let pod_account = pod
            .spec
            .service_account_name
            .as_deref()
            .filter(|name| !name.is_empty())
            .unwrap_or("default");
        if pod_account != account {
            continue;
        }
        let name = &pod.metadata.name;
        if let Some(phase @ ("Succeeded" | "Failed")) = pod.status.phase.as_deref() {
            passed_over.push(format!("{name} has finished ({phase})"));
            continue;
        }
        if pod.metadata.annotations.contains_key(MIRROR_ANNOTATION) {
            passed_over.push(format!(
                "{name} is a static pod, declared by the node itself"
            ));
            continue;
        }
        if let Some(deletion) = &pod.metadata.deletion_timestamp {
            match humantime::parse_rfc3339_weak(deletion) {
                Ok(gone_by) => {
                    let overdue = now
                        .duration_since(gone_by)
                        .is_ok_and(|late| late > DELETION_TOLERANCE);
                    if overdue {
                        passed_over.push(format!(
                            "{name} is being deleted and was to be gone by {deletion}"
                        ));
                        continue;
                    }
                }
                Err(_) => {
                    passed_over.push(format!(
                        "{name} is being deleted (unreadable deletionTimestamp {deletion:?})"
                    ));
                    continue;
                }
            }
        }
        return Attestation::Runs { pod: name.clone() };
    }
    let mut reason = format!(
        "no pod of service account {namespace}/{account} is scheduled on node {node:?} \
         and running"
    );
    if !passed_over.is_empty() {
        reason.push_str(&format!(" ({})", passed_over.join("; ")));
    }
    Attestation::NoPod { reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::pods::{ObjectMeta, Pod, PodSpec, PodStatus};

    fn pod(name: &str, namespace: &str, account: Option<&str>, node: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: name.into(),
                namespace: namespace.into(),
                uid: "0a1b2c3d-0000-4000-8000-000000000001".into(),
                ..ObjectMeta::default()
            },
            spec: PodSpec {
                service_account_name: account.map(str::to_owned),
                node_name: Some(node.into()),
                host_network: false,
            },
            status: PodStatus {
                phase: Some(phase.into()),
            },
        }
    }

    fn list(items: Vec<Pod>) -> PodList {
        PodList {
            items,
            ..PodList::default()
        }
    }

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    const NOW: &str = "2026-11-30T04:00:00Z";

    #[test]
    fn a_running_or_starting_pod_of_the_account_on_the_node_counts() {
        let now = at(NOW);
        let running = list(vec![pod(
            "planner-0",
            "prod",
            Some("planner"),
            "node-a",
            "Running",
        )]);
        assert_eq!(
            attestation(&running, "prod", "planner", "node-a", now),
            Attestation::Runs {
                pod: "planner-0".into()
            }
        );
        let pending = list(vec![pod(
            "planner-0",
            "prod",
            Some("planner"),
            "node-a",
            "Pending",
        )]);
        assert!(matches!(
            attestation(&pending, "prod", "planner", "node-a", now),
            Attestation::Runs { .. }
        ));
        // No service account named: `default`, as the agent names the pod.
        let unnamed = list(vec![pod("worker", "prod", None, "node-a", "Running")]);
        assert!(matches!(
            attestation(&unnamed, "prod", "default", "node-a", now),
            Attestation::Runs { .. }
        ));
        assert!(matches!(
            attestation(&unnamed, "prod", "planner", "node-a", now),
            Attestation::NoPod { .. }
        ));
    }

    #[test]
    fn other_accounts_namespaces_nodes_and_finished_pods_do_not_count() {
        let now = at(NOW);
        let pods = list(vec![
            pod("other-sa", "prod", Some("intruder"), "node-a", "Running"),
            pod("other-ns", "staging", Some("planner"), "node-a", "Running"),
            pod("other-node", "prod", Some("planner"), "node-b", "Running"),
            pod("done", "prod", Some("planner"), "node-a", "Succeeded"),
            pod("crashed", "prod", Some("planner"), "node-a", "Failed"),
        ]);
        let Attestation::NoPod { reason } = attestation(&pods, "prod", "planner", "node-a", now)
        else {
            panic!("granted");
        };
        assert!(
            reason.contains("prod/planner")
                && reason.contains("\"node-a\"")
                && reason.contains("done has finished (Succeeded)")
                && reason.contains("crashed has finished (Failed)")
                && !reason.contains("other-"),
            "{reason}"
        );
        let Attestation::NoPod { reason } =
            attestation(&list(vec![]), "prod", "planner", "node-a", now)
        else {
            panic!("granted");
        };
        assert!(!reason.contains('('), "{reason}");
    }

    #[test]
    fn a_pod_being_deleted_counts_during_its_grace_period_only() {
        let now = at(NOW);
        let mut terminating = pod("planner-0", "prod", Some("planner"), "node-a", "Running");
        // The attestation of the planner account on node A, with the pod deleted at `deleted`.
        let mut deleted_at = |deleted: &str| {
            terminating.metadata.deletion_timestamp = Some(deleted.into());
            attestation(
                &list(vec![terminating.clone()]),
                "prod",
                "planner",
                "node-a",
                now,
            )
        };
        assert!(matches!(
            deleted_at("2026-11-30T04:00:30Z"),
            Attestation::Runs { .. }
        ));
        // Just past the deadline: within the clock tolerance.
        assert!(matches!(
            deleted_at("2026-11-30T03:59:30Z"),
            Attestation::Runs { .. }
        ));
        // Long overdue (a node that is gone or keeps it): refused.
        let Attestation::NoPod { reason } = deleted_at("2026-11-30T03:50:00Z") else {
            panic!("granted");
        };
        assert!(
            reason.contains("to be gone by 2026-11-30T03:50:00Z"),
            "{reason}"
        );
        assert!(matches!(deleted_at("yesterday"), Attestation::NoPod { .. }));
    }

    #[test]
    fn static_pods_do_not_count() {
        let mut mirror = pod(
            "planner-node-a",
            "prod",
            Some("planner"),
            "node-a",
            "Running",
        );
        mirror
            .metadata
            .annotations
            .insert(MIRROR_ANNOTATION.into(), "abc".into());
        let Attestation::NoPod { reason } =
            attestation(&list(vec![mirror]), "prod", "planner", "node-a", at(NOW))
        else {
            panic!("granted");
        };
        assert!(reason.contains("static pod"), "{reason}");
    }

    #[test]
    fn an_unreachable_api_server_is_held_for_one_timeout_and_other_errors_are_not() {
        let start = Instant::now();
        let hold = Duration::from_secs(5);
        let mut outage = Outage::default();
        assert_eq!(outage.current(start, hold), None);
        outage.record(
            start,
            &Err(KubeError::Unreachable {
                address: "10.96.0.1:443".into(),
                cause: "connection refused".into(),
            }),
        );
        assert_eq!(
            outage.current(start + Duration::from_secs(2), hold),
            Some((Duration::from_secs(2), "connection refused"))
        );
        assert_eq!(outage.current(start + hold, hold), None);
        // An answer (even a refusal) ends it.
        outage.record(
            start,
            &Err(KubeError::Status {
                status: 401,
                path: "/api/v1/namespaces/prod/pods".into(),
                body: String::new(),
            }),
        );
        assert_eq!(outage.current(start, hold), None);
        outage.record(
            start,
            &Err(KubeError::Unreachable {
                address: "10.96.0.1:443".into(),
                cause: "timed out".into(),
            }),
        );
        outage.record(start, &Ok(PodList::default()));
        assert_eq!(outage.current(start, hold), None);
    }

    #[test]
    fn the_query_selects_the_namespace_and_the_node() {
        assert_eq!(
            PodAttestor::query_path("prod", "node-a"),
            "/api/v1/namespaces/prod/pods?fieldSelector=spec.nodeName%3Dnode-a"
        );
    }

    #[test]
    fn the_signer_flags_parse_and_need_an_api_server() {
        use clap::Parser;
        let parsed = crate::cli::Cli::try_parse_from([
            "mesh-agent",
            "ca",
            "run",
            "--dir",
            "/ca",
            "--kubernetes",
            "in-cluster",
            "--kubernetes-timeout",
            "2s",
        ])
        .unwrap();
        let crate::cli::Command::Ca {
            command: crate::cli::CaCommand::Run { kubernetes, .. },
        } = parsed.command
        else {
            panic!("not ca run");
        };
        assert_eq!(kubernetes.kubernetes.as_deref(), Some("in-cluster"));
        assert_eq!(kubernetes.kubernetes_timeout, Duration::from_secs(2));
        // A token file alone is a mistake, not a silent bare-metal signer.
        assert!(
            crate::cli::Cli::try_parse_from([
                "mesh-agent",
                "ca",
                "run",
                "--dir",
                "/ca",
                "--kubernetes-token-file",
                "/t",
            ])
            .is_err()
        );
    }

    #[test]
    fn in_cluster_settings_come_from_the_service_environment() {
        assert_eq!(
            in_cluster_address(Some("10.96.0.1".into()), Some("443".into())).unwrap(),
            "https://10.96.0.1:443"
        );
        assert_eq!(
            in_cluster_address(Some("fd00::1".into()), None).unwrap(),
            "https://[fd00::1]:443"
        );
        assert!(matches!(
            in_cluster_address(None, Some("443".into())),
            Err(KubeError::NotInCluster)
        ));
        let args = KubernetesArgs {
            kubernetes: Some("https://api.example:6443".into()),
            kubernetes_timeout: Duration::from_secs(5),
            ..KubernetesArgs::default()
        };
        let settings = args.settings().unwrap().unwrap();
        assert_eq!(settings.api_server, "https://api.example:6443");
        assert_eq!(settings.token_file, PathBuf::from(IN_CLUSTER_TOKEN_FILE));
        assert_eq!(settings.ca_file, PathBuf::from(IN_CLUSTER_CA_FILE));
        assert_eq!(KubernetesArgs::default().settings().unwrap(), None);
    }
}
