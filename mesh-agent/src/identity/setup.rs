//! The agent's identities from its configuration (`spec.identity`): the CA the node uses
//! (the local CA folder standalone, the etcd signer in etcd mode) and the node certificate
//! issued before the agent reports ready.

use std::{sync::Arc, time::Duration};

use tracing::{error, info};

use crate::config::AgentConfig;

use super::{CertificateAuthority, EtcdCa, Identities, IdentityError, LocalCa, RenewalSettings};

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
        Some(etcd_spec) => {
            let etcd = crate::control::Etcd::connect(crate::agent::etcd_settings(etcd_spec))
                .await
                .map_err(|error| IdentityError::Other(format!("etcd: {error}")))?;
            // The signer wants this node's record: give its registration a moment to land
            // (it starts with the agent), so the first request is not refused for lack of it.
            let record = crate::control::keys::node_key(etcd.prefix(), &config.metadata.name);
            let deadline =
                tokio::time::Instant::now() + spec.issue_timeout.min(Duration::from_secs(5));
            while tokio::time::Instant::now() < deadline
                && !matches!(etcd.get(&record).await, Ok(Some(_)))
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            info!(
                trust_domain = %spec.trust_domain,
                "certificates from the signer through etcd"
            );
            Arc::new(
                EtcdCa::start(
                    etcd,
                    &config.metadata.name,
                    &spec.trust_domain,
                    spec.request_timeout,
                )
                .await,
            )
        }
    };
    Identities::start(&config.metadata.name, ca, RenewalSettings::default())
}
