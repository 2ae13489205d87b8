//! The live agent registry of this node: the registration API on a unix socket
//! ([`server`]), the kernel attestation of its callers ([`attest`]), the instances registered
//! here ([`LocalRegistry`]), their active health probes ([`health`]) and, in etcd mode, their
//! records in etcd under a lease ([`publish`]).
//!
//! # Lifecycle of an instance
//!
//! 1. A workload calls `Register` on the socket. The agent attests it from the kernel (peer
//!    pidfd -> `/proc/<pid>/cgroup`), checks that its cgroup may use the name (a configured
//!    workload of that name, or a child named so of a `cgroupParents` entry), enrols that
//!    cgroup for capture and names it, probes the instance once, and publishes an
//!    `AgentInstance` record `<agent>.<node>.<id>`.
//! 2. The record joins the policy store at once (merged into the agent of its name, see
//!    `crate::policy`), and in etcd mode is written under this node's instance lease, so every
//!    node sees it.
//! 3. While the `Register` stream is open the agent probes the instance every interval (and
//!    counts an ejection by this node's balancer as a failure: passive results) and rewrites
//!    its `health` when it changes; unhealthy instances get no traffic and are not discovered.
//! 4. The stream ending (the client closing it, its process exiting), `Deregister`, or the
//!    process's pidfd signalling its exit removes the record at once. If the node agent itself
//!    dies, the lease expires and etcd removes every record of the node within its TTL.

pub mod attest;
pub mod health;
pub mod publish;
pub mod server;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::watch;
use tracing::warn;

use crate::policy::{AgentInstance, Health, PolicyStore};

pub use server::{RegistryServer, ServerSettings};

/// Why the registry could not start.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "the registration socket {path} is in use by a running process (another agent?); stop \
         it or set spec.registration.socket"
    )]
    SocketInUse { path: PathBuf },
    #[error("cannot serve the registration socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One instance registered on this node.
#[derive(Debug, Clone)]
pub struct LocalInstance {
    pub record: AgentInstance,
    /// The cgroup whose process registered it (only that cgroup may deregister it).
    pub cgroup: PathBuf,
}

/// The instances registered on this node. Every change is handed to the policy store (the
/// snapshot merges them) and announced to the etcd publisher.
#[derive(Debug)]
pub struct LocalRegistry {
    node: String,
    store: Arc<PolicyStore>,
    instances: Mutex<BTreeMap<String, LocalInstance>>,
    changed: watch::Sender<u64>,
}

impl LocalRegistry {
    pub fn new(node: &str, store: Arc<PolicyStore>) -> Self {
        LocalRegistry {
            node: node.to_owned(),
            store,
            instances: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Notified (a counter) whenever the set of instances or a health changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LocalInstance>> {
        self.instances
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The records, in name order.
    pub fn records(&self) -> Vec<AgentInstance> {
        self.lock()
            .values()
            .map(|instance| instance.record.clone())
            .collect()
    }

    /// One instance, by record name.
    pub fn get(&self, name: &str) -> Option<LocalInstance> {
        self.lock().get(name).cloned()
    }

    /// How many instances processes of `cgroup` registered.
    pub fn records_count_of(&self, cgroup: &std::path::Path) -> usize {
        self.lock()
            .values()
            .filter(|instance| instance.cgroup == cgroup)
            .count()
    }

    /// Whether a record name is taken.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Adds an instance and publishes it.
    pub fn add(&self, instance: LocalInstance) {
        let name = instance.record.metadata.name.clone();
        self.lock().insert(name, instance);
        self.publish();
    }

    /// Removes an instance; `false` when it was not there.
    pub fn remove(&self, name: &str) -> bool {
        let removed = self.lock().remove(name).is_some();
        if removed {
            self.publish();
        }
        removed
    }

    /// Records a new health; publishes only a change.
    pub fn set_health(&self, name: &str, health: Health) -> bool {
        let changed = match self.lock().get_mut(name) {
            Some(instance) if instance.record.spec.health != health => {
                instance.record.spec.health = health;
                true
            }
            _ => false,
        };
        if changed {
            self.publish();
        }
        changed
    }

    fn publish(&self) {
        if let Err(problems) = self.store.set_local_instances(&self.node, self.records()) {
            // Instances never make a set fail to compile; the source's own problems do, and
            // the store keeps its snapshot and logs them.
            warn!(
                problems = problems.len(),
                "registered instances not applied: the policy set does not compile"
            );
        }
        self.changed.send_modify(|version| *version += 1);
    }
}

/// Enrols registered workloads in the running datapath and names them for the proxy.
#[derive(Debug)]
pub struct DatapathEnroller {
    pub datapath: Arc<crate::datapath::Datapath>,
    pub proxy: Arc<crate::proxy::OutboundProxy>,
}

impl server::Enroller for DatapathEnroller {
    fn enrol(&self, cgroup: &std::path::Path, name: &str) -> Result<(), String> {
        let enrolled = self
            .datapath
            .enrol_cgroup(cgroup)
            .map_err(|error| error.to_string())?;
        self.proxy.name_workload(enrolled.id, name);
        Ok(())
    }

    fn ejected(&self, address: std::net::SocketAddr) -> bool {
        self.proxy.endpoint_ejected(address)
    }
}

/// Binds the configured registration socket (`None` when registration is off).
pub fn bind_configured(
    config: &crate::config::AgentConfig,
) -> Result<Option<tokio::net::UnixListener>, RegistryError> {
    let registration = &config.spec.registration;
    let Some(socket) = &registration.socket else {
        return Ok(None);
    };
    // Validated with the configuration.
    let mode = registration.socket_mode_bits().unwrap_or(0o660);
    server::bind(socket, mode).map(Some)
}

/// Starts the registration API on `listener`, and in etcd mode the publisher of this node's
/// instance records. Returns the tasks; they end on `shutdown`.
pub async fn spawn(
    config: &crate::config::AgentConfig,
    listener: tokio::net::UnixListener,
    store: Arc<PolicyStore>,
    enroller: Arc<dyn server::Enroller>,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, crate::control::EtcdError> {
    let registration = &config.spec.registration;
    // The node's name (etcd mode requires one); a standalone file may leave it out.
    let node = match config.metadata.name.as_str() {
        "" => "standalone",
        name => name,
    };
    let registry = Arc::new(LocalRegistry::new(node, store));
    // From now on the records of this node's instances come from here only: copies a previous
    // run left in etcd (alive until their lease expires) are not served.
    registry.publish();
    let settings = ServerSettings {
        socket: registration.socket.clone().unwrap_or_default(),
        socket_mode: registration.socket_mode_bits().unwrap_or(0o660),
        rules: attest::NameRules {
            workloads: config
                .spec
                .workloads
                .iter()
                .map(|workload| (workload.name.clone(), workload.cgroup.clone()))
                .collect(),
            parents: registration.cgroup_parents.clone(),
        },
        trust_domain: config.trust_domain().to_owned(),
        advertise_address: registration.advertise_address,
        health: registration.health.clone(),
    };
    let mut tasks = Vec::new();
    if let Some(spec) = &config.spec.etcd {
        let etcd = crate::control::Etcd::connect(crate::agent::etcd_settings(spec)).await?;
        let publisher =
            publish::instance_publisher(etcd, Arc::clone(&registry), registration.lease_ttl);
        tasks.push(tokio::spawn(publisher.run(shutdown.clone())));
    }
    let server = RegistryServer::new(settings, registry, enroller, shutdown);
    tasks.push(tokio::spawn(server.serve(listener)));
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Action, PolicySnapshot, Resource, parse_documents};

    fn record(agent: &str, id: &str, port: u16) -> AgentInstance {
        let text = format!(
            "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: AgentInstance\nmetadata: {{name: {agent}.node-a.{id}}}\nspec: {{agent: {agent}, node: node-a, address: '127.0.0.1:{port}', identity: 'spiffe://td/agent/{agent}', health: Healthy}}\n"
        );
        match parse_documents(&text, "t").resources.remove(0).resource {
            Resource::AgentInstance(instance) => instance,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn changes_reach_the_store_and_the_publisher() {
        let store = Arc::new(PolicyStore::new(PolicySnapshot::empty(Action::Allow)));
        let registry = LocalRegistry::new("node-a", Arc::clone(&store));
        let changes = registry.subscribe();
        registry.add(LocalInstance {
            record: record("tools", "1", 9000),
            cgroup: PathBuf::from("/agents/tools"),
        });
        assert!(store.current().agent("tools").is_some());
        assert_eq!(
            registry.records_count_of(std::path::Path::new("/agents/tools")),
            1
        );
        assert!(changes.has_changed().unwrap());
        // Health: only a change is published.
        let generation = store.current().generation();
        assert!(!registry.set_health("tools.node-a.1", Health::Healthy));
        assert_eq!(store.current().generation(), generation);
        assert!(registry.set_health("tools.node-a.1", Health::Unhealthy));
        let tools = store.current();
        assert_eq!(tools.agent("tools").unwrap().endpoints[0].weight, 0);
        assert!(registry.remove("tools.node-a.1"));
        assert!(!registry.remove("tools.node-a.1"));
        assert!(store.current().agent("tools").is_none());
    }
}
