//! End-to-end tests of the L7 path with real peers: a real agent captures a workload's
//! connections in a cgroup the test created; real clients (curl, the Python `mcp` SDK) talk to
//! real servers (the `mcp` SDK's Streamable HTTP server, scripted HTTP servers in this
//! process) through it, under policies written as resource files the agent watches.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    fs,
    io::{BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{free_port, refusing_port};

mod common;
use common::*;

/// What a scripted server answers: the status for the n-th request (0-based).
type Script = Arc<dyn Fn(usize) -> u16 + Send + Sync>;

/// An HTTP/1.1 server in this process that answers by script and records every request line
/// and Host header it saw.
struct ScriptedServer {
    address: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    count: Arc<AtomicUsize>,
}

impl ScriptedServer {
    fn start(script: Script) -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), script)
    }

    fn start_on(address: SocketAddr, script: Script) -> Self {
        let listener = TcpListener::bind(address).expect("bind scripted server");
        let address = listener.local_addr().expect("address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let (recorded, counter) = (Arc::clone(&seen), Arc::clone(&count));
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (recorded, counter, script) = (
                    Arc::clone(&recorded),
                    Arc::clone(&counter),
                    Arc::clone(&script),
                );
                thread::spawn(move || serve_scripted(stream, &recorded, &counter, &*script));
            }
        });
        Self {
            address,
            seen,
            count,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// Serves keep-alive HTTP/1.1 requests with Content-Length bodies.
fn serve_scripted(
    stream: TcpStream,
    recorded: &Mutex<Vec<String>>,
    counter: &AtomicUsize,
    script: &(dyn Fn(usize) -> u16 + Send + Sync),
) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut writer = stream;
    while let Some(request) = read_request(&mut reader) {
        let host = request.header("host").unwrap_or_default();
        let index = counter.fetch_add(1, Ordering::SeqCst);
        let line = &request.line;
        recorded.lock().unwrap().push(format!("{line} host={host}"));
        let status = script(index);
        let reply = format!("{line} via {host} #{index}");
        let response = format!(
            "HTTP/1.1 {status} Scripted\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn always(status: u16) -> Script {
    Arc::new(move |_| status)
}

const MCP_POLICY: &str = "---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: planner-uses-tools
spec:
  targetAgent: tools
  rules:
    - from: [planner]
      mcp:
        tools: [add, search, count_slowly]
    - from: [planner]
      mcp:
        methods: [initialize, \"notifications/*\", tools/list, server/discover, ping]
    - from: [planner]
      http:
        methods: [GET, DELETE]
";

#[test]
fn mcp_sdk_client_calls_tools_through_the_mesh_in_both_protocol_generations() {
    let (_server, address) = start_mcp_server();
    let resources = agent_resource("tools", &["tools.mesh"], address, "Mcp") + MCP_POLICY;
    let mesh = Mesh::start("l7-mcp", &resources);
    let url = format!("http://{address}/mcp");
    for mode in ["legacy", "2026-07-28"] {
        let report = mcp_probe(
            &mesh,
            &url,
            mode,
            &[
                r#"add={"a":2,"b":40}"#,
                r#"count_slowly={"n":3}"#,
                "delete_everything={}",
            ],
        );
        assert_eq!(
            report["tools"],
            serde_json::json!(["add", "count_slowly", "delete_everything", "search"]),
            "{mode}: tools/list went through: {report}"
        );
        let calls = &report["calls"];
        assert_eq!(calls["add"]["ok"], true, "{mode}: {report}");
        assert_eq!(calls["add"]["text"][0], "42", "{mode}: {report}");
        assert_eq!(
            calls["count_slowly"]["progress"],
            serde_json::json!([1.0, 2.0, 3.0]),
            "{mode}: progress notifications streamed through: {report}"
        );
        assert_eq!(calls["delete_everything"]["ok"], false, "{mode}: {report}");
        let refusal = calls["delete_everything"].to_string();
        assert!(
            refusal.contains("forbidden") || refusal.contains("denied"),
            "{mode}: the refusal says why: {refusal}"
        );
    }
    let log = mesh.agent.log();
    assert!(
        log.contains("request denied by policy") && log.contains("delete_everything"),
        "the agent logs the denied tool call:\n{log}"
    );
    assert!(mesh.metric("mesh_http_denied_requests_total") >= 2.0);
    assert!(mesh.metric("mesh_jsonrpc_requests_total{family=\"mcp\"}") >= 8.0);
}

#[test]
fn policy_changes_apply_live_without_restarting_the_agent() {
    let (_server, address) = start_mcp_server();
    let tools = agent_resource("tools", &["tools.mesh"], address, "Mcp");
    let mesh = Mesh::start("l7-live", &(tools.clone() + MCP_POLICY));
    let url = format!("http://{address}/mcp");
    let call = ["delete_everything={}"];
    let denied = mcp_probe(&mesh, &url, "legacy", &call);
    assert_eq!(
        denied["calls"]["delete_everything"]["ok"], false,
        "{denied}"
    );

    let widened = MCP_POLICY.replace(
        "tools: [add, search, count_slowly]",
        "tools: [add, search, count_slowly, delete_everything]",
    );
    mesh.replace_resources(&(tools.clone() + &widened));
    let allowed = mcp_probe(&mesh, &url, "legacy", &call);
    assert_eq!(
        allowed["calls"]["delete_everything"]["text"][0], "everything deleted",
        "{allowed}"
    );

    // An invalid change is refused and the last good snapshot keeps being enforced.
    let rejected_before = mesh.metric("mesh_policy_rejected_reloads_total");
    fs::write(
        mesh.policy_dir.join("mesh.yaml"),
        tools + &widened.replace("from: [planner]", "from: []"),
    )
    .unwrap();
    let start = Instant::now();
    while mesh.metric("mesh_policy_rejected_reloads_total") <= rejected_before {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            mesh.agent.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let still = mcp_probe(&mesh, &url, "legacy", &call);
    assert_eq!(still["calls"]["delete_everything"]["ok"], true, "{still}");
}

#[test]
fn curl_is_routed_by_host_name_and_a_denied_path_gets_403() {
    let notes = ScriptedServer::start(always(200));
    let resources = agent_resource("notes", &["notes.mesh"], notes.address, "Http")
        + "---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: no-admin
spec:
  targetAgent: notes
  action: Deny
  rules:
    - from: [\"*\"]
      http:
        paths: [\"/admin/*\"]
";
    let mesh = Mesh::start("l7-host", &resources);
    // notes.mesh resolves to an address where nothing listens: only the registry knows it.
    let port = free_port().unwrap();
    let resolve = format!("notes.mesh:{port}:127.0.0.1");
    let (status, _, body) = mesh.curl(&[
        "--resolve",
        &resolve,
        &format!("http://notes.mesh:{port}/hello?x=1"),
    ]);
    assert_eq!(status, 200, "{body}\n{}", mesh.agent.log());
    assert!(
        body.starts_with("GET /hello?x=1 HTTP/1.1 via notes.mesh:"),
        "the registry endpoint got the request with its Host: {body}"
    );
    let (status, _, body) = mesh.curl(&[
        "--resolve",
        &resolve,
        &format!("http://notes.mesh:{port}/admin/users"),
    ]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("denied by mesh policy"), "{body}");
    assert_eq!(
        notes.count(),
        1,
        "the denied request never reached the server"
    );
    assert!(
        mesh.agent.log().contains("request denied by policy"),
        "{}",
        mesh.agent.log()
    );
}

#[test]
fn retries_recover_from_a_503_burst_for_safe_requests_only() {
    // The first two requests fail with 503, the rest succeed.
    let flaky = ScriptedServer::start(Arc::new(|index| if index < 2 { 503 } else { 200 }));
    let resources = agent_resource("flaky", &["flaky.mesh"], flaky.address, "Http")
        + "---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: flaky-retries
spec:
  targetAgent: flaky
  retries:
    attempts: 3
    backoffBase: 5ms
    backoffMax: 20ms
    retryOn: [Status503, ConnectFailure]
";
    let mesh = Mesh::start("l7-retry", &resources);
    let url = format!("http://{}/report", flaky.address);
    let (status, _, body) = mesh.curl(&[&url]);
    assert_eq!(status, 200, "a GET is retried past the burst: {body}");
    assert_eq!(flaky.count(), 3, "{:?}", flaky.requests());
    assert!(mesh.metric("mesh_http_retries_total") >= 2.0);

    // A POST without an Idempotency-Key is not safe to repeat: the 503 reaches the caller.
    let flaky_post = ScriptedServer::start(Arc::new(|index| if index < 1 { 503 } else { 200 }));
    let resources = agent_resource("flaky", &["flaky.mesh"], flaky_post.address, "Http")
        + &resources[resources.find("---").unwrap()..];
    mesh.replace_resources(&resources);
    let url = format!("http://{}/orders", flaky_post.address);
    let (status, _, _) = mesh.curl(&["-X", "POST", "--data", "order=1", &url]);
    assert_eq!(status, 503, "a non-idempotent POST is not repeated");
    assert_eq!(flaky_post.count(), 1);
    // With an Idempotency-Key it is.
    let flaky_keyed = ScriptedServer::start(Arc::new(|index| if index < 1 { 503 } else { 200 }));
    let resources = agent_resource("flaky", &["flaky.mesh"], flaky_keyed.address, "Http")
        + &resources[resources.find("---").unwrap()..];
    mesh.replace_resources(&resources);
    let url = format!("http://{}/orders", flaky_keyed.address);
    let (status, _, _) = mesh.curl(&[
        "-X",
        "POST",
        "-H",
        "Idempotency-Key: order-1",
        "--data",
        "order=1",
        &url,
    ]);
    assert_eq!(status, 200);
    assert_eq!(flaky_keyed.count(), 2);
}

#[test]
fn rate_limits_answer_429_with_retry_after() {
    let server = ScriptedServer::start(always(200));
    let resources = agent_resource("limited", &["limited.mesh"], server.address, "Http")
        + "---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: limited
spec:
  targetAgent: limited
  rateLimits:
    - from: planner
      requestsPerSecond: 0.1
      burst: 2
";
    let mesh = Mesh::start("l7-ratelimit", &resources);
    let url = format!("http://{}/work", server.address);
    let statuses: Vec<u16> = (0..4).map(|_| mesh.curl(&[&url]).0).collect();
    assert_eq!(statuses, [200, 200, 429, 429], "burst of 2, then limited");
    let (_, head, _) = mesh.curl(&[&url]);
    let retry_after: u64 = head
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("retry-after:")
                .map(|value| value.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no Retry-After in {head}"));
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    assert_eq!(server.count(), 2, "limited requests never reach the server");
    assert!(mesh.metric("mesh_http_rate_limited_requests_total") >= 3.0);
}

#[test]
fn opaque_tcp_to_a_denied_agent_is_reset() {
    // A closed destination: an Allow policy with a rule for someone else.
    let server = ScriptedServer::start(always(200));
    let resources = agent_resource("vault", &["vault.mesh"], server.address, "Http")
        + "---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: vault-owner-only
spec:
  targetAgent: vault
  rules:
    - from: [owner]
";
    let mesh = Mesh::start("l7-deny-tcp", &resources);
    let (status, _, body) = mesh.curl(&[&format!("http://{}/secret", server.address)]);
    assert_eq!(status, 403, "{body}");
    // Non-HTTP bytes are authorised once per connection and reset when denied.
    let output = mesh
        .tree
        .run_in(
            &mesh.planner,
            Command::new("bash").args([
                "-c",
                &format!(
                    "exec 3<>/dev/tcp/127.0.0.1/{}; printf 'hello\\n' >&3; timeout 5 cat <&3; echo exit=$?",
                    server.address.port()
                ),
            ]),
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !stdout.contains("Scripted"),
        "the server never answered: {stdout}"
    );
    assert_eq!(server.count(), 0);
    assert!(mesh.metric("mesh_proxy_denied_connections_total") >= 1.0);
}

#[test]
fn a_failing_instance_is_ejected_and_recovers_through_a_half_open_probe() {
    let live = ScriptedServer::start(always(200));
    // Refuses connections for the whole test; no other server can take its port.
    let refusing = refusing_port().unwrap();
    let dead = refusing.address;
    let resources = format!(
        "apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata:
  name: pool
spec:
  hosts: [pool.mesh]
  endpoints:
    - address: \"{dead}\"
    - address: \"{}\"
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: pool
spec:
  targetAgent: pool
  retries:
    attempts: 2
    backoffBase: 1ms
    backoffMax: 5ms
    retryOn: [ConnectFailure]
  circuitBreaker:
    consecutiveFailures: 1
    ejectionTime: 300ms
    maxEjectedPercent: 50
",
        live.address
    );
    let mesh = Mesh::start("l7-eject", &resources);
    let url = format!("http://{}/work", live.address);
    // Every request succeeds: a refused connect is retried on the other instance.
    for _ in 0..20 {
        let (status, _, body) = mesh.curl(&[&url]);
        assert_eq!(status, 200, "{body}\n{}", mesh.agent.log());
    }
    assert!(
        mesh.agent.log().contains("endpoint ejected"),
        "{}",
        mesh.agent.log()
    );
    let failed_before = mesh.metric("mesh_http_retries_total");
    for _ in 0..10 {
        assert_eq!(mesh.curl(&[&url]).0, 200);
    }
    assert!(
        mesh.metric("mesh_http_retries_total") - failed_before <= 2.0,
        "while ejected, the dead instance gets (almost) no traffic"
    );

    // The instance comes back: after the ejection, a probe finds it and it serves again.
    drop(refusing);
    let revived = ScriptedServer::start_on(dead, always(200));
    let start = Instant::now();
    while revived.count() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the revived instance never got traffic:\n{}",
            mesh.agent.log()
        );
        assert_eq!(mesh.curl(&[&url]).0, 200);
        thread::sleep(Duration::from_millis(50));
    }
    assert!(mesh.agent.log().contains("endpoint recovered"));
}

#[test]
fn an_agent_with_no_working_instance_fails_over_to_its_fallback() {
    let backup = ScriptedServer::start(always(200));
    // Refuses connections for the whole test; no other server can take its port.
    let refusing = refusing_port().unwrap();
    let dead = refusing.address;
    let resources = format!(
        "apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata:
  name: primary
spec:
  hosts: [primary.mesh]
  fallback: backup
  endpoints:
    - address: \"{dead}\"
---
{}",
        agent_resource("backup", &["backup.mesh"], backup.address, "Http")
    );
    let mesh = Mesh::start("l7-fallback", &resources);
    let (status, _, body) = mesh.curl(&[&format!("http://{dead}/task")]);
    assert_eq!(status, 200, "{body}\n{}", mesh.agent.log());
    assert!(body.starts_with("GET /task HTTP/1.1"), "{body}");
    assert_eq!(backup.count(), 1);
    assert!(
        mesh.agent
            .log()
            .contains("failing over to the fallback agent")
    );
}

#[test]
fn a_saturated_agent_serves_the_high_class_first_and_sheds_overflow_with_503() {
    // One request at a time; the first is held until the test lets it go, so the queue
    // state when the high requests arrive is known exactly.
    let gate = Arc::new(AtomicBool::new(false));
    let held = Arc::clone(&gate);
    let slow = ScriptedServer::start(Arc::new(move |index| {
        while index == 0 && !held.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(20));
        200
    }));
    let resources = agent_resource("slow", &["slow.mesh"], slow.address, "Http")
        + "---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: slow
spec:
  targetAgent: slow
  priority:
    sources:
      - from: planner
        class: Low
    headerAllowed: true
    maxConcurrent: 1
    maxQueue: 6
";
    let mesh = Mesh::start("l7-priority", &resources);
    let spawn_curl = |path: &str, high: bool| {
        let mut command = Command::new("curl");
        command
            .args([
                "-sS",
                "--max-time",
                "30",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if high {
            command.args(["-H", "x-mesh-priority: high"]);
        }
        command.arg(format!("http://{}{path}", slow.address));
        mesh.tree.spawn_in(&mesh.planner, &mut command).unwrap()
    };
    // Eight low requests: one in flight, six queued, the eighth shed.
    let lows: Vec<_> = (0..8)
        .map(|index| {
            let child = spawn_curl(&format!("/low-{index}"), false);
            thread::sleep(Duration::from_millis(10));
            child
        })
        .collect();
    let start = Instant::now();
    while mesh.metric("mesh_http_shed_requests_total") < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            mesh.agent.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
    // Two high requests into the full queue: each displaces the newest low waiter.
    let highs: Vec<_> = (0..2)
        .map(|index| spawn_curl(&format!("/high-{index}"), true))
        .collect();
    while mesh.metric("mesh_http_shed_requests_total") < 3.0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            mesh.agent.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
    gate.store(true, Ordering::SeqCst);
    let status_of = |child: std::process::Child| -> u16 {
        let output = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap()
    };
    let high_statuses: Vec<u16> = highs.into_iter().map(status_of).collect();
    let low_statuses: Vec<u16> = lows.into_iter().map(status_of).collect();
    assert_eq!(high_statuses, [200, 200], "{}", mesh.agent.log());
    assert_eq!(
        low_statuses.iter().filter(|status| **status == 503).count(),
        3,
        "one low request shed on a full queue, two displaced: {low_statuses:?}"
    );
    assert_eq!(
        low_statuses.iter().filter(|status| **status == 200).count(),
        5,
        "{low_statuses:?}"
    );
    // The high requests went ahead of every low request still waiting when they came.
    let order = slow.requests();
    let position = |prefix: &str| {
        order
            .iter()
            .rposition(|line| line.contains(prefix))
            .unwrap_or_else(|| panic!("{prefix} never served: {order:?}"))
    };
    let last_high = position("/high-");
    assert_eq!(
        last_high, 2,
        "high requests are served right after the one in flight: {order:?}"
    );
    assert_eq!(slow.count(), 7, "shed requests never reached the server");
    assert!(mesh.metric("mesh_http_shed_requests_total") >= 3.0);
}

#[test]
fn identical_requests_reach_the_upstream_once_and_every_caller_gets_the_answer() {
    let slow = ScriptedServer::start(Arc::new(|_| {
        thread::sleep(Duration::from_millis(300));
        200
    }));
    let resources = agent_resource("tools", &["tools.mesh"], slow.address, "Mcp");
    let mesh = Mesh::start("l7-dedup", &resources);
    let url = format!("http://{}/mcp", slow.address);
    let body = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}"#;
    let spawn_call = |extra: &[&str]| {
        let mut command = Command::new("curl");
        command
            .args([
                "-sS",
                "--max-time",
                "30",
                "-H",
                "content-type: application/json",
            ])
            .args(extra)
            .args(["--data", body, &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        mesh.tree.spawn_in(&mesh.planner, &mut command).unwrap()
    };
    let answers: Vec<String> = (0..4)
        .map(|_| spawn_call(&[]))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|child| {
            let output = child.wait_with_output().unwrap();
            String::from_utf8_lossy(&output.stdout).into_owned()
        })
        .collect();
    assert_eq!(slow.count(), 1, "the upstream saw one request: {answers:?}");
    assert!(
        answers
            .iter()
            .all(|answer| answer == &answers[0] && answer.contains("#0"))
    );
    assert!(mesh.metric("mesh_http_deduplicated_requests_total") >= 3.0);

    // A different JSON-RPC id is a different request.
    let other = body.replace("\"id\":7", "\"id\":8");
    let (status, _, answer) = mesh.curl(&[
        "-H",
        "content-type: application/json",
        "--data",
        &other,
        &url,
    ]);
    assert_eq!(status, 200);
    assert!(answer.contains("#1"), "{answer}");
    assert_eq!(slow.count(), 2);

    // The same Idempotency-Key: sent once, whatever the body.
    let keyed: Vec<_> = (0..3)
        .map(|_| spawn_call(&["-H", "Idempotency-Key: order-42"]))
        .collect();
    for child in keyed {
        let output = child.wait_with_output().unwrap();
        assert!(String::from_utf8_lossy(&output.stdout).contains("#2"));
    }
    assert_eq!(slow.count(), 3);
}

#[test]
fn a_hung_upstream_gets_a_504_within_the_request_timeout_and_a_reset_mid_body_is_not_hidden() {
    // Hangs: accepts, reads, never answers.
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_address = hung.local_addr().unwrap();
    thread::spawn(move || {
        let mut held = Vec::new();
        for stream in hung.incoming().flatten() {
            held.push(stream);
        }
    });
    // Resets: answers with a Content-Length it never fulfils, then aborts the connection.
    let resetting = TcpListener::bind("127.0.0.1:0").unwrap();
    let resetting_address = resetting.local_addr().unwrap();
    thread::spawn(move || {
        for mut stream in resetting.incoming().flatten() {
            let mut buffer = [0u8; 4096];
            let _ = stream.read(&mut buffer);
            let _ =
                stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial body");
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
    });
    let resources = agent_resource("hung", &["hung.mesh"], hung_address, "Http")
        + "---\n"
        + &agent_resource("resetting", &["resetting.mesh"], resetting_address, "Http")
        + "---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: hung
spec:
  targetAgent: hung
  timeouts:
    request: 300ms
  retries:
    attempts: 0
";
    let mesh = Mesh::start("l7-faults", &resources);
    let (status, _, body) = mesh.curl(&[&format!("http://{hung_address}/slow")]);
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("did not answer within"), "{body}");
    assert!(mesh.metric("mesh_http_upstream_timeouts_total") >= 1.0);

    let output = mesh
        .tree
        .run_in(
            &mesh.planner,
            Command::new("curl").args([
                "-sS",
                "--max-time",
                "10",
                &format!("http://{resetting_address}/stream"),
            ]),
        )
        .unwrap();
    assert!(
        !output.status.success(),
        "a body cut short by the upstream is an error for the caller, not a clean end: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    // The agent keeps serving.
    let (status, _, _) = mesh.curl(&[&format!("http://{hung_address}/again")]);
    assert_eq!(status, 504);
}

#[test]
fn tls_the_workload_terminates_itself_passes_through_untouched() {
    let dir = std::env::temp_dir().join(mesh_tests::unique_name("tls"));
    fs::create_dir_all(&dir).unwrap();
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=secure.mesh", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let port = free_port().unwrap();
    let server = mesh_tests::KillOnDrop(
        Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept", &port.to_string()])
            .arg("-key")
            .arg(&key)
            .arg("-cert")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    mesh_tests::wait_for_port(address, Duration::from_secs(10)).unwrap();
    let mesh = Mesh::start(
        "l7-tls",
        &agent_resource("secure", &["secure.mesh"], address, "Http"),
    );
    let (status, _, body) = mesh.curl(&[
        "--cacert",
        &cert.to_string_lossy(),
        "--resolve",
        &format!("secure.mesh:{port}:127.0.0.1"),
        &format!("https://secure.mesh:{port}/"),
    ]);
    assert_eq!(status, 200, "{body}");
    assert!(
        mesh.metric("mesh_proxy_connections_by_protocol_total{protocol=\"tls\"}") >= 1.0,
        "{}",
        mesh.metrics()
    );
    drop(server);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn traffic_policy_routes_split_by_header_tool_and_weight() {
    let stable = ScriptedServer::start(always(200));
    let canary = ScriptedServer::start(always(200));
    let tools = ScriptedServer::start(always(200));
    let resources = agent_resource("notes", &["notes.mesh"], stable.address, "Http")
        + "---\n"
        + &agent_resource(
            "notes-canary",
            &["notes-canary.mesh"],
            canary.address,
            "Http",
        )
        + "---\n"
        + &agent_resource("search-tools", &["search-tools.mesh"], tools.address, "Mcp")
        + "---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: notes-routes
spec:
  targetAgent: notes
  routes:
    - match:
        headers:
          - name: x-canary
            value: \"yes\"
      backends:
        - agent: notes-canary
    - match:
        mcpTools: [\"search*\"]
      backends:
        - agent: search-tools
    - match:
        paths: [\"/split/*\"]
      backends:
        - agent: notes
          weight: 1
        - agent: notes-canary
          weight: 1
";
    let mesh = Mesh::start("l7-routes", &resources);
    let url = |path: &str| format!("http://{}{path}", stable.address);
    // No route matches: the addressed agent.
    assert_eq!(mesh.curl(&[&url("/plain")]).0, 200);
    assert_eq!((stable.count(), canary.count()), (1, 0));
    // A header override sends it to the canary.
    assert_eq!(mesh.curl(&["-H", "x-canary: yes", &url("/plain")]).0, 200);
    assert_eq!((stable.count(), canary.count()), (1, 1));
    // An MCP tool routes to the agent that has it.
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_web","arguments":{}}}"#;
    let (status, _, _) = mesh.curl(&[
        "-H",
        "content-type: application/json",
        "--data",
        call,
        &url("/mcp"),
    ]);
    assert_eq!(status, 200);
    assert_eq!(tools.count(), 1);
    // A weighted split reaches both backends.
    for index in 0..40 {
        assert_eq!(mesh.curl(&[&url(&format!("/split/{index}"))]).0, 200);
    }
    let (to_stable, to_canary) = (stable.count() - 1, canary.count() - 1);
    assert_eq!(to_stable + to_canary, 40);
    assert!(
        to_stable >= 5 && to_canary >= 5,
        "both halves of a 1:1 split get traffic: {to_stable} / {to_canary}"
    );
}

#[test]
fn an_endless_stream_is_cut_with_an_error_at_the_stream_timeout() {
    // An SSE stream that never ends: one event every 50 ms.
    let endless = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = endless.local_addr().unwrap();
    thread::spawn(move || {
        for mut stream in endless.incoming().flatten() {
            thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer);
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
                );
                let event = b"data: tick\n\n";
                let chunk = [format!("{:x}\r\n", event.len()).as_bytes(), event, b"\r\n"].concat();
                while stream.write_all(&chunk).is_ok() {
                    thread::sleep(Duration::from_millis(50));
                }
            });
        }
    });
    let resources = agent_resource("ticker", &["ticker.mesh"], address, "Http")
        + "---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: ticker
spec:
  targetAgent: ticker
  timeouts:
    request: 1s
    stream: 1s
";
    let mesh = Mesh::start("l7-stream-timeout", &resources);
    let output = mesh
        .tree
        .run_in(
            &mesh.planner,
            Command::new("curl").args([
                "-sSN",
                "--max-time",
                "20",
                &format!("http://{address}/events"),
            ]),
        )
        .unwrap();
    let received = String::from_utf8_lossy(&output.stdout);
    assert!(
        received.contains("data: tick"),
        "events flowed first: {received}"
    );
    assert!(
        !output.status.success(),
        "the cut stream is an error, not a clean end: {received}"
    );
    assert_ne!(
        output.status.code(),
        Some(28),
        "the mesh cut it, not curl's own 20 s limit"
    );
}

#[test]
fn an_mcp_session_stays_on_the_instance_that_issued_it() {
    // Two instances of a stateful MCP server: each knows only the sessions it created.
    let (_first, first) = start_mcp_server();
    let (_second, second) = start_mcp_server();
    let resources = format!(
        "apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata:
  name: tools
spec:
  hosts: [tools.mesh]
  protocol: Mcp
  endpoints:
    - address: \"{first}\"
    - address: \"{second}\"
"
    );
    let mesh = Mesh::start("l7-affinity", &resources);
    let url = format!("http://{first}/mcp");
    for round in 0..4 {
        let report = mcp_probe(
            &mesh,
            &url,
            "legacy",
            &[
                r#"add={"a":1,"b":1}"#,
                r#"search={"query":"x"}"#,
                r#"count_slowly={"n":2}"#,
            ],
        );
        for tool in ["add", "search", "count_slowly"] {
            assert_eq!(
                report["calls"][tool]["ok"], true,
                "round {round}: every request of a session reached its instance: {report}"
            );
        }
    }
}

/// An upstream whose answers take each framing HTTP/1.1 allows, by path. It keeps a
/// connection open for 50 ms after an answer (a short keep-alive timeout), then closes it;
/// `/close` bodies run until it closes at once.
fn start_framings_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind framings upstream");
    let address = listener.local_addr().expect("address");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            thread::spawn(move || serve_framings(stream));
        }
    });
    address
}

fn serve_framings(stream: TcpStream) {
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut writer = stream;
    // Nothing within the keep-alive timeout (or the client closed): close.
    while let Some(request) = read_request(&mut reader) {
        let path = request.target();
        let response: &[u8] = match path {
            "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nhello,\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n",
            "/close" => b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the upstream closes",
            "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n",
            "/early" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nsized",
        };
        if writer.write_all(response).is_err() || path == "/close" {
            return;
        }
    }
}

#[test]
fn every_upstream_framing_passes_through_and_a_connection_the_upstream_closed_is_not_reused() {
    let upstream = start_framings_upstream();
    let resources = agent_resource("framings", &["framings.mesh"], upstream, "Http");
    let mesh = Mesh::start("l7-framings", &resources);
    let url = |path: &str| format!("http://{upstream}{path}");

    let (status, _, body) = mesh.curl(&[&url("/chunked")]);
    assert_eq!((status, body.as_str()), (200, "hello, world"));
    let (status, _, body) = mesh.curl(&[&url("/close")]);
    assert_eq!((status, body.as_str()), (200, "until the upstream closes"));
    // Trailers reach a client that asks for them (`TE: trailers`), and only such a client.
    let lines = raw_http(
        &mesh,
        upstream,
        &serde_json::json!([{
            "send": format!(
                "GET /chunked HTTP/1.1\r\nHost: {upstream}\r\nTE: trailers\r\n\r\n\
                 GET /chunked HTTP/1.1\r\nHost: {upstream}\r\n\r\n"
            ),
            "responses": 2
        }]),
    );
    assert_eq!(
        lines,
        [
            "200 hello, world trailers:x-checksum: 42",
            "200 hello, world"
        ]
    );
    let (status, _, body) = mesh.curl(&[&url("/empty")]);
    assert_eq!((status, body.as_str()), (204, ""));
    let (status, _, body) = mesh.curl(&[&url("/early")]);
    assert_eq!((status, body.as_str()), (200, "final"));
    // HEAD: the length of the body a GET would get, and no body.
    let (status, head, _) = mesh.curl(&["-I", &url("/sized")]);
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: 5"),
        "{head}"
    );
    let (status, _, body) = mesh.curl(&[&url("/sized")]);
    assert_eq!(
        (status, body.as_str()),
        (200, "sized"),
        "the connection after HEAD is in step"
    );

    // One client connection (so one agent worker and its pool of upstream connections): a
    // POST after the upstream closed the pooled connection goes on a new one. A POST is not
    // retried, so a reused dead connection would show as a 502.
    let script = format!(
        "import http.client, time\n\
         conn = http.client.HTTPConnection('{upstream}', timeout=20)\n\
         for index in range(3):\n\
         \x20   conn.request('POST', '/sized', body=b'{{}}', headers={{'content-type': 'application/json'}})\n\
         \x20   response = conn.getresponse()\n\
         \x20   print(response.status, response.read().decode())\n\
         \x20   time.sleep(0.3)\n"
    );
    let output = mesh
        .tree
        .run_in(&mesh.planner, Command::new("python3").args(["-c", &script]))
        .expect("run the python client");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        printed.lines().collect::<Vec<_>>(),
        ["200 sized", "200 sized", "200 sized"],
        "{printed} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        mesh.metric("mesh_http_retries_total"),
        0.0,
        "no request needed a retry"
    );
}

/// Runs `tests/python/raw_http.py` (raw bytes on one connection) against `target` from the
/// planner's cgroup, so its connection is captured; returns the lines it printed.
fn raw_http(mesh: &Mesh, target: SocketAddr, steps: &serde_json::Value) -> Vec<String> {
    let output = mesh.run_python(
        "raw_http.py",
        &[&target.to_string(), &steps.to_string()],
        60,
    );
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "raw client failed: {printed} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    printed.lines().map(str::to_owned).collect()
}

/// An upstream that answers each request with what it got (`METHOD TARGET BODY`, sized),
/// never answers `/hang`, and sends `/stream` one SSE event and nothing more; it counts the
/// requests left hanging (streams included) and the connections that closed.
struct EchoUpstream {
    address: SocketAddr,
    hanging: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl EchoUpstream {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo upstream");
        let address = listener.local_addr().expect("address");
        let hanging = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (hanging_count, closed_count) = (Arc::clone(&hanging), Arc::clone(&closed));
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (hanging, closed) = (Arc::clone(&hanging_count), Arc::clone(&closed_count));
                thread::spawn(move || {
                    serve_echo(stream, &hanging);
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            address,
            hanging,
            closed,
        }
    }
}

impl EchoUpstream {
    /// Waits (up to 10 s) until more than `closed_before` connections have closed.
    fn wait_for_a_close(&self, closed_before: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.closed.load(Ordering::SeqCst) == closed_before && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn serve_echo(stream: TcpStream, hanging: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut writer = stream;
    while let Some(request) = read_request(&mut reader) {
        if request.target() == "/stream" {
            // One event of a stream that then stays open.
            let event = "data: one\n\n";
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                        transfer-encoding: chunked\r\n\r\n";
            let chunk = format!("{head}{:x}\r\n{event}\r\n", event.len());
            if writer.write_all(chunk.as_bytes()).is_err() {
                return;
            }
        }
        if matches!(request.target(), "/hang" | "/stream") {
            hanging.fetch_add(1, Ordering::SeqCst);
            // Until the agent closes the connection.
            let _ = reader.read_to_end(&mut Vec::new());
            return;
        }
        let method = request.line.split_whitespace().next().unwrap_or("");
        let body = format!(
            "{method} {} {}",
            request.target(),
            String::from_utf8_lossy(&request.body)
        );
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

#[test]
fn pipelined_requests_and_a_chunked_upload_mid_connection_are_answered_in_order() {
    let upstream = EchoUpstream::start();
    let address = upstream.address;
    let resources = agent_resource("echo", &["echo.mesh"], address, "Http");
    let mesh = Mesh::start("l7-pipelined", &resources);
    let host = format!("Host: {address}\r\n");
    let lines = raw_http(
        &mesh,
        address,
        &serde_json::json!([
            // Three requests in one write: answered one after the other, in order.
            {
                "send": format!(
                    "GET /one HTTP/1.1\r\n{host}\r\n\
                     POST /two HTTP/1.1\r\n{host}Content-Length: 3\r\n\r\nabc\
                     GET /three HTTP/1.1\r\n{host}\r\n"
                ),
                "responses": 3
            },
            // A chunked upload on the same connection, then a request after it.
            {
                "send": format!(
                    "POST /four HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n\
                     3\r\nxyz\r\n2\r\n12\r\n0\r\n\r\n"
                ),
                "responses": 1
            },
            {
                "send": format!("GET /five HTTP/1.1\r\n{host}Connection: close\r\n\r\n"),
                "responses": 1,
                "expect_close": true
            }
        ]),
    );
    assert_eq!(
        lines,
        [
            "200 GET /one ",
            "200 POST /two abc",
            "200 GET /three ",
            "200 POST /four xyz12",
            "200 GET /five ",
            "closed"
        ]
    );
}

#[test]
fn a_malformed_or_oversized_request_is_refused_and_a_client_that_leaves_cancels_its_exchange() {
    let upstream = EchoUpstream::start();
    let address = upstream.address;
    let resources = agent_resource("echo", &["echo.mesh"], address, "Http");
    let mesh = Mesh::start("l7-refusals", &resources);
    let host = format!("Host: {address}\r\n");

    let lines = raw_http(
        &mesh,
        address,
        &serde_json::json!([{
            "send": format!("GET /ok HTTP/1.1\r\n{host}\r\nGET /bad HTTP/1.1\r\nBad Header: x\r\n\r\n"),
            "responses": 2,
            "expect_close": true
        }]),
    );
    assert_eq!(lines, ["200 GET /ok ", "400 ", "closed"]);

    let oversized = format!(
        "GET /big HTTP/1.1\r\n{host}x-big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let lines = raw_http(
        &mesh,
        address,
        &serde_json::json!([{ "send": oversized, "responses": 1, "expect_close": true }]),
    );
    assert_eq!(lines, ["431 ", "closed"]);

    // A client that sends a request and leaves before the answer: the agent drops the
    // upstream exchange (its connection to the upstream closes) instead of waiting on it.
    let closed_before = upstream.closed.load(Ordering::SeqCst);
    raw_http(
        &mesh,
        address,
        &serde_json::json!([
            { "send": format!("GET /hang HTTP/1.1\r\n{host}\r\n"), "sleep": 0.5 },
            { "leave": true }
        ]),
    );
    upstream.wait_for_a_close(closed_before);
    assert_eq!(
        upstream.hanging.load(Ordering::SeqCst),
        1,
        "the request reached the upstream"
    );
    assert!(
        upstream.closed.load(Ordering::SeqCst) > closed_before,
        "the agent closed its upstream connection once the client left"
    );

    // The same for a client that leaves an event stream between two events.
    let closed_before = upstream.closed.load(Ordering::SeqCst);
    let lines = raw_http(
        &mesh,
        address,
        &serde_json::json!([
            { "send": format!("GET /stream HTTP/1.1\r\n{host}\r\n"), "read_until": "data: one" },
            { "leave": true }
        ]),
    );
    assert_eq!(lines, ["got data: one"]);
    upstream.wait_for_a_close(closed_before);
    assert_eq!(upstream.hanging.load(Ordering::SeqCst), 2);
    assert!(
        upstream.closed.load(Ordering::SeqCst) > closed_before,
        "the agent ended the upstream stream once the client left"
    );

    // The agent still serves.
    let (status, _, body) = mesh.curl(&[&format!("http://{address}/after")]);
    assert_eq!((status, body.as_str()), (200, "GET /after "));
}
