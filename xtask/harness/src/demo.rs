//! `cargo xtask demo`: the mesh on this machine in standalone mode (no etcd). Starts a real
//! agent in a fresh private cgroup tree with a folder of mesh resources, enrols a demo
//! workload, and shows it calling through the kernel capture: a local HTTP server by address
//! and by registry name, a path the policy denies, an MCP tool server (the real `mcp` SDK) with
//! an allowed and a denied tool, a workload that registers itself over the registration API
//! (kernel-attested) and is then reached by its name and discovered, and a bystander that is
//! not captured; then prints what the agent logged, its L7 metrics and the kernel's
//! per-workload counters, and removes everything.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, bail};
use mesh_tests::{
    AgentOptions, AgentProcess, CgroupTree, KillOnDrop, attached_programs, free_port,
    python_script, register_binary, unique_name,
};

use xtask::util::{build, step};

/// A tiny HTTP server that tells each caller which address it connected from.
struct DemoServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DemoServer {
    fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the demo server")?;
        let address = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut request = [0u8; 4096];
                        let _ = stream.read(&mut request);
                        let body = format!(
                            "hello from the demo server; this connection came from {peer}\n"
                        );
                        let _ = write!(
                            stream,
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Self {
            address,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn curl(tree: &CgroupTree, cgroup: &Path, url: &str, extra: &[&str]) -> anyhow::Result<String> {
    let output = tree.run_in(
        cgroup,
        Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "-w",
                "curl: HTTP %{http_code}, from local port %{local_port} to %{remote_ip}:%{remote_port} (as getpeername reports it)\n",
            ])
            .args(extra)
            .arg(url),
    )?;
    if !output.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("    {line}\n")).collect()
}

/// The demo's mesh resources: the HTTP server registered as `notes` (with a denied path), the
/// MCP server as `tools` (the demo workload may call two of its tools, not the third).
fn resources(notes: SocketAddr, tools: SocketAddr) -> String {
    format!(
        "apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata:
  name: notes
spec:
  hosts: [notes.mesh]
  endpoints:
    - address: \"{notes}\"
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: notes-no-admin
spec:
  targetAgent: notes
  action: Deny
  rules:
    - from: [\"*\"]
      http:
        paths: [\"/admin/*\"]
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata:
  name: tools
spec:
  hosts: [tools.mesh]
  protocol: Mcp
  endpoints:
    - address: \"{tools}\"
  capabilities:
    mcpTools: [add, search, delete_everything]
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: demo-workload-uses-tools
spec:
  targetAgent: tools
  rules:
    - from: [demo-workload]
      mcp:
        tools: [add, search]
    - from: [demo-workload]
      mcp:
        methods: [initialize, \"notifications/*\", tools/list, server/discover, ping]
    - from: [demo-workload]
      http:
        methods: [GET, DELETE]
"
    )
}

pub fn run() -> anyhow::Result<()> {
    build(false)?;
    let server = DemoServer::start()?;
    let url = format!("http://{}/", server.address);
    let (mcp_server, mcp_address) =
        mesh_tests::start_python_server("mcp_tools_server.py", &[], true)?;
    let policy_dir = std::env::temp_dir().join(unique_name("demo-policies"));
    std::fs::create_dir_all(&policy_dir)?;
    let _remove_policies = RemoveOnDrop(policy_dir.clone());
    std::fs::write(
        policy_dir.join("demo.yaml"),
        resources(server.address, mcp_address),
    )?;

    let tree = CgroupTree::create("demo")?;
    let agent_cgroup = tree.child("agent")?;
    let workload = tree.child("workload")?;
    let bystander = tree.child("bystander")?;
    // Children of this cgroup may register the name of their directory.
    let registration_parent = tree.child("agents")?;
    let greeter = registration_parent.join("greeter");
    std::fs::create_dir_all(tree.absolute(&greeter))?;
    step(&format!(
        "cgroups: {} (attach point), agent in {}, enrolled workload {}, bystander {}",
        tree.relative().display(),
        agent_cgroup.display(),
        workload.display(),
        bystander.display()
    ));

    let agent = AgentProcess::start_with_registration(
        &tree,
        AgentOptions {
            accelerate: false,
            l7: true,
            workloads: vec![("demo-workload".into(), workload.clone())],
            exclude_ports: vec![],
            exclude_cidrs: vec![],
            agent_cgroup: agent_cgroup.clone(),
            log_filter: "info,mesh_agent=debug".into(),
            agent_binary: None,
            policy_dir: Some(policy_dir.clone()),
        },
        None,
        "demo",
        &format!(
            "    cgroupParents: [{}]\n    health: {{interval: 1s}}\n",
            serde_json::Value::String(registration_parent.to_string_lossy().into_owned())
        ),
    )?;
    step(&format!(
        "agent running (pid {:?}), outbound listener {}, resources from {}",
        agent.pid(),
        agent.listener(),
        policy_dir.display()
    ));
    eprint!("{}", indent(&attached_programs(&tree.dir())?.join("\n")));

    step(&format!(
        "enrolled workload calls {url}: the kernel redirects it through the agent"
    ));
    for _ in 0..2 {
        eprint!("{}", indent(&curl(&tree, &workload, &url, &[])?));
    }
    let port = free_port()?;
    let by_name = format!("http://notes.mesh:{port}/notes");
    step(&format!(
        "it calls {by_name} (a name only the registry knows; nothing listens on port {port}): routed to agent `notes`"
    ));
    let resolve = format!("notes.mesh:{port}:127.0.0.1");
    eprint!(
        "{}",
        indent(&curl(&tree, &workload, &by_name, &["--resolve", &resolve])?)
    );
    step("it calls /admin/users, which an AccessPolicy denies: 403 from the mesh");
    eprint!(
        "{}",
        indent(&curl(
            &tree,
            &workload,
            &format!("http://notes.mesh:{port}/admin/users"),
            &["--resolve", &resolve],
        )?)
    );
    step(&format!(
        "it runs an MCP client (mcp SDK) against the tool server at {mcp_address}: add is allowed, delete_everything is not"
    ));
    let (python, probe) = python_script("mcp_probe.py")?;
    let output = tree.run_in(
        &workload,
        Command::new(python)
            .arg(probe)
            .arg(format!("http://{mcp_address}/mcp"))
            .arg("legacy")
            .args([r#"add={"a":2,"b":40}"#, "delete_everything={}"]),
    )?;
    eprint!("{}", indent(&String::from_utf8_lossy(&output.stdout)));
    if !output.status.success() {
        bail!(
            "the MCP client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let greeter_server = DemoServer::start()?;
    step(&format!(
        "a workload in {} registers itself as `greeter` (port {}) over {}: the agent attests \
         its cgroup from the kernel, enrols it and publishes the instance",
        greeter.display(),
        greeter_server.address.port(),
        agent.registration_socket().display()
    ));
    let socket = agent.registration_socket();
    let mut register = Command::new(register_binary()?);
    register
        .arg("--socket")
        .arg(&socket)
        .args(["register", "--name", "greeter", "--port"])
        .arg(greeter_server.address.port().to_string())
        .args(["--protocol", "http", "--tool", "greet"])
        .stdout(Stdio::piped());
    let mut session = KillOnDrop(tree.spawn_in(&greeter, &mut register)?);
    let mut events = BufReader::new(session.0.stdout.take().context("session stdout")?);
    let mut registered = String::new();
    events.read_line(&mut registered)?;
    eprint!("{}", indent(registered.trim_end()));
    let port = free_port()?;
    let by_name = format!("http://greeter:{port}/hello");
    step(&format!(
        "the enrolled workload calls {by_name} (nothing listens on port {port}): routed by the registered name"
    ));
    let resolve = format!("greeter:{port}:127.0.0.1");
    eprint!(
        "{}",
        indent(&curl(&tree, &workload, &by_name, &["--resolve", &resolve])?)
    );
    step("it asks the registry which healthy instances offer the MCP tool `greet` (Discover)");
    let discovered = tree.run_in(
        &workload,
        Command::new(register_binary()?)
            .arg("--socket")
            .arg(&socket)
            .args(["discover", "--tool", "greet"]),
    )?;
    eprint!(
        "{}",
        indent(String::from_utf8_lossy(&discovered.stdout).trim_end())
    );
    step("a bystander cgroup (not allowed to) tries to register `greeter`: refused");
    let refused = tree.run_in(
        &bystander,
        Command::new(register_binary()?)
            .arg("--socket")
            .arg(&socket)
            .args(["register", "--name", "greeter", "--port", "1"]),
    )?;
    eprint!(
        "{}",
        indent(String::from_utf8_lossy(&refused.stderr).trim_end())
    );
    step("the registered process exits: its instance is gone at once");
    let _ = session.0.kill();
    let _ = session.0.wait();
    drop(greeter_server);

    step(&format!(
        "bystander (not enrolled) calls {url}: untouched by the mesh"
    ));
    eprint!("{}", indent(&curl(&tree, &bystander, &url, &[])?));

    step("what the agent logged about these calls");
    let log = agent.log();
    let interesting: Vec<&str> = log
        .lines()
        .filter(|line| {
            line.contains("serving captured connection")
                || line.contains("forwarding captured")
                || line.contains("request denied by policy")
                || line.contains("policy loaded")
                || line.contains("registration refused")
                || line.contains("instance registered")
                || line.contains("instance deregistered")
        })
        .collect();
    eprint!("{}", indent(&interesting.join("\n")));

    step("the agent's L7 metrics (/metrics)");
    let metrics = admin_metrics(agent.admin_port)?;
    let l7: Vec<&str> = metrics
        .lines()
        .filter(|line| {
            !line.starts_with('#')
                && (line.starts_with("mesh_http_")
                    || line.starts_with("mesh_jsonrpc_")
                    || line.starts_with("mesh_policy_")
                    || line.starts_with("mesh_registry_")
                    || line.starts_with("mesh_proxy_connections_by_protocol"))
        })
        .collect();
    eprint!("{}", indent(&l7.join("\n")));

    step("kernel counters per workload (mesh-agent counters)");
    eprint!("{}", indent(&agent.command(&["counters"])?));

    step("cleaning up: stopping the agent, detaching programs, removing pins and cgroups");
    let pin_dir = agent.pin_dir.clone();
    let tree_dir = tree.dir();
    drop(agent);
    drop(tree);
    drop(server);
    drop(mcp_server);
    if pin_dir.exists() || tree_dir.exists() {
        bail!(
            "cleanup left {} or {} behind",
            pin_dir.display(),
            tree_dir.display()
        );
    }
    step("done: no cgroup, pin or attachment left behind");
    Ok(())
}

/// Removes a folder when dropped, also when the demo fails half-way.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent's Prometheus metrics.
fn admin_metrics(port: u16) -> anyhow::Result<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))
        .context("connecting to the agent's admin endpoint")?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}
