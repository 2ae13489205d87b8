//! etcd mode: the identities of this node's enrolled pods, published as `WorkloadIdentity`
//! records (`<prefix>/workloadidentities/<ns>/<account>@<node>`, one per service account
//! identity with at least one pod enrolled here) under a lease of the node. They are what lets
//! the signer (`mesh-agent ca run`) issue `spiffe://<td>/ns/<ns>/sa/<account>` to this node and
//! no other: a record appears when the first such pod is enrolled, goes when the last one
//! leaves, and vanishes with the node's lease when the agent stops or dies.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    control::{
        Etcd,
        records::{LeasedRecords, RecordSource},
    },
    identity::resources::WorkloadIdentityRecord,
};

use super::PodEnroller;

/// The `WorkloadIdentity` records of one node's enrolled pods.
#[derive(Debug)]
pub struct PodIdentityRecords {
    enroller: Arc<PodEnroller>,
    /// The node's name in the mesh (`metadata.name`, its `Node` record's name).
    node: String,
}

impl PodIdentityRecords {
    pub fn new(enroller: Arc<PodEnroller>, node: &str) -> Self {
        PodIdentityRecords {
            enroller,
            node: node.to_owned(),
        }
    }

    /// The writer of these records, under a lease of `ttl`.
    pub fn publisher(self, etcd: Etcd, ttl: Duration) -> LeasedRecords {
        LeasedRecords::new(etcd, Arc::new(self), ttl, "pod identity")
    }

    /// The records as they should be now, by key under `prefix`.
    pub fn documents(&self, prefix: &str) -> BTreeMap<String, WorkloadIdentityRecord> {
        self.enroller
            .enrolled_identities()
            .into_iter()
            .filter_map(|(identity, pods)| WorkloadIdentityRecord::new(&identity, &self.node, pods))
            .map(|record| (record.key(prefix), record))
            .collect()
    }
}

impl RecordSource for PodIdentityRecords {
    fn records(&self, prefix: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
        self.documents(prefix)
            .into_iter()
            .map(|(key, record)| {
                serde_json::to_vec(&record)
                    .map(|value| (key, value))
                    .map_err(|error| error.to_string())
            })
            .collect()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.enroller.subscribe()
    }
}
