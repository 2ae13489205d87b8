//! Node records: each agent in etcd mode registers itself under `<prefix>/nodes/<name>`,
//! attached to a lease, so a node that dies disappears after the lease's TTL and one that
//! stops cleanly disappears at once (the lease is revoked).
//!
//! A node record is a plain JSON document, not a mesh resource (nothing is applied from it;
//! `meshctl apply` refuses the kind): observed state, hence `status` rather than `spec`.
//!
//! ```json
//! {"apiVersion": "mesh.agentmesh.dev/v1alpha1", "kind": "Node",
//!  "metadata": {"name": "node-a"},
//!  "status": {"version": "0.1.0", "startTime": "2026-01-01T10:00:00.000Z",
//!             "heartbeatTime": "2026-01-01T10:05:00.000Z", "pid": 1234,
//!             "leaseTtlSeconds": 30, "syncRevision": 42, "policyHash": "9f0c2a...",
//!             "tunnelAddress": "10.0.0.2:15008"}}
//! ```
//!
//! `tunnelAddress` is where the node's tunnel listens: other nodes read it ([`EtcdPeers`])
//! to reach the endpoints registered on this node.
//!
//! The record is rewritten with a fresh `heartbeatTime` (and the revision and policy hash the
//! node serves, so operators can see which nodes converged) every third of the TTL, when the
//! lease is renewed. Agents do not watch node records: heartbeats cost them nothing.

use std::{sync::Arc, time::Duration, time::SystemTime};

use etcd_client::PutOptions;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::policy::{API_VERSION, PolicyStore};

use super::{
    etcd::{Etcd, EtcdError},
    keys,
    lease::NodeLease,
    sync::ControlStatus,
};

/// `kind` of node records.
pub const NODE_KIND: &str = "Node";

/// A node record as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub api_version: String,
    pub kind: String,
    pub metadata: NodeMetadata,
    pub status: NodeStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeMetadata {
    pub name: String,
}

/// What a node reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The agent's version.
    pub version: String,
    /// RFC 3339.
    pub start_time: String,
    /// RFC 3339; renewed every third of the lease TTL.
    pub heartbeat_time: String,
    pub pid: u32,
    pub lease_ttl_seconds: i64,
    /// Highest etcd revision the node's resources reflect.
    #[serde(default)]
    pub sync_revision: i64,
    /// Content hash of the policy snapshot the node serves (as in `mesh_policy_resources`).
    #[serde(default)]
    pub policy_hash: String,
    /// Where the node's tunnel (mutual TLS, port 15008) is reachable from other nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_address: Option<std::net::SocketAddr>,
}

/// Registers a node and keeps its record alive.
#[derive(Debug)]
pub struct NodeRegistration {
    etcd: Etcd,
    name: String,
    ttl: Duration,
    started: SystemTime,
    store: Arc<PolicyStore>,
    status: Arc<ControlStatus>,
    tunnel_address: Option<std::net::SocketAddr>,
}

impl NodeRegistration {
    pub fn new(
        etcd: Etcd,
        name: &str,
        ttl: Duration,
        store: Arc<PolicyStore>,
        status: Arc<ControlStatus>,
    ) -> Self {
        NodeRegistration {
            etcd,
            name: name.to_owned(),
            ttl: ttl.max(super::lease::MIN_TTL),
            started: SystemTime::now(),
            store,
            status,
            tunnel_address: None,
        }
    }

    /// The etcd client the record is written with.
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// Publishes the node's tunnel address in its record.
    pub fn with_tunnel_address(mut self, address: Option<std::net::SocketAddr>) -> Self {
        self.tunnel_address = address;
        self
    }

    fn record(&self) -> NodeRecord {
        let sample = self.status.sample();
        NodeRecord {
            api_version: API_VERSION.to_owned(),
            kind: NODE_KIND.to_owned(),
            metadata: NodeMetadata {
                name: self.name.clone(),
            },
            status: NodeStatus {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                start_time: humantime::format_rfc3339_millis(self.started).to_string(),
                heartbeat_time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                pid: std::process::id(),
                lease_ttl_seconds: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
                sync_revision: sample.revision,
                policy_hash: format!("{:016x}", self.store.current().content_hash()),
                tunnel_address: self.tunnel_address,
            },
        }
    }

    /// Registers, renews and rewrites the record until `shutdown`; then revokes the lease.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let key = keys::node_key(self.etcd.prefix(), &self.name);
        let mut lease = NodeLease::new(self.etcd.clone(), self.ttl, "node");
        let mut ticker = tokio::time::interval(lease.renew_interval());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
            }
            match self.beat(&key, &mut lease).await {
                Ok(()) => {
                    if failing {
                        info!(node = %self.name, "node record renewed in etcd again");
                    }
                    failing = false;
                }
                Err(error) => {
                    if !failing {
                        warn!(node = %self.name, %error, "cannot renew the node record; retrying");
                    }
                    failing = true;
                }
            }
        }
        if lease.revoke().await {
            info!(node = %self.name, "node record removed from etcd");
        }
    }

    /// Renews the lease (granting a new one when it expired or none is held) and rewrites the
    /// record with a fresh heartbeat.
    async fn beat(&self, key: &str, lease: &mut NodeLease) -> Result<(), EtcdError> {
        let held = lease.id().is_some();
        if !lease.renew().await? {
            info!(node = %self.name, "node lease expired while etcd was away; registering again");
        }
        let id = lease.ensure().await?;
        if !held {
            info!(node = %self.name, lease = id, ttl_seconds = lease.ttl_seconds(), "node registered in etcd");
        }
        let value = serde_json::to_vec(&self.record()).map_err(|error| EtcdError::Failed {
            endpoints: String::new(),
            what: "encoding the node record".to_owned(),
            cause: error.to_string(),
        })?;
        let key = key.to_owned();
        self.etcd
            .call("writing the node record", |mut client| async move {
                client
                    .put(key, value, Some(PutOptions::new().with_lease(id)))
                    .await
            })
            .await?;
        Ok(())
    }
}

/// Peer tunnel addresses from the node records in etcd.
#[derive(Debug)]
pub struct EtcdPeers {
    etcd: Etcd,
}

impl EtcdPeers {
    pub fn new(etcd: Etcd) -> Self {
        Self { etcd }
    }
}

impl crate::tunnel::PeerLookup for EtcdPeers {
    fn lookup<'a>(&'a self, node: &'a str) -> crate::tunnel::LookupFuture<'a> {
        Box::pin(async move {
            let key = keys::node_key(self.etcd.prefix(), node);
            match self.etcd.get(&key).await {
                Ok(Some(entry)) => match decode_node(&entry.value) {
                    Ok(record) => record.status.tunnel_address,
                    Err(error) => {
                        warn!(%node, %error, "invalid node record; its tunnel address is unknown");
                        None
                    }
                },
                Ok(None) => None,
                Err(error) => {
                    warn!(%node, %error, "cannot read the node record for its tunnel address");
                    None
                }
            }
        })
    }
}

/// Decodes a node record read from etcd.
pub fn decode_node(value: &[u8]) -> Result<NodeRecord, String> {
    serde_json::from_slice(value).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_record_round_trips_in_camel_case() {
        let record = NodeRecord {
            api_version: API_VERSION.to_owned(),
            kind: NODE_KIND.to_owned(),
            metadata: NodeMetadata {
                name: "node-a".to_owned(),
            },
            status: NodeStatus {
                version: "0.1.0".to_owned(),
                start_time: "2026-01-01T10:00:00.000Z".to_owned(),
                heartbeat_time: "2026-01-01T10:00:10.000Z".to_owned(),
                pid: 7,
                lease_ttl_seconds: 30,
                sync_revision: 42,
                policy_hash: "00".to_owned(),
                tunnel_address: Some("10.0.0.2:15008".parse().unwrap()),
            },
        };
        let text = serde_json::to_string(&record).unwrap();
        assert!(text.contains("\"heartbeatTime\""), "{text}");
        assert!(text.contains("\"leaseTtlSeconds\":30"), "{text}");
        assert!(
            text.contains("\"tunnelAddress\":\"10.0.0.2:15008\""),
            "{text}"
        );
        assert_eq!(decode_node(text.as_bytes()).unwrap(), record);
        assert!(decode_node(b"{}").is_err());
    }
}
