//! Helpers the L7 end-to-end test files share: a [`Mesh`] (cgroup tree, agent with a policy
//! folder, one enrolled workload "planner"), `Agent` resources, and the real-peer Python
//! servers and clients of `tests/python/` (the MCP ones among them).

// Each test file uses its own part of these helpers.
#![allow(dead_code)]

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{AgentOptions, AgentProcess, CgroupTree, KillOnDrop, python_script, unique_name};
use serde_json::Value;

/// A cgroup tree with an agent and one enrolled workload named "planner", and the folder of
/// resources the agent watches.
pub struct Mesh {
    pub agent: AgentProcess,
    pub planner: PathBuf,
    pub policy_dir: PathBuf,
    pub tree: CgroupTree,
}

impl Mesh {
    pub fn start(label: &str, resources: &str) -> Self {
        let tree = CgroupTree::create(label).expect("create cgroup tree");
        let agent_cgroup = tree.child("agent").expect("agent cgroup");
        let planner = tree.child("planner").expect("planner cgroup");
        let policy_dir = std::env::temp_dir().join(unique_name("policies"));
        fs::create_dir_all(&policy_dir).expect("policy folder");
        fs::write(policy_dir.join("mesh.yaml"), resources).expect("write resources");
        let agent = AgentProcess::start(
            &tree,
            AgentOptions {
                accelerate: false,
                l7: true,
                workloads: vec![("planner".into(), planner.clone())],
                exclude_ports: vec![],
                exclude_cidrs: vec![],
                agent_cgroup,
                log_filter: "info,mesh_agent=debug".into(),
                agent_binary: None,
                policy_dir: Some(policy_dir.clone()),
            },
        )
        .expect("start agent");
        Self {
            agent,
            planner,
            policy_dir,
            tree,
        }
    }

    /// Runs curl in the planner's cgroup; returns (status code, headers, body).
    pub fn curl(&self, args: &[&str]) -> (u16, String, String) {
        let output = self
            .tree
            .run_in(
                &self.planner,
                Command::new("curl")
                    .args(["-sS", "--max-time", "20", "-D", "-", "-o", "-"])
                    .args(args),
            )
            .expect("run curl");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| {
            panic!(
                "curl printed no response: {text} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {head}"));
        (status, head.to_owned(), body.to_owned())
    }

    /// The agent's Prometheus metrics.
    pub fn metrics(&self) -> String {
        let mut stream =
            TcpStream::connect(("127.0.0.1", self.agent.admin_port)).expect("admin endpoint");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
            .expect("scrape");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("read metrics");
        text
    }

    pub fn metric(&self, name: &str) -> f64 {
        let metrics = self.metrics();
        mesh_tests::prometheus_sample(&metrics, name)
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    }

    /// Replaces the resources and waits until the agent has swapped in the new snapshot.
    pub fn replace_resources(&self, resources: &str) {
        let before = self.metric("mesh_policy_reloads_total");
        fs::write(self.policy_dir.join("mesh.yaml"), resources).expect("write resources");
        let start = Instant::now();
        while self.metric("mesh_policy_reloads_total") <= before {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the agent never reloaded its policy:\n{}",
                self.agent.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs one of the Python clients of `tests/python/` in the planner's cgroup (so its
    /// connections are captured), bounded by `timeout_seconds`.
    pub fn run_python(
        &self,
        script: &str,
        args: &[&str],
        timeout_seconds: u32,
    ) -> std::process::Output {
        let (python, path) = python_script(script).expect("test virtualenv");
        self.tree
            .run_in(
                &self.planner,
                Command::new("timeout")
                    .args(["--kill-after=5", &timeout_seconds.to_string()])
                    .arg(python)
                    .arg(path)
                    .args(args),
            )
            .expect("run a Python client")
    }

    /// [`Mesh::run_python`], then parses the one JSON line the client prints.
    pub fn python_probe(&self, script: &str, args: &[&str], timeout_seconds: u32) -> Value {
        let output = self.run_python(script, args, timeout_seconds);
        let stdout = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|error| {
            panic!(
                "{script} printed no report ({error}, {}): {stdout}\n{}\nagent log:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr),
                self.agent.log()
            )
        })
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.policy_dir);
    }
}

/// Resources: an `Agent` named `name` at `endpoint` with the given host names.
pub fn agent_resource(name: &str, hosts: &[&str], endpoint: SocketAddr, protocol: &str) -> String {
    format!(
        "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: Agent\nmetadata:\n  name: {name}\nspec:\n  hosts: [{}]\n  protocol: {protocol}\n  endpoints:\n    - address: \"{endpoint}\"\n",
        hosts.join(", ")
    )
}

/// Starts one of the Python servers of `tests/python/` (outside the mesh) on a free port,
/// with the port as its first argument and `args` after it; waits until it accepts
/// connections. The server is killed when the returned guard drops.
pub fn start_python_server(script: &str, args: &[&str]) -> (KillOnDrop, SocketAddr) {
    mesh_tests::start_python_server(script, args, false)
        .unwrap_or_else(|error| panic!("{script}: {error}"))
}

/// An MCP tool server (the `mcp` SDK) on a free port, stopped on drop.
pub fn start_mcp_server() -> (KillOnDrop, SocketAddr) {
    start_python_server("mcp_tools_server.py", &[])
}

/// Runs the `mcp` SDK client in the planner's cgroup and returns its JSON report.
pub fn mcp_probe(mesh: &Mesh, url: &str, mode: &str, calls: &[&str]) -> Value {
    let args: Vec<&str> = [url, mode]
        .into_iter()
        .chain(calls.iter().copied())
        .collect();
    let output = mesh.run_python("mcp_probe.py", &args, 300);
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|error| {
        panic!(
            "the MCP client printed no report ({error}): {stdout}\n{}\nagent log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            mesh.agent.log()
        )
    })
}

/// One HTTP/1.1 request as a scripted server in a test reads it.
pub struct ReceivedRequest {
    /// The request line, without its CRLF.
    pub line: String,
    /// Header names (lowercase) and values, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ReceivedRequest {
    /// The request target (`/path?query`).
    pub fn target(&self) -> &str {
        self.line.split_whitespace().nth(1).unwrap_or("")
    }

    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(seen, _)| seen == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Reads the next request (its body framed by `Content-Length` or chunked) off a keep-alive
/// connection; `None` once the client closed it, a read failed or timed out, or the body was
/// cut short.
pub fn read_request(reader: &mut BufReader<TcpStream>) -> Option<ReceivedRequest> {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut field = String::new();
        if reader.read_line(&mut field).unwrap_or(0) == 0 {
            return None;
        }
        let field = field.trim_end();
        if field.is_empty() {
            break;
        }
        if let Some((name, value)) = field.split_once(':') {
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let mut request = ReceivedRequest {
        line: line.trim_end().to_owned(),
        headers,
        body: Vec::new(),
    };
    if request
        .header("transfer-encoding")
        .is_some_and(|coding| coding.eq_ignore_ascii_case("chunked"))
    {
        request.body = read_chunked(reader)?;
        return Some(request);
    }
    let length = request
        .header("content-length")
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    request.body = vec![0u8; length];
    reader.read_exact(&mut request.body).ok()?;
    Some(request)
}

/// A chunked body (its trailers skipped).
fn read_chunked(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let size = line.split(';').next()?.trim();
        let size = usize::from_str_radix(size, 16).ok()?;
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                let mut field = String::new();
                if reader.read_line(&mut field).ok()? == 0 || field.trim_end().is_empty() {
                    return Some(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).ok()?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf).ok()?;
    }
}
