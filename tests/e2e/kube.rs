//! End-to-end tests of pod enrolment: a real agent lists and watches the pods of its node
//! through the Kubernetes API's wire protocol (HTTPS, bearer token, list + chunked watch,
//! 410 Gone), finds their cgroups laid out as the kubelet lays them out (under a cgroup tree of
//! the test's own), captures their connections with the real eBPF programs and names them by
//! their service accounts' SPIFFE IDs, which policies match.
//!
//! In etcd mode (two agents of one real etcd as nodes A and B, and the real signer), a pod on
//! node A gets its service account's certificate from the signer because node A published a
//! leased `WorkloadIdentity` record for it, and calls node B through the mTLS tunnel; node B
//! cannot obtain that identity, and the record goes with the pod and with node A's agent.
//!
//! The signer with Kubernetes settings (`ca run --kubernetes`) asks the API server for each
//! service account identity: a node's forged `WorkloadIdentity` record, a finished pod, a pod
//! long overdue for deletion, and an API server that refuses the token, hangs or is down all
//! get the request refused with the reason.
//!
//! The API server is `tests/python/kube_api.py`: no kube-apiserver can be installed from the
//! package registries the tests reach, so the pod resource is served by a small server that
//! speaks the same protocol. Everything else is real.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod signing;

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant, SystemTime},
};

use mesh_agent::identity::{SpiffeId, resources::WorkloadIdentityRecord};
use mesh_tests::{
    AgentOptions, AgentProcess, CgroupTree, KillOnDrop, TempDir,
    etcd::{AgentEtcd, EtcdServer, EtcdTlsFiles},
    free_port,
    signer::{SignerOptions, SignerProcess},
    start_python_server, unique_name,
};

const HEAD: &str = "apiVersion: mesh.agentmesh.dev/v1alpha1\n";
const NODE: &str = "node-a";

/// The API server, its control port and the files it was started with.
struct FakeApi {
    server: Option<KillOnDrop>,
    address: SocketAddr,
    control: SocketAddr,
    dir: PathBuf,
    tls: EtcdTlsFiles,
}

impl FakeApi {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(unique_name("kube-api"));
        fs::create_dir_all(&dir).unwrap();
        let tls = EtcdTlsFiles::generate(&dir).unwrap();
        fs::write(dir.join("token"), "token-1\n").unwrap();
        let control_port = free_port().unwrap();
        let (server, address) = start_python_server(
            "kube_api.py",
            &[
                "--control-port",
                &control_port.to_string(),
                "--cert",
                tls.server_cert.to_str().unwrap(),
                "--key",
                tls.server_key.to_str().unwrap(),
                "--token-file",
                dir.join("token").to_str().unwrap(),
            ],
            false,
        )
        .expect("start the API server");
        FakeApi {
            server: Some(server),
            address,
            control: SocketAddr::from(([127, 0, 0, 1], control_port)),
            dir,
            tls,
        }
    }

    fn control(&self, method: &str, path: &str, body: &str) -> String {
        let mut stream = TcpStream::connect(self.control).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nhost: control\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{method} {path}: {answer}"
        );
        answer
    }

    fn put_pod(&self, uid: &str, namespace: &str, account: &str, enrol: bool) {
        let labels = if enrol {
            r#"{"app": "demo", "mesh.agentmesh.dev/enrol": "true"}"#
        } else {
            r#"{"app": "demo"}"#
        };
        let pod = format!(
            r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "pod-{account}", "namespace": "{namespace}", "uid": "{uid}", "labels": {labels}}}, "spec": {{"nodeName": "{NODE}", "serviceAccountName": "{account}", "containers": [{{"name": "main", "image": "demo"}}]}}, "status": {{"phase": "Running"}}}}"#
        );
        self.control("PUT", "/pods", &pod);
    }

    /// Any pod object, as given.
    fn put_pod_object(&self, pod: &serde_json::Value) {
        self.control("PUT", "/pods", &pod.to_string());
    }

    fn requests(&self) -> String {
        self.control("GET", "/requests", "")
    }

    /// Stops the server (an API server that is down).
    fn stop(&mut self) {
        self.server.take();
    }

    /// `mesh-agent ca run` flags for this server, authenticating with `token_file`.
    fn signer_args(&self, token_file: &Path) -> Vec<String> {
        vec![
            "--kubernetes".into(),
            format!("https://{}", self.address),
            "--kubernetes-token-file".into(),
            token_file.display().to_string(),
            "--kubernetes-ca-file".into(),
            self.tls.ca.display().to_string(),
        ]
    }

    /// `spec.kubernetes` for an agent of node `NODE`.
    fn agent_spec(&self) -> String {
        format!(
            "  kubernetes:\n    nodeName: {NODE}\n    apiServer: \"https://{}\"\n    tokenFile: \"{}\"\n    caFile: \"{}\"\n    labelSelector: \"mesh.agentmesh.dev/enrol=true\"\n    requestTimeout: 5s\n",
            self.address,
            self.dir.join("token").display(),
            self.tls.ca.display()
        )
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// An HTTP server answering 200 "ok" to anything, in this process.
fn start_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
                );
            });
        }
    });
    address
}

/// The cgroup the kubelet (systemd driver, burstable QoS) makes for a pod, with one container.
fn pod_container_cgroup(tree: &CgroupTree, uid: &str) -> PathBuf {
    tree.child(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
        uid.replace('-', "_"),
        &uid[..8]
    ))
    .unwrap()
}

/// curl's status for `GET http://address/` from a process in `cgroup`.
fn call_from(tree: &CgroupTree, cgroup: &Path, address: SocketAddr) -> u16 {
    let output = tree
        .run_in(
            cgroup,
            Command::new("curl").args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
                &format!("http://{address}/"),
            ]),
        )
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn metric(agent: &AgentProcess, name: &str) -> f64 {
    let mut stream = TcpStream::connect(("127.0.0.1", agent.admin_port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn wait_for(agent: &AgentProcess, what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}; agent log:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pods_of_the_node_are_enrolled_by_cgroup_and_named_by_service_account() {
    let api = FakeApi::start();
    let backend = start_backend();
    let tree = CgroupTree::create("kube-pods").expect("create cgroup tree");
    let agent_cgroup = tree.child("agent").unwrap();
    let policy_dir = std::env::temp_dir().join(unique_name("kube-policies"));
    fs::create_dir_all(&policy_dir).unwrap();
    // Only the planner's service account may call the backend.
    fs::write(
        policy_dir.join("mesh.yaml"),
        format!(
            "{HEAD}kind: Agent\nmetadata: {{name: backend}}\nspec:\n  endpoints: [{{address: \"{backend}\"}}]\n---\n{HEAD}kind: AccessPolicy\nmetadata: {{name: backend-access}}\nspec:\n  targetAgent: backend\n  action: Allow\n  rules:\n    - from: [\"spiffe://mesh.local/ns/prod/sa/planner\"]\n"
        ),
    )
    .unwrap();

    let planner_uid = "0a1b2c3d-0000-4000-8000-000000000001";
    let intruder_uid = "0a1b2c3d-0000-4000-8000-000000000002";
    let outsider_uid = "0a1b2c3d-0000-4000-8000-000000000003";
    let late_uid = "0a1b2c3d-0000-4000-8000-000000000004";
    let planner = pod_container_cgroup(&tree, planner_uid);
    let intruder = pod_container_cgroup(&tree, intruder_uid);
    let outsider = pod_container_cgroup(&tree, outsider_uid);
    api.put_pod(planner_uid, "prod", "planner", true);
    api.put_pod(intruder_uid, "prod", "intruder", true);
    // Not labelled for the mesh: never enrolled.
    api.put_pod(outsider_uid, "prod", "intruder", false);

    let agent = AgentProcess::start_with_spec(
        &tree,
        AgentOptions {
            accelerate: false,
            l7: true,
            workloads: vec![],
            exclude_ports: vec![],
            exclude_cidrs: vec![],
            agent_cgroup,
            log_filter: "info,mesh_agent=debug".into(),
            agent_binary: None,
            policy_dir: Some(policy_dir.clone()),
        },
        None,
        &api.agent_spec(),
    )
    .expect("start agent");
    wait_for(&agent, "two pods enrolled", || {
        metric(&agent, "mesh_kubernetes_pods_enrolled") == 2.0
    });
    // The agent asked for this node's pods with the selector, and authenticated (the watch
    // follows the listing that enrolled the pods: wait for it).
    wait_for(&agent, "the watch request", || {
        api.requests().contains("watch=1")
    });
    let requests = api.requests();
    assert!(
        requests.contains("fieldSelector=spec.nodeName%3Dnode-a")
            && requests.contains("labelSelector=mesh.agentmesh.dev%2Fenrol%3Dtrue")
            && requests.contains("watch=1"),
        "{requests}"
    );

    // The planner pod's container is captured and allowed as its service account; the
    // intruder's is captured and refused; the unlabelled pod is not in the mesh at all.
    assert_eq!(call_from(&tree, &planner, backend), 200);
    assert_eq!(call_from(&tree, &intruder, backend), 403);
    assert_eq!(call_from(&tree, &outsider, backend), 200);
    let log = agent.log();
    assert!(
        log.contains("spiffe://mesh.local/ns/prod/sa/planner") && log.contains("pod enrolled"),
        "{log}"
    );

    // A pod whose cgroup appears after the pod (the runtime is slower than the watch).
    api.put_pod(late_uid, "prod", "planner", true);
    wait_for(&agent, "the late pod pending", || {
        metric(&agent, "mesh_kubernetes_pods_pending") == 1.0
    });
    let late = pod_container_cgroup(&tree, late_uid);
    wait_for(&agent, "the late pod enrolled", || {
        metric(&agent, "mesh_kubernetes_pods_enrolled") == 3.0
    });
    assert_eq!(call_from(&tree, &late, backend), 200);

    // Deleted: the intruder's pod leaves the mesh (its traffic is no longer captured).
    api.control("DELETE", &format!("/pods/{intruder_uid}"), "");
    wait_for(&agent, "the deleted pod to leave", || {
        metric(&agent, "mesh_kubernetes_pods_enrolled") == 2.0
    });
    assert_eq!(call_from(&tree, &intruder, backend), 200);

    // Relabelled into the mesh: the outsider joins (a MODIFIED event).
    api.put_pod(outsider_uid, "prod", "intruder", true);
    wait_for(&agent, "the relabelled pod", || {
        metric(&agent, "mesh_kubernetes_pods_enrolled") == 3.0
    });
    assert_eq!(call_from(&tree, &outsider, backend), 403);

    // The watch history is compacted and the watches dropped: the resumed watch gets 410 Gone,
    // the agent lists again and converges on what changed meanwhile.
    let lists = metric(&agent, "mesh_kubernetes_lists_total");
    api.control("POST", "/compact", "");
    api.control("DELETE", &format!("/pods/{outsider_uid}"), "");
    api.control("POST", "/compact", "");
    api.control("POST", "/drop-watches", "");
    wait_for(&agent, "a relist", || {
        metric(&agent, "mesh_kubernetes_lists_total") > lists
    });
    wait_for(&agent, "convergence after the relist", || {
        metric(&agent, "mesh_kubernetes_pods_enrolled") == 2.0
    });
    assert_eq!(call_from(&tree, &outsider, backend), 200);
    assert_eq!(call_from(&tree, &planner, backend), 200);
    assert!(agent.log().contains("410 Gone"), "{}", agent.log());
    let _ = fs::remove_dir_all(&policy_dir);
}

#[test]
fn a_wrong_token_or_an_untrusted_api_server_enrols_nothing_and_says_why() {
    let api = FakeApi::start();
    let tree = CgroupTree::create("kube-refused").expect("create cgroup tree");
    let agent_cgroup = tree.child("agent").unwrap();
    let uid = "0a1b2c3d-0000-4000-8000-0000000000aa";
    let _container = pod_container_cgroup(&tree, uid);
    api.put_pod(uid, "prod", "planner", true);
    fs::write(api.dir.join("token"), "token-2\n").unwrap();
    let spec = api.agent_spec();
    // The server now expects token-2; the agent's token file says token-1.
    let agent_token = api.dir.join("agent-token");
    fs::write(&agent_token, "token-1\n").unwrap();
    let spec = spec.replace(
        &api.dir.join("token").display().to_string(),
        &agent_token.display().to_string(),
    );
    let options = || AgentOptions {
        accelerate: false,
        l7: true,
        workloads: vec![],
        exclude_ports: vec![],
        exclude_cidrs: vec![],
        agent_cgroup: agent_cgroup.clone(),
        log_filter: "info,mesh_agent=debug".into(),
        agent_binary: None,
        policy_dir: None,
    };
    let agent = AgentProcess::start_with_spec(&tree, options(), None, &spec).expect("start agent");
    wait_for(&agent, "the refusal", || {
        metric(&agent, "mesh_kubernetes_failures_total") >= 1.0
    });
    assert!(agent.log().contains("answered 401"), "{}", agent.log());
    assert_eq!(metric(&agent, "mesh_kubernetes_pods_enrolled"), 0.0);
    // The token is re-read for every request: fixing the file is enough.
    fs::write(&agent_token, "token-2\n").unwrap();
    wait_for(&agent, "enrolment after the token fix", || {
        metric(&agent, "mesh_kubernetes_pods_enrolled") == 1.0
    });
    drop(agent);

    // An API server whose certificate the configured CA did not sign: nothing is trusted.
    let other = std::env::temp_dir().join(unique_name("kube-other-ca"));
    fs::create_dir_all(&other).unwrap();
    let other_ca = EtcdTlsFiles::generate(&other).unwrap().ca;
    let spec = spec.replace(
        &api.tls.ca.display().to_string(),
        &other_ca.display().to_string(),
    );
    let agent = AgentProcess::start_with_spec(&tree, options(), None, &spec).expect("start agent");
    wait_for(&agent, "the TLS refusal", || {
        metric(&agent, "mesh_kubernetes_failures_total") >= 1.0
    });
    assert!(
        agent.log().contains("TLS: invalid peer certificate"),
        "{}",
        agent.log()
    );
    assert_eq!(metric(&agent, "mesh_kubernetes_pods_enrolled"), 0.0);
    let _ = fs::remove_dir_all(&other);
}

// ---------------------------------------------------------------------------------------------
// etcd mode: pods' identities come from the signer, which only grants them to their node.

/// Polls `done` every 20 ms for up to 30 s (a bound against a hang, not a measurement).
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Posts a certificate request for `identity` in `node`'s name (as that node's agent would)
/// and waits for the signer's answer: `Ok(certificate)` or `Err(reason)`.
fn request_certificate(
    etcd: &EtcdServer,
    identity: &SpiffeId,
    node: &str,
) -> Result<String, String> {
    let request = signing::request_for(identity, node, &signing::new_key());
    signing::submit_within(etcd, &request, Duration::from_secs(30))
}

/// The lease `key` is held by in etcd; `None` when the key does not exist.
fn lease_of(etcd: &EtcdServer, key: &str) -> Option<i64> {
    let text = etcd.etcdctl(&["get", key, "-w", "json"]).unwrap();
    let listing: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    listing["kvs"]
        .as_array()
        .and_then(|kvs| kvs.first())
        .map(|kv| kv["lease"].as_i64().unwrap_or(0))
}

#[test]
fn pods_get_their_certificates_from_the_signer_and_call_across_nodes_in_etcd_mode() {
    let etcd = EtcdServer::start().expect("start etcd");
    let api = FakeApi::start();
    // The signer checks pod identities with the same API server, as on a real cluster.
    let signer_args = api.signer_args(&api.dir.join("token"));
    let signer_args: Vec<&str> = signer_args.iter().map(String::as_str).collect();
    let signer = SignerProcess::start(
        &etcd,
        SignerOptions {
            trust_domain: "mesh.local",
            certificate_ttl: "1h",
            extra: &signer_args,
            namespace: None,
        },
    )
    .expect("start the signer");
    let backend = start_backend();
    let work = TempDir::new("kube-etcd").unwrap();
    let planner_id = SpiffeId::for_service_account("mesh.local", "prod", "planner").unwrap();

    // The backend runs on node B; only the planner service account may call it.
    let resources = work.path().join("mesh.yaml");
    fs::write(
        &resources,
        format!(
            "{HEAD}kind: Agent\nmetadata: {{name: backend}}\nspec:\n  endpoints: [{{address: \"{backend}\", node: node-b}}]\n---\n{HEAD}kind: AccessPolicy\nmetadata: {{name: backend-access}}\nspec:\n  targetAgent: backend\n  action: Allow\n  rules:\n    - from: [\"{planner_id}\"]\n"
        ),
    )
    .unwrap();
    let applied = etcd
        .meshctl(&["apply", "-f", &resources.to_string_lossy()])
        .unwrap();
    assert!(applied.status.success(), "{applied:?}");

    let options = |tree: &CgroupTree| AgentOptions {
        accelerate: false,
        l7: true,
        workloads: vec![],
        exclude_ports: vec![],
        exclude_cidrs: vec![],
        agent_cgroup: tree.child("agent").unwrap(),
        log_filter: "info,mesh_agent=debug".into(),
        agent_binary: None,
        policy_dir: None,
    };
    let identity = "  identity:\n    trustDomain: mesh.local\n";
    // Two nodes of one etcd on this host's network, each capturing its own cgroup tree.
    let tree_b = CgroupTree::create("kube-etcd-b").expect("create cgroup tree");
    let dir_b = work.path().join("node-b");
    fs::create_dir_all(&dir_b).unwrap();
    let agent_b = AgentProcess::start_named_with_spec(
        &tree_b,
        options(&tree_b),
        Some(AgentEtcd::new(&etcd, &dir_b)),
        "node-b",
        identity,
    )
    .expect("start node B's agent");
    let tree_a = CgroupTree::create("kube-etcd-a").expect("create cgroup tree");
    let dir_a = work.path().join("node-a");
    fs::create_dir_all(&dir_a).unwrap();
    let planner_uid = "0a1b2c3d-0000-4000-8000-0000000000e1";
    let planner = pod_container_cgroup(&tree_a, planner_uid);
    let mut agent_a = AgentProcess::start_named_with_spec(
        &tree_a,
        options(&tree_a),
        Some(AgentEtcd::new(&etcd, &dir_a)),
        NODE,
        &format!("{identity}{}", api.agent_spec()),
    )
    .expect("start node A's agent");

    // The pod is enrolled on node A, which publishes its identity under a lease.
    api.put_pod(planner_uid, "prod", "planner", true);
    wait_for(&agent_a, "the pod enrolled", || {
        metric(&agent_a, "mesh_kubernetes_pods_enrolled") == 1.0
    });
    let record_key = "/mesh/v1/workloadidentities/prod/planner@node-a";
    eventually("node A's WorkloadIdentity record", || {
        lease_of(&etcd, record_key).is_some()
    });
    assert_ne!(
        lease_of(&etcd, record_key),
        Some(0),
        "the record must be leased"
    );
    let listed = etcd.meshctl(&["get", "wi", "-A"]).unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("planner@node-a") && listed.contains("pod-planner"),
        "{listed}"
    );

    // Its call to the backend on node B goes through the tunnel with the certificate the
    // signer issued to node A for the pod's service account; node B admits it by that identity.
    let status = call_from(&tree_a, &planner, backend);
    assert_eq!(
        status,
        200,
        "node A:\n{}\nnode B:\n{}\nsigner:\n{}",
        agent_a.log(),
        agent_b.log(),
        signer.log()
    );
    assert!(
        mesh_tests::has_line_with(
            &signer.log(),
            &[
                "certificate issued",
                &format!("identity={planner_id} "),
                "node=node-a "
            ]
        ),
        "{}",
        signer.log()
    );
    assert!(
        mesh_tests::has_line_with(
            &agent_b.log(),
            &["tunnel stream accepted", &format!("source={planner_id}")]
        ),
        "{}",
        agent_b.log()
    );
    // The signer asked the API server about the pod's namespace on node A.
    let requests = api.requests();
    assert!(
        requests.contains("/api/v1/namespaces/prod/pods?fieldSelector=spec.nodeName%3Dnode-a"),
        "{requests}"
    );
    assert_eq!(
        metric(
            &agent_a,
            "mesh_identity_issuance_failures_total{identity=\"spiffe://mesh.local/ns/prod/sa/planner\"}"
        ),
        0.0
    );

    // Another node cannot get the pod's identity: node B runs no such pod.
    let reason = request_certificate(&etcd, &planner_id, "node-b").unwrap_err();
    assert!(
        reason.contains("does not place") && reason.contains("node-b"),
        "{reason}"
    );

    // The pod is deleted: it leaves the mesh, its record goes, and a new request for the
    // identity in node A's name is refused.
    api.control("DELETE", &format!("/pods/{planner_uid}"), "");
    wait_for(&agent_a, "the deleted pod to leave", || {
        metric(&agent_a, "mesh_kubernetes_pods_enrolled") == 0.0
    });
    eventually("the record to go", || lease_of(&etcd, record_key).is_none());
    let reason = request_certificate(&etcd, &planner_id, NODE).unwrap_err();
    assert!(
        reason.contains("no pod of that service account is enrolled there"),
        "{reason}"
    );

    // A pod of that account again, then the agent stops: its lease goes, and the record with
    // it.
    let again_uid = "0a1b2c3d-0000-4000-8000-0000000000e2";
    let _again = pod_container_cgroup(&tree_a, again_uid);
    api.put_pod(again_uid, "prod", "planner", true);
    eventually("the record again", || lease_of(&etcd, record_key).is_some());
    assert!(request_certificate(&etcd, &planner_id, NODE).is_ok());
    agent_a.stop().expect("stop node A's agent");
    assert!(
        lease_of(&etcd, record_key).is_none(),
        "the record outlived its node"
    );
}

// ---------------------------------------------------------------------------------------------
// The signer with Kubernetes settings: the API server, not the node's own claim, decides.

/// A live `Node` record for `node`, held by a lease, as a running agent writes it.
fn register_node(etcd: &EtcdServer, node: &str) {
    let record = serde_json::json!({
        "apiVersion": "mesh.agentmesh.dev/v1alpha1", "kind": "Node",
        "metadata": {"name": node},
        "status": {"version": "test", "startTime": "2026-01-01T00:00:00.000Z",
                   "heartbeatTime": "2026-01-01T00:00:00.000Z", "pid": 1,
                   "leaseTtlSeconds": 120}
    });
    put_leased(etcd, &format!("/mesh/v1/nodes/{node}"), &record.to_string());
}

fn put_leased(etcd: &EtcdServer, key: &str, value: &str) {
    let granted = etcd.etcdctl(&["lease", "grant", "120"]).unwrap();
    let lease = granted.split_whitespace().nth(1).unwrap().to_owned();
    etcd.etcdctl(&["put", &format!("--lease={lease}"), key, value])
        .unwrap();
}

/// A leased `WorkloadIdentity` record of `identity` on `node`: what a node's agent publishes
/// for its enrolled pods, or what a compromised node (or anyone who can write etcd) forges.
fn claim_identity(etcd: &EtcdServer, identity: &SpiffeId, node: &str) {
    let record = WorkloadIdentityRecord::new(identity, node, vec!["pod-planner".into()]).unwrap();
    put_leased(
        etcd,
        &record.key("/mesh/v1"),
        &serde_json::to_string(&record).unwrap(),
    );
}

/// A pod as the API server stores it.
fn pod_object(
    uid: &str,
    namespace: &str,
    account: &str,
    node: &str,
    phase: &str,
    deletion: Option<SystemTime>,
) -> serde_json::Value {
    let mut pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{account}-0"), "namespace": namespace, "uid": uid},
        "spec": {"nodeName": node, "serviceAccountName": account,
                 "containers": [{"name": "main", "image": "demo"}]},
        "status": {"phase": phase}
    });
    if let Some(at) = deletion {
        pod["metadata"]["deletionTimestamp"] =
            humantime::format_rfc3339_seconds(at).to_string().into();
        pod["metadata"]["deletionGracePeriodSeconds"] = 30.into();
    }
    pod
}

#[test]
fn the_signer_grants_pod_identities_only_where_the_kubernetes_api_runs_the_pods() {
    let etcd = EtcdServer::start().expect("start etcd");
    let mut api = FakeApi::start();
    // The signer's own token file, so a test can make it wrong.
    let signer_token = api.dir.join("signer-token");
    fs::write(&signer_token, "token-1\n").unwrap();
    let mut args = api.signer_args(&signer_token);
    args.extend(["--kubernetes-timeout".into(), "2s".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let signer = SignerProcess::start(
        &etcd,
        SignerOptions {
            trust_domain: "mesh.local",
            certificate_ttl: "1h",
            extra: &args,
            namespace: None,
        },
    )
    .expect("start the signer");
    assert!(
        signer
            .log()
            .contains(&format!("kubernetes=https://{}", api.address)),
        "{}",
        signer.log()
    );
    register_node(&etcd, "node-a");
    register_node(&etcd, "node-b");
    let planner = SpiffeId::for_service_account("mesh.local", "prod", "planner").unwrap();
    let uid = "0a1b2c3d-0000-4000-8000-0000000000f1";
    api.put_pod_object(&pod_object(
        uid, "prod", "planner", "node-a", "Running", None,
    ));

    // Node A runs the pod and publishes its record: granted.
    claim_identity(&etcd, &planner, "node-a");
    assert!(request_certificate(&etcd, &planner, "node-a").is_ok());
    let requests = api.requests();
    assert!(
        requests.contains("/api/v1/namespaces/prod/pods?fieldSelector=spec.nodeName%3Dnode-a"),
        "{requests}"
    );

    // Node B forges a record for the account (the registry alone would grant it): the API
    // server has no such pod on node B, so it is refused, with the reason.
    claim_identity(&etcd, &planner, "node-b");
    let reason = request_certificate(&etcd, &planner, "node-b").unwrap_err();
    assert!(
        reason.contains("the Kubernetes API server does not confirm")
            && reason.contains("no pod of service account prod/planner")
            && reason.contains("\"node-b\""),
        "{reason}"
    );
    // Nor does an Agent entry placing the account on node B, nor a pod of an account of the
    // same name in another namespace on node B.
    let agent = serde_json::json!({
        "apiVersion": "mesh.agentmesh.dev/v1alpha1", "kind": "Agent",
        "metadata": {"name": "planner", "namespace": "prod"},
        "spec": {"endpoints": [{"address": "10.0.0.9:8080", "node": "node-b"}]}
    });
    etcd.etcdctl(&["put", "/mesh/v1/agents/prod/planner", &agent.to_string()])
        .unwrap();
    api.put_pod_object(&pod_object(
        "0a1b2c3d-0000-4000-8000-0000000000f2",
        "staging",
        "planner",
        "node-b",
        "Running",
        None,
    ));
    let reason = request_certificate(&etcd, &planner, "node-b").unwrap_err();
    assert!(reason.contains("does not confirm"), "{reason}");

    // The pod finishes: node A no longer gets the identity, though its record is still there.
    api.put_pod_object(&pod_object(
        uid,
        "prod",
        "planner",
        "node-a",
        "Succeeded",
        None,
    ));
    let reason = request_certificate(&etcd, &planner, "node-a").unwrap_err();
    assert!(reason.contains("has finished (Succeeded)"), "{reason}");
    // Being deleted: granted during its grace period, refused once it is long overdue (a node
    // that is gone, or that keeps a deleted pod).
    let now = SystemTime::now();
    api.put_pod_object(&pod_object(
        uid,
        "prod",
        "planner",
        "node-a",
        "Running",
        Some(now + Duration::from_secs(30)),
    ));
    assert!(request_certificate(&etcd, &planner, "node-a").is_ok());
    api.put_pod_object(&pod_object(
        uid,
        "prod",
        "planner",
        "node-a",
        "Running",
        Some(now - Duration::from_secs(600)),
    ));
    let reason = request_certificate(&etcd, &planner, "node-a").unwrap_err();
    assert!(
        reason.contains("is being deleted and was to be gone by"),
        "{reason}"
    );
    api.put_pod_object(&pod_object(
        uid, "prod", "planner", "node-a", "Running", None,
    ));
    assert!(request_certificate(&etcd, &planner, "node-a").is_ok());

    // The API server refuses the signer's token (401): refused with the API's answer; the
    // token is re-read for every request, so fixing the file is enough.
    fs::write(api.dir.join("token"), "token-2\n").unwrap();
    let reason = request_certificate(&etcd, &planner, "node-a").unwrap_err();
    assert!(
        reason.contains("cannot confirm") && reason.contains("answered 401"),
        "{reason}"
    );
    fs::write(&signer_token, "token-2\n").unwrap();
    assert!(request_certificate(&etcd, &planner, "node-a").is_ok());

    // A hung API server: refused once --kubernetes-timeout has passed; the signer goes on
    // (it asks again one timeout later: requests meanwhile are refused at once, and agents
    // retry, as this loop does).
    api.control("POST", "/stall", "");
    let reason = request_certificate(&etcd, &planner, "node-a").unwrap_err();
    assert!(
        reason.contains("cannot reach the Kubernetes API server") && reason.contains("within 2s"),
        "{reason}"
    );
    api.control("POST", "/unstall", "");
    eventually("a grant once the API server answers again", || {
        request_certificate(&etcd, &planner, "node-a").is_ok()
    });

    // The API server is down: refused (fail closed), not granted on the record's word.
    api.stop();
    let reason = request_certificate(&etcd, &planner, "node-a").unwrap_err();
    assert!(
        reason.contains("cannot reach the Kubernetes API server")
            && reason.contains("refused until it answers"),
        "{reason}"
    );
    // Node identities do not depend on the API server.
    let node_a = SpiffeId::for_node("mesh.local", "node-a").unwrap();
    assert!(request_certificate(&etcd, &node_a, "node-a").is_ok());
    // Every refusal is logged with its reason.
    let log = signer.log();
    assert!(
        log.contains("certificate request denied")
            && log.contains("answered 401")
            && log.contains("has finished (Succeeded)"),
        "{log}"
    );
}

#[test]
fn the_signer_refuses_unusable_kubernetes_settings_at_start() {
    let binary = mesh_tests::mesh_agent_binary().unwrap();
    let work = TempDir::new("signer-kube-flags").unwrap();
    let ca = work.path().join("ca");
    let init = Command::new(&binary)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let run = |kubernetes: &[&str]| {
        let output = Command::new(&binary)
            .args(["ca", "run", "--etcd", "http://127.0.0.1:9", "--dir"])
            .arg(&ca)
            .args(kubernetes)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("MESH_KUBERNETES")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    // Usage errors (exit 2), before etcd is even tried: not in a pod, not https, a token file
    // without an API server.
    let (code, stderr) = run(&["--kubernetes", "in-cluster"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("KUBERNETES_SERVICE_HOST"), "{stderr}");
    let (code, stderr) = run(&["--kubernetes", "http://10.96.0.1:443"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("expected https://"), "{stderr}");
    let (code, stderr) = run(&["--kubernetes-token-file", "/tmp/token"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--kubernetes"), "{stderr}");
}
