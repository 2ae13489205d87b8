//! End-to-end tests of workload identity: real `mesh-agent` processes (standalone with the
//! local CA, or in etcd mode with the `mesh-agent ca run` signer), a real etcd, and real TLS
//! handshakes against the certificates they issue.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod signing;

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use mesh_tests::{AgentOptions, AgentProcess, CgroupTree, TempDir};
use serde_json::Value;

fn quote(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

fn options(agent_cgroup: PathBuf) -> AgentOptions {
    AgentOptions {
        accelerate: false,
        l7: true,
        workloads: vec![],
        exclude_ports: vec![],
        exclude_cidrs: vec![],
        agent_cgroup,
        log_filter: "info,mesh_agent=debug".into(),
        agent_binary: None,
        policy_dir: None,
    }
}

/// The agent's `/identity` report.
fn identity_status(agent: &AgentProcess) -> Vec<Value> {
    let (status, body) = agent.admin_get("/identity").unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Vec<Value>>(&body).unwrap()
}

#[test]
fn a_standalone_agent_gets_its_node_certificate_from_the_local_ca() {
    let tree = CgroupTree::create("identity-standalone").expect("cgroup tree");
    let agent_cgroup = tree.child("agent").unwrap();
    let work = TempDir::new("identity-standalone").expect("temporary folder");
    let ca_dir = work.path().join("ca");
    let spec = format!(
        "  identity:\n    trustDomain: mesh.local\n    localCa:\n      dir: {}\n",
        quote(&ca_dir.to_string_lossy())
    );
    let mut agent =
        AgentProcess::start_with_spec(&tree, options(agent_cgroup.clone()), None, &spec)
            .expect("start agent");
    assert!(
        agent.log().contains("node identity ready"),
        "{}",
        agent.log()
    );
    let status = identity_status(&agent);
    assert_eq!(status[0]["identity"], "spiffe://mesh.local/node/e2e");
    let first_serial = status[0]["serial"].as_str().unwrap().to_owned();
    assert!(status[0]["notAfter"].is_string(), "{status:?}");
    let (_, metrics) = agent.admin_get("/metrics").unwrap();
    assert!(
        metrics.contains(
            "mesh_identity_certificates_issued_total{identity=\"spiffe://mesh.local/node/e2e\"} 1"
        ),
        "{metrics}"
    );

    // The CA was created at first start, its key readable by root only, and reused after a
    // restart (the node gets a new certificate from the same CA).
    let mode = fs::metadata(ca_dir.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let ca_cert = fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    agent.restart(&tree).expect("restart agent");
    assert_eq!(fs::read_to_string(ca_dir.join("ca.pem")).unwrap(), ca_cert);
    let status = identity_status(&agent);
    assert_ne!(status[0]["serial"].as_str().unwrap(), first_serial);
}

#[test]
fn an_unusable_local_ca_is_reported_and_capture_serves_on() {
    let tree = CgroupTree::create("identity-broken-ca").expect("cgroup tree");
    let agent_cgroup = tree.child("agent").unwrap();
    let work = TempDir::new("identity-broken-ca").expect("temporary folder");
    // A regular file where the CA folder should be.
    let blocker = work.path().join("not-a-folder");
    fs::write(&blocker, "x").unwrap();
    let spec = format!(
        "  identity:\n    localCa:\n      dir: {}\n",
        quote(&blocker.join("ca").to_string_lossy())
    );
    let agent = AgentProcess::start_with_spec(&tree, options(agent_cgroup), None, &spec)
        .expect("the agent runs without identity");
    let log = agent.log();
    assert!(
        log.contains("workload identity unavailable") && log.contains("local CA"),
        "{log}"
    );
    let (status, _) = agent.admin_get("/readyz").unwrap();
    assert_eq!(status, 200);
    assert!(identity_status(&agent).is_empty());
}

// ---------------------------------------------------------------------------------------------
// etcd mode: the signer process, agents and requests written by hand.

use std::{
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_agent::identity::{
    CaDir, EtcdCa, Identities, RenewalSettings, SpiffeId, SpiffeServerVerifier, TlsCredentials,
    resources::{CertificateRequest, WorkloadIdentityRecord, request_key, trust_bundle_key},
};
use mesh_tests::{
    etcd::{AgentEtcd, EtcdServer},
    mesh_agent_binary,
    signer::{SignerOptions, SignerProcess},
};
use signing::{new_key, request_for};

/// The signer against `etcd` with certificates of `ttl` and more `ca run` arguments.
fn start_signer(etcd: &EtcdServer, ttl: &str, extra: &[&str]) -> SignerProcess {
    SignerProcess::start(
        etcd,
        SignerOptions {
            trust_domain: "mesh.local",
            certificate_ttl: ttl,
            extra,
            namespace: None,
        },
    )
    .expect("start the signer")
}

/// Polls `done` until it holds (60 s at most: a generous deadline, not a measurement).
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A live node record for `node`, held by a lease, as a running agent writes it.
fn register_node(etcd: &EtcdServer, node: &str) {
    let granted = etcd.etcdctl(&["lease", "grant", "120"]).unwrap();
    let lease = granted.split_whitespace().nth(1).unwrap().to_owned();
    let record = serde_json::json!({
        "apiVersion": "mesh.agentmesh.dev/v1alpha1", "kind": "Node",
        "metadata": {"name": node},
        "status": {"version": "test", "startTime": "2026-01-01T00:00:00.000Z",
                   "heartbeatTime": "2026-01-01T00:00:00.000Z", "pid": 1,
                   "leaseTtlSeconds": 120}
    });
    etcd.etcdctl(&[
        "put",
        &format!("--lease={lease}"),
        &format!("/mesh/v1/nodes/{node}"),
        &record.to_string(),
    ])
    .unwrap();
}

/// An `Agent` in the registry with one endpoint on `node`.
fn place_agent(etcd: &EtcdServer, name: &str, node: &str) {
    let agent = serde_json::json!({
        "apiVersion": "mesh.agentmesh.dev/v1alpha1", "kind": "Agent",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"endpoints": [{"address": "10.0.0.9:8080", "node": node}]}
    });
    etcd.etcdctl(&[
        "put",
        &format!("/mesh/v1/agents/default/{name}"),
        &agent.to_string(),
    ])
    .unwrap();
}

/// Writes an `AgentInstance` record as a node's registration API does.
fn register_instance(etcd: &EtcdServer, name: &str, node: &str, identity: &SpiffeId) {
    let record = format!("{name}.{node}.1");
    let instance = serde_json::json!({
        "apiVersion": "mesh.agentmesh.dev/v1alpha1", "kind": "AgentInstance",
        "metadata": {"name": record, "namespace": "default"},
        "spec": {"agent": name, "node": node, "address": "10.0.0.10:8080",
                 "identity": identity.as_str(), "health": "Healthy"}
    });
    etcd.etcdctl(&[
        "put",
        &format!("/mesh/v1/agentinstances/default/{record}"),
        &instance.to_string(),
    ])
    .unwrap();
}

/// Writes a request and waits for the signer's answer: `Ok(certificate)` or `Err(reason)`.
fn submit(etcd: &EtcdServer, request: &CertificateRequest) -> Result<String, String> {
    signing::submit_within(etcd, request, Duration::from_secs(60))
}

#[test]
fn the_signer_answers_only_what_the_registry_and_node_records_grant() {
    let etcd = EtcdServer::start().expect("start etcd");
    let signer = start_signer(&etcd, "1h", &[]);
    register_node(&etcd, "node-a");
    let tools = SpiffeId::for_agent("mesh.local", "tools").unwrap();

    // The trust bundle is published.
    let bundle = etcd
        .etcdctl(&["get", &trust_bundle_key("/mesh/v1"), "--print-value-only"])
        .unwrap();
    assert!(
        bundle.contains("\"trustDomain\":\"mesh.local\""),
        "{bundle}"
    );

    // A workload the registry does not place on node-a (it runs on node-b): denied.
    place_agent(&etcd, "tools", "node-b");
    let reason = submit(&etcd, &request_for(&tools, "node-a", &new_key())).unwrap_err();
    assert!(
        reason.contains("does not place") && reason.contains("node-a"),
        "{reason}"
    );
    assert!(signer.log().contains("certificate request denied"));

    // Placed on node-a: signed, for that identity.
    place_agent(&etcd, "tools", "node-a");
    let key = new_key();
    let signed = request_for(&tools, "node-a", &key);
    let certificate = submit(&etcd, &signed).unwrap();
    assert!(certificate.starts_with("-----BEGIN CERTIFICATE-----"));

    // A workload that registered itself on node-a through the registration API (an
    // AgentInstance record of node-a): signed too; the same record of node-b grants node-a
    // nothing.
    let planner = SpiffeId::for_agent("mesh.local", "planner").unwrap();
    register_instance(&etcd, "planner", "node-b", &planner);
    let reason = submit(&etcd, &request_for(&planner, "node-a", &new_key())).unwrap_err();
    assert!(reason.contains("no instance of it registered"), "{reason}");
    register_instance(&etcd, "planner", "node-a", &planner);
    let certificate = submit(&etcd, &request_for(&planner, "node-a", &new_key())).unwrap();
    assert!(certificate.starts_with("-----BEGIN CERTIFICATE-----"));

    // Replays: the same nonce with another key, the same key with another nonce.
    let mut same_nonce = request_for(&tools, "node-a", &new_key());
    same_nonce.spec.nonce = signed.spec.nonce.clone();
    let reason = submit(&etcd, &same_nonce).unwrap_err();
    assert!(reason.contains("replay: its nonce"), "{reason}");
    let same_key = request_for(&tools, "node-a", &key);
    let reason = submit(&etcd, &same_key).unwrap_err();
    assert!(reason.contains("replay: its public key"), "{reason}");

    // A node with no Node record.
    let reason = submit(&etcd, &request_for(&tools, "ghost", &new_key())).unwrap_err();
    assert!(reason.contains("no live Node record"), "{reason}");

    // Another node's identity.
    let node_b = SpiffeId::for_node("mesh.local", "node-b").unwrap();
    let reason = submit(&etcd, &request_for(&node_b, "node-a", &new_key())).unwrap_err();
    assert!(reason.contains("only its own node identity"), "{reason}");

    // Another trust domain, and a stale request.
    let foreign = SpiffeId::for_agent("other.domain", "tools").unwrap();
    let reason = submit(&etcd, &request_for(&foreign, "node-a", &new_key())).unwrap_err();
    assert!(reason.contains("trust domain"), "{reason}");
    let mut stale = request_for(&tools, "node-a", &new_key());
    stale.spec.creation_time = "2020-01-01T00:00:00Z".to_owned();
    let reason = submit(&etcd, &stale).unwrap_err();
    assert!(reason.contains("stale"), "{reason}");

    // A CSR that does not parse or verify (no proof of possession).
    let mut garbage = request_for(&tools, "node-a", &new_key());
    garbage.spec.request =
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".to_owned();
    let reason = submit(&etcd, &garbage).unwrap_err();
    assert!(reason.contains("signing request is invalid"), "{reason}");

    // meshctl shows both kinds.
    let output = etcd.meshctl(&["get", "trustbundles"]).unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("mesh-system") && text.contains("mesh.local"),
        "{text}"
    );
    let output = etcd.meshctl(&["get", "csr", "-n", "default"]).unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("Issued") && text.contains("Denied: replay"),
        "{text}"
    );
}

#[test]
fn without_a_signer_the_agent_serves_and_reports_the_missing_certificate() {
    let etcd = EtcdServer::start().expect("start etcd");
    let tree = CgroupTree::create("identity-no-signer").expect("cgroup tree");
    let agent_cgroup = tree.child("agent").unwrap();
    let work = TempDir::new("identity-no-signer").expect("temporary folder");
    let agent = AgentProcess::start_with_spec(
        &tree,
        options(agent_cgroup),
        Some(AgentEtcd::new(&etcd, work.path())),
        "  identity:\n    requestTimeout: 1s\n    issueTimeout: 2s\n",
    )
    .expect("the agent runs without its certificate");
    let log = agent.log();
    assert!(log.contains("no node certificate yet"), "{log}");
    assert!(log.contains("no trust bundle in etcd yet"), "{log}");
    let (status, _) = agent.admin_get("/readyz").unwrap();
    assert_eq!(status, 200);
    let status = identity_status(&agent);
    assert!(
        status[0]["lastError"]
            .as_str()
            .unwrap_or_default()
            .contains("did not answer"),
        "{status:?}"
    );
    assert!(status[0]["serial"].is_null());
}

/// Writes `value` at `key`, attached to a new lease when `leased` (as a running agent does).
fn put_record(etcd: &EtcdServer, key: &str, value: &str, leased: bool) {
    if leased {
        let granted = etcd.etcdctl(&["lease", "grant", "120"]).unwrap();
        let lease = granted.split_whitespace().nth(1).unwrap().to_owned();
        etcd.etcdctl(&["put", &format!("--lease={lease}"), key, value])
            .unwrap();
    } else {
        etcd.etcdctl(&["put", key, value]).unwrap();
    }
}

/// A `WorkloadIdentity` record of `identity` on `node`, as an agent publishes it for the
/// enrolled pods of a service account.
fn pod_identity_record(etcd: &EtcdServer, identity: &SpiffeId, node: &str, leased: bool) -> String {
    let record = WorkloadIdentityRecord::new(identity, node, vec!["planner-0".into()]).unwrap();
    let key = record.key("/mesh/v1");
    put_record(etcd, &key, &serde_json::to_string(&record).unwrap(), leased);
    key
}

/// An `Agent` `<namespace>/<name>` with one endpoint on `node`.
fn place_agent_in(etcd: &EtcdServer, namespace: &str, name: &str, node: &str) {
    let agent = serde_json::json!({
        "apiVersion": "mesh.agentmesh.dev/v1alpha1", "kind": "Agent",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"endpoints": [{"address": "10.0.0.9:8080", "node": node}]}
    });
    etcd.etcdctl(&[
        "put",
        &format!("/mesh/v1/agents/{namespace}/{name}"),
        &agent.to_string(),
    ])
    .unwrap();
}

#[test]
fn the_signer_places_pods_by_their_nodes_records_and_agents_in_any_namespace() {
    let etcd = EtcdServer::start().expect("start etcd");
    let _signer = start_signer(&etcd, "1h", &[]);
    register_node(&etcd, "node-a");
    register_node(&etcd, "node-b");
    let planner = SpiffeId::for_service_account("mesh.local", "prod", "planner").unwrap();

    // No pod of that service account enrolled anywhere: refused.
    let reason = submit(&etcd, &request_for(&planner, "node-a", &new_key())).unwrap_err();
    assert!(
        reason.contains("no pod of that service account is enrolled there"),
        "{reason}"
    );
    // Node B's record grants node B, not node A.
    let b_key = pod_identity_record(&etcd, &planner, "node-b", true);
    assert!(
        b_key.ends_with("/workloadidentities/prod/planner@node-b"),
        "{b_key}"
    );
    let reason = submit(&etcd, &request_for(&planner, "node-a", &new_key())).unwrap_err();
    assert!(reason.contains("node-a"), "{reason}");
    assert!(submit(&etcd, &request_for(&planner, "node-b", &new_key())).is_ok());
    // A record nobody holds a lease for (not written by a running agent) grants nothing.
    let a_key = pod_identity_record(&etcd, &planner, "node-a", false);
    let reason = submit(&etcd, &request_for(&planner, "node-a", &new_key())).unwrap_err();
    assert!(reason.contains("WorkloadIdentity"), "{reason}");
    // A record under node A's key that names node B (forged or misplaced) grants nothing.
    let forged = WorkloadIdentityRecord::new(&planner, "node-b", vec![]).unwrap();
    put_record(
        &etcd,
        &a_key,
        &serde_json::to_string(&forged).unwrap(),
        true,
    );
    let reason = submit(&etcd, &request_for(&planner, "node-a", &new_key())).unwrap_err();
    assert!(reason.contains("WorkloadIdentity"), "{reason}");
    // Node A's own leased record: granted; deleted (the pod left): refused again.
    pod_identity_record(&etcd, &planner, "node-a", true);
    let certificate = submit(&etcd, &request_for(&planner, "node-a", &new_key())).unwrap();
    assert!(certificate.starts_with("-----BEGIN CERTIFICATE-----"));
    etcd.etcdctl(&["del", &a_key]).unwrap();
    let reason = submit(&etcd, &request_for(&planner, "node-a", &new_key())).unwrap_err();
    assert!(
        reason.contains("no pod of that service account"),
        "{reason}"
    );

    // /agent/<name> of an Agent outside `default`: found in its namespace, on its node only.
    let ledger = SpiffeId::for_agent("mesh.local", "ledger").unwrap();
    place_agent_in(&etcd, "finance", "ledger", "node-a");
    assert!(submit(&etcd, &request_for(&ledger, "node-a", &new_key())).is_ok());
    let reason = submit(&etcd, &request_for(&ledger, "node-b", &new_key())).unwrap_err();
    assert!(reason.contains("in any namespace"), "{reason}");
    // The same name in another namespace on node B: each record places it on its own node.
    place_agent_in(&etcd, "audit", "ledger", "node-b");
    assert!(submit(&etcd, &request_for(&ledger, "node-b", &new_key())).is_ok());
    assert!(submit(&etcd, &request_for(&ledger, "node-a", &new_key())).is_ok());
    // An agent merely sharing a prefix of the name places nothing.
    let ledge = SpiffeId::for_agent("mesh.local", "ledge").unwrap();
    assert!(submit(&etcd, &request_for(&ledge, "node-a", &new_key())).is_err());

    // meshctl lists the records.
    let output = etcd
        .meshctl(&["get", "workloadidentities", "-n", "prod"])
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success()
            && text.contains("planner@node-b")
            && text.contains(planner.as_str()),
        "{text}"
    );
}

#[test]
fn answered_requests_nobody_deleted_are_collected() {
    let etcd = EtcdServer::start().expect("start etcd");
    let _signer = start_signer(&etcd, "1h", &["--max-request-age", "1s"]);
    let tools = SpiffeId::for_agent("mesh.local", "tools").unwrap();
    // Answered (denied: no node record), then left behind as by a node that died.
    let request = request_for(&tools, "ghost", &new_key());
    let reason = submit(&etcd, &request).unwrap_err();
    assert!(reason.contains("no live Node record"), "{reason}");
    let key = request_key("/mesh/v1", "default", &request.metadata.name);
    wait_for("the signer to delete the old answered request", || {
        etcd.etcdctl(&["get", &key, "--keys-only"])
            .unwrap()
            .trim()
            .is_empty()
    });
}

#[test]
fn an_agent_in_etcd_mode_gets_its_node_certificate_and_renews_it_before_expiry() {
    let etcd = EtcdServer::start().expect("start etcd");
    let signer = start_signer(&etcd, "20s", &[]);
    let tree = CgroupTree::create("identity-etcd").expect("cgroup tree");
    let agent_cgroup = tree.child("agent").unwrap();
    let work = TempDir::new("identity-etcd").expect("temporary folder");
    let agent = AgentProcess::start_with_spec(
        &tree,
        options(agent_cgroup),
        Some(AgentEtcd::new(&etcd, work.path())),
        "  identity:\n    requestTimeout: 10s\n",
    )
    .expect("start agent");
    assert!(
        agent.log().contains("node identity ready"),
        "{}",
        agent.log()
    );
    let status = identity_status(&agent);
    assert_eq!(status[0]["identity"], "spiffe://mesh.local/node/e2e");
    let first_serial = status[0]["serial"].as_str().unwrap().to_owned();
    let first_expiry = status[0]["notAfterUnix"].as_u64().unwrap();
    assert!(
        signer.log().contains("certificate issued"),
        "{}",
        signer.log()
    );
    // The request was removed once answered.
    wait_for("the answered request to be deleted", || {
        etcd.keys("/mesh/v1/certificaterequests/")
            .unwrap()
            .is_empty()
    });

    // A 20 s certificate is replaced at about half of its life, before it expires.
    let mut renewed = None;
    wait_for("the node certificate to be renewed", || {
        let status = identity_status(&agent);
        let serial = status[0]["serial"].as_str().unwrap_or_default().to_owned();
        if serial != first_serial {
            renewed = Some(status[0].clone());
        }
        renewed.is_some()
    });
    let renewed = renewed.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        now < first_expiry,
        "renewed only after the first certificate expired"
    );
    assert!(renewed["notAfterUnix"].as_u64().unwrap() > first_expiry);
    assert!(renewed["issued"].as_u64().unwrap() >= 2);

    // CA rotation: the signer re-reads its folder and publishes both CAs; the agent follows.
    let output = Command::new(mesh_agent_binary().unwrap())
        .args(["ca", "rotate", "--dir"])
        .arg(&signer.dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    wait_for("the agent to trust both CAs", || {
        agent
            .admin_get("/metrics")
            .unwrap()
            .1
            .contains("mesh_identity_trust_bundle_cas 2")
    });
}

/// A client configuration presenting `chain`/`key`, accepting servers of `trusted`.
fn client_config(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: &rcgen::KeyPair,
    trusted: mesh_agent::identity::SharedBundle,
) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(trusted)))
    .with_client_auth_cert(
        chain,
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A certificate for `uri` signed by the CA in `dir`, valid from `from` to `to` (seconds from
/// now), with the usages the mesh's own certificates carry.
fn certificate_from(
    dir: &Path,
    uri: &str,
    from: i64,
    to: i64,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rcgen::KeyPair,
) {
    let ca_key =
        rcgen::KeyPair::from_pem(&fs::read_to_string(dir.join("ca-key.pem")).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&fs::read_to_string(dir.join("ca.pem")).unwrap(), ca_key)
            .unwrap();
    let key = new_key();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(from);
    params.not_after = now + time::Duration::seconds(to);
    let certificate = params.signed_by(&key, &issuer).unwrap();
    (vec![certificate.der().clone()], key)
}

/// A TLS handshake (and one byte each way) against `server` on loopback; the server's error
/// first when it refused.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server_side = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(stream)
            .await
            .map_err(|error| error.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        tls.write_all(b"k").await.map_err(|e| e.to_string())
    });
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let client_side = async {
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect("node.invalid".try_into().unwrap(), stream)
            .await
            .map_err(|error| error.to_string())?;
        tls.write_all(b"o").await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())
    }
    .await;
    let server_result = server_side.await.unwrap();
    server_result.map_err(|error| format!("server refused: {error}"))?;
    client_side
        .map(|_| ())
        .map_err(|error| format!("client failed: {error}"))
}

#[test]
fn the_node_server_config_refuses_forged_expired_and_foreign_certificates() {
    let etcd = EtcdServer::start().expect("start etcd");
    let signer = start_signer(&etcd, "1h", &[]);
    register_node(&etcd, "node-a");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client =
            mesh_agent::control::Etcd::connect(mesh_agent::control::EtcdSettings::new(vec![
                etcd.endpoint(),
            ]))
            .await
            .unwrap();
        let ca = EtcdCa::start(client, "node-a", "mesh.local", Duration::from_secs(10)).await;
        let identities =
            Identities::start("node-a", Arc::new(ca), RenewalSettings::default()).unwrap();
        identities
            .wait_for_node(Duration::from_secs(20))
            .await
            .unwrap();
        let server = identities.server_config().unwrap();
        let bundle = identities.trust_bundle();
        assert_eq!(bundle.load().certificates().len(), 1);

        // Control: a certificate of the real CA is accepted.
        let (chain, key) = certificate_from(&signer.dir, "spiffe://mesh.local/agent/x", -60, 600);
        handshake(
            Arc::clone(&server),
            client_config(chain, &key, bundle.clone()),
        )
        .await
        .unwrap();

        // Same identity from another CA (a forgery).
        let forger = TempDir::new("forger").expect("temporary folder");
        CaDir::init(forger.path(), "mesh.local").unwrap();
        let (chain, key) = certificate_from(forger.path(), "spiffe://mesh.local/agent/x", -60, 600);
        let error = handshake(
            Arc::clone(&server),
            client_config(chain, &key, bundle.clone()),
        )
        .await
        .unwrap_err();
        assert!(
            error.starts_with("server refused")
                && (error.contains("UnknownIssuer") || error.contains("BadSignature")),
            "{error}"
        );

        // Expired, from the real CA.
        let (chain, key) =
            certificate_from(&signer.dir, "spiffe://mesh.local/agent/x", -7200, -3600);
        let error = handshake(
            Arc::clone(&server),
            client_config(chain, &key, bundle.clone()),
        )
        .await
        .unwrap_err();
        assert!(
            error.starts_with("server refused") && error.contains("expired"),
            "{error}"
        );

        // Another trust domain, from the real CA.
        let (chain, key) = certificate_from(&signer.dir, "spiffe://other.domain/agent/x", -60, 600);
        let error = handshake(
            Arc::clone(&server),
            client_config(chain, &key, bundle.clone()),
        )
        .await
        .unwrap_err();
        assert!(
            error.starts_with("server refused") && error.contains("ForeignTrustDomain"),
            "{error}"
        );

        // A workload certificate cannot serve as a node: our client refuses such a server.
        let workload = SpiffeId::for_agent("mesh.local", "x").unwrap();
        place_agent(&etcd, "x", "node-a");
        let our_client = identities.client_config(&workload).await.unwrap();
        let (chain, key) = certificate_from(&signer.dir, "spiffe://mesh.local/agent/x", -60, 600);
        let mut impostor = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            chain,
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        impostor.alpn_protocols = vec![b"h2".to_vec()];
        let error = handshake(Arc::new(impostor), our_client).await.unwrap_err();
        assert!(!error.is_empty());
        // The node's own client, against its own server: accepted both ways.
        let own = identities.client_config(&workload).await.unwrap();
        handshake(server, own).await.unwrap();
    });
}
