//! `meshctl`, the operator's command line for the control plane: apply, get, delete and
//! validate resources, view the agent registry and the nodes, and ask whether a call would be
//! allowed. Output as a table (default), JSON or YAML (`-o`); YAML output of `get` can be
//! applied again.
//!
//! Exit codes: 0 success (and `check`: allowed), 1 failure, not found, or `check`: denied,
//! 2 usage, 3 invalid resources, 4 etcd unreachable.

use std::{fmt::Write as _, io::Write, path::PathBuf, time::Duration, time::SystemTime};

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::policy::{
    Action, DEFAULT_NAMESPACE, Kind, PolicySnapshot, RequestAttributes, Resource, ResourceKey,
};

use super::{
    ControlError,
    etcd::{Etcd, EtcdSettings, EtcdTls},
    keys,
    node::NodeRecord,
    ops::{self, Stored},
};

#[derive(Debug, Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Agent Mesh control plane: resources in etcd",
    after_help = "Exit codes: 0 ok (check: allowed), 1 failure, not found or denied, 2 usage, \
                  3 invalid resources, 4 etcd unreachable."
)]
pub struct Meshctl {
    /// etcd client URLs, comma-separated.
    #[arg(
        long,
        global = true,
        env = "MESH_ETCD",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub etcd: Vec<String>,
    #[command(flatten)]
    pub etcd_tls: EtcdTlsArgs,
    /// Key prefix of the mesh's resources.
    #[arg(long, global = true, env = "MESH_PREFIX", default_value = keys::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Time allowed for each etcd request (connecting included).
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// TLS to etcd, as command-line flags (meshctl, `mesh-agent ca run`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdTlsArgs {
    /// CA certificate (PEM) of etcd's serving certificate; turns TLS on (https:// endpoints).
    #[arg(long, global = true, env = "MESH_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's --client-cert-auth, with --etcd-key.
    #[arg(long, global = true, env = "MESH_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert.
    #[arg(long, global = true, env = "MESH_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdTlsArgs {
    /// The client TLS settings, when --etcd-ca is given.
    pub fn settings(&self) -> Option<EtcdTls> {
        self.etcd_ca.as_ref().map(|ca| EtcdTls {
            ca_file: ca.clone(),
            cert_file: self.etcd_cert.clone(),
            key_file: self.etcd_key.clone(),
            server_name: None,
        })
    }
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Create or update resources from files or folders (YAML or JSON, several documents per
    /// file). Everything is validated first; each file is written in one transaction.
    Apply {
        /// A file, a folder (its *.yaml, *.yml, *.json) or `-` for standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// List resources of a kind, or show one.
    Get {
        /// agents, accesspolicies (ap), trafficpolicies (tp), trustbundles,
        /// certificaterequests (csr), workloadidentities (wi); singular or plural.
        kind: String,
        name: Option<String>,
        #[command(flatten)]
        scope: Scope,
    },
    /// Delete one resource.
    Delete {
        kind: String,
        name: String,
        /// Namespace.
        #[arg(short = 'n', long, default_value = DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Validate files offline (no etcd needed).
    Validate {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// The agent registry: names, hosts, endpoints, protocol, tools and skills; then the
    /// registered instances (node, address, health, age).
    Agents {
        #[command(flatten)]
        scope: Scope,
    },
    /// Would this call be allowed? A dry run against the resources in etcd.
    Check {
        /// Source workload name.
        #[arg(long)]
        from: String,
        /// Destination agent (name or host).
        #[arg(long)]
        to: String,
        /// MCP tool (implies --mcp-method tools/call).
        #[arg(long)]
        tool: Option<String>,
        /// MCP JSON-RPC method.
        #[arg(long)]
        mcp_method: Option<String>,
        /// A2A method (message/send, tasks/get, ...).
        #[arg(long, conflicts_with_all = ["tool", "mcp_method"])]
        a2a_method: Option<String>,
        /// HTTP path.
        #[arg(long, default_value = "/")]
        path: String,
        /// HTTP method (default: POST for MCP and A2A, else GET).
        #[arg(long)]
        method: Option<String>,
        /// The agents' spec.policy.defaultAction.
        #[arg(long, value_enum, default_value_t = DefaultAction::Allow)]
        default_action: DefaultAction,
    },
    /// Nodes registered in etcd (each agent in etcd mode, while it runs).
    Nodes,
    /// Set up etcd roles and users so that each client may write only what it owns: node
    /// agents their node record, registered instances and certificate requests; the signer
    /// the certificate requests and the trust bundle; operators everything. Users are the
    /// common names of the client certificates (etcd --client-cert-auth). Idempotent.
    Rbac {
        /// A node, `NAME` (its certificate's common name is NAME) or `NAME=USER`; repeatable.
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// A user of the certificate signer (`mesh-agent ca run`); repeatable.
        #[arg(long = "signer")]
        signers: Vec<String>,
        /// A user allowed to change everything under the prefix (`meshctl apply`); repeatable.
        #[arg(long = "operator")]
        operators: Vec<String>,
        /// Also create etcd's `root` user if missing and turn authentication on (run this
        /// with a client certificate whose common name is `root`, and keep it: afterwards only
        /// root can change roles).
        #[arg(long)]
        enable: bool,
        /// Print the roles and users without changing etcd.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `-n NS` or `-A`.
#[derive(Debug, Clone, clap::Args)]
pub struct Scope {
    /// Namespace.
    #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DefaultAction {
    Allow,
    Deny,
}

impl Meshctl {
    fn settings(&self) -> EtcdSettings {
        EtcdSettings {
            endpoints: self.etcd.clone(),
            prefix: self.prefix.clone(),
            dial_timeout: self.timeout,
            request_timeout: self.timeout,
            tls: self.etcd_tls.settings(),
        }
    }
}

fn parse_kind(text: &str) -> Result<Kind, ControlError> {
    keys::parse_kind_argument(text).ok_or_else(|| {
        let hint = if text.eq_ignore_ascii_case("nodes") || text.eq_ignore_ascii_case("node") {
            " (node records: `meshctl nodes`)"
        } else {
            ""
        };
        ControlError::Usage(format!(
            "unknown kind `{text}`: expected agents, accesspolicies (ap) or trafficpolicies \
             (tp){hint}"
        ))
    })
}

fn write_out(out: &mut dyn Write, text: &str) -> Result<(), ControlError> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|error| ControlError::Failed(format!("cannot write the output: {error}")))
}

fn to_json(value: &impl serde::Serialize) -> Result<String, ControlError> {
    serde_json::to_string_pretty(value)
        .map(|text| text + "\n")
        .map_err(|error| ControlError::Failed(error.to_string()))
}

fn to_yaml_documents<'a>(
    resources: impl IntoIterator<Item = &'a Resource>,
) -> Result<String, ControlError> {
    let mut text = String::new();
    for resource in resources {
        let document = serde_yaml::to_string(resource)
            .map_err(|error| ControlError::Failed(error.to_string()))?;
        text.push_str("---\n");
        text.push_str(&document);
    }
    Ok(text)
}

/// Columns padded to their widest cell, two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (index, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(index) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let mut text = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut rendered = String::new();
        for (index, cell) in cells.iter().enumerate() {
            if index + 1 == cells.len() {
                rendered.push_str(cell);
            } else {
                let width = widths.get(index).copied().unwrap_or(0);
                let _ = write!(rendered, "{cell:<width$}  ");
            }
        }
        text.push_str(rendered.trim_end());
        text.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    text
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

fn endpoints(agent: &crate::policy::Agent) -> String {
    list(
        &agent
            .spec
            .endpoints
            .iter()
            .map(|endpoint| {
                if endpoint.weight == 1 {
                    endpoint.address.to_string()
                } else {
                    format!("{}(w={})", endpoint.address, endpoint.weight)
                }
            })
            .collect::<Vec<_>>(),
    )
}

fn resource_rows(
    resources: &[&Resource],
    all_namespaces: bool,
) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let kind = resources.first().map(|resource| resource.kind());
    let mut headers: Vec<&'static str> = Vec::new();
    if all_namespaces {
        headers.push("NAMESPACE");
    }
    headers.push("NAME");
    headers.extend(match kind {
        Some(Kind::AccessPolicy) => &["TARGET", "ACTION", "RULES", "FROM"][..],
        Some(Kind::TrafficPolicy) => &["TARGET", "TIMEOUT", "RETRIES", "RATE-LIMITS", "ROUTES"][..],
        Some(Kind::AgentInstance) => &["AGENT", "NODE", "ADDRESS", "HEALTH", "AGE"][..],
        _ => &["PROTOCOL", "HOSTS", "ENDPOINTS", "FALLBACK"][..],
    });
    let rows = resources
        .iter()
        .map(|resource| {
            let metadata = resource.metadata();
            let mut row = Vec::new();
            if all_namespaces {
                row.push(metadata.namespace.clone());
            }
            row.push(metadata.name.clone());
            match resource {
                Resource::Agent(agent) => {
                    row.push(format!("{:?}", agent.spec.protocol));
                    row.push(list(&agent.spec.hosts));
                    row.push(endpoints(agent));
                    row.push(
                        agent
                            .spec
                            .fallback
                            .clone()
                            .unwrap_or_else(|| "-".to_owned()),
                    );
                }
                Resource::AccessPolicy(policy) => {
                    let mut from: Vec<String> = policy
                        .spec
                        .rules
                        .iter()
                        .flat_map(|rule| rule.from.iter().cloned())
                        .collect();
                    from.sort();
                    from.dedup();
                    row.push(policy.spec.target_agent.clone());
                    row.push(format!("{:?}", policy.spec.action));
                    row.push(policy.spec.rules.len().to_string());
                    row.push(list(&from));
                }
                Resource::TrafficPolicy(policy) => {
                    row.push(policy.spec.target_agent.clone());
                    row.push(humantime::format_duration(policy.spec.timeouts.request).to_string());
                    row.push(policy.spec.retries.attempts.to_string());
                    row.push(policy.spec.rate_limits.len().to_string());
                    row.push(policy.spec.routes.len().to_string());
                }
                Resource::AgentInstance(instance) => {
                    row.push(instance.spec.agent.clone());
                    row.push(instance.spec.node.clone());
                    row.push(instance.spec.address.to_string());
                    row.push(instance.spec.health.as_str().to_owned());
                    row.push(age(instance.spec.registered_at.as_deref()));
                }
            }
            row
        })
        .collect();
    (headers, rows)
}

/// How long ago an RFC 3339 time was, as `3m12s`; `-` when unknown.
fn age(since: Option<&str>) -> String {
    since
        .and_then(|text| humantime::parse_rfc3339_weak(text).ok())
        .and_then(|then| SystemTime::now().duration_since(then).ok())
        .map(|elapsed| {
            humantime::format_duration(Duration::from_secs(elapsed.as_secs())).to_string()
        })
        .unwrap_or_else(|| "-".to_owned())
}

/// Prints a list of problems read from etcd, and turns them into the command's error.
fn stored_problems(stored: &Stored) -> Result<(), ControlError> {
    if stored.invalid.is_empty() {
        return Ok(());
    }
    Err(ControlError::Invalid {
        context: "etcd holds invalid resources (agents keep their last good version; fix them \
                  with `meshctl apply` or remove them with `meshctl delete`)"
            .to_owned(),
        problems: stored.invalid.clone(),
    })
}

/// Runs one command, writing its output to `out`. Returns the exit code on success (0, or 1
/// for a denied `check`).
pub async fn execute(cli: Meshctl, out: &mut dyn Write) -> Result<u8, ControlError> {
    let output = cli.output;
    match &cli.command {
        CtlCommand::Validate { files } => {
            let files = ops::read_files(&ops::collect_files(files)?)?;
            validate_report(&files, output, out)?;
            Ok(0)
        }
        CtlCommand::Apply { files } => {
            let files = ops::read_files(&ops::collect_files(files)?)?;
            let etcd = Etcd::connect(cli.settings()).await?;
            let (applied, warnings) = ops::apply(&etcd, &files).await?;
            for warning in warnings {
                eprintln!("warning: {warning}");
            }
            let text = match output {
                Output::Table => applied
                    .iter()
                    .map(|applied| format!("{} {}\n", applied.key, applied.outcome.as_str()))
                    .collect(),
                Output::Json | Output::Yaml => {
                    let rows: Vec<serde_json::Value> = applied
                        .iter()
                        .map(|applied| {
                            json!({
                                "kind": applied.key.kind.as_str(),
                                "namespace": applied.key.namespace,
                                "name": applied.key.name,
                                "file": applied.file,
                                "result": applied.outcome,
                            })
                        })
                        .collect();
                    if output == Output::Json {
                        to_json(&rows)?
                    } else {
                        serde_yaml::to_string(&rows)
                            .map_err(|error| ControlError::Failed(error.to_string()))?
                    }
                }
            };
            write_out(out, &text)?;
            Ok(0)
        }
        CtlCommand::Get { kind, name, scope }
            if crate::identity::resources::IdentityKind::parse(kind).is_some() =>
        {
            use crate::identity::resources::{Format, IdentityKind, render_get};
            let identity_kind = IdentityKind::parse(kind)
                .ok_or_else(|| ControlError::Usage(format!("unknown kind `{kind}`")))?;
            let etcd = Etcd::connect(cli.settings()).await?;
            let format = match output {
                Output::Table => Format::Table,
                Output::Json => Format::Json,
                Output::Yaml => Format::Yaml,
            };
            let namespace = scope.namespace.as_deref();
            let text = render_get(&etcd, identity_kind, namespace, name.as_deref(), format).await?;
            write_out(out, &text)?;
            Ok(0)
        }
        CtlCommand::Get { kind, name, scope } => {
            let kind = parse_kind(kind)?;
            let etcd = Etcd::connect(cli.settings()).await?;
            let namespace = match (&scope.namespace, scope.all_namespaces) {
                (_, true) => None,
                (Some(namespace), false) => Some(namespace.as_str()),
                (None, false) => Some(DEFAULT_NAMESPACE),
            };
            let stored = ops::get(&etcd, kind, namespace, name.as_deref()).await?;
            let resources: Vec<&Resource> = stored
                .resources
                .values()
                .map(|(_, resource)| resource)
                .collect();
            let single = name.is_some() && resources.len() == 1;
            let text = match output {
                Output::Table => {
                    if resources.is_empty() {
                        let scope = namespace
                            .map(|namespace| format!("namespace {namespace}"))
                            .unwrap_or_else(|| "any namespace".to_owned());
                        eprintln!("no {} in {scope}", keys::segment(kind));
                        String::new()
                    } else {
                        let (headers, rows) = resource_rows(&resources, namespace.is_none());
                        table(&headers, &rows)
                    }
                }
                Output::Json if single => to_json(&resources[0])?,
                Output::Json => to_json(&resources)?,
                Output::Yaml => to_yaml_documents(resources.iter().copied())?,
            };
            write_out(out, &text)?;
            stored_problems(&stored)?;
            Ok(0)
        }
        CtlCommand::Delete {
            kind,
            name,
            namespace,
        } => {
            let kind = parse_kind(kind)?;
            let etcd = Etcd::connect(cli.settings()).await?;
            let key = ResourceKey {
                kind,
                namespace: namespace.clone(),
                name: name.clone(),
            };
            ops::delete(&etcd, &key).await?;
            let text = match output {
                Output::Table => format!("{key} deleted\n"),
                _ => to_json(&json!({
                    "kind": kind.as_str(), "namespace": namespace, "name": name, "result": "deleted"
                }))?,
            };
            write_out(out, &text)?;
            Ok(0)
        }
        CtlCommand::Agents { scope } => {
            let etcd = Etcd::connect(cli.settings()).await?;
            let namespace = scope.namespace.as_deref();
            let stored = ops::get(&etcd, Kind::Agent, namespace, None).await?;
            let stored_instances = ops::get(&etcd, Kind::AgentInstance, namespace, None).await?;
            let instances: Vec<&crate::policy::AgentInstance> = stored_instances
                .resources
                .values()
                .filter_map(|(_, resource)| match resource {
                    Resource::AgentInstance(instance) => Some(instance),
                    _ => None,
                })
                .collect();
            let agents: Vec<&crate::policy::Agent> = stored
                .resources
                .values()
                .filter_map(|(_, resource)| match resource {
                    Resource::Agent(agent) => Some(agent),
                    _ => None,
                })
                .collect();
            let text = match output {
                Output::Table => {
                    let rows: Vec<Vec<String>> = agents
                        .iter()
                        .map(|agent| {
                            vec![
                                agent.metadata.name.clone(),
                                agent.metadata.namespace.clone(),
                                format!("{:?}", agent.spec.protocol),
                                list(&agent.spec.hosts),
                                endpoints(agent),
                                list(&agent.spec.capabilities.mcp_tools),
                                list(&agent.spec.capabilities.a2a_skills),
                            ]
                        })
                        .collect();
                    let mut text = table(
                        &[
                            "NAME",
                            "NAMESPACE",
                            "PROTOCOL",
                            "HOSTS",
                            "ENDPOINTS",
                            "TOOLS",
                            "SKILLS",
                        ],
                        &rows,
                    );
                    if !instances.is_empty() {
                        let rows: Vec<Vec<String>> = instances
                            .iter()
                            .map(|instance| {
                                let spec = &instance.spec;
                                vec![
                                    instance.metadata.name.clone(),
                                    spec.agent.clone(),
                                    instance.metadata.namespace.clone(),
                                    spec.node.clone(),
                                    spec.address.to_string(),
                                    spec.health.as_str().to_owned(),
                                    age(spec.registered_at.as_deref()),
                                    list(&spec.capabilities.mcp_tools),
                                    list(&spec.capabilities.a2a_skills),
                                ]
                            })
                            .collect();
                        text.push('\n');
                        text.push_str(&table(
                            &[
                                "INSTANCE",
                                "AGENT",
                                "NAMESPACE",
                                "NODE",
                                "ADDRESS",
                                "HEALTH",
                                "AGE",
                                "TOOLS",
                                "SKILLS",
                            ],
                            &rows,
                        ));
                    }
                    text
                }
                Output::Json => to_json(&json!({"agents": agents, "instances": instances}))?,
                Output::Yaml => {
                    serde_yaml::to_string(&json!({"agents": agents, "instances": instances}))
                        .map_err(|error| ControlError::Failed(error.to_string()))?
                }
            };
            write_out(out, &text)?;
            stored_problems(&stored)?;
            stored_problems(&stored_instances)?;
            Ok(0)
        }
        CtlCommand::Check {
            from,
            to,
            tool,
            mcp_method,
            a2a_method,
            path,
            method,
            default_action,
        } => {
            let etcd = Etcd::connect(cli.settings()).await?;
            let stored = ops::load_all(&etcd).await?;
            for problem in &stored.invalid {
                eprintln!(
                    "warning: skipped (invalid; agents keep its last good version): {problem}"
                );
            }
            let action = match default_action {
                DefaultAction::Allow => Action::Allow,
                DefaultAction::Deny => Action::Deny,
            };
            let snapshot =
                PolicySnapshot::compile(&stored.resources(), action).map_err(|errors| {
                    ControlError::Invalid {
                        context: "the resources in etcd do not compile (agents keep their \
                                  previous snapshot)"
                            .to_owned(),
                        problems: errors.iter().map(ToString::to_string).collect(),
                    }
                })?;
            let destination = snapshot
                .agent(to)
                .or_else(|| snapshot.agent_by_host(to))
                .map(|agent| agent.name.clone());
            let mcp_method = match (mcp_method, tool) {
                (Some(method), _) => Some(method.as_str()),
                (None, Some(_)) => Some("tools/call"),
                (None, None) => None,
            };
            let http_method = method.clone().unwrap_or_else(|| {
                if mcp_method.is_some() || a2a_method.is_some() {
                    "POST".to_owned()
                } else {
                    "GET".to_owned()
                }
            });
            let request = RequestAttributes {
                source: from,
                destination: destination.as_deref(),
                http_method: &http_method,
                path,
                mcp_method,
                mcp_tool: tool.as_deref(),
                a2a_method: a2a_method.as_deref(),
            };
            let decision = snapshot.authorize(&request);
            let rule = decision
                .policy
                .as_ref()
                .zip(decision.rule)
                .and_then(|(policy, index)| {
                    let (namespace, name) = policy.split_once('/')?;
                    let key = keys::resource_key(
                        etcd.prefix(),
                        &ResourceKey {
                            kind: Kind::AccessPolicy,
                            namespace: namespace.to_owned(),
                            name: name.to_owned(),
                        },
                    );
                    match stored.resources.get(&key) {
                        Some((_, Resource::AccessPolicy(policy))) => policy
                            .spec
                            .rules
                            .get(index)
                            .and_then(|rule| serde_json::to_value(rule).ok()),
                        _ => None,
                    }
                });
            let verdict = if decision.allowed { "allow" } else { "deny" };
            let text = match output {
                Output::Table => {
                    let mut text = format!("{verdict}\n");
                    let policy = decision
                        .policy
                        .as_ref()
                        .map(|policy| format!("AccessPolicy {policy}"))
                        .unwrap_or_else(|| "- (no policy decided)".to_owned());
                    let _ = writeln!(text, "  policy:   {policy}");
                    if let Some(index) = decision.rule {
                        let body = rule.as_ref().map(ToString::to_string).unwrap_or_default();
                        let _ = writeln!(text, "  rule:     spec.rules[{index}] {body}");
                    }
                    let _ = writeln!(text, "  reason:   {}", decision.reason);
                    let destination = destination
                        .clone()
                        .unwrap_or_else(|| format!("{to} (unregistered: only `*` policies apply)"));
                    let _ = writeln!(
                        text,
                        "  request:  {from} -> {destination} {http_method} {path}{}{}",
                        mcp_method.map(|m| format!(" mcp {m}")).unwrap_or_default()
                            + &tool
                                .as_ref()
                                .map(|t| format!(" tool {t}"))
                                .unwrap_or_default(),
                        a2a_method
                            .as_ref()
                            .map(|m| format!(" a2a {m}"))
                            .unwrap_or_default()
                    );
                    let _ = writeln!(text, "  revision: {}", stored.revision);
                    text
                }
                Output::Json | Output::Yaml => {
                    let value = json!({
                        "allowed": decision.allowed,
                        "decision": verdict,
                        "policy": decision.policy,
                        "rule": decision.rule,
                        "ruleSpec": rule,
                        "reason": decision.reason,
                        "destination": destination,
                        "revision": stored.revision,
                    });
                    if output == Output::Json {
                        to_json(&value)?
                    } else {
                        serde_yaml::to_string(&value)
                            .map_err(|error| ControlError::Failed(error.to_string()))?
                    }
                }
            };
            write_out(out, &text)?;
            Ok(if decision.allowed { 0 } else { 1 })
        }
        CtlCommand::Rbac {
            nodes,
            signers,
            operators,
            enable,
            dry_run,
        } => {
            let nodes = nodes
                .iter()
                .map(|text| super::rbac::NodeUser::parse(text))
                .collect::<Result<Vec<_>, _>>()?;
            let plan = super::rbac::plan(&cli.prefix, &nodes, signers, operators);
            if *dry_run {
                write_out(out, &super::rbac::describe(&plan))?;
                return Ok(0);
            }
            let etcd = Etcd::connect(cli.settings()).await?;
            let changes = super::rbac::apply(&etcd, &plan, *enable).await?;
            let mut text = changes.join("\n");
            if changes.is_empty() {
                text.push_str("unchanged: etcd's roles and users already match");
            }
            text.push('\n');
            write_out(out, &text)?;
            Ok(0)
        }
        CtlCommand::Nodes => {
            let etcd = Etcd::connect(cli.settings()).await?;
            let (records, problems) = ops::nodes(&etcd).await?;
            for problem in &problems {
                eprintln!("warning: unreadable node record: {problem}");
            }
            let text = match output {
                Output::Table => {
                    if records.is_empty() {
                        eprintln!(
                            "no nodes registered (agents in etcd mode register while they run)"
                        );
                        String::new()
                    } else {
                        let rows: Vec<Vec<String>> = records.iter().map(node_row).collect();
                        table(
                            &[
                                "NAME",
                                "STATUS",
                                "VERSION",
                                "STARTED",
                                "HEARTBEAT",
                                "REVISION",
                                "POLICY",
                                "PID",
                            ],
                            &rows,
                        )
                    }
                }
                Output::Json => to_json(&records)?,
                Output::Yaml => serde_yaml::to_string(&records)
                    .map_err(|error| ControlError::Failed(error.to_string()))?,
            };
            write_out(out, &text)?;
            Ok(0)
        }
    }
}

fn ago(rfc3339: &str) -> Option<Duration> {
    let time = humantime::parse_rfc3339_weak(rfc3339).ok()?;
    Some(SystemTime::now().duration_since(time).unwrap_or_default())
}

fn short(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0..=119 => format!("{seconds}s"),
        120..=7199 => format!("{}m", seconds / 60),
        7200..=172_799 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86_400),
    }
}

fn node_row(record: &NodeRecord) -> Vec<String> {
    let status = &record.status;
    let heartbeat = ago(&status.heartbeat_time);
    let ttl = Duration::from_secs(u64::try_from(status.lease_ttl_seconds).unwrap_or(0));
    let state = match heartbeat {
        Some(age) if age <= ttl => "Ready",
        _ => "Stale",
    };
    vec![
        record.metadata.name.clone(),
        state.to_owned(),
        status.version.clone(),
        ago(&status.start_time).map_or_else(|| "?".to_owned(), |age| format!("{} ago", short(age))),
        heartbeat.map_or_else(|| "?".to_owned(), |age| format!("{} ago", short(age))),
        status.sync_revision.to_string(),
        status.policy_hash.clone(),
        status.pid.to_string(),
    ]
}

fn validate_report(
    files: &[ops::FileResources],
    output: Output,
    out: &mut dyn Write,
) -> Result<(), ControlError> {
    let resources: Vec<Resource> = files
        .iter()
        .flat_map(|file| file.resources.iter().cloned())
        .collect();
    // Cross-resource checks of these files on their own: they may refer to resources that
    // only etcd holds, so problems here are warnings (`apply` checks against etcd).
    let set_problems: Vec<String> = match PolicySnapshot::compile(&resources, Action::Allow) {
        Ok(snapshot) => snapshot.warnings().to_vec(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    };
    for problem in &set_problems {
        eprintln!("warning (these files on their own): {problem}");
    }
    let text = match output {
        Output::Table => {
            let rows: Vec<Vec<String>> = files
                .iter()
                .flat_map(|file| {
                    file.resources.iter().map(move |resource| {
                        let key = resource.key();
                        vec![
                            key.kind.to_string(),
                            key.namespace,
                            key.name,
                            file.file.clone(),
                        ]
                    })
                })
                .collect();
            let mut text = table(&["KIND", "NAMESPACE", "NAME", "FILE"], &rows);
            let _ = writeln!(
                text,
                "{} resources in {} files: valid",
                resources.len(),
                files.len()
            );
            text
        }
        Output::Json | Output::Yaml => {
            let value = json!({
                "valid": true,
                "files": files.len(),
                "resources": resources.iter().map(|resource| {
                    let key = resource.key();
                    json!({"kind": key.kind.as_str(), "namespace": key.namespace, "name": key.name})
                }).collect::<Vec<_>>(),
                "warnings": set_problems,
            });
            if output == Output::Json {
                to_json(&value)?
            } else {
                serde_yaml::to_string(&value)
                    .map_err(|error| ControlError::Failed(error.to_string()))?
            }
        }
    };
    write_out(out, &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Meshctl::command().debug_assert();
    }

    #[test]
    fn global_flags_and_defaults() {
        let cli = Meshctl::try_parse_from([
            "meshctl",
            "get",
            "agents",
            "-A",
            "-o",
            "json",
            "--etcd",
            "http://a:1,http://b:2",
        ])
        .unwrap();
        assert_eq!(cli.etcd, ["http://a:1", "http://b:2"]);
        assert_eq!(cli.output, Output::Json);
        assert!(matches!(
            cli.command,
            CtlCommand::Get { ref scope, .. } if scope.all_namespaces
        ));
        assert!(Meshctl::try_parse_from(["meshctl", "get", "agents", "-A", "-n", "x"]).is_err());
        assert!(Meshctl::try_parse_from(["meshctl", "apply"]).is_err());
        assert!(
            Meshctl::try_parse_from([
                "meshctl",
                "check",
                "--from",
                "a",
                "--to",
                "b",
                "--tool",
                "t",
                "--a2a-method",
                "m"
            ])
            .is_err()
        );
    }

    #[test]
    fn tables_align_columns() {
        let text = table(
            &["NAME", "TARGET"],
            &[
                vec!["a".to_owned(), "tools".to_owned()],
                vec!["longer-name".to_owned(), "*".to_owned()],
            ],
        );
        assert_eq!(
            text,
            "NAME         TARGET\na            tools\nlonger-name  *\n"
        );
    }

    #[test]
    fn exit_codes() {
        use crate::control::EtcdError;
        let unreachable = ControlError::Etcd(EtcdError::Unreachable {
            endpoints: String::new(),
            what: String::new(),
            cause: String::new(),
        });
        assert_eq!(unreachable.exit_code(), 4);
        assert_eq!(
            ControlError::Invalid {
                context: String::new(),
                problems: vec![]
            }
            .exit_code(),
            3
        );
        assert_eq!(ControlError::Usage(String::new()).exit_code(), 2);
        assert_eq!(ControlError::NotFound(String::new()).exit_code(), 1);
        assert!(
            parse_kind("nodes").is_err_and(|error| error.to_string().contains("meshctl nodes"))
        );
    }

    #[tokio::test]
    async fn validate_needs_no_etcd() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(
            &file,
            "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: Agent\nmetadata: {name: tools}\nspec: {endpoints: [{address: '10.0.0.1:80'}]}\n",
        )
        .unwrap();
        let cli = Meshctl::try_parse_from([
            "meshctl",
            "--etcd",
            "http://127.0.0.1:1",
            "validate",
            "-f",
            dir.path().to_str().unwrap(),
        ])
        .unwrap();
        let mut out = Vec::new();
        assert_eq!(execute(cli, &mut out).await.unwrap(), 0);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Agent  default    tools"), "{text}");
        assert!(text.contains("1 resources in 1 files: valid"), "{text}");

        std::fs::write(
            dir.path().join("b.yaml"),
            "apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: Agent\nmetadata: {name: other}\nspec: {endpoints: []}\n",
        )
        .unwrap();
        let cli =
            Meshctl::try_parse_from(["meshctl", "validate", "-f", dir.path().to_str().unwrap()])
                .unwrap();
        let error = execute(cli, &mut Vec::new()).await.unwrap_err();
        assert_eq!(error.exit_code(), 3);
        assert!(error.to_string().contains("spec.endpoints"), "{error}");
    }
}
