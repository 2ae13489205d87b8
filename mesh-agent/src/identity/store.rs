//! The node's key pairs and certificates: [`Identities`], the [`TlsCredentials`] the transport
//! uses.
//!
//! For every SPIFFE ID the node needs (its own `spiffe://<td>/node/<name>` from the start; a
//! workload's ID on the first [`TlsCredentials::client_config`] call for it) it generates an
//! ECDSA P-256 key pair in memory (never written anywhere), builds a PKCS#10 CSR, and gets it
//! signed through a [`CertificateAuthority`]. One task per identity then renews the
//! certificate at about half of its remaining lifetime (±5 % jitter, so a fleet started
//! together does not renew together), with a fresh key each time; a failed renewal is logged
//! and retried with exponential backoff (0.5 s doubling to 30 s) while the current certificate
//! keeps being served until its replacement arrives.
//!
//! rustls configurations are built once per certificate and cached: the server configuration
//! (node certificate, client certificates required, TLS 1.3, ALPN `h2`) and one client
//! configuration per identity. Rotation swaps them; connections already open keep theirs.
//! Both verify peers against the CA's current trust bundle at every handshake
//! ([`super::verify`]). Session resumption is off on both sides, so every connection's peer
//! is verified against the bundle of the moment (a resumed session would skip that).
//!
//! [`Identities::status`] reports, per identity, the certificate's expiry, serial and the last
//! renewal error, for the admin endpoint.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use rand::Rng;
use rcgen::KeyPair;
use rustls::{
    ClientConfig, ServerConfig,
    client::Resumption,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::NoServerSessionStorage,
};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::control::sync::Backoff;

use super::{
    CredentialsFuture, IdentityError, SpiffeId, TlsCredentials,
    ca::{CertificateAuthority, IssuedCertificate, SigningRequest, certificate_request},
    verify::{SharedBundle, SpiffeClientVerifier, SpiffeServerVerifier},
};

/// ALPN protocol of the node-to-node tunnel.
pub const ALPN_H2: &[u8] = b"h2";

/// One certificate with its key, and the rustls configurations built from them.
#[derive(Debug)]
pub struct Credentials {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The leaf's serial number, hex.
    pub serial: String,
    pub received: SystemTime,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// What the admin endpoint shows about one identity.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IdentityStatus {
    pub identity: String,
    /// RFC 3339; absent before the first certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after_unix: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Certificates received (the first included).
    pub issued: u64,
    /// Failed attempts since the start.
    pub failures: u64,
    /// The last attempt's error, cleared by a success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    issued: u64,
    failures: u64,
    last_error: Option<String>,
}

#[derive(Debug)]
struct Slot {
    identity: SpiffeId,
    current: ArcSwapOption<Credentials>,
    counters: Mutex<Counters>,
    /// Bumped after every attempt, so first users can wait for its outcome.
    attempts: watch::Sender<u64>,
    /// Unix seconds of the last `client_config` call for this identity.
    last_used: AtomicU64,
}

impl Slot {
    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn not_issued(&self) -> IdentityError {
        IdentityError::NotIssued {
            identity: self.identity.to_string(),
            reason: self
                .counters()
                .last_error
                .clone()
                .unwrap_or_else(|| "the first certificate has not arrived yet".to_owned()),
        }
    }

    fn status(&self) -> IdentityStatus {
        let current = self.current.load_full();
        let counters = self.counters();
        IdentityStatus {
            identity: self.identity.to_string(),
            not_after: current
                .as_ref()
                .map(|c| humantime::format_rfc3339_seconds(c.not_after).to_string()),
            not_after_unix: current.as_ref().map(|c| unix_seconds(c.not_after)),
            serial: current.as_ref().map(|c| c.serial.clone()),
            issued: counters.issued,
            failures: counters.failures,
            last_error: counters.last_error.clone(),
        }
    }
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// How [`Identities`] renews.
#[derive(Debug, Clone)]
pub struct RenewalSettings {
    /// Renew when this fraction of the remaining lifetime has passed (before jitter).
    pub fraction: f64,
    /// ± this fraction of the remaining lifetime, at random.
    pub jitter: f64,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// A workload identity no `client_config` call asked for this long is dropped (its key
    /// and certificate forgotten, renewal stopped) instead of renewed; the node's never is.
    pub idle_after: Duration,
}

impl Default for RenewalSettings {
    fn default() -> Self {
        RenewalSettings {
            fraction: 0.5,
            jitter: 0.05,
            retry_base: Duration::from_millis(500),
            retry_cap: Duration::from_secs(30),
            idle_after: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug)]
struct Inner {
    trust_domain: String,
    node: SpiffeId,
    ca: Arc<dyn CertificateAuthority>,
    bundle: SharedBundle,
    provider: Arc<CryptoProvider>,
    renewal: RenewalSettings,
    slots: Mutex<HashMap<SpiffeId, Arc<Slot>>>,
    /// Dropped with the last [`Identities`]: every renewal task stops.
    stop: watch::Sender<()>,
}

/// The node's identities and their certificates. Cheap to clone (one `Arc`); the renewal
/// tasks stop when the last clone is dropped. Must be created inside a tokio runtime.
#[derive(Debug, Clone)]
pub struct Identities {
    inner: Arc<Inner>,
}

impl Identities {
    /// Starts issuing the node's certificate (`spiffe://<td>/node/<node_name>`) in the
    /// background; [`Identities::wait_for_node`] waits for it.
    pub fn start(
        node_name: &str,
        ca: Arc<dyn CertificateAuthority>,
        renewal: RenewalSettings,
    ) -> Result<Self, IdentityError> {
        let bundle = ca.trust_bundle();
        let trust_domain = bundle.load().trust_domain().to_owned();
        let node = SpiffeId::for_node(&trust_domain, node_name).map_err(|error| {
            IdentityError::Other(format!(
                "the node name {node_name:?} makes no SPIFFE ID: {error}"
            ))
        })?;
        let (stop, _) = watch::channel(());
        let identities = Identities {
            inner: Arc::new(Inner {
                trust_domain,
                node: node.clone(),
                ca,
                bundle,
                provider: Arc::new(rustls::crypto::ring::default_provider()),
                renewal,
                slots: Mutex::new(HashMap::new()),
                stop,
            }),
        };
        identities.slot(&node);
        Ok(identities)
    }

    /// Waits until the node's certificate is issued, at most `timeout`. The error names the
    /// last failure; issuance keeps being retried in the background either way.
    pub async fn wait_for_node(&self, timeout: Duration) -> Result<(), IdentityError> {
        let slot = self.slot(&self.inner.node);
        let mut attempts = slot.attempts.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                if slot.current.load().is_some() {
                    return;
                }
                if attempts.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        match (waited, slot.current.load().is_some()) {
            (_, true) => Ok(()),
            (Err(_), false) => Err(IdentityError::NotIssued {
                identity: self.inner.node.to_string(),
                reason: format!(
                    "not issued within {}: {}",
                    humantime::format_duration(timeout),
                    slot.not_issued()
                ),
            }),
            (Ok(()), false) => Err(slot.not_issued()),
        }
    }

    /// These identities as the transport's [`TlsCredentials`].
    pub fn credentials_handle(&self) -> Arc<dyn TlsCredentials> {
        Arc::new(self.clone())
    }

    /// The current credentials of `identity`, if issued.
    pub fn credentials(&self, identity: &SpiffeId) -> Option<Arc<Credentials>> {
        self.inner
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(identity)
            .and_then(|slot| slot.current.load_full())
    }

    /// The trust bundle the verifiers read.
    pub fn trust_bundle(&self) -> SharedBundle {
        Arc::clone(&self.inner.bundle)
    }

    /// Per identity: expiry, serial, renewals and the last error (node first).
    pub fn status(&self) -> Vec<IdentityStatus> {
        let slots = self
            .inner
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut statuses: Vec<IdentityStatus> = slots.values().map(|slot| slot.status()).collect();
        let node = self.inner.node.as_str();
        statuses.sort_by(|a, b| {
            (a.identity != node, &a.identity).cmp(&(b.identity != node, &b.identity))
        });
        statuses
    }

    /// Prometheus text for the admin endpoint's `/metrics`.
    pub fn render_metrics(&self) -> String {
        let statuses = self.status();
        let mut text = String::new();
        let mut family =
            |name: &str,
             kind: &str,
             help: &str,
             value: &dyn Fn(&IdentityStatus) -> Option<String>| {
                text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
                for status in &statuses {
                    if let Some(value) = value(status) {
                        text.push_str(&format!(
                            "{name}{{identity=\"{}\"}} {value}\n",
                            status.identity
                        ));
                    }
                }
            };
        family(
            "mesh_identity_certificate_expiry_timestamp_seconds",
            "gauge",
            "When the identity's current certificate expires (Unix time).",
            &|status| status.not_after_unix.map(|at| at.to_string()),
        );
        family(
            "mesh_identity_certificates_issued_total",
            "counter",
            "Certificates received for the identity.",
            &|status| Some(status.issued.to_string()),
        );
        family(
            "mesh_identity_issuance_failures_total",
            "counter",
            "Failed attempts to get a certificate for the identity.",
            &|status| Some(status.failures.to_string()),
        );
        family(
            "mesh_identity_issuance_failing",
            "gauge",
            "1 while the identity's last issuance attempt failed.",
            &|status| Some(u8::from(status.last_error.is_some()).to_string()),
        );
        text.push_str(&format!(
            "# HELP mesh_identity_trust_bundle_cas CA certificates in the trust bundle.\n# TYPE mesh_identity_trust_bundle_cas gauge\nmesh_identity_trust_bundle_cas {}\n",
            self.inner.bundle.load().certificates().len()
        ));
        text
    }

    /// The slot of `identity`, created (and its issuing task started) on first use.
    fn slot(&self, identity: &SpiffeId) -> Arc<Slot> {
        let mut slots = self
            .inner
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get(identity) {
            return Arc::clone(slot);
        }
        let (attempts, _) = watch::channel(0);
        let slot = Arc::new(Slot {
            identity: identity.clone(),
            current: ArcSwapOption::empty(),
            counters: Mutex::new(Counters::default()),
            attempts,
            last_used: AtomicU64::new(unix_seconds(SystemTime::now())),
        });
        slots.insert(identity.clone(), Arc::clone(&slot));
        tokio::spawn(keep_issued(
            Arc::downgrade(&self.inner),
            self.inner.stop.subscribe(),
            Arc::clone(&slot),
        ));
        slot
    }

    async fn client_credentials(
        &self,
        source: &SpiffeId,
    ) -> Result<Arc<Credentials>, IdentityError> {
        if source.trust_domain() != self.inner.trust_domain {
            return Err(IdentityError::ForeignTrustDomain {
                identity: source.to_string(),
                trust_domain: self.inner.trust_domain.clone(),
            });
        }
        let slot = self.slot(source);
        slot.last_used
            .store(unix_seconds(SystemTime::now()), Ordering::Relaxed);
        let mut attempts = slot.attempts.subscribe();
        if let Some(current) = slot.current.load_full() {
            return Ok(current);
        }
        // Wait for the outcome of the attempt under way (the first, usually).
        let _ = attempts.changed().await;
        slot.current.load_full().ok_or_else(|| slot.not_issued())
    }
}

impl Inner {
    /// One issuance: new key, CSR, signature, configurations.
    async fn issue(&self, identity: &SpiffeId) -> Result<Credentials, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|error| IdentityError::Other(format!("cannot generate a key: {error}")))?;
        let request = SigningRequest {
            identity: identity.clone(),
            csr_pem: certificate_request(identity, &key)?,
        };
        let issued = self.ca.sign(&request).await?;
        self.credentials(identity, issued, &key)
    }

    fn credentials(
        &self,
        identity: &SpiffeId,
        issued: IssuedCertificate,
        key: &KeyPair,
    ) -> Result<Credentials, IdentityError> {
        let leaf = issued
            .chain
            .first()
            .ok_or_else(|| IdentityError::Other("the CA returned no certificate".to_owned()))?;
        let named = super::spiffe_id_of_certificate(leaf).map_err(|error| {
            IdentityError::Other(format!("the CA returned an unusable certificate: {error}"))
        })?;
        if &named != identity {
            return Err(IdentityError::Other(format!(
                "the CA returned a certificate for {named}, not {identity}"
            )));
        }
        let serial = serial_of(leaf);
        let private = || -> PrivateKeyDer<'static> {
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
        };
        let versions = [&rustls::version::TLS13];
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&versions)?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(Arc::clone(
                &self.bundle,
            ))))
            .with_single_cert(issued.chain.clone(), private())?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        server.session_storage = Arc::new(NoServerSessionStorage {});
        let mut client = ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(Arc::clone(
                &self.bundle,
            ))))
            .with_client_auth_cert(issued.chain.clone(), private())?;
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        client.resumption = Resumption::disabled();
        Ok(Credentials {
            chain: issued.chain,
            not_before: issued.not_before,
            not_after: issued.not_after,
            serial,
            received: SystemTime::now(),
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

fn serial_of(certificate: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(certificate.as_ref())
        .map(|(_, parsed)| parsed.tbs_certificate.raw_serial_as_string())
        .unwrap_or_default()
}

/// When to renew a certificate received now: `fraction` (± `jitter`) of its remaining life.
fn renewal_delay(settings: &RenewalSettings, not_after: SystemTime, now: SystemTime) -> Duration {
    let remaining = not_after.duration_since(now).unwrap_or_default();
    let jitter = if settings.jitter > 0.0 {
        rand::rng().random_range(-settings.jitter..=settings.jitter)
    } else {
        0.0
    };
    remaining.mul_f64((settings.fraction + jitter).clamp(0.05, 0.95))
}

/// Issues `slot`'s certificate, then renews it, until the [`Identities`] are dropped.
async fn keep_issued(inner: Weak<Inner>, mut stop: watch::Receiver<()>, slot: Arc<Slot>) {
    let mut backoff: Option<Backoff> = None;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let settings = strong.renewal.clone();
        let idle =
            unix_seconds(SystemTime::now()).saturating_sub(slot.last_used.load(Ordering::Relaxed));
        let issued_once = slot.current.load().is_some();
        if slot.identity != strong.node && issued_once && idle > settings.idle_after.as_secs() {
            strong
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&slot.identity);
            info!(identity = %slot.identity, "identity unused for a while: certificate dropped");
            // Wake anyone waiting on this slot; later callers get a new one.
            slot.attempts.send_modify(|count| *count += 1);
            return;
        }
        let outcome = strong.issue(&slot.identity).await;
        drop(strong);
        let delay = match outcome {
            Ok(credentials) => {
                let renewing = slot.current.load().is_some();
                let delay = renewal_delay(&settings, credentials.not_after, SystemTime::now());
                info!(
                    identity = %slot.identity,
                    serial = %credentials.serial,
                    not_after = %humantime::format_rfc3339_seconds(credentials.not_after),
                    renew_in = %humantime::format_duration(Duration::from_secs(delay.as_secs())),
                    "{}",
                    if renewing { "certificate renewed" } else { "certificate issued" }
                );
                slot.current.store(Some(Arc::new(credentials)));
                let mut counters = slot.counters();
                counters.issued += 1;
                counters.last_error = None;
                backoff = None;
                delay
            }
            Err(error) => {
                let delay = backoff
                    .get_or_insert_with(|| Backoff::new(settings.retry_base, settings.retry_cap))
                    .next_delay();
                let serving = slot.current.load_full();
                match &serving {
                    Some(current) => warn!(
                        identity = %slot.identity, %error, retry_in = ?delay,
                        still_valid_until = %humantime::format_rfc3339_seconds(current.not_after),
                        "certificate renewal failed; serving the current certificate and retrying"
                    ),
                    None => warn!(
                        identity = %slot.identity, %error, retry_in = ?delay,
                        "cannot get a certificate; retrying"
                    ),
                }
                let mut counters = slot.counters();
                counters.failures += 1;
                counters.last_error = Some(error.to_string());
                delay
            }
        };
        slot.attempts.send_modify(|count| *count += 1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {
                debug!(identity = %slot.identity, "identity renewal stopped");
                return;
            }
        }
    }
}

impl TlsCredentials for Identities {
    fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }

    fn node_identity(&self) -> &SpiffeId {
        &self.inner.node
    }

    fn server_config(&self) -> Result<Arc<ServerConfig>, IdentityError> {
        let slot = self.slot(&self.inner.node);
        match slot.current.load_full() {
            Some(credentials) => Ok(Arc::clone(&credentials.server)),
            None => Err(slot.not_issued()),
        }
    }

    fn client_config<'a>(
        &'a self,
        source: &'a SpiffeId,
    ) -> CredentialsFuture<'a, Arc<ClientConfig>> {
        Box::pin(async move {
            let credentials = self.client_credentials(source).await?;
            Ok(Arc::clone(&credentials.client))
        })
    }

    fn current_client_config(&self, source: &SpiffeId) -> Option<Arc<ClientConfig>> {
        let slot = self
            .inner
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(source)
            .cloned()?;
        let current = slot.current.load_full()?;
        Some(Arc::clone(&current.client))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::identity::{
        ca::{CaDir, LocalCa},
        spiffe_id_of_certificate,
    };

    /// A LocalCa that can be told to fail, and counts requests.
    #[derive(Debug)]
    struct FlakyCa {
        inner: LocalCa,
        failing: AtomicBool,
        requests: AtomicU32,
    }

    impl CertificateAuthority for FlakyCa {
        fn sign<'a>(
            &'a self,
            request: &'a SigningRequest,
        ) -> CredentialsFuture<'a, IssuedCertificate> {
            self.requests.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Box::pin(async {
                    Err(IdentityError::Other("the signer is away".to_owned()))
                });
            }
            self.inner.sign(request)
        }

        fn trust_bundle(&self) -> SharedBundle {
            self.inner.trust_bundle()
        }
    }

    fn flaky(dir: &std::path::Path, ttl: Duration, failing: bool) -> Arc<FlakyCa> {
        Arc::new(FlakyCa {
            inner: LocalCa::open(dir, "mesh.local", ttl).unwrap(),
            failing: AtomicBool::new(failing),
            requests: AtomicU32::new(0),
        })
    }

    fn fast() -> RenewalSettings {
        RenewalSettings {
            retry_base: Duration::from_millis(20),
            retry_cap: Duration::from_millis(100),
            ..RenewalSettings::default()
        }
    }

    /// A TLS handshake over loopback: the server with `server`, the client with `client`.
    /// Returns the identity each side saw, or the first error.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Result<(SpiffeId, SpiffeId), String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server_side = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(server)
                .accept(stream)
                .await
                .map_err(|error| error.to_string())?;
            let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            tls.write_all(b"k").await.map_err(|e| e.to_string())?;
            Ok::<_, String>(spiffe_id_of_certificate(&peer).unwrap())
        });
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let client_result = async {
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(ServerName::try_from("any.name").unwrap(), stream)
                .await
                .map_err(|error| error.to_string())?;
            tls.write_all(b"o").await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            let (_, connection) = tls.get_ref();
            assert_eq!(connection.alpn_protocol(), Some(ALPN_H2));
            let peer = connection.peer_certificates().unwrap()[0].clone();
            Ok::<_, String>(spiffe_id_of_certificate(&peer).unwrap())
        }
        .await;
        let server_result = server_side.await.unwrap();
        match (server_result, client_result) {
            (Ok(server), Ok(client)) => Ok((server, client)),
            (server, client) => Err(format!(
                "server: {:?}; client: {:?}",
                server.err(),
                client.err()
            )),
        }
    }

    #[tokio::test]
    async fn node_and_workload_certificates_give_a_mutual_tls_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let ca = flaky(dir.path(), Duration::from_secs(3600), false);
        let identities = Identities::start("node-a", ca.clone(), fast()).unwrap();
        identities
            .wait_for_node(Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(identities.trust_domain(), "mesh.local");
        assert_eq!(
            identities.node_identity().as_str(),
            "spiffe://mesh.local/node/node-a"
        );
        let workload = SpiffeId::for_agent("mesh.local", "planner").unwrap();
        let client = identities.client_config(&workload).await.unwrap();
        // Cached: the same configuration until rotation, one signing request per identity.
        let again = identities.client_config(&workload).await.unwrap();
        assert!(Arc::ptr_eq(&client, &again));
        assert_eq!(ca.requests.load(Ordering::SeqCst), 2);
        let (seen_by_server, seen_by_client) =
            handshake(identities.server_config().unwrap(), client)
                .await
                .unwrap();
        assert_eq!(seen_by_server, workload);
        assert_eq!(&seen_by_client, identities.node_identity());

        // Another trust domain is refused before anything is signed.
        let foreign = SpiffeId::for_agent("other.local", "x").unwrap();
        assert!(matches!(
            identities.client_config(&foreign).await,
            Err(IdentityError::ForeignTrustDomain { .. })
        ));
        let status = identities.status();
        assert_eq!(status.len(), 2);
        assert_eq!(status[0].identity, "spiffe://mesh.local/node/node-a");
        assert!(status[0].not_after_unix.is_some());
        let metrics = identities.render_metrics();
        assert!(
            metrics.contains(
                "mesh_identity_certificates_issued_total{identity=\"spiffe://mesh.local/agent/planner\"} 1"
            ),
            "{metrics}"
        );
    }

    /// A client configuration presenting a certificate of `ca` for `identity`, trusting
    /// servers of `trusted`.
    fn client_with(ca: &CaDir, identity: &SpiffeId, trusted: SharedBundle) -> Arc<ClientConfig> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = certificate_request(identity, &key).unwrap();
        let issued = ca.issue(&csr, identity, Duration::from_secs(600)).unwrap();
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(trusted)))
                .with_client_auth_cert(
                    issued.chain,
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                )
                .unwrap();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Arc::new(config)
    }

    #[tokio::test]
    async fn a_peer_from_another_ca_is_refused_by_a_real_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let ours = Identities::start(
            "node-a",
            flaky(dir.path(), Duration::from_secs(3600), false),
            fast(),
        )
        .unwrap();
        ours.wait_for_node(Duration::from_secs(10)).await.unwrap();
        let workload = SpiffeId::for_agent("mesh.local", "planner").unwrap();
        // Same trust domain and identity, another CA: a forgery. The client trusts our server,
        // so the refusal is the server's.
        let forger = CaDir::init(other_dir.path(), "mesh.local").unwrap();
        let forged = client_with(&forger, &workload, ours.trust_bundle());
        let error = handshake(ours.server_config().unwrap(), forged)
            .await
            .unwrap_err();
        assert!(
            error.contains("UnknownIssuer") || error.contains("BadSignature"),
            "{error}"
        );
        // The genuine CA's certificate for the same identity passes.
        let genuine = CaDir::load(dir.path()).unwrap();
        let good = client_with(&genuine, &workload, ours.trust_bundle());
        assert!(handshake(ours.server_config().unwrap(), good).await.is_ok());
        // And a client of ours refuses a server of the other CA.
        let theirs = Identities::start(
            "node-a",
            flaky(other_dir.path(), Duration::from_secs(3600), false),
            fast(),
        )
        .unwrap();
        theirs.wait_for_node(Duration::from_secs(10)).await.unwrap();
        let our_client = ours.client_config(&workload).await.unwrap();
        let error = handshake(theirs.server_config().unwrap(), our_client)
            .await
            .unwrap_err();
        assert!(!error.is_empty());
    }

    #[tokio::test]
    async fn a_failing_ca_is_retried_and_reported_until_it_answers() {
        let dir = tempfile::tempdir().unwrap();
        let ca = flaky(dir.path(), Duration::from_secs(3600), true);
        let identities = Identities::start("node-a", ca.clone(), fast()).unwrap();
        let error = identities
            .wait_for_node(Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("the signer is away"), "{error}");
        assert!(matches!(
            identities.server_config(),
            Err(IdentityError::NotIssued { .. })
        ));
        assert!(identities.status()[0].failures >= 1);
        ca.failing.store(false, Ordering::SeqCst);
        identities
            .wait_for_node(Duration::from_secs(10))
            .await
            .unwrap();
        assert!(identities.server_config().is_ok());
        assert_eq!(identities.status()[0].last_error, None);
    }

    #[tokio::test]
    async fn certificates_are_renewed_before_expiry_and_the_old_one_served_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        // A 2 s certificate: renewed at about half of its remaining life.
        let ca = flaky(dir.path(), Duration::from_secs(2), false);
        let identities = Identities::start("node-a", ca.clone(), fast()).unwrap();
        identities
            .wait_for_node(Duration::from_secs(10))
            .await
            .unwrap();
        let first = identities.credentials(identities.node_identity()).unwrap();
        let first_server = identities.server_config().unwrap();
        let node = identities.node_identity().clone();
        let first_client = identities.client_config(&node).await.unwrap();
        // The non-waiting read answers what `client_config` would, and nothing for an identity
        // never asked for (it issues nothing).
        assert!(Arc::ptr_eq(
            &identities.current_client_config(&node).unwrap(),
            &first_client
        ));
        let never = SpiffeId::for_agent("mesh.local", "never-asked").unwrap();
        assert!(identities.current_client_config(&never).is_none());
        assert!(identities.credentials(&never).is_none());
        // Renewal fails for a while: the first certificate stays served.
        ca.failing.store(true, Ordering::SeqCst);
        let slot = identities.slot(identities.node_identity());
        let mut attempts = slot.attempts.subscribe();
        attempts.changed().await.unwrap();
        assert!(Arc::ptr_eq(
            &identities.server_config().unwrap(),
            &first_server
        ));
        assert!(identities.status()[0].last_error.is_some());
        ca.failing.store(false, Ordering::SeqCst);
        loop {
            attempts.changed().await.unwrap();
            let current = identities.credentials(identities.node_identity()).unwrap();
            if current.serial != first.serial {
                assert!(current.not_after >= first.not_after);
                break;
            }
        }
        assert!(!Arc::ptr_eq(
            &identities.server_config().unwrap(),
            &first_server
        ));
        // Renewed: another client configuration is current (pooled connections retire on it).
        let renewed = identities.current_client_config(&node).unwrap();
        assert!(!Arc::ptr_eq(&renewed, &first_client));
        assert!(Arc::ptr_eq(
            &renewed,
            &identities.client_config(&node).await.unwrap()
        ));
        assert!(identities.status()[0].issued >= 2);
    }

    #[tokio::test]
    async fn unused_workload_identities_are_dropped_not_renewed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = flaky(dir.path(), Duration::from_secs(2), false);
        let settings = RenewalSettings {
            idle_after: Duration::ZERO,
            ..fast()
        };
        let identities = Identities::start("node-a", ca, settings).unwrap();
        let workload = SpiffeId::for_agent("mesh.local", "planner").unwrap();
        identities.client_config(&workload).await.unwrap();
        let slot = identities.slot(&workload);
        let mut attempts = slot.attempts.subscribe();
        // The renewal at about 1 s finds the identity unused for more than zero seconds.
        while identities.credentials(&workload).is_some() {
            attempts.changed().await.unwrap();
        }
        assert!(
            identities
                .status()
                .iter()
                .all(|s| s.identity != workload.as_str())
        );
        // The node's own identity stays; the workload's comes back on demand.
        assert!(identities.credentials(identities.node_identity()).is_some());
        identities.client_config(&workload).await.unwrap();
    }

    #[test]
    fn renewal_happens_around_half_of_the_remaining_life() {
        let settings = RenewalSettings::default();
        let now = SystemTime::now();
        for _ in 0..100 {
            let delay = renewal_delay(&settings, now + Duration::from_secs(1000), now);
            assert!(
                delay >= Duration::from_secs(450) && delay <= Duration::from_secs(550),
                "{delay:?}"
            );
        }
        assert_eq!(
            renewal_delay(&settings, now - Duration::from_secs(1), now),
            Duration::ZERO
        );
    }

    #[test]
    fn ca_dir_is_shared_with_local_ca() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalCa::open(dir.path(), "mesh.local", Duration::from_secs(60)).unwrap();
        let loaded = CaDir::load(dir.path()).unwrap();
        assert_eq!(local.ca().certificate_pem(), loaded.certificate_pem());
    }
}
