//! End-to-end tests of the capture datapath on the real kernel: each test creates its own
//! cgroup tree (never the root cgroup), starts a real `mesh-agent` attached to it, runs real
//! client processes inside child cgroups and checks what the server, the client, the agent and
//! the kernel counters saw. Everything is removed on drop, also when an assertion fails.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    AgentOptions, AgentProcess, CgroupTree, attached_programs, has_line_with, mesh_agent_binary,
    testpeer_binary,
};
use serde_json::Value;

/// An echo server in the test process (not in any enrolled cgroup) that records the peer
/// address of every connection it accepts.
struct EchoServer {
    address: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl EchoServer {
    fn start(bind: &str) -> Self {
        let listener = TcpListener::bind(bind).expect("bind echo server");
        let address = listener.local_addr().expect("echo server address");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&peers);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if let Ok(peer) = stream.peer_addr() {
                    recorded.lock().expect("peers lock").push(peer);
                }
                thread::spawn(move || echo(stream));
            }
        });
        Self { address, peers }
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers lock").clone()
    }
}

fn echo(mut stream: TcpStream) {
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(count) => {
                if stream.write_all(&buffer[..count]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// A test's world: a cgroup tree with an agent cgroup, an enrolled workload cgroup and an
/// unenrolled bystander cgroup, and a running agent.
struct World {
    agent: AgentProcess,
    workload: PathBuf,
    bystander: PathBuf,
    tree: CgroupTree,
}

impl World {
    fn start(label: &str, accelerate: bool) -> Self {
        let tree = CgroupTree::create(label).expect("create cgroup tree");
        let agent_cgroup = tree.child("agent").expect("agent cgroup");
        let workload = tree.child("workload").expect("workload cgroup");
        let bystander = tree.child("bystander").expect("bystander cgroup");
        let agent = AgentProcess::start(&tree, options(agent_cgroup, &workload, &[], accelerate))
            .expect("start agent");
        Self {
            agent,
            workload,
            bystander,
            tree,
        }
    }

    /// Runs mesh-testpeer in a cgroup of the tree and returns its JSON report.
    fn peer(&self, cgroup: &Path, to: SocketAddr, send: u64) -> Value {
        run_peer(&self.tree, cgroup, to, send)
    }

    fn counters(&self) -> Value {
        self.agent
            .workload_counters(&self.workload)
            .expect("read counters")
    }

    fn events(&self) -> Value {
        self.agent.counters().expect("read counters")["events"].clone()
    }

    /// Fails unless the agent served a captured connection at L7.
    fn assert_served_at_l7(&self) {
        assert!(
            self.agent
                .log()
                .contains("serving captured connection at L7"),
            "the connection went through the L7 path"
        );
    }
}

/// Runs mesh-testpeer in a cgroup and returns its JSON report.
fn run_peer(tree: &CgroupTree, cgroup: &Path, to: SocketAddr, send: u64) -> Value {
    let output = tree
        .run_in(
            cgroup,
            Command::new(testpeer_binary().expect("mesh-testpeer binary")).args([
                "--to",
                &to.to_string(),
                "--send",
                &send.to_string(),
            ]),
        )
        .expect("run mesh-testpeer");
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|error| {
        panic!(
            "mesh-testpeer printed no JSON ({error}): {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// Agent options with one enrolled workload named "client" (plus `extra` workloads first).
fn options(
    agent_cgroup: PathBuf,
    workload: &Path,
    extra: &[(&str, PathBuf)],
    accelerate: bool,
) -> AgentOptions {
    let mut workloads: Vec<(String, PathBuf)> = extra
        .iter()
        .map(|(name, path)| ((*name).to_owned(), path.clone()))
        .collect();
    workloads.push(("client".into(), workload.to_path_buf()));
    AgentOptions {
        accelerate,
        l7: true,
        workloads,
        exclude_ports: vec![],
        exclude_cidrs: vec![],
        agent_cgroup,
        log_filter: "info,mesh_agent=debug".into(),
        agent_binary: None,
        policy_dir: None,
    }
}

fn field(value: &Value, name: &str) -> u64 {
    value[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {value}"))
}

fn addr(value: &Value, name: &str) -> SocketAddr {
    value[name]
        .as_str()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {value}"))
}

/// Asserts a transfer arrived complete and byte-identical (echoed back).
fn assert_intact(report: &Value, bytes: u64) {
    assert!(report.get("error").is_none(), "transfer failed: {report}");
    assert_eq!(field(report, "sent"), bytes, "{report}");
    assert_eq!(field(report, "received"), bytes, "{report}");
    assert_eq!(
        report["sent_sha256"], report["received_sha256"],
        "bytes differ: {report}"
    );
}

/// Polls until `check` holds or a generous deadline passes (kernel counters are updated by
/// the time the peer exits, but TCP teardown packets may trail).
fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    check()
}

#[test]
fn enrolled_client_reaches_its_server_only_through_the_agent() {
    let mut world = World::start("through", false);
    let server = EchoServer::start("127.0.0.1:0");

    let report = world.peer(&world.workload, server.address, 4096);
    assert_intact(&report, 4096);
    // getpeername: the application sees the address it dialled, not the agent's listener.
    assert_eq!(addr(&report, "peer"), server.address);
    // The server was reached from the agent's upstream socket, not from the client's socket.
    let client = addr(&report, "local");
    let peers = server.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_ne!(peers[0], client, "the server saw the client directly");
    let log = world.agent.log();
    assert!(
        log.contains(&format!("peer={client}")) && log.contains(&format!("dst={}", server.address)),
        "the agent did not log the forwarded connection:\n{log}"
    );
    assert_eq!(field(&world.counters(), "connections_captured"), 1);

    // With the agent gone, capture stays in force: the client fails instead of bypassing it.
    world.agent.kill();
    let report = world.peer(&world.workload, server.address, 16);
    assert_eq!(report["stage"], "connect", "{report}");
    assert_eq!(
        server.peers().len(),
        1,
        "a request reached the server without the agent"
    );
}

#[test]
fn unenrolled_process_is_untouched() {
    let world = World::start("bystander", false);
    let server = EchoServer::start("127.0.0.1:0");

    let report = world.peer(&world.bystander, server.address, 1024);
    assert_intact(&report, 1024);
    assert_eq!(addr(&report, "peer"), server.address);
    // Direct connection: the server saw the client's own socket.
    assert_eq!(server.peers(), vec![addr(&report, "local")]);
    assert_eq!(field(&world.events(), "captured"), 0);
    assert!(!world.agent.log().contains("forwarding captured connection"));
    let rows = world.agent.counters().expect("counters")["workloads"].clone();
    let bystander = world.bystander.to_string_lossy().into_owned();
    assert!(
        rows.as_array()
            .is_some_and(|rows| rows.iter().all(|row| row["cgroup"] != bystander.as_str())),
        "the bystander was accounted: {rows}"
    );
}

#[test]
fn a_cgroup_enrolled_at_run_time_is_counted_from_then_on_and_not_after_it_leaves() {
    const BYTES: u64 = 300_000;
    let world = World::start("late-enrol", false);
    let server = EchoServer::start("127.0.0.1:0");
    let bystander = world.tree.relative().join("bystander");
    let enrolment = |command: &str| {
        world
            .agent
            .command(&[command, "--cgroup", &bystander.to_string_lossy()])
            .unwrap_or_else(|error| panic!("{command} the bystander: {error}"));
    };
    let counters = || {
        world
            .agent
            .workload_counters(&world.bystander)
            .expect("read counters")
    };

    // Before: not captured, not counted (and the kernel remembers that verdict for the
    // cgroup).
    assert_intact(&world.peer(&world.bystander, server.address, BYTES), BYTES);
    assert!(counters().is_null());

    // Enrolled at run time: its bytes are counted from the first packet.
    enrolment("enrol");
    assert_intact(&world.peer(&world.bystander, server.address, BYTES), BYTES);
    let mut row = Value::Null;
    let settled = eventually(|| {
        row = counters();
        row["tx_payload_bytes"].as_u64() == Some(BYTES)
            && row["rx_payload_bytes"].as_u64() == Some(BYTES)
    });
    assert!(settled, "the newly enrolled cgroup's bytes: {row}");

    // Unenrolled: its traffic is not counted. Enrolled again, it starts from nothing.
    enrolment("unenrol");
    assert_intact(&world.peer(&world.bystander, server.address, BYTES), BYTES);
    enrolment("enrol");
    let row = counters();
    assert!(
        row.is_null() || row["tx_payload_bytes"].as_u64() == Some(0),
        "bytes sent while unenrolled were counted: {row}"
    );
}

#[test]
fn accounting_programs_run_only_for_enrolled_cgroups_and_count_a_nested_enrolment_once() {
    const BYTES: u64 = 200_000;
    let world = World::start("accounting-links", false);
    let server = EchoServer::start("127.0.0.1:0");
    let attached = |cgroup: &Path| {
        attached_programs(&world.tree.absolute(cgroup))
            .expect("bpftool")
            .len()
    };
    let enrolment = |command: &str, cgroup: &Path| {
        world
            .agent
            .command(&[command, "--cgroup", &cgroup.to_string_lossy()])
            .unwrap_or_else(|error| panic!("{command} {}: {error}", cgroup.display()));
    };
    let sent = |cgroup: &Path| {
        world
            .agent
            .workload_counters(cgroup)
            .expect("read counters")["tx_payload_bytes"]
            .as_u64()
            .unwrap_or(0)
    };

    // Capture hooks on the attach cgroup; the accounting pair on the enrolled workload only:
    // the agent's and the bystander's packets never run it.
    assert_eq!(attached(world.tree.relative()), 5);
    assert_eq!(attached(&world.workload), 2);
    assert_eq!(attached(&world.tree.relative().join("agent")), 0);
    assert_eq!(attached(&world.bystander), 0);

    // A team cgroup enrolled above an enrolled member: the outer one carries the programs.
    let team = world.tree.child("team").expect("team cgroup");
    let member = world.tree.child("team/member").expect("member cgroup");
    let other = world.tree.child("team/other").expect("other cgroup");
    enrolment("enrol", &member);
    assert_eq!(attached(&member), 2);
    enrolment("enrol", &team);
    assert_eq!((attached(&team), attached(&member)), (2, 0));

    // The member's bytes are counted once, for the member; the rest of the team's for the team.
    assert_intact(&world.peer(&member, server.address, BYTES), BYTES);
    assert_intact(&world.peer(&other, server.address, BYTES), BYTES);
    assert!(
        eventually(|| sent(&member) == BYTES && sent(&team) == BYTES),
        "member {} team {} (want {BYTES} each)",
        sent(&member),
        sent(&team)
    );

    // The team leaves: the member takes the programs and keeps being counted exactly.
    enrolment("unenrol", &team);
    assert_eq!((attached(&team), attached(&member)), (0, 2));
    assert_intact(&world.peer(&member, server.address, BYTES), BYTES);
    assert!(
        eventually(|| sent(&member) == 2 * BYTES),
        "member {} (want {})",
        sent(&member),
        2 * BYTES
    );
    enrolment("unenrol", &member);
    assert_eq!(attached(&member), 0);
}

#[test]
fn agent_connections_are_not_looped() {
    let world = World::start("noloop", false);
    let server = EchoServer::start("127.0.0.1:0");

    let report = world.peer(&world.workload, server.address, 512);
    assert_intact(&report, 512);
    // One client connect was captured; the agent's own upstream connect was not.
    let events = world.events();
    assert_eq!(field(&events, "captured"), 1, "{events}");
    assert_eq!(server.peers().len(), 1);

    // A workload dialling the agent's listener directly is not redirected onto itself; the
    // agent closes the unexplained connection and keeps serving.
    let report = world.peer(&world.workload, world.agent.listener(), 0);
    assert_eq!(field(&report, "received"), 0, "{report}");
    assert_eq!(field(&world.events(), "captured"), 1);
    assert!(world.agent.log().contains("not redirected by the kernel"));
    let report = world.peer(&world.workload, server.address, 512);
    assert_intact(&report, 512);

    // The agent refuses to enrol the cgroup it runs in.
    let agent_cgroup = world.tree.relative().join("agent");
    let error = world
        .agent
        .command(&["enrol", "--cgroup", &agent_cgroup.to_string_lossy()])
        .expect_err("enrolling the agent's own cgroup must fail");
    assert!(
        error.to_string().contains("the agent itself runs in it"),
        "{error}"
    );
}

/// GET on the agent's admin endpoint with curl (from the test process: not captured).
fn admin_get(agent: &AgentProcess, path: &str) -> String {
    let url = format!("http://127.0.0.1:{}{path}", agent.admin_port);
    let output = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "5", &url])
        .output()
        .expect("run curl");
    assert!(
        output.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn counters_match_bytes(accelerate: bool) {
    const BYTES: u64 = 3_000_000;
    let world = World::start(if accelerate { "count-fast" } else { "count" }, accelerate);
    let server = EchoServer::start("127.0.0.1:0");

    let report = world.peer(&world.workload, server.address, BYTES);
    assert_intact(&report, BYTES);
    let mut counters = Value::Null;
    let settled = eventually(|| {
        counters = world.counters();
        counters["tx_payload_bytes"].as_u64() == Some(BYTES)
            && counters["rx_payload_bytes"].as_u64() == Some(BYTES)
    });
    assert!(
        settled,
        "payload counters differ from the bytes sent and received: {counters}"
    );
    assert_eq!(field(&counters, "connections_out"), 1, "{counters}");
    assert_eq!(field(&counters, "connections_captured"), 1, "{counters}");
    assert!(
        field(&counters, "tx_packets") > 0 && field(&counters, "rx_packets") > 0,
        "{counters}"
    );
    // The admin endpoint exports the same numbers to Prometheus, and reports ready/healthy.
    let metrics = admin_get(&world.agent, "/metrics");
    let sample = format!(
        "mesh_workload_transmit_payload_bytes_total{{workload=\"client\",cgroup=\"{}\"}} {BYTES}",
        world.workload.display()
    );
    assert!(
        metrics.contains(&sample),
        "{sample} missing from:\n{metrics}"
    );
    assert!(metrics.contains("mesh_agent_ready 1"), "{metrics}");
    assert_eq!(admin_get(&world.agent, "/readyz"), "ready\n");
    assert_eq!(admin_get(&world.agent, "/healthz"), "ok\n");
    if accelerate {
        assert_eq!(
            field(&counters, "redirected_bytes"),
            2 * BYTES,
            "{counters}"
        );
    } else {
        assert_eq!(field(&counters, "redirected_bytes"), 0, "{counters}");
        // Without acceleration every payload byte crossed the IP stack, headers on top.
        assert!(field(&counters, "tx_bytes") > BYTES, "{counters}");
    }
}

#[test]
fn counters_equal_the_bytes_sent() {
    counters_match_bytes(false);
}

#[test]
fn counters_equal_the_bytes_sent_with_acceleration() {
    counters_match_bytes(true);
}

fn large_transfer(accelerate: bool) {
    const BYTES: u64 = 100 * 1024 * 1024;
    let world = World::start(if accelerate { "bulk-fast" } else { "bulk" }, accelerate);
    let server = EchoServer::start("127.0.0.1:0");

    let report = world.peer(&world.workload, server.address, BYTES);
    assert_intact(&report, BYTES);
    let events = world.events();
    if accelerate {
        assert!(
            field(&events, "redirected") > 0,
            "sk_msg did not carry the transfer: {events}"
        );
        // Past its window the upload took TCP for good, and once the agent had read what was
        // redirected it moved the rest by splice(2).
        assert!(field(&events, "redirect_missed") > 0, "{events}");
        let spliced = admin_get(&world.agent, "/metrics")
            .lines()
            .find_map(|line| line.strip_prefix("mesh_proxy_spliced_bytes_total "))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(spliced > 0.0, "nothing was spliced after the fall back");
    } else {
        assert_eq!(field(&events, "redirected"), 0, "{events}");
    }
}

#[test]
fn hundred_mib_arrive_byte_identical_without_acceleration() {
    large_transfer(false);
}

#[test]
fn hundred_mib_arrive_byte_identical_with_acceleration() {
    large_transfer(true);
}

#[test]
fn agent_restart_keeps_capture_and_counters() {
    let mut world = World::start("restart", true);
    let server = EchoServer::start("127.0.0.1:0");
    let attachments_before = attached_programs(&world.tree.dir()).expect("bpftool");
    assert_eq!(attachments_before.len(), 5, "{attachments_before:?}");
    let workload_dir = world.tree.absolute(&world.workload);
    let accounting_before = attached_programs(&workload_dir).expect("bpftool");
    assert_eq!(accounting_before.len(), 2, "{accounting_before:?}");

    assert_intact(&world.peer(&world.workload, server.address, 1000), 1000);
    world.agent.kill();

    // While the agent is down the programs stay attached and the counters stay readable.
    assert_eq!(
        attached_programs(&world.tree.dir()).expect("bpftool"),
        attachments_before
    );
    assert_eq!(
        attached_programs(&workload_dir).expect("bpftool"),
        accounting_before
    );
    let counters = world.counters();
    assert_eq!(field(&counters, "connections_captured"), 1, "{counters}");
    let report = world.peer(&world.workload, server.address, 10);
    assert_eq!(
        report["stage"], "connect",
        "capture was dropped while the agent was down: {report}"
    );

    world.agent.restart(&world.tree).expect("restart agent");
    assert_intact(&world.peer(&world.workload, server.address, 1000), 1000);
    // Same links (programs swapped in place), no duplicate attachments, counters carried on.
    let attachments_after = attached_programs(&world.tree.dir()).expect("bpftool");
    assert_eq!(attachments_after.len(), 5, "{attachments_after:?}");
    let accounting_after = attached_programs(&workload_dir).expect("bpftool");
    assert_eq!(accounting_after.len(), 2, "{accounting_after:?}");
    let counters = world.counters();
    assert_eq!(field(&counters, "connections_captured"), 3, "{counters}");
    assert!(field(&counters, "tx_payload_bytes") >= 2000, "{counters}");
    assert_eq!(server.peers().len(), 2);
}

#[test]
fn an_agent_restarted_after_an_enrolled_cgroup_went_away_drops_its_accounting_links() {
    let mut world = World::start("restart-gone", false);
    let server = EchoServer::start("127.0.0.1:0");
    let gone = world.tree.child("gone").expect("cgroup");
    world
        .agent
        .command(&["enrol", "--cgroup", &gone.to_string_lossy()])
        .expect("enrol");
    let gone_dir = world.tree.absolute(&gone);
    let gone_id = std::fs::metadata(&gone_dir).expect("cgroup").ino();
    let links = world.agent.pin_dir.join("accounting");
    let pin = links.join(format!("{gone_id}_ingress"));
    assert!(
        pin.exists(),
        "no accounting link pinned at {}",
        pin.display()
    );

    // The workload's cgroup goes while no agent runs: the kernel detaches its links, the pins
    // stay behind.
    world.agent.kill();
    std::fs::remove_dir(&gone_dir).expect("remove the cgroup");
    world.agent.restart(&world.tree).expect("restart agent");

    assert!(
        !pin.exists(),
        "stale accounting link {} kept",
        pin.display()
    );
    assert_eq!(
        attached_programs(&world.tree.absolute(&world.workload))
            .expect("bpftool")
            .len(),
        2
    );
    assert_intact(&world.peer(&world.workload, server.address, 1000), 1000);
    assert!(
        eventually(|| world.counters()["tx_payload_bytes"].as_u64() == Some(1000)),
        "{}",
        world.counters()
    );
}

#[test]
fn a_configured_workload_is_enrolled_again_when_its_cgroup_is_created_anew_or_appears_late() {
    let tree = CgroupTree::create("recreated").expect("create cgroup tree");
    let agent_cgroup = tree.child("agent").expect("agent cgroup");
    let workload = tree.child("workload").expect("workload cgroup");
    // Configured, but its cgroup does not exist when the agent starts.
    let late = tree.relative().join("late");
    let agent = AgentProcess::start(
        &tree,
        options(agent_cgroup, &workload, &[("late", late.clone())], false),
    )
    .expect("start agent");
    let server = EchoServer::start("127.0.0.1:0");
    // Captured: the server was reached from the agent's socket, not the client's.
    let captured = |cgroup: &Path| {
        let report = run_peer(&tree, cgroup, server.address, 64);
        assert_intact(&report, 64);
        !server.peers().contains(&addr(&report, "local"))
    };
    assert!(captured(&workload), "{}", agent.log());

    // The workload's cgroup is removed and created again, as systemd does when a service
    // restarts: same path, new id.
    let dir = tree.absolute(&workload);
    let old_id = std::fs::metadata(&dir).expect("cgroup").ino();
    let old_pin = agent
        .pin_dir
        .join("accounting")
        .join(format!("{old_id}_ingress"));
    assert!(
        old_pin.exists(),
        "no accounting link at {}",
        old_pin.display()
    );
    std::fs::remove_dir(&dir).expect("remove the workload's cgroup");
    std::fs::create_dir(&dir).expect("create the workload's cgroup again");
    let new_id = std::fs::metadata(&dir).expect("cgroup").ino();
    assert_ne!(new_id, old_id);
    assert!(
        eventually(|| captured(&workload)),
        "the recreated cgroup was not captured:\n{}",
        agent.log()
    );
    assert!(
        eventually(|| !old_pin.exists()),
        "the old id's accounting link {} was kept",
        old_pin.display()
    );
    let new_pin = agent
        .pin_dir
        .join("accounting")
        .join(format!("{new_id}_ingress"));
    assert!(
        eventually(|| new_pin.exists()),
        "no accounting link for the new id"
    );
    // Seen as one change ("created again") or as two (gone, then enrolled), as the checks
    // fall.
    assert!(
        has_line_with(
            &agent.log(),
            &["configured workload", &format!("cgroup_id={new_id}")]
        ),
        "{}",
        agent.log()
    );

    // The late workload was reported missing at start, and is captured once its cgroup
    // appears.
    assert!(
        has_line_with(&agent.log(), &["late", "cgroup does not exist yet"]),
        "{}",
        agent.log()
    );
    let metrics = admin_get(&agent, "/metrics");
    assert_eq!(
        metric_value(&metrics, "mesh_configured_workloads_missing"),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "mesh_configured_workloads_enrolled"),
        1.0
    );
    std::fs::create_dir(tree.absolute(&late)).expect("create the late cgroup");
    assert!(
        eventually(|| captured(&late)),
        "the late cgroup was not captured:\n{}",
        agent.log()
    );
    assert!(
        has_line_with(&agent.log(), &["late", "configured workload enrolled"]),
        "{}",
        agent.log()
    );
    // Enrolled: the client at start and again, the late one; the client's old id removed.
    // (The gauges are stored once a check has gone through every workload.)
    let expected = [
        ("mesh_configured_workloads_enrolled", 2.0),
        ("mesh_configured_workloads_missing", 0.0),
        ("mesh_configured_workloads_failing", 0.0),
        ("mesh_configured_workload_enrolments_total", 3.0),
        ("mesh_configured_workload_removals_total", 1.0),
    ];
    assert!(
        eventually(|| {
            let metrics = admin_get(&agent, "/metrics");
            expected
                .iter()
                .all(|(name, value)| metric_value(&metrics, name) == *value)
        }),
        "{}",
        admin_get(&agent, "/metrics")
    );
}

#[test]
fn ipv6_is_captured_and_getpeername_shows_the_dialled_address() {
    let world = World::start("ipv6", true);
    let server = EchoServer::start("[::1]:0");

    let report = world.peer(&world.workload, server.address, 200_000);
    assert_intact(&report, 200_000);
    assert_eq!(addr(&report, "peer"), server.address);
    assert_ne!(server.peers(), vec![addr(&report, "local")]);
    assert!(
        world
            .agent
            .log()
            .contains(&format!("dst={}", server.address))
    );
    assert_eq!(field(&world.counters(), "connections_captured"), 1);
}

#[test]
fn cleanup_leaves_nothing_behind_even_when_a_test_fails() {
    let outcome = std::panic::catch_unwind(|| {
        let world = World::start("cleanup", true);
        let server = EchoServer::start("127.0.0.1:0");
        assert_intact(&world.peer(&world.workload, server.address, 100), 100);
        let pins = world.agent.pin_dir.clone();
        let tree = world.tree.dir();
        // Hand the paths out through the panic payload, then fail on purpose.
        std::panic::panic_any((pins, tree));
    });
    let payload = outcome.expect_err("the closure panics on purpose");
    let (pins, tree) = payload
        .downcast_ref::<(PathBuf, PathBuf)>()
        .cloned()
        .expect("paths in the payload");
    assert!(!pins.exists(), "pins left behind in {}", pins.display());
    assert!(!tree.exists(), "cgroup left behind: {}", tree.display());
}

#[test]
fn refusing_destination_resets_the_client_and_the_agent_keeps_serving() {
    let world = World::start("refused", false);
    let server = EchoServer::start("127.0.0.1:0");
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    };

    let report = world.peer(&world.workload, closed, 100);
    assert!(
        report.get("error").is_some(),
        "a refused destination looked like success: {report}"
    );
    assert!(
        world
            .agent
            .log()
            .contains("original destination unreachable"),
        "no clear log line:\n{}",
        world.agent.log()
    );
    assert_intact(&world.peer(&world.workload, server.address, 100), 100);
}

#[test]
fn bad_cgroups_get_clear_errors_and_do_not_stop_the_agent() {
    let tree = CgroupTree::create("badcg").expect("tree");
    let agent_cgroup = tree.child("agent").expect("agent cgroup");
    let workload = tree.child("workload").expect("workload cgroup");
    let missing = tree.relative().join("does-not-exist");
    let agent = AgentProcess::start(
        &tree,
        options(
            agent_cgroup,
            &workload,
            &[("ghost", missing.clone())],
            false,
        ),
    )
    .expect("the agent starts despite one bad workload");
    // A configured workload whose cgroup is missing is reported, and enrolled once it
    // appears (a_configured_workload_is_enrolled_again_when_its_cgroup_is_created_anew_...).
    let log = agent.log();
    assert!(
        has_line_with(&log, &["ghost", "cgroup does not exist yet"]),
        "{log}"
    );

    // The good workload is served.
    let server = EchoServer::start("127.0.0.1:0");
    let report = run_peer(&tree, &workload, server.address, 10);
    assert_intact(&report, 10);

    // Operator commands name the problem.
    let error = agent
        .command(&["enrol", "--cgroup", &missing.to_string_lossy()])
        .expect_err("must fail");
    assert!(error.to_string().contains("does not exist"), "{error}");
    let outside = Path::new("/");
    let error = agent
        .command(&["enrol", "--cgroup", &outside.to_string_lossy()])
        .expect_err("must fail");
    assert!(
        error.to_string().contains("outside the attach cgroup"),
        "{error}"
    );
    let error = agent
        .command(&["enrol", "--cgroup", "/a/../../etc"])
        .expect_err("must fail");
    assert!(error.to_string().contains("not allowed"), "{error}");

    // Enrol and unenrol by pid work on the running datapath.
    let mut sleeper = tree
        .spawn_in(
            &tree.child("late").expect("late cgroup"),
            Command::new("sleep").arg("30").stdout(Stdio::null()),
        )
        .expect("spawn sleeper");
    let enrolled = agent
        .command(&["enrol", "--pid", &sleeper.id().to_string()])
        .expect("enrol by pid");
    assert!(enrolled.contains("late"), "{enrolled}");
    let unenrolled = agent
        .command(&["unenrol", "--pid", &sleeper.id().to_string()])
        .expect("unenrol by pid");
    assert!(unenrolled.contains("late"), "{unenrolled}");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn operator_commands_fail_clearly_without_privileges_or_a_datapath() {
    let binary = mesh_agent_binary().expect("mesh-agent binary");
    // Nothing pinned there: exit code 5 and a hint.
    let output = Command::new(&binary)
        .args(["counters", "--pin-dir", "/sys/fs/bpf/mesh-e2e-nothing-here"])
        .output()
        .expect("run mesh-agent");
    assert_eq!(output.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&output.stderr).contains("start the agent first"));

    // As an unprivileged user: exit code 4, naming the capabilities.
    let output = Command::new(&binary)
        .args(["run"])
        .env("NO_COLOR", "1")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run mesh-agent as nobody");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("missing privileges"),
        "{stderr}"
    );

    // An invalid config: exit code 3, naming the field.
    let config = std::env::temp_dir().join(mesh_tests::unique_name("bad.yaml"));
    std::fs::write(&config, "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: AgentConfig\nspec:\n  listeners:\n    outbound: \"[::1]:1\"\n")
        .expect("write config");
    let output = Command::new(&binary)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");
    let _ = std::fs::remove_file(&config);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("spec.listeners.outbound"), "{stderr}");
}

#[test]
fn missing_bpffs_is_mounted_by_the_agent() {
    // A private mount namespace without bpffs: the agent must mount it itself and serve.
    let tree = CgroupTree::create("bpffs").expect("tree");
    let agent_cgroup = tree.child("agent").expect("agent cgroup");
    let workload = tree.child("workload").expect("workload cgroup");
    let agent = AgentProcess::start_with_launcher(
        &tree,
        options(agent_cgroup, &workload, &[], false),
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "umount -l /sys/fs/bpf 2>/dev/null; exec \"$0\" \"$@\"",
        ],
    )
    .expect("the agent starts without bpffs");
    assert!(
        agent.log().contains("bpffs not mounted; mounting it"),
        "{}",
        agent.log()
    );

    let server = EchoServer::start("127.0.0.1:0");
    let report = run_peer(&tree, &workload, server.address, 64);
    assert_intact(&report, 64);
    assert_ne!(server.peers(), vec![addr(&report, "local")], "not captured");
}

#[test]
fn a_second_agent_cannot_take_over_a_running_datapath() {
    let world = World::start("second", false);
    let server = EchoServer::start("127.0.0.1:0");
    let binary = mesh_agent_binary().expect("mesh-agent binary");
    let run_second = |config: &str| {
        let path = std::env::temp_dir().join(mesh_tests::unique_name("second.yaml"));
        std::fs::write(&path, config).expect("write config");
        let child = world
            .tree
            .spawn_in(
                &world.tree.relative().join("agent"),
                Command::new(&binary)
                    .arg("run")
                    .arg("--config")
                    .arg(&path)
                    .env("NO_COLOR", "1")
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped()),
            )
            .expect("spawn second agent");
        let output = child.wait_with_output().expect("wait for second agent");
        let _ = std::fs::remove_file(&path);
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let config = std::fs::read_to_string(&world.agent.config_path).expect("read config");

    // Same config: the listener port is taken, so it stops before touching the datapath.
    let (code, stderr) = run_second(&config);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot listen on"), "{stderr}");

    // Other ports, same pin folder: the folder lock refuses it.
    let other_ports = config
        .replace(
            &world.agent.port.to_string(),
            &mesh_tests::free_port().expect("port").to_string(),
        )
        .replace(
            &world.agent.admin_port.to_string(),
            &mesh_tests::free_port().expect("port").to_string(),
        );
    let (code, stderr) = run_second(&other_ports);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("another agent is running"), "{stderr}");

    // The first agent still owns and serves the datapath.
    assert_intact(&world.peer(&world.workload, server.address, 256), 256);
    assert_eq!(field(&world.counters(), "connections_captured"), 1);
}

#[test]
fn four_parallel_bulk_streams_with_acceleration_arrive_byte_identical() {
    const BYTES: u64 = 64 * 1024 * 1024;
    const STREAMS: usize = 4;
    let world = World::start("bulk4-fast", true);
    let server = EchoServer::start("127.0.0.1:0");

    let reports: Vec<Value> = thread::scope(|scope| {
        let streams: Vec<_> = (0..STREAMS)
            .map(|_| scope.spawn(|| run_peer(&world.tree, &world.workload, server.address, BYTES)))
            .collect();
        streams
            .into_iter()
            .map(|stream| stream.join().expect("peer thread"))
            .collect()
    });
    // No ENOMEM (or any other error) reaches a writer, and every byte comes back in order.
    for report in &reports {
        assert_intact(report, BYTES);
    }
    let counters = world.counters();
    assert!(
        field(&counters, "redirected_bytes") > 0,
        "sk_msg carried part of the streams: {counters}"
    );
    assert_eq!(
        field(&counters, "tx_payload_bytes"),
        STREAMS as u64 * BYTES,
        "{counters}"
    );
}

#[test]
fn timed_bulk_streams_with_acceleration_confirm_every_byte() {
    let world = World::start("timed-bulk-fast", true);
    let loadgen = testpeer_binary()
        .expect("mesh-testpeer binary")
        .with_file_name("mesh-loadgen");
    let mut server = Command::new(&loadgen)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start mesh-loadgen serve");
    let stdout = server.stdout.take().expect("server stdout");
    let _server = mesh_tests::KillOnDrop(server);
    let lines = mesh_tests::read_lines_until(stdout, |line| line.starts_with("listening "));
    let address = lines
        .last()
        .and_then(|line| line.strip_prefix("listening "))
        .expect("server address")
        .trim()
        .to_owned();
    for streams in ["1", "4"] {
        // The client streams for a while, shuts its write side, and checks the byte count the
        // server confirms: nothing lost, nothing doubled, no error.
        let output = world
            .tree
            .run_in(
                &world.workload,
                Command::new(&loadgen).args([
                    "bulk",
                    "--to",
                    &address,
                    "--streams",
                    streams,
                    "--duration-ms",
                    "1500",
                ]),
            )
            .expect("run mesh-loadgen bulk");
        assert!(
            output.status.success(),
            "{streams} stream(s): {} {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            world.agent.log()
        );
    }
    let events = world.events();
    assert!(field(&events, "redirected") > 0, "{events}");
}

/// A client for the half-close and slow-reader tests, run with python3 in the workload's
/// cgroup: sends `ping`, expects `pong`, sends BYTES of a pattern, shuts its write side,
/// reads to EOF and prints what it got (a send error is printed too, never swallowed).
const PY_CLIENT: &str = r#"
import hashlib, json, socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=120)
def exact(n):
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got
try:
    s.sendall(b"\x00ping")
    pong = exact(5)
    s.sendall((bytes(range(251)) * (size // 251 + 1))[:size])
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    print(json.dumps({"pong": pong.hex(), "received": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()}))
except OSError as error:
    print(json.dumps({"error": str(error)}))
"#;

fn py_client(to: SocketAddr, size: usize) -> Command {
    let mut command = Command::new("python3");
    command.args([
        "-c",
        PY_CLIENT,
        &to.ip().to_string(),
        &to.port().to_string(),
        &size.to_string(),
    ]);
    command
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|index| (index % 251) as u8).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A server for [`PY_CLIENT`]: answers the ping, waits for `go` (if any) before reading the
/// upload to its EOF, then answers with the upload's length and `answer_extra` bytes of the
/// pattern and shuts its write side. Returns the upload and the answer.
fn pattern_server(
    listener: TcpListener,
    go: Option<std::sync::mpsc::Receiver<()>>,
    answer_extra: usize,
) -> thread::JoinHandle<(Vec<u8>, Vec<u8>)> {
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut ping = [0u8; 5];
        stream.read_exact(&mut ping).expect("ping");
        assert_eq!(&ping, b"\x00ping");
        stream.write_all(b"\x00pong").expect("pong");
        if let Some(go) = go {
            let _ = go.recv();
        }
        let mut upload = Vec::new();
        stream
            .read_to_end(&mut upload)
            .expect("read to the client's EOF");
        let mut answer = format!("{}\n", upload.len()).into_bytes();
        answer.extend(pattern(answer_extra));
        stream.write_all(&answer).expect("answer");
        stream.shutdown(Shutdown::Write).expect("shutdown");
        (upload, answer)
    })
}

fn client_report(output: &std::process::Output, agent: &AgentProcess) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|error| {
        panic!(
            "client printed no report ({error}): {stdout} {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            agent.log()
        )
    })
}

#[test]
fn half_close_passes_through_the_accelerated_path_both_ways() {
    const UPLOAD: usize = 1 << 20;
    let world = World::start("halfclose-fast", true);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    // The server answers only after the client's EOF: the answer must still reach the client,
    // and the server's own FIN must end the client's read.
    let server = pattern_server(listener, None, UPLOAD);
    let output = world
        .tree
        .run_in(&world.workload, &mut py_client(address, UPLOAD))
        .expect("run client");
    let report = client_report(&output, &world.agent);
    let (upload, answer) = server.join().expect("server thread");
    assert!(
        upload == pattern(UPLOAD),
        "the upload arrived whole, then EOF"
    );
    assert_eq!(report["pong"], "00706f6e67", "{report}");
    assert_eq!(field(&report, "received"), answer.len() as u64, "{report}");
    assert_eq!(report["sha256"], sha256_hex(&answer), "{report}");
    assert!(field(&world.events(), "redirected") > 0);
}

/// `mesh_common::REDIRECT_WINDOW`: what sk_msg may queue on the agent's socket beyond what the
/// agent has read.
const REDIRECT_WINDOW: u64 = 4 << 20;

/// The agent's sockets on its outbound listener and the bytes queued on each (`ss` skmem `r`).
fn agent_socket_queues(agent: &AgentProcess) -> Vec<u64> {
    let port = agent.listener().port();
    let output = Command::new("ss")
        .args([
            "-tmnH",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .expect("run ss");
    String::from_utf8_lossy(&output.stdout)
        .split("skmem:(")
        .skip(1)
        .filter_map(|rest| {
            rest.strip_prefix('r')
                .and_then(|rest| rest.split(',').next())
                .and_then(|value| value.parse().ok())
        })
        .collect()
}

#[test]
fn a_slow_reader_holds_the_accelerated_sender_back_without_an_error() {
    const UPLOAD: usize = 160 << 20;
    let world = World::start("slow-fast", true);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    let (go, wait) = std::sync::mpsc::channel::<()>();
    // The server takes the ping, then reads nothing until told: the upload piles up behind
    // it. Redirected without a bound it would all queue on the agent's socket, and the
    // client's send() would end in ENOMEM.
    let server = pattern_server(listener, Some(wait), 0);
    let client = world
        .tree
        .spawn_in(
            &world.workload,
            py_client(address, UPLOAD)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        )
        .expect("start client");
    let mut client = mesh_tests::KillOnDrop(client);
    // Let the writer run into the stalled reader until the queue on the agent's socket has
    // stopped growing for a second (how much of the upload the agent and TCP hold elsewhere
    // depends on buffer autotuning), watching what queues there.
    let mut deepest = 0;
    let mut grew = Instant::now();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60)
        && (deepest == 0 || grew.elapsed() < Duration::from_secs(1))
    {
        let now = agent_socket_queues(&world.agent)
            .into_iter()
            .fold(deepest, u64::max);
        if now > deepest {
            deepest = now;
            grew = Instant::now();
        }
        thread::sleep(Duration::from_millis(20));
    }
    go.send(()).expect("start reading");
    let (upload, answer) = server.join().expect("server thread");
    let mut output = String::new();
    client
        .0
        .stdout
        .take()
        .expect("client stdout")
        .read_to_string(&mut output)
        .expect("client report");
    let report: Value = serde_json::from_str(output.trim()).unwrap_or_else(|error| {
        panic!(
            "client printed no report ({error}): {output}\n{}",
            world.agent.log()
        )
    });
    assert!(report.get("error").is_none(), "{report}");
    assert!(
        upload == pattern(UPLOAD),
        "the upload arrived whole and in order"
    );
    assert_eq!(field(&report, "received"), answer.len() as u64, "{report}");
    // At most the redirect window, plus what TCP itself buffers once the socket fell back
    // (its receive buffer, autotuned up to tcp_rmem's maximum); without the window the whole
    // upload would queue there.
    let tcp_rmem_max: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .expect("read tcp_rmem")
        .split_whitespace()
        .last()
        .and_then(|value| value.parse().ok())
        .expect("tcp_rmem maximum");
    assert!(UPLOAD as u64 > 2 * (REDIRECT_WINDOW + tcp_rmem_max));
    assert!(
        deepest > 0 && deepest <= REDIRECT_WINDOW + tcp_rmem_max,
        "bytes queued on the agent's socket while the reader stalled: {deepest}"
    );
    let events = world.events();
    assert!(field(&events, "redirected") > 0, "{events}");
    assert!(field(&events, "redirect_missed") > 0, "{events}");
}

/// An HTTP/1.1 keep-alive server in the test process that answers every request with the
/// length of the body it read (`content-length` framed), two seconds late for a path that
/// starts with `/pause`.
fn body_length_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind HTTP server");
    let address = listener.local_addr().expect("HTTP server address");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            thread::spawn(move || answer_body_lengths(stream));
        }
    });
    address
}

fn answer_body_lengths(stream: TcpStream) {
    let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone stream"));
    let mut writer = stream;
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        let mut request_line = String::new();
        // The request line, then headers until the blank line.
        loop {
            line.clear();
            match std::io::BufRead::read_line(&mut reader, &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if request_line.is_empty() {
                request_line.clone_from(&line);
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("content-length");
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if request_line.contains(" /pause") {
            // Holds the connection's next requests back, so the client gets far ahead.
            thread::sleep(Duration::from_secs(2));
        }
        let answer = length.to_string();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

#[test]
fn the_l7_path_keeps_an_accelerated_connection_redirected_past_its_first_window() {
    // Twelve 1 MiB requests on one keep-alive connection: three times the redirect window,
    // which the workload's socket only keeps if the L7 path reports what it read.
    const REQUESTS: usize = 12;
    const BODY: usize = 1 << 20;
    let world = World::start("l7-window", true);
    let upstream = body_length_server();
    let body_file = std::env::temp_dir().join(mesh_tests::unique_name("l7-window-body"));
    std::fs::write(&body_file, vec![b'x'; BODY]).expect("write request body");
    let url = format!("http://{upstream}/upload");
    let mut arguments: Vec<String> = vec![
        "-sS".into(),
        "--max-time".into(),
        "30".into(),
        "-H".into(),
        "content-type: application/octet-stream".into(),
        "--data-binary".into(),
        format!("@{}", body_file.display()),
        "-w".into(),
        " %{num_connects}\n".into(),
    ];
    arguments.extend(std::iter::repeat_n(url, REQUESTS));
    let output = world
        .tree
        .run_in(&world.workload, Command::new("curl").args(&arguments))
        .expect("run curl");
    let _ = std::fs::remove_file(&body_file);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let answers: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        answers.len(),
        REQUESTS,
        "one answer per request: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Every body arrived whole, and curl opened one connection for all of them.
    assert_eq!(answers[0], format!("{BODY} 1"), "{stdout}");
    for answer in &answers[1..] {
        assert_eq!(*answer, format!("{BODY} 0"), "{stdout}");
    }
    let counters = world.counters();
    let redirected = field(&counters, "redirected_bytes");
    assert!(
        redirected >= (REQUESTS * BODY) as u64,
        "the requests stayed on the redirect past its first 4 MiB window: {counters}"
    );
    world.assert_served_at_l7();
}

/// Pipelines one request that the upstream holds for two seconds, then (once the agent has
/// read that one) `count` POSTs of `body` bytes each, from a thread, while the main thread
/// reads the responses; prints the status lines and bodies as a JSON list.
const PIPELINED_UPLOADS_CLIENT: &str = r#"
import json, socket, sys, threading, time
host, port, count, body = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
conn = socket.create_connection((host, port), timeout=30)
def request(path, size):
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {size}\r\n\r\n"
    return head.encode() + b"x" * size
def send():
    conn.sendall(request("/pause", 1))
    time.sleep(0.5)
    for _ in range(count):
        conn.sendall(request("/upload", body))
threading.Thread(target=send, daemon=True).start()
reader = conn.makefile("rb")
answers = []
for _ in range(count + 1):
    status = reader.readline()
    length = 0
    while True:
        line = reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    answers.append(status.decode().strip() + " " + reader.read(length).decode())
print(json.dumps(answers))
"#;

#[test]
fn the_l7_path_serves_every_request_after_an_accelerated_connection_falls_back_to_tcp() {
    // The upstream holds the first request while the client sends 70 requests behind it,
    // 4.2 MB in all: the redirect passes its 4 MiB window and the workload's socket falls
    // back to TCP, so its last few kilobytes wait in the agent's TCP queue while the client
    // waits for answers. The agent must read the redirected backlog and then that queue:
    // a reader that took the backlog's last short read for "drained" would never see them.
    const COUNT: usize = 70;
    const BODY: usize = 60_000;
    let world = World::start("l7-fallback", true);
    let upstream = body_length_server();
    let output = world
        .tree
        .run_in(
            &world.workload,
            Command::new("timeout").args([
                "60",
                "python3",
                "-c",
                PIPELINED_UPLOADS_CLIENT,
                &upstream.ip().to_string(),
                &upstream.port().to_string(),
                &COUNT.to_string(),
                &BODY.to_string(),
            ]),
        )
        .expect("run the pipelining client");
    let answers: Vec<String> = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "the client printed no answers ({error}): {} {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(answers.len(), COUNT + 1, "{answers:?}");
    assert_eq!(answers[0], "HTTP/1.1 200 OK 1");
    for answer in &answers[1..] {
        assert_eq!(*answer, format!("HTTP/1.1 200 OK {BODY}"));
    }
    let events = world.events();
    assert!(
        field(&events, "redirect_missed") > 0,
        "the workload's socket fell back to TCP: {events}"
    );
    let counters = world.counters();
    let redirected = field(&counters, "redirected_bytes");
    assert!(
        redirected >= 3 << 20 && redirected < (COUNT * BODY) as u64,
        "part of the requests went by redirect, the rest by TCP: {counters}"
    );
    world.assert_served_at_l7();
}

/// The Prometheus sample named exactly `name` (labels included); a missing one fails.
fn metric_value(metrics: &str, name: &str) -> f64 {
    mesh_tests::prometheus_sample(metrics, name)
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

#[test]
fn with_l7_off_a_server_first_protocol_gets_its_banner_and_http_is_carried_as_bytes() {
    let tree = CgroupTree::create("l7-off").expect("create cgroup tree");
    let agent_cgroup = tree.child("agent").expect("agent cgroup");
    let workload = tree.child("workload").expect("workload cgroup");
    let mut agent_options = options(agent_cgroup, &workload, &[], false);
    agent_options.l7 = false;
    let agent = AgentProcess::start(&tree, agent_options).expect("start agent");

    // A server that greets first (SMTP-style), then echoes one line.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind banner server");
    let banner_server = listener.local_addr().expect("banner server address");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                if stream.write_all(b"220 banner ready\n").is_err() {
                    return;
                }
                let mut line = String::new();
                let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
                if std::io::BufRead::read_line(&mut reader, &mut line).is_ok() {
                    let _ = stream.write_all(line.as_bytes());
                }
            });
        }
    });
    let script = mesh_tests::banner_client_script(banner_server, "ping\n");
    let output = tree
        .run_in(&workload, Command::new("python3").args(["-c", &script]))
        .expect("run the banner client");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "banner client printed no JSON ({error}): {} {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(report["banner"], "220 banner ready\n", "{report}");
    assert_eq!(report["echo"], "ping\n", "{report}");

    // A client-first protocol is carried as bytes: the upstream answers, the L7 path sees
    // no request.
    let upstream = body_length_server();
    let output = tree
        .run_in(
            &workload,
            Command::new("curl").args([
                "-sS",
                "--max-time",
                "20",
                "--data-binary",
                "0123456789",
                &format!("http://{upstream}/bytes"),
            ]),
        )
        .expect("run curl");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "10",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Counted by the protocol detected from the client's first bytes, once each connection
    // has finished (both ends closed): the banner's as opaque, curl's as HTTP/1.1, which the
    // L7 path never saw.
    let by_protocol =
        |label: &str| format!("mesh_proxy_connections_by_protocol_total{{protocol=\"{label}\"}}");
    let mut metrics = String::new();
    let finished = eventually(|| {
        metrics = admin_get(&agent, "/metrics");
        metric_value(&metrics, &by_protocol("opaque"))
            + metric_value(&metrics, &by_protocol("http1"))
            >= 2.0
    });
    assert!(finished, "both connections finished:\n{metrics}");
    assert_eq!(
        metric_value(&metrics, &by_protocol("opaque")),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, &by_protocol("http1")),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "mesh_http_requests_total"),
        0.0,
        "{metrics}"
    );
    assert!(
        agent.counters().expect("read counters")["events"]["captured"]
            .as_u64()
            .is_some_and(|captured| captured >= 2),
        "both connections were captured"
    );
}
