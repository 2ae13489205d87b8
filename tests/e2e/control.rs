//! End-to-end tests of the control plane in etcd: a real etcd (Debian's, on free loopback
//! ports, its own data folder), the real `meshctl` binary, and real agents in etcd mode
//! capturing a workload's connections in a cgroup of the test's own. Nothing is mocked.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    AgentOptions, AgentProcess, CgroupTree,
    etcd::{AgentEtcd, EtcdServer, meshctl},
    unique_name,
};

const HEAD: &str = "apiVersion: mesh.agentmesh.dev/v1alpha1\n";

fn agent_doc(name: &str, host: &str, address: SocketAddr) -> String {
    format!(
        "{HEAD}kind: Agent\nmetadata:\n  name: {name}\nspec:\n  hosts: [{host}]\n  protocol: Mcp\n  endpoints:\n    - address: \"{address}\"\n  capabilities:\n    mcpTools: [add, search]\n"
    )
}

fn policy_doc(name: &str, target: &str, action: &str, from: &str, tools: &str) -> String {
    format!(
        "{HEAD}kind: AccessPolicy\nmetadata:\n  name: {name}\nspec:\n  targetAgent: {target}\n  action: {action}\n  rules:\n    - from: [{from}]\n      mcp:\n        tools: [{tools}]\n"
    )
}

/// A file of resources in a fresh folder.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_name("control-files"));
        fs::create_dir_all(&dir).unwrap();
        Files { dir }
    }

    fn write(&self, name: &str, documents: &[String]) -> String {
        let path = self.dir.join(name);
        fs::write(&path, documents.join("---\n")).unwrap();
        path.to_string_lossy().into_owned()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn text(output: &Output) -> (i32, String, String) {
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs meshctl and expects exit code `code`; returns (stdout, stderr).
fn ctl(etcd: &EtcdServer, args: &[&str], code: i32) -> (String, String) {
    let (status, stdout, stderr) = text(&etcd.meshctl(args).unwrap());
    assert_eq!(
        status, code,
        "meshctl {args:?}: exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

fn mesh_keys(etcd: &EtcdServer) -> Vec<String> {
    etcd.keys("/mesh/v1/").unwrap()
}

#[test]
fn meshctl_apply_get_delete_validate_round_trip() {
    let etcd = EtcdServer::start().expect("start etcd");
    let files = Files::new();
    let tools: SocketAddr = "10.0.0.7:8080".parse().unwrap();
    let file = files.write(
        "mesh.yaml",
        &[
            agent_doc("tools", "tools.mesh", tools),
            policy_doc("planner-tools", "tools", "Allow", "planner", "add"),
        ],
    );

    // Offline validation: no etcd needed (a dead endpoint is never contacted).
    let (status, stdout, stderr) =
        text(&meshctl("http://127.0.0.1:1", &["validate", "-f", &file]).unwrap());
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(stdout.contains("2 resources in 1 files: valid"), "{stdout}");

    let (stdout, _) = ctl(&etcd, &["apply", "-f", &file], 0);
    assert_eq!(
        stdout,
        "Agent default/tools created\nAccessPolicy default/planner-tools created\n"
    );
    assert_eq!(
        mesh_keys(&etcd),
        [
            "/mesh/v1/accesspolicies/default/planner-tools",
            "/mesh/v1/agents/default/tools"
        ]
    );
    let (stdout, _) = ctl(&etcd, &["apply", "-f", &file], 0);
    assert!(stdout.contains("Agent default/tools unchanged"), "{stdout}");
    assert!(
        stdout.contains("AccessPolicy default/planner-tools unchanged"),
        "{stdout}"
    );

    // A change to one resource of the file: configured; the other stays unchanged.
    let file = files.write(
        "mesh.yaml",
        &[
            agent_doc("tools", "tools.mesh", tools),
            policy_doc("planner-tools", "tools", "Allow", "planner", "add, search"),
        ],
    );
    let (stdout, _) = ctl(&etcd, &["-o", "json", "apply", "-f", &file], 0);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report[0]["result"], "unchanged", "{report}");
    assert_eq!(report[1]["result"], "configured", "{report}");
    assert_eq!(report[1]["kind"], "AccessPolicy", "{report}");

    // Table output.
    let (stdout, _) = ctl(&etcd, &["get", "agents"], 0);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("ENDPOINTS"),
        "{stdout}"
    );
    assert!(
        lines[1].contains("tools")
            && lines[1].contains("10.0.0.7:8080")
            && lines[1].contains("Mcp"),
        "{stdout}"
    );
    let (stdout, _) = ctl(&etcd, &["get", "ap", "-A"], 0);
    assert!(stdout.starts_with("NAMESPACE"), "{stdout}");
    assert!(stdout.contains("planner-tools"), "{stdout}");
    let (stdout, _) = ctl(&etcd, &["agents"], 0);
    assert!(
        stdout.contains("add,search"),
        "registry view shows the tools: {stdout}"
    );

    // JSON output of one resource, with defaults filled in.
    let (stdout, _) = ctl(
        &etcd,
        &["get", "accesspolicy", "planner-tools", "-o", "json"],
        0,
    );
    let policy: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(policy["metadata"]["namespace"], "default");
    assert_eq!(
        policy["spec"]["rules"][0]["mcp"]["tools"],
        serde_json::json!(["add", "search"])
    );

    // YAML output applies again, unchanged.
    let (yaml, _) = ctl(&etcd, &["get", "agents", "-o", "yaml"], 0);
    let exported = files.write("exported.yaml", &[yaml]);
    let (stdout, _) = ctl(&etcd, &["apply", "-f", &exported], 0);
    assert_eq!(stdout, "Agent default/tools unchanged\n");

    // Delete; a second delete and a get are "not found" (exit 1).
    let (stdout, _) = ctl(&etcd, &["delete", "ap", "planner-tools"], 0);
    assert_eq!(stdout, "AccessPolicy default/planner-tools deleted\n");
    let (_, stderr) = ctl(&etcd, &["delete", "ap", "planner-tools"], 1);
    assert!(stderr.contains("not found"), "{stderr}");
    let (_, stderr) = ctl(&etcd, &["get", "ap", "planner-tools"], 1);
    assert!(stderr.contains("not found"), "{stderr}");
    assert_eq!(mesh_keys(&etcd), ["/mesh/v1/agents/default/tools"]);

    // Usage errors exit 2; no nodes is not an error.
    ctl(&etcd, &["get", "pods"], 2);
    ctl(&etcd, &["apply"], 2);
    let (stdout, _) = ctl(&etcd, &["nodes"], 0);
    assert!(stdout.is_empty(), "{stdout}");
}

#[test]
fn invalid_resources_are_refused_by_apply_and_flagged_on_read() {
    let etcd = EtcdServer::start().expect("start etcd");
    let files = Files::new();
    let good = agent_doc("tools", "tools.mesh", "10.0.0.7:8080".parse().unwrap());
    let bad = format!(
        "{HEAD}kind: AccessPolicy\nmetadata:\n  name: broken\nspec:\n  targetAgent: tools\n  rules:\n    - from: []\n"
    );
    let third = policy_doc("fine", "tools", "Allow", "planner", "add");

    // One invalid resource among three: the file writes nothing, the field is named.
    let mixed = files.write("mixed.yaml", &[good.clone(), bad, third.clone()]);
    let (_, stderr) = ctl(&etcd, &["apply", "-f", &mixed], 3);
    assert!(
        stderr.contains("AccessPolicy default/broken: spec.rules[0].from"),
        "{stderr}"
    );
    assert!(stderr.contains("mixed.yaml (document 2)"), "{stderr}");
    assert!(stderr.contains("nothing was written"), "{stderr}");
    assert!(mesh_keys(&etcd).is_empty(), "{:?}", mesh_keys(&etcd));
    // validate says the same, offline.
    let (_, stderr) = ctl(&etcd, &["validate", "-f", &mixed], 3);
    assert!(stderr.contains("spec.rules[0].from"), "{stderr}");

    // A valid file next to an invalid one in the same apply: nothing is written either.
    let valid = files.write("valid.yaml", &[good.clone(), third]);
    let typo = files.write(
        "typo.yaml",
        &[format!(
            "{HEAD}kind: TrafficPolicy\nmetadata:\n  name: t\nspec:\n  targetAgent: tools\n  retries: {{attempts: 99}}\n"
        )],
    );
    let (_, stderr) = ctl(&etcd, &["apply", "-f", &valid, "-f", &typo], 3);
    assert!(stderr.contains("spec.retries.attempts"), "{stderr}");
    assert!(mesh_keys(&etcd).is_empty());

    // Valid resources that conflict with what etcd holds (a second agent claiming the host):
    // refused before writing, since every agent would refuse the set.
    ctl(&etcd, &["apply", "-f", &valid], 0);
    let thief = files.write(
        "thief.yaml",
        &[agent_doc(
            "thief",
            "tools.mesh",
            "10.0.0.8:8080".parse().unwrap(),
        )],
    );
    let (_, stderr) = ctl(&etcd, &["apply", "-f", &thief], 3);
    assert!(stderr.contains("tools.mesh"), "{stderr}");
    assert!(!mesh_keys(&etcd).iter().any(|key| key.ends_with("/thief")));

    // Deleting an agent another one falls back to is refused: agents would refuse the rest.
    let backup = files.write(
        "backup.yaml",
        &[
            agent_doc("backup", "backup.mesh", "10.0.0.9:8080".parse().unwrap())
                + "  fallback: tools\n",
        ],
    );
    ctl(&etcd, &["apply", "-f", &backup], 0);
    let (_, stderr) = ctl(&etcd, &["delete", "agent", "tools"], 3);
    assert!(
        stderr.contains("Agent default/tools was not deleted") && stderr.contains("fallback"),
        "{stderr}"
    );
    assert!(mesh_keys(&etcd).contains(&"/mesh/v1/agents/default/tools".to_owned()));

    // A value written past meshctl is validated on read: named by key and field, exit 3,
    // while the valid resources are still listed.
    etcd.etcdctl(&[
        "put",
        "/mesh/v1/agents/default/raw",
        r#"{"apiVersion":"mesh.agentmesh.dev/v1alpha1","kind":"Agent","metadata":{"name":"raw"},"spec":{"endpoints":[]}}"#,
    ])
    .unwrap();
    let (stdout, stderr) = ctl(&etcd, &["get", "agents"], 3);
    assert!(stdout.contains("tools"), "{stdout}");
    assert!(
        stderr.contains("/mesh/v1/agents/default/raw") && stderr.contains("spec.endpoints"),
        "{stderr}"
    );

    // etcd unreachable: exit 4, the cause and the fix named.
    let (status, _, stderr) = text(&meshctl("http://127.0.0.1:1", &["get", "agents"]).unwrap());
    assert_eq!(status, 4, "{stderr}");
    assert!(
        stderr.contains("cannot reach etcd at http://127.0.0.1:1") && stderr.contains("MESH_ETCD"),
        "{stderr}"
    );
}

#[test]
fn check_answers_allow_and_deny_with_the_deciding_rule() {
    let etcd = EtcdServer::start().expect("start etcd");
    let files = Files::new();
    let file = files.write(
        "mesh.yaml",
        &[
            agent_doc("tools", "tools.mesh", "10.0.0.7:8080".parse().unwrap()),
            policy_doc("planner-tools", "tools", "Allow", "planner", "add"),
            policy_doc("no-intruders", "\"*\"", "Deny", "intruder", "\"*\""),
        ],
    );
    ctl(&etcd, &["apply", "-f", &file], 0);

    let (stdout, _) = ctl(
        &etcd,
        &[
            "check", "--from", "planner", "--to", "tools", "--tool", "add",
        ],
        0,
    );
    assert!(stdout.starts_with("allow\n"), "{stdout}");
    assert!(
        stdout.contains("AccessPolicy default/planner-tools"),
        "{stdout}"
    );
    assert!(stdout.contains("spec.rules[0]"), "{stdout}");

    // Not in the allow-list: denied, no rule allows it.
    let (stdout, _) = ctl(
        &etcd,
        &[
            "check",
            "--from",
            "planner",
            "--to",
            "tools.mesh",
            "--tool",
            "search",
        ],
        1,
    );
    assert!(stdout.starts_with("deny\n"), "{stdout}");
    assert!(stdout.contains("no AccessPolicy rule allows"), "{stdout}");

    // A Deny rule decides, and is named.
    let (stdout, _) = ctl(
        &etcd,
        &[
            "-o", "json", "check", "--from", "intruder", "--to", "tools", "--tool", "add",
        ],
        1,
    );
    let decision: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(decision["allowed"], false, "{decision}");
    assert_eq!(decision["policy"], "default/no-intruders", "{decision}");
    assert_eq!(decision["rule"], 0, "{decision}");
    assert_eq!(decision["ruleSpec"]["from"][0], "intruder", "{decision}");
}

/// An HTTP/1.1 server in this process answering 200 "ok" to every request.
/// A backend, and a folder whose `registry.yaml` registers it as the agent `tools` (host
/// `tools.mesh`): the backend's address, the folder and the file's path.
fn tools_registry() -> (SocketAddr, Files, String) {
    let backend = start_backend();
    let files = Files::new();
    let registry = files.write(
        "registry.yaml",
        &[agent_doc("tools", "tools.mesh", backend)],
    );
    (backend, files, registry)
}

fn start_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            thread::spawn(move || serve(stream));
        }
    });
    address
}

fn serve(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut length = 0usize;
        let mut first = true;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() && !first {
                break;
            }
            first = false;
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err()
            || writer
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok",
                )
                .is_err()
        {
            return;
        }
    }
}

/// An agent in etcd mode with one enrolled workload, "planner".
struct EtcdMesh {
    agent: AgentProcess,
    planner: PathBuf,
    work: PathBuf,
    tree: CgroupTree,
}

impl EtcdMesh {
    fn start(label: &str, etcd: &EtcdServer) -> Self {
        Self::start_with(label, |work| AgentEtcd::new(etcd, work))
    }

    /// An agent whose etcd settings `settings` makes (given the agent's work folder).
    fn start_with(label: &str, settings: impl FnOnce(&Path) -> AgentEtcd) -> Self {
        Self::start_with_spec(label, "", settings)
    }

    /// As [`EtcdMesh::start_with`], adding `extra_spec` to the agent's `spec`.
    fn start_with_spec(
        label: &str,
        extra_spec: &str,
        settings: impl FnOnce(&Path) -> AgentEtcd,
    ) -> Self {
        let tree = CgroupTree::create(label).expect("create cgroup tree");
        let agent_cgroup = tree.child("agent").unwrap();
        let planner = tree.child("planner").unwrap();
        let work = std::env::temp_dir().join(unique_name("control-agent"));
        fs::create_dir_all(&work).unwrap();
        let agent = AgentProcess::start_with_spec(
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
                policy_dir: None,
            },
            Some(settings(&work)),
            extra_spec,
        )
        .expect("start agent");
        EtcdMesh {
            agent,
            planner,
            work,
            tree,
        }
    }

    fn cache_file(&self) -> PathBuf {
        self.work.join("etcd-cache.json")
    }

    /// An MCP `tools/call` of `tool` from the planner to `address`; the HTTP status.
    fn call(&self, address: SocketAddr, tool: &str) -> u16 {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}","arguments":{{}}}}}}"#
        );
        let output = self
            .tree
            .run_in(
                &self.planner,
                Command::new("curl").args([
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "10",
                    "-H",
                    "content-type: application/json",
                    "-H",
                    "accept: application/json, text/event-stream",
                    "--data",
                    &body,
                    &format!("http://{address}/mcp"),
                ]),
            )
            .unwrap();
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    fn metrics(&self) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.agent.admin_port)).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    }

    fn metric(&self, name: &str) -> f64 {
        let metrics = self.metrics();
        metrics
            .lines()
            .find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|value| value.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    }

    /// Waits until `meshctl nodes` shows this agent's node record, ready.
    fn wait_for_node_record(&self, etcd: &EtcdServer) {
        self.wait_for("the node record", Duration::from_secs(30), || {
            let (status, stdout, _) = text(&etcd.meshctl(&["nodes"]).unwrap());
            status == 0 && stdout.contains("e2e") && stdout.contains("Ready")
        });
    }

    /// Polls until `condition` holds; returns how long it took.
    fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut() -> bool,
    ) -> Duration {
        let start = Instant::now();
        while !condition() {
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; agent log:\n{}",
                self.agent.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
        start.elapsed()
    }
}

impl Drop for EtcdMesh {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.work);
    }
}

#[test]
fn an_agent_enforces_a_policy_applied_with_meshctl() {
    let etcd = EtcdServer::start().expect("start etcd");
    let (backend, files, registry) = tools_registry();
    ctl(&etcd, &["apply", "-f", &registry], 0);

    let mesh = EtcdMesh::start("control-enforce", &etcd);
    assert_eq!(mesh.metric("mesh_control_connected"), 1.0);
    assert!(mesh.agent.log().contains("policy loaded from etcd"));
    // No AccessPolicy yet: the destination is open.
    assert_eq!(mesh.call(backend, "search"), 200);

    // The agent registered its node record.
    mesh.wait_for_node_record(&etcd);

    let policy = files.write(
        "policy.yaml",
        &[policy_doc(
            "planner-tools",
            "tools",
            "Allow",
            "planner",
            "add",
        )],
    );
    ctl(&etcd, &["apply", "-f", &policy], 0);
    let applied = Instant::now();
    // Poll through the mesh until the agent enforces the new policy.
    mesh.wait_for("the policy to be enforced", Duration::from_secs(30), || {
        mesh.call(backend, "search") == 403
    });
    let elapsed = applied.elapsed();
    println!(
        "apply -> enforcement: {:.1} ms (meshctl apply returned, until a call through the mesh was denied)",
        elapsed.as_secs_f64() * 1000.0
    );
    assert_eq!(
        mesh.call(backend, "add"),
        200,
        "the allowed tool still passes"
    );

    // Delete: open again.
    ctl(&etcd, &["delete", "ap", "planner-tools"], 0);
    mesh.wait_for("the deletion to apply", Duration::from_secs(30), || {
        mesh.call(backend, "search") == 200
    });
    assert!(mesh.metric("mesh_control_sync_revision") >= 3.0);
    assert!(mesh.metric("mesh_control_snapshot_age_seconds") < 60.0);

    // A bad value written past meshctl: rejected, counted, the last good version stays.
    ctl(&etcd, &["apply", "-f", &policy], 0);
    mesh.wait_for("the policy again", Duration::from_secs(30), || {
        mesh.call(backend, "search") == 403
    });
    etcd.etcdctl(&[
        "put",
        "/mesh/v1/accesspolicies/default/planner-tools",
        r#"{"apiVersion":"mesh.agentmesh.dev/v1alpha1","kind":"AccessPolicy","metadata":{"name":"planner-tools"},"spec":{"targetAgent":"tools","rules":[{"from":[]}]}}"#,
    ])
    .unwrap();
    mesh.wait_for(
        "the rejection to be counted",
        Duration::from_secs(30),
        || mesh.metric("mesh_control_invalid_resources") == 1.0,
    );
    assert!(mesh.metric("mesh_control_rejected_updates_total") >= 1.0);
    assert_eq!(
        mesh.call(backend, "search"),
        403,
        "the last good policy stays in force"
    );
    assert_eq!(mesh.call(backend, "add"), 200);
    assert!(
        mesh.agent.log().contains("spec.rules[0].from"),
        "the agent logs the rejected field"
    );
}

#[test]
fn an_agent_rides_out_compaction_and_etcd_outages_and_starts_from_its_cache() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    let (backend, files, registry) = tools_registry();
    let lock = files.write(
        "lock.yaml",
        &[policy_doc("lock", "tools", "Allow", "nobody", "add")],
    );
    ctl(&etcd, &["apply", "-f", &registry], 0);
    let mut mesh = EtcdMesh::start("control-outage", &etcd);
    assert_eq!(mesh.call(backend, "add"), 200);

    // Compaction while the agent runs: apply, compact, apply more; the agent converges.
    ctl(&etcd, &["apply", "-f", &lock], 0);
    mesh.wait_for("the lock", Duration::from_secs(30), || {
        mesh.call(backend, "add") == 403
    });
    for index in 0..5 {
        let extra = files.write(
            &format!("extra-{index}.yaml"),
            &[agent_doc(
                &format!("extra-{index}"),
                &format!("extra-{index}.mesh"),
                format!("10.0.1.{}:80", index + 1).parse().unwrap(),
            )],
        );
        ctl(&etcd, &["apply", "-f", &extra], 0);
    }
    let compacted = etcd.compact().expect("compact");
    ctl(&etcd, &["delete", "agent", "extra-0"], 0);
    let unlock = files.write(
        "lock.yaml",
        &[policy_doc("lock", "tools", "Allow", "planner", "add")],
    );
    ctl(&etcd, &["apply", "-f", &unlock], 0);
    mesh.wait_for(
        "convergence after compaction",
        Duration::from_secs(30),
        || mesh.call(backend, "add") == 200,
    );
    assert!(mesh.metric("mesh_control_sync_revision") as i64 > compacted);
    assert!(
        mesh.metric("mesh_control_snapshot_revision") as i64 > compacted,
        "the enforced snapshot was built after the compaction"
    );
    assert_eq!(mesh.call(backend, "search"), 403);
    println!("compacted at revision {compacted}; the agent converged past it");

    // etcd stops: the agent notices and keeps enforcing its last good snapshot.
    etcd.stop();
    mesh.wait_for(
        "the agent to notice etcd is gone",
        Duration::from_secs(60),
        || mesh.metric("mesh_control_connected") == 0.0,
    );
    assert_eq!(mesh.call(backend, "add"), 200);
    assert_eq!(
        mesh.call(backend, "search"),
        403,
        "the policy stays enforced without etcd"
    );
    assert!(mesh.agent.log().contains("lost etcd"));

    // Restarted while etcd is still down: it starts from the cache file.
    assert!(mesh.cache_file().is_file(), "the cache file exists");
    let tree = &mesh.tree;
    let agent = &mut mesh.agent;
    agent.restart(tree).expect("restart the agent without etcd");
    assert!(
        mesh.agent
            .log()
            .contains("serving the last good resources from the cache"),
        "{}",
        mesh.agent.log()
    );
    assert_eq!(mesh.metric("mesh_control_serving_cache"), 1.0);
    assert_eq!(
        mesh.call(backend, "search"),
        403,
        "the cached policy is enforced"
    );
    assert_eq!(mesh.call(backend, "add"), 200, "the cached registry routes");

    // etcd back, with a change made right away: the agent catches up.
    etcd.start_again().expect("etcd back");
    ctl(&etcd, &["delete", "ap", "lock"], 0);
    let back = Instant::now();
    mesh.wait_for("the agent to catch up", Duration::from_secs(90), || {
        mesh.call(backend, "search") == 200
    });
    println!(
        "etcd back -> agent caught up: {:.1} ms after `meshctl delete` returned (reconnection backoff included)",
        back.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(mesh.metric("mesh_control_connected"), 1.0);
    assert_eq!(mesh.metric("mesh_control_serving_cache"), 0.0);
    mesh.wait_for("the node record again", Duration::from_secs(30), || {
        let (status, stdout, _) = text(&etcd.meshctl(&["nodes"]).unwrap());
        status == 0 && stdout.contains("e2e")
    });
    let cached = fs::read_to_string(mesh.cache_file()).unwrap();
    assert!(
        !cached.contains("\"lock\""),
        "the cache follows etcd: the deleted policy is gone from it"
    );
    assert!(Path::new(&mesh.cache_file()).is_file());
}

#[test]
fn etcd_over_tls_with_client_certificates_serves_meshctl_and_agents() {
    let etcd = EtcdServer::start_tls().expect("start etcd with TLS");
    let files_tls = etcd.tls.clone().expect("TLS files");
    let (backend, files, registry) = tools_registry();
    // meshctl with the CA and a client certificate: applies and reads back.
    ctl(&etcd, &["apply", "-f", &registry], 0);
    let (stdout, _) = ctl(&etcd, &["get", "agents"], 0);
    assert!(stdout.contains("tools"), "{stdout}");

    // Without a client certificate etcd refuses the handshake: nothing is read.
    let ca = format!("--etcd-ca={}", files_tls.ca.display());
    let (status, stdout, stderr) =
        text(&meshctl(&etcd.endpoint(), &[&ca, "--timeout=2s", "get", "agents"]).unwrap());
    assert_ne!(status, 0, "no client certificate: {stdout}");
    assert!(!stdout.contains("tools"), "{stdout}");
    assert!(!stderr.is_empty());
    // An https endpoint without TLS settings is a usage error naming the fix.
    let (status, _, stderr) = text(&meshctl(&etcd.endpoint(), &["get", "agents"]).unwrap());
    assert_eq!(status, 2, "{stderr}");
    assert!(stderr.contains("--etcd-ca"), "{stderr}");
    // A CA that did not sign etcd's certificate: the server is not trusted.
    let other = std::env::temp_dir().join(unique_name("other-ca"));
    fs::create_dir_all(&other).unwrap();
    let other_files = mesh_tests::etcd::EtcdTlsFiles::generate(&other).unwrap();
    let (status, stdout, _) = text(
        &meshctl(
            &etcd.endpoint(),
            &[
                &format!("--etcd-ca={}", other_files.ca.display()),
                &format!("--etcd-cert={}", files_tls.client_cert.display()),
                &format!("--etcd-key={}", files_tls.client_key.display()),
                "--timeout=2s",
                "get",
                "agents",
            ],
        )
        .unwrap(),
    );
    let _ = fs::remove_dir_all(&other);
    assert_ne!(status, 0, "untrusted etcd certificate: {stdout}");

    // An agent configured with spec.etcd.tls syncs over TLS and enforces what meshctl applies.
    let mesh = EtcdMesh::start("control-tls", &etcd);
    assert_eq!(mesh.metric("mesh_control_connected"), 1.0);
    assert_eq!(mesh.call(backend, "search"), 200);
    let policy = files.write(
        "policy.yaml",
        &[policy_doc(
            "planner-tools",
            "tools",
            "Allow",
            "planner",
            "add",
        )],
    );
    ctl(&etcd, &["apply", "-f", &policy], 0);
    mesh.wait_for("the policy to be enforced", Duration::from_secs(30), || {
        mesh.call(backend, "search") == 403
    });
    assert_eq!(mesh.call(backend, "add"), 200);
}

#[test]
fn an_agent_keeps_syncing_when_a_member_of_a_three_member_etcd_cluster_is_lost() {
    let mut members = EtcdServer::start_cluster(3).expect("start a three-member etcd cluster");
    let endpoints = members
        .iter()
        .map(EtcdServer::endpoint)
        .collect::<Vec<_>>()
        .join(",");
    let (backend, files, registry) = tools_registry();
    ctl(&members[0], &["apply", "-f", &registry], 0);
    let mesh = EtcdMesh::start_with("control-cluster", |work| AgentEtcd {
        endpoint: endpoints.clone(),
        ..AgentEtcd::new(&members[0], work)
    });
    assert_eq!(mesh.call(backend, "search"), 200);
    let lock = files.write(
        "lock.yaml",
        &[policy_doc("lock", "tools", "Allow", "planner", "add")],
    );
    ctl(&members[1], &["apply", "-f", &lock], 0);
    mesh.wait_for(
        "the policy from the cluster",
        Duration::from_secs(30),
        || mesh.call(backend, "search") == 403,
    );

    // Lose each member in turn (one at a time: the other two keep quorum); every change
    // written through a surviving member reaches the agent.
    for lost in 0..3 {
        members[lost].stop();
        let survivor = &members[(lost + 1) % 3];
        // Losing the leader means an election: wait until the survivors serve again, as an
        // operator would before writing.
        let start = Instant::now();
        while survivor.etcdctl(&["endpoint", "health"]).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no quorum after losing one member"
            );
            thread::sleep(Duration::from_millis(50));
        }
        let open = lost % 2 == 0;
        let tools = if open { "add, search" } else { "add" };
        let policy = files.write(
            "lock.yaml",
            &[policy_doc("lock", "tools", "Allow", "planner", tools)],
        );
        ctl(survivor, &["apply", "-f", &policy], 0);
        let applied = Instant::now();
        let expected = if open { 200 } else { 403 };
        mesh.wait_for(
            &format!("the change made with member {lost} down"),
            Duration::from_secs(60),
            || mesh.call(backend, "search") == expected,
        );
        println!(
            "member {lost} down: change enforced {:.0} ms after meshctl apply returned",
            applied.elapsed().as_secs_f64() * 1000.0
        );
        members[lost].start_again().expect("the member rejoins");
    }
    mesh.wait_for("the agent connected", Duration::from_secs(60), || {
        mesh.metric("mesh_control_connected") == 1.0
    });
    assert_eq!(mesh.call(backend, "add"), 200);
}

/// `etcd`'s TLS files with the client certificate of `user` (its common name).
fn as_user(etcd: &EtcdServer, user: &str) -> mesh_tests::etcd::EtcdTlsFiles {
    let files = etcd.tls.clone().expect("TLS files");
    let (client_cert, client_key) = files.client_for(user).expect("client certificate");
    mesh_tests::etcd::EtcdTlsFiles {
        client_cert,
        client_key,
        ..files
    }
}

/// meshctl against `etcd` with `files`' client certificate: (exit code, stdout, stderr).
fn ctl_as(
    etcd: &EtcdServer,
    files: &mesh_tests::etcd::EtcdTlsFiles,
    args: &[&str],
) -> (i32, String, String) {
    let mut all = vec![
        format!("--etcd-ca={}", files.ca.display()),
        format!("--etcd-cert={}", files.client_cert.display()),
        format!("--etcd-key={}", files.client_key.display()),
        "--timeout=3s".to_owned(),
    ];
    all.extend(args.iter().map(|arg| (*arg).to_owned()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    text(&meshctl(&etcd.endpoint(), &all).unwrap())
}

/// A put of `key` with etcdctl as `files`' user: its output, or the error.
fn put_as(
    etcd: &EtcdServer,
    files: &mesh_tests::etcd::EtcdTlsFiles,
    key: &str,
) -> Result<String, String> {
    let output = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            &format!("--endpoints={}", etcd.endpoint()),
            &format!("--cacert={}", files.ca.display()),
            &format!("--cert={}", files.client_cert.display()),
            &format!("--key={}", files.client_key.display()),
            "--command-timeout=3s",
            "put",
            key,
            "{}",
        ])
        .output()
        .unwrap();
    let (status, stdout, stderr) = text(&output);
    if status == 0 { Ok(stdout) } else { Err(stderr) }
}

#[test]
fn etcd_roles_let_each_node_write_only_what_it_owns() {
    let mut etcd = EtcdServer::start_tls().expect("start etcd with TLS");
    let root = as_user(&etcd, "root");
    let admin = as_user(&etcd, "admin");
    let node = as_user(&etcd, "e2e");
    let intruder = as_user(&etcd, "intruder");

    // The plan can be reviewed without etcd.
    let (status, plan, _) = ctl_as(&etcd, &root, &["rbac", "--node", "e2e", "--dry-run"]);
    assert_eq!(status, 0, "{plan}");
    assert!(
        plan.contains("role mesh-node.e2e: readwrite /mesh/v1/nodes/e2e\n"),
        "{plan}"
    );

    // root sets up the roles and turns authentication on.
    let args = [
        "rbac",
        "--node",
        "e2e",
        "--signer",
        "signer",
        "--operator",
        "admin",
        "--enable",
    ];
    let (status, stdout, stderr) = ctl_as(&etcd, &root, &args);
    assert_eq!(status, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("role mesh-node: created"), "{stdout}");
    assert!(stdout.contains("authentication: enabled"), "{stdout}");
    // Again: nothing to change (authentication is already on).
    let (status, stdout, stderr) = ctl_as(&etcd, &root, &args[..args.len() - 1]);
    assert_eq!(status, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("unchanged"), "{stdout}");

    // From here on the harness's meshctl and etcdctl act as the operator.
    etcd.tls = Some(admin.clone());
    let (backend, files, registry) = tools_registry();
    ctl(&etcd, &["apply", "-f", &registry], 0);

    // A node's certificate reads the mesh but cannot change policy or the registry.
    let (status, stdout, stderr) = ctl_as(&etcd, &node, &["get", "agents"]);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("tools"), "{stdout}");
    let lock = files.write(
        "lock.yaml",
        &[policy_doc("lock", "tools", "Allow", "nobody", "add")],
    );
    let (status, _, stderr) = ctl_as(&etcd, &node, &["apply", "-f", &lock]);
    assert_ne!(status, 0, "a node applied a policy");
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(!mesh_keys(&etcd).iter().any(|key| key.contains("/lock")));
    // Nor write another node's record, the trust bundle or the signer's records.
    for key in [
        "/mesh/v1/nodes/other",
        "/mesh/v1/trustbundles/mesh-system/default",
        "/mesh/v1/signer/nonces/x",
        "/mesh/v1/agents/default/tools",
    ] {
        let error = put_as(&etcd, &node, key).expect_err(key);
        assert!(error.contains("permission denied"), "{key}: {error}");
    }
    // What it owns it may write.
    put_as(&etcd, &node, "/mesh/v1/nodes/e2e").expect("its own node record");
    put_as(&etcd, &node, "/mesh/v1/agentinstances/default/tools.e2e.1")
        .expect("an instance record");
    put_as(
        &etcd,
        &node,
        "/mesh/v1/workloadidentities/default/planner@e2e",
    )
    .expect("a workload identity record");
    for prefix in ["/mesh/v1/agentinstances/", "/mesh/v1/workloadidentities/"] {
        etcd.etcdctl(&["del", "--prefix", prefix]).unwrap();
    }
    etcd.etcdctl(&["del", "/mesh/v1/nodes/e2e"]).unwrap();
    // A certificate of the same CA whose name etcd does not know gets nothing.
    let (status, stdout, _) = ctl_as(&etcd, &intruder, &["get", "agents"]);
    assert_ne!(status, 0, "{stdout}");
    assert!(!stdout.contains("tools"), "{stdout}");

    // The signer with its certificate answers the node's certificate request; an agent with
    // the node's certificate syncs, gets its node identity, registers its node record and
    // enforces what the operator applies.
    let signer_files = as_user(&etcd, "signer");
    let signer_tls = [
        format!("--etcd-ca={}", signer_files.ca.display()),
        format!("--etcd-cert={}", signer_files.client_cert.display()),
        format!("--etcd-key={}", signer_files.client_key.display()),
    ];
    let signer_tls: Vec<&str> = signer_tls.iter().map(String::as_str).collect();
    let signer = mesh_tests::signer::SignerProcess::start(
        &etcd,
        mesh_tests::signer::SignerOptions {
            trust_domain: "mesh.local",
            certificate_ttl: "1h",
            extra: &signer_tls,
            namespace: None,
        },
    )
    .expect("start the signer with its own certificate");
    let mesh = EtcdMesh::start_with_spec(
        "control-rbac",
        "  identity:\n    requestTimeout: 10s\n",
        |work| AgentEtcd {
            tls: Some(node.clone()),
            ..AgentEtcd::new(&etcd, work)
        },
    );
    let log = mesh.agent.log();
    assert!(log.contains("node identity ready"), "{log}");
    assert!(!log.contains("PermissionDenied"), "{log}");
    assert!(
        signer.log().contains("certificate issued"),
        "{}",
        signer.log()
    );
    assert!(
        !signer.log().contains("PermissionDenied"),
        "{}",
        signer.log()
    );
    assert_eq!(mesh.call(backend, "search"), 200);
    mesh.wait_for_node_record(&etcd);
    ctl(&etcd, &["apply", "-f", &lock], 0);
    mesh.wait_for("the policy to be enforced", Duration::from_secs(30), || {
        mesh.call(backend, "search") == 403
    });
    assert_eq!(
        mesh.metric("mesh_control_connection_failures_total"),
        0.0,
        "{}",
        mesh.agent.log()
    );
}
