//! Peer verification for SPIFFE X.509 identities: the trust bundle (every CA certificate the
//! mesh currently trusts, old and new side by side during a rotation) and the rustls verifiers
//! built on it.
//!
//! A peer is accepted when its certificate chains (rustls-webpki, the ring provider's signature
//! algorithms) to a CA of the *current* bundle, is valid at the handshake's time, carries the
//! serverAuth or clientAuth extended key usage its side needs, and names exactly one SPIFFE ID
//! (URI SAN) of our trust domain. DNS names are ignored: mesh peers are named by their SPIFFE
//! ID only. The client side additionally requires the server to be a node agent
//! (`spiffe://<td>/node/<name>`): a workload certificate can never stand in for a node.
//!
//! The verifiers read the bundle through an [`ArcSwap`], so a bundle update applies to every
//! handshake that starts after it, with no configuration rebuilt and no connection dropped.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, OtherError,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use tracing::info;
use webpki::{EndEntityCert, KeyUsage};

use super::{SpiffeId, SpiffeIdError, spiffe_id_of_certificate};

/// Why a trust bundle or a peer certificate was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    #[error("the trust bundle holds no CA certificate")]
    EmptyBundle,
    #[error("the trust bundle is not valid PEM: {0}")]
    BundlePem(String),
    #[error("CA certificate {index} of the trust bundle cannot be a trust anchor: {problem}")]
    BadAnchor { index: usize, problem: String },
    #[error("the certificate chain does not verify: {0}")]
    Chain(webpki::Error),
    #[error("the peer's identity is unusable: {0}")]
    Identity(#[from] SpiffeIdError),
    #[error("the peer {identity} is outside the trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: String,
        trust_domain: String,
    },
    #[error("the peer {0} is not a node agent (spiffe://<trust-domain>/node/<name> required)")]
    NotANode(String),
}

impl From<VerifyError> for TlsError {
    fn from(error: VerifyError) -> Self {
        use webpki::Error as W;
        let certificate = match error {
            VerifyError::Chain(W::CertExpired { time, not_after }) => {
                CertificateError::ExpiredContext { time, not_after }
            }
            VerifyError::Chain(W::CertNotValidYet { time, not_before }) => {
                CertificateError::NotValidYetContext { time, not_before }
            }
            VerifyError::Chain(W::InvalidCertValidity) => CertificateError::Expired,
            VerifyError::Chain(W::UnknownIssuer) => CertificateError::UnknownIssuer,
            VerifyError::Chain(W::InvalidSignatureForPublicKey) => CertificateError::BadSignature,
            VerifyError::Chain(W::BadDer | W::BadDerTime) => CertificateError::BadEncoding,
            VerifyError::Chain(W::RequiredEkuNotFoundContext(_)) => {
                CertificateError::InvalidPurpose
            }
            other => CertificateError::Other(OtherError(Arc::new(other))),
        };
        TlsError::InvalidCertificate(certificate)
    }
}

/// The CA certificates the mesh trusts, parsed once into trust anchors.
#[derive(Debug)]
pub struct TrustBundle {
    trust_domain: String,
    certificates: Vec<CertificateDer<'static>>,
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
}

impl TrustBundle {
    /// A bundle of DER certificates for `trust_domain`. Every certificate must be usable as a
    /// trust anchor; an empty bundle is refused (it would refuse every peer, silently).
    pub fn new(
        trust_domain: &str,
        certificates: Vec<CertificateDer<'static>>,
    ) -> Result<Self, VerifyError> {
        if certificates.is_empty() {
            return Err(VerifyError::EmptyBundle);
        }
        let anchors = certificates
            .iter()
            .enumerate()
            .map(|(index, certificate)| {
                webpki::anchor_from_trusted_cert(certificate)
                    .map(|anchor| anchor.to_owned())
                    .map_err(|error| VerifyError::BadAnchor {
                        index,
                        problem: error.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustBundle {
            trust_domain: trust_domain.to_owned(),
            certificates,
            anchors,
        })
    }

    /// A bundle that trusts nothing (refuses every peer): what a node holds until the signer
    /// has published the real one.
    pub fn empty(trust_domain: &str) -> Self {
        TrustBundle {
            trust_domain: trust_domain.to_owned(),
            certificates: Vec::new(),
            anchors: Vec::new(),
        }
    }

    /// A bundle from PEM text holding one or more `CERTIFICATE` blocks.
    pub fn from_pem(trust_domain: &str, pem: &str) -> Result<Self, VerifyError> {
        Self::new(trust_domain, parse_certificates_pem(pem)?)
    }

    /// The trust domain every peer must belong to.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificates, in the order given.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certificates
    }

    /// The bundle as PEM, one block per CA.
    pub fn to_pem(&self) -> String {
        certificates_to_pem(&self.certificates)
    }

    /// Verifies a peer's chain and identity at `now`; `usage` is the extended key usage the
    /// peer's role needs; `node_required` refuses anything but a node agent's ID.
    pub fn verify_peer(
        &self,
        algorithms: &WebPkiSupportedAlgorithms,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
        node_required: bool,
    ) -> Result<SpiffeId, VerifyError> {
        let certificate = EndEntityCert::try_from(end_entity).map_err(VerifyError::Chain)?;
        certificate
            .verify_for_usage(
                algorithms.all,
                &self.anchors,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map_err(VerifyError::Chain)?;
        let identity = spiffe_id_of_certificate(end_entity)?;
        if identity.trust_domain() != self.trust_domain {
            return Err(VerifyError::ForeignTrustDomain {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        if node_required && identity.node_name().is_none() {
            return Err(VerifyError::NotANode(identity.to_string()));
        }
        Ok(identity)
    }
}

/// Every `CERTIFICATE` block of a PEM text (other blocks are ignored).
pub fn parse_certificates_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, VerifyError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| VerifyError::BundlePem(error.to_string()))
}

/// Certificates as PEM, one block each.
pub fn certificates_to_pem(certificates: &[CertificateDer<'_>]) -> String {
    let mut text = String::new();
    for certificate in certificates {
        text.push_str(&pem_block("CERTIFICATE", certificate.as_ref()));
    }
    text
}

/// One PEM block with 64-column base64 lines.
pub(crate) fn pem_block(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let bytes = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(bytes[0]) << 16) | (u32::from(bytes[1]) << 8) | u32::from(bytes[2]);
        for (position, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if position <= chunk.len() {
                encoded.push(ALPHABET[((n >> shift) & 63) as usize]);
            } else {
                encoded.push(b'=');
            }
        }
    }
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in encoded.chunks(64) {
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

/// The bundle every verifier reads; swap it to rotate.
pub type SharedBundle = Arc<ArcSwap<TrustBundle>>;

/// The signature algorithms of the ring provider (the one provider of this program).
pub fn ring_algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Server certificates, seen from a client: a node agent of our trust domain.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: SharedBundle,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: SharedBundle) -> Self {
        SpiffeServerVerifier {
            bundle,
            algorithms: ring_algorithms(),
        }
    }
}

/// Which end of a handshake a peer certificate comes from.
#[derive(Debug, Clone, Copy)]
enum Side {
    /// A server's certificate, checked by a client: a node identity, serverAuth.
    Server,
    /// A client's certificate, checked by a server: any identity, clientAuth.
    Client,
}

/// The one check of a peer certificate for both verifiers, against the bundle of the moment;
/// a refusal is logged.
fn check_peer(
    bundle: &SharedBundle,
    algorithms: &WebPkiSupportedAlgorithms,
    (end_entity, intermediates, now): (&CertificateDer<'_>, &[CertificateDer<'_>], UnixTime),
    side: Side,
) -> Result<(), TlsError> {
    let (usage, node_required, what) = match side {
        Side::Server => (KeyUsage::server_auth(), true, "server"),
        Side::Client => (KeyUsage::client_auth(), false, "client"),
    };
    match bundle.load().verify_peer(
        algorithms,
        end_entity,
        intermediates,
        now,
        usage,
        node_required,
    ) {
        Ok(_) => Ok(()),
        Err(error) => {
            info!(%error, "refused a {what} certificate");
            Err(error.into())
        }
    }
}

/// The handshake-signature methods rustls asks of every certificate verifier: both verifiers
/// check signatures with the same ring algorithms (`self.algorithms`).
macro_rules! handshake_signature_methods {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, TlsError> {
            verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, TlsError> {
            verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        check_peer(
            &self.bundle,
            &self.algorithms,
            (end_entity, intermediates, now),
            Side::Server,
        )
        .map(|()| ServerCertVerified::assertion())
    }

    handshake_signature_methods!();
}

/// Client certificates, seen from the server: any SPIFFE ID of our trust domain (node or
/// workload); what that ID may do is policy's business.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: SharedBundle,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: SharedBundle) -> Self {
        SpiffeClientVerifier {
            bundle,
            algorithms: ring_algorithms(),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: the bundle changes under us, and every mesh client has one certificate.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        check_peer(
            &self.bundle,
            &self.algorithms,
            (end_entity, intermediates, now),
            Side::Client,
        )
        .map(|()| ClientCertVerified::assertion())
    }

    handshake_signature_methods!();
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, SystemTime};

    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName as Dn, DnType,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    use time::OffsetDateTime;

    use super::*;

    pub(crate) struct TestCa {
        pub cert: CertificateDer<'static>,
        pub issuer: Issuer<'static, KeyPair>,
    }

    pub(crate) fn ca(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = Dn::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    pub(crate) struct Leaf {
        pub cert: CertificateDer<'static>,
    }

    pub(crate) fn leaf_with(
        ca: &TestCa,
        uris: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = Dn::new();
        params.subject_alt_names = uris
            .iter()
            .map(|uri| SanType::URI((*uri).try_into().unwrap()))
            .collect();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        Leaf {
            cert: cert.der().clone(),
        }
    }

    pub(crate) fn leaf(ca: &TestCa, uri: &str) -> Leaf {
        let now = OffsetDateTime::now_utc();
        leaf_with(
            ca,
            &[uri],
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
    }

    fn bundle(cas: &[&TestCa]) -> TrustBundle {
        TrustBundle::new("mesh.local", cas.iter().map(|ca| ca.cert.clone()).collect()).unwrap()
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    fn check(bundle: &TrustBundle, leaf: &Leaf, node: bool) -> Result<SpiffeId, VerifyError> {
        bundle.verify_peer(
            &ring_algorithms(),
            &leaf.cert,
            &[],
            now(),
            KeyUsage::client_auth(),
            node,
        )
    }

    const NODE: &str = "spiffe://mesh.local/node/node-a";
    const WORKLOAD: &str = "spiffe://mesh.local/agent/planner";

    #[test]
    fn a_good_chain_is_accepted_with_its_identity() {
        let ca = ca("mesh CA");
        let bundle = bundle(&[&ca]);
        assert_eq!(
            check(&bundle, &leaf(&ca, NODE), true).unwrap().as_str(),
            NODE
        );
        assert_eq!(
            check(&bundle, &leaf(&ca, WORKLOAD), false)
                .unwrap()
                .as_str(),
            WORKLOAD
        );
    }

    #[test]
    fn a_certificate_from_another_ca_with_the_same_names_is_refused() {
        let real = ca("mesh CA");
        // Same subject name as the real CA, different key: a forgery.
        let forged = ca("mesh CA");
        let bundle = bundle(&[&real]);
        let error = check(&bundle, &leaf(&forged, NODE), true).unwrap_err();
        assert!(matches!(error, VerifyError::Chain(_)), "{error}");
        let tls: TlsError = error.into();
        assert!(
            matches!(
                tls,
                TlsError::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature
                )
            ),
            "{tls:?}"
        );
    }

    #[test]
    fn expired_and_not_yet_valid_certificates_are_refused() {
        let ca = ca("mesh CA");
        let bundle = bundle(&[&ca]);
        let now = OffsetDateTime::now_utc();
        let expired = leaf_with(
            &ca,
            &[NODE],
            now - time::Duration::hours(2),
            now - time::Duration::hours(1),
        );
        let error: TlsError = check(&bundle, &expired, true).unwrap_err().into();
        assert!(
            matches!(
                error,
                TlsError::InvalidCertificate(CertificateError::ExpiredContext { .. })
            ),
            "{error:?}"
        );
        let future = leaf_with(
            &ca,
            &[NODE],
            now + time::Duration::hours(1),
            now + time::Duration::hours(2),
        );
        let error: TlsError = check(&bundle, &future, true).unwrap_err().into();
        assert!(
            matches!(
                error,
                TlsError::InvalidCertificate(CertificateError::NotValidYetContext { .. })
            ),
            "{error:?}"
        );
    }

    #[test]
    fn identities_outside_the_rules_are_refused() {
        let ca = ca("mesh CA");
        let bundle = bundle(&[&ca]);
        let error = check(&bundle, &leaf(&ca, "spiffe://other.domain/node/a"), true).unwrap_err();
        assert!(
            matches!(error, VerifyError::ForeignTrustDomain { .. }),
            "{error}"
        );
        let now = OffsetDateTime::now_utc();
        let window = (
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        );
        let none = leaf_with(&ca, &[], window.0, window.1);
        assert_eq!(
            check(&bundle, &none, false).unwrap_err(),
            VerifyError::Identity(SpiffeIdError::Missing)
        );
        let two = leaf_with(&ca, &[NODE, WORKLOAD], window.0, window.1);
        assert_eq!(
            check(&bundle, &two, false).unwrap_err(),
            VerifyError::Identity(SpiffeIdError::Several)
        );
        // A workload certificate where a node is required.
        let error = check(&bundle, &leaf(&ca, WORKLOAD), true).unwrap_err();
        assert_eq!(error, VerifyError::NotANode(WORKLOAD.to_owned()));
        assert!(error.to_string().contains("not a node agent"));
    }

    #[test]
    fn after_a_rotation_old_ca_certificates_are_refused_and_new_ones_accepted() {
        let old = ca("mesh CA 1");
        let new = ca("mesh CA 2");
        let shared: SharedBundle = Arc::new(ArcSwap::from_pointee(bundle(&[&old])));
        let old_leaf = leaf(&old, NODE);
        let new_leaf = leaf(&new, NODE);
        let verify = |leaf: &Leaf| {
            SpiffeServerVerifier::new(Arc::clone(&shared)).verify_server_cert(
                &leaf.cert,
                &[],
                &ServerName::try_from("ignored.example").unwrap(),
                &[],
                now(),
            )
        };
        assert!(verify(&old_leaf).is_ok());
        assert!(verify(&new_leaf).is_err());
        // Overlap: both trusted.
        shared.store(Arc::new(bundle(&[&old, &new])));
        assert!(verify(&old_leaf).is_ok());
        assert!(verify(&new_leaf).is_ok());
        // Old CA removed.
        shared.store(Arc::new(bundle(&[&new])));
        assert!(verify(&old_leaf).is_err());
        assert!(verify(&new_leaf).is_ok());
    }

    #[test]
    fn the_client_verifier_requires_client_auth_and_accepts_workloads() {
        let ca = ca("mesh CA");
        let shared: SharedBundle = Arc::new(ArcSwap::from_pointee(bundle(&[&ca])));
        let verifier = SpiffeClientVerifier::new(shared);
        assert!(verifier.client_auth_mandatory());
        assert!(
            verifier
                .verify_client_cert(&leaf(&ca, WORKLOAD).cert, &[], now())
                .is_ok()
        );
        let later = UnixTime::since_unix_epoch(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                + Duration::from_secs(7200),
        );
        assert!(
            verifier
                .verify_client_cert(&leaf(&ca, WORKLOAD).cert, &[], later)
                .is_err()
        );
    }

    #[test]
    fn bundles_round_trip_through_pem_and_refuse_empty_input() {
        let first = ca("mesh CA 1");
        let second = ca("mesh CA 2");
        let pem = certificates_to_pem(&[first.cert.clone(), second.cert.clone()]);
        let bundle = TrustBundle::from_pem("mesh.local", &pem).unwrap();
        assert_eq!(bundle.certificates().len(), 2);
        assert_eq!(bundle.to_pem(), pem);
        assert_eq!(
            TrustBundle::from_pem("mesh.local", "").unwrap_err(),
            VerifyError::EmptyBundle
        );
        assert!(TrustBundle::new("mesh.local", vec![CertificateDer::from(vec![1, 2])]).is_err());
    }
}
