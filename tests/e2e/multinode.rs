//! Two nodes on one machine: network namespaces `node-a` and `node-b` on a bridge, a real
//! `mesh-agent` in each (its own cgroup tree, pins, policy folder; identities from one local
//! CA folder), workloads served in node B's namespace. A captured workload on node A calls
//! agents whose endpoints are registered on node B: the call goes through node A's agent and
//! the mutual-TLS tunnel to node B's agent, which checks its own policy and delivers. A packet
//! capture on node A's interface shows TLS records to the tunnel port and never the payload.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
};

use mesh_tests::{
    AgentProcess, KillOnDrop,
    netns::{NetNode, PacketCapture},
    python_script,
    two_nodes::{Binaries, HTTP_GET_BODY, HTTP_PORT, RR_PORT, TUNNEL_PORT, TwoNodes, parse_report},
    unique_name, wait_for_port,
};

/// curl as the client workload on node A: (status, body).
fn curl(nodes: &TwoNodes, args: &[&str]) -> (u16, String) {
    let mut all = vec!["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let output = nodes
        .run_client(Path::new("/usr/bin/curl"), &all)
        .expect("run curl as the client workload");
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

fn loadgen() -> PathBuf {
    Binaries::of_this_build().loadgen
}

fn metric(agent: &AgentProcess, node: &NetNode, name: &str) -> f64 {
    TwoNodes::metric(agent, node, name).expect("read a metric")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[test]
fn a_workload_on_node_a_reaches_an_agent_on_node_b_only_through_the_tunnel() {
    let nodes = TwoNodes::start("multinode", "client").expect("start two nodes");
    let capture_path = nodes.work.0.join("node-a.pcap");
    let capture = PacketCapture::start(nodes.node_a(), &capture_path).expect("tcpdump");
    let secret = format!("secret-{}", unique_name("marker"));
    let url = format!("http://{}:{HTTP_PORT}/{secret}", nodes.node_b().address);

    // L7: HTTP/1.1 through node A's proxy, the tunnel, node B's agent.
    let header = format!("x-secret: {secret}");
    let (status, body) = curl(&nodes, &["-H", &header, &url]);
    assert_eq!(status, 200, "{body}\n{}\n{}", nodes.a.log(), nodes.b.log());
    assert!(body.contains(HTTP_GET_BODY), "{body}");

    // Opaque TCP: request/response echo through the same tunnel.
    let rr = nodes
        .loadgen_through_mesh(&[
            "rr",
            "--to",
            &format!("{}:{RR_PORT}", nodes.node_b().address),
            "--duration-ms",
            "300",
            "--warmup",
            "10",
        ])
        .expect("mesh-loadgen");
    assert!(rr["samples"].as_u64().unwrap_or(0) > 0, "{rr}");

    let bytes = capture.finish().expect("stop tcpdump");
    assert!(
        !contains(&bytes, secret.as_bytes()),
        "the payload crossed the wire in plaintext"
    );
    assert!(
        !contains(&bytes, HTTP_GET_BODY.as_bytes()),
        "the response crossed the wire in plaintext"
    );
    // TLS 1.3 application-data records, on the tunnel port only.
    assert!(contains(&bytes, &[0x17, 0x03, 0x03]), "no TLS records seen");
    let tunnel = PacketCapture::packets(&capture_path, &format!("tcp port {TUNNEL_PORT}")).unwrap();
    assert!(!tunnel.is_empty(), "no packets to the tunnel port");
    let direct = PacketCapture::packets(
        &capture_path,
        &format!("tcp port {HTTP_PORT} or tcp port {RR_PORT}"),
    )
    .unwrap();
    assert!(
        direct.is_empty(),
        "a workload port was reached directly: {direct:?}"
    );

    // One pooled tunnel connection (source `client`, node B) carried every stream.
    let (a, b) = (nodes.node_a(), nodes.node_b());
    assert_eq!(
        metric(&nodes.a, a, "mesh_tunnel_client_connections_total"),
        1.0
    );
    assert!(metric(&nodes.b, b, "mesh_tunnel_server_streams_total") >= 2.0);
    assert_eq!(
        metric(&nodes.b, b, "mesh_tunnel_server_denied_streams_total"),
        0.0
    );
    assert!(
        nodes.b.log().contains("spiffe://mesh.e2e/agent/client"),
        "node B saw the caller's identity: {}",
        nodes.b.log()
    );
}

#[test]
fn node_b_refuses_a_caller_its_own_policy_denies() {
    // Node A allows everything; node B allows only `planner`.
    let nodes = TwoNodes::start("multinode-deny", "planner").expect("start two nodes");
    let url = format!("http://{}:{HTTP_PORT}/", nodes.node_b().address);
    let (status, body) = curl(&nodes, &[&url]);
    // Node A passes node B's refusal on as a 403 naming node B and its reason.
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("node node-b refused") && body.contains("no AccessPolicy rule allows client"),
        "{body}"
    );
    let log_b = nodes.b.log();
    assert!(log_b.contains("tunnel stream denied"), "{log_b}");
    assert!(
        log_b.contains("no AccessPolicy rule allows client to call web"),
        "{log_b}"
    );
    let b = nodes.node_b();
    assert!(metric(&nodes.b, b, "mesh_tunnel_server_denied_streams_total") >= 1.0);
    assert_eq!(
        metric(&nodes.b, b, "mesh_tunnel_server_streams_active"),
        0.0
    );
    // Opaque TCP is refused the same way: the connection is reset, nothing is echoed.
    let output = nodes
        .run_client(
            &loadgen(),
            &[
                "rr",
                "--to",
                &format!("{}:{RR_PORT}", nodes.node_b().address),
                "--duration-ms",
                "100",
                "--warmup",
                "1",
            ],
        )
        .expect("run the client workload");
    assert!(
        !output.status.success() || String::from_utf8_lossy(&output.stdout).contains("error"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// The same load through the tunnel and over plain TCP between the two namespaces; prints
/// the numbers (latency and throughput), asserts only that every run completed. For numbers
/// worth quoting, run it with `MESH_E2E_AGENT_BINARY=target/release/mesh-agent` and
/// `--no-capture`.
#[test]
fn tunnel_and_plain_tcp_carry_the_same_load() {
    let nodes = TwoNodes::start("multinode-load", "client").expect("start two nodes");
    let to = format!("{}:{RR_PORT}", nodes.node_b().address);
    let rr = [
        "rr",
        "--to",
        &to,
        "--duration-ms",
        "2000",
        "--warmup",
        "100",
    ];
    let bulk = ["bulk", "--to", &to, "--duration-ms", "2000"];
    let connect = ["connect", "--to", &to, "--count", "300"];
    let web = format!("{}:{HTTP_PORT}", nodes.node_b().address);
    let http = [
        "http",
        "--to",
        &web,
        "--duration-ms",
        "2000",
        "--expect-body",
        HTTP_GET_BODY,
    ];
    let mut report = serde_json::Map::new();
    for (name, args) in [
        ("rr", &rr[..]),
        ("bulk", &bulk[..]),
        ("connect", &connect[..]),
        ("http", &http[..]),
    ] {
        let tunnel = nodes.loadgen_through_mesh(args).expect("mesh-loadgen");
        let plain = nodes.loadgen_plain(args).expect("mesh-loadgen");
        assert!(
            tunnel.get("error").is_none(),
            "{name} through the tunnel: {tunnel}"
        );
        assert!(
            plain.get("error").is_none(),
            "{name} over plain TCP: {plain}"
        );
        report.insert(
            name.to_owned(),
            serde_json::json!({ "tunnel": tunnel, "plain": plain }),
        );
    }
    println!(
        "tunnel vs plain TCP between two namespaces:\n{}",
        serde_json::to_string_pretty(&report).unwrap()
    );
}

/// The gRPC echo service, listening on node B's loopback only: registered on node B, it is
/// reachable from node A through the tunnel and nowhere else.
const GRPC_AGENT: &str = r#"---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata: {name: grpc}
spec:
  endpoints: [{address: "127.0.0.1:50051", node: node-b}]
  protocol: Grpc
"#;

/// Node A's own policy forbids one method (decided at node A, at L7).
const GRPC_DENY: &str = r#"---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: no-forbidden-method}
spec:
  targetAgent: grpc
  action: Deny
  rules:
    - from: ["*"]
      http:
        paths: ["/echo.Echo/Forbidden"]
"#;

#[test]
fn grpc_streams_cross_nodes_through_the_tunnel_to_a_loopback_only_server() {
    // Both nodes get the Deny rule (one mesh, one set of resources); it has an L7 condition,
    // so node A decides it per call and node B does not refuse the stream for it.
    let nodes = TwoNodes::start_with(
        "multinode-grpc",
        "client",
        |_| format!("{GRPC_AGENT}{GRPC_DENY}"),
        Binaries::of_this_build(),
    )
    .expect("start two nodes");
    let (python, script) = python_script("grpc_echo_server.py").expect("test virtualenv");
    let server = nodes
        .node_b()
        .command(&python.to_string_lossy())
        .arg(&script)
        .arg("50051")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the gRPC server on node B");
    let _server = KillOnDrop(server);
    nodes
        .node_b()
        .run_in(|| {
            wait_for_port(
                SocketAddr::from(([127, 0, 0, 1], 50051)),
                std::time::Duration::from_secs(30),
            )
        })
        .unwrap()
        .join()
        .unwrap()
        .unwrap()
        .expect("the gRPC server listens on node B");

    let (python, probe) = python_script("grpc_probe.py").expect("test virtualenv");
    let output = nodes
        .run_client(&python, &[&probe.to_string_lossy(), "127.0.0.1:50051", "1"])
        .expect("run the client workload");
    let report = parse_report(&output).expect("a mesh-loadgen report");
    assert_eq!(report["say"]["response"], "echo:hello", "{report}");
    assert_eq!(
        report["say"]["trailers"]["x-echo-trailer"], "done",
        "{report}"
    );
    assert_eq!(report["count"]["code"], "OK", "{report}");
    assert_eq!(
        report["count"]["messages"].as_array().map(Vec::len),
        Some(100),
        "{report}"
    );
    assert_eq!(report["chat"]["code"], "OK", "{report}");
    assert_eq!(
        report["chat"]["messages"].as_array().map(Vec::len),
        Some(50),
        "{report}"
    );
    assert_eq!(report["forbidden"]["code"], "PERMISSION_DENIED", "{report}");
    // Every call rode one HTTP/2 connection to the server, over one tunnel stream.
    assert_eq!(
        metric(&nodes.b, nodes.node_b(), "mesh_tunnel_server_streams_total"),
        1.0
    );
}

/// A server-first service (it greets before the client says anything), on node B.
const BANNER_AGENT: &str = r#"---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata: {name: banner}
spec:
  endpoints: [{address: "BANNER_ADDRESS", node: node-b}]
"#;

#[test]
fn a_server_first_protocol_works_across_nodes() {
    let nodes = TwoNodes::start_with(
        "multinode-banner",
        "client",
        |b| BANNER_AGENT.replace("BANNER_ADDRESS", &format!("{}:7070", b.address)),
        Binaries::of_this_build(),
    )
    .expect("start two nodes");
    let target = SocketAddr::new(nodes.node_b().address.into(), 7070);
    // The server greets first, then echoes one line.
    let server = nodes
        .node_b()
        .run_in(move || {
            let listener = std::net::TcpListener::bind(target).expect("bind on node B");
            let (mut stream, _) = listener.accept().expect("accept");
            stream.write_all(b"220 banner ready\n").expect("greet");
            let mut line = [0u8; 6];
            stream
                .read_exact(&mut line)
                .expect("read the client's line");
            stream.write_all(&line).expect("echo");
            line
        })
        .unwrap();
    let script = mesh_tests::banner_client_script(target, "hello\n");
    let output = nodes
        .run_client(Path::new("/usr/bin/python3"), &["-c", &script])
        .expect("run the client workload");
    let report = parse_report(&output).expect("a mesh-loadgen report");
    assert_eq!(report["banner"], "220 banner ready\n", "{report}");
    assert_eq!(report["echo"], "hello\n", "{report}");
    assert_eq!(server.join().unwrap().unwrap(), *b"hello\n");
    assert!(metric(&nodes.b, nodes.node_b(), "mesh_tunnel_server_streams_total") >= 1.0);
}

/// Node A's own policy: `client` may not reach `banner` at all.
const BANNER_DENY: &str = r#"---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: no-banner}
spec:
  targetAgent: banner
  action: Deny
  rules: [{from: [client]}]
"#;

#[test]
fn a_connection_node_a_denies_never_reaches_node_b() {
    let nodes = TwoNodes::start_with(
        "multinode-local-deny",
        "client",
        |b| BANNER_AGENT.replace("BANNER_ADDRESS", &format!("{}:7070", b.address)) + BANNER_DENY,
        Binaries::of_this_build(),
    )
    .expect("start two nodes");
    let target = SocketAddr::new(nodes.node_b().address.into(), 7070);
    // Silent past the server-first grace (so an early dial would have happened), then speaks.
    let script = format!(
        "import socket,json,time\n\
         s=socket.create_connection(('{}',{}),timeout=20)\n\
         time.sleep(0.2)\n\
         outcome='open'\n\
         try:\n    s.sendall(b'hello\\n')\n    data=s.recv(100)\n    outcome='eof' if not data else 'data'\n\
         except ConnectionResetError:\n    outcome='reset'\n\
         print(json.dumps({{'outcome':outcome}}))\n",
        target.ip(),
        target.port()
    );
    let output = nodes
        .run_client(Path::new("/usr/bin/python3"), &["-c", &script])
        .expect("run the client workload");
    let report = parse_report(&output).expect("a mesh-loadgen report");
    assert_eq!(report["outcome"], "reset", "{report}");
    assert!(
        nodes.a.log().contains("connection denied by policy"),
        "{}",
        nodes.a.log()
    );
    // Nothing went to node B: no tunnel connection, no stream.
    let b = nodes.node_b();
    assert_eq!(
        metric(&nodes.b, b, "mesh_tunnel_server_connections_total"),
        0.0
    );
    assert_eq!(metric(&nodes.b, b, "mesh_tunnel_server_streams_total"), 0.0);
}
