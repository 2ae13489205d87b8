//! The policy store: the active [`PolicySnapshot`] behind an atomic pointer (readers never
//! block), all-or-nothing reloads from a directory, the directory watcher used in standalone
//! mode, and the reload counters and last errors shown by metrics and the admin endpoint.
//!
//! Every source of resources ends in [`PolicyStore::install`]: the policy folder (through
//! [`PolicyStore::reload_dir`] and [`PolicyStore::watch_dir`]) and the etcd control plane
//! (`crate::control`) both hand it the complete list of resources they currently hold; it
//! compiles the list and swaps the snapshot in, or keeps the active one and counts a rejection.
//!
//! The instances registered on this node (`crate::registry`) join there too
//! ([`PolicyStore::set_local_instances`]): every compile is the source's resources plus the
//! local instances, which replace whatever the source holds for this node's instances (in etcd
//! mode, the copies this node wrote itself, which arrive later and may be stale).

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::{
    load::{dir_fingerprint, load_dir},
    resources::{Action, AgentInstance, Resource, ResourceKey},
    snapshot::PolicySnapshot,
};

/// Shortest poll interval `watch_dir` accepts.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// Holds the active snapshot and reload statistics. Share it in an `Arc`.
#[derive(Debug)]
pub struct PolicyStore {
    current: ArcSwap<PolicySnapshot>,
    reloads_ok: AtomicU64,
    reloads_rejected: AtomicU64,
    last_errors: Mutex<Vec<String>>,
    /// What the last install was made of, to compile again when the local instances change.
    /// Held while compiling, so two installs never interleave.
    sources: Mutex<Sources>,
}

/// The inputs of the active snapshot.
#[derive(Debug, Default)]
struct Sources {
    /// The source's last resources, its name and default action; `None` before the first.
    base: Option<(String, Arc<Vec<Resource>>, Action)>,
    /// This node's name and its registered instances.
    node: String,
    local: Vec<AgentInstance>,
}

impl Sources {
    /// The source's resources without this node's instances, plus the local instances.
    fn merged(&self, resources: &[Resource]) -> Vec<Resource> {
        if self.local.is_empty() && self.node.is_empty() {
            return resources.to_vec();
        }
        let local_keys: std::collections::HashSet<ResourceKey> = self
            .local
            .iter()
            .map(|instance| Resource::AgentInstance(instance.clone()).key())
            .collect();
        let mut merged: Vec<Resource> = resources
            .iter()
            .filter(|resource| match resource {
                Resource::AgentInstance(instance) => {
                    instance.spec.node != self.node && !local_keys.contains(&resource.key())
                }
                _ => true,
            })
            .cloned()
            .collect();
        merged.extend(self.local.iter().cloned().map(Resource::AgentInstance));
        merged
    }
}

impl Default for PolicyStore {
    fn default() -> Self {
        PolicyStore::new(PolicySnapshot::default())
    }
}

impl PolicyStore {
    /// A store serving `initial` until something replaces it. To fail closed until the first
    /// good load, start from `PolicySnapshot::empty(Action::Deny)`.
    pub fn new(initial: PolicySnapshot) -> Self {
        PolicyStore {
            current: ArcSwap::from_pointee(initial),
            reloads_ok: AtomicU64::new(0),
            reloads_rejected: AtomicU64::new(0),
            last_errors: Mutex::new(Vec::new()),
            sources: Mutex::new(Sources::default()),
        }
    }

    /// The active snapshot. Cheap (an atomic load and a reference count).
    pub fn current(&self) -> Arc<PolicySnapshot> {
        self.current.load_full()
    }

    /// Makes `snapshot` the active one (e.g. built from etcd by the control plane).
    pub fn replace(&self, snapshot: PolicySnapshot) {
        self.current.store(Arc::new(snapshot));
    }

    /// Successful reloads so far.
    pub fn reloads_ok(&self) -> u64 {
        self.reloads_ok.load(Ordering::Relaxed)
    }

    /// Rejected reloads so far (the previous snapshot stayed active).
    pub fn reloads_rejected(&self) -> u64 {
        self.reloads_rejected.load(Ordering::Relaxed)
    }

    /// Problems of the last rejected reload; empty after a successful one.
    pub fn last_errors(&self) -> Vec<String> {
        self.last_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Loads and compiles `dir` now; swaps it in if every resource is valid and the set
    /// compiles, otherwise keeps the active snapshot. Blocking (file I/O).
    pub fn reload_dir(
        &self,
        dir: &Path,
        default_action: Action,
    ) -> Result<Arc<PolicySnapshot>, Vec<String>> {
        let source = dir.display().to_string();
        match load_dir_strictly(dir) {
            Ok(resources) => self.install(&source, &resources, default_action),
            Err(errors) => self.apply(&source, Err(errors)),
        }
    }

    /// Compiles `resources` (everything one source holds now) and swaps the result in if it
    /// compiles; otherwise keeps the active snapshot, logs the problems and counts a rejected
    /// reload. `source` names where the resources came from in logs (a folder, `etcd`).
    pub fn install(
        &self,
        source: &str,
        resources: &[Resource],
        default_action: Action,
    ) -> Result<Arc<PolicySnapshot>, Vec<String>> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let compiled = PolicySnapshot::compile(&sources.merged(resources), default_action)
            .map_err(|errors| errors.iter().map(ToString::to_string).collect());
        let result = self.apply(source, compiled);
        if result.is_ok() {
            sources.base = Some((
                source.to_owned(),
                Arc::new(resources.to_vec()),
                default_action,
            ));
        }
        result
    }

    /// Replaces the instances registered on this node (`node`) and compiles again with the
    /// source's last resources (none yet: an empty set with the active default action).
    pub fn set_local_instances(
        &self,
        node: &str,
        instances: Vec<AgentInstance>,
    ) -> Result<Arc<PolicySnapshot>, Vec<String>> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        sources.node = node.to_owned();
        sources.local = instances;
        let (source, resources, default_action) = match &sources.base {
            Some((source, resources, action)) => (source.clone(), Arc::clone(resources), *action),
            None => (
                "registered instances".to_owned(),
                Arc::new(Vec::new()),
                self.current.load().default_action(),
            ),
        };
        let compiled = PolicySnapshot::compile(&sources.merged(&resources), default_action)
            .map_err(|errors| errors.iter().map(ToString::to_string).collect());
        self.apply(&source, compiled)
    }

    /// Polls `dir` every `interval` (file names, sizes and modification times) and reloads it
    /// when it changes, until `shutdown` turns true or its sender is dropped. The first poll
    /// loads immediately. Rejected resources are logged one by one; the last good snapshot
    /// stays active.
    pub async fn watch_dir(
        &self,
        dir: PathBuf,
        default_action: Action,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(interval.max(MIN_INTERVAL));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_fingerprint: Option<u64> = None;
        let mut dir_unreadable = false;
        tracing::info!(dir = %dir.display(), ?interval, "watching policy directory");
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            tokio::select! {
                _ = ticker.tick() => {}
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    continue;
                }
            }

            let probe = dir.clone();
            let fingerprint =
                match tokio::task::spawn_blocking(move || dir_fingerprint(&probe)).await {
                    Ok(fingerprint) => fingerprint,
                    Err(error) => {
                        tracing::warn!(%error, "policy directory poll failed");
                        continue;
                    }
                };
            let fingerprint = match fingerprint {
                Ok(fingerprint) => {
                    dir_unreadable = false;
                    fingerprint
                }
                Err(error) => {
                    if !dir_unreadable {
                        dir_unreadable = true;
                        // Force a reload once the directory is back.
                        last_fingerprint = None;
                        let message = format!("cannot read {}: {error}", dir.display());
                        tracing::warn!(
                            dir = %dir.display(), %error,
                            "policy directory unreadable; keeping the current snapshot"
                        );
                        self.reject(vec![message]);
                    }
                    continue;
                }
            };
            if last_fingerprint == Some(fingerprint) {
                continue;
            }
            last_fingerprint = Some(fingerprint);

            let source = dir.clone();
            match tokio::task::spawn_blocking(move || load_dir_strictly(&source)).await {
                Ok(Ok(resources)) => {
                    let _ = self.install(&dir.display().to_string(), &resources, default_action);
                }
                Ok(Err(errors)) => {
                    let _ = self.apply(&dir.display().to_string(), Err(errors));
                }
                Err(error) => tracing::warn!(%error, "policy reload task failed"),
            }
        }
        tracing::info!(dir = %dir.display(), "stopped watching policy directory");
    }

    fn apply(
        &self,
        source: &str,
        result: Result<PolicySnapshot, Vec<String>>,
    ) -> Result<Arc<PolicySnapshot>, Vec<String>> {
        match result {
            Ok(snapshot) => {
                for warning in snapshot.warnings() {
                    tracing::warn!(source, "{warning}");
                }
                let active = self.current.load();
                let snapshot = if active.content_hash() == snapshot.content_hash()
                    && active.resource_count() == snapshot.resource_count()
                {
                    tracing::debug!(
                        content_hash = format_args!("{:016x}", active.content_hash()),
                        "policy source changed but its content did not"
                    );
                    Arc::clone(&active)
                } else {
                    let snapshot = Arc::new(snapshot);
                    self.current.store(Arc::clone(&snapshot));
                    tracing::info!(
                        source,
                        generation = snapshot.generation(),
                        content_hash = format_args!("{:016x}", snapshot.content_hash()),
                        resources = snapshot.resource_count(),
                        "policy snapshot activated"
                    );
                    snapshot
                };
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                self.last_errors
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clear();
                Ok(snapshot)
            }
            Err(errors) => {
                for error in &errors {
                    tracing::warn!(source, "policy resource rejected: {error}");
                }
                let active = self.current.load();
                tracing::warn!(
                    source,
                    rejected = errors.len(),
                    generation = active.generation(),
                    content_hash = format_args!("{:016x}", active.content_hash()),
                    "policy reload rejected; keeping the current snapshot"
                );
                self.reject(errors.clone());
                Err(errors)
            }
        }
    }

    fn reject(&self, errors: Vec<String>) {
        self.reloads_rejected.fetch_add(1, Ordering::Relaxed);
        *self
            .last_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = errors;
    }
}

/// Loads `dir` strictly: any rejected resource rejects the whole set (the compile step
/// rejects it too when it does not compile).
fn load_dir_strictly(dir: &Path) -> Result<Vec<Resource>, Vec<String>> {
    let report = load_dir(dir);
    if !report.is_clean() {
        return Err(report.errors.iter().map(ToString::to_string).collect());
    }
    Ok(report.resources())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: Agent\nmetadata: {name: tools}\nspec: {endpoints: [{address: '10.0.0.1:80'}]}\n";
    const POLICY: &str = "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: lock}\nspec: {targetAgent: tools}\n";

    async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn reload_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), AGENT).unwrap();
        let store = PolicyStore::default();
        let first = store.reload_dir(dir.path(), Action::Allow).unwrap();
        assert_eq!(first.resource_count(), 1);
        assert_eq!(store.reloads_ok(), 1);

        // A good policy plus a bad resource: nothing of the new set is applied.
        std::fs::write(dir.path().join("b.yaml"), POLICY).unwrap();
        std::fs::write(
            dir.path().join("c.yaml"),
            "kind: Agent\nmetadata: {name: x}\nspec: {}\n",
        )
        .unwrap();
        let errors = store.reload_dir(dir.path(), Action::Allow).unwrap_err();
        assert!(errors[0].contains("c.yaml"), "{errors:?}");
        assert_eq!(store.reloads_rejected(), 1);
        assert_eq!(store.last_errors(), errors);
        assert_eq!(store.current().generation(), first.generation());

        std::fs::remove_file(dir.path().join("c.yaml")).unwrap();
        let second = store.reload_dir(dir.path(), Action::Allow).unwrap();
        assert_eq!(second.resource_count(), 2);
        assert!(store.last_errors().is_empty());
        // Same content again: the active snapshot is kept as is.
        let third = store.reload_dir(dir.path(), Action::Allow).unwrap();
        assert_eq!(third.generation(), second.generation());
    }

    #[tokio::test]
    async fn watch_picks_up_changes_and_keeps_last_good() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agents.yaml"), AGENT).unwrap();
        let store = Arc::new(PolicyStore::new(PolicySnapshot::empty(Action::Deny)));
        let (stop, shutdown) = watch::channel(false);
        let watcher = {
            let store = Arc::clone(&store);
            let path = dir.path().to_path_buf();
            tokio::spawn(async move {
                store
                    .watch_dir(path, Action::Allow, Duration::from_millis(20), shutdown)
                    .await;
            })
        };

        wait_for("first load", || store.current().resource_count() == 1).await;
        let first = store.current();
        assert!(first.agent("tools").is_some());
        assert_eq!(first.default_action(), Action::Allow);

        // A broken file: rejected, logged, previous snapshot kept.
        std::fs::write(
            dir.path().join("policy.yaml"),
            "kind: AccessPolicy\nspec: {oops: 1}\n",
        )
        .unwrap();
        wait_for("rejection", || store.reloads_rejected() == 1).await;
        assert_eq!(store.current().generation(), first.generation());
        let errors = store.last_errors();
        assert!(
            errors.iter().any(|e| e.contains("policy.yaml")),
            "{errors:?}"
        );

        // Fixed: picked up.
        std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
        wait_for("second load", || store.current().resource_count() == 2).await;
        assert!(store.last_errors().is_empty());
        assert_eq!(store.reloads_ok(), 2);
        let request = crate::policy::RequestAttributes {
            source: "x",
            destination: Some("tools"),
            ..Default::default()
        };
        assert!(!store.current().authorize(&request).allowed);

        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("watcher stops on shutdown")
            .unwrap();
    }

    fn local(agent: &str, node: &str, id: &str, port: u16) -> AgentInstance {
        let text = format!(
            "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: AgentInstance\nmetadata: {{name: {agent}.{node}.{id}}}\nspec: {{agent: {agent}, node: {node}, address: '127.0.0.1:{port}', identity: 'spiffe://td/agent/{agent}', health: Healthy}}\n"
        );
        match crate::policy::parse_documents(&text, "t")
            .resources
            .remove(0)
            .resource
        {
            Resource::AgentInstance(instance) => instance,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn local_instances_join_every_install_and_replace_this_nodes_copies() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), AGENT).unwrap();
        let store = PolicyStore::default();
        // Before any source: compiled alone, with the active default action.
        let snapshot = store
            .set_local_instances("node-a", vec![local("search", "node-a", "1", 9000)])
            .unwrap();
        assert!(snapshot.agent("search").is_some());
        // The folder's resources plus the local instance.
        let snapshot = store.reload_dir(dir.path(), Action::Allow).unwrap();
        assert!(snapshot.agent("tools").is_some() && snapshot.agent("search").is_some());
        // A source holding a stale copy of this node's instance and another node's: the stale
        // copy is replaced, the other node's kept.
        let mut stale = local("search", "node-a", "1", 9000);
        stale.spec.health = crate::policy::Health::Unhealthy;
        let gone = local("search", "node-a", "9", 9009);
        let other = local("search", "node-b", "2", 9000);
        let resources = vec![
            Resource::AgentInstance(stale),
            Resource::AgentInstance(gone),
            Resource::AgentInstance(other),
        ];
        let snapshot = store.install("etcd", &resources, Action::Allow).unwrap();
        let names: Vec<&str> = snapshot
            .instances()
            .iter()
            .map(|i| i.metadata.name.as_str())
            .collect();
        assert_eq!(names, ["search.node-a.1", "search.node-b.2"]);
        assert!(
            snapshot
                .instances()
                .iter()
                .all(|i| i.spec.health.is_healthy())
        );
        // The instance goes: compiled again from the last source's resources.
        let snapshot = store.set_local_instances("node-a", Vec::new()).unwrap();
        let names: Vec<&str> = snapshot
            .instances()
            .iter()
            .map(|i| i.metadata.name.as_str())
            .collect();
        assert_eq!(names, ["search.node-b.2"]);
    }

    #[tokio::test]
    async fn watch_stops_when_sender_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::default();
        let (stop, shutdown) = watch::channel(false);
        drop(stop);
        tokio::time::timeout(
            Duration::from_secs(5),
            store.watch_dir(
                dir.path().to_path_buf(),
                Action::Allow,
                Duration::from_millis(10),
                shutdown,
            ),
        )
        .await
        .expect("watcher stops");
    }
}
