//! The identity resources in etcd: `CertificateRequest` (a node asks the signer for a
//! certificate), `TrustBundle` (the CA certificates every peer trusts), `WorkloadIdentity` (a
//! node says a workload identity runs on it), their keys, and the signer's own records.
//!
//! ```text
//! <prefix>/certificaterequests/<namespace>/<name>    CertificateRequest (node writes spec,
//!                                                     signer writes status once)
//! <prefix>/trustbundles/<namespace>/<name>           TrustBundle (mesh-system/default)
//! <prefix>/workloadidentities/<ns>/<account>@<node>  WorkloadIdentity (node writes it under
//!                                                     its lease while such a pod runs there)
//! <prefix>/signer/nonces/<nonce>                     nonces already signed (leased)
//! <prefix>/signer/keys/<sha256 of the public key>    public keys already signed (leased)
//! ```
//!
//! ```json
//! {"apiVersion": "mesh.agentmesh.dev/v1alpha1", "kind": "CertificateRequest",
//!  "metadata": {"name": "node-a-3f9c0d2e7a1b4c55", "namespace": "default"},
//!  "spec": {"identity": "spiffe://mesh.local/agent/planner", "node": "node-a",
//!           "request": "-----BEGIN CERTIFICATE REQUEST-----...", "nonce": "9b1e...",
//!           "creationTime": "2026-01-01T10:00:00.000Z"},
//!  "status": {"certificate": "-----BEGIN CERTIFICATE-----...", "answerTime": "..."}}
//! ```
//!
//! `status` holds either `certificate` (PEM, leaf first) or `denied` (the reason). The
//! namespace of a request is the identity's: `<ns>` for `/ns/<ns>/sa/<sa>`, `default` for
//! `/agent/<name>`, `mesh-system` for a node's own `/node/<name>`.

use serde::{Deserialize, Serialize};

use crate::policy::API_VERSION;

use super::SpiffeId;

/// `kind` of certificate requests.
pub const CERTIFICATE_REQUEST_KIND: &str = "CertificateRequest";
/// `kind` of trust bundles.
pub const TRUST_BUNDLE_KIND: &str = "TrustBundle";
/// Key segment of certificate requests.
pub const CERTIFICATE_REQUESTS_SEGMENT: &str = "certificaterequests";
/// Key segment of trust bundles.
pub const TRUST_BUNDLES_SEGMENT: &str = "trustbundles";
/// `kind` of workload identity records.
pub const WORKLOAD_IDENTITY_KIND: &str = "WorkloadIdentity";
/// Key segment of workload identity records.
pub const WORKLOAD_IDENTITIES_SEGMENT: &str = "workloadidentities";
/// Namespace of the mesh's own resources (the trust bundle, node certificate requests).
pub const SYSTEM_NAMESPACE: &str = "mesh-system";
/// Name of the trust bundle agents read.
pub const TRUST_BUNDLE_NAME: &str = "default";
/// Namespace of requests for `/agent/<name>` identities.
pub const AGENT_NAMESPACE: &str = crate::policy::DEFAULT_NAMESPACE;

/// `metadata` of the identity resources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
}

/// A node's request for a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRequest {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: CertificateRequestSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CertificateRequestStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRequestSpec {
    /// The SPIFFE ID the certificate is for.
    pub identity: String,
    /// The requesting node (its `Node` record's name).
    pub node: String,
    /// PKCS#10, PEM.
    pub request: String,
    /// Random, hex; never signed twice.
    pub nonce: String,
    /// RFC 3339; the signer refuses stale requests.
    pub creation_time: String,
}

/// The signer's answer: a certificate or a refusal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRequestStatus {
    /// PEM chain, leaf first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Why the request was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub answer_time: String,
}

impl CertificateRequest {
    /// A new request for `identity` from `node`.
    pub fn new(identity: &SpiffeId, node: &str, csr_pem: &str) -> Self {
        CertificateRequest {
            api_version: API_VERSION.to_owned(),
            kind: CERTIFICATE_REQUEST_KIND.to_owned(),
            metadata: ObjectMeta {
                name: format!("{node}-{}", random_hex(8)),
                namespace: request_namespace(identity).to_owned(),
            },
            spec: CertificateRequestSpec {
                identity: identity.to_string(),
                node: node.to_owned(),
                request: csr_pem.to_owned(),
                nonce: random_hex(16),
                creation_time: humantime::format_rfc3339_millis(std::time::SystemTime::now())
                    .to_string(),
            },
            status: None,
        }
    }

    /// Decodes a stored request; `kind` and `apiVersion` must match.
    pub fn decode(value: &[u8]) -> Result<Self, String> {
        let request: Self = serde_json::from_slice(value).map_err(|error| error.to_string())?;
        if request.kind != CERTIFICATE_REQUEST_KIND || request.api_version != API_VERSION {
            return Err(format!(
                "not a {API_VERSION} {CERTIFICATE_REQUEST_KIND} (kind {:?}, apiVersion {:?})",
                request.kind, request.api_version
            ));
        }
        Ok(request)
    }
}

/// The CA certificates peers trust.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrustBundleResource {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: TrustBundleSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrustBundleSpec {
    pub trust_domain: String,
    /// PEM, one block per CA certificate.
    pub certificates: String,
}

impl TrustBundleResource {
    pub fn new(trust_domain: &str, certificates_pem: &str) -> Self {
        TrustBundleResource {
            api_version: API_VERSION.to_owned(),
            kind: TRUST_BUNDLE_KIND.to_owned(),
            metadata: ObjectMeta {
                name: TRUST_BUNDLE_NAME.to_owned(),
                namespace: SYSTEM_NAMESPACE.to_owned(),
            },
            spec: TrustBundleSpec {
                trust_domain: trust_domain.to_owned(),
                certificates: certificates_pem.to_owned(),
            },
        }
    }

    /// Decodes a stored bundle; `kind` and `apiVersion` must match.
    pub fn decode(value: &[u8]) -> Result<Self, String> {
        let bundle: Self = serde_json::from_slice(value).map_err(|error| error.to_string())?;
        if bundle.kind != TRUST_BUNDLE_KIND || bundle.api_version != API_VERSION {
            return Err(format!(
                "not a {API_VERSION} {TRUST_BUNDLE_KIND} (kind {:?}, apiVersion {:?})",
                bundle.kind, bundle.api_version
            ));
        }
        Ok(bundle)
    }
}

/// A node's statement that pods running on it carry a service account identity
/// (`spiffe://<td>/ns/<ns>/sa/<account>`): one record per (identity, node), named
/// `<account>@<node>` in the identity's namespace (`@` appears in neither a service account
/// nor a node name, so no two pairs share a name). The node writes it under its lease while
/// at least one such pod is enrolled there and deletes it when the last one goes; the signer
/// grants that identity to that node only while the record lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentityRecord {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: WorkloadIdentitySpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentitySpec {
    /// The SPIFFE ID.
    pub identity: String,
    /// The node the pods run on (its `Node` record's name).
    pub node: String,
    /// The pods carrying it there (names in the namespace), for operators.
    #[serde(default)]
    pub pods: Vec<String>,
}

impl WorkloadIdentityRecord {
    /// The record of `identity` (a `/ns/<ns>/sa/<account>` ID) on `node`; `None` for another
    /// kind of ID.
    pub fn new(identity: &SpiffeId, node: &str, pods: Vec<String>) -> Option<Self> {
        let (namespace, account) = service_account_of(identity)?;
        Some(WorkloadIdentityRecord {
            api_version: API_VERSION.to_owned(),
            kind: WORKLOAD_IDENTITY_KIND.to_owned(),
            metadata: ObjectMeta {
                name: workload_identity_name(account, node),
                namespace: namespace.to_owned(),
            },
            spec: WorkloadIdentitySpec {
                identity: identity.to_string(),
                node: node.to_owned(),
                pods,
            },
        })
    }

    /// Decodes a stored record; `kind` and `apiVersion` must match.
    pub fn decode(value: &[u8]) -> Result<Self, String> {
        let record: Self = serde_json::from_slice(value).map_err(|error| error.to_string())?;
        if record.kind != WORKLOAD_IDENTITY_KIND || record.api_version != API_VERSION {
            return Err(format!(
                "not a {API_VERSION} {WORKLOAD_IDENTITY_KIND} (kind {:?}, apiVersion {:?})",
                record.kind, record.api_version
            ));
        }
        Ok(record)
    }

    /// Its key under `prefix`.
    pub fn key(&self, prefix: &str) -> String {
        workload_identity_key(prefix, &self.metadata.namespace, &self.metadata.name)
    }
}

/// `(namespace, account)` of a `/ns/<ns>/sa/<account>` ID.
pub fn service_account_of(identity: &SpiffeId) -> Option<(&str, &str)> {
    let mut segments = identity.path().trim_start_matches('/').split('/');
    match (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) {
        (Some("ns"), Some(namespace), Some("sa"), Some(account), None) => {
            Some((namespace, account))
        }
        _ => None,
    }
}

/// The name of the record of `account` on `node`.
pub fn workload_identity_name(account: &str, node: &str) -> String {
    format!("{account}@{node}")
}

/// The key of a workload identity record.
pub fn workload_identity_key(prefix: &str, namespace: &str, name: &str) -> String {
    format!(
        "{}/{WORKLOAD_IDENTITIES_SEGMENT}/{namespace}/{name}",
        trimmed(prefix)
    )
}

/// The namespace a request for `identity` is written in.
pub fn request_namespace(identity: &SpiffeId) -> &str {
    if identity.node_name().is_some() {
        return SYSTEM_NAMESPACE;
    }
    let segments: Vec<&str> = identity.path().trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["ns", namespace, "sa", _] => namespace,
        _ => AGENT_NAMESPACE,
    }
}

fn trimmed(prefix: &str) -> &str {
    prefix.trim_end_matches('/')
}

/// `<prefix>/certificaterequests/`.
pub fn requests_prefix(prefix: &str) -> String {
    format!("{}/{CERTIFICATE_REQUESTS_SEGMENT}/", trimmed(prefix))
}

/// The key of a request.
pub fn request_key(prefix: &str, namespace: &str, name: &str) -> String {
    format!("{}{namespace}/{name}", requests_prefix(prefix))
}

/// The key of the trust bundle agents read.
pub fn trust_bundle_key(prefix: &str) -> String {
    format!(
        "{}/{TRUST_BUNDLES_SEGMENT}/{SYSTEM_NAMESPACE}/{TRUST_BUNDLE_NAME}",
        trimmed(prefix)
    )
}

/// The signer's record of a signed nonce.
pub fn signed_nonce_key(prefix: &str, nonce: &str) -> String {
    format!("{}/signer/nonces/{nonce}", trimmed(prefix))
}

/// The signer's record of a signed public key (by SHA-256 fingerprint, hex).
pub fn signed_key_key(prefix: &str, fingerprint: &str) -> String {
    format!("{}/signer/keys/{fingerprint}", trimmed(prefix))
}

/// `bytes` random bytes as lower-case hex.
pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buffer = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buffer);
    hex(&buffer)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The identity kinds `meshctl get` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    TrustBundle,
    CertificateRequest,
    WorkloadIdentity,
}

impl IdentityKind {
    /// `trustbundle(s)`, `certificaterequest(s)`, `csr`, `workloadidentit(y|ies)`, `wi`
    /// (case-insensitive).
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "trustbundle" | "trustbundles" => Some(IdentityKind::TrustBundle),
            "certificaterequest" | "certificaterequests" | "csr" => {
                Some(IdentityKind::CertificateRequest)
            }
            "workloadidentity" | "workloadidentities" | "wi" => {
                Some(IdentityKind::WorkloadIdentity)
            }
            _ => None,
        }
    }

    fn segment(self) -> &'static str {
        match self {
            IdentityKind::TrustBundle => TRUST_BUNDLES_SEGMENT,
            IdentityKind::CertificateRequest => CERTIFICATE_REQUESTS_SEGMENT,
            IdentityKind::WorkloadIdentity => WORKLOAD_IDENTITIES_SEGMENT,
        }
    }
}

/// How `meshctl get` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// `meshctl get trustbundles|certificaterequests|workloadidentities [NAME] [-n NS]`: every
/// namespace unless one
/// is given. Values that do not decode are listed as such, never hidden.
pub async fn render_get(
    etcd: &crate::control::Etcd,
    kind: IdentityKind,
    namespace: Option<&str>,
    name: Option<&str>,
    format: Format,
) -> Result<String, crate::control::EtcdError> {
    let mut prefix = format!("{}/{}/", trimmed(etcd.prefix()), kind.segment());
    if let Some(namespace) = namespace {
        prefix.push_str(namespace);
        prefix.push('/');
    }
    let listing = etcd.list_prefix(&prefix).await?;
    let entries: Vec<_> = listing
        .entries
        .iter()
        .filter(|entry| name.is_none_or(|name| entry.key.rsplit('/').next() == Some(name)))
        .collect();
    let documents: Vec<serde_json::Value> = entries
        .iter()
        .map(|entry| {
            serde_json::from_slice(&entry.value).unwrap_or_else(
                |error| serde_json::json!({"key": entry.key, "invalid": error.to_string()}),
            )
        })
        .collect();
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(&documents).unwrap_or_default() + "\n",
        Format::Yaml => serde_yaml::to_string(&documents).unwrap_or_default(),
        Format::Table => {
            let (headers, rows): (&[&str], Vec<Vec<String>>) = match kind {
                IdentityKind::TrustBundle => (
                    &["NAMESPACE", "NAME", "TRUST DOMAIN", "CAS"],
                    entries
                        .iter()
                        .map(|entry| match TrustBundleResource::decode(&entry.value) {
                            Ok(bundle) => vec![
                                bundle.metadata.namespace,
                                bundle.metadata.name,
                                bundle.spec.trust_domain,
                                super::verify::parse_certificates_pem(&bundle.spec.certificates)
                                    .map_or_else(|_| "invalid".to_owned(), |c| c.len().to_string()),
                            ],
                            Err(error) => vec![entry.key.clone(), format!("invalid: {error}")],
                        })
                        .collect(),
                ),
                IdentityKind::CertificateRequest => (
                    &["NAMESPACE", "NAME", "IDENTITY", "NODE", "CREATED", "STATUS"],
                    entries
                        .iter()
                        .map(|entry| match CertificateRequest::decode(&entry.value) {
                            Ok(request) => {
                                let status = match &request.status {
                                    Some(CertificateRequestStatus {
                                        denied: Some(reason),
                                        ..
                                    }) => format!("Denied: {reason}"),
                                    Some(CertificateRequestStatus {
                                        certificate: Some(_),
                                        ..
                                    }) => "Issued".to_owned(),
                                    _ => "Pending".to_owned(),
                                };
                                vec![
                                    request.metadata.namespace,
                                    request.metadata.name,
                                    request.spec.identity,
                                    request.spec.node,
                                    request.spec.creation_time,
                                    status,
                                ]
                            }
                            Err(error) => vec![entry.key.clone(), format!("invalid: {error}")],
                        })
                        .collect(),
                ),
                IdentityKind::WorkloadIdentity => (
                    &["NAMESPACE", "NAME", "IDENTITY", "NODE", "PODS"],
                    entries
                        .iter()
                        .map(|entry| match WorkloadIdentityRecord::decode(&entry.value) {
                            Ok(record) => vec![
                                record.metadata.namespace,
                                record.metadata.name,
                                record.spec.identity,
                                record.spec.node,
                                record.spec.pods.join(","),
                            ],
                            Err(error) => vec![entry.key.clone(), format!("invalid: {error}")],
                        })
                        .collect(),
                ),
            };
            if rows.is_empty() {
                String::new()
            } else {
                crate::control::ctl::table(headers, &rows)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_live_in_the_identity_namespace() {
        let id = SpiffeId::for_service_account("mesh.local", "team-a", "planner").unwrap();
        let request = CertificateRequest::new(&id, "node-a", "CSR");
        assert_eq!(request.metadata.namespace, "team-a");
        assert!(request.metadata.name.starts_with("node-a-"));
        assert_eq!(request.spec.nonce.len(), 32);
        let text = serde_json::to_vec(&request).unwrap();
        assert!(!String::from_utf8_lossy(&text).contains("status"));
        assert_eq!(CertificateRequest::decode(&text).unwrap(), request);
        let other = CertificateRequest::new(&id, "node-a", "CSR");
        assert_ne!(other.metadata.name, request.metadata.name);
        assert_ne!(other.spec.nonce, request.spec.nonce);
        assert_eq!(
            request_namespace(&SpiffeId::for_agent("mesh.local", "tools").unwrap()),
            "default"
        );
        assert_eq!(
            request_namespace(&SpiffeId::for_node("mesh.local", "node-a").unwrap()),
            "mesh-system"
        );
        assert!(CertificateRequest::decode(b"{}").is_err());
        let bundle = TrustBundleResource::new("mesh.local", "PEM");
        let text = serde_json::to_vec(&bundle).unwrap();
        assert_eq!(TrustBundleResource::decode(&text).unwrap(), bundle);
        assert!(TrustBundleResource::decode(&serde_json::to_vec(&request).unwrap()).is_err());
    }

    #[test]
    fn workload_identity_records_name_the_account_and_the_node() {
        let id = SpiffeId::for_service_account("mesh.local", "prod", "planner").unwrap();
        let record =
            WorkloadIdentityRecord::new(&id, "ip-10-0-0-1.ec2.internal", vec!["p-0".into()])
                .unwrap();
        assert_eq!(record.metadata.namespace, "prod");
        assert_eq!(record.metadata.name, "planner@ip-10-0-0-1.ec2.internal");
        assert_eq!(
            record.key("/mesh/v1"),
            "/mesh/v1/workloadidentities/prod/planner@ip-10-0-0-1.ec2.internal"
        );
        let text = serde_json::to_vec(&record).unwrap();
        assert_eq!(WorkloadIdentityRecord::decode(&text).unwrap(), record);
        assert!(WorkloadIdentityRecord::decode(b"{}").is_err());
        let bundle = serde_json::to_vec(&TrustBundleResource::new("mesh.local", "PEM")).unwrap();
        assert!(WorkloadIdentityRecord::decode(&bundle).is_err());
        // Only service account IDs have records.
        let agent = SpiffeId::for_agent("mesh.local", "tools").unwrap();
        assert!(WorkloadIdentityRecord::new(&agent, "node-a", vec![]).is_none());
        assert_eq!(service_account_of(&id), Some(("prod", "planner")));
        assert_eq!(service_account_of(&agent), None);
        assert_eq!(
            IdentityKind::parse("wi"),
            Some(IdentityKind::WorkloadIdentity)
        );
        assert_eq!(
            IdentityKind::parse("WorkloadIdentities"),
            Some(IdentityKind::WorkloadIdentity)
        );
    }

    #[test]
    fn keys_follow_the_layout() {
        assert_eq!(
            request_key("/mesh/v1", "default", "n-1"),
            "/mesh/v1/certificaterequests/default/n-1"
        );
        assert_eq!(
            trust_bundle_key("/mesh/v1"),
            "/mesh/v1/trustbundles/mesh-system/default"
        );
        assert_eq!(
            signed_nonce_key("/mesh/v1", "ab"),
            "/mesh/v1/signer/nonces/ab"
        );
        assert_eq!(signed_key_key("/x/", "cd"), "/x/signer/keys/cd");
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
    }
}
