//! Pod enrolment on Kubernetes: the agent lists and watches the pods scheduled on its node
//! (optionally narrowed by a label selector), finds each pod's cgroup where the kubelet made
//! it, enrols it for capture and names it by its service account's SPIFFE ID
//! (`spiffe://<trust-domain>/ns/<namespace>/sa/<account>`), which is the name policies match
//! as `from`. No sidecar, no init container: the kernel captures the pod's sockets.
//!
//! A pod leaves the mesh when it is deleted or finishes. A pod whose cgroup is not there yet
//! (the watch is usually faster than the container runtime) is retried until it appears.
//! Enrolments survive an agent restart (they live in the pinned map); the first listing
//! after a restart names them again.
//!
//! [`attest`] is the signer's side: it asks the API server whether a service account's pod
//! runs on a node before that node gets the account's certificate.

pub mod attest;
mod client;
pub mod pods;
pub mod records;

pub use attest::{Attestation, KubernetesArgs, PodAttestor};
pub use client::{KubeClient, KubeError, KubeSettings};
pub use records::PodIdentityRecords;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{datapath::Datapath, identity::SpiffeId, proxy::OutboundProxy};

use pods::{PodIdentity, PodList, WatchEvent, find_pod_cgroup, parse_watch_event, selected};

/// How deep below the search root a pod's cgroup may be (kubepods.slice / qos / pod).
const MAX_CGROUP_DEPTH: usize = 4;
/// How often pods whose cgroup has not appeared yet are looked for again.
const PENDING_RETRY: Duration = Duration::from_millis(500);
/// Server-side end of each watch request, after which it is renewed from its version.
const WATCH_SECONDS: u32 = 300;
/// Reconnection backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What pod enrolment needs besides the API server's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEnrolmentSettings {
    pub client: KubeSettings,
    /// The node whose pods are enrolled (`spec.nodeName`).
    pub node_name: String,
    /// Only pods matching this label selector (Kubernetes syntax); `None` for every pod.
    pub label_selector: Option<String>,
    /// Trust domain of the pods' SPIFFE IDs.
    pub trust_domain: String,
    /// Absolute directory under which pod cgroups are searched (the attach cgroup).
    pub cgroup_root: PathBuf,
}

/// Counters and state for `/metrics`.
#[derive(Debug, Default)]
pub struct PodEnrolmentStatus {
    pub connected: AtomicBool,
    pub enrolled: AtomicU64,
    pub pending: AtomicU64,
    pub lists: AtomicU64,
    pub failures: AtomicU64,
    pub enrol_errors: AtomicU64,
}

/// A point-in-time copy of [`PodEnrolmentStatus`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodEnrolmentSample {
    pub connected: bool,
    pub enrolled: u64,
    pub pending: u64,
    pub lists: u64,
    pub failures: u64,
    pub enrol_errors: u64,
}

impl PodEnrolmentStatus {
    pub fn sample(&self) -> PodEnrolmentSample {
        PodEnrolmentSample {
            connected: self.connected.load(Ordering::Relaxed),
            enrolled: self.enrolled.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
            lists: self.lists.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            enrol_errors: self.enrol_errors.load(Ordering::Relaxed),
        }
    }
}

/// A pod in the mesh: where its cgroup is and who it is.
#[derive(Debug, Clone)]
struct EnrolledPod {
    cgroup_id: u64,
    cgroup: PathBuf,
    identity: PodIdentity,
}

/// The desired pods (from the API server) and the enrolled ones (in the kernel).
#[derive(Debug, Default)]
struct PodState {
    desired: HashMap<String, PodIdentity>,
    enrolled: HashMap<String, EnrolledPod>,
    /// Pods the datapath refused (e.g. the agent's own pod): tried again when they change.
    refused: HashSet<String>,
}

/// Keeps the node's pods enrolled. See the module comment.
#[derive(Debug)]
pub struct PodEnroller {
    client: KubeClient,
    settings: PodEnrolmentSettings,
    datapath: Arc<Datapath>,
    proxy: Arc<OutboundProxy>,
    state: Mutex<PodState>,
    status: Arc<PodEnrolmentStatus>,
    /// Bumped whenever the set of enrolled pods changes.
    changed: watch::Sender<u64>,
}

impl PodEnroller {
    pub fn new(
        settings: PodEnrolmentSettings,
        datapath: Arc<Datapath>,
        proxy: Arc<OutboundProxy>,
    ) -> Result<Self, KubeError> {
        Ok(PodEnroller {
            client: KubeClient::new(&settings.client)?,
            settings,
            datapath,
            proxy,
            state: Mutex::default(),
            status: Arc::default(),
            changed: watch::channel(0).0,
        })
    }

    /// Notified (a counter) whenever a pod joins or leaves the mesh.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The identities of the enrolled pods, each with its pods' names (sorted).
    pub fn enrolled_identities(&self) -> BTreeMap<SpiffeId, Vec<String>> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut identities: BTreeMap<SpiffeId, Vec<String>> = BTreeMap::new();
        for pod in state.enrolled.values() {
            identities
                .entry(pod.identity.identity.clone())
                .or_default()
                .push(pod.identity.name.clone());
        }
        for pods in identities.values_mut() {
            pods.sort();
        }
        identities
    }

    pub fn status(&self) -> Arc<PodEnrolmentStatus> {
        Arc::clone(&self.status)
    }

    fn pods_path(&self, watch_from: Option<&str>) -> String {
        let mut path = format!(
            "/api/v1/pods?fieldSelector={}",
            encode_query(&format!("spec.nodeName={}", self.settings.node_name))
        );
        if let Some(selector) = &self.settings.label_selector {
            path.push_str("&labelSelector=");
            path.push_str(&encode_query(selector));
        }
        if let Some(version) = watch_from {
            path.push_str(&format!(
                "&watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&resourceVersion={}",
                encode_query(version)
            ));
        }
        path
    }

    /// Lists, then watches, until `shutdown`; relists after an expired watch, reconnects with
    /// backoff after failures. Never unenrols on shutdown (capture outlives the agent).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let result = tokio::select! {
                result = self.list_and_watch() => result,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            self.status.connected.store(false, Ordering::Relaxed);
            match result {
                Ok(()) => backoff = BACKOFF_MIN,
                Err(error) => {
                    self.status.failures.fetch_add(1, Ordering::Relaxed);
                    warn!(%error, retry_in = ?backoff, "pod enrolment: the API server failed; pods enrolled so far stay enrolled");
                    let jittered = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
                    tokio::select! {
                        _ = tokio::time::sleep(jittered) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// One listing and the watches that follow it; returns `Ok` when a relist is due.
    async fn list_and_watch(&self) -> Result<(), KubeError> {
        let list: PodList = self.client.get_json(&self.pods_path(None)).await?;
        self.status.lists.fetch_add(1, Ordering::Relaxed);
        self.status.connected.store(true, Ordering::Relaxed);
        let mut version = list.metadata.resource_version;
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.desired.clear();
            for pod in &list.items {
                self.desire(&mut state, pod);
            }
            info!(pods = list.items.len(), selected = state.desired.len(), version = %version, "pod enrolment: listed this node's pods");
        }
        self.reconcile();
        loop {
            let mut lines = self.client.watch(&self.pods_path(Some(&version))).await?;
            let mut retry = tokio::time::interval(PENDING_RETRY);
            retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let line = tokio::select! {
                    line = lines.next_line() => line?,
                    _ = retry.tick() => {
                        if self.status.pending.load(Ordering::Relaxed) > 0 {
                            self.reconcile();
                        }
                        continue;
                    }
                };
                let Some(line) = line else {
                    // The server ended this watch (timeoutSeconds): go on from `version`.
                    debug!(%version, "pod watch ended; renewing");
                    break;
                };
                let event = match parse_watch_event(&line) {
                    Ok(event) => event,
                    Err(problem) => {
                        warn!(%problem, "pod enrolment: unreadable watch event; listing again");
                        return Ok(());
                    }
                };
                let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                match event {
                    WatchEvent::Added(pod) | WatchEvent::Modified(pod) => {
                        version.clone_from(&pod.metadata.resource_version);
                        self.desire(&mut state, &pod);
                    }
                    WatchEvent::Deleted(pod) => {
                        version.clone_from(&pod.metadata.resource_version);
                        state.desired.remove(&pod.metadata.uid);
                    }
                    WatchEvent::Bookmark(at) => {
                        version = at;
                        continue;
                    }
                    WatchEvent::Expired => {
                        info!(%version, "pod watch expired (410 Gone); listing again");
                        return Ok(());
                    }
                    WatchEvent::Error(message) => {
                        warn!(%message, "pod watch error; listing again");
                        return Ok(());
                    }
                }
                drop(state);
                self.reconcile();
            }
        }
    }

    fn desire(&self, state: &mut PodState, pod: &pods::Pod) {
        let s = &self.settings;
        state.refused.remove(&pod.metadata.uid);
        match selected(pod, &s.node_name, &s.trust_domain) {
            Ok(identity) => {
                state.desired.insert(identity.uid.clone(), identity);
            }
            Err(reason) => {
                debug!(pod = %pod.metadata.name, namespace = %pod.metadata.namespace, reason, "pod not enrolled");
                state.desired.remove(&pod.metadata.uid);
            }
        }
    }

    /// Makes the kernel's enrolments match the desired pods.
    fn reconcile(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let PodState {
            desired,
            enrolled,
            refused,
        } = &mut *state;
        refused.retain(|uid| desired.contains_key(uid));
        let enrolled_before = enrolled.len();
        let mut joined = false;
        enrolled.retain(|uid, pod| {
            if desired.contains_key(uid) {
                return true;
            }
            match self.datapath.unenrol_id(pod.cgroup_id) {
                Ok(()) => info!(
                    pod = %pod.identity.name,
                    namespace = %pod.identity.namespace,
                    cgroup = %pod.cgroup.display(),
                    "pod left the mesh"
                ),
                Err(error) => {
                    warn!(pod = %pod.identity.name, %error, "cannot unenrol a deleted pod")
                }
            }
            false
        });
        let left = enrolled.len() < enrolled_before;
        let mut pending = 0;
        for (uid, identity) in desired.iter() {
            if enrolled.contains_key(uid) || refused.contains(uid) {
                continue;
            }
            let Some(dir) = find_pod_cgroup(&self.settings.cgroup_root, uid, MAX_CGROUP_DEPTH)
            else {
                pending += 1;
                continue;
            };
            let relative = match dir.strip_prefix(self.datapath.cgroup_mount()) {
                Ok(relative) => PathBuf::from("/").join(relative),
                Err(_) => {
                    pending += 1;
                    continue;
                }
            };
            match self.datapath.enrol_cgroup(&relative) {
                Ok(cgroup) => {
                    self.proxy
                        .name_workload(cgroup.id, identity.identity.as_str());
                    info!(
                        pod = %identity.name,
                        namespace = %identity.namespace,
                        identity = %identity.identity,
                        cgroup = %cgroup.path.display(),
                        "pod enrolled"
                    );
                    enrolled.insert(
                        uid.clone(),
                        EnrolledPod {
                            cgroup_id: cgroup.id,
                            cgroup: cgroup.path,
                            identity: identity.clone(),
                        },
                    );
                    joined = true;
                }
                Err(error) => {
                    // Refused (e.g. the agent's own pod): not retried until the pod changes.
                    refused.insert(uid.clone());
                    self.status.enrol_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(pod = %identity.name, namespace = %identity.namespace, %error, "cannot enrol pod");
                }
            }
        }
        self.status
            .enrolled
            .store(enrolled.len() as u64, Ordering::Relaxed);
        self.status.pending.store(pending, Ordering::Relaxed);
        drop(state);
        if joined || left {
            self.changed.send_modify(|version| *version += 1);
        }
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            encode_query("spec.nodeName=node-a"),
            "spec.nodeName%3Dnode-a"
        );
        assert_eq!(
            encode_query("mesh.agentmesh.dev/enrol in (true,yes)"),
            "mesh.agentmesh.dev%2Fenrol%20in%20%28true%2Cyes%29"
        );
    }
}
