//! Three nodes in etcd mode: network namespaces `node-a`, `node-b` and `node-c` on a bridge,
//! a real `mesh-agent` in each with `spec.etcd` and `spec.identity` (no local CA, no static
//! tunnel peers), and one real etcd and one real signer (`mesh-agent ca run`) in the switch's
//! namespace, reached by every node on the bridge. Resources are applied once with `meshctl`.
//!
//! What it proves: a workload on node A reaches an agent placed on node B through the mTLS
//! tunnel found from B's node record in etcd; one `meshctl apply` changes enforcement on all
//! three nodes without restarts (timings printed); certificates issued by the signer with a
//! short lifetime rotate under load without one failed request (a curl per request, keep-alive
//! load, and new source identities whose first calls make fresh certificate requests and fresh
//! tunnel handshakes throughout), each renewal of the busy identity retiring its tunnel
//! connection so node B sees every new certificate on a new handshake; and the identity the
//! signer issued for node A's workload is the one nodes B and C see and decide on.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{
    AgentOptions, AgentProcess, CgroupTree, KillOnDrop, NodeLaunch, TempDir,
    etcd::{AgentEtcd, EtcdServer},
    netns::{NetNode, Network, PacketCapture},
    read_lines_until,
    signer::{SignerOptions, SignerProcess},
    target_profile_dir, unique_name,
};
use serde_json::Value;

const TRUST_DOMAIN: &str = "mesh.e2e";
const TUNNEL_PORT: u16 = 15008;
const HTTP_PORT: u16 = 8080;
/// What `mesh-loadgen http-server` answers a GET with.
const HTTP_GET_BODY: &str = "hello from the mesh-loadgen upstream";
/// The signer's certificate lifetime (its minimum is 10 s).
const CERTIFICATE_TTL_SECONDS: u64 = 12;
/// Node names (`metadata.name`) and the workload each node runs, by index.
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
const WORKLOADS: [&str; 3] = ["alpha", "bravo", "charlie"];
/// More workloads on node A, each first used during the rotation: a new source identity is a
/// new tunnel connection, so each makes a fresh certificate request and a fresh handshake.
const FRESH: [&str; 6] = [
    "fresh-1", "fresh-2", "fresh-3", "fresh-4", "fresh-5", "fresh-6",
];
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

fn loadgen() -> PathBuf {
    let path = target_profile_dir().join("mesh-loadgen");
    assert!(
        path.exists(),
        "build the test binaries first: {}",
        path.display()
    );
    path
}

/// Polls `done` every 20 ms for up to 30 s (a generous bound against a hung process, not a
/// measurement).
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Three nodes, an agent on each in etcd mode, HTTP servers on nodes B and C. Fields drop in
/// order: processes first, then cgroups, the signer, etcd, files, and the namespaces last.
struct Cluster {
    agents: Vec<AgentProcess>,
    _servers: Vec<(KillOnDrop, std::process::ChildStdout)>,
    /// Each node's cgroup tree and its workload's cgroup.
    trees: Vec<(CgroupTree, PathBuf)>,
    /// The cgroups of [`FRESH`] on node A.
    fresh: Vec<PathBuf>,
    signer: SignerProcess,
    etcd: EtcdServer,
    work: TempDir,
    network: Network,
}

impl Cluster {
    fn start(label: &str) -> Self {
        let network = Network::create(label, 3).expect("create the network");
        let work = TempDir::new(label).expect("temporary folder");
        let switch = network.switch();
        let etcd = EtcdServer::start_in(&switch).expect("start etcd in the switch namespace");
        // In the switch's namespace, where etcd is.
        let certificate_ttl = format!("{CERTIFICATE_TTL_SECONDS}s");
        let signer = SignerProcess::start(
            &etcd,
            SignerOptions {
                trust_domain: TRUST_DOMAIN,
                certificate_ttl: &certificate_ttl,
                extra: &[],
                namespace: Some(&switch),
            },
        )
        .expect("start the signer");

        // An HTTP server on nodes B and C (on their own addresses), in their namespaces.
        let mut servers = Vec::new();
        for index in [B, C] {
            let node = network.node(index);
            let mut child = node
                .command(&loadgen().to_string_lossy())
                .args([
                    "http-server",
                    "--listen",
                    &format!("{}:{HTTP_PORT}", node.address),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start an HTTP server");
            let mut stdout = child.stdout.take().unwrap();
            let lines = read_lines_until(&mut stdout, |line| line.starts_with("listening"));
            assert!(
                lines.iter().any(|line| line.starts_with("listening")),
                "the HTTP server did not start: {lines:?}"
            );
            servers.push((KillOnDrop(child), stdout));
        }

        // No localCa (refused with etcd), no spec.tunnel.peers: peers come from node records.
        let identity = format!("  identity:\n    trustDomain: {TRUST_DOMAIN}\n");
        let mut trees = Vec::new();
        let mut agents = Vec::new();
        let mut fresh = Vec::new();
        for (index, node) in network.nodes().iter().enumerate() {
            let tree = CgroupTree::create(&format!("{label}-{index}")).unwrap();
            let workload = tree.child(WORKLOADS[index]).unwrap();
            let mut workloads = vec![(WORKLOADS[index].to_owned(), workload.clone())];
            if index == A {
                for name in FRESH {
                    let cgroup = tree.child(name).unwrap();
                    workloads.push((name.to_owned(), cgroup.clone()));
                    fresh.push(cgroup);
                }
            }
            let dir = work.0.join(NODES[index]);
            fs::create_dir_all(&dir).unwrap();
            let agent = AgentProcess::start_node_with_etcd(
                &tree,
                AgentOptions {
                    accelerate: false,
                    l7: true,
                    workloads,
                    exclude_ports: vec![],
                    exclude_cidrs: vec![],
                    agent_cgroup: tree.child("agent").unwrap(),
                    log_filter: "info,mesh_agent=debug".into(),
                    agent_binary: std::env::var_os("MESH_E2E_AGENT_BINARY").map(PathBuf::from),
                    policy_dir: None,
                },
                NodeLaunch {
                    name: NODES[index].into(),
                    tunnel: std::net::SocketAddr::new(node.address.into(), TUNNEL_PORT),
                    launcher: node.launcher(),
                },
                AgentEtcd::new(&etcd, &dir),
                &identity,
            )
            .unwrap_or_else(|error| panic!("start {}'s agent: {error}", NODES[index]));
            agents.push(agent);
            trees.push((tree, workload));
        }
        Cluster {
            agents,
            _servers: servers,
            trees,
            fresh,
            signer,
            etcd,
            work,
            network,
        }
    }

    fn node(&self, index: usize) -> &NetNode {
        self.network.node(index)
    }

    /// `meshctl apply -f` of `yaml`; fails the test unless it succeeds.
    fn apply(&self, name: &str, yaml: &str) -> String {
        let path = self.work.0.join(name);
        fs::write(&path, yaml).unwrap();
        let output = self
            .etcd
            .meshctl(&["apply", "-f", &path.to_string_lossy()])
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "meshctl apply: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// curl as node `index`'s workload, in its namespace and cgroup: (status, body).
    fn curl(&self, index: usize, url: &str) -> (u16, String) {
        self.curl_in(index, &self.trees[index].1, url)
    }

    /// curl in node `index`'s namespace and the workload cgroup `cgroup`: (status, body).
    fn curl_in(&self, index: usize, cgroup: &Path, url: &str) -> (u16, String) {
        let tree = &self.trees[index].0;
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.node(index).path().display()))
            .args(["--", "/usr/bin/curl", "-sS", "--max-time", "20"])
            .args(["-o", "-", "-w", "\n%{http_code}", url]);
        let output = tree.run_in(cgroup, &mut command).expect("run curl");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        (
            status.trim().parse().unwrap_or_else(|_| {
                panic!(
                    "curl printed no status: {text} {}",
                    String::from_utf8_lossy(&output.stderr)
                )
            }),
            body.to_owned(),
        )
    }

    /// `mesh-loadgen <args>` as node `index`'s workload, parsed.
    fn loadgen(&self, index: usize, args: &[&str]) -> Value {
        let (tree, cgroup) = &self.trees[index];
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.node(index).path().display()))
            .arg("--")
            .arg(loadgen())
            .args(args);
        let output = tree.run_in(cgroup, &mut command).expect("run mesh-loadgen");
        let text = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(text.trim()).unwrap_or_else(|error| {
            panic!(
                "mesh-loadgen: {error}: {text} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    /// `GET path` on node `index`'s admin endpoint (loopback of its namespace): the body.
    fn admin(&self, index: usize, path: &str) -> String {
        admin_in(self.node(index), self.agents[index].admin_port, path)
    }

    /// A metric's value on node `index` (the line `name value`, labels included in `name`).
    fn metric(&self, index: usize, name: &str) -> f64 {
        let metrics = self.admin(index, "/metrics");
        metric_value(&metrics, name).unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    }

    /// The sum of every series whose line starts with `prefix` on node `index`.
    fn metric_sum(&self, index: usize, prefix: &str) -> f64 {
        self.admin(index, "/metrics")
            .lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// Certificates issued so far for `identity` on node `index` (0 before the first).
    fn issued(&self, index: usize, identity: &str) -> f64 {
        let metrics = self.admin(index, "/metrics");
        metric_value(
            &metrics,
            &format!("mesh_identity_certificates_issued_total{{identity=\"{identity}\"}}"),
        )
        .unwrap_or(0.0)
    }

    fn log(&self, index: usize) -> String {
        self.agents[index].log()
    }
}

fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
    })
}

/// The content hash of the node's active policy snapshot (`mesh_policy_resources{hash}`).
fn policy_hash(metrics: &str) -> Option<String> {
    metrics.lines().find_map(|line| {
        line.strip_prefix("mesh_policy_resources{hash=\"")
            .and_then(|rest| rest.split_once('"'))
            .map(|(hash, _)| hash.to_owned())
    })
}

/// `GET path` on `127.0.0.1:port` from inside `node`'s namespace: the body.
fn admin_in(node: &NetNode, port: u16, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    let response = node
        .run_in(move || {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("admin endpoint");
            stream.write_all(request.as_bytes()).expect("admin request");
            let mut text = String::new();
            stream.read_to_string(&mut text).expect("admin response");
            text
        })
        .expect("enter the node's namespace")
        .join()
        .expect("admin thread")
        .expect("joined the namespace");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {response}");
    body.to_owned()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The registry: each workload's identity placed on its node (the signer issues
/// `/agent/<name>` only to the node the registry places it on), and `web-b` / `web-c`, the
/// HTTP servers of nodes B and C.
fn registry(cluster: &Cluster) -> String {
    let mut yaml = String::new();
    let agent = |name: &str, address: String, node: &str| {
        format!(
            "---\napiVersion: mesh.agentmesh.dev/v1alpha1\nkind: Agent\nmetadata: {{name: {name}}}\nspec:\n  endpoints: [{{address: \"{address}\", node: {node}}}]\n"
        )
    };
    for index in [A, B, C] {
        yaml.push_str(&agent(
            WORKLOADS[index],
            format!("{}:8081", cluster.node(index).address),
            NODES[index],
        ));
    }
    for (name, index) in [("web-b", B), ("web-c", C)] {
        yaml.push_str(&agent(
            name,
            format!("{}:{HTTP_PORT}", cluster.node(index).address),
            NODES[index],
        ));
    }
    for (offset, name) in FRESH.iter().enumerate() {
        yaml.push_str(&agent(
            name,
            format!("{}:{}", cluster.node(A).address, 8100 + offset),
            NODES[A],
        ));
    }
    yaml
}

/// `web-c` admits `alpha` only.
const WEB_C_POLICY: &str = r#"apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: web-c-access}
spec:
  targetAgent: web-c
  action: Allow
  rules: [{from: [alpha]}]
"#;

#[test]
fn three_nodes_in_etcd_mode_share_resources_peers_and_identities() {
    let started = Instant::now();
    let cluster = Cluster::start("cluster");
    let setup = started.elapsed();
    let (td, a_id) = (TRUST_DOMAIN, format!("spiffe://{TRUST_DOMAIN}/agent/alpha"));

    // Every node published its record with its tunnel address, and got its node certificate
    // from the signer.
    for index in [A, B, C] {
        let record = cluster
            .etcd
            .etcdctl(&[
                "get",
                &format!("/mesh/v1/nodes/{}", NODES[index]),
                "--print-value-only",
            ])
            .unwrap();
        let record: Value = serde_json::from_str(record.trim())
            .unwrap_or_else(|error| panic!("node record of {}: {error}: {record}", NODES[index]));
        assert_eq!(
            record["status"]["tunnelAddress"],
            format!("{}:{TUNNEL_PORT}", cluster.node(index).address),
            "{record}"
        );
        let node_id = format!("spiffe://{td}/node/{}", NODES[index]);
        assert_eq!(
            cluster.issued(index, &node_id),
            1.0,
            "{}",
            cluster.log(index)
        );
    }
    let nodes = cluster.etcd.meshctl(&["nodes"]).unwrap();
    let nodes = String::from_utf8_lossy(&nodes.stdout);
    assert_eq!(nodes.matches("Ready").count(), 3, "{nodes}");

    // The registry, applied once; every node serves it.
    let hashes: Vec<Option<String>> = [A, B, C]
        .iter()
        .map(|&index| policy_hash(&cluster.admin(index, "/metrics")))
        .collect();
    let applied = cluster.apply("registry.yaml", &registry(&cluster));
    assert_eq!(
        applied.matches("created").count(),
        5 + FRESH.len(),
        "{applied}"
    );
    for index in [A, B, C] {
        wait_for("the registry on every node", || {
            policy_hash(&cluster.admin(index, "/metrics")) != hashes[index]
        });
    }

    // 1. alpha on node A calls web-b on node B: through A's agent, the tunnel (B's address
    // from its node record: no static peers), and B's agent. A capture on node A's interface
    // sees TLS to the tunnel port, neither the request nor the answer in the clear, and
    // nothing to the server's port.
    let capture_path = cluster.work.0.join("node-a.pcap");
    let capture = PacketCapture::start(cluster.node(A), &capture_path).expect("tcpdump");
    let secret = format!("secret-{}", unique_name("marker"));
    let web_b = format!("http://{}:{HTTP_PORT}", cluster.node(B).address);
    let (status, body) = cluster.curl(A, &format!("{web_b}/{secret}"));
    assert_eq!(
        status,
        200,
        "{body}\n{}\n{}",
        cluster.log(A),
        cluster.log(B)
    );
    assert!(body.contains(HTTP_GET_BODY), "{body}");
    let bytes = capture.finish().expect("stop tcpdump");
    assert!(!contains(&bytes, secret.as_bytes()), "plaintext request");
    assert!(
        !contains(&bytes, HTTP_GET_BODY.as_bytes()),
        "plaintext answer"
    );
    assert!(
        contains(&bytes, &[0x17, 0x03, 0x03]),
        "no TLS records seen in {} bytes: {:?}",
        bytes.len(),
        PacketCapture::packets(&capture_path, "tcp")
    );
    let b_address = cluster.node(B).address;
    let tunnel = PacketCapture::packets(
        &capture_path,
        &format!("host {b_address} and tcp port {TUNNEL_PORT}"),
    )
    .unwrap();
    assert!(!tunnel.is_empty(), "no packets to node B's tunnel port");
    let direct = PacketCapture::packets(
        &capture_path,
        &format!("host {b_address} and tcp port {HTTP_PORT}"),
    )
    .unwrap();
    assert!(direct.is_empty(), "web-b was reached directly: {direct:?}");
    assert_eq!(
        cluster.metric(A, "mesh_tunnel_client_connections_total"),
        1.0
    );
    assert!(cluster.metric(A, "mesh_tunnel_client_streams_total") >= 1.0);
    assert!(cluster.metric(B, "mesh_tunnel_server_streams_total") >= 1.0);
    assert_eq!(
        cluster.metric(B, "mesh_tunnel_server_denied_streams_total"),
        0.0
    );
    // No static peer: A found B's tunnel in etcd.
    assert!(
        !fs::read_to_string(&cluster.agents[A].config_path)
            .unwrap()
            .contains("peers"),
        "the test must not configure static peers"
    );

    // 4. The identity the signer issued for alpha (requested by node A) is the one node B
    // saw on the tunnel stream.
    let identities: Vec<Value> =
        serde_json::from_str(&cluster.admin(A, "/identity")).expect("/identity is JSON");
    let alpha = identities
        .iter()
        .find(|entry| entry["identity"] == a_id.as_str())
        .unwrap_or_else(|| panic!("no {a_id} in node A's /identity: {identities:?}"));
    // The certificate node A holds for alpha is one the signer issued to node A's request.
    let serial = alpha["serial"].as_str().expect("a serial");
    let signer_log = cluster.signer.log();
    assert!(
        mesh_tests::has_line_with(
            &signer_log,
            &[
                "certificate issued",
                &format!("identity={a_id} "),
                "node=node-a ",
                &format!("serial={serial} "),
            ]
        ),
        "{signer_log}"
    );
    let log_b = cluster.log(B);
    assert!(
        mesh_tests::has_line_with(
            &log_b,
            &[
                "tunnel stream accepted",
                &format!("source={a_id}"),
                "agent=web-b"
            ]
        ),
        "node B did not name alpha's identity: {log_b}"
    );
    println!("alpha's first certificate: {alpha}");

    // 3. Certificates rotate under load: two certificate lifetimes and more of requests from
    // alpha (node A) to web-b (node B), a new connection per curl, plus keep-alive requests on
    // two connections; not one may fail.
    let rotation = Duration::from_secs(2 * CERTIFICATE_TTL_SECONDS + 2);
    let a_node_id = format!("spiffe://{td}/node/node-a");
    let b_node_id = format!("spiffe://{td}/node/node-b");
    let connections_before = (
        cluster.metric(A, "mesh_tunnel_client_connections_total"),
        cluster.metric(B, "mesh_tunnel_server_connections_total"),
        cluster.metric(A, "mesh_tunnel_client_connections_retired_total"),
    );
    let before = [
        cluster.issued(A, &a_id),
        cluster.issued(A, &a_node_id),
        cluster.issued(B, &b_node_id),
    ];
    let rotation_started = Instant::now();
    let rotation_wall_clock = time::OffsetDateTime::now_utc();
    let (keepalive, curls) = std::thread::scope(|scope| {
        let keepalive = scope.spawn(|| {
            cluster.loadgen(
                A,
                &[
                    "http",
                    "--to",
                    &format!("{b_address}:{HTTP_PORT}"),
                    "--connections",
                    "2",
                    "--duration-ms",
                    &rotation.as_millis().to_string(),
                    "--warmup",
                    "10",
                    "--rate",
                    "200",
                    "--expect-body",
                    HTTP_GET_BODY,
                ],
            )
        });
        // Mostly alpha; the fresh workloads' first calls spread evenly over the rotation.
        let slot = rotation / u32::try_from(FRESH.len() + 1).unwrap();
        // (status, body, started at, took)
        let mut curls: Vec<(u16, String, Duration, Duration)> = Vec::new();
        let mut fresh_calls: Vec<(&str, Duration, u16, String)> = Vec::new();
        while rotation_started.elapsed() < rotation {
            let elapsed = rotation_started.elapsed();
            let due = usize::try_from(elapsed.as_millis() / slot.as_millis()).unwrap();
            if fresh_calls.len() < due.min(FRESH.len()) {
                let next = fresh_calls.len();
                let (status, body) =
                    cluster.curl_in(A, &cluster.fresh[next], &format!("{web_b}/fresh"));
                fresh_calls.push((FRESH[next], elapsed, status, body));
            } else {
                let (status, body) = cluster.curl(A, &format!("{web_b}/rotation"));
                curls.push((status, body, elapsed, rotation_started.elapsed() - elapsed));
            }
        }
        (keepalive.join().unwrap(), (curls, fresh_calls))
    });
    let (curls, fresh_calls) = curls;
    let after = [
        cluster.issued(A, &a_id),
        cluster.issued(A, &a_node_id),
        cluster.issued(B, &b_node_id),
    ];
    let failed: Vec<&(u16, String, Duration, Duration)> = curls
        .iter()
        .filter(|(status, body, ..)| *status != 200 || !body.contains(HTTP_GET_BODY))
        .collect();
    let mut slowest: Vec<(Duration, Duration)> =
        curls.iter().map(|(_, _, at, took)| (*took, *at)).collect();
    slowest.sort();
    println!(
        "slowest curls (took, started at UTC): {:?}",
        slowest
            .iter()
            .rev()
            .take(3)
            .map(|(took, at)| {
                let when = rotation_wall_clock + *at;
                format!(
                    "{took:.1?} at {:02}:{:02}:{:02}.{:03}",
                    when.hour(),
                    when.minute(),
                    when.second(),
                    when.millisecond()
                )
            })
            .collect::<Vec<_>>()
    );
    println!(
        "rotation: {} curl requests (new connections), keep-alive load {keepalive}, over {:?} \
         with a {CERTIFICATE_TTL_SECONDS} s certificate lifetime; certificates issued meanwhile: \
         alpha {} -> {}, node-a {} -> {}, node-b {} -> {}",
        curls.len(),
        rotation_started.elapsed(),
        before[0],
        after[0],
        before[1],
        after[1],
        before[2],
        after[2],
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    println!(
        "fresh source identities (new certificate, new tunnel handshake) at {:?}",
        fresh_calls
            .iter()
            .map(|(name, at, _, _)| format!("{name} {at:.1?}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(fresh_calls.len(), FRESH.len());
    for (name, _, status, body) in &fresh_calls {
        assert!(
            *status == 200 && body.contains(HTTP_GET_BODY),
            "{name}: {status} {body}\n{}",
            cluster.log(A)
        );
    }
    // Each fresh identity made its own tunnel connection, handshaken with certificates of the
    // moment (node B's own renewed meanwhile); and each renewal of alpha's certificate retired
    // alpha's pooled connection: later streams went on a new connection made with the new
    // certificate while those under way finished on the old one. Nothing else reconnected,
    // and no request failed.
    let retired =
        cluster.metric(A, "mesh_tunnel_client_connections_retired_total") - connections_before.2;
    println!("tunnel connections retired during the rotation: {retired}");
    assert!(
        retired >= 1.0,
        "no connection was retired: {}",
        cluster.log(A)
    );
    assert_eq!(
        cluster.metric(A, "mesh_tunnel_client_connections_total") - connections_before.0,
        FRESH.len() as f64 + retired
    );
    assert_eq!(
        cluster.metric(B, "mesh_tunnel_server_connections_total") - connections_before.1,
        FRESH.len() as f64 + retired
    );
    // Node B saw alpha's renewed certificates on new connections (the serials its tunnel
    // accepted), and closed none for an expired certificate: the pool had moved on.
    let serials: Vec<String> = cluster
        .log(B)
        .lines()
        .filter(|line| {
            line.contains("tunnel connection accepted") && line.contains(&format!("caller={a_id} "))
        })
        .filter_map(|line| {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix("serial="))
                .map(str::to_owned)
        })
        .collect();
    let mut distinct = serials.clone();
    distinct.dedup();
    println!("alpha's certificate serials seen by node B, in order: {distinct:?}");
    assert!(distinct.len() >= 2, "{serials:?}");
    // The pool moved alpha on before its certificates expired: node B closed none of alpha's
    // connections for an expired certificate (only idle connections of identities used once).
    println!(
        "connections node B closed at their caller's certificate expiry (idle, of identities \
         used once): {}",
        cluster.metric(B, "mesh_tunnel_server_connections_expired_total")
    );
    assert!(
        !mesh_tests::has_line_with(
            &cluster.log(B),
            &["caller's certificate", &format!("caller={a_id} ")]
        ),
        "node B closed a connection of alpha at expiry"
    );
    assert_eq!(
        cluster.metric(A, "mesh_tunnel_client_connect_failures_total"),
        0.0
    );
    assert_eq!(
        cluster.metric(B, "mesh_tunnel_server_handshake_failures_total"),
        0.0
    );
    for name in FRESH {
        let id = format!("spiffe://{td}/agent/{name}");
        assert!(
            mesh_tests::has_line_with(
                &cluster.log(B),
                &["tunnel stream accepted", &format!("source={id} ")]
            ),
            "node B never saw {id}"
        );
    }
    assert!(keepalive.get("error").is_none(), "{keepalive}");
    assert!(
        keepalive["requests"].as_u64().unwrap_or(0) > 0,
        "{keepalive}"
    );
    assert!(!curls.is_empty());
    for (identity, (before, after)) in [&a_id, &a_node_id, &b_node_id]
        .iter()
        .zip(before.iter().zip(after.iter()))
    {
        // Two lifetimes at renewal by half-life: at least two renewals each.
        assert!(
            after - before >= 2.0,
            "{identity} was not renewed: {before} -> {after}\n{}",
            cluster.signer.log()
        );
    }
    for index in [A, B, C] {
        assert_eq!(
            cluster.metric_sum(index, "mesh_identity_issuance_failures_total{"),
            0.0,
            "{}",
            cluster.log(index)
        );
    }

    // 2. One policy, applied once, enforced on every node without a restart. Before it, bravo
    // (node B) and charlie (node C) may call web-c (node C).
    let web_c = format!("http://{}:{HTTP_PORT}/", cluster.node(C).address);
    for index in [B, C] {
        let (status, body) = cluster.curl(index, &web_c);
        assert_eq!(
            status, 200,
            "{} before the policy: {body}",
            WORKLOADS[index]
        );
    }
    let pids: Vec<Option<u32>> = cluster.agents.iter().map(AgentProcess::pid).collect();
    let hashes: Vec<Option<String>> = [A, B, C]
        .iter()
        .map(|&index| policy_hash(&cluster.admin(index, "/metrics")))
        .collect();
    let applied_at = Instant::now();
    let applied = cluster.apply("policy.yaml", WEB_C_POLICY);
    let apply_took = applied_at.elapsed();
    assert!(applied.contains("created"), "{applied}");
    // Each node's new snapshot, watched from inside its namespace (every 2 ms).
    let enforced: Vec<Duration> = std::thread::scope(|scope| {
        let watchers: Vec<_> = [A, B, C]
            .iter()
            .map(|&index| {
                let (node, port, before) = (
                    cluster.node(index).clone(),
                    cluster.agents[index].admin_port,
                    hashes[index].clone(),
                );
                scope.spawn(move || {
                    loop {
                        let metrics = admin_in(&node, port, "/metrics");
                        if policy_hash(&metrics) != before {
                            return applied_at.elapsed();
                        }
                        assert!(
                            applied_at.elapsed() < Duration::from_secs(30),
                            "{} never swapped its snapshot",
                            node.name
                        );
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        watchers
            .into_iter()
            .map(|watcher| watcher.join().unwrap())
            .collect()
    });
    println!(
        "meshctl apply -> enforcement (new snapshot): meshctl returned after {apply_took:?}; \
         node-a {:?}, node-b {:?}, node-c {:?}",
        enforced[A], enforced[B], enforced[C]
    );
    // bravo is refused by its own node (L7, node B), charlie by node C; alpha is let through
    // node C's tunnel on its identity. alpha's tunnel to node C is a new handshake, made
    // with certificates renewed during the rotation above.
    let (status, body) = cluster.curl(B, &web_c);
    assert_eq!(status, 403, "bravo after the policy: {body}");
    assert!(body.contains("bravo"), "{body}");
    let (status, body) = cluster.curl(C, &web_c);
    assert_eq!(status, 403, "charlie after the policy: {body}");
    let (status, body) = cluster.curl(A, &web_c);
    assert_eq!(
        status,
        200,
        "alpha after the policy: {body}\n{}",
        cluster.log(C)
    );
    assert!(body.contains(HTTP_GET_BODY), "{body}");
    let log_c = cluster.log(C);
    assert!(
        mesh_tests::has_line_with(
            &log_c,
            &[
                "tunnel stream accepted",
                &format!("source={a_id}"),
                "agent=web-c"
            ]
        ),
        "node C did not admit alpha by its identity: {log_c}"
    );
    assert_eq!(
        cluster.metric(C, "mesh_tunnel_server_denied_streams_total"),
        0.0
    );
    assert_eq!(
        cluster.metric(C, "mesh_tunnel_server_handshake_failures_total"),
        0.0
    );
    assert_eq!(
        cluster.metric(B, "mesh_tunnel_server_handshake_failures_total"),
        0.0
    );
    println!(
        "tunnel connections: node-a made {}, node-b accepted {}, node-c accepted {}",
        cluster.metric(A, "mesh_tunnel_client_connections_total"),
        cluster.metric(B, "mesh_tunnel_server_connections_total"),
        cluster.metric(C, "mesh_tunnel_server_connections_total")
    );
    let log_b = cluster.log(B);
    assert!(
        log_b.contains("no AccessPolicy rule allows bravo to call web-c"),
        "{log_b}"
    );
    // No agent restarted.
    let pids_after: Vec<Option<u32>> = cluster.agents.iter().map(AgentProcess::pid).collect();
    assert_eq!(pids, pids_after);
    for index in [A, B, C] {
        assert_eq!(
            cluster.log(index).matches("agent running").count(),
            1,
            "{} restarted",
            NODES[index]
        );
    }
    println!("set-up {setup:?}, whole test {:?}", started.elapsed());
}
