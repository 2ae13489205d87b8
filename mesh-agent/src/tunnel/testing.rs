//! Test-only [`TlsCredentials`]: a CA made with rcgen in memory, a node certificate
//! (`spiffe://<td>/node/<name>`, with an IP SAN for the loopback address so the stock webpki
//! server verifier accepts it) and workload certificates issued on first use, kept (with their
//! client configuration, as the real store does) until [`TestCredentials::renew`].

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig, server::WebPkiClientVerifier, version::TLS13,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::{CredentialsFuture, IdentityError, SpiffeId, TlsCredentials};

/// A certificate authority for tests.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("TestCa").finish_non_exhaustive()
    }
}

type Leaf = (Vec<CertificateDer<'static>>, Vec<u8>);

impl TestCa {
    pub fn new() -> Arc<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        Arc::new(Self {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        })
    }

    fn root(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A leaf certificate for `identity` (and for the loopback address), valid for `lifetime`
    /// when given (else rcgen's default, years).
    fn issue(&self, identity: &SpiffeId, lifetime: Option<Duration>) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        if let Some(lifetime) = lifetime {
            params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
            params.not_after = (SystemTime::now() + lifetime).into();
        }
        params.subject_alt_names = vec![
            SanType::URI(identity.as_str().try_into().unwrap()),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        (
            vec![certificate.der().clone(), self.root()],
            key.serialize_der(),
        )
    }
}

/// Credentials of one node, from a [`TestCa`].
pub struct TestCredentials {
    ca: Arc<TestCa>,
    trust_domain: String,
    node: SpiffeId,
    /// Presented instead of the source's own identity (to test foreign identities).
    client_override: Option<SpiffeId>,
    /// Lifetime of the workload (client) certificates; `None`: years.
    client_lifetime: Option<Duration>,
    issued: Mutex<HashMap<SpiffeId, Leaf>>,
    /// Client configurations, one per identity until it is renewed.
    configs: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
}

impl std::fmt::Debug for TestCredentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TestCredentials")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn key_of(der: &[u8]) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec()))
}

impl TestCredentials {
    pub fn new(ca: &Arc<TestCa>, trust_domain: &str, node: &str) -> Arc<Self> {
        Arc::new(Self {
            ca: Arc::clone(ca),
            trust_domain: trust_domain.to_owned(),
            node: SpiffeId::for_node(trust_domain, node).unwrap(),
            client_override: None,
            client_lifetime: None,
            issued: Mutex::new(HashMap::new()),
            configs: Mutex::new(HashMap::new()),
        })
    }

    /// As [`new`](Self::new), with workload certificates valid for `lifetime` only.
    pub fn with_client_lifetime(
        ca: &Arc<TestCa>,
        trust_domain: &str,
        node: &str,
        lifetime: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            ca: Arc::clone(ca),
            trust_domain: trust_domain.to_owned(),
            node: SpiffeId::for_node(trust_domain, node).unwrap(),
            client_override: None,
            client_lifetime: Some(lifetime),
            issued: Mutex::new(HashMap::new()),
            configs: Mutex::new(HashMap::new()),
        })
    }

    /// Replaces `identity`'s certificate (and client configuration) by a new one, as a
    /// renewal does.
    pub fn renew(&self, identity: &SpiffeId) {
        self.issued.lock().unwrap().remove(identity);
        let renewed = self.build_client_config(identity);
        self.configs
            .lock()
            .unwrap()
            .insert(identity.clone(), renewed);
    }

    /// A client configuration presenting `identity`'s certificate (issued when missing).
    fn build_client_config(&self, identity: &SpiffeId) -> Arc<ClientConfig> {
        let (chain, key) = self.leaf(identity);
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&TLS13])
            .unwrap()
            .with_root_certificates(self.roots())
            .with_client_auth_cert(chain, key_of(&key))
            .unwrap();
        config.alpn_protocols = vec![super::ALPN_H2.to_vec()];
        Arc::new(config)
    }

    /// Credentials whose client side always presents `identity`.
    pub fn presenting(ca: &Arc<TestCa>, trust_domain: &str, identity: SpiffeId) -> Arc<Self> {
        Arc::new(Self {
            ca: Arc::clone(ca),
            trust_domain: trust_domain.to_owned(),
            node: SpiffeId::for_node(trust_domain, "unused").unwrap(),
            client_override: Some(identity),
            client_lifetime: None,
            issued: Mutex::new(HashMap::new()),
            configs: Mutex::new(HashMap::new()),
        })
    }

    fn leaf(&self, identity: &SpiffeId) -> Leaf {
        let lifetime = if identity == &self.node {
            None
        } else {
            self.client_lifetime
        };
        self.issued
            .lock()
            .unwrap()
            .entry(identity.clone())
            .or_insert_with(|| self.ca.issue(identity, lifetime))
            .clone()
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.root()).unwrap();
        Arc::new(roots)
    }
}

impl TlsCredentials for TestCredentials {
    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    fn node_identity(&self) -> &SpiffeId {
        &self.node
    }

    fn server_config(&self) -> Result<Arc<ServerConfig>, IdentityError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots(), provider())
            .build()
            .map_err(|error| IdentityError::Other(error.to_string()))?;
        let (chain, key) = self.leaf(&self.node);
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key_of(&key))?;
        config.alpn_protocols = vec![super::ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    fn client_config<'a>(
        &'a self,
        source: &'a SpiffeId,
    ) -> CredentialsFuture<'a, Arc<ClientConfig>> {
        Box::pin(async move {
            let identity = self.client_override.as_ref().unwrap_or(source);
            if let Some(config) = self.configs.lock().unwrap().get(identity) {
                return Ok(Arc::clone(config));
            }
            let config = self.build_client_config(identity);
            self.configs
                .lock()
                .unwrap()
                .insert(identity.clone(), Arc::clone(&config));
            Ok(config)
        })
    }

    fn current_client_config(&self, source: &SpiffeId) -> Option<Arc<ClientConfig>> {
        let identity = self.client_override.as_ref().unwrap_or(source);
        self.configs.lock().unwrap().get(identity).cloned()
    }
}
