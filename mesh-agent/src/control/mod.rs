//! The control plane in etcd: desired state stored as resources, written by `meshctl`, synced
//! by every agent into its policy store.
//!
//! # Storage
//!
//! Each resource is one key, `/mesh/v1/<kind>/<namespace>/<name>`, whose value is the
//! resource as compact JSON with its defaults filled in ([`codec`]). `<kind>` is the kind in
//! lower case and plural, as in a Kubernetes API path: `agents`, `accesspolicies`,
//! `trafficpolicies` ([`keys`]). Node records are cluster-scoped:
//! `/mesh/v1/nodes/<node-name>`, plain JSON held by a lease ([`node`]). The prefix
//! (`/mesh/v1`) is configurable (`spec.etcd.prefix`, `meshctl --prefix`) so several meshes can
//! share one etcd.
//!
//! Resources are validated with the same [`crate::policy::Resource::validate`] as the policy
//! folder before `meshctl` writes them, and again whenever they are read: by `meshctl get` and
//! by every agent. A value that does not parse, does not validate, or does not belong under its
//! key (`kind`, `namespace` and `name` must match the key) is rejected.
//!
//! # Writers and readers
//!
//! - `meshctl apply` ([`ops::apply`]) validates every file first (any problem: nothing is
//!   written), checks that the resulting set compiles together with what etcd holds (agents
//!   would refuse it otherwise), then writes each file in one transaction guarded by the
//!   revisions it read. It reports `created`, `configured` (value changed) or `unchanged`.
//! - Agents ([`sync`]) list the kinds they compile at one revision, watch from the next one,
//!   debounce bursts into one snapshot swap, list again after a compaction or a lost
//!   connection, and keep the last good version of a key whose new value is invalid. The last
//!   good set is cached on local disk ([`cache`]) for starts while etcd is away.
//! - Agents register a node record under a lease ([`node`]); `meshctl nodes` lists them. The
//!   other keys a node keeps alive (its registered instances, its pods' `WorkloadIdentity`
//!   records) are written by [`records`] under a lease of their own; [`lease`] is the one
//!   grant / keep-alive / re-grant / revoke loop all of them use.
//!
//! # Seams for what comes next
//!
//! Registered instances (`AgentInstance` records under `agentinstances/`, written by each node
//! agent for its local workloads under a lease of the node: `crate::registry`) are synced like
//! the other kinds. Workload identity and mTLS (`TrustBundle`, `CertificateRequest` kinds) and
//! TLS to etcd plug in here: new key segments in [`keys`], the same [`etcd::Etcd`] client,
//! and further watches on the same stream in [`sync`].

pub mod cache;
pub mod codec;
pub mod ctl;
pub mod etcd;
pub mod keys;
pub mod lease;
pub mod node;
pub mod ops;
pub mod rbac;
pub mod records;
pub mod sync;

pub use etcd::{Etcd, EtcdError, EtcdSettings, EtcdTls};
pub use sync::{ControlStatus, ControlStatusSample, InitialSource, SyncOptions, Syncer};

/// A `meshctl` failure, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// etcd unreachable (exit 4), refusing (1), or a bad endpoint (2).
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// Invalid resources (exit 3).
    #[error("{context}:\n  {}", problems.join("\n  "))]
    Invalid {
        context: String,
        problems: Vec<String>,
    },
    /// The resource does not exist (exit 1).
    #[error("{0}")]
    NotFound(String),
    /// A wrong command line (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A concurrent writer kept changing the keys (exit 1).
    #[error("{0}")]
    Conflict(String),
    /// Anything else (exit 1).
    #[error("{0}")]
    Failed(String),
}

impl ControlError {
    /// The process exit code: 1 failure, 2 usage, 3 invalid resources, 4 etcd unreachable.
    pub fn exit_code(&self) -> u8 {
        match self {
            ControlError::Etcd(EtcdError::Unreachable { .. }) => 4,
            ControlError::Etcd(EtcdError::Endpoint { .. } | EtcdError::Tls { .. })
            | ControlError::Usage(_) => 2,
            ControlError::Invalid { .. } => 3,
            ControlError::Etcd(EtcdError::Failed { .. })
            | ControlError::NotFound(_)
            | ControlError::Conflict(_)
            | ControlError::Failed(_) => 1,
        }
    }
}
