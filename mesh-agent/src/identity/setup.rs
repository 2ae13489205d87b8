//! The agent's identities from its configuration (`spec.identity`): the CA the node uses
//! (the local CA folder standalone, the etcd signer in etcd mode) and the node certificate
//! issued before the agent reports ready.

use std::sync::Arc;

use tracing::{error, info};

use crate::config::AgentConfig;

use super::{CertificateAuthority, Identities, IdentityError, LocalCa, RenewalSettings};

/// Starts the agent's identities and waits (at most `spec.identity.issueTimeout`) for the
/// node's certificate. `None` when identity is not configured or its CA cannot be used;
/// every failure is logged with its reason and never stops the agent: plain capture serves
/// regardless, and a node certificate that did not arrive in time keeps being retried.
pub async fn start_for_agent(config: &AgentConfig) -> Option<Identities> {
    let spec = config.spec.identity.as_ref()?;
    let identities = match build(config).await {
        Ok(identities) => identities,
        Err(error) => {
            error!(%error, "workload identity unavailable: no mTLS between nodes");
            return None;
        }
    };
    match identities.wait_for_node(spec.issue_timeout).await {
        Ok(()) => info!(
            identity = %super::TlsCredentials::node_identity(&identities),
            "node identity ready"
        ),
        Err(error) => error!(
            %error,
            "no node certificate yet: mTLS between nodes is unavailable until it arrives \
             (retrying in the background)"
        ),
    }
    Some(identities)
}

async fn build(config: &AgentConfig) -> Result<Identities, IdentityError> {
    let Some(spec) = &config.spec.identity else {
        return Err(IdentityError::Other("spec.identity is not set".to_owned()));
    };
    let ca: Arc<dyn CertificateAuthority> = match &config.spec.etcd {
        None => {
            let dir = spec.local_ca.clone().unwrap_or_default().dir;
            let ca = LocalCa::open(&dir, &spec.trust_domain, spec.certificate_ttl)
                .map_err(|error| IdentityError::Other(format!("local CA: {error}")))?;
            info!(
                dir = %dir.display(),
                trust_domain = %spec.trust_domain,
                "local CA (standalone: one machine only)"
            );
            Arc::new(ca)
        }
        Some(_) => {
            return Err(IdentityError::Other(
                "the etcd signer is not available in this build".to_owned(),
            ));
        }
    };
    Identities::start(&config.metadata.name, ca, RenewalSettings::default())
}
