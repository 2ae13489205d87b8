//! The signer, `mesh-agent ca run`: the only holder of the CA key in a cluster. It publishes
//! the trust bundle to etcd and answers every `CertificateRequest`, exactly once, with a
//! certificate or a reasoned refusal.
//!
//! # Loop
//!
//! Publish `TrustBundle mesh-system/default` (every CA of the folder's `bundle.pem`, so a
//! rotation overlaps); list the requests at one revision, answer the unanswered ones, watch
//! from the next revision; list again after a compaction, a lost stream, and every
//! `resync` (a safety net: answering is idempotent). The CA folder is re-read on each resync,
//! so `mesh-agent ca rotate` / `prune` apply without a restart.
//!
//! # Exactly once
//!
//! Each answer is one transaction guarded by the request's `mod_revision` as read: a request
//! changed (or answered by another signer) meanwhile is not overwritten. A certificate is
//! written together with the signer's records of its nonce and public key
//! (`<prefix>/signer/nonces/…`, `<prefix>/signer/keys/…`, leased for twice the certificate
//! lifetime plus the request window), guarded by their absence, so a replay racing its original
//! cannot be signed twice either.
//!
//! # Validation (fail closed; every refusal is written to `status.denied` and logged)
//!
//! 1. The request decodes, belongs under its key, and is fresh: created within `maxRequestAge`
//!    (and not more than a minute in the future).
//! 2. The requested ID parses, is in the CA's trust domain, and lives in its namespace
//!    (`mesh-system` for nodes, `<ns>` for `/ns/<ns>/sa/<sa>`).
//! 3. The requesting node has a live `Node` record (`<prefix>/nodes/<node>`, held by a lease).
//! 4. [`authorize`]: a node may get its own node ID only; a workload ID only if the registry
//!    places that workload on that node (an `Agent` endpoint or a registered `AgentInstance`
//!    for `/agent/<name>`, in any namespace; a live `WorkloadIdentity` record the node wrote
//!    for an enrolled pod, or an `Agent` endpoint, for `/ns/<ns>/sa/<sa>`).
//! 5. The CSR's signature verifies (proof of possession) and it names no other identity.
//! 6. Not a replay: neither its nonce nor its public key was signed before.
//! 7. With Kubernetes settings (`--kubernetes`), for `/ns/<ns>/sa/<sa>`: the API server has a
//!    pod of that service account scheduled on the requesting node and not finished
//!    ([`crate::kube::attest`]); the node's own record is not enough. An API server that cannot
//!    be asked is a refusal too.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use rcgen::PublicKeyData;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    control::{Etcd, EtcdError, keys, node::decode_node, sync::Backoff},
    kube::{Attestation, KubeError, KubeSettings, PodAttestor},
    policy::Resource,
};

use super::{
    SpiffeId,
    ca::{CLOCK_SKEW, CaDir, CaError, DEFAULT_CERTIFICATE_TTL, parse_csr},
    resources::{
        self, CertificateRequest, CertificateRequestStatus, SYSTEM_NAMESPACE, TrustBundleResource,
    },
    verify::certificates_to_pem,
};

/// Why the signer cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("{0}")]
    Other(String),
}

/// How the signer signs.
#[derive(Debug, Clone)]
pub struct SignerSettings {
    /// The CA folder (`mesh-agent ca init`).
    pub dir: PathBuf,
    /// Lifetime of issued certificates.
    pub certificate_ttl: Duration,
    /// Requests older than this are refused as stale.
    pub max_request_age: Duration,
    /// How often requests are listed again and the CA folder re-read.
    pub resync: Duration,
    /// The Kubernetes API server that must confirm every `/ns/<ns>/sa/<sa>` grant; `None`
    /// (bare metal) leaves the registry's word final.
    pub kubernetes: Option<KubeSettings>,
}

impl SignerSettings {
    pub fn new(dir: PathBuf) -> Self {
        SignerSettings {
            dir,
            certificate_ttl: DEFAULT_CERTIFICATE_TTL,
            max_request_age: Duration::from_secs(300),
            resync: Duration::from_secs(30),
            kubernetes: None,
        }
    }
}

/// What the signer decided about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Already answered (or not ours to answer): nothing to write.
    Skip,
    Deny(String),
    Sign {
        certificate: String,
        nonce: String,
        fingerprint: String,
        /// For the log line.
        summary: IssuedSummary,
    },
}

/// What the log says about an issued certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSummary {
    pub identity: String,
    pub node: String,
    pub serial: String,
    pub not_after: String,
}

/// The signer. See the module documentation.
#[derive(Debug)]
pub struct Signer {
    etcd: Etcd,
    settings: SignerSettings,
    ca: Arc<CaDir>,
    /// Present with Kubernetes settings.
    pods: Option<PodAttestor>,
}

impl Signer {
    /// Loads the CA folder.
    pub fn new(etcd: Etcd, settings: SignerSettings) -> Result<Self, SignerError> {
        let ca = Arc::new(CaDir::load(&settings.dir)?);
        let pods = settings
            .kubernetes
            .as_ref()
            .map(PodAttestor::new)
            .transpose()?;
        Ok(Signer {
            etcd,
            settings,
            ca,
            pods,
        })
    }

    /// The CA in use.
    pub fn ca(&self) -> &CaDir {
        &self.ca
    }

    /// Writes the trust bundle when etcd's differs from the folder's.
    pub async fn publish_bundle(&self) -> Result<(), SignerError> {
        let key = resources::trust_bundle_key(self.etcd.prefix());
        let resource = TrustBundleResource::new(
            self.ca.trust_domain(),
            &certificates_to_pem(self.ca.bundle()),
        );
        let value = serde_json::to_vec(&resource).map_err(|e| SignerError::Other(e.to_string()))?;
        if let Some(current) = self.etcd.get(&key).await?
            && current.value == value
        {
            return Ok(());
        }
        let put_key = key.clone();
        self.etcd
            .call("publishing the trust bundle", |mut client| async move {
                client.put(put_key, value, None).await
            })
            .await?;
        info!(%key, cas = self.ca.bundle().len(), trust_domain = self.ca.trust_domain(), "trust bundle published");
        Ok(())
    }

    /// Serves until `shutdown`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), SignerError> {
        self.publish_bundle().await?;
        info!(
            dir = %self.settings.dir.display(),
            trust_domain = self.ca.trust_domain(),
            ttl = %humantime::format_duration(self.settings.certificate_ttl),
            kubernetes = %self.pods.as_ref().map_or("off (registry only)", PodAttestor::api_server),
            "signer running"
        );
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            if *shutdown.borrow_and_update() {
                return Ok(());
            }
            self.reload_ca().await;
            let outcome = tokio::select! {
                outcome = self.session() => outcome,
                _ = shutdown.changed() => return Ok(()),
            };
            match outcome {
                Ok(()) => backoff.reset(),
                Err(problem) => {
                    let delay = backoff.next_delay();
                    warn!(%problem, ?delay, "signer lost etcd; listing again");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
            }
        }
    }

    /// Re-reads the CA folder (rotation, pruning) and republishes the bundle if it changed.
    async fn reload_ca(&mut self) {
        match CaDir::load(&self.settings.dir) {
            Ok(ca) => {
                let changed = ca.certificate_pem() != self.ca.certificate_pem()
                    || ca.bundle() != self.ca.bundle();
                if changed {
                    info!(cas = ca.bundle().len(), "CA folder changed; using it");
                    self.ca = Arc::new(ca);
                }
            }
            Err(error) => warn!(%error, "cannot re-read the CA folder; keeping the loaded CA"),
        }
        if let Err(error) = self.publish_bundle().await {
            warn!(%error, "cannot publish the trust bundle; retrying");
        }
    }

    /// One list-and-watch session; `Ok` at a planned resync.
    async fn session(&self) -> Result<(), String> {
        let prefix = resources::requests_prefix(self.etcd.prefix());
        let listing = self
            .etcd
            .list_prefix(&prefix)
            .await
            .map_err(|error| error.to_string())?;
        for entry in &listing.entries {
            if self
                .collect_garbage(&entry.key, &entry.value, entry.mod_revision)
                .await
            {
                continue;
            }
            self.handle(&entry.key, &entry.value, entry.mod_revision)
                .await?;
        }
        let start = listing.revision + 1;
        let watch_prefix = prefix.clone();
        let mut stream = self
            .etcd
            .call("watching certificate requests", |mut client| async move {
                client
                    .watch(
                        watch_prefix,
                        Some(WatchOptions::new().with_prefix().with_start_revision(start)),
                    )
                    .await
            })
            .await
            .map_err(|error| error.to_string())?;
        let resync = tokio::time::sleep(self.settings.resync.max(Duration::from_secs(1)));
        tokio::pin!(resync);
        loop {
            tokio::select! {
                message = stream.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => return Err("etcd closed the watch stream".to_owned()),
                        Err(error) => return Err(self.etcd.error("watching", error).to_string()),
                    };
                    if response.canceled() {
                        info!(compact_revision = response.compact_revision(), "watch cancelled; listing again");
                        return Ok(());
                    }
                    for event in response.events() {
                        if event.event_type() != EventType::Put {
                            continue;
                        }
                        let Some(kv) = event.kv() else { continue };
                        let Ok(key) = kv.key_str() else { continue };
                        self.handle(key, kv.value(), kv.mod_revision()).await?;
                    }
                }
                _ = &mut resync => return Ok(()),
            }
        }
    }

    /// Deletes an answered request its node did not delete (it died or timed out) once it is
    /// older than twice the request window. True when deleted.
    async fn collect_garbage(&self, key: &str, value: &[u8], mod_revision: i64) -> bool {
        let Ok(request) = CertificateRequest::decode(value) else {
            return false;
        };
        let Some(status) = &request.status else {
            return false;
        };
        let Ok(answered) = humantime::parse_rfc3339_weak(&status.answer_time) else {
            return false;
        };
        let old = SystemTime::now()
            .duration_since(answered)
            .is_ok_and(|age| age > self.settings.max_request_age * 2);
        if !old {
            return false;
        }
        let delete_key = key.to_owned();
        let deleted = self
            .etcd
            .call(
                "deleting an old certificate request",
                |mut client| async move {
                    client
                        .txn(
                            Txn::new()
                                .when([Compare::mod_revision(
                                    delete_key.as_str(),
                                    CompareOp::Equal,
                                    mod_revision,
                                )])
                                .and_then([TxnOp::delete(delete_key.as_str(), None)]),
                        )
                        .await
                },
            )
            .await;
        let done = deleted.is_ok_and(|response| response.succeeded());
        if done {
            debug!(request = key, "old answered certificate request deleted");
        }
        done
    }

    /// Answers the request stored at `key` (if it needs an answer). An `Err` is an etcd
    /// failure (the session starts again); refusals are answers.
    async fn handle(&self, key: &str, value: &[u8], mod_revision: i64) -> Result<(), String> {
        loop {
            let decision = self.decide(key, value).await;
            let written = match &decision {
                Decision::Skip => return Ok(()),
                Decision::Deny(reason) => {
                    warn!(request = key, %reason, "certificate request denied");
                    self.answer(key, value, mod_revision, &decision).await?
                }
                Decision::Sign { summary, .. } => {
                    let written = self.answer(key, value, mod_revision, &decision).await?;
                    if written {
                        info!(
                            request = key,
                            identity = %summary.identity,
                            node = %summary.node,
                            serial = %summary.serial,
                            not_after = %summary.not_after,
                            "certificate issued"
                        );
                    }
                    written
                }
            };
            if written {
                return Ok(());
            }
            // The request changed, or its nonce or key was recorded meanwhile: read it again.
            match self
                .etcd
                .get(key)
                .await
                .map_err(|error| error.to_string())?
            {
                Some(entry) if entry.mod_revision == mod_revision => {
                    // Unchanged: the nonce or key raced in. Decide again (it is a replay now).
                    continue;
                }
                _ => return Ok(()),
            }
        }
    }

    /// Writes the decision into the request's status, guarded by `mod_revision` (and, for a
    /// certificate, by the absence of its nonce and key records). `Ok(false)` when a guard
    /// failed.
    async fn answer(
        &self,
        key: &str,
        value: &[u8],
        mod_revision: i64,
        decision: &Decision,
    ) -> Result<bool, String> {
        let mut status = CertificateRequestStatus {
            answer_time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            ..CertificateRequestStatus::default()
        };
        match decision {
            Decision::Skip => return Ok(true),
            Decision::Deny(reason) => status.denied = Some(reason.clone()),
            Decision::Sign { certificate, .. } => status.certificate = Some(certificate.clone()),
        }
        // Keep whatever the node wrote; add the status.
        let mut document: serde_json::Value = match serde_json::from_slice(value) {
            Ok(serde_json::Value::Object(map)) => serde_json::Value::Object(map),
            _ => {
                warn!(
                    request = key,
                    "the request is not a JSON object; cannot answer it"
                );
                return Ok(true);
            }
        };
        document["status"] = serde_json::to_value(&status).map_err(|error| error.to_string())?;
        let answered = serde_json::to_vec(&document).map_err(|error| error.to_string())?;
        let mut compares = vec![Compare::mod_revision(key, CompareOp::Equal, mod_revision)];
        let mut operations = vec![TxnOp::put(key, answered, None)];
        if let Decision::Sign {
            nonce, fingerprint, ..
        } = decision
        {
            let retention = self.settings.certificate_ttl * 2 + self.settings.max_request_age;
            let ttl = i64::try_from(retention.as_secs())
                .unwrap_or(i64::MAX)
                .max(60);
            let lease = self
                .etcd
                .call("granting a replay-record lease", |mut client| async move {
                    client.lease_grant(ttl, None).await
                })
                .await
                .map_err(|error| error.to_string())?
                .id();
            let prefix = self.etcd.prefix();
            for record in [
                resources::signed_nonce_key(prefix, nonce),
                resources::signed_key_key(prefix, fingerprint),
            ] {
                compares.push(Compare::version(record.as_str(), CompareOp::Equal, 0));
                operations.push(TxnOp::put(
                    record,
                    key.as_bytes().to_vec(),
                    Some(PutOptions::new().with_lease(lease)),
                ));
            }
        }
        let response = self
            .etcd
            .call("answering a certificate request", |mut client| async move {
                client
                    .txn(Txn::new().when(compares).and_then(operations))
                    .await
            })
            .await
            .map_err(|error| error.to_string())?;
        Ok(response.succeeded())
    }

    /// Validates the request at `key` and signs it, or says why not. Reads the node record,
    /// the registry and the replay records from etcd.
    pub async fn decide(&self, key: &str, value: &[u8]) -> Decision {
        match self.check(key, value).await {
            Ok(decision) => decision,
            Err(reason) => Decision::Deny(reason),
        }
    }

    async fn check(&self, key: &str, value: &[u8]) -> Result<Decision, String> {
        let request = match CertificateRequest::decode(value) {
            Ok(request) => request,
            Err(error) => {
                // Answer what has no status yet; leave answered documents alone.
                let answered = serde_json::from_slice::<serde_json::Value>(value)
                    .ok()
                    .is_some_and(|doc| !doc["status"].is_null());
                if answered {
                    return Ok(Decision::Skip);
                }
                return Err(format!("the request does not decode: {error}"));
            }
        };
        if request.status.is_some() {
            return Ok(Decision::Skip);
        }
        let prefix = self.etcd.prefix();
        let expected_key =
            resources::request_key(prefix, &request.metadata.namespace, &request.metadata.name);
        if expected_key != key {
            return Err(format!(
                "the request names {}/{} but is stored at {key}",
                request.metadata.namespace, request.metadata.name
            ));
        }
        let spec = &request.spec;
        let node_name_ok = !spec.node.is_empty()
            && spec.node.len() <= 253
            && spec
                .node
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !node_name_ok {
            return Err(format!("{:?} is not a node name", spec.node));
        }
        self.check_fresh(&spec.creation_time)?;
        let identity: SpiffeId = spec
            .identity
            .parse()
            .map_err(|error| format!("the requested identity is invalid: {error}"))?;
        if identity.trust_domain() != self.ca.trust_domain() {
            return Err(format!(
                "{identity} is outside the trust domain {}",
                self.ca.trust_domain()
            ));
        }
        if let Some(namespace) = expected_namespace(&identity)
            && namespace != request.metadata.namespace
        {
            return Err(format!(
                "a request for {identity} belongs in namespace {namespace}, not {}",
                request.metadata.namespace
            ));
        }
        self.check_node_live(&spec.node).await?;
        authorize(
            &self.etcd,
            &identity,
            &spec.node,
            &request.metadata.namespace,
        )
        .await?;
        let csr = parse_csr(&spec.request).map_err(|error| error.to_string())?;
        let fingerprint = resources::hex(&Sha256::digest(csr.public_key.der_bytes()));
        if spec.nonce.len() < 16 || !spec.nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("the nonce must be at least 16 hex digits".to_owned());
        }
        for (record, what) in [
            (
                resources::signed_nonce_key(prefix, &spec.nonce),
                "its nonce",
            ),
            (
                resources::signed_key_key(prefix, &fingerprint),
                "its public key",
            ),
        ] {
            let seen = self
                .etcd
                .get(&record)
                .await
                .map_err(|error| format!("cannot check for a replay: {error}"))?;
            if let Some(seen) = seen {
                return Err(format!(
                    "replay: {what} was already signed (for {})",
                    String::from_utf8_lossy(&seen.value)
                ));
            }
        }
        // Last: the one check that leaves this process.
        self.check_kubernetes(&identity, &spec.node).await?;
        let issued = self
            .ca
            .issue(&spec.request, &identity, self.settings.certificate_ttl)
            .map_err(|error| error.to_string())?;
        let summary = IssuedSummary {
            identity: identity.to_string(),
            node: spec.node.clone(),
            serial: short_serial(&issued.chain[0]),
            not_after: humantime::format_rfc3339_seconds(issued.not_after).to_string(),
        };
        Ok(Decision::Sign {
            certificate: certificates_to_pem(&issued.chain),
            nonce: spec.nonce.clone(),
            fingerprint,
            summary,
        })
    }

    fn check_fresh(&self, creation_time: &str) -> Result<(), String> {
        let created = humantime::parse_rfc3339_weak(creation_time)
            .map_err(|error| format!("creationTime {creation_time:?} is not RFC 3339: {error}"))?;
        let now = SystemTime::now();
        if let Ok(age) = now.duration_since(created)
            && age > self.settings.max_request_age
        {
            return Err(format!(
                "stale: created {} ago (at most {} allowed)",
                humantime::format_duration(Duration::from_secs(age.as_secs())),
                humantime::format_duration(self.settings.max_request_age)
            ));
        }
        if let Ok(ahead) = created.duration_since(now)
            && ahead > CLOCK_SKEW
        {
            return Err(format!(
                "creationTime is {} in the future",
                humantime::format_duration(Duration::from_secs(ahead.as_secs()))
            ));
        }
        Ok(())
    }

    /// With Kubernetes settings, a service account ID needs the API server's confirmation
    /// that a pod of that account is scheduled on `node` (see [`crate::kube::attest`]).
    async fn check_kubernetes(&self, identity: &SpiffeId, node: &str) -> Result<(), String> {
        let Some(pods) = &self.pods else {
            return Ok(());
        };
        let Some((namespace, account)) = resources::service_account_of(identity) else {
            return Ok(());
        };
        match pods.attest(namespace, account, node).await {
            Ok(Attestation::Runs { pod }) => {
                debug!(%identity, node, pod = %pod, "the Kubernetes API server confirms the pod");
                Ok(())
            }
            Ok(Attestation::NoPod { reason }) => Err(format!(
                "the Kubernetes API server does not confirm {identity} on node {node:?}: {reason}"
            )),
            Err(error) => Err(format!(
                "cannot confirm {identity} on node {node:?} with the Kubernetes API server \
                 (refused until it answers): {error}"
            )),
        }
    }

    async fn check_node_live(&self, node: &str) -> Result<(), String> {
        let key = keys::node_key(self.etcd.prefix(), node);
        let entry = self
            .etcd
            .get(&key)
            .await
            .map_err(|error| format!("cannot read the node record: {error}"))?
            .ok_or_else(|| format!("node {node:?} has no live Node record ({key})"))?;
        if entry.lease == 0 {
            return Err(format!(
                "the Node record {key} is not held by a lease (not written by a running agent)"
            ));
        }
        let record = decode_node(&entry.value)
            .map_err(|error| format!("the Node record {key} does not decode: {error}"))?;
        if record.metadata.name != node {
            return Err(format!(
                "the Node record {key} names {}",
                record.metadata.name
            ));
        }
        Ok(())
    }
}

/// Runs a `mesh-agent ca` command. Errors carry the exit code: 1 failure, 2 usage,
/// 3 unusable CA folder, 4 etcd unreachable.
pub async fn execute(command: crate::cli::CaCommand) -> Result<(), (u8, anyhow::Error)> {
    use crate::cli::CaCommand;
    let ca_failure = |error: CaError| {
        let code = match error {
            CaError::Io { .. } => 1,
            _ => 3,
        };
        (code, anyhow::Error::new(error))
    };
    match command {
        CaCommand::Init { dir, trust_domain } => {
            let ca = CaDir::init(&dir, &trust_domain).map_err(ca_failure)?;
            println!(
                "created a CA for trust domain {} in {}",
                ca.trust_domain(),
                dir.display()
            );
        }
        CaCommand::Rotate { dir } => {
            let ca = CaDir::rotate(&dir).map_err(ca_failure)?;
            println!(
                "new signing CA in {}; the bundle trusts {} CAs. Remove the old one with \
                 `mesh-agent ca prune --dir {}` once every certificate it signed has expired \
                 (one certificate lifetime from now)",
                dir.display(),
                ca.bundle().len(),
                dir.display()
            );
        }
        CaCommand::Prune { dir } => {
            let removed = CaDir::prune(&dir).map_err(ca_failure)?;
            println!(
                "removed {removed} old CA(s) from the trust bundle in {}",
                dir.display()
            );
        }
        CaCommand::Run {
            etcd,
            etcd_tls,
            prefix,
            dir,
            certificate_ttl,
            max_request_age,
            resync,
            kubernetes,
        } => {
            if certificate_ttl < Duration::from_secs(10)
                || certificate_ttl > Duration::from_secs(30 * 24 * 3600)
            {
                return Err((
                    2,
                    anyhow::anyhow!("--certificate-ttl must be between 10s and 30d"),
                ));
            }
            let kubernetes = kubernetes
                .settings()
                .map_err(|error| (2, anyhow::Error::new(error)))?;
            let mut etcd_settings = crate::control::EtcdSettings::new(etcd);
            etcd_settings.prefix = prefix;
            etcd_settings.tls = etcd_tls.settings();
            let etcd = Etcd::connect(etcd_settings).await.map_err(|error| {
                let code = if error.is_unreachable() { 4 } else { 2 };
                (code, anyhow::Error::new(error))
            })?;
            let signer = Signer::new(
                etcd,
                SignerSettings {
                    dir,
                    certificate_ttl,
                    max_request_age,
                    resync,
                    kubernetes,
                },
            )
            .map_err(|error| match error {
                SignerError::Ca(error) => ca_failure(error),
                SignerError::Kube(error) => (2, anyhow::Error::new(error)),
                other => (1, anyhow::Error::new(other)),
            })?;
            let (stop, stopped) = watch::channel(false);
            let signals = tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut terminate), Ok(mut interrupt)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
                info!("stopping the signer");
                let _ = stop.send(true);
            });
            let outcome = signer.run(stopped).await;
            signals.abort();
            outcome.map_err(|error| {
                let code = match &error {
                    SignerError::Etcd(error) if error.is_unreachable() => 4,
                    _ => 1,
                };
                (code, anyhow::Error::new(error))
            })?;
        }
    }
    Ok(())
}

/// The namespace a request for `identity` must be stored in, when the identity fixes it.
fn expected_namespace(identity: &SpiffeId) -> Option<&str> {
    if identity.node_name().is_some() {
        return Some(SYSTEM_NAMESPACE);
    }
    match workload_parts(identity) {
        Some((Some(namespace), _)) => Some(namespace),
        _ => None,
    }
}

/// `(namespace, name)` of a workload ID: `(Some(ns), sa)` for `/ns/<ns>/sa/<sa>`,
/// `(None, name)` for `/agent/<name>`.
fn workload_parts(identity: &SpiffeId) -> Option<(Option<&str>, &str)> {
    let segments: Vec<&str> = identity.path().trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["agent", name] => Some((None, name)),
        ["ns", namespace, "sa", account] => Some((Some(namespace), account)),
        _ => None,
    }
}

/// May `node` hold `identity`? A node gets its own node ID only; a workload ID only when the
/// registry places that workload on that node:
///
/// - `/agent/<name>`: an `Agent` named `<name>` in any namespace with an endpoint whose `node`
///   is the requester, or an `AgentInstance` `<name>.<node>.<id>` (any namespace) of that
///   identity that the node's registration API published. Every record is checked on its own:
///   two namespaces with an agent of that name place it on their own nodes only.
/// - `/ns/<ns>/sa/<account>`: a live `WorkloadIdentity` record `<ns>/<account>@<node>` that the
///   node wrote under its lease while such a pod runs there, or an `Agent` `<ns>/<account>`
///   with an endpoint on the node.
///
/// `namespace` is the request's (checked against the ID by the caller).
pub async fn authorize(
    etcd: &Etcd,
    identity: &SpiffeId,
    node: &str,
    namespace: &str,
) -> Result<(), String> {
    if let Some(own) = identity.node_name() {
        if own == node {
            return Ok(());
        }
        return Err(format!(
            "node {node:?} may get only its own node identity, not {identity}"
        ));
    }
    match workload_parts(identity) {
        Some((None, name)) => {
            if agent_placed_anywhere(etcd, name, node).await?
                || registered_on(etcd, identity, node, name).await?
            {
                return Ok(());
            }
            Err(format!(
                "the registry does not place {identity} on node {node:?} (no Agent named \
                 {name} in any namespace with an endpoint on that node, and no instance of it \
                 registered there)"
            ))
        }
        Some((Some(account_namespace), account)) => {
            if pod_identity_on(etcd, identity, node).await?
                || agent_placed(etcd, account_namespace, account, node).await?
            {
                return Ok(());
            }
            Err(format!(
                "the registry does not place {identity} on node {node:?} (no live \
                 WorkloadIdentity {account_namespace}/{} written by that node: no pod of that \
                 service account is enrolled there; and no Agent {account_namespace}/{account} \
                 with an endpoint on that node; request namespace {namespace})",
                resources::workload_identity_name(account, node)
            ))
        }
        None => Err(format!(
            "{identity} is neither a node (/node/<name>) nor a workload (/agent/<name>, \
             /ns/<ns>/sa/<sa>) identity"
        )),
    }
}

/// Whether a decoded `Agent` has an endpoint on `node`.
fn places_on(etcd: &Etcd, key: &str, value: &[u8], node: &str) -> bool {
    match crate::control::codec::decode(etcd.prefix(), key, value) {
        Ok(Resource::Agent(agent)) => agent
            .spec
            .endpoints
            .iter()
            .any(|endpoint| endpoint.node.as_deref() == Some(node)),
        Ok(_) => false,
        Err(problems) => {
            debug!(?problems, key, "an invalid Agent resource places nothing");
            false
        }
    }
}

/// Whether the `Agent` `<namespace>/<name>` has an endpoint on `node`.
async fn agent_placed(
    etcd: &Etcd,
    namespace: &str,
    name: &str,
    node: &str,
) -> Result<bool, String> {
    let key = keys::resource_key(
        etcd.prefix(),
        &crate::policy::ResourceKey {
            kind: crate::policy::Kind::Agent,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        },
    );
    let entry = etcd
        .get(&key)
        .await
        .map_err(|error| format!("cannot read the registry: {error}"))?;
    Ok(entry.is_some_and(|entry| places_on(etcd, &key, &entry.value, node)))
}

/// Whether an `Agent` named `name`, in any namespace, has an endpoint on `node`.
async fn agent_placed_anywhere(etcd: &Etcd, name: &str, node: &str) -> Result<bool, String> {
    let prefix = keys::kind_prefix(etcd.prefix(), crate::policy::Kind::Agent);
    let listing = etcd
        .list_prefix(&prefix)
        .await
        .map_err(|error| format!("cannot read the registry: {error}"))?;
    Ok(listing.entries.iter().any(|entry| {
        // `<prefix>/agents/<namespace>/<name>`: the last segment is the name.
        entry.key.rsplit('/').next() == Some(name)
            && places_on(etcd, &entry.key, &entry.value, node)
    }))
}

/// Whether a workload registered on `node` through its agent's registration API (an
/// `AgentInstance` `<name>.<node>.<id>` in any namespace, held by that node's lease) carries
/// `identity`.
async fn registered_on(
    etcd: &Etcd,
    identity: &SpiffeId,
    node: &str,
    name: &str,
) -> Result<bool, String> {
    let prefix = keys::kind_prefix(etcd.prefix(), crate::policy::Kind::AgentInstance);
    let listing = etcd
        .list_prefix(&prefix)
        .await
        .map_err(|error| format!("cannot read the registered instances: {error}"))?;
    let record_prefix = format!("{name}.{node}.");
    Ok(listing.entries.iter().any(|entry| {
        entry
            .key
            .rsplit('/')
            .next()
            .is_some_and(|record| record.starts_with(&record_prefix))
            && matches!(
                crate::control::codec::decode(etcd.prefix(), &entry.key, &entry.value),
                Ok(Resource::AgentInstance(instance))
                    if instance.spec.node == node
                        && instance.spec.agent == name
                        && instance.spec.identity == identity.as_str()
            )
    }))
}

/// Whether `node` holds a live `WorkloadIdentity` record for `identity` (a service account
/// ID): written under a lease (by a running agent, gone with it), naming that node and that
/// identity under the key both determine.
async fn pod_identity_on(etcd: &Etcd, identity: &SpiffeId, node: &str) -> Result<bool, String> {
    let Some((namespace, account)) = resources::service_account_of(identity) else {
        return Ok(false);
    };
    let key = resources::workload_identity_key(
        etcd.prefix(),
        namespace,
        &resources::workload_identity_name(account, node),
    );
    let Some(entry) = etcd
        .get(&key)
        .await
        .map_err(|error| format!("cannot read the workload identity records: {error}"))?
    else {
        return Ok(false);
    };
    if entry.lease == 0 {
        warn!(%key, "a WorkloadIdentity record not held by a lease places nothing (not written by a running agent)");
        return Ok(false);
    }
    match resources::WorkloadIdentityRecord::decode(&entry.value) {
        Ok(record) => Ok(record.spec.node == node
            && record.spec.identity == identity.as_str()
            && record.metadata.namespace == namespace
            && record.metadata.name == resources::workload_identity_name(account, node)),
        Err(error) => {
            warn!(%key, %error, "an invalid WorkloadIdentity record places nothing");
            Ok(false)
        }
    }
}

fn short_serial(certificate: &rustls::pki_types::CertificateDer<'_>) -> String {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(certificate.as_ref())
        .map(|(_, parsed)| parsed.tbs_certificate.raw_serial_as_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_identities_name_their_registry_entry() {
        let agent = SpiffeId::for_agent("mesh.local", "tools").unwrap();
        assert_eq!(workload_parts(&agent), Some((None, "tools")));
        assert_eq!(expected_namespace(&agent), None);
        let account = SpiffeId::for_service_account("mesh.local", "team-a", "planner").unwrap();
        assert_eq!(workload_parts(&account), Some((Some("team-a"), "planner")));
        assert_eq!(expected_namespace(&account), Some("team-a"));
        let node = SpiffeId::for_node("mesh.local", "node-a").unwrap();
        assert_eq!(expected_namespace(&node), Some("mesh-system"));
        let odd: SpiffeId = "spiffe://mesh.local/something/else".parse().unwrap();
        assert_eq!(workload_parts(&odd), None);
    }
}
