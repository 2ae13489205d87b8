//! Two mesh nodes on one machine, shared by the multi-node end-to-end tests and the control
//! benchmark: network namespaces `node-a` and `node-b` on a bridge, a real `mesh-agent` in
//! each (its own cgroup tree, pins and policy folder; identities from one local CA folder),
//! workload servers (`mesh-loadgen http-server` and `serve`) in node B's namespace, and a
//! captured workload `client` on node A. Node A reaches node B's agents only through the
//! mutual-TLS tunnel.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{ChildStdout, Command, Output, Stdio},
};

use serde_json::Value;

use crate::{
    AgentOptions, AgentProcess, CgroupTree, HarnessError, KillOnDrop, NodeLaunch, TempDir,
    io_error,
    netns::{NetNode, Network},
    read_lines_until, target_profile_dir,
};

pub const TRUST_DOMAIN: &str = "mesh.e2e";
pub const TUNNEL_PORT: u16 = 15008;
/// Node B's `mesh-loadgen http-server` (agent `web`).
pub const HTTP_PORT: u16 = 8080;
/// Node B's `mesh-loadgen serve`, the request/response and bulk peer (agent `echo`).
pub const RR_PORT: u16 = 9090;
/// What `mesh-loadgen http-server` answers a GET with.
pub const HTTP_GET_BODY: &str = "hello from the mesh-loadgen upstream";

/// Which binaries the nodes run.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `None`: the agent next to the test binaries (`mesh_agent_binary`).
    pub agent: Option<PathBuf>,
    pub loadgen: PathBuf,
    pub log_filter: String,
}

impl Binaries {
    /// The build of the running test (debug for `cargo test`), or `MESH_E2E_AGENT_BINARY`.
    pub fn of_this_build() -> Self {
        Binaries {
            agent: std::env::var_os("MESH_E2E_AGENT_BINARY").map(PathBuf::from),
            loadgen: target_profile_dir().join("mesh-loadgen"),
            log_filter: "info,mesh_agent=debug".into(),
        }
    }
}

fn quote(text: &str) -> String {
    Value::String(text.to_owned()).to_string()
}

/// The registry both nodes share: `web` (HTTP) and `echo` (the benchmark protocol), both on
/// node B.
pub fn registry(b: &NetNode) -> String {
    format!(
        r#"apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata: {{name: web}}
spec:
  endpoints: [{{address: "{b}:{HTTP_PORT}", node: node-b}}]
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata: {{name: echo}}
spec:
  endpoints: [{{address: "{b}:{RR_PORT}", node: node-b}}]
"#,
        b = b.address
    )
}

/// Node B's policy: `allowed` may call both agents.
pub fn access(allowed: &str) -> String {
    let mut text = String::new();
    for target in ["web", "echo"] {
        text.push_str(&format!(
            r#"---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: {target}-access}}
spec:
  targetAgent: {target}
  action: Allow
  rules: [{{from: [{allowed}]}}]
"#
        ));
    }
    text
}

/// Two nodes, an agent on each, the workload servers on node B. Fields drop in order:
/// processes first, the namespaces last.
#[derive(Debug)]
pub struct TwoNodes {
    pub a: AgentProcess,
    pub b: AgentProcess,
    _servers: Vec<(KillOnDrop, ChildStdout)>,
    pub client: PathBuf,
    pub tree_a: CgroupTree,
    _tree_b: CgroupTree,
    pub work: TempDir,
    pub network: Network,
    pub binaries: Binaries,
}

impl TwoNodes {
    /// Node B's policy lets `b_allows` call its agents; node A's allows everything.
    pub fn start(label: &str, b_allows: &str) -> Result<Self, HarnessError> {
        Self::start_with(
            label,
            b_allows,
            |_| String::new(),
            Binaries::of_this_build(),
        )
    }

    /// As [`TwoNodes::start`], with more resources for both nodes (made from node B) and
    /// the given binaries.
    pub fn start_with(
        label: &str,
        b_allows: &str,
        extra: impl Fn(&NetNode) -> String,
        binaries: Binaries,
    ) -> Result<Self, HarnessError> {
        if !binaries.loadgen.exists() {
            return Err(HarnessError::MissingBinary(binaries.loadgen.clone()));
        }
        let network = Network::create(label, 2)?;
        let work = TempDir::new(label)?;
        let (node_a, node_b) = (network.node(0).clone(), network.node(1).clone());
        let policies_a = work.0.join("policies-a");
        let policies_b = work.0.join("policies-b");
        let write = |dir: &Path, text: String| {
            fs::create_dir_all(dir)
                .and_then(|()| fs::write(dir.join("mesh.yaml"), text))
                .map_err(io_error("writing a policy folder"))
        };
        let extra = extra(&node_b);
        write(&policies_a, format!("{}{extra}", registry(&node_b)))?;
        write(
            &policies_b,
            format!("{}{}{extra}", registry(&node_b), access(b_allows)),
        )?;
        // One CA folder for both agents (the standalone local CA): one trust domain.
        let ca_dir = work.0.join("ca");
        let spec = |peer: &NetNode, peer_name: &str| {
            format!(
                "  identity:\n    trustDomain: {TRUST_DOMAIN}\n    localCa: {{ dir: {} }}\n  tunnel:\n    peers: [{{ node: {peer_name}, address: \"{}:{TUNNEL_PORT}\" }}]\n",
                quote(&ca_dir.to_string_lossy()),
                peer.address
            )
        };
        // The workload servers of node B, in its namespace.
        let mut servers = Vec::new();
        for (mode, port) in [("http-server", HTTP_PORT), ("serve", RR_PORT)] {
            let mut child = node_b
                .command(&binaries.loadgen.to_string_lossy())
                .args([mode, "--listen", &format!("{}:{port}", node_b.address)])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(io_error("starting a workload server on node B"))?;
            let stdout = child.stdout.take();
            let server = KillOnDrop(child);
            let Some(mut stdout) = stdout else {
                return Err(HarnessError::CommandFailed {
                    command: format!("mesh-loadgen {mode}"),
                    output: "no stdout".into(),
                });
            };
            let lines = read_lines_until(&mut stdout, |line| line.starts_with("listening"));
            if !lines.iter().any(|line| line.starts_with("listening")) {
                return Err(HarnessError::CommandFailed {
                    command: format!("mesh-loadgen {mode}"),
                    output: format!("did not start: {lines:?}"),
                });
            }
            servers.push((server, stdout));
        }
        let options = |agent_cgroup: PathBuf, workloads: Vec<(String, PathBuf)>, policy: &Path| {
            AgentOptions {
                accelerate: false,
                l7: true,
                workloads,
                exclude_ports: vec![],
                exclude_cidrs: vec![],
                agent_cgroup,
                log_filter: binaries.log_filter.clone(),
                agent_binary: binaries.agent.clone(),
                policy_dir: Some(policy.to_path_buf()),
            }
        };
        let tree_b = CgroupTree::create(&format!("{label}-b"))?;
        let b = AgentProcess::start_node(
            &tree_b,
            options(tree_b.child("agent")?, vec![], &policies_b),
            NodeLaunch {
                name: "node-b".into(),
                tunnel: SocketAddr::new(node_b.address.into(), TUNNEL_PORT),
                launcher: node_b.launcher(),
            },
            &spec(&node_a, "node-a"),
        )?;
        let tree_a = CgroupTree::create(&format!("{label}-a"))?;
        let client = tree_a.child("client")?;
        let a = AgentProcess::start_node(
            &tree_a,
            options(
                tree_a.child("agent")?,
                vec![("client".into(), client.clone())],
                &policies_a,
            ),
            NodeLaunch {
                name: "node-a".into(),
                tunnel: SocketAddr::new(node_a.address.into(), TUNNEL_PORT),
                launcher: node_a.launcher(),
            },
            &spec(&node_b, "node-b"),
        )?;
        Ok(TwoNodes {
            a,
            b,
            _servers: servers,
            client,
            tree_a,
            _tree_b: tree_b,
            work,
            network,
            binaries,
        })
    }

    pub fn node_a(&self) -> &NetNode {
        self.network.node(0)
    }

    pub fn node_b(&self) -> &NetNode {
        self.network.node(1)
    }

    /// Runs `program args` as the captured workload `client` on node A.
    pub fn run_client(&self, program: &Path, args: &[&str]) -> Result<Output, HarnessError> {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.node_a().path().display()))
            .arg("--")
            .arg(program)
            .args(args);
        self.tree_a.run_in(&self.client, &mut command)
    }

    /// `mesh-loadgen <args>` as the client workload (through the mesh), parsed.
    pub fn loadgen_through_mesh(&self, args: &[&str]) -> Result<Value, HarnessError> {
        parse_report(&self.run_client(&self.binaries.loadgen, args)?)
    }

    /// `mesh-loadgen <args>` from node A's namespace, not captured: plain TCP between the
    /// nodes.
    pub fn loadgen_plain(&self, args: &[&str]) -> Result<Value, HarnessError> {
        let output = self
            .node_a()
            .command(&self.binaries.loadgen.to_string_lossy())
            .args(args)
            .output()
            .map_err(io_error("running mesh-loadgen"))?;
        parse_report(&output)
    }

    /// One unlabelled value of `agent`'s `/metrics`, read inside `node`'s namespace.
    pub fn metric(agent: &AgentProcess, node: &NetNode, name: &str) -> Result<f64, HarnessError> {
        let metrics = metrics_in(node, agent.admin_port)?;
        metrics
            .lines()
            .find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|value| value.trim().parse().ok())
            })
            .ok_or_else(|| HarnessError::CommandFailed {
                command: format!("GET /metrics ({name})"),
                output: metrics,
            })
    }
}

/// A `mesh-loadgen` JSON report.
pub fn parse_report(output: &Output) -> Result<Value, HarnessError> {
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim()).map_err(|error| HarnessError::CommandFailed {
        command: "mesh-loadgen".into(),
        output: format!(
            "{error}: {text} {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

/// The admin endpoint's `/metrics`, read from inside the node's namespace.
pub fn metrics_in(node: &NetNode, port: u16) -> Result<String, HarnessError> {
    let scrape = node.run_in(move || -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })?;
    match scrape.join() {
        Ok(Some(Ok(text))) => Ok(text),
        Ok(Some(Err(error))) => Err(HarnessError::Io {
            what: "scraping the admin endpoint".into(),
            source: error,
        }),
        Ok(None) | Err(_) => Err(HarnessError::CommandFailed {
            command: "scraping the admin endpoint".into(),
            output: "the thread in the node's namespace did not finish".into(),
        }),
    }
}
