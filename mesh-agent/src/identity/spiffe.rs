//! SPIFFE IDs (`spiffe://<trust-domain>/<path>`), parsed and validated as the SPIFFE ID
//! specification says, and read from an X.509 certificate's URI subject alternative name.

use std::{fmt, str::FromStr};

use rustls_pki_types::CertificateDer;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// Longest SPIFFE ID accepted (the specification's limit for URIs in SANs).
const MAX_LENGTH: usize = 2048;
const SCHEME: &str = "spiffe://";

/// A valid SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole URI, `spiffe://<trust-domain><path>`.
    uri: String,
    /// Byte offset of the path (after the trust domain) in `uri`.
    path_start: usize,
}

/// Why a string or a certificate does not carry a valid SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("a SPIFFE ID starts with spiffe:// (got {0:?})")]
    Scheme(String),
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error("the trust domain {0:?} may hold only lower-case letters, digits, '.', '-' and '_'")]
    TrustDomainCharacters(String),
    #[error("the path of {0:?} has an empty, '.' or '..' segment, or a trailing '/'")]
    PathSegment(String),
    #[error("the path of {0:?} may hold only letters, digits, '.', '-' and '_' between slashes")]
    PathCharacters(String),
    #[error("a SPIFFE ID is at most {MAX_LENGTH} bytes")]
    TooLong,
    #[error("the certificate is not valid X.509: {0}")]
    Certificate(String),
    #[error("the certificate carries no SPIFFE ID (URI subject alternative name)")]
    Missing,
    #[error("the certificate carries more than one URI subject alternative name")]
    Several,
}

impl SpiffeId {
    /// `spiffe://<trust_domain>/<segments joined by '/'>`, validated.
    pub fn new(trust_domain: &str, segments: &[&str]) -> Result<Self, SpiffeIdError> {
        // Each segment is one path segment: a '/' inside one would forge another identity
        // (a namespace "prod/sa/admin").
        if segments.iter().any(|segment| segment.contains('/')) {
            return Err(SpiffeIdError::PathSegment(segments.join("/")));
        }
        let mut uri = String::with_capacity(SCHEME.len() + trust_domain.len() + 32);
        uri.push_str(SCHEME);
        uri.push_str(trust_domain);
        for segment in segments {
            uri.push('/');
            uri.push_str(segment);
        }
        uri.parse()
    }

    /// The identity of a workload on bare metal: `spiffe://<td>/agent/<name>`.
    pub fn for_agent(trust_domain: &str, name: &str) -> Result<Self, SpiffeIdError> {
        Self::new(trust_domain, &["agent", name])
    }

    /// The identity of an enrolled workload known by `name`: a name that is itself a SPIFFE
    /// ID (a pod, named by its service account's ID) must be of `trust_domain`; any other name
    /// is a bare-metal workload, `spiffe://<td>/agent/<name>`.
    pub fn for_workload(trust_domain: &str, name: &str) -> Result<Self, SpiffeIdError> {
        if name.starts_with(SCHEME) {
            let id: SpiffeId = name.parse()?;
            if id.trust_domain() != trust_domain {
                return Err(SpiffeIdError::TrustDomainCharacters(
                    id.trust_domain().to_owned(),
                ));
            }
            return Ok(id);
        }
        Self::for_agent(trust_domain, name)
    }

    /// The identity of a Kubernetes workload: `spiffe://<td>/ns/<namespace>/sa/<account>`.
    pub fn for_service_account(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::new(trust_domain, &["ns", namespace, "sa", service_account])
    }

    /// The identity of a node agent: `spiffe://<td>/node/<name>`.
    pub fn for_node(trust_domain: &str, node: &str) -> Result<Self, SpiffeIdError> {
        Self::new(trust_domain, &["node", node])
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.path_start]
    }

    /// The path, with its leading '/', or "" for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// The whole URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The node name when this is a node agent's ID (`/node/<name>`).
    pub fn node_name(&self) -> Option<&str> {
        self.path()
            .strip_prefix("/node/")
            .filter(|name| !name.contains('/'))
    }

    /// The short name policies may use for this identity: `<name>` for `/agent/<name>`, else
    /// the whole URI.
    pub fn short_name(&self) -> &str {
        match self.path().strip_prefix("/agent/") {
            Some(name) if !name.contains('/') => name,
            _ => &self.uri,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() > MAX_LENGTH {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = text
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::Scheme(text.to_owned()))?;
        let (trust_domain, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        if trust_domain.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        if !trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(SpiffeIdError::TrustDomainCharacters(
                trust_domain.to_owned(),
            ));
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                if segment.is_empty() || segment == "." || segment == ".." {
                    return Err(SpiffeIdError::PathSegment(text.to_owned()));
                }
                if !segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                {
                    return Err(SpiffeIdError::PathCharacters(text.to_owned()));
                }
            }
        }
        Ok(SpiffeId {
            uri: text.to_owned(),
            path_start: SCHEME.len() + trust_domain.len(),
        })
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The one SPIFFE ID in a certificate's URI subject alternative names. A certificate with
/// none, with several URI SANs, or with an invalid one is refused (SPIFFE X.509-SVID rules).
pub fn spiffe_id_of_certificate(
    certificate: &CertificateDer<'_>,
) -> Result<SpiffeId, SpiffeIdError> {
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(certificate.as_ref())
        .map_err(|error| SpiffeIdError::Certificate(error.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|error| SpiffeIdError::Certificate(error.to_string()))?
        .ok_or(SpiffeIdError::Missing)?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let first = uris.next().ok_or(SpiffeIdError::Missing)?;
    if uris.next().is_some() {
        return Err(SpiffeIdError::Several);
    }
    first.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_split_into_trust_domain_and_path() {
        let id: SpiffeId = "spiffe://mesh.local/ns/prod/sa/planner".parse().unwrap();
        assert_eq!(id.trust_domain(), "mesh.local");
        assert_eq!(id.path(), "/ns/prod/sa/planner");
        assert_eq!(id.to_string(), "spiffe://mesh.local/ns/prod/sa/planner");
        let td: SpiffeId = "spiffe://mesh.local".parse().unwrap();
        assert_eq!(td.path(), "");
        assert_eq!(
            SpiffeId::for_agent("mesh.local", "weather")
                .unwrap()
                .short_name(),
            "weather"
        );
        assert_eq!(
            SpiffeId::for_node("mesh.local", "node-a")
                .unwrap()
                .node_name(),
            Some("node-a")
        );
        assert_eq!(id.node_name(), None);
        assert_eq!(id.short_name(), id.as_str());
        assert!(SpiffeId::for_service_account("td", "prod/sa/admin", "x").is_err());
        assert!(SpiffeId::for_agent("td", "a/b").is_err());
        assert_eq!(
            SpiffeId::for_workload("mesh.local", "planner")
                .unwrap()
                .as_str(),
            "spiffe://mesh.local/agent/planner"
        );
        assert_eq!(
            SpiffeId::for_workload("mesh.local", "spiffe://mesh.local/ns/prod/sa/planner")
                .unwrap()
                .path(),
            "/ns/prod/sa/planner"
        );
        assert!(SpiffeId::for_workload("mesh.local", "spiffe://other.td/ns/prod/sa/x").is_err());
    }

    #[test]
    fn invalid_ids_are_refused_with_the_reason() {
        let cases = [
            ("http://mesh.local/a", "spiffe://"),
            ("spiffe:///a", "empty"),
            ("spiffe://Mesh.Local/a", "lower-case"),
            ("spiffe://mesh.local/a//b", "segment"),
            ("spiffe://mesh.local/a/../b", "segment"),
            ("spiffe://mesh.local/a/", "segment"),
            ("spiffe://mesh.local/a b", "letters"),
            ("spiffe://mesh.local/a?x=1", "letters"),
            ("spiffe://user@mesh.local/a", "lower-case"),
            ("spiffe://mesh.local:8080/a", "lower-case"),
        ];
        for (text, reason) in cases {
            let error = text.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(error.contains(reason), "{text}: {error}");
        }
        let long = format!("spiffe://mesh.local/{}", "a".repeat(MAX_LENGTH));
        assert_eq!(long.parse::<SpiffeId>(), Err(SpiffeIdError::TooLong));
    }

    #[test]
    fn the_certificate_uri_san_is_the_identity() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://mesh.local/agent/weather".try_into().unwrap(),
        )];
        let cert = params.self_signed(&key).unwrap();
        let id = spiffe_id_of_certificate(cert.der()).unwrap();
        assert_eq!(id.as_str(), "spiffe://mesh.local/agent/weather");

        let mut params = rcgen::CertificateParams::new(vec!["example.com".into()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://mesh.local/agent/a".try_into().unwrap(),
        ));
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://mesh.local/agent/b".try_into().unwrap(),
        ));
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            spiffe_id_of_certificate(cert.der()),
            Err(SpiffeIdError::Several)
        );

        let params = rcgen::CertificateParams::new(vec!["example.com".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            spiffe_id_of_certificate(cert.der()),
            Err(SpiffeIdError::Missing)
        );
        assert!(matches!(
            spiffe_id_of_certificate(&CertificateDer::from(vec![1, 2, 3])),
            Err(SpiffeIdError::Certificate(_))
        ));
    }
}
