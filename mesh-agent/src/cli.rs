//! The `mesh-agent` command line: run the agent, enrol and unenrol workloads, show counters,
//! detach everything. Exit codes: 0 success, 1 runtime failure, 2 usage, 3 invalid
//! configuration, 4 missing privileges or kernel support, 5 no datapath pinned.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::{
    agent::{self, AgentError},
    config::AgentConfig,
    datapath::{self, Datapath, DatapathError, cgroup},
};

/// Default bpffs folder for the datapath's pins.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/agent-mesh";

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "Agent Mesh node agent: eBPF capture and proxy for AI agents"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "MESH_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. `info,mesh_agent=debug`).
    #[arg(long, default_value = "info", global = true, env = "MESH_LOG")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent (standalone mode: settings and workloads from a config file).
    Run {
        /// AgentConfig YAML file; without it the built-in standalone defaults apply.
        #[arg(long, short = 'c', env = "MESH_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Check a config file and print it with defaults filled in.
    Validate {
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// Enrol a workload (by cgroup or pid) for capture in the running datapath.
    Enrol(TargetArgs),
    /// Remove a workload from capture.
    Unenrol(TargetArgs),
    /// Show per-workload traffic counters and datapath events.
    Counters {
        #[command(flatten)]
        pins: PinArgs,
        #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Detach every kernel program and remove every pin (uninstall; capture stops).
    Detach {
        #[command(flatten)]
        pins: PinArgs,
    },
    /// The certificate authority: create, run the etcd signer, rotate.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

/// `mesh-agent ca ...`.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a CA (key mode 0600, self-signed certificate, trust bundle) in a new folder.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain (`spiffe://<trust-domain>/...`).
        #[arg(long, default_value = "mesh.local")]
        trust_domain: String,
    },
    /// Publish the trust bundle to etcd and answer certificate requests until stopped.
    Run {
        /// etcd client URLs, comma-separated.
        #[arg(
            long,
            env = "MESH_ETCD",
            default_value = "http://127.0.0.1:2379",
            value_delimiter = ','
        )]
        etcd: Vec<String>,
        #[command(flatten)]
        etcd_tls: crate::control::ctl::EtcdTlsArgs,
        /// Key prefix of the mesh's resources.
        #[arg(long, env = "MESH_PREFIX", default_value = crate::control::keys::DEFAULT_PREFIX)]
        prefix: String,
        /// The CA folder (`mesh-agent ca init`).
        #[arg(long)]
        dir: PathBuf,
        /// Lifetime of issued certificates (10s to 30d).
        #[arg(long, default_value = "4h", value_parser = humantime::parse_duration)]
        certificate_ttl: std::time::Duration,
        /// Requests older than this are refused as stale.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        max_request_age: std::time::Duration,
        /// How often requests are listed again and the CA folder re-read.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        resync: std::time::Duration,
        #[command(flatten)]
        kubernetes: Box<crate::kube::KubernetesArgs>,
    },
    /// Make a new signing CA next to the old one (both stay trusted until `prune`).
    Rotate {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Drop every CA but the signing one from the trust bundle (after a rotation, once every
    /// certificate of the old CA has expired).
    Prune {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// bpffs folder the agent pins its state in (spec.datapath.pinDir).
    #[arg(long, env = "MESH_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false, id = "target")]
pub struct TargetArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// cgroup path, relative to the cgroup2 mount (or absolute under it).
    #[arg(long, group = "target")]
    pub cgroup: Option<PathBuf>,
    /// A process whose cgroup is the workload.
    #[arg(long, group = "target")]
    pub pid: Option<u32>,
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct CliFailure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl From<AgentError> for CliFailure {
    fn from(error: AgentError) -> Self {
        let code = match &error {
            AgentError::Config(_) | AgentError::Policy { .. } | AgentError::Etcd(_) => 3,
            AgentError::Datapath(datapath) => datapath_exit_code(datapath),
            _ => 1,
        };
        Self {
            code,
            error: error.into(),
        }
    }
}

impl From<DatapathError> for CliFailure {
    fn from(error: DatapathError) -> Self {
        Self {
            code: datapath_exit_code(&error),
            error: error.into(),
        }
    }
}

fn datapath_exit_code(error: &DatapathError) -> u8 {
    match error {
        DatapathError::MissingPrivileges { .. }
        | DatapathError::UnsupportedHook { .. }
        | DatapathError::NoCgroup2
        | DatapathError::NoBpffs { .. } => 4,
        DatapathError::NotRunning { .. } => 5,
        _ => 1,
    }
}

/// Installs the tracing subscriber the flags ask for.
pub fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs a parsed command.
pub async fn execute(command: Command) -> Result<(), CliFailure> {
    match command {
        Command::Run { config } => {
            let config = match config {
                Some(path) => AgentConfig::load(&path).map_err(AgentError::from)?,
                None => AgentConfig::standalone_default(),
            };
            agent::run(config).await?;
        }
        Command::Validate { config } => {
            let config = AgentConfig::load(&config).map_err(AgentError::from)?;
            let yaml = serde_yaml::to_string(&config).map_err(|error| CliFailure {
                code: 1,
                error: error.into(),
            })?;
            print!("{yaml}");
            if let Some(dir) = &config.spec.policy.dir {
                // The same all-or-nothing load the agent does at start and on every change.
                let store = crate::policy::PolicyStore::new(crate::policy::PolicySnapshot::empty(
                    config.spec.policy.default_action,
                ));
                let snapshot = store
                    .reload_dir(dir, config.spec.policy.default_action)
                    .map_err(|problems| AgentError::Policy {
                        dir: dir.clone(),
                        problems,
                    })?;
                eprintln!(
                    "policy folder {}: {} resources, valid",
                    dir.display(),
                    snapshot.resource_count()
                );
                for warning in snapshot.warnings() {
                    eprintln!("warning: {warning}");
                }
            }
        }
        Command::Enrol(target) => {
            let datapath = Datapath::open_pinned(&target.pins.pin_dir)?;
            let cgroup = match (target.cgroup, target.pid) {
                (Some(path), _) => datapath.enrol_cgroup(&path)?,
                (None, Some(pid)) => datapath.enrol_pid(pid)?,
                (None, None) => unreachable_target()?,
            };
            println!(
                "enrolled {} (cgroup id {})",
                cgroup.path.display(),
                cgroup.id
            );
        }
        Command::Unenrol(target) => {
            let datapath = Datapath::open_pinned(&target.pins.pin_dir)?;
            let path = match (target.cgroup, target.pid) {
                (Some(path), _) => path,
                (None, Some(pid)) => cgroup::cgroup_of_pid(pid)?,
                (None, None) => unreachable_target()?,
            };
            let cgroup = datapath.unenrol_cgroup(&path)?;
            println!(
                "unenrolled {} (cgroup id {})",
                cgroup.path.display(),
                cgroup.id
            );
        }
        Command::Counters { pins, output } => {
            let datapath = Datapath::open_pinned(&pins.pin_dir)?;
            print_counters(&datapath, output)?;
        }
        Command::Ca { command } => crate::identity::signer::execute(command)
            .await
            .map_err(|(code, error)| CliFailure { code, error })?,
        Command::Detach { pins } => {
            let report = datapath::detach(&pins.pin_dir)?;
            println!(
                "detached {} links and removed {} map pins from {}",
                report.links,
                report.maps,
                pins.pin_dir.display()
            );
        }
    }
    Ok(())
}

fn unreachable_target<T>() -> Result<T, CliFailure> {
    Err(CliFailure {
        code: 2,
        error: anyhow::anyhow!("give --cgroup or --pid"),
    })
}

#[derive(Debug, Serialize)]
struct CountersReport {
    workloads: Vec<WorkloadRow>,
    events: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
struct WorkloadRow {
    cgroup_id: u64,
    cgroup: Option<String>,
    enrolled: bool,
    tx_bytes: u64,
    rx_bytes: u64,
    tx_packets: u64,
    rx_packets: u64,
    tx_payload_bytes: u64,
    rx_payload_bytes: u64,
    connections_out: u64,
    connections_in: u64,
    connections_captured: u64,
    redirected_bytes: u64,
}

fn print_counters(datapath: &Datapath, output: OutputFormat) -> Result<(), CliFailure> {
    let mount = datapath.cgroup_mount().to_path_buf();
    let workloads = datapath
        .maps()
        .counters()?
        .into_iter()
        .map(|entry| {
            let totals = entry.totals;
            WorkloadRow {
                cgroup_id: entry.cgroup_id,
                cgroup: cgroup::path_of_id(&mount, entry.cgroup_id, 100_000)
                    .map(|path| path.display().to_string()),
                enrolled: entry.enrolled,
                tx_bytes: totals.tx_bytes,
                rx_bytes: totals.rx_bytes,
                tx_packets: totals.tx_packets,
                rx_packets: totals.rx_packets,
                tx_payload_bytes: totals.tx_payload_bytes,
                rx_payload_bytes: totals.rx_payload_bytes,
                connections_out: totals.connections_out,
                connections_in: totals.connections_in,
                connections_captured: totals.connections_captured,
                redirected_bytes: totals.redirected_bytes,
            }
        })
        .collect();
    let events = datapath
        .maps()
        .events()?
        .into_iter()
        .map(|(event, count)| (event.name(), count))
        .collect();
    let report = CountersReport { workloads, events };
    match output {
        OutputFormat::Json => {
            let json = serde_json::to_string_pretty(&report).map_err(|error| CliFailure {
                code: 1,
                error: error.into(),
            })?;
            println!("{json}");
        }
        OutputFormat::Table => {
            println!(
                "{:<28} {:>12} {:>12} {:>12} {:>12} {:>8} {:>8} {:>8} {:>12}",
                "WORKLOAD",
                "TX BYTES",
                "RX BYTES",
                "TX PAYLOAD",
                "RX PAYLOAD",
                "CONN OUT",
                "CONN IN",
                "CAPTURED",
                "REDIRECTED"
            );
            for row in &report.workloads {
                let name = row
                    .cgroup
                    .clone()
                    .unwrap_or_else(|| format!("cgroup:{}", row.cgroup_id));
                let name = if row.enrolled {
                    name
                } else {
                    format!("{name} (gone)")
                };
                println!(
                    "{:<28} {:>12} {:>12} {:>12} {:>12} {:>8} {:>8} {:>8} {:>12}",
                    name,
                    row.tx_bytes,
                    row.rx_bytes,
                    row.tx_payload_bytes,
                    row.rx_payload_bytes,
                    row.connections_out,
                    row.connections_in,
                    row.connections_captured,
                    row.redirected_bytes
                );
            }
            let events: Vec<String> = report
                .events
                .iter()
                .map(|(name, count)| format!("{name}={count}"))
                .collect();
            println!("events: {}", events.join(" "));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn enrol_needs_exactly_one_target() {
        assert!(Cli::try_parse_from(["mesh-agent", "enrol"]).is_err());
        assert!(
            Cli::try_parse_from(["mesh-agent", "enrol", "--cgroup", "/a", "--pid", "1"]).is_err()
        );
        let parsed = Cli::try_parse_from(["mesh-agent", "enrol", "--pid", "7"]).expect("parse");
        assert!(matches!(
            parsed.command,
            Command::Enrol(TargetArgs { pid: Some(7), .. })
        ));
    }
}
