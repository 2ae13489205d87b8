//! The node side of the etcd signer: [`EtcdCa`] writes a `CertificateRequest` for each CSR,
//! waits (watching the key, with a timeout) for `mesh-agent ca run` to answer in
//! `status.certificate` or `status.denied`, deletes the request, and keeps the `TrustBundle`
//! (`mesh-system/default`) current by watching it, so a CA rotation applies without restart.
//!
//! Until the signer has published a bundle the node trusts nothing (every peer is refused);
//! a bundle for another trust domain, or one that does not parse, is refused with a log line
//! and the last good one stays in force. A deleted bundle is ignored the same way.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use etcd_client::{Compare, CompareOp, EventType, Txn, TxnOp, WatchOptions};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::control::{Etcd, sync::Backoff};

use super::{
    CredentialsFuture, IdentityError,
    ca::{CertificateAuthority, IssuedCertificate, SigningRequest},
    resources::{self, CertificateRequest, TrustBundleResource},
    verify::{SharedBundle, TrustBundle},
};

/// Certificates signed by the signer through etcd.
#[derive(Debug)]
pub struct EtcdCa {
    etcd: Etcd,
    node: String,
    timeout: Duration,
    bundle: SharedBundle,
    /// Dropped with the CA: the bundle watcher stops.
    _stop: watch::Sender<()>,
}

impl EtcdCa {
    /// Reads the trust bundle once (an absent or unreadable one is logged, not fatal), then
    /// watches it in the background. `timeout` bounds the wait for each answer.
    pub async fn start(etcd: Etcd, node: &str, trust_domain: &str, timeout: Duration) -> Self {
        let bundle: SharedBundle =
            Arc::new(ArcSwap::from_pointee(TrustBundle::empty(trust_domain)));
        let (stop, stopped) = watch::channel(());
        let key = resources::trust_bundle_key(etcd.prefix());
        let revision = match load_bundle(&etcd, &key, &bundle).await {
            Ok(revision) => Some(revision),
            Err(error) => {
                warn!(%error, "cannot read the trust bundle yet; retrying in the background");
                None
            }
        };
        tokio::spawn(watch_bundle(
            etcd.clone(),
            key,
            Arc::clone(&bundle),
            revision,
            stopped,
        ));
        EtcdCa {
            etcd,
            node: node.to_owned(),
            timeout,
            bundle,
            _stop: stop,
        }
    }

    async fn request(&self, request: &SigningRequest) -> Result<IssuedCertificate, String> {
        let resource = CertificateRequest::new(&request.identity, &self.node, &request.csr_pem);
        let key = resources::request_key(
            self.etcd.prefix(),
            &resource.metadata.namespace,
            &resource.metadata.name,
        );
        let value = serde_json::to_vec(&resource).map_err(|error| error.to_string())?;
        let (put_key, put_value) = (key.clone(), value);
        let created = self
            .etcd
            .call("writing a certificate request", |mut client| async move {
                client
                    .txn(
                        Txn::new()
                            .when([Compare::version(put_key.clone(), CompareOp::Equal, 0)])
                            .and_then([TxnOp::put(put_key, put_value, None)]),
                    )
                    .await
            })
            .await
            .map_err(|error| error.to_string())?;
        if !created.succeeded() {
            return Err(format!("the request name {key} is taken; retrying"));
        }
        let revision = created.header().map_or(0, |header| header.revision());
        debug!(%key, identity = %request.identity, "certificate request written");
        let answer = tokio::time::timeout(self.timeout, self.answer(&key, revision)).await;
        // The request has served its purpose whatever happened (best effort: the signer
        // ignores answered requests, and an unanswered one is refused as stale later).
        let delete_key = key.clone();
        let _ = self
            .etcd
            .call("deleting a certificate request", |mut client| async move {
                client.delete(delete_key, None).await
            })
            .await;
        match answer {
            Ok(Ok(pem)) => {
                IssuedCertificate::from_pem_chain(&pem).map_err(|error| error.to_string())
            }
            Ok(Err(reason)) => Err(reason),
            Err(_) => Err(format!(
                "the signer did not answer {key} within {}: is `mesh-agent ca run` running \
                 against this etcd and prefix?",
                humantime::format_duration(self.timeout)
            )),
        }
    }

    /// Waits for the signer's answer to the request at `key`, written at `revision`.
    async fn answer(&self, key: &str, revision: i64) -> Result<String, String> {
        let watch_key = key.to_owned();
        let mut stream = self
            .etcd
            .call("watching a certificate request", |mut client| async move {
                client
                    .watch(
                        watch_key,
                        Some(WatchOptions::new().with_start_revision(revision + 1)),
                    )
                    .await
            })
            .await
            .map_err(|error| error.to_string())?;
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return self.read_answer(key).await,
                Err(error) => {
                    debug!(%error, "the watch on a certificate request failed; reading it");
                    return self.read_answer(key).await;
                }
            };
            if response.canceled() {
                return self.read_answer(key).await;
            }
            for event in response.events() {
                match event.event_type() {
                    EventType::Delete => {
                        return Err(format!("{key} was deleted before the signer answered"));
                    }
                    EventType::Put => {
                        let Some(kv) = event.kv() else { continue };
                        if let Some(answer) = decode_answer(kv.value())? {
                            return answer;
                        }
                    }
                }
            }
        }
    }

    /// Reads the answer directly (after the watch ended), waiting for it if still absent.
    async fn read_answer(&self, key: &str) -> Result<String, String> {
        loop {
            match self.etcd.get(key).await {
                Ok(Some(entry)) => {
                    if let Some(answer) = decode_answer(&entry.value)? {
                        return answer;
                    }
                }
                Ok(None) => return Err(format!("{key} disappeared before the signer answered")),
                Err(error) => debug!(%error, "reading a certificate request"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The answer in a stored request, if there is one yet.
fn decode_answer(value: &[u8]) -> Result<Option<Result<String, String>>, String> {
    let request = CertificateRequest::decode(value)
        .map_err(|error| format!("the stored request is unreadable: {error}"))?;
    Ok(match request.status {
        Some(status) => match (status.certificate, status.denied) {
            (Some(certificate), None) => Some(Ok(certificate)),
            (_, Some(reason)) => Some(Err(format!("denied by the signer: {reason}"))),
            (None, None) => None,
        },
        None => None,
    })
}

impl CertificateAuthority for EtcdCa {
    fn sign<'a>(&'a self, request: &'a SigningRequest) -> CredentialsFuture<'a, IssuedCertificate> {
        Box::pin(async move {
            self.request(request)
                .await
                .map_err(|reason| IdentityError::NotIssued {
                    identity: request.identity.to_string(),
                    reason,
                })
        })
    }

    fn trust_bundle(&self) -> SharedBundle {
        Arc::clone(&self.bundle)
    }
}

/// Reads the bundle at `key` into `bundle`; returns the store's revision.
async fn load_bundle(etcd: &Etcd, key: &str, bundle: &SharedBundle) -> Result<i64, String> {
    let listing = etcd
        .list_prefix(key)
        .await
        .map_err(|error| error.to_string())?;
    match listing.entries.iter().find(|entry| entry.key == key) {
        Some(entry) => apply_bundle(bundle, &entry.value),
        None => warn!(
            %key,
            "no trust bundle in etcd yet (is `mesh-agent ca run` running?): every peer is refused \
             until it appears"
        ),
    }
    Ok(listing.revision)
}

/// Installs a stored bundle if it is valid and of our trust domain.
fn apply_bundle(bundle: &SharedBundle, value: &[u8]) {
    let trust_domain = bundle.load().trust_domain().to_owned();
    let parsed = TrustBundleResource::decode(value).and_then(|resource| {
        if resource.spec.trust_domain != trust_domain {
            return Err(format!(
                "it is for trust domain {:?}, this node's is {trust_domain:?}",
                resource.spec.trust_domain
            ));
        }
        TrustBundle::from_pem(&trust_domain, &resource.spec.certificates)
            .map_err(|error| error.to_string())
    });
    match parsed {
        Ok(new) => {
            let changed = new.certificates() != bundle.load().certificates();
            if changed {
                info!(cas = new.certificates().len(), "trust bundle updated");
                bundle.store(Arc::new(new));
            }
        }
        Err(error) => warn!(%error, "refused a trust bundle from etcd; keeping the current one"),
    }
}

async fn watch_bundle(
    etcd: Etcd,
    key: String,
    bundle: SharedBundle,
    mut revision: Option<i64>,
    mut stop: watch::Receiver<()>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let outcome = tokio::select! {
            outcome = watch_bundle_once(&etcd, &key, &bundle, &mut revision) => outcome,
            _ = stop.changed() => return,
        };
        let delay = backoff.next_delay();
        debug!(problem = %outcome, ?delay, "trust bundle watch ended; starting again");
        revision = None;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Lists (when `revision` is unknown) and watches the bundle until something fails; returns
/// what did.
async fn watch_bundle_once(
    etcd: &Etcd,
    key: &str,
    bundle: &SharedBundle,
    revision: &mut Option<i64>,
) -> String {
    let start = match revision {
        Some(revision) => *revision,
        None => match load_bundle(etcd, key, bundle).await {
            Ok(listed) => listed,
            Err(error) => return error,
        },
    };
    let watch_key = key.to_owned();
    let mut stream = match etcd
        .call("watching the trust bundle", |mut client| async move {
            client
                .watch(
                    watch_key,
                    Some(WatchOptions::new().with_start_revision(start + 1)),
                )
                .await
        })
        .await
    {
        Ok(stream) => stream,
        Err(error) => return error.to_string(),
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return "the watch stream ended".to_owned(),
            Err(error) => return etcd.error("watching the trust bundle", error).to_string(),
        };
        if response.canceled() {
            return format!(
                "the watch was cancelled (compacted at {})",
                response.compact_revision()
            );
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            *revision = Some(kv.mod_revision());
            match event.event_type() {
                EventType::Put => apply_bundle(bundle, kv.value()),
                EventType::Delete => {
                    warn!(%key, "the trust bundle was deleted from etcd; keeping the current one")
                }
            }
        }
    }
}
