//! End-to-end tests of the registration API: real agents (standalone and etcd mode, with a
//! real etcd), the real `mesh-register` client running in cgroups of the test's own, a real
//! HTTP server as the registered instance, and captured `curl` clients reaching it by name.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    AgentOptions, AgentProcess, CgroupTree, KillOnDrop,
    etcd::{AgentEtcd, EtcdServer},
    register_binary, unique_name,
};

/// A small HTTP/1.1 server (keep-alive, Content-Length) standing for the registered agent:
/// `/healthz` answers `ok`, anything else `hello from <name>`. Stopping it closes its
/// listener and every connection, while the registered process lives on.
struct Instance {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    /// While set, everything but `/healthz` is answered 503.
    failing: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Instance {
    fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let failing = Arc::new(AtomicBool::new(false));
        let body = format!("hello from {name}");
        let flag = Arc::clone(&stop);
        let fail = Arc::clone(&failing);
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let flag = Arc::clone(&flag);
                        let fail = Arc::clone(&fail);
                        let body = body.clone();
                        thread::spawn(move || serve(stream, &body, &flag, &fail));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Instance {
            address,
            stop,
            failing,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(stream: TcpStream, body: &str, stop: &AtomicBool, failing: &AtomicBool) {
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(_) if !stop.load(Ordering::Relaxed) => continue,
            Err(_) => return,
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut request_body = vec![0u8; length];
        if reader.read_exact(&mut request_body).is_err() {
            return;
        }
        let (status, answer) = if path == "/healthz" {
            ("200 OK", "ok")
        } else if failing.load(Ordering::Relaxed) {
            ("503 Service Unavailable", "failing")
        } else {
            ("200 OK", body)
        };
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// An agent whose registration parent is `<tree>/agents`, with one configured workload,
/// `client` (the caller), and probes every 100 ms.
struct Mesh {
    agent: AgentProcess,
    tree: CgroupTree,
    client: PathBuf,
    parent: PathBuf,
}

impl Mesh {
    fn start(label: &str, etcd: Option<AgentEtcd>) -> Self {
        Self::start_node(label, etcd, "e2e")
    }

    fn start_node(label: &str, etcd: Option<AgentEtcd>, node: &str) -> Self {
        let tree = CgroupTree::create(label).expect("create cgroup tree");
        let agent_cgroup = tree.child("agent").unwrap();
        let client = tree.child("client").unwrap();
        let parent = tree.child("agents").unwrap();
        let registration = format!(
            "    cgroupParents: [{}]\n    leaseTtl: 3s\n    health:\n      interval: 100ms\n      timeout: 500ms\n      unhealthyThreshold: 2\n",
            serde_json::Value::String(parent.to_string_lossy().into_owned())
        );
        let agent = AgentProcess::start_with_registration(
            &tree,
            AgentOptions {
                accelerate: false,
                l7: true,
                workloads: vec![("client".into(), client.clone())],
                exclude_ports: vec![],
                exclude_cidrs: vec![],
                agent_cgroup,
                log_filter: "info,mesh_agent=debug".into(),
                agent_binary: None,
                policy_dir: None,
            },
            etcd,
            node,
            &registration,
        )
        .expect("start agent");
        Mesh {
            agent,
            tree,
            client,
            parent,
        }
    }

    /// A cgroup below the registration parent, named `name`.
    fn workload_cgroup(&self, name: &str) -> PathBuf {
        let path = self.parent.join(name);
        std::fs::create_dir_all(self.tree.absolute(&path)).unwrap();
        path
    }

    fn register_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(register_binary().unwrap());
        command
            .arg("--socket")
            .arg(self.agent.registration_socket())
            .args(args);
        command
    }

    /// Starts `mesh-register register ...` in `cgroup`; returns it and its event lines.
    fn register(&self, cgroup: &Path, args: &[&str]) -> Session {
        let mut full = vec!["register"];
        full.extend_from_slice(args);
        let mut command = self.register_command(&full);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = self.tree.spawn_in(cgroup, &mut command).unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Session {
            child: KillOnDrop(child),
            stdout,
        }
    }

    /// Runs `mesh-register ARGS` in `cgroup` to its end: (exit code, stdout, stderr).
    fn run(&self, cgroup: &Path, args: &[&str]) -> (i32, String, String) {
        let output = self
            .tree
            .run_in(cgroup, &mut self.register_command(args))
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Healthy instances discovered by `selector` (`--tool X`, `--agent Y`), asked by the client.
    fn discover(&self, selector: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["discover"];
        args.extend_from_slice(selector);
        let (code, stdout, stderr) = self.run(&self.client, &args);
        assert_eq!(code, 0, "discover: {stderr}");
        serde_json::from_str::<serde_json::Value>(stdout.trim())
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// A captured GET from the client to the agent `host` (by name, through the mesh: the
    /// dialled address is a closed loopback port): (HTTP status, body).
    fn get(&self, host: &str) -> (u16, String) {
        let output = self
            .tree
            .run_in(
                &self.client,
                Command::new("curl").args([
                    "-sS",
                    "--max-time",
                    "10",
                    "-H",
                    &format!("host: {host}"),
                    "-w",
                    "\n%{http_code}",
                    "http://127.0.0.1:9/hello",
                ]),
            )
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (status.trim().parse().unwrap_or(0), body.to_owned())
    }

    fn wait_for(&self, what: &str, mut condition: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        let timeout = Duration::from_secs(30);
        while !condition() {
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; agent log:\n{}",
                self.agent.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    }
}

/// A running `mesh-register register` and its event lines.
struct Session {
    child: KillOnDrop,
    stdout: BufReader<ChildStdout>,
}

impl Session {
    /// The next event (a JSON line); panics when the stream ended without one.
    fn next_event(&mut self) -> serde_json::Value {
        let mut line = String::new();
        if self.stdout.read_line(&mut line).unwrap() == 0 {
            let mut stderr = String::new();
            if let Some(mut err) = self.child.0.stderr.take() {
                let _ = err.read_to_string(&mut stderr);
            }
            panic!("the session ended without an event: {stderr}");
        }
        serde_json::from_str(&line).unwrap()
    }

    /// The next event that is not a heartbeat.
    fn next_change(&mut self) -> serde_json::Value {
        loop {
            let event = self.next_event();
            if event["event"] != "heartbeat" {
                return event;
            }
        }
    }

    fn process(&mut self) -> &mut Child {
        &mut self.child.0
    }
}

/// The body of a GET on the agent's admin endpoint.
fn admin_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

const HEALTHY: i64 = 1;
const UNHEALTHY: i64 = 2;

#[test]
fn standalone_register_route_discover_health_and_deregister() {
    let mut mesh = Mesh::start("registry-standalone", None);
    let mut instance = Instance::start("tools");
    let port = instance.address.port().to_string();
    let tools_cgroup = mesh.workload_cgroup("tools");

    let mut session = mesh.register(
        &tools_cgroup,
        &[
            "--name",
            "tools",
            "--port",
            &port,
            "--protocol",
            "mcp",
            "--tool",
            "search",
            "--health-path",
            "/healthz",
        ],
    );
    let registered = session.next_event();
    assert_eq!(registered["event"], "registered", "{registered}");
    assert_eq!(registered["identity"], "spiffe://mesh.local/agent/tools");
    assert_eq!(registered["health"], HEALTHY);
    assert_eq!(registered["address"], format!("127.0.0.1:{port}"));
    let id = registered["instanceId"].as_str().unwrap().to_owned();
    assert_eq!(registered["record"], format!("tools.e2e.{id}"));

    // A captured client reaches it by name, through the mesh.
    assert_eq!(mesh.get("tools"), (200, "hello from tools".to_owned()));

    // Discovery by MCP tool and by agent name, asked by a workload.
    let found = mesh.discover(&["--tool", "search"]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["agent"], "tools");
    assert_eq!(found[0]["node"], "e2e");
    assert_eq!(found[0]["instanceId"], id.as_str());
    assert_eq!(found[0]["address"], format!("127.0.0.1:{port}"));
    assert!(mesh.discover(&["--tool", "other"]).is_empty());

    // The server stops while the registered process lives: unhealthy, out of discovery, no
    // traffic.
    instance.stop();
    let change = session.next_change();
    assert_eq!(change["event"], "health", "{change}");
    assert_eq!(change["health"], UNHEALTHY, "{change}");
    assert!(mesh.discover(&["--tool", "search"]).is_empty());
    assert!(mesh.discover(&["--agent", "tools"]).is_empty());
    let (status, _) = mesh.get("tools");
    assert_ne!(status, 200);
    let metrics = admin_get(mesh.agent.admin_port, "/metrics");
    assert!(
        metrics.contains("mesh_registry_instances{health=\"Unhealthy\"} 1"),
        "{metrics}"
    );

    // Back: healthy again, discovered again.
    let mut instance = Instance::start("tools");
    let mut session_two = mesh.register(
        &tools_cgroup,
        &[
            "--name",
            "tools",
            "--port",
            &instance.address.port().to_string(),
            "--tool",
            "search",
        ],
    );
    assert_eq!(session_two.next_event()["health"], HEALTHY);
    mesh.wait_for("the second instance in discovery", || {
        mesh.discover(&["--tool", "search"]).len() == 1
    });
    assert_eq!(mesh.get("tools"), (200, "hello from tools".to_owned()));

    // Deregister: refused to another cgroup, done for the registering one (its stream ends).
    let second_id = mesh
        .discover(&["--agent", "tools"])
        .first()
        .and_then(|found| found["instanceId"].as_str().map(str::to_owned))
        .unwrap();
    let (code, _, stderr) = mesh.run(&mesh.client, &["deregister", "--id", &second_id]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("only the cgroup that registered"),
        "{stderr}"
    );
    let (code, _, stderr) = mesh.run(&tools_cgroup, &["deregister", "--id", &second_id]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(session_two.next_change()["event"], "ended");
    assert!(mesh.discover(&["--agent", "tools"]).is_empty());

    // Killing the registered process ends its session: the record goes at once.
    let mut session_two = mesh.register(
        &tools_cgroup,
        &[
            "--name",
            "tools",
            "--port",
            &instance.address.port().to_string(),
            "--tool",
            "search",
        ],
    );
    assert_eq!(session_two.next_event()["health"], HEALTHY);
    mesh.wait_for("the third instance in discovery", || {
        mesh.discover(&["--agent", "tools"]).len() == 1
    });
    session_two.process().kill().unwrap();
    session_two.process().wait().unwrap();
    mesh.wait_for("the killed instance to leave discovery", || {
        mesh.discover(&["--agent", "tools"]).is_empty()
    });
    assert!(mesh.agent.log().contains("instance deregistered"));

    // The first session (unhealthy) is still open: a graceful stop of the agent ends it and
    // removes the socket.
    let socket = mesh.agent.registration_socket();
    assert!(socket.exists());
    let status = mesh.agent.stop().unwrap();
    assert!(
        status.success(),
        "agent exit: {status:?}\n{}",
        mesh.agent.log()
    );
    assert_eq!(session.next_change()["event"], "ended");
    assert!(!socket.exists(), "the socket is removed on stop");
    instance.stop();
}

#[test]
fn registration_is_refused_outside_allowed_cgroups() {
    let mesh = Mesh::start("registry-refused", None);
    let instance = Instance::start("x");
    let port = instance.address.port().to_string();

    // Not below a registration parent nor a configured workload.
    let rogue = mesh.tree.child("rogue").unwrap();
    let (code, _, stderr) = mesh.run(&rogue, &["register", "--name", "tools", "--port", &port]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("PermissionDenied"), "{stderr}");
    assert!(stderr.contains("neither a configured workload"), "{stderr}");

    // Below the parent, but in a cgroup of another name.
    let search = mesh.workload_cgroup("search");
    let (code, _, stderr) = mesh.run(&search, &["register", "--name", "tools", "--port", &port]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("may only register `search`"), "{stderr}");

    // A configured workload may not take another name either.
    let (code, _, stderr) = mesh.run(
        &mesh.client,
        &["register", "--name", "tools", "--port", &port],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("configured workload `client`"), "{stderr}");

    // The rogue process may not discover either.
    let (code, _, stderr) = mesh.run(&rogue, &["discover", "--tool", "search"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("PermissionDenied"), "{stderr}");

    // An address that is not this node's is refused.
    let (code, _, stderr) = mesh.run(
        &search,
        &["register", "--name", "search", "--address", "10.1.2.3:80"],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("InvalidArgument"), "{stderr}");

    let log = mesh.agent.log();
    assert!(log.contains("registration refused"), "{log}");
    // Nothing was registered.
    assert!(!log.contains("instance registered"), "{log}");
}

fn instance_keys(etcd: &EtcdServer) -> Vec<String> {
    etcd.keys("/mesh/v1/agentinstances/").unwrap()
}

#[test]
fn etcd_records_under_a_lease_vanish_with_the_session_and_the_agent() {
    let etcd = EtcdServer::start().expect("start etcd");
    let work = std::env::temp_dir().join(unique_name("registry-etcd"));
    std::fs::create_dir_all(&work).unwrap();
    let mut mesh = Mesh::start("registry-etcd", Some(AgentEtcd::new(&etcd, &work)));
    let mut instance = Instance::start("tools");
    let port = instance.address.port().to_string();
    let tools_cgroup = mesh.workload_cgroup("tools");

    let mut session = mesh.register(
        &tools_cgroup,
        &["--name", "tools", "--port", &port, "--tool", "search"],
    );
    let registered = session.next_event();
    let id = registered["instanceId"].as_str().unwrap().to_owned();
    let key = format!("/mesh/v1/agentinstances/default/tools.e2e.{id}");
    let in_etcd = mesh.wait_for("the record in etcd", || {
        instance_keys(&etcd) == [key.clone()]
    });
    eprintln!(
        "registered in {} ms (client side), in etcd {in_etcd:?} after the registered event",
        registered["elapsedMs"]
    );
    let stored: serde_json::Value =
        serde_json::from_str(&etcd.etcdctl(&["get", &key, "-w", "json"]).unwrap()).unwrap();
    let lease = stored["kvs"][0]["lease"].as_i64().unwrap_or(0);
    assert_ne!(lease, 0, "the record is held by a lease: {stored}");
    let value = etcd.etcdctl(&["get", &key, "--print-value-only"]).unwrap();
    let record: serde_json::Value = serde_json::from_str(value.trim()).unwrap();
    assert_eq!(record["kind"], "AgentInstance");
    assert_eq!(record["spec"]["agent"], "tools");
    assert_eq!(record["spec"]["node"], "e2e");
    assert_eq!(record["spec"]["health"], "Healthy");
    assert_eq!(
        record["spec"]["identity"],
        "spiffe://mesh.local/agent/tools"
    );

    // Through the mesh by name, and in `meshctl agents`.
    assert_eq!(mesh.get("tools"), (200, "hello from tools".to_owned()));
    let output = etcd.meshctl(&["agents"]).unwrap();
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(table.contains(&format!("tools.e2e.{id}")), "{table}");
    assert!(table.contains("Healthy"), "{table}");

    // The server stops: the record in etcd says so (rewritten on the change).
    instance.stop();
    mesh.wait_for("the record to turn unhealthy", || {
        let value = etcd.etcdctl(&["get", &key, "--print-value-only"]).unwrap();
        serde_json::from_str::<serde_json::Value>(value.trim())
            .is_ok_and(|record| record["spec"]["health"] == "Unhealthy")
    });
    let instance = Instance::start("tools");
    let port = instance.address.port().to_string();

    // The session ends (the process is killed): the record goes at once.
    session.process().kill().unwrap();
    session.process().wait().unwrap();
    mesh.wait_for("the record to be deleted", || {
        instance_keys(&etcd).is_empty()
    });

    // Registered again, then the whole node agent is SIGKILLed: the lease expires.
    let mut session = mesh.register(
        &tools_cgroup,
        &["--name", "tools", "--port", &port, "--tool", "search"],
    );
    assert_eq!(session.next_event()["event"], "registered");
    mesh.wait_for("the new record in etcd", || instance_keys(&etcd).len() == 1);
    mesh.agent.kill();
    let gone = mesh.wait_for("the lease to expire", || instance_keys(&etcd).is_empty());
    eprintln!("records gone {gone:?} after the agent was killed (lease TTL 3s)");
    // The session saw its agent go.
    session.process().kill().unwrap();
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn discovery_spans_the_nodes_of_one_etcd() {
    let etcd = EtcdServer::start().expect("start etcd");
    let work = std::env::temp_dir().join(unique_name("registry-nodes"));
    std::fs::create_dir_all(&work).unwrap();
    let node_a = Mesh::start_node(
        "registry-node-a",
        Some(AgentEtcd::new(&etcd, &work.join("a"))),
        "node-a",
    );
    let mut node_b = Mesh::start_node(
        "registry-node-b",
        Some(AgentEtcd::new(&etcd, &work.join("b"))),
        "node-b",
    );
    let instance = Instance::start("tools");
    let tools_cgroup = node_b.workload_cgroup("tools");
    let mut session = node_b.register(
        &tools_cgroup,
        &[
            "--name",
            "tools",
            "--port",
            &instance.address.port().to_string(),
            "--skill",
            "summarize",
        ],
    );
    let id = session.next_event()["instanceId"]
        .as_str()
        .unwrap()
        .to_owned();

    // Asked on node A: the instance registered on node B, by A2A skill.
    node_a.wait_for("node B's instance on node A", || {
        !node_a.discover(&["--skill", "summarize"]).is_empty()
    });
    let found = node_a.discover(&["--skill", "summarize"]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["node"], "node-b");
    assert_eq!(found[0]["instanceId"], id.as_str());
    assert_eq!(found[0]["identity"], "spiffe://mesh.local/agent/tools");

    // Node B dies: its lease expires and node A forgets the instance.
    node_b.agent.kill();
    node_a.wait_for("node B's instance to expire on node A", || {
        node_a.discover(&["--skill", "summarize"]).is_empty()
    });
    session.process().kill().unwrap();
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn failed_requests_through_the_mesh_mark_an_instance_unhealthy() {
    let mesh = Mesh::start("registry-passive", None);
    let instance = Instance::start("tools");
    let tools_cgroup = mesh.workload_cgroup("tools");
    // The active probe is a TCP connect, which keeps succeeding.
    let mut session = mesh.register(
        &tools_cgroup,
        &[
            "--name",
            "tools",
            "--port",
            &instance.address.port().to_string(),
            "--tool",
            "search",
        ],
    );
    assert_eq!(session.next_event()["health"], HEALTHY);
    assert_eq!(mesh.get("tools").0, 200);

    // Requests start failing: the balancer ejects the endpoint, and the registry takes that
    // passive result as the instance's health.
    instance.failing.store(true, Ordering::Relaxed);
    mesh.wait_for("the failing instance to leave discovery", || {
        let (status, _) = mesh.get("tools");
        assert_ne!(status, 200);
        mesh.discover(&["--tool", "search"]).is_empty()
    });
    let change = session.next_change();
    assert_eq!(change["health"], UNHEALTHY, "{change}");
    assert!(
        change["reason"].as_str().unwrap().contains("ejected"),
        "{change}"
    );
}
