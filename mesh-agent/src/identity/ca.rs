//! Certificate authorities: the [`CertificateAuthority`] seam through which a node gets its
//! certificate signing requests signed, the CA material on disk ([`CaDir`]) that the signer
//! (`mesh-agent ca`) and the standalone [`LocalCa`] both use, and the one function that turns
//! a verified CSR into a workload certificate ([`CaDir::issue`]).
//!
//! # The CA folder
//!
//! ```text
//! <dir>/ca-key.pem   the signing key (PKCS#8, mode 0600)
//! <dir>/ca.pem       the signing CA certificate (its URI SAN is spiffe://<trust-domain>)
//! <dir>/bundle.pem   every CA certificate peers must trust: the signing one, plus older ones
//!                    kept during a rotation
//! ```
//!
//! `mesh-agent ca init` creates it; `mesh-agent ca rotate` makes a new key and certificate,
//! signs with them from then on, and appends the new certificate to `bundle.pem`;
//! `mesh-agent ca prune` removes every CA but the signing one from the bundle once every
//! certificate issued by the old one has expired.
//!
//! # Certificates issued
//!
//! Short-lived (4 h by default, never past the CA's own expiry), a random 128-bit serial, the
//! requested SPIFFE ID as the only subject alternative name (URI), key usage
//! digitalSignature, extended key usages serverAuth and clientAuth, not a CA. The CSR's
//! signature is verified (proof of possession of the key); nothing else is taken from it but
//! the public key.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use tracing::info;

use super::{
    CredentialsFuture, IdentityError, SpiffeId,
    verify::{SharedBundle, TrustBundle, parse_certificates_pem},
};

/// Default lifetime of issued certificates.
pub const DEFAULT_CERTIFICATE_TTL: Duration = Duration::from_secs(4 * 3600);
/// Lifetime of a CA certificate made by `ca init` / `ca rotate`.
pub const CA_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Allowed clock skew between nodes: certificates are valid from this long before issuance.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

const KEY_FILE: &str = "ca-key.pem";
const CERT_FILE: &str = "ca.pem";
const BUNDLE_FILE: &str = "bundle.pem";

/// What went wrong with CA material or a signing request.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA folder {0} has no CA; create one with `mesh-agent ca init --dir {0}`")]
    Missing(PathBuf),
    #[error("the CA folder {path} already holds a CA (trust domain {trust_domain})")]
    Exists { path: PathBuf, trust_domain: String },
    #[error("the CA folder {path} is unusable: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("the CA key file {path} is readable by others (mode {mode:o}); chmod 600 it")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("the certificate signing request is invalid: {0}")]
    BadRequest(String),
    #[error("cannot sign: {0}")]
    Signing(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CaError {
    let path = path.to_path_buf();
    move |source| CaError::Io { what, path, source }
}

/// A certificate a CA issued, with its chain (leaf first, no trust anchor).
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl IssuedCertificate {
    /// Reads validity from the leaf of a PEM chain (as the etcd signer returns it).
    pub fn from_pem_chain(pem: &str) -> Result<Self, CaError> {
        let chain =
            parse_certificates_pem(pem).map_err(|error| CaError::Signing(error.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| CaError::Signing("the signed chain holds no certificate".to_owned()))?;
        let (not_before, not_after) = validity(leaf)?;
        Ok(IssuedCertificate {
            chain,
            not_before,
            not_after,
        })
    }
}

/// `notBefore` and `notAfter` of a certificate.
pub fn validity(certificate: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), CaError> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(certificate.as_ref())
        .map_err(|error| CaError::Signing(format!("the certificate does not parse: {error}")))?;
    let convert = |time: x509_parser::time::ASN1Time| {
        let seconds = time.timestamp();
        if seconds >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(seconds.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok((
        convert(parsed.validity().not_before),
        convert(parsed.validity().not_after),
    ))
}

/// A certificate signing request made on a node.
#[derive(Debug, Clone)]
pub struct SigningRequest {
    /// The identity the certificate is for.
    pub identity: SpiffeId,
    /// PKCS#10, PEM.
    pub csr_pem: String,
}

/// Signs a node's requests and provides the trust bundle. `LocalCa` in standalone mode,
/// `EtcdCa` in a cluster.
pub trait CertificateAuthority: Send + Sync + std::fmt::Debug {
    /// Gets `request` signed.
    fn sign<'a>(&'a self, request: &'a SigningRequest) -> CredentialsFuture<'a, IssuedCertificate>;

    /// The trust bundle, kept current by the CA (read it at every use).
    fn trust_bundle(&self) -> SharedBundle;
}

/// The CA material in a folder: signing key, signing certificate, trust bundle.
#[derive(Debug)]
pub struct CaDir {
    dir: PathBuf,
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    certificate: CertificateDer<'static>,
    not_after: SystemTime,
    bundle: Vec<CertificateDer<'static>>,
}

impl CaDir {
    /// Creates a CA in `dir` (made if missing). Refuses to overwrite an existing CA.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let id = SpiffeId::new(trust_domain, &[]).map_err(|error| CaError::Invalid {
            path: dir.to_path_buf(),
            problem: format!("trust domain: {error}"),
        })?;
        if dir.join(KEY_FILE).exists() || dir.join(CERT_FILE).exists() {
            let existing = Self::load(dir)?;
            return Err(CaError::Exists {
                path: dir.to_path_buf(),
                trust_domain: existing.trust_domain,
            });
        }
        fs::create_dir_all(dir).map_err(io("creating the CA folder", dir))?;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        let (key, certificate) = new_ca(&id)?;
        write_private(&dir.join(KEY_FILE), &key.serialize_pem())?;
        write_public(&dir.join(CERT_FILE), &certificate.pem())?;
        write_public(&dir.join(BUNDLE_FILE), &certificate.pem())?;
        info!(dir = %dir.display(), trust_domain, "certificate authority created");
        Self::load(dir)
    }

    /// Loads the CA in `dir`, or creates it when the folder holds none (standalone start).
    pub fn load_or_init(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        if dir.join(KEY_FILE).exists() {
            let ca = Self::load(dir)?;
            if ca.trust_domain != trust_domain {
                return Err(CaError::Invalid {
                    path: dir.to_path_buf(),
                    problem: format!(
                        "its CA is for trust domain {:?}, the configuration says {:?}",
                        ca.trust_domain, trust_domain
                    ),
                });
            }
            Ok(ca)
        } else {
            Self::init(dir, trust_domain)
        }
    }

    /// Loads the CA in `dir`.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let key_path = dir.join(KEY_FILE);
        if !key_path.exists() {
            return Err(CaError::Missing(dir.to_path_buf()));
        }
        let mode = fs::metadata(&key_path)
            .map_err(io("reading", &key_path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaError::KeyPermissions {
                path: key_path,
                mode,
            });
        }
        let invalid = |problem: String| CaError::Invalid {
            path: dir.to_path_buf(),
            problem,
        };
        let key_pem = fs::read_to_string(&key_path).map_err(io("reading", &key_path))?;
        let key =
            KeyPair::from_pem(&key_pem).map_err(|error| invalid(format!("{KEY_FILE}: {error}")))?;
        let cert_path = dir.join(CERT_FILE);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io("reading", &cert_path))?;
        let certificate = parse_certificates_pem(&cert_pem)
            .map_err(|error| invalid(format!("{CERT_FILE}: {error}")))?
            .into_iter()
            .next()
            .ok_or_else(|| invalid(format!("{CERT_FILE} holds no certificate")))?;
        let trust_domain = super::spiffe_id_of_certificate(&certificate)
            .map_err(|error| invalid(format!("{CERT_FILE}: {error}")))?
            .trust_domain()
            .to_owned();
        let (_, not_after) = validity(&certificate)?;
        let issuer = Issuer::from_ca_cert_der(&certificate, key)
            .map_err(|error| invalid(format!("{CERT_FILE}: {error}")))?;
        if !issuer_matches_key(&certificate, issuer.key()) {
            return Err(invalid(format!(
                "{KEY_FILE} is not the key of the certificate in {CERT_FILE}"
            )));
        }
        let bundle_path = dir.join(BUNDLE_FILE);
        let mut bundle = match fs::read_to_string(&bundle_path) {
            Ok(text) => parse_certificates_pem(&text)
                .map_err(|error| invalid(format!("{BUNDLE_FILE}: {error}")))?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(CaError::Io {
                    what: "reading",
                    path: bundle_path,
                    source,
                });
            }
        };
        // The signing CA is always trusted, whatever the bundle file says.
        if !bundle.contains(&certificate) {
            bundle.push(certificate.clone());
        }
        Ok(CaDir {
            dir: dir.to_path_buf(),
            trust_domain,
            issuer,
            certificate,
            not_after,
            bundle,
        })
    }

    /// Makes a new signing key and CA certificate; the old certificate stays in the bundle.
    pub fn rotate(dir: &Path) -> Result<Self, CaError> {
        let current = Self::load(dir)?;
        let id = SpiffeId::new(&current.trust_domain, &[]).map_err(|error| CaError::Invalid {
            path: dir.to_path_buf(),
            problem: error.to_string(),
        })?;
        let (key, certificate) = new_ca(&id)?;
        let mut bundle = current.bundle.clone();
        bundle.push(certificate.der().clone());
        // Bundle first: a crash between the writes leaves the new CA trusted but unused.
        write_public(
            &dir.join(BUNDLE_FILE),
            &super::verify::certificates_to_pem(&bundle),
        )?;
        write_private(&dir.join(KEY_FILE), &key.serialize_pem())?;
        write_public(&dir.join(CERT_FILE), &certificate.pem())?;
        info!(dir = %dir.display(), cas = bundle.len(), "new signing CA; the old one stays trusted");
        Self::load(dir)
    }

    /// Drops every CA but the signing one from the bundle (after a rotation, once every
    /// certificate the old CA signed has expired). Returns how many were removed.
    pub fn prune(dir: &Path) -> Result<usize, CaError> {
        let current = Self::load(dir)?;
        let removed = current.bundle.len().saturating_sub(1);
        write_public(&dir.join(BUNDLE_FILE), &current.certificate_pem())?;
        Ok(removed)
    }

    /// The trust domain (from the CA certificate's URI SAN).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every trusted CA certificate.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The trust bundle as a verifier uses it.
    pub fn trust_bundle(&self) -> Result<TrustBundle, CaError> {
        TrustBundle::new(&self.trust_domain, self.bundle.clone()).map_err(|error| {
            CaError::Invalid {
                path: self.dir.clone(),
                problem: error.to_string(),
            }
        })
    }

    /// The signing CA certificate, PEM.
    pub fn certificate_pem(&self) -> String {
        super::verify::certificates_to_pem(std::slice::from_ref(&self.certificate))
    }

    /// Signs a CSR for `identity`, valid for `ttl` (capped at the CA's own expiry). The CSR's
    /// signature must verify, and a SPIFFE ID it names must be `identity`.
    pub fn issue(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        if identity.trust_domain() != self.trust_domain {
            return Err(CaError::BadRequest(format!(
                "{identity} is outside the trust domain {}",
                self.trust_domain
            )));
        }
        let request = parse_csr(csr_pem)?;
        let named: Vec<&SanType> = request.params.subject_alt_names.iter().collect();
        for name in named {
            match name {
                SanType::URI(uri) if uri.as_str() == identity.as_str() => {}
                other => {
                    return Err(CaError::BadRequest(format!(
                        "it names {other:?}, not only {identity}"
                    )));
                }
            }
        }
        let now = SystemTime::now();
        let not_before = now - CLOCK_SKEW;
        let not_after = (now + ttl).min(self.not_after);
        if not_after <= now {
            return Err(CaError::Signing(
                "the CA certificate has expired; rotate the CA".to_owned(),
            ));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(identity.as_str().try_into().map_err(
                |error| CaError::BadRequest(format!("{identity}: {error}")),
            )?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let certificate = params
            .signed_by(&request.public_key, &self.issuer)
            .map_err(|error| CaError::Signing(error.to_string()))?;
        // Validity as encoded (whole seconds).
        let der = certificate.der().clone();
        let (not_before, not_after) = validity(&der)?;
        Ok(IssuedCertificate {
            chain: vec![der],
            not_before,
            not_after,
        })
    }
}

/// Parses and verifies a PKCS#10 request: its signature must be valid (the requester holds the
/// key).
pub fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, CaError> {
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|error| {
        CaError::BadRequest(match error {
            rcgen::Error::InvalidCertificationRequestSignature => {
                "its signature does not verify (no proof of possession of the key)".to_owned()
            }
            other => other.to_string(),
        })
    })
}

/// A PKCS#10 request for `identity`, signed with `key`.
pub fn certificate_request(identity: &SpiffeId, key: &KeyPair) -> Result<String, IdentityError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI(identity.as_str().try_into().map_err(
            |error| IdentityError::Other(format!("{identity}: {error}")),
        )?)];
    params
        .serialize_request(key)
        .and_then(|request| request.pem())
        .map_err(|error| IdentityError::Other(format!("cannot build the CSR: {error}")))
}

fn issuer_matches_key(certificate: &CertificateDer<'_>, key: &KeyPair) -> bool {
    use rcgen::PublicKeyData;
    use x509_parser::prelude::FromDer;
    match x509_parser::certificate::X509Certificate::from_der(certificate.as_ref()) {
        Ok((_, parsed)) => parsed.public_key().subject_public_key.data.as_ref() == key.der_bytes(),
        Err(_) => false,
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    // Positive and without a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn new_ca(id: &SpiffeId) -> Result<(KeyPair, rcgen::Certificate), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|error| CaError::Signing(error.to_string()))?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Agent Mesh");
    name.push(
        DnType::CommonName,
        format!(
            "Agent Mesh CA {} {}",
            id.trust_domain(),
            humantime::format_rfc3339_seconds(SystemTime::now())
        ),
    );
    params.distinguished_name = name;
    params.subject_alt_names =
        vec![SanType::URI(id.as_str().try_into().map_err(|error| {
            CaError::Signing(format!("{id}: {error}"))
        })?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = OffsetDateTime::from(now - Duration::from_secs(3600));
    params.not_after = OffsetDateTime::from(now + CA_LIFETIME);
    params.serial_number = Some(random_serial());
    let certificate = params
        .self_signed(&key)
        .map_err(|error| CaError::Signing(error.to_string()))?;
    Ok((key, certificate))
}

/// Writes a file only the owner can read, atomically (temporary file, then rename).
fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    write_atomic(path, contents, 0o600)
}

fn write_public(path: &Path, contents: &str) -> Result<(), CaError> {
    write_atomic(path, contents, 0o644)
}

fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    let temporary = path.with_extension("tmp");
    let _ = fs::remove_file(&temporary);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .map_err(io("creating", &temporary))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io("writing", &temporary))?;
    fs::rename(&temporary, path).map_err(io("renaming into place", path))
}

/// The standalone CA: the CA folder is on this node and signs directly. For one-machine use
/// only: on a cluster, the CA key must not live on the nodes (use the etcd signer).
#[derive(Debug)]
pub struct LocalCa {
    ca: CaDir,
    ttl: Duration,
    bundle: SharedBundle,
}

impl LocalCa {
    /// Loads the CA in `dir`, creating it at first start.
    pub fn open(dir: &Path, trust_domain: &str, ttl: Duration) -> Result<Self, CaError> {
        let ca = CaDir::load_or_init(dir, trust_domain)?;
        let bundle = Arc::new(ArcSwap::from_pointee(ca.trust_bundle()?));
        Ok(LocalCa { ca, ttl, bundle })
    }

    /// The CA material.
    pub fn ca(&self) -> &CaDir {
        &self.ca
    }
}

impl CertificateAuthority for LocalCa {
    fn sign<'a>(&'a self, request: &'a SigningRequest) -> CredentialsFuture<'a, IssuedCertificate> {
        Box::pin(async move {
            self.ca
                .issue(&request.csr_pem, &request.identity, self.ttl)
                .map_err(|error| IdentityError::NotIssued {
                    identity: request.identity.to_string(),
                    reason: error.to_string(),
                })
        })
    }

    fn trust_bundle(&self) -> SharedBundle {
        Arc::clone(&self.bundle)
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::UnixTime;

    use super::*;
    use crate::identity::verify::ring_algorithms;

    fn temp_dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn request(identity: &SpiffeId) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = certificate_request(identity, &key).unwrap();
        (key, csr)
    }

    #[test]
    fn init_creates_a_private_key_and_refuses_to_overwrite() {
        let dir = temp_dir();
        let ca_dir = dir.path().join("ca");
        let ca = CaDir::init(&ca_dir, "mesh.local").unwrap();
        assert_eq!(ca.trust_domain(), "mesh.local");
        let mode = fs::metadata(ca_dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let error = CaDir::init(&ca_dir, "mesh.local").unwrap_err();
        assert!(matches!(error, CaError::Exists { .. }), "{error}");
        // Reused after a restart: same certificate.
        let again = CaDir::load_or_init(&ca_dir, "mesh.local").unwrap();
        assert_eq!(again.certificate_pem(), ca.certificate_pem());
        // A different trust domain is refused, not silently replaced.
        assert!(CaDir::load_or_init(&ca_dir, "other.local").is_err());
        // A key others can read is refused.
        fs::set_permissions(ca_dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let error = CaDir::load(&ca_dir).unwrap_err();
        assert!(matches!(error, CaError::KeyPermissions { .. }), "{error}");
        assert!(matches!(
            CaDir::load(&dir.path().join("none")).unwrap_err(),
            CaError::Missing(_)
        ));
        assert!(CaDir::init(dir.path(), "Bad Domain").is_err());
    }

    #[test]
    fn issued_certificates_verify_and_carry_only_the_identity() {
        let dir = temp_dir();
        let ca = CaDir::init(dir.path(), "mesh.local").unwrap();
        let id = SpiffeId::for_node("mesh.local", "node-a").unwrap();
        let (_key, csr) = request(&id);
        let issued = ca.issue(&csr, &id, Duration::from_secs(600)).unwrap();
        let lifetime = issued.not_after.duration_since(issued.not_before).unwrap();
        assert!(
            lifetime <= Duration::from_secs(600) + CLOCK_SKEW,
            "{lifetime:?}"
        );
        let bundle = ca.trust_bundle().unwrap();
        let verified = bundle
            .verify_peer(
                &ring_algorithms(),
                &issued.chain[0],
                &[],
                UnixTime::now(),
                webpki::KeyUsage::server_auth(),
                true,
            )
            .unwrap();
        assert_eq!(verified, id);
        // Random serials: two certificates for one identity differ.
        let (_key, csr) = request(&id);
        let second = ca.issue(&csr, &id, Duration::from_secs(600)).unwrap();
        assert_ne!(second.chain[0], issued.chain[0]);
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let dir = temp_dir();
        let ca = CaDir::init(dir.path(), "mesh.local").unwrap();
        let node = SpiffeId::for_node("mesh.local", "node-a").unwrap();
        let other = SpiffeId::for_node("mesh.local", "node-b").unwrap();
        let (_key, csr) = request(&node);
        // The CSR names another identity than the one requested.
        let error = ca.issue(&csr, &other, DEFAULT_CERTIFICATE_TTL).unwrap_err();
        assert!(error.to_string().contains("not only"), "{error}");
        // Another trust domain.
        let foreign = SpiffeId::for_node("other.local", "node-a").unwrap();
        let error = ca
            .issue(&csr, &foreign, DEFAULT_CERTIFICATE_TTL)
            .unwrap_err();
        assert!(error.to_string().contains("trust domain"), "{error}");
        // A tampered CSR: its signature no longer verifies.
        let mut bytes = pem_der(&csr);
        let position = bytes.len() / 3;
        bytes[position] ^= 0x01;
        let tampered = super::super::verify::pem_block("CERTIFICATE REQUEST", &bytes);
        let error = ca
            .issue(&tampered, &node, DEFAULT_CERTIFICATE_TTL)
            .unwrap_err();
        assert!(matches!(error, CaError::BadRequest(_)), "{error}");
        assert!(ca.issue("garbage", &node, DEFAULT_CERTIFICATE_TTL).is_err());
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        use rustls::pki_types::{CertificateSigningRequestDer, pem::PemObject};
        CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    #[test]
    fn rotation_keeps_the_old_ca_trusted_until_pruned() {
        let dir = temp_dir();
        let first = CaDir::init(dir.path(), "mesh.local").unwrap();
        let id = SpiffeId::for_agent("mesh.local", "planner").unwrap();
        let (_key, csr) = request(&id);
        let old_cert = first.issue(&csr, &id, DEFAULT_CERTIFICATE_TTL).unwrap();
        let rotated = CaDir::rotate(dir.path()).unwrap();
        assert_eq!(rotated.bundle().len(), 2);
        assert_ne!(rotated.certificate_pem(), first.certificate_pem());
        let (_key, csr) = request(&id);
        let new_cert = rotated.issue(&csr, &id, DEFAULT_CERTIFICATE_TTL).unwrap();
        let verify = |ca: &CaDir, cert: &IssuedCertificate| {
            ca.trust_bundle()
                .unwrap()
                .verify_peer(
                    &ring_algorithms(),
                    &cert.chain[0],
                    &[],
                    UnixTime::now(),
                    webpki::KeyUsage::client_auth(),
                    false,
                )
                .is_ok()
        };
        assert!(verify(&rotated, &old_cert) && verify(&rotated, &new_cert));
        assert_eq!(CaDir::prune(dir.path()).unwrap(), 1);
        let pruned = CaDir::load(dir.path()).unwrap();
        assert!(!verify(&pruned, &old_cert));
        assert!(verify(&pruned, &new_cert));
    }
}
