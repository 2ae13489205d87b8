//! End-to-end tests of workload identity: real `mesh-agent` processes (standalone with the
//! local CA, or in etcd mode with the `mesh-agent ca run` signer), a real etcd, and real TLS
//! handshakes against the certificates they issue.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use mesh_tests::{AgentOptions, AgentProcess, CgroupTree, unique_name};
use serde_json::Value;

/// A temporary folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(unique_name(label));
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn quote(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

fn options(agent_cgroup: PathBuf) -> AgentOptions {
    AgentOptions {
        accelerate: false,
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
    let work = TempDir::new("identity-standalone");
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
