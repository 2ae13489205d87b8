//! `cargo xtask bench control`: the control plane's costs, against a real etcd (Debian's, on
//! loopback, its own data folder) and real agents in etcd mode (release build).
//!
//! - **apply → enforcement on three agents**: `meshctl apply` of a changed AccessPolicy, then
//!   the time until each agent's active snapshot was built from the revision the write
//!   produced (its `mesh_control_snapshot_revision`; requests are checked against that
//!   snapshot, so that is when the change is enforced).
//!   Measured from when `meshctl apply` returned; `meshctl apply` itself is reported apart.
//! - **scale**: 10k `Agent`s and 10k `AccessPolicy`s written into etcd, then one agent started:
//!   time to its first snapshot (start to ready), its memory, and the time one more change
//!   takes to be enforced with all of them loaded (every change recompiles the snapshot).
//! - **cross-node**: two nodes (network namespaces on a bridge, an agent in each): a captured
//!   workload on node A calls node B's servers through both agents and the mutual-TLS tunnel,
//!   against plain TCP between the same namespaces: request/response latency and rate, bulk
//!   throughput, new connections (one tunnel stream each, over the pooled TLS connection),
//!   HTTP GETs; each as a ratio to plain TCP. Then handshakes: new mutual-TLS tunnel
//!   connections per second that one agent accepts, with its CPU per handshake.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use mesh_tests::{
    AgentOptions, AgentProcess, CgroupTree,
    etcd::{AgentEtcd, EtcdServer},
    unique_name,
};
use serde_json::{Value, json};

use xtask::util::{step, workspace_root};

use crate::bench::{BenchArgs, LoadRun, Tools, build_release, memory_mib, write_json_report};

const HEAD: &str = "apiVersion: mesh.agentmesh.dev/v1alpha1\n";
const API_VERSION: &str = "mesh.agentmesh.dev/v1alpha1";

/// An agent in etcd mode with its cgroup tree.
struct EtcdAgent {
    agent: AgentProcess,
    _tree: CgroupTree,
}

fn start_agent(
    tools: &Tools,
    etcd: &EtcdServer,
    label: &str,
    work: &Path,
) -> anyhow::Result<EtcdAgent> {
    let tree = CgroupTree::create(label)?;
    let agent_cgroup = tree.child("agent")?;
    let planner = tree.child("planner")?;
    let dir = work.join(label);
    fs::create_dir_all(&dir)?;
    let mut settings = AgentEtcd::new(etcd, &dir);
    // The agent's default debounce, as deployed.
    settings.debounce = Duration::from_millis(100);
    settings.dial_timeout = Duration::from_secs(5);
    let agent = AgentProcess::start_with_etcd(
        &tree,
        AgentOptions {
            accelerate: false,
            l7: true,
            workloads: vec![("planner".into(), planner)],
            exclude_ports: vec![],
            exclude_cidrs: vec![],
            agent_cgroup,
            log_filter: "warn,mesh_agent=info".into(),
            agent_binary: Some(tools.agent.clone()),
            policy_dir: None,
        },
        settings,
    )?;
    Ok(EtcdAgent { agent, _tree: tree })
}

/// One Prometheus value of an agent's `/metrics`.
fn agent_metric(agent: &AgentProcess, name: &str) -> anyhow::Result<f64> {
    let mut stream = TcpStream::connect(("127.0.0.1", agent.admin_port))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    // `name value` or `name{labels} value` (the first series of that name).
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once('}')?.1,
                None => rest,
            };
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .with_context(|| format!("no {name} in the agent's metrics"))
}

/// Waits until every agent's snapshot reflects `revision`; returns each one's delay.
fn wait_revision(
    agents: &[&AgentProcess],
    revision: i64,
    since: Instant,
) -> anyhow::Result<Vec<f64>> {
    let mut delays = vec![None; agents.len()];
    let deadline = since + Duration::from_secs(60);
    while delays.iter().any(Option::is_none) {
        for (index, agent) in agents.iter().enumerate() {
            if delays[index].is_none()
                && agent_metric(agent, "mesh_control_snapshot_revision")? as i64 >= revision
            {
                delays[index] = Some(since.elapsed().as_secs_f64() * 1000.0);
            }
        }
        if Instant::now() > deadline {
            bail!("agents did not reach revision {revision} within 60 s");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(delays.into_iter().flatten().collect())
}

/// The etcd revision that last wrote the AccessPolicy `<target>-access` (other keys, such as
/// node heartbeats, move the store's revision too, and agents never build snapshots for them).
fn policy_revision(etcd: &EtcdServer, target: &str) -> anyhow::Result<i64> {
    let key = format!("/mesh/v1/accesspolicies/default/{target}-access");
    let text = etcd.etcdctl(&["get", &key, "-w", "json"])?;
    let reply: Value = serde_json::from_str(&text).context("etcdctl get -w json")?;
    reply["kvs"][0]["mod_revision"]
        .as_i64()
        .with_context(|| format!("no mod_revision for {key} in {text}"))
}

fn meshctl_apply(etcd: &EtcdServer, file: &Path) -> anyhow::Result<f64> {
    let meshctl = workspace_root().join("target/release/meshctl");
    let start = Instant::now();
    let output = Command::new(meshctl)
        .args(["--etcd", &etcd.endpoint(), "apply", "-f"])
        .arg(file)
        .output()?;
    if !output.status.success() {
        bail!(
            "meshctl apply failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

fn percentile(values: &[f64], quantile: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * quantile).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn summary(values: &[f64]) -> Value {
    json!({
        "samples": values.len(),
        "p50_ms": percentile(values, 0.5),
        "p99_ms": percentile(values, 0.99),
        "max_ms": percentile(values, 1.0),
    })
}

fn agent_doc(name: &str, address: &str) -> String {
    format!(
        "{HEAD}kind: Agent\nmetadata: {{name: {name}}}\nspec:\n  endpoints: [{{address: \"{address}\"}}]\n  protocol: Mcp\n  capabilities: {{mcpTools: [add, search]}}\n"
    )
}

fn policy_doc(target: &str, tools: &str) -> String {
    format!(
        "{HEAD}kind: AccessPolicy\nmetadata: {{name: {target}-access}}\nspec:\n  targetAgent: {target}\n  action: Allow\n  rules:\n    - from: [planner]\n      mcp: {{tools: [{tools}]}}\n"
    )
}

/// apply → enforcement on three agents.
fn apply_to_enforcement(tools: &Tools, work: &Path, changes: usize) -> anyhow::Result<Value> {
    let etcd = EtcdServer::start()?;
    let file = work.join("resources.yaml");
    fs::write(
        &file,
        format!(
            "{}---\n{}",
            agent_doc("tools", "10.0.0.1:80"),
            policy_doc("tools", "add")
        ),
    )?;
    meshctl_apply(&etcd, &file)?;
    let agents = (0..3)
        .map(|index| start_agent(tools, &etcd, &format!("bench-control-{index}"), work))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let processes: Vec<&AgentProcess> = agents.iter().map(|agent| &agent.agent).collect();
    let mut per_agent = Vec::new();
    let mut all_agents = Vec::new();
    let mut apply = Vec::new();
    for change in 0..changes {
        let tools_list = if change % 2 == 0 {
            "add, search"
        } else {
            "add"
        };
        fs::write(&file, policy_doc("tools", tools_list))?;
        apply.push(meshctl_apply(&etcd, &file)?);
        let applied = Instant::now();
        let revision = policy_revision(&etcd, "tools")?;
        let delays = wait_revision(&processes, revision, applied)?;
        all_agents.push(delays.iter().copied().fold(0.0, f64::max));
        per_agent.extend(delays);
        // Changes spaced out, so each one is measured on its own (not debounced together).
        std::thread::sleep(Duration::from_millis(150));
    }
    Ok(json!({
        "agents": 3,
        "debounce_ms": 100,
        "changes": changes,
        "meshctl_apply": summary(&apply),
        "enforced_per_agent": summary(&per_agent),
        "enforced_on_all_agents": summary(&all_agents),
    }))
}

/// Writes `count` agents and as many policies straight into etcd (100 keys per transaction).
fn populate(etcd: &EtcdServer, count: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([etcd.endpoint()], None).await?;
        let mut operations = Vec::new();
        for index in 0..count {
            let name = format!("agent-{index:05}");
            let address = format!(
                "10.{}.{}.{}:80",
                index / 65536 % 256,
                index / 256 % 256,
                index % 256
            );
            let agent = json!({
                "apiVersion": API_VERSION, "kind": "Agent",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"endpoints": [{"address": address}], "protocol": "Mcp",
                         "capabilities": {"mcpTools": ["add", "search"]}},
            });
            let policy = json!({
                "apiVersion": API_VERSION, "kind": "AccessPolicy",
                "metadata": {"name": format!("{name}-access"), "namespace": "default"},
                "spec": {"targetAgent": name, "action": "Allow",
                         "rules": [{"from": ["planner"], "mcp": {"tools": ["add"]}}]},
            });
            operations.push(etcd_client::TxnOp::put(
                format!("/mesh/v1/agents/default/{name}"),
                agent.to_string(),
                None,
            ));
            operations.push(etcd_client::TxnOp::put(
                format!("/mesh/v1/accesspolicies/default/{name}-access"),
                policy.to_string(),
                None,
            ));
            if operations.len() >= 100 {
                client
                    .txn(etcd_client::Txn::new().and_then(std::mem::take(&mut operations)))
                    .await?;
            }
        }
        if !operations.is_empty() {
            client
                .txn(etcd_client::Txn::new().and_then(operations))
                .await?;
        }
        anyhow::Ok(())
    })
}

/// 10k agents and 10k policies: first snapshot, memory, one change.
fn scale(tools: &Tools, work: &Path, count: usize) -> anyhow::Result<Value> {
    let etcd = EtcdServer::start()?;
    let written = Instant::now();
    populate(&etcd, count)?;
    let populate_s = written.elapsed().as_secs_f64();
    let start = Instant::now();
    let agent = start_agent(tools, &etcd, "bench-control-scale", work)?;
    let ready_ms = start.elapsed().as_secs_f64() * 1000.0;
    // The agent starts closed when it cannot list: the measurement needs the listing in force.
    let resources = agent_metric(&agent.agent, "mesh_policy_resources")?;
    if resources < (2 * count) as f64 {
        bail!(
            "the agent serves {resources} resources, not the {} written; its log:\n{}",
            2 * count,
            agent.agent.log()
        );
    }
    let pid = agent.agent.pid().context("the agent has no pid")?;
    let rss_mib = memory_mib(pid, "VmRSS")?;
    let hwm_mib = memory_mib(pid, "VmHWM")?;
    let file = work.join("one-more.yaml");
    let mut changes = Vec::new();
    for change in 0..5 {
        let tools_list = if change % 2 == 0 {
            "add, search"
        } else {
            "add"
        };
        fs::write(&file, policy_doc("agent-00000", tools_list))?;
        meshctl_apply(&etcd, &file)?;
        let applied = Instant::now();
        let revision = policy_revision(&etcd, "agent-00000")?;
        changes.extend(wait_revision(&[&agent.agent], revision, applied)?);
        std::thread::sleep(Duration::from_millis(150));
    }
    let rss_after_mib = memory_mib(pid, "VmRSS")?;
    Ok(json!({
        "agents": count,
        "policies": count,
        "etcd_write_s": populate_s,
        "start_to_ready_ms": ready_ms,
        "rss_mib": rss_mib,
        "peak_rss_mib": hwm_mib,
        "rss_after_changes_mib": rss_after_mib,
        "change_enforced": summary(&changes),
    }))
}

/// Load through the tunnel and over plain TCP, each kind `rounds` times interleaved; medians.
fn cross_node(tools: &Tools, rounds: usize, duration_ms: u64) -> anyhow::Result<Value> {
    use mesh_tests::two_nodes::{Binaries, HTTP_GET_BODY, HTTP_PORT, RR_PORT, TwoNodes};
    let nodes = TwoNodes::start_with(
        "bench-cross-node",
        "client",
        |_| String::new(),
        Binaries {
            agent: Some(tools.agent.clone()),
            loadgen: tools.loadgen.clone(),
            log_filter: "info".into(),
        },
    )?;
    let to = format!("{}:{RR_PORT}", nodes.node_b().address);
    let web = format!("{}:{HTTP_PORT}", nodes.node_b().address);
    let duration = duration_ms.to_string();
    let runs: [LoadRun; 4] = [
        (
            "rr",
            vec![
                "rr",
                "--to",
                &to,
                "--duration-ms",
                &duration,
                "--warmup",
                "200",
            ],
            vec![
                ("rr_p50_us", "/p50_us"),
                ("rr_p99_us", "/p99_us"),
                ("rr_rps", "/requests_per_second"),
            ],
        ),
        (
            "bulk",
            vec!["bulk", "--to", &to, "--duration-ms", &duration],
            vec![("bulk_gbps", "/gbit_per_second")],
        ),
        (
            "connect",
            vec!["connect", "--to", &to, "--count", "1000"],
            vec![
                (
                    "connect_first_reply_p50_us",
                    "/connect_and_first_response/p50_us",
                ),
                (
                    "connect_first_reply_p99_us",
                    "/connect_and_first_response/p99_us",
                ),
            ],
        ),
        (
            "http",
            vec![
                "http",
                "--to",
                &web,
                "--duration-ms",
                &duration,
                "--expect-body",
                HTTP_GET_BODY,
            ],
            vec![
                ("http_p50_us", "/p50_us"),
                ("http_p99_us", "/p99_us"),
                ("http_rps", "/requests_per_second"),
            ],
        ),
    ];
    let mut samples: Vec<(String, &str, f64)> = Vec::new();
    for _ in 0..rounds {
        for (name, arguments, fields) in &runs {
            let tunnel = nodes.loadgen_through_mesh(arguments)?;
            let plain = nodes.loadgen_plain(arguments)?;
            for (path, report) in [("tunnel", &tunnel), ("plain", &plain)] {
                if let Some(error) = report.get("error") {
                    bail!("{name} over {path}: {error}");
                }
                for (key, pointer) in fields {
                    let value = report
                        .pointer(pointer)
                        .and_then(Value::as_f64)
                        .with_context(|| format!("no {pointer} in the {name} report"))?;
                    samples.push(((*key).to_owned(), path, value));
                }
            }
        }
    }
    let handshakes = tunnel_handshakes(tools, &nodes, rounds, duration_ms)?;
    let mut result = serde_json::Map::new();
    result.insert("handshakes".to_owned(), handshakes);
    for path in ["plain", "tunnel"] {
        let mut values = serde_json::Map::new();
        for (_, _, fields) in &runs {
            for (key, _) in fields {
                let series: Vec<f64> = samples
                    .iter()
                    .filter(|(k, p, _)| k == key && *p == path)
                    .map(|(_, _, value)| *value)
                    .collect();
                values.insert((*key).to_owned(), json!(percentile(&series, 0.5)));
            }
        }
        result.insert(path.to_owned(), Value::Object(values));
    }
    Ok(Value::Object(result))
}

/// New tunnel connections per second that node B's agent accepts: `mesh-handshake` on node A
/// opens connections as a peer agent does (TCP, TLS 1.3 with a CA-issued client certificate and
/// no resumption, HTTP/2 SETTINGS exchange) on 4 threads; the agent's CPU per handshake comes
/// from its /proc stat. Median of the rounds.
fn tunnel_handshakes(
    tools: &Tools,
    nodes: &mesh_tests::two_nodes::TwoNodes,
    rounds: usize,
    duration_ms: u64,
) -> anyhow::Result<Value> {
    use mesh_tests::two_nodes::{TRUST_DOMAIN, TUNNEL_PORT};
    let pid = nodes.b.pid().context("node B's agent is not running")?;
    let to = format!("{}:{TUNNEL_PORT}", nodes.node_b().address);
    let ca_dir = nodes.work.0.join("ca");
    let mut samples: Vec<[f64; 4]> = Vec::new();
    for _ in 0..rounds {
        let cpu_before = crate::bench::cpu_seconds(pid)?;
        let output = nodes
            .node_a()
            .command(&tools.handshake.to_string_lossy())
            .args([
                "--to",
                &to,
                "--trust-domain",
                TRUST_DOMAIN,
                "--concurrency",
                "4",
            ])
            .arg("--ca-dir")
            .arg(&ca_dir)
            .args(["--duration-ms", &duration_ms.to_string()])
            .output()
            .context("running mesh-handshake")?;
        let cpu = crate::bench::cpu_seconds(pid)? - cpu_before;
        let report: Value = serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "mesh-handshake printed no report: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
        if let Some(error) = report.get("error") {
            bail!("tunnel handshakes: {error}");
        }
        let field = |name: &str| {
            report[name]
                .as_f64()
                .with_context(|| format!("no {name} in the mesh-handshake report"))
        };
        let count = field("handshakes")?;
        if field("failures")? > 0.0 {
            bail!(
                "{} of the tunnel handshakes failed: {}",
                report["failures"],
                report["first_failure"]
            );
        }
        samples.push([
            field("handshakes_per_second")?,
            field("p50_us")?,
            field("p99_us")?,
            cpu / count * 1e6,
        ]);
    }
    let median = |index: usize| {
        let series: Vec<f64> = samples.iter().map(|sample| sample[index]).collect();
        percentile(&series, 0.5)
    };
    Ok(json!({
        "per_second": median(0),
        "p50_us": median(1),
        "p99_us": median(2),
        "agent_cpu_us_per_handshake": median(3),
    }))
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let tools = build_release()?;
    let work = std::env::temp_dir().join(unique_name("bench-control"));
    fs::create_dir_all(&work)?;
    let (changes, count) = if args.quick { (10, 1000) } else { (50, 10_000) };
    step(&format!(
        "apply -> enforcement on 3 agents ({changes} changes)"
    ));
    let apply = apply_to_enforcement(&tools, &work, changes);
    step(&format!(
        "sync cost with {count} agents and {count} policies"
    ));
    let scaled = scale(&tools, &work, count);
    let (rounds, duration_ms) = if args.quick {
        (1, 1000)
    } else {
        (args.rounds, (args.seconds * 1000.0) as u64)
    };
    step(&format!(
        "cross-node through the mTLS tunnel vs plain TCP ({rounds} rounds)"
    ));
    let crossed = cross_node(&tools, rounds, duration_ms);
    let _ = fs::remove_dir_all(&work);
    let report = json!({
        "suite": "control",
        "apply_to_enforcement": apply.as_ref().map_or_else(|error| json!({"error": format!("{error:#}")}), Clone::clone),
        "scale": scaled.as_ref().map_or_else(|error| json!({"error": format!("{error:#}")}), Clone::clone),
        "cross_node": crossed.as_ref().map_or_else(|error| json!({"error": format!("{error:#}")}), Clone::clone),
    });
    println!();
    if let Ok(apply) = &apply {
        println!(
            "apply -> enforcement, 3 agents in etcd mode (debounce 100 ms, {changes} changes):"
        );
        println!("| measurement | p50 (ms) | p99 (ms) | max (ms) |\n|---|---:|---:|---:|");
        for (label, key) in [
            ("meshctl apply (process start to exit)", "meshctl_apply"),
            ("enforced, per agent", "enforced_per_agent"),
            ("enforced on all three", "enforced_on_all_agents"),
        ] {
            println!(
                "| {label} | {:.1} | {:.1} | {:.1} |",
                apply[key]["p50_ms"].as_f64().unwrap_or(f64::NAN),
                apply[key]["p99_ms"].as_f64().unwrap_or(f64::NAN),
                apply[key]["max_ms"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    if let Ok(scaled) = &scaled {
        println!(
            "\n{count} agents + {count} policies: start to ready {:.0} ms, RSS {:.1} MiB (peak {:.1}), one change enforced p50 {:.0} ms / max {:.0} ms",
            scaled["start_to_ready_ms"].as_f64().unwrap_or(f64::NAN),
            scaled["rss_mib"].as_f64().unwrap_or(f64::NAN),
            scaled["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
            scaled["change_enforced"]["p50_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
            scaled["change_enforced"]["max_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }
    if let Ok(crossed) = &crossed {
        println!("\ncross-node (2 network namespaces), median of {rounds} round(s):");
        println!("| measurement | plain TCP | through the tunnel | ratio |\n|---|---:|---:|---:|");
        for (label, key) in [
            ("rr 64 B p50 (µs)", "rr_p50_us"),
            ("rr 64 B p99 (µs)", "rr_p99_us"),
            ("rr rate (req/s)", "rr_rps"),
            ("bulk 1 stream (Gbit/s)", "bulk_gbps"),
            ("connect + 1st reply p50 (µs)", "connect_first_reply_p50_us"),
            ("connect + 1st reply p99 (µs)", "connect_first_reply_p99_us"),
            ("HTTP GET p50 (µs)", "http_p50_us"),
            ("HTTP GET p99 (µs)", "http_p99_us"),
            ("HTTP GET rate (req/s)", "http_rps"),
        ] {
            let plain = crossed["plain"][key].as_f64().unwrap_or(f64::NAN);
            let tunnel = crossed["tunnel"][key].as_f64().unwrap_or(f64::NAN);
            println!(
                "| {label} | {plain:.1} | {tunnel:.1} | {:.2}× |",
                tunnel / plain
            );
        }
    }
    if let Ok(crossed) = &crossed {
        let handshakes = &crossed["handshakes"];
        println!(
            "\nnew tunnel connections accepted by one agent (TCP + TLS 1.3 mutual, P-256, no resumption + HTTP/2 SETTINGS; 4 parallel clients): {:.0} per second, p50 {:.0} µs, p99 {:.0} µs, agent CPU {:.0} µs per handshake",
            handshakes["per_second"].as_f64().unwrap_or(f64::NAN),
            handshakes["p50_us"].as_f64().unwrap_or(f64::NAN),
            handshakes["p99_us"].as_f64().unwrap_or(f64::NAN),
            handshakes["agent_cpu_us_per_handshake"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }
    let output = write_json_report(args.output.as_deref(), "control", &report)?;
    step(&format!("JSON report: {}", output.display()));
    apply.and(scaled).and(crossed).map(|_| ())
}
