//! Test-only [`TlsCredentials`]: a CA made with rcgen in memory, a node certificate
//! (`spiffe://<td>/node/<name>`, with an IP SAN for the loopback address so the stock webpki
//! server verifier accepts it) and workload certificates issued on first use.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
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

    /// A leaf certificate for `identity` (and for the loopback address).
    fn issue(&self, identity: &SpiffeId) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
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
    issued: Mutex<HashMap<SpiffeId, Leaf>>,
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
            issued: Mutex::new(HashMap::new()),
        })
    }

    /// Credentials whose client side always presents `identity`.
    pub fn presenting(ca: &Arc<TestCa>, trust_domain: &str, identity: SpiffeId) -> Arc<Self> {
        Arc::new(Self {
            ca: Arc::clone(ca),
            trust_domain: trust_domain.to_owned(),
            node: SpiffeId::for_node(trust_domain, "unused").unwrap(),
            client_override: Some(identity),
            issued: Mutex::new(HashMap::new()),
        })
    }

    fn leaf(&self, identity: &SpiffeId) -> Leaf {
        self.issued
            .lock()
            .unwrap()
            .entry(identity.clone())
            .or_insert_with(|| self.ca.issue(identity))
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
            let (chain, key) = self.leaf(identity);
            let mut config = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&TLS13])?
                .with_root_certificates(self.roots())
                .with_client_auth_cert(chain, key_of(&key))?;
            config.alpn_protocols = vec![super::ALPN_H2.to_vec()];
            Ok(Arc::new(config))
        })
    }
}
