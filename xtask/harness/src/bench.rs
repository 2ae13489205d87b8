//! `cargo xtask bench`: performance of the mesh path, measured against the direct path and a
//! reference proxy in the same run, with the same load generator (`mesh-loadgen`) for all.
//!
//! `datapath` compares four ways for a client in a test cgroup to reach a local server:
//! direct; through haproxy in TCP mode (Debian's, the reference); captured by the kernel
//! programs and carried by `mesh-agent`; and the same with sk_msg acceleration. For each it
//! measures connect latency, request/response latency and rate on one and on eight
//! connections, bulk throughput on one and on four streams, and the proxy's CPU time per
//! request and memory. Rounds interleave the paths so drift on the machine hits all of them
//! alike; the report shows the median of the rounds and each value as a ratio to direct.
//!
//! `l7` (in `bench_l7`) compares HTTP/1.1 and MCP request/response through the mesh's L7 path
//! with nginx and haproxy as HTTP reverse proxies. The helpers it shares with `datapath`
//! (processes, /proc readings, medians, tables) live here.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use mesh_tests::{AgentOptions, AgentProcess, CgroupTree, free_port, unique_name};
use serde_json::{Value, json};

use xtask::util::{self, step, workspace_root};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which benchmark to run.
    #[arg(value_enum)]
    pub suite: Suite,
    /// Rounds over all paths; the report shows the median of each measurement.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds of load per request/response and bulk measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Connections opened per connect-latency measurement (datapath).
    #[arg(long, default_value_t = 2000)]
    pub connects: usize,
    /// Connections of the saturation measurements (l7).
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Idle keep-alive connections held open through each proxy for its memory (l7).
    #[arg(long, default_value_t = 10_000)]
    pub idle_connections: usize,
    /// One short round (1 s per measurement, 300 connects): a smoke run, not for reporting.
    #[arg(long)]
    pub quick: bool,
    /// Only these paths (l7: direct, mesh, mesh_accelerated, nginx, haproxy; comma-separated), to look at
    /// one proxy (for instance under a profiler) without running the others.
    #[arg(long, value_delimiter = ',')]
    pub paths: Vec<String>,
    /// Only these loads (l7: get_c1, mcp_c1, get_paced, mcp_paced, get_sat, mcp_sat;
    /// comma-separated), to profile one of them without waiting through the rest.
    #[arg(long, value_delimiter = ',')]
    pub loads: Vec<String>,
    /// Where the JSON report goes (default: target/bench/<suite>.json).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Suite {
    /// Connect, request/response and bulk over the capture datapath.
    Datapath,
    /// HTTP/1.1 and MCP tools/call through the mesh's L7 path, nginx and haproxy.
    L7,
    /// The control plane: apply-to-enforcement on three agents, sync cost at 10k resources.
    Control,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match args.suite {
        Suite::Datapath => datapath(args),
        Suite::L7 => crate::bench_l7::run(args),
        Suite::Control => crate::bench_control::run(args),
    }
}

/// The ways a client reaches the server, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathKind {
    Direct,
    Haproxy,
    Mesh,
    MeshAccelerated,
}

impl PathKind {
    const ALL: [Self; 4] = [
        Self::Direct,
        Self::Haproxy,
        Self::Mesh,
        Self::MeshAccelerated,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Haproxy => "haproxy (tcp mode)",
            Self::Mesh => "mesh (captured)",
            Self::MeshAccelerated => "mesh + sk_msg",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Haproxy => "haproxy",
            Self::Mesh => "mesh",
            Self::MeshAccelerated => "mesh_accelerated",
        }
    }
}

/// One measured quantity: its key in the JSON report, its label, and whether larger is better.
pub(crate) struct Metric {
    pub(crate) key: &'static str,
    pub(crate) label: &'static str,
    pub(crate) unit: &'static str,
    pub(crate) higher_is_better: bool,
}

const METRICS: [Metric; 16] = [
    metric("connect_p50_us", "connect p50", "µs", false),
    metric("connect_p99_us", "connect p99", "µs", false),
    metric(
        "first_response_p50_us",
        "connect + 1st reply p50",
        "µs",
        false,
    ),
    metric(
        "first_response_p99_us",
        "connect + 1st reply p99",
        "µs",
        false,
    ),
    metric("rr1_p50_us", "req/resp 64 B, 1 conn, p50", "µs", false),
    metric("rr1_p99_us", "req/resp 64 B, 1 conn, p99", "µs", false),
    metric("rr1_rps", "req/resp 64 B, 1 conn, rate", "req/s", true),
    metric("rr8_p50_us", "req/resp 64 B, 8 conns, p50", "µs", false),
    metric("rr8_p99_us", "req/resp 64 B, 8 conns, p99", "µs", false),
    metric("rr8_rps", "req/resp 64 B, 8 conns, rate", "req/s", true),
    metric("bulk1_gbps", "bulk, 1 stream", "Gbit/s", true),
    metric("bulk4_gbps", "bulk, 4 streams", "Gbit/s", true),
    metric(
        "proxy_cpu_us_per_request",
        "proxy CPU per request (8 conns)",
        "µs",
        false,
    ),
    metric(
        "proxy_cpu_s_per_gb",
        "proxy CPU per GB (1 stream)",
        "s",
        false,
    ),
    metric("proxy_rss_mib", "proxy RSS after load", "MiB", false),
    metric("proxy_peak_rss_mib", "proxy peak RSS", "MiB", false),
];

pub(crate) const fn metric(
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    higher_is_better: bool,
) -> Metric {
    Metric {
        key,
        label,
        unit,
        higher_is_better,
    }
}

/// Warm-up requests per connection of the eight-connection request/response measurement.
const RR8_WARMUP: usize = 200;

/// Settings of one benchmark run.
struct Plan {
    rounds: usize,
    duration_ms: u64,
    connects: usize,
}

/// A child process killed (and reaped) when dropped.
pub(crate) struct Guard(pub(crate) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the benchmark needs from the machine and the build.
pub(crate) struct Tools {
    pub(crate) agent: PathBuf,
    pub(crate) loadgen: PathBuf,
    pub(crate) handshake: PathBuf,
}

pub(crate) fn build_release() -> anyhow::Result<Tools> {
    step("building mesh-agent and mesh-loadgen (release)");
    util::run(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "mesh-agent",
        "-p",
        "mesh-tests",
        "--bins",
    ]))?;
    let release = workspace_root().join("target/release");
    Ok(Tools {
        agent: release.join("mesh-agent"),
        loadgen: release.join("mesh-loadgen"),
        handshake: release.join("mesh-handshake"),
    })
}

/// Starts a `mesh-loadgen` server mode (`serve`, `http-server`) and returns it with the
/// address it listens on.
pub(crate) fn start_server(loadgen: &Path, mode: &str) -> anyhow::Result<(Guard, SocketAddr)> {
    let mut child = Command::new(loadgen)
        .args([mode, "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting mesh-loadgen {mode}"))?;
    let stdout = child.stdout.take().context("no stdout from the server")?;
    let guard = Guard(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the server's address")?;
    let address = line
        .trim()
        .strip_prefix("listening ")
        .with_context(|| format!("unexpected first line from the server: {line:?}"))?
        .parse()
        .context("parsing the server's address")?;
    Ok((guard, address))
}

/// Starts haproxy forwarding TCP from a free loopback port to `server`, one thread per core
/// like the agent's runtime.
fn start_haproxy(work_dir: &Path, server: SocketAddr) -> anyhow::Result<(Guard, SocketAddr)> {
    let port = free_port()?;
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let config = format!(
        "global\n    nbthread {threads}\n    maxconn 4000\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    \
         timeout server 60s\n\n\
         listen forward\n    bind {listen}\n    server upstream {server}\n"
    );
    let path = work_dir.join("haproxy.cfg");
    fs::write(&path, config).context("writing the haproxy config")?;
    Ok((spawn_haproxy(&path, listen)?, listen))
}

/// Runs haproxy in the foreground on a config file and waits until it listens on `listen`.
pub(crate) fn spawn_haproxy(config: &Path, listen: SocketAddr) -> anyhow::Result<Guard> {
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting haproxy (cargo xtask setup installs it)")?;
    let mut guard = Guard(child);
    wait_listening(&mut guard.0, listen, "haproxy")?;
    Ok(guard)
}

/// Waits until something accepts connections on `listen`, failing early when `process` (what
/// should listen there) exits.
pub(crate) fn wait_listening(
    process: &mut Child,
    listen: SocketAddr,
    name: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).is_err() {
        if let Ok(Some(status)) = process.try_wait() {
            bail!("{name} exited ({status}); its messages are above");
        }
        if Instant::now() > deadline {
            bail!("{name} did not listen on {listen} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// User plus system CPU seconds a process has used so far, from /proc/<pid>/stat.
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(index)
            .context("short /proc/<pid>/stat")?
            .parse::<f64>()?)
    };
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / ticks_per_second.max(1.0))
}

/// A `VmRSS`-style field of /proc/<pid>/status in MiB.
pub(crate) fn memory_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

/// Runs one `mesh-loadgen` client in the client cgroup and returns its JSON report.
pub(crate) fn loadgen(
    tree: &CgroupTree,
    client: &Path,
    binary: &Path,
    args: &[String],
) -> anyhow::Result<Value> {
    let output = tree.run_in(client, Command::new(binary).args(args))?;
    if !output.status.success() {
        bail!(
            "mesh-loadgen {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "mesh-loadgen printed no JSON: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

pub(crate) fn number(report: &Value, pointer: &str) -> anyhow::Result<f64> {
    report
        .pointer(pointer)
        .and_then(Value::as_f64)
        .with_context(|| format!("no {pointer} in {report}"))
}

/// One load generator run: its name, its arguments, and which report values (JSON pointers)
/// become which metrics.
pub(crate) type LoadRun<'a> = (
    &'static str,
    Vec<&'a str>,
    Vec<(&'static str, &'static str)>,
);

/// Measures every metric of one path once. `proxy` is the pid of the forwarding process,
/// if any. A measurement that fails is recorded under `errors` (with the reason) and the
/// others still run: a failing path is a result, not a reason to lose the rest.
fn measure(
    tree: &CgroupTree,
    client: &Path,
    tools: &Tools,
    plan: &Plan,
    target: SocketAddr,
    proxy: Option<u32>,
) -> anyhow::Result<Value> {
    let to = target.to_string();
    let duration = plan.duration_ms.to_string();
    let connects = plan.connects.to_string();
    let warmup = RR8_WARMUP.to_string();
    let cpu = || proxy.map(cpu_seconds).transpose();
    let mut sample = json!({});
    let mut errors = serde_json::Map::new();
    // (name, arguments, [(metric key, JSON pointer into the loadgen report)])
    let runs: [LoadRun<'_>; 5] = [
        (
            "connect",
            vec!["connect", "--to", &to, "--count", &connects],
            vec![
                ("connect_p50_us", "/connect/p50_us"),
                ("connect_p99_us", "/connect/p99_us"),
                (
                    "first_response_p50_us",
                    "/connect_and_first_response/p50_us",
                ),
                (
                    "first_response_p99_us",
                    "/connect_and_first_response/p99_us",
                ),
            ],
        ),
        (
            "rr1",
            vec!["rr", "--to", &to, "--duration-ms", &duration],
            vec![
                ("rr1_p50_us", "/p50_us"),
                ("rr1_p99_us", "/p99_us"),
                ("rr1_rps", "/requests_per_second"),
            ],
        ),
        (
            "rr8",
            vec![
                "rr",
                "--to",
                &to,
                "--connections",
                "8",
                "--warmup",
                &warmup,
                "--duration-ms",
                &duration,
            ],
            vec![
                ("rr8_p50_us", "/p50_us"),
                ("rr8_p99_us", "/p99_us"),
                ("rr8_rps", "/requests_per_second"),
            ],
        ),
        (
            "bulk1",
            vec!["bulk", "--to", &to, "--duration-ms", &duration],
            vec![("bulk1_gbps", "/gbit_per_second")],
        ),
        (
            "bulk4",
            vec![
                "bulk",
                "--to",
                &to,
                "--streams",
                "4",
                "--duration-ms",
                &duration,
            ],
            vec![("bulk4_gbps", "/gbit_per_second")],
        ),
    ];
    for (name, arguments, metrics) in runs {
        let arguments: Vec<String> = arguments.iter().map(|part| (*part).to_owned()).collect();
        let cpu_before = cpu()?;
        let report = match loadgen(tree, client, &tools.loadgen, &arguments) {
            Ok(report) => report,
            Err(error) => {
                eprintln!("    {name} failed: {error:#}");
                errors.insert(name.to_owned(), json!(format!("{error:#}")));
                continue;
            }
        };
        let cpu_used = cpu()?.zip(cpu_before).map(|(after, before)| after - before);
        for (key, pointer) in metrics {
            sample[key] = json!(number(&report, pointer)?);
        }
        match (name, cpu_used) {
            ("rr8", Some(cpu_used)) => {
                // Warm-up requests ran through the proxy too, so they count.
                let requests = number(&report, "/samples")? + 8.0 * RR8_WARMUP as f64;
                sample["proxy_cpu_us_per_request"] = json!(cpu_used / requests.max(1.0) * 1e6);
            }
            ("bulk1", Some(cpu_used)) => {
                let gigabytes = number(&report, "/bytes")? / 1e9;
                sample["proxy_cpu_s_per_gb"] = json!(cpu_used / gigabytes.max(1e-9));
            }
            _ => {}
        }
    }
    if let Some(pid) = proxy {
        sample["proxy_rss_mib"] = json!(memory_mib(pid, "VmRSS")?);
        sample["proxy_peak_rss_mib"] = json!(memory_mib(pid, "VmHWM")?);
    }
    if !errors.is_empty() {
        sample["errors"] = Value::Object(errors);
    }
    Ok(sample)
}

/// Runs one path once: starts what forwards for it, measures, checks the capture really
/// carried the traffic, and tears the forwarder down.
fn run_path(
    kind: PathKind,
    tree: &CgroupTree,
    tools: &Tools,
    plan: &Plan,
    server: SocketAddr,
    haproxy: (&Guard, SocketAddr),
) -> anyhow::Result<Value> {
    let client = tree.relative().join("client");
    match kind {
        PathKind::Direct => measure(tree, &client, tools, plan, server, None),
        PathKind::Haproxy => measure(
            tree,
            &client,
            tools,
            plan,
            haproxy.1,
            Some(haproxy.0.0.id()),
        ),
        PathKind::Mesh | PathKind::MeshAccelerated => {
            let agent = AgentProcess::start(
                tree,
                AgentOptions {
                    accelerate: kind == PathKind::MeshAccelerated,
                    l7: true,
                    workloads: vec![("bench-client".into(), client.clone())],
                    exclude_ports: vec![],
                    exclude_cidrs: vec![],
                    agent_cgroup: tree.relative().join("agent"),
                    log_filter: "info".into(),
                    // `MESH_AGENT_BIN`, as in the tests and the l7 bench: another build of
                    // the agent, for an A/B in one sitting.
                    agent_binary: Some(
                        std::env::var_os("MESH_AGENT_BIN")
                            .map_or_else(|| tools.agent.clone(), PathBuf::from),
                    ),
                    policy_dir: None,
                },
            )?;
            let sample = measure(tree, &client, tools, plan, server, agent.pid())?;
            let counters = agent.workload_counters(&client)?;
            let captured = counters["connections_captured"].as_u64().unwrap_or(0);
            // Every connection of the run: connects, 1 + 8 request/response, 1 + 4 bulk; at
            // least the connects when a measurement failed part-way.
            let expected = if sample.get("errors").is_some() {
                plan.connects as u64
            } else {
                (plan.connects + 14) as u64
            };
            if captured < expected {
                bail!(
                    "{}: the kernel captured {captured} connections, the run made {expected}: \
                     the mesh path was not measured ({counters})",
                    kind.label()
                );
            }
            Ok(sample)
        }
    }
}

pub(crate) fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    match values.len() {
        0 => None,
        length if length % 2 == 1 => Some(values[middle]),
        _ => Some((values[middle - 1] + values[middle]) / 2.0),
    }
}

/// The median of each metric over the rounds of one path, and under `failed_rounds` how
/// many rounds could not measure it.
pub(crate) fn medians(samples: &[Value], metrics: &[Metric]) -> Value {
    let mut result = json!({});
    let mut failed = serde_json::Map::new();
    for metric in metrics {
        let values: Vec<f64> = samples
            .iter()
            .filter_map(|sample| sample[metric.key].as_f64())
            .collect();
        let missing = samples.len() - values.len();
        if missing > 0 && !samples.iter().all(|sample| sample.get("errors").is_none()) {
            failed.insert(metric.key.to_owned(), json!(missing));
        }
        if let Some(value) = median(values) {
            result[metric.key] = json!(value);
        }
    }
    if !failed.is_empty() {
        result["failed_rounds"] = Value::Object(failed);
    }
    result
}

fn format_value(value: f64) -> String {
    if value >= 1000.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// A column of a results table: the path's key in the results and its heading.
pub(crate) struct Column {
    pub(crate) key: &'static str,
    pub(crate) label: &'static str,
}

/// A Markdown table: one row per metric, one column per path; each value with its ratio to
/// the column `baseline` names for the metric (none for `None`, and none in that column).
pub(crate) fn table(
    results: &Value,
    columns: &[Column],
    metrics: &[Metric],
    baseline: impl Fn(&Metric) -> Option<&'static str>,
) -> String {
    let mut out = String::from("| metric |");
    for column in columns {
        let _ = write!(out, " {} |", column.label);
    }
    out.push_str("\n|---|");
    for _ in columns {
        out.push_str("---:|");
    }
    out.push('\n');
    for metric in metrics {
        let baseline_key = baseline(metric);
        let base = baseline_key.and_then(|key| results[key][metric.key].as_f64());
        let direction = if metric.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        };
        let _ = write!(out, "| {} ({}, {direction}) |", metric.label, metric.unit);
        for column in columns {
            let failed = results[column.key]["failed_rounds"][metric.key]
                .as_u64()
                .map(|rounds| format!(" **failed in {rounds} round(s)**"))
                .unwrap_or_default();
            match results[column.key][metric.key].as_f64() {
                Some(value) => {
                    let ratio = match base {
                        Some(base) if base > 0.0 && Some(column.key) != baseline_key => {
                            format!(" ({:.2}×)", value / base)
                        }
                        _ => String::new(),
                    };
                    let _ = write!(out, " {}{ratio}{failed} |", format_value(value));
                }
                None if failed.is_empty() => out.push_str(" – |"),
                None => {
                    let _ = write!(out, "{failed} |");
                }
            }
        }
        out.push('\n');
    }
    out
}

/// The datapath table: ratios to direct, or to haproxy for the proxy's own CPU and memory.
fn datapath_table(results: &Value) -> String {
    let columns: Vec<Column> = PathKind::ALL
        .into_iter()
        .map(|kind| Column {
            key: kind.key(),
            label: kind.label(),
        })
        .collect();
    table(results, &columns, &METRICS, |metric| {
        Some(if metric.key.starts_with("proxy_") {
            PathKind::Haproxy.key()
        } else {
            PathKind::Direct.key()
        })
    })
}

/// The median over rounds of `kind`'s `key` divided by `reference`'s in the same round: the
/// paths of a round run back to back, so the ratio is spared most of the drift between rounds
/// that moves each path's own median. NaN when no round has both.
pub(crate) fn median_round_ratio(rounds: &Value, kind: &str, reference: &str, key: &str) -> f64 {
    let ours = rounds[kind].as_array().into_iter().flatten();
    let theirs = rounds[reference].as_array().into_iter().flatten();
    let ratios: Vec<f64> = ours
        .zip(theirs)
        .filter_map(|(ours, theirs)| round_ratio(ours, theirs, key))
        .collect();
    median(ratios).unwrap_or(f64::NAN)
}

/// One round's `key` of a path over the same round's of a reference path; `None` when
/// either has no value or the ratio is not finite (the reference measured nothing).
pub(crate) fn round_ratio(ours: &Value, theirs: &Value, key: &str) -> Option<f64> {
    Some(ours[key].as_f64()? / theirs[key].as_f64()?).filter(|ratio| ratio.is_finite())
}

/// The stage targets, each with whether this run met it (judged on the medians; the text adds
/// the median of the per-round ratios).
fn verdicts(report: &Value) -> Vec<(String, bool)> {
    let results = &report["median"];
    let rounds = &report["rounds_raw"];
    let get = |kind: PathKind, key: &str| results[kind.key()][key].as_f64().unwrap_or(f64::NAN);
    let mut verdicts = Vec::new();
    for key in ["rr1_p50_us", "rr1_p99_us", "rr8_p50_us", "rr8_p99_us"] {
        let mesh = get(PathKind::Mesh, key);
        let haproxy = get(PathKind::Haproxy, key);
        let within = median_round_ratio(rounds, PathKind::Mesh.key(), PathKind::Haproxy.key(), key);
        verdicts.push((
            format!(
                "mesh {key} {mesh:.1} µs no worse than haproxy's {haproxy:.1} µs (within each \
                 round: median {within:.2}× haproxy's)"
            ),
            mesh <= haproxy,
        ));
    }
    for key in ["rr1_p50_us", "rr8_p50_us"] {
        let accelerated = get(PathKind::MeshAccelerated, key);
        let mesh = get(PathKind::Mesh, key);
        verdicts.push((
            format!("sk_msg {key} {accelerated:.1} µs faster than captured {mesh:.1} µs"),
            accelerated < mesh,
        ));
    }
    for kind in [PathKind::Mesh, PathKind::MeshAccelerated] {
        for key in ["bulk1_gbps", "bulk4_gbps"] {
            let ratio = get(kind, key) / get(PathKind::Direct, key);
            let within = median_round_ratio(rounds, kind.key(), PathKind::Direct.key(), key);
            verdicts.push((
                format!(
                    "{} {key} at least 70% of direct: {:.0}% (within each round: median {:.0}%)",
                    kind.label(),
                    ratio * 100.0,
                    within * 100.0
                ),
                ratio >= 0.7,
            ));
        }
    }
    verdicts
}

fn datapath(args: &BenchArgs) -> anyhow::Result<()> {
    let plan = if args.quick {
        Plan {
            rounds: 1,
            duration_ms: 1000,
            connects: 300,
        }
    } else {
        Plan {
            rounds: args.rounds.max(1),
            duration_ms: (args.seconds * 1000.0).max(100.0) as u64,
            connects: args.connects.max(10),
        }
    };
    let tools = build_release()?;
    let work_dir = std::env::temp_dir().join(unique_name("bench"));
    fs::create_dir_all(&work_dir)?;
    let result = (|| -> anyhow::Result<Value> {
        let (_server, server) = start_server(&tools.loadgen, "serve")?;
        let (haproxy, haproxy_address) = start_haproxy(&work_dir, server)?;
        let tree = CgroupTree::create("bench")?;
        tree.child("client")?;
        tree.child("agent")?;
        step(&format!(
            "server {server}, haproxy {haproxy_address}, client cgroup {}/client; {} round(s), \
             {} ms per load measurement",
            tree.relative().display(),
            plan.rounds,
            plan.duration_ms
        ));
        let mut samples: Vec<Vec<Value>> = vec![Vec::new(); PathKind::ALL.len()];
        for round in 1..=plan.rounds {
            for (index, kind) in PathKind::ALL.into_iter().enumerate() {
                step(&format!("round {round}/{}: {}", plan.rounds, kind.label()));
                let sample = run_path(
                    kind,
                    &tree,
                    &tools,
                    &plan,
                    server,
                    (&haproxy, haproxy_address),
                )?;
                eprintln!(
                    "    rr 1 conn p50 {:.1} µs p99 {:.1} µs; bulk 1 stream {:.2} Gbit/s",
                    sample["rr1_p50_us"].as_f64().unwrap_or(f64::NAN),
                    sample["rr1_p99_us"].as_f64().unwrap_or(f64::NAN),
                    sample["bulk1_gbps"].as_f64().unwrap_or(f64::NAN)
                );
                samples[index].push(sample);
            }
        }
        let mut results = json!({});
        for (index, kind) in PathKind::ALL.into_iter().enumerate() {
            results[kind.key()] = medians(&samples[index], &METRICS);
        }
        Ok(json!({
            "suite": "datapath",
            "rounds": plan.rounds,
            "duration_ms": plan.duration_ms,
            "connects": plan.connects,
            "cpus": std::thread::available_parallelism().map_or(1, usize::from),
            "kernel": fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim(),
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

    let output = write_json_report(args.output.as_deref(), "datapath", &report)?;

    step(&format!(
        "datapath benchmark: median of {} round(s); (×) is the ratio to direct, or to haproxy \
         for the proxy's own CPU and memory",
        plan.rounds
    ));
    println!("{}", datapath_table(&report["median"]));
    for kind in PathKind::ALL {
        for (round, sample) in report["rounds_raw"][kind.key()]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if let Some(errors) = sample["errors"].as_object() {
                for (name, error) in errors {
                    println!(
                        "  {} round {}: {name} failed: {}",
                        kind.label(),
                        round + 1,
                        error.as_str().unwrap_or_default()
                    );
                }
            }
        }
    }
    step("stage targets");
    for (text, met) in verdicts(&report) {
        println!("  [{}] {text}", if met { "met" } else { "MISSED" });
    }
    step(&format!("JSON report: {}", output.display()));
    Ok(())
}

/// Writes a suite's JSON report to `output`, or to `target/bench/<suite>.json`; returns where.
pub(crate) fn write_json_report(
    output: Option<&Path>,
    suite: &str,
    report: &Value,
) -> anyhow::Result<PathBuf> {
    let output = output.map_or_else(
        || workspace_root().join(format!("target/bench/{suite}.json")),
        Path::to_path_buf,
    );
    if let Some(parent) = output.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&output, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_ratios_pair_each_round_with_the_same_round_of_the_reference() {
        let rounds = json!({
            "mesh": [{"rr": 90.0}, {"rr": 160.0}, {"rr": 50.0}, {}],
            "haproxy": [{"rr": 100.0}, {"rr": 200.0}, {"rr": 100.0}, {"rr": 10.0}],
        });
        // 0.9, 0.8 and 0.5: the fourth round has no value of its own and is left out.
        assert_eq!(median_round_ratio(&rounds, "mesh", "haproxy", "rr"), 0.8);
        assert!(median_round_ratio(&rounds, "mesh", "nginx", "rr").is_nan());
        assert!(median_round_ratio(&rounds, "mesh", "haproxy", "other").is_nan());
    }
}
