//! Workload and node identity: SPIFFE IDs, the certificates that prove them, and the rustls
//! configurations built from those certificates.
//!
//! Every workload has a SPIFFE ID (`spiffe://<trust-domain>/agent/<name>` on bare metal,
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` on Kubernetes); every node
//! agent has one too (`spiffe://<trust-domain>/node/<name>`). The rest of the agent sees
//! identity only through [`TlsCredentials`]: the node-to-node tunnel asks it for a server
//! configuration (the node's own certificate, client certificates required) and for a client
//! configuration presenting a given workload's certificate. Peer identities are read from the
//! verified certificate with [`spiffe_id_of_certificate`].
//!
//! | module | owns |
//! |---|---|
//! | `spiffe` | the SPIFFE ID type and reading it from a certificate |
//! | [`verify`] | the trust bundle and the rustls verifiers (chain, validity, one SPIFFE ID) |
//! | [`ca`] | the CA folder, issuing certificates from CSRs, the [`CertificateAuthority`] seam, [`LocalCa`] |
//! | [`store`] | [`Identities`]: in-memory keys, CSRs, renewal, cached rustls configs |
//! | [`etcd_ca`] | [`EtcdCa`]: requests through etcd, the watched trust bundle |
//! | [`resources`] | the `CertificateRequest`, `TrustBundle` and `WorkloadIdentity` documents and their keys |
//! | [`signer`] | `mesh-agent ca run`: validation, signing, exactly-once answers |
//! | [`setup`] | the agent's identities from `spec.identity` |

pub mod ca;
pub mod etcd_ca;
pub mod resources;
pub mod setup;
pub mod signer;
mod spiffe;
pub mod store;
pub mod verify;

pub use ca::{CaDir, CaError, CertificateAuthority, IssuedCertificate, LocalCa, SigningRequest};
pub use etcd_ca::EtcdCa;
pub use setup::start_for_agent;
pub use spiffe::{SpiffeId, SpiffeIdError, spiffe_id_of_certificate};
pub use store::{Identities, IdentityStatus, RenewalSettings};
pub use verify::{
    SharedBundle, SpiffeClientVerifier, SpiffeServerVerifier, TrustBundle, VerifyError,
};

use std::{future::Future, pin::Pin, sync::Arc};

/// Why credentials could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no certificate for {identity} yet: {reason}")]
    NotIssued { identity: String, reason: String },
    #[error("identity {identity} is outside the trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: String,
        trust_domain: String,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Other(String),
}

/// A boxed future, so [`TlsCredentials`] stays object safe.
pub type CredentialsFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, IdentityError>> + Send + 'a>>;

/// What the transport needs from identity: rustls configurations that always reflect the
/// current certificates and trust bundle (rotation swaps what these return; connections already
/// open keep the configuration they started with).
pub trait TlsCredentials: Send + Sync + std::fmt::Debug {
    /// The trust domain every peer must belong to.
    fn trust_domain(&self) -> &str;

    /// This node's SPIFFE ID.
    fn node_identity(&self) -> &SpiffeId;

    /// Server side of the node-to-node tunnel: presents this node's certificate, requires a
    /// client certificate that chains to the current trust bundle and carries exactly one
    /// SPIFFE ID of the trust domain. ALPN `h2`.
    fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, IdentityError>;

    /// Client side: presents `source`'s certificate (issued on first use, then rotated), and
    /// accepts only a server certificate that chains to the trust bundle and names a node of
    /// the trust domain. ALPN `h2`.
    fn client_config<'a>(
        &'a self,
        source: &'a SpiffeId,
    ) -> CredentialsFuture<'a, Arc<rustls::ClientConfig>>;

    /// The configuration [`client_config`](Self::client_config) would return for `source`
    /// now, without waiting, issuing or marking the identity as used; `None` when there is
    /// none (or the implementation cannot tell). Lets connections pooled above the transport
    /// notice a renewal between uses (a different `Arc` than the one they were made with).
    fn current_client_config(&self, source: &SpiffeId) -> Option<Arc<rustls::ClientConfig>> {
        let _ = source;
        None
    }
}
