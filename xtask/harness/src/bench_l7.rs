//! `cargo xtask bench l7`: the mesh's L7 path against nginx and haproxy as HTTP reverse
//! proxies, in one run, with the same load generator (`mesh-loadgen http`) for every path.
//!
//! Four ways for a client in a test cgroup to reach one upstream (`mesh-loadgen http-server`:
//! keep-alive HTTP/1.1, a fixed text body for `GET`, a fixed JSON-RPC result for
//! `POST /mcp`): direct; captured by the kernel programs and served by `mesh-agent` at L7 with
//! a policy folder (an `Agent` for the upstream, an `AccessPolicy` that lets the client call
//! the tool `add`, a `TrafficPolicy` with timeouts, retries and a rate limit), so every request
//! is parsed, authorised, rate-limited and balanced; nginx (`proxy_pass` to an upstream block
//! with `keepalive`); haproxy (`mode http`, `http-reuse always`). Each proxy forwards to the
//! same upstream over pooled keep-alive connections and runs one worker thread or process per
//! core.
//!
//! For a `GET` and for an MCP `tools/call` it measures p50 and p99 latency on one connection
//! and at saturation (`--connections`, 32 by default), the rate at saturation, and the proxy's
//! CPU time (all its processes, from /proc) per request; then the proxy's memory idle and
//! with `--idle-connections` (10 000) idle keep-alive connections held open through it. Every
//! proxy is started fresh for each path of each round; rounds interleave the paths so drift on
//! the machine hits all of them alike, and the report shows the median of the rounds.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use mesh_tests::{AgentOptions, AgentProcess, CgroupTree, free_port, unique_name};
use serde_json::{Value, json};

use xtask::util::step;

use crate::bench::{
    BenchArgs, Column, Guard, Metric, Tools, build_release, cpu_seconds, loadgen, medians,
    memory_mib, metric, number, round_ratio, spawn_haproxy, start_server, table, wait_listening,
    write_json_report,
};

/// The ways the client reaches the upstream, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathKind {
    Direct,
    Mesh,
    MeshAccelerated,
    Nginx,
    Haproxy,
}

impl PathKind {
    const ALL: [Self; 5] = [
        Self::Direct,
        Self::Mesh,
        Self::MeshAccelerated,
        Self::Nginx,
        Self::Haproxy,
    ];
    const PROXIES: [Self; 4] = [
        Self::Mesh,
        Self::MeshAccelerated,
        Self::Nginx,
        Self::Haproxy,
    ];
    /// The mesh's two configurations, each judged against the reference proxies.
    const MESHES: [Self; 2] = [Self::Mesh, Self::MeshAccelerated];

    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Mesh => "mesh (captured, L7 policy)",
            Self::MeshAccelerated => "mesh + sk_msg (accelerated local hop)",
            Self::Nginx => "nginx (proxy_pass)",
            Self::Haproxy => "haproxy (mode http)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Mesh => "mesh",
            Self::MeshAccelerated => "mesh_accelerated",
            Self::Nginx => "nginx",
            Self::Haproxy => "haproxy",
        }
    }
}

/// The two requests measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestKind {
    Get,
    Mcp,
}

/// The MCP call the client makes; the access policy allows exactly this tool.
const MCP_CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}"#;

impl RequestKind {
    fn key(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Mcp => "mcp",
        }
    }

    /// `mesh-loadgen` arguments: the request and what each response must contain.
    fn loadgen_args(self) -> Vec<&'static str> {
        match self {
            Self::Get => vec!["--path", "/hello", "--expect-body", "hello"],
            Self::Mcp => vec![
                "--method",
                "POST",
                "--path",
                "/mcp",
                "--header",
                "content-type: application/json",
                "--header",
                "accept: application/json, text/event-stream",
                "--body",
                MCP_CALL,
                "--expect-body",
                "\"result\"",
            ],
        }
    }
}

/// How a load drives the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One connection, requests back to back: the latency of the path alone.
    Single,
    /// `PACED_RATE` requests per second on `PACED_CONNECTIONS` connections, on a fixed
    /// schedule: the same offered load for every path, so latencies compare.
    Paced,
    /// `--connections` connections, requests back to back: the rate the path sustains, and
    /// the proxy's CPU per request when busy.
    Saturated,
}

/// One load measurement: its name (prefix of its metric keys), request and shape.
struct Load {
    name: &'static str,
    request: RequestKind,
    shape: Shape,
}

const fn load(name: &'static str, request: RequestKind, shape: Shape) -> Load {
    Load {
        name,
        request,
        shape,
    }
}

const LOADS: [Load; 6] = [
    load("get_c1", RequestKind::Get, Shape::Single),
    load("mcp_c1", RequestKind::Mcp, Shape::Single),
    load("get_paced", RequestKind::Get, Shape::Paced),
    load("mcp_paced", RequestKind::Mcp, Shape::Paced),
    load("get_sat", RequestKind::Get, Shape::Saturated),
    load("mcp_sat", RequestKind::Mcp, Shape::Saturated),
];

/// The paced load: requests per second over all its connections, and how many connections.
const PACED_RATE: u32 = 2000;
const PACED_CONNECTIONS: usize = 8;

/// Warm-up requests per connection: on the single connection, and on each of several.
const WARMUP_SINGLE: usize = 200;
const WARMUP_SEVERAL: usize = 50;

const METRICS: [Metric; 33] = [
    metric("get_c1_p50_us", "GET, 1 conn, p50", "µs", false),
    metric("get_c1_p99_us", "GET, 1 conn, p99", "µs", false),
    metric("get_c1_added_p99_us", "GET, 1 conn, added p99", "µs", false),
    metric(
        "get_paced_p50_us",
        "GET, 2k req/s on 8 conns, p50",
        "µs",
        false,
    ),
    metric(
        "get_paced_p99_us",
        "GET, 2k req/s on 8 conns, p99",
        "µs",
        false,
    ),
    metric(
        "get_paced_added_p99_us",
        "GET, 2k req/s on 8 conns, added p99",
        "µs",
        false,
    ),
    metric("get_sat_p50_us", "GET, saturated, p50", "µs", false),
    metric("get_sat_p99_us", "GET, saturated, p99", "µs", false),
    metric(
        "get_sat_added_p99_us",
        "GET, saturated, p99 minus direct's",
        "µs",
        false,
    ),
    metric("get_sat_rps", "GET, saturated, rate", "req/s", true),
    metric(
        "get_proxy_cpu_s_per_10k",
        "GET, proxy CPU per 10k requests",
        "s",
        false,
    ),
    metric(
        "get_requests_per_proxy_cpu_s",
        "GET, requests per proxy CPU second",
        "req",
        true,
    ),
    metric(
        "get_proxy_cpu_vs_nginx",
        "GET, requests per proxy CPU second over nginx's, same round",
        "×",
        true,
    ),
    metric(
        "get_proxy_cpu_vs_haproxy",
        "GET, requests per proxy CPU second over haproxy's, same round",
        "×",
        true,
    ),
    metric("mcp_c1_p50_us", "MCP tools/call, 1 conn, p50", "µs", false),
    metric("mcp_c1_p99_us", "MCP tools/call, 1 conn, p99", "µs", false),
    metric(
        "mcp_c1_added_p99_us",
        "MCP tools/call, 1 conn, added p99",
        "µs",
        false,
    ),
    metric(
        "mcp_paced_p50_us",
        "MCP tools/call, 2k req/s on 8 conns, p50",
        "µs",
        false,
    ),
    metric(
        "mcp_paced_p99_us",
        "MCP tools/call, 2k req/s on 8 conns, p99",
        "µs",
        false,
    ),
    metric(
        "mcp_paced_added_p99_us",
        "MCP tools/call, 2k req/s on 8 conns, added p99",
        "µs",
        false,
    ),
    metric(
        "mcp_sat_p50_us",
        "MCP tools/call, saturated, p50",
        "µs",
        false,
    ),
    metric(
        "mcp_sat_p99_us",
        "MCP tools/call, saturated, p99",
        "µs",
        false,
    ),
    metric(
        "mcp_sat_added_p99_us",
        "MCP tools/call, saturated, p99 minus direct's",
        "µs",
        false,
    ),
    metric(
        "mcp_sat_rps",
        "MCP tools/call, saturated, rate",
        "req/s",
        true,
    ),
    metric(
        "mcp_proxy_cpu_s_per_10k",
        "MCP tools/call, proxy CPU per 10k requests",
        "s",
        false,
    ),
    metric(
        "mcp_requests_per_proxy_cpu_s",
        "MCP tools/call, requests per proxy CPU second",
        "req",
        true,
    ),
    metric(
        "mcp_proxy_cpu_vs_nginx",
        "MCP tools/call, requests per proxy CPU second over nginx's, same round",
        "×",
        true,
    ),
    metric(
        "mcp_proxy_cpu_vs_haproxy",
        "MCP tools/call, requests per proxy CPU second over haproxy's, same round",
        "×",
        true,
    ),
    metric(
        "proxy_rss_idle_mib",
        "proxy RSS, fresh and idle",
        "MiB",
        false,
    ),
    metric(
        "proxy_rss_after_load_mib",
        "proxy RSS, idle after the load",
        "MiB",
        false,
    ),
    metric(
        "proxy_rss_idle_conns_mib",
        "proxy RSS, idle keep-alive conns open",
        "MiB",
        false,
    ),
    metric(
        "proxy_kib_per_idle_conn",
        "proxy memory per idle keep-alive conn",
        "KiB",
        false,
    ),
    metric(
        "idle_conns_open_seconds",
        "time to open the idle conns (1 request each)",
        "s",
        false,
    ),
];

/// Settings of one benchmark run.
struct Plan {
    rounds: usize,
    duration_ms: u64,
    connections: usize,
    idle_connections: usize,
    /// The open-file limit everything the bench starts inherits.
    open_files: u64,
    /// The loads to run (by name); empty runs them all.
    loads: Vec<String>,
}

/// What every path of a round shares.
struct Bench<'a> {
    tree: &'a CgroupTree,
    /// The client's cgroup (relative), where every load generator runs.
    client: PathBuf,
    tools: &'a Tools,
    plan: &'a Plan,
    upstream: SocketAddr,
    work_dir: PathBuf,
    policy_dir: PathBuf,
}

/// The pid and every direct child of a process (nginx's workers), from /proc.
fn process_tree(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        // The parent pid is the second field after the parenthesised command name.
        let parent = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let (_, rest) = stat.rsplit_once(')')?;
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            });
        if parent == Some(root) {
            pids.push(pid);
        }
    }
    pids
}

/// CPU seconds used so far by a proxy: its process and its children.
fn proxy_cpu(root: Option<u32>) -> anyhow::Result<Option<f64>> {
    root.map(|root| process_tree(root).into_iter().map(cpu_seconds).sum())
        .transpose()
}

/// Resident memory of a proxy (the sum over its processes), in MiB.
fn proxy_rss(root: u32) -> anyhow::Result<f64> {
    process_tree(root)
        .into_iter()
        .map(|pid| memory_mib(pid, "VmRSS"))
        .sum()
}

/// Proportional set size of a proxy (pages shared between its processes counted once), MiB.
fn proxy_pss(root: u32) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for pid in process_tree(root) {
        let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
        let kib: f64 = text
            .lines()
            .find_map(|line| line.strip_prefix("Pss:"))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no Pss in /proc/{pid}/smaps_rollup"))?;
        total += kib / 1024.0;
    }
    Ok(total)
}

/// The smallest soft open-file limit among a proxy's processes, from /proc/<pid>/limits.
fn proxy_open_files_limit(root: u32) -> anyhow::Result<u64> {
    let mut smallest = u64::MAX;
    for pid in process_tree(root) {
        let limits = fs::read_to_string(format!("/proc/{pid}/limits"))
            .with_context(|| format!("reading /proc/{pid}/limits"))?;
        let soft = limits
            .lines()
            .find_map(|line| line.strip_prefix("Max open files"))
            .and_then(|rest| rest.split_whitespace().next())
            .with_context(|| format!("no open-file limit in /proc/{pid}/limits"))?;
        smallest = smallest.min(soft.parse().unwrap_or(u64::MAX));
    }
    Ok(smallest)
}

fn read_number(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The mesh resources: the upstream as a registered MCP agent, an access policy that lets the
/// bench client call `add` (and `GET /hello`), and a traffic policy with timeouts, retries and
/// a rate limit far above what the run can reach (the token bucket is still checked).
fn mesh_resources(upstream: SocketAddr) -> String {
    format!(
        "apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata:
  name: bench-upstream
spec:
  hosts: [bench-upstream.mesh]
  protocol: Mcp
  endpoints:
    - address: \"{upstream}\"
  capabilities:
    mcpTools: [add]
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: bench-client-calls-add
spec:
  targetAgent: bench-upstream
  action: Allow
  rules:
    - from: [bench-client]
      mcp:
        methods: [tools/call]
        tools: [add]
    - from: [bench-client]
      http:
        methods: [GET]
        paths: [/hello]
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: bench-upstream-traffic
spec:
  targetAgent: bench-upstream
  timeouts:
    connect: 2s
    request: 30s
  retries:
    attempts: 2
    backoffBase: 25ms
    backoffMax: 250ms
    budgetPercent: 20
    retryOn: [ConnectFailure, Reset, Status503]
  rateLimits:
    - from: \"*\"
      requestsPerSecond: 10000000
      burst: 10000000
  # The load generator repeats one request (same id and body): deduplication would answer
  # nearly all of them from the first one's response and measure the cache, not forwarding.
  dedup:
    window: 0s
  maxRequestBodyBytes: 1048576
"
    )
}

/// nginx as a foreground process in its own cgroup; dropping it kills the master and its
/// workers at once through `cgroup.kill`.
struct Nginx {
    master: Child,
    cgroup_dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = fs::write(self.cgroup_dir.join("cgroup.kill"), "1");
        let _ = self.master.kill();
        let _ = self.master.wait();
    }
}

/// Starts nginx (one worker per core) proxying a free loopback port to `upstream` over a
/// keep-alive upstream pool; its config, pid file, logs and temp folders live in `dir`.
fn start_nginx(bench: &Bench<'_>, upstream: SocketAddr) -> anyhow::Result<(Nginx, SocketAddr)> {
    let dir = bench.work_dir.join(unique_name("nginx"));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    // Each worker may end up with every idle connection, and each proxied one may hold an
    // upstream connection too; within the open-file limit (nginx cannot raise the hard one
    // where the bench could not).
    let files = bench.plan.open_files;
    let worker_connections = (bench.plan.idle_connections as u64 * 2 + 4096).min(files);
    let d = dir.display();
    let config = format!(
        "worker_processes {workers};
worker_rlimit_nofile {files};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections {worker_connections};
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    upstream bench_upstream {{
        server {upstream};
        keepalive 128;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {listen} backlog=4096;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    );
    let config_path = dir.join("nginx.conf");
    fs::write(&config_path, config).context("writing the nginx config")?;
    let cgroup = bench.tree.child("nginx")?;
    let error_log = dir.join("error.log");
    let master = bench
        .tree
        .spawn_in(
            &cgroup,
            Command::new("nginx")
                .arg("-p")
                .arg(&dir)
                .arg("-e")
                .arg(&error_log)
                .arg("-c")
                .arg(&config_path)
                .args(["-g", "daemon off;"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit()),
        )
        .context("starting nginx (cargo xtask setup installs it)")?;
    let mut nginx = Nginx {
        master,
        cgroup_dir: bench.tree.absolute(&cgroup),
    };
    if let Err(error) = wait_listening(&mut nginx.master, listen, "nginx") {
        bail!(
            "{error:#}; nginx's error log:\n{}",
            fs::read_to_string(&error_log).unwrap_or_default().trim()
        );
    }
    Ok((nginx, listen))
}

/// Starts haproxy in HTTP mode (one thread per core) proxying a free loopback port to
/// `upstream`, reusing idle server connections for any client (`http-reuse always`).
fn start_haproxy(bench: &Bench<'_>, upstream: SocketAddr) -> anyhow::Result<(Guard, SocketAddr)> {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let maxconn = bench.plan.idle_connections + 1024;
    // haproxy asks for two descriptors per connection and, by default, refuses to start when
    // it cannot raise the limit that far; idle client connections need only one each (the
    // upstream side is pooled), so it runs with the limit it inherits.
    let config = format!(
        "global
    nbthread {threads}
    maxconn {maxconn}
    no strict-limits

defaults
    mode http
    option http-keep-alive
    http-reuse always
    maxconn {maxconn}
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-request 300s
    timeout http-keep-alive 300s

listen forward
    bind {listen}
    server upstream {upstream}
"
    );
    let path = bench.work_dir.join("haproxy-http.cfg");
    fs::write(&path, config).context("writing the haproxy config")?;
    Ok((spawn_haproxy(&path, listen)?, listen))
}

/// Holds `--idle-connections` keep-alive connections open through the path (one request on
/// each first) and reads the proxy's memory meanwhile.
fn idle_connections(
    bench: &Bench<'_>,
    target: SocketAddr,
    proxy: Option<u32>,
) -> anyhow::Result<Value> {
    let mut out = json!({});
    let count = bench.plan.idle_connections;
    let to = target.to_string();
    let count_text = count.to_string();
    let mut args = vec!["http-idle", "--to", &to, "--count", &count_text];
    args.extend(RequestKind::Get.loadgen_args());
    let mut child = bench.tree.spawn_in(
        &bench.client,
        Command::new(&bench.tools.loadgen)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let stdout = child.stdout.take().context("no stdout from mesh-loadgen")?;
    let mut guard = Guard(child);
    let stderr = |guard: &mut Guard| {
        let mut text = String::new();
        if let Some(mut pipe) = guard.0.stderr.take() {
            let _ = pipe.read_to_string(&mut text);
        }
        text.trim().to_owned()
    };
    let mut stdout = BufReader::new(stdout);
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .context("reading mesh-loadgen http-idle")?;
    if line.trim().is_empty() {
        let status = guard.0.wait()?;
        bail!(
            "mesh-loadgen {} failed ({status}): {}",
            args.join(" "),
            stderr(&mut guard)
        );
    }
    let ready: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("mesh-loadgen http-idle printed {line:?}"))?;
    // Let the proxy finish whatever bookkeeping the burst of connections left.
    std::thread::sleep(Duration::from_millis(500));
    if let Some(pid) = proxy {
        out["proxy_rss_idle_conns_mib"] = json!(proxy_rss(pid)?);
        out["proxy_pss_idle_conns_mib"] = json!(proxy_pss(pid)?);
        out["proxy_peak_rss_mib"] = json!(
            process_tree(pid)
                .into_iter()
                .map(|pid| memory_mib(pid, "VmHWM"))
                .sum::<anyhow::Result<f64>>()?
        );
    }
    drop(guard.0.stdin.take());
    // Its closing report, so it never writes into a closed pipe.
    let _ = stdout.read_to_string(&mut String::new());
    let status = guard.0.wait()?;
    if !status.success() {
        bail!(
            "mesh-loadgen http-idle failed while holding its connections ({status}): {}",
            stderr(&mut guard)
        );
    }
    out["idle_conns_open"] = ready["open"].clone();
    out["idle_conns_open_seconds"] = ready["seconds_to_open"].clone();
    out["loadgen_open_files_limit"] = ready["open_files_limit"].clone();
    Ok(out)
}

/// Measures every metric of one path once. `proxy` is the pid of the forwarding process (for
/// nginx, its master), if any. A measurement that fails is recorded under `errors` (with the
/// reason) and the others still run: a failing path is a result, not a reason to lose the
/// rest.
fn measure(bench: &Bench<'_>, target: SocketAddr, proxy: Option<u32>) -> anyhow::Result<Value> {
    let plan = bench.plan;
    let mut sample = json!({});
    let mut errors = serde_json::Map::new();
    if let Some(pid) = proxy {
        // Fresh and idle: started, listening, no connection yet.
        std::thread::sleep(Duration::from_millis(300));
        sample["proxy_processes"] = json!(process_tree(pid).len());
        sample["proxy_rss_idle_mib"] = json!(proxy_rss(pid)?);
        sample["proxy_pss_idle_mib"] = json!(proxy_pss(pid)?);
        sample["proxy_open_files_limit"] = json!(proxy_open_files_limit(pid)?);
    }
    let to = target.to_string();
    let duration = plan.duration_ms.to_string();
    let mut requests = json!({ "get": 0.0, "mcp": 0.0 });
    let mut connections = 0usize;
    for load in LOADS
        .iter()
        .filter(|load| plan.loads.is_empty() || plan.loads.iter().any(|name| name == load.name))
    {
        let (conns, warmup, rate) = match load.shape {
            Shape::Single => (1, WARMUP_SINGLE, 0),
            Shape::Paced => (PACED_CONNECTIONS, WARMUP_SEVERAL, PACED_RATE),
            Shape::Saturated => (plan.connections, WARMUP_SEVERAL, 0),
        };
        let (conns_text, warmup_text, rate_text) =
            (conns.to_string(), warmup.to_string(), rate.to_string());
        let mut arguments = vec![
            "http",
            "--to",
            &to,
            "--connections",
            &conns_text,
            "--warmup",
            &warmup_text,
            "--rate",
            &rate_text,
            "--duration-ms",
            &duration,
        ];
        arguments.extend(load.request.loadgen_args());
        let arguments: Vec<String> = arguments.iter().map(|part| (*part).to_owned()).collect();
        let cpu_before = proxy_cpu(proxy)?;
        let report = match loadgen(bench.tree, &bench.client, &bench.tools.loadgen, &arguments) {
            Ok(report) => report,
            Err(error) => {
                eprintln!("    {} failed: {error:#}", load.name);
                errors.insert(load.name.to_owned(), json!(format!("{error:#}")));
                continue;
            }
        };
        let cpu_used = proxy_cpu(proxy)?
            .zip(cpu_before)
            .map(|(after, before)| after - before);
        connections += conns;
        // Warm-up requests ran through the proxy too, so they count for its CPU.
        let total = number(&report, "/requests")? + number(&report, "/warmup_requests")?;
        let kind = load.request.key();
        requests[kind] = json!(requests[kind].as_f64().unwrap_or(0.0) + total);
        let name = load.name;
        sample[format!("{name}_p50_us")] = json!(number(&report, "/p50_us")?);
        sample[format!("{name}_p99_us")] = json!(number(&report, "/p99_us")?);
        sample[format!("{name}_rps")] = json!(number(&report, "/requests_per_second")?);
        if let Some(cpu) = cpu_used {
            // The table's CPU rows are the saturated ones; the paced ones go to the JSON.
            let prefix = match load.shape {
                Shape::Saturated => kind.to_owned(),
                _ => name.to_owned(),
            };
            sample[format!("{prefix}_proxy_cpu_s_per_10k")] = json!(cpu / total.max(1.0) * 1e4);
            if cpu > 0.0 {
                sample[format!("{prefix}_requests_per_proxy_cpu_s")] = json!(total / cpu);
            }
        }
        sample["loadgen"][name] = report;
    }
    if let Some(pid) = proxy {
        sample["proxy_rss_after_load_mib"] = json!(proxy_rss(pid)?);
    }
    match idle_connections(bench, target, proxy) {
        Ok(idle) => {
            connections += plan.idle_connections;
            requests["get"] =
                json!(requests["get"].as_f64().unwrap_or(0.0) + plan.idle_connections as f64);
            if let (Some(before), Some(during)) = (
                sample["proxy_rss_after_load_mib"].as_f64(),
                idle["proxy_rss_idle_conns_mib"].as_f64(),
            ) {
                sample["proxy_kib_per_idle_conn"] =
                    json!((during - before) * 1024.0 / plan.idle_connections.max(1) as f64);
            }
            for (key, value) in idle.as_object().into_iter().flatten() {
                sample[key] = value.clone();
            }
        }
        Err(error) => {
            eprintln!("    idle connections failed: {error:#}");
            errors.insert("idle_connections".to_owned(), json!(format!("{error:#}")));
        }
    }
    sample["requests_made"] = requests;
    sample["connections_made"] = json!(connections);
    if !errors.is_empty() {
        sample["errors"] = Value::Object(errors);
    }
    Ok(sample)
}

/// The agent's Prometheus text from its admin endpoint.
fn scrape_metrics(agent: &AgentProcess) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", agent.admin_port))
        .context("connecting to the agent's admin endpoint")?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .context("reading the agent's metrics")?;
    Ok(text)
}

fn prometheus_value(metrics: &str, name: &str) -> f64 {
    mesh_tests::prometheus_sample(metrics, name).unwrap_or(0.0)
}

/// Checks that the kernel captured every connection of the run and that the agent's L7 path
/// (not opaque forwarding) served every request, MCP ones parsed as such.
fn check_mesh(bench: &Bench<'_>, agent: &AgentProcess, sample: &mut Value) -> anyhow::Result<()> {
    let counters = agent.workload_counters(&bench.client)?;
    let captured = counters["connections_captured"].as_u64().unwrap_or(0);
    let metrics = scrape_metrics(agent)?;
    let seen = |name: &str| prometheus_value(&metrics, name);
    let http = seen("mesh_http_requests_total");
    let mcp = seen("mesh_jsonrpc_requests_total{family=\"mcp\"}");
    sample["mesh_counters"] = json!({
        "connections_captured": captured,
        "http_requests": http,
        "mcp_requests": mcp,
        "denied": seen("mesh_http_denied_requests_total"),
        "rate_limited": seen("mesh_http_rate_limited_requests_total"),
        "retries": seen("mesh_http_retries_total"),
        "upstream_errors": seen("mesh_http_upstream_errors_total"),
    });
    if sample.get("errors").is_some() {
        // Partial runs make fewer connections and requests than planned; nothing to compare.
        return Ok(());
    }
    let connections = sample["connections_made"].as_u64().unwrap_or(0);
    if captured < connections {
        bail!(
            "mesh: the kernel captured {captured} connections, the run made {connections}: the \
             mesh path was not measured ({counters})"
        );
    }
    let made_get = sample["requests_made"]["get"].as_f64().unwrap_or(0.0);
    let made_mcp = sample["requests_made"]["mcp"].as_f64().unwrap_or(0.0);
    if http < made_get + made_mcp || mcp < made_mcp {
        bail!(
            "mesh: the agent's L7 path counted {http} HTTP requests ({mcp} MCP), the run made \
             {} ({made_mcp} MCP): requests bypassed the L7 path",
            made_get + made_mcp
        );
    }
    Ok(())
}

/// Runs one path once: starts its proxy fresh, measures, and stops the proxy.
fn run_path(kind: PathKind, bench: &Bench<'_>) -> anyhow::Result<Value> {
    match kind {
        PathKind::Direct => measure(bench, bench.upstream, None),
        PathKind::Mesh | PathKind::MeshAccelerated => {
            let agent = AgentProcess::start(
                bench.tree,
                AgentOptions {
                    accelerate: kind == PathKind::MeshAccelerated,
                    l7: true,
                    workloads: vec![("bench-client".into(), bench.client.clone())],
                    exclude_ports: vec![],
                    exclude_cidrs: vec![],
                    agent_cgroup: bench.tree.relative().join("agent"),
                    log_filter: "info".into(),
                    // `MESH_AGENT_BIN`, as in the tests: for instance a wrapper that runs the
                    // release agent under a profiler.
                    agent_binary: Some(
                        std::env::var_os("MESH_AGENT_BIN")
                            .map_or_else(|| bench.tools.agent.clone(), PathBuf::from),
                    ),
                    policy_dir: Some(bench.policy_dir.clone()),
                },
            )
            .context("starting the mesh agent")?;
            let mut sample = measure(bench, bench.upstream, agent.pid())?;
            check_mesh(bench, &agent, &mut sample)?;
            Ok(sample)
        }
        PathKind::Nginx => {
            let (nginx, address) = start_nginx(bench, bench.upstream)?;
            let sample = measure(bench, address, Some(nginx.master.id()));
            drop(nginx);
            sample
        }
        PathKind::Haproxy => {
            let (haproxy, address) = start_haproxy(bench, bench.upstream)?;
            measure(bench, address, Some(haproxy.0.id()))
        }
    }
}

/// Adds each path's added p99 latency (its p99 minus direct's in the same round), so the
/// median is taken over per-round differences.
fn add_added_latency(samples: &mut [Vec<Value>]) {
    let Some(direct) = samples.first().cloned() else {
        return;
    };
    for path in samples.iter_mut() {
        for (sample, direct) in path.iter_mut().zip(&direct) {
            for load in &LOADS {
                let key = format!("{}_p99_us", load.name);
                if let (Some(p99), Some(base)) = (sample[&key].as_f64(), direct[&key].as_f64()) {
                    sample[format!("{}_added_p99_us", load.name)] = json!(p99 - base);
                }
            }
        }
    }
}

/// Adds each proxy's requests per CPU second over nginx's and haproxy's in the same round:
/// the paths of a round run back to back, so a ratio within a round is spared most of the
/// drift between rounds that moves each path's own median.
fn add_cpu_ratios(samples: &mut [Vec<Value>]) {
    let index_of = |wanted: PathKind| PathKind::ALL.iter().position(|kind| *kind == wanted);
    let (Some(nginx), Some(haproxy)) = (index_of(PathKind::Nginx), index_of(PathKind::Haproxy))
    else {
        return;
    };
    let references = [
        ("nginx", samples[nginx].clone()),
        ("haproxy", samples[haproxy].clone()),
    ];
    for path in samples.iter_mut() {
        for (round, sample) in path.iter_mut().enumerate() {
            for request in ["get", "mcp"] {
                let key = format!("{request}_requests_per_proxy_cpu_s");
                for (name, reference) in &references {
                    if let Some(ratio) = reference
                        .get(round)
                        .and_then(|theirs| round_ratio(sample, theirs, &key))
                    {
                        sample[format!("{request}_proxy_cpu_vs_{name}")] = json!(ratio);
                    }
                }
            }
        }
    }
}

/// Whether each configuration of the mesh met the goal: better than both reference proxies
/// on added p99 latency and on requests per proxy CPU second (at saturation). Added p99
/// counts on one connection and at the paced load, where every path carries the same
/// requests; at saturation each path runs at its own rate, so its p99 is not comparable.
fn verdicts(results: &Value, mesh_kind: PathKind) -> Vec<(String, bool)> {
    let get = |kind: PathKind, key: &str| results[kind.key()][key].as_f64().unwrap_or(f64::NAN);
    let name = mesh_kind.label();
    let mut verdicts = Vec::new();
    for (request, label) in [
        (RequestKind::Get, "GET"),
        (RequestKind::Mcp, "MCP tools/call"),
    ] {
        let request = request.key();
        for (load, load_label) in [("c1", "1 conn"), ("paced", "2k req/s on 8 conns")] {
            let key = format!("{request}_{load}_added_p99_us");
            let [mesh, nginx, haproxy] =
                [mesh_kind, PathKind::Nginx, PathKind::Haproxy].map(|kind| get(kind, &key));
            verdicts.push((
                format!(
                    "{label}, {load_label}: added p99 of {name} {mesh:.1} µs below nginx's \
                     {nginx:.1} µs and haproxy's {haproxy:.1} µs"
                ),
                mesh < nginx && mesh < haproxy,
            ));
        }
        let key = format!("{request}_requests_per_proxy_cpu_s");
        let [mesh, nginx, haproxy] =
            [mesh_kind, PathKind::Nginx, PathKind::Haproxy].map(|kind| get(kind, &key));
        let [over_nginx, over_haproxy] = ["nginx", "haproxy"]
            .map(|reference| get(mesh_kind, &format!("{request}_proxy_cpu_vs_{reference}")));
        verdicts.push((
            format!(
                "{label}: requests per proxy CPU second of {name} {mesh:.0} above nginx's \
                 {nginx:.0} and haproxy's {haproxy:.0} (within each round: median \
                 {over_nginx:.2}× nginx's, {over_haproxy:.2}× haproxy's)"
            ),
            mesh > nginx && mesh > haproxy,
        ));
    }
    verdicts
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let plan = if args.quick {
        Plan {
            rounds: 1,
            duration_ms: 1000,
            connections: args.connections.max(1),
            idle_connections: args.idle_connections,
            open_files: 0,
            loads: args.loads.clone(),
        }
    } else {
        Plan {
            rounds: args.rounds.max(1),
            duration_ms: (args.seconds * 1000.0).max(100.0) as u64,
            connections: args.connections.max(1),
            idle_connections: args.idle_connections,
            open_files: 0,
            loads: args.loads.clone(),
        }
    };
    if let Some(unknown) = plan
        .loads
        .iter()
        .find(|name| !LOADS.iter().any(|load| load.name == name.as_str()))
    {
        let names: Vec<&str> = LOADS.iter().map(|load| load.name).collect();
        bail!(
            "unknown load {unknown:?}; the loads are {}",
            names.join(", ")
        );
    }
    // The proxies (and the upstream, for direct) each hold every idle connection, and their
    // upstream side too; they inherit this limit.
    let wanted_files = (plan.idle_connections as u64 * 2 + 8192).max(65_536);
    let (soft, hard) = mesh_tests::raise_open_files(wanted_files);
    let file_max = read_number("/proc/sys/fs/file-max");
    let nr_open = read_number("/proc/sys/fs/nr_open");
    step(&format!(
        "open-file limit for the bench and everything it starts: {soft} (hard {hard}; \
         wanted {wanted_files}); fs.file-max {}, fs.nr_open {}",
        file_max.map_or("?".to_owned(), |value| value.to_string()),
        nr_open.map_or("?".to_owned(), |value| value.to_string()),
    ));
    // A proxy holds one descriptor per idle client connection, plus its upstream pool.
    if soft < plan.idle_connections as u64 + 1024 {
        bail!(
            "the open-file limit is {soft} (hard {hard}), too low to hold {} idle connections \
             through a proxy: raise the hard limit (`ulimit -Hn`, CAP_SYS_RESOURCE) or lower \
             --idle-connections",
            plan.idle_connections
        );
    }
    let plan = Plan {
        open_files: soft,
        ..plan
    };
    let tools = build_release()?;
    let work_dir = std::env::temp_dir().join(unique_name("bench-l7"));
    fs::create_dir_all(&work_dir)?;
    let result = (|| -> anyhow::Result<Value> {
        let (_server, upstream) = start_server(&tools.loadgen, "http-server")?;
        let tree = CgroupTree::create("bench-l7")?;
        let client = tree.child("client")?;
        tree.child("agent")?;
        let policy_dir = work_dir.join("policies");
        fs::create_dir_all(&policy_dir)?;
        fs::write(policy_dir.join("bench.yaml"), mesh_resources(upstream))
            .context("writing the mesh resources")?;
        let bench = Bench {
            tree: &tree,
            client,
            tools: &tools,
            plan: &plan,
            upstream,
            work_dir: work_dir.clone(),
            policy_dir,
        };
        step(&format!(
            "upstream {upstream}, client cgroup {}/client; {} round(s), {} ms per load, \
             saturation at {} connections, {} idle connections",
            tree.relative().display(),
            plan.rounds,
            plan.duration_ms,
            plan.connections,
            plan.idle_connections
        ));
        let mut samples: Vec<Vec<Value>> = vec![Vec::new(); PathKind::ALL.len()];
        for round in 1..=plan.rounds {
            for (index, kind) in PathKind::ALL.into_iter().enumerate() {
                if !args.paths.is_empty() && !args.paths.iter().any(|path| path == kind.key()) {
                    continue;
                }
                step(&format!("round {round}/{}: {}", plan.rounds, kind.label()));
                let sample = run_path(kind, &bench)
                    .with_context(|| format!("round {round}, {}", kind.label()))?;
                let show = |key: &str| sample[key].as_f64().unwrap_or(f64::NAN);
                eprintln!(
                    "    GET 1 conn p99 {:.1} µs, {} conns {:.0} req/s; MCP 1 conn p99 {:.1} µs, \
                     {} conns {:.0} req/s",
                    show("get_c1_p99_us"),
                    plan.connections,
                    show("get_sat_rps"),
                    show("mcp_c1_p99_us"),
                    plan.connections,
                    show("mcp_sat_rps"),
                );
                samples[index].push(sample);
            }
        }
        add_added_latency(&mut samples);
        add_cpu_ratios(&mut samples);
        let mut results = json!({});
        for (index, kind) in PathKind::ALL.into_iter().enumerate() {
            results[kind.key()] = medians(&samples[index], &METRICS);
        }
        // Direct has no proxy: its proxy metrics are absent, not failed.
        if let Some(failed) = results["direct"]["failed_rounds"].as_object_mut() {
            failed.retain(|key, _| !key.contains("proxy"));
            if failed.is_empty() {
                results["direct"]
                    .as_object_mut()
                    .map(|direct| direct.remove("failed_rounds"));
            }
        }
        Ok(json!({
            "suite": "l7",
            "rounds": plan.rounds,
            "duration_ms": plan.duration_ms,
            "connections": plan.connections,
            "idle_connections": plan.idle_connections,
            "cpus": std::thread::available_parallelism().map_or(1, usize::from),
            "kernel": fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim(),
            "open_files": {
                "bench_soft": soft,
                "bench_hard": hard,
                "fs_file_max": file_max,
                "fs_nr_open": nr_open,
            },
            "median": results,
            "rounds_raw": PathKind::ALL
                .into_iter()
                .enumerate()
                .map(|(index, kind)| (kind.key().to_owned(), Value::from(samples[index].clone())))
                .collect::<serde_json::Map<_, _>>(),
        }))
    })();
    let _ = fs::remove_dir_all(&work_dir);
    let report = result?;

    let output = write_json_report(args.output.as_deref(), "l7", &report)?;
    let markdown_path = output.with_extension("md");
    let (markdown, errors) = markdown(&report, &plan);
    fs::write(&markdown_path, &markdown)
        .with_context(|| format!("writing {}", markdown_path.display()))?;
    println!("{markdown}");
    step(&format!(
        "reports: {} and {}",
        output.display(),
        markdown_path.display()
    ));
    if let Some(first) = errors.first() {
        bail!(
            "{} measurement(s) failed (listed above and in the reports), the first: {first}",
            errors.len()
        );
    }
    Ok(())
}

/// The Markdown report (table, limits, goal verdicts, failures) and the failures.
fn markdown(report: &Value, plan: &Plan) -> (String, Vec<String>) {
    let columns: Vec<Column> = PathKind::ALL
        .into_iter()
        .map(|kind| Column {
            key: kind.key(),
            label: kind.label(),
        })
        .collect();
    let results = &report["median"];
    // Latency and rate compare with direct; the added latency and the proxy's own costs
    // compare across the proxies (direct has none).
    let ratio_to_direct = |metric: &Metric| {
        let key = metric.key;
        ((key.ends_with("_p50_us") || key.ends_with("_p99_us") || key.ends_with("_rps"))
            && !key.contains("added"))
        .then_some(PathKind::Direct.key())
    };
    let mut out = String::from("# L7 benchmark: mesh vs nginx vs haproxy\n\n");
    let _ = writeln!(
        out,
        "Median of {} round(s) on {} CPU(s), kernel {}; {} ms per load; \"saturated\" is {} \
         keep-alive connections, \"1 conn\" one; {} idle keep-alive connections for memory. \
         (×) is the ratio to direct; \"added p99\" is the path's p99 minus direct's in the same \
         round. The paced load offers {PACED_RATE} req/s on {PACED_CONNECTIONS} connections on \
         a fixed schedule (latency counts from when a request was due); at saturation every \
         path runs at its own rate, so its p99 is shown but not judged. Proxy CPU per request \
         counts the saturated loads, warm-up included; proxy CPU and memory cover all the \
         proxy's processes (nginx: master and workers). Load generator: `mesh-loadgen http` \
         (the same for every path), in the client's cgroup.\n",
        report["rounds"],
        report["cpus"],
        report["kernel"].as_str().unwrap_or("?"),
        plan.duration_ms,
        plan.connections,
        plan.idle_connections,
    );
    out.push_str(&table(results, &columns, &METRICS, ratio_to_direct));
    out.push('\n');
    let files = &report["open_files"];
    let _ = write!(
        out,
        "Open-file limits: the bench raised its own to {} (hard {}; fs.file-max {}, \
         fs.nr_open {}); in force in the proxies:",
        files["bench_soft"], files["bench_hard"], files["fs_file_max"], files["fs_nr_open"]
    );
    for kind in PathKind::PROXIES {
        let limit = report["rounds_raw"][kind.key()][0]["proxy_open_files_limit"]
            .as_u64()
            .map_or("?".to_owned(), |limit| limit.to_string());
        let _ = write!(out, " {} {limit};", kind.key());
    }
    let loadgen_limit = report["rounds_raw"]["direct"][0]["loadgen_open_files_limit"]
        .as_u64()
        .map_or("?".to_owned(), |limit| limit.to_string());
    let _ = writeln!(out, " load generator {loadgen_limit}.\n");
    out.push_str(
        "Goal: the mesh beats both reference proxies on added p99 latency and on requests per \
         proxy CPU second.\n\n",
    );
    for mesh in PathKind::MESHES {
        let verdicts = verdicts(results, mesh);
        let _ = writeln!(out, "{}:\n", mesh.label());
        for (text, met) in &verdicts {
            let _ = writeln!(out, "- [{}] {text}", if *met { "met" } else { "MISSED" });
        }
        let all = verdicts.iter().all(|(_, met)| *met);
        let _ = writeln!(
            out,
            "- [{}] overall: {} beats nginx and haproxy on every line above\n",
            if all { "met" } else { "MISSED" },
            mesh.label()
        );
    }
    let mut errors = Vec::new();
    for kind in PathKind::ALL {
        for (round, sample) in report["rounds_raw"][kind.key()]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            for (name, error) in sample["errors"].as_object().into_iter().flatten() {
                errors.push(format!(
                    "{} round {}: {name} failed: {}",
                    kind.label(),
                    round + 1,
                    error.as_str().unwrap_or_default()
                ));
            }
        }
    }
    if !errors.is_empty() {
        out.push_str("\nFailed measurements:\n\n");
        for error in &errors {
            let _ = writeln!(out, "- {error}");
        }
    }
    (out, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_latency_is_taken_per_round() {
        let mut samples = vec![
            vec![
                json!({"get_c1_p99_us": 10.0}),
                json!({"get_c1_p99_us": 20.0}),
            ],
            vec![
                json!({"get_c1_p99_us": 15.0}),
                json!({"get_c1_p99_us": 21.0}),
            ],
        ];
        add_added_latency(&mut samples);
        assert_eq!(samples[0][0]["get_c1_added_p99_us"], json!(0.0));
        assert_eq!(samples[1][0]["get_c1_added_p99_us"], json!(5.0));
        assert_eq!(samples[1][1]["get_c1_added_p99_us"], json!(1.0));
        assert!(samples[1][1].get("mcp_c1_added_p99_us").is_none());
    }

    #[test]
    fn cpu_ratios_compare_with_the_reference_proxies_round_by_round() {
        // PathKind::ALL order: direct, mesh, mesh_accelerated, nginx, haproxy.
        let round = |per_cpu: Option<f64>| match per_cpu {
            Some(value) => json!({"get_requests_per_proxy_cpu_s": value}),
            None => json!({}),
        };
        let mut samples = vec![
            vec![round(None), round(None)],
            vec![round(Some(60.0)), round(Some(30.0))],
            vec![round(Some(90.0)), round(None)],
            vec![round(Some(50.0)), round(Some(25.0))],
            vec![round(Some(40.0)), round(Some(0.0))],
        ];
        add_cpu_ratios(&mut samples);
        let ratio = |path: usize, round: usize, reference: &str| {
            samples[path][round][format!("get_proxy_cpu_vs_{reference}")].as_f64()
        };
        // Each round against the same round's reference, not against its median.
        assert_eq!(ratio(1, 0, "nginx"), Some(1.2));
        assert_eq!(ratio(1, 1, "nginx"), Some(1.2));
        assert_eq!(ratio(1, 0, "haproxy"), Some(1.5));
        // No value, or a reference with no CPU measured: no ratio.
        assert_eq!(ratio(1, 1, "haproxy"), None);
        assert_eq!(ratio(2, 1, "nginx"), None);
        assert_eq!(ratio(0, 0, "nginx"), None);
        assert!(samples[1][0].get("mcp_proxy_cpu_vs_nginx").is_none());
    }

    #[test]
    fn verdicts_need_the_mesh_ahead_of_both_proxies() {
        let mut results = json!({});
        for (kind, added, per_cpu) in [
            ("mesh", 5.0, 30_000.0),
            ("mesh_accelerated", 10.0, 50_000.0),
            ("nginx", 8.0, 20_000.0),
            ("haproxy", 9.0, 40_000.0),
        ] {
            for key in [
                "get_c1_added_p99_us",
                "get_paced_added_p99_us",
                "mcp_c1_added_p99_us",
                "mcp_paced_added_p99_us",
            ] {
                results[kind][key] = json!(added);
            }
            results[kind]["get_requests_per_proxy_cpu_s"] = json!(per_cpu);
            results[kind]["mcp_requests_per_proxy_cpu_s"] = json!(per_cpu);
        }
        let verdicts = verdicts(&results, PathKind::Mesh);
        assert_eq!(verdicts.len(), 6);
        let met: Vec<bool> = verdicts.iter().map(|(_, met)| *met).collect();
        assert_eq!(met, [true, true, false, true, true, false]);
        // Each configuration of the mesh is judged on its own numbers.
        let verdicts = super::verdicts(&results, PathKind::MeshAccelerated);
        let met: Vec<bool> = verdicts.iter().map(|(_, met)| *met).collect();
        assert_eq!(met, [false, false, true, false, false, true]);
        // A missing value is never a win.
        let verdicts = super::verdicts(&json!({}), PathKind::Mesh);
        assert!(verdicts.iter().all(|(_, met)| !met));
    }

    #[test]
    fn prometheus_values_are_read_by_exact_name() {
        let text = "# HELP x\nmesh_http_requests_total 42\n\
                    mesh_jsonrpc_requests_total{family=\"mcp\"} 7\n";
        assert_eq!(prometheus_value(text, "mesh_http_requests_total"), 42.0);
        assert_eq!(
            prometheus_value(text, "mesh_jsonrpc_requests_total{family=\"mcp\"}"),
            7.0
        );
        assert_eq!(prometheus_value(text, "mesh_http"), 0.0);
    }
}
