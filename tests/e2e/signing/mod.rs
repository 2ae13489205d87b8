//! Certificate requests written into etcd by hand, as a node's agent writes them, and the
//! signer's answer to them: shared by the identity and the Kubernetes end-to-end tests.

use std::time::{Duration, Instant};

use mesh_agent::identity::{
    SpiffeId,
    ca::certificate_request,
    resources::{CertificateRequest, request_key},
};
use mesh_tests::etcd::EtcdServer;

/// A fresh ECDSA P-256 key, the kind agents request certificates for.
pub fn new_key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

/// The request a node's agent writes for `identity` in `node`'s name, for `key`.
pub fn request_for(identity: &SpiffeId, node: &str, key: &rcgen::KeyPair) -> CertificateRequest {
    CertificateRequest::new(identity, node, &certificate_request(identity, key).unwrap())
}

/// Writes `request` and waits (at most `within`: a bound against a hang, not a measurement)
/// for the signer's answer: `Ok(certificate)` or `Err(reason)`.
pub fn submit_within(
    etcd: &EtcdServer,
    request: &CertificateRequest,
    within: Duration,
) -> Result<String, String> {
    let key = request_key(
        "/mesh/v1",
        &request.metadata.namespace,
        &request.metadata.name,
    );
    etcd.etcdctl(&["put", &key, &serde_json::to_string(request).unwrap()])
        .unwrap();
    let start = Instant::now();
    loop {
        let text = etcd.etcdctl(&["get", &key, "--print-value-only"]).unwrap();
        let stored: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        let status = &stored["status"];
        if let Some(certificate) = status["certificate"].as_str() {
            return Ok(certificate.to_owned());
        }
        if let Some(reason) = status["denied"].as_str() {
            return Err(reason.to_owned());
        }
        assert!(
            start.elapsed() < within,
            "timed out waiting for an answer to {key}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
