//! The agent's own configuration: a Kubernetes-style `AgentConfig` resource read from a YAML
//! file in standalone mode. It says where the datapath pins its state, which cgroup subtree the
//! kernel programs watch, which workloads are enrolled, where the listeners are and which
//! destinations are never captured. Validation names the field and the problem.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// `apiVersion` of the agent's resources.
pub const API_VERSION: &str = "mesh.agentmesh.dev/v1alpha1";
/// `kind` of the agent configuration.
pub const KIND: &str = "AgentConfig";

/// Errors reading or validating a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML for an AgentConfig: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("invalid config: {field}: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        problem: problem.into(),
    }
}

/// The whole resource.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: AgentSpec,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentSpec {
    #[serde(default)]
    pub datapath: DatapathSpec,
    #[serde(default)]
    pub listeners: ListenerSpec,
    #[serde(default)]
    pub proxy: ProxySpec,
    /// Where the mesh resources (agents, access and traffic policies) come from.
    #[serde(default)]
    pub policy: PolicySourceSpec,
    /// Workloads enrolled at start-up.
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    /// The control plane: with it, mesh resources come from etcd instead of `policy.dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdSpec>,
}

/// etcd mode: resources are listed and watched under `prefix`, the last good set is cached in
/// `cacheFile`, and the node registers itself under `<prefix>/nodes/<metadata.name>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdSpec {
    /// Client URLs: `http://host:2379`, or `https://host:2379` with `tls`.
    pub endpoints: Vec<String>,
    /// TLS to etcd: the CA of etcd's serving certificate and, when etcd runs with
    /// `--client-cert-auth`, this node's client certificate. Paths relative to the config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<EtcdTlsSpec>,
    /// Key prefix of the mesh's resources.
    pub prefix: String,
    /// Last-known-good resources, served at start while etcd is unreachable; relative to
    /// the config file.
    pub cache_file: PathBuf,
    /// Time allowed to connect (and, at start, to list before the cache is used).
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// Changes arriving within this window are applied as one snapshot swap.
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
    /// TTL of the node record's lease: a node that dies disappears after it.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

/// `spec.etcd.tls`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdTlsSpec {
    /// PEM CA certificate(s) that signed etcd's serving certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate, with `keyFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `certFile` (keep it mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Name expected in etcd's certificate, when it differs from the endpoints' host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

impl EtcdTlsSpec {
    /// The client-side settings.
    pub fn settings(&self) -> crate::control::EtcdTls {
        crate::control::EtcdTls {
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            server_name: self.server_name.clone(),
        }
    }
}

impl Default for EtcdSpec {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            tls: None,
            prefix: crate::control::keys::DEFAULT_PREFIX.to_owned(),
            cache_file: PathBuf::from("/var/lib/agent-mesh/etcd-cache.json"),
            dial_timeout: Duration::from_secs(5),
            debounce: Duration::from_millis(100),
            lease_ttl: Duration::from_secs(30),
        }
    }
}

/// Kernel-side settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct DatapathSpec {
    /// bpffs folder where maps and links are pinned; mounted if bpffs is missing.
    pub pin_dir: PathBuf,
    /// cgroup (relative to the cgroup2 mount) the programs attach to: every enrolled workload
    /// must live below it.
    pub attach_cgroup: PathBuf,
    /// Hand opaque connections authorised at L4 to the kernel once the agent has decided: an
    /// `sk_skb` verdict redirects bytes between the agent's client-side and upstream sockets
    /// without them entering the agent (see the README's "Acceleration" section).
    pub accelerate: bool,
    /// Size of the enrolled-workload and counter maps.
    pub max_workloads: u32,
    /// Size of the per-connection maps (LRU: the oldest entries are evicted when full).
    pub max_connections: u32,
    /// Destinations never captured.
    pub exclude: ExcludeSpec,
}

impl Default for DatapathSpec {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from("/sys/fs/bpf/agent-mesh"),
            attach_cgroup: PathBuf::from("/"),
            accelerate: false,
            max_workloads: 4096,
            max_connections: 65536,
            exclude: ExcludeSpec::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExcludeSpec {
    /// Address ranges (`10.0.0.0/8`, `fd00::/8`, or a single address) never captured.
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// Destination ports never captured (e.g. etcd's 2379).
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerSpec {
    /// IPv4 outbound capture listener; captured IPv4 connects are redirected here.
    pub outbound: SocketAddr,
    /// IPv6 address of the outbound capture listener (same port as `outbound`).
    pub outbound_v6: Option<Ipv6Addr>,
    /// Admin endpoint (`/healthz`, `/readyz`, `/metrics`); none to turn it off.
    pub admin: Option<SocketAddr>,
}

impl Default for ListenerSpec {
    fn default() -> Self {
        Self {
            outbound: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), mesh_common::OUTBOUND_PORT),
            outbound_v6: Some(Ipv6Addr::LOCALHOST),
            admin: Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                mesh_common::ADMIN_PORT,
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxySpec {
    /// Time allowed to connect to a captured connection's original destination.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a stopping agent waits for open connections to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Serve HTTP/1.1 and HTTP/2 (MCP, A2A, gRPC, WebSocket) at L7: routing, policy per
    /// request, retries. Off: every captured connection is carried as opaque bytes, with one
    /// policy check per connection.
    pub l7: bool,
}

/// Standalone source of mesh resources: a folder of YAML/JSON files, watched for changes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySourceSpec {
    /// Folder of `Agent`, `AccessPolicy` and `TrafficPolicy` resources; none for an empty
    /// registry (every destination open, unless `defaultAction` is `Deny`).
    pub dir: Option<PathBuf>,
    /// What happens to a request for a destination no `Allow` policy targets.
    pub default_action: crate::policy::Action,
    /// How often the folder is checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for PolicySourceSpec {
    fn default() -> Self {
        Self {
            dir: None,
            default_action: crate::policy::Action::Allow,
            reload_interval: Duration::from_secs(2),
        }
    }
}

impl Default for ProxySpec {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            l7: true,
        }
    }
}

/// A workload enrolled for capture.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: String,
    /// cgroup path relative to the cgroup2 mount.
    pub cgroup: PathBuf,
}

impl AgentConfig {
    /// The configuration used when no file is given: standalone, defaults everywhere.
    pub fn standalone_default() -> Self {
        Self {
            api_version: API_VERSION.to_owned(),
            kind: KIND.to_owned(),
            metadata: Metadata {
                name: "standalone".to_owned(),
            },
            spec: AgentSpec::default(),
        }
    }

    /// Reads and validates a YAML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = config;
        // A relative policy folder is relative to the config file, not to the working dir.
        if let Some(dir) = &config.spec.policy.dir
            && dir.is_relative()
            && let Some(parent) = path.parent()
        {
            config.spec.policy.dir = Some(parent.join(dir));
        }
        if let Some(etcd) = &mut config.spec.etcd
            && let Some(parent) = path.parent()
        {
            if etcd.cache_file.is_relative() {
                etcd.cache_file = parent.join(&etcd.cache_file);
            }
            if let Some(tls) = &mut etcd.tls {
                for file in [
                    Some(&mut tls.ca_file),
                    tls.cert_file.as_mut(),
                    tls.key_file.as_mut(),
                ]
                .into_iter()
                .flatten()
                {
                    if file.is_relative() {
                        *file = parent.join(&*file);
                    }
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks everything serde cannot: versions, ranges, address families, duplicates.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.api_version != API_VERSION {
            return Err(invalid(
                "apiVersion",
                format!(
                    "{:?} is not supported; use {API_VERSION:?}",
                    self.api_version
                ),
            ));
        }
        if self.kind != KIND {
            return Err(invalid("kind", format!("{:?} is not {KIND:?}", self.kind)));
        }
        let datapath = &self.spec.datapath;
        if !datapath.pin_dir.is_absolute() {
            return Err(invalid(
                "spec.datapath.pinDir",
                "must be an absolute path on bpffs",
            ));
        }
        if datapath.max_workloads == 0 || datapath.max_workloads > 1 << 20 {
            return Err(invalid(
                "spec.datapath.maxWorkloads",
                "must be between 1 and 1048576",
            ));
        }
        if datapath.max_connections < 16 || datapath.max_connections > 1 << 24 {
            return Err(invalid(
                "spec.datapath.maxConnections",
                "must be between 16 and 16777216",
            ));
        }
        for (index, cidr) in datapath.exclude.cidrs.iter().enumerate() {
            parse_cidr(cidr).map_err(|problem| {
                invalid(&format!("spec.datapath.exclude.cidrs[{index}]"), problem)
            })?;
        }
        if datapath.exclude.ports.contains(&0) {
            return Err(invalid(
                "spec.datapath.exclude.ports",
                "port 0 is not a destination",
            ));
        }
        let listeners = &self.spec.listeners;
        if !listeners.outbound.is_ipv4() || listeners.outbound.port() == 0 {
            return Err(invalid(
                "spec.listeners.outbound",
                "must be an IPv4 address with a port, e.g. 127.0.0.1:15001",
            ));
        }
        if self.spec.policy.reload_interval.is_zero() {
            return Err(invalid(
                "spec.policy.reloadInterval",
                "must be greater than zero",
            ));
        }
        if self.spec.proxy.connect_timeout.is_zero() {
            return Err(invalid(
                "spec.proxy.connectTimeout",
                "must be greater than zero",
            ));
        }
        if let Some(etcd) = &self.spec.etcd {
            self.validate_etcd(etcd)?;
        }
        let mut names = std::collections::HashSet::new();
        for (index, workload) in self.spec.workloads.iter().enumerate() {
            let field = format!("spec.workloads[{index}]");
            if workload.name.is_empty() {
                return Err(invalid(&format!("{field}.name"), "must not be empty"));
            }
            if !names.insert(workload.name.as_str()) {
                return Err(invalid(
                    &format!("{field}.name"),
                    format!("{:?} is listed twice", workload.name),
                ));
            }
            if workload.cgroup.as_os_str().is_empty() {
                return Err(invalid(&format!("{field}.cgroup"), "must not be empty"));
            }
        }
        Ok(())
    }

    fn validate_etcd(&self, etcd: &EtcdSpec) -> Result<(), ConfigError> {
        if self.spec.policy.dir.is_some() {
            return Err(invalid(
                "spec.etcd",
                "resources come from etcd or from spec.policy.dir, not both: remove one",
            ));
        }
        if etcd.endpoints.is_empty() {
            return Err(invalid(
                "spec.etcd.endpoints",
                "at least one endpoint, e.g. http://127.0.0.1:2379",
            ));
        }
        for (index, endpoint) in etcd.endpoints.iter().enumerate() {
            if let Some(problem) =
                crate::control::etcd::endpoint_problem(endpoint, etcd.tls.is_some())
            {
                return Err(invalid(&format!("spec.etcd.endpoints[{index}]"), problem));
            }
        }
        if let Some(tls) = &etcd.tls {
            if tls.ca_file.as_os_str().is_empty() {
                return Err(invalid("spec.etcd.tls.caFile", "must not be empty"));
            }
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return Err(invalid(
                    "spec.etcd.tls",
                    "certFile and keyFile go together: give both, or neither",
                ));
            }
        }
        if let Some(problem) = crate::control::keys::prefix_problem(&etcd.prefix) {
            return Err(invalid("spec.etcd.prefix", problem));
        }
        if etcd.cache_file.as_os_str().is_empty() {
            return Err(invalid("spec.etcd.cacheFile", "must not be empty"));
        }
        if etcd.dial_timeout.is_zero() {
            return Err(invalid(
                "spec.etcd.dialTimeout",
                "must be greater than zero",
            ));
        }
        if etcd.lease_ttl < Duration::from_secs(2) {
            return Err(invalid("spec.etcd.leaseTtl", "must be at least 2s"));
        }
        let name = &self.metadata.name;
        let name_ok = !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !name_ok {
            return Err(invalid(
                "metadata.name",
                format!(
                    "{name:?} must be a node name (lowercase letters, digits, `-`, `.`): in etcd \
                     mode it names the node record"
                ),
            ));
        }
        Ok(())
    }

    /// The excluded ranges, parsed (validated already by [`AgentConfig::validate`]).
    pub fn excluded_cidrs(&self) -> Result<Vec<IpNet>, ConfigError> {
        self.spec
            .datapath
            .exclude
            .cidrs
            .iter()
            .enumerate()
            .map(|(index, cidr)| {
                parse_cidr(cidr).map_err(|problem| {
                    invalid(&format!("spec.datapath.exclude.cidrs[{index}]"), problem)
                })
            })
            .collect()
    }
}

/// Parses `a.b.c.d/len`, `x::y/len` or a bare address (a host route).
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{text:?} is neither an address nor a CIDR range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<AgentConfig, ConfigError> {
        let config: AgentConfig =
            serde_yaml::from_str(yaml).map_err(|source| ConfigError::Parse {
                path: PathBuf::from("test.yaml"),
                source,
            })?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn full_config_round_trips() {
        let yaml = format!(
            r#"
apiVersion: {API_VERSION}
kind: AgentConfig
metadata: {{ name: node-a }}
spec:
  datapath:
    pinDir: /sys/fs/bpf/test
    attachCgroup: /mesh
    accelerate: false
    maxWorkloads: 10
    maxConnections: 1000
    exclude: {{ cidrs: ["10.0.0.0/8", "::1", "192.168.1.7/24"], ports: [2379] }}
  listeners: {{ outbound: "127.0.0.1:16001", outboundV6: "::1" }}
  proxy: {{ connectTimeout: 2s, drainTimeout: 500ms }}
  workloads:
    - {{ name: planner, cgroup: /mesh/planner }}
"#
        );
        let config = parse(&yaml).expect("valid config");
        assert_eq!(config.spec.datapath.attach_cgroup, PathBuf::from("/mesh"));
        assert_eq!(config.spec.proxy.drain_timeout, Duration::from_millis(500));
        let cidrs = config.excluded_cidrs().expect("cidrs");
        assert_eq!(cidrs[2].to_string(), "192.168.1.0/24");
        assert_eq!(cidrs[1].to_string(), "::1/128");
        let back: AgentConfig =
            serde_yaml::from_str(&serde_yaml::to_string(&config).expect("serialise"))
                .expect("parse");
        assert_eq!(back, config);
    }

    #[test]
    fn defaults_fill_a_minimal_file() {
        let config = parse(&format!("apiVersion: {API_VERSION}\nkind: AgentConfig\n")).expect("ok");
        assert_eq!(config.spec, AgentConfig::standalone_default().spec);
        assert_eq!(config.spec.listeners.outbound.port(), 15001);
    }

    fn error_of(yaml: &str) -> String {
        match parse(yaml) {
            Ok(_) => panic!("expected an error for {yaml}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn errors_name_the_field_and_the_problem() {
        let head = format!("apiVersion: {API_VERSION}\nkind: AgentConfig\n");
        let message = error_of("apiVersion: v0\nkind: AgentConfig\n");
        assert!(message.contains("apiVersion"), "{message}");
        let message = error_of(&format!(
            "{head}spec:\n  datapath:\n    exclude: {{ cidrs: [\"10.0.0.0/33\"] }}\n"
        ));
        assert!(
            message.contains("spec.datapath.exclude.cidrs[0]"),
            "{message}"
        );
        let message = error_of(&format!(
            "{head}spec:\n  listeners: {{ outbound: \"[::1]:1\" }}\n"
        ));
        assert!(message.contains("spec.listeners.outbound"), "{message}");
        let message = error_of(&format!(
            "{head}spec:\n  workloads: [{{name: a, cgroup: /a}}, {{name: a, cgroup: /b}}]\n"
        ));
        assert!(
            message.contains("spec.workloads[1].name") && message.contains("twice"),
            "{message}"
        );
        let message = error_of(&format!("{head}spec:\n  datapath:\n    pinDir: relative\n"));
        assert!(message.contains("spec.datapath.pinDir"), "{message}");
    }

    #[test]
    fn etcd_mode_is_checked() {
        let head =
            format!("apiVersion: {API_VERSION}\nkind: AgentConfig\nmetadata: {{ name: node-a }}\n");
        let config = parse(&format!(
            "{head}spec:\n  etcd: {{ endpoints: [\"http://10.0.0.1:2379\"], dialTimeout: 1s }}\n"
        ))
        .expect("valid");
        let etcd = config.spec.etcd.expect("etcd");
        assert_eq!(etcd.prefix, "/mesh/v1");
        assert_eq!(etcd.dial_timeout, Duration::from_secs(1));
        assert_eq!(etcd.debounce, Duration::from_millis(100));
        let cases = [
            ("spec:\n  etcd: {}\n  policy: { dir: p }\n", "not both"),
            ("spec:\n  etcd: { endpoints: [] }\n", "spec.etcd.endpoints"),
            (
                "spec:\n  etcd: { endpoints: [\"https://e:2379\"] }\n",
                "spec.etcd.endpoints[0]: TLS",
            ),
            ("spec:\n  etcd: { prefix: mesh }\n", "spec.etcd.prefix"),
            ("spec:\n  etcd: { leaseTtl: 1s }\n", "spec.etcd.leaseTtl"),
            ("spec:\n  etcd: { typo: 1 }\n", "typo"),
        ];
        for (body, expected) in cases {
            let message = error_of(&format!("{head}{body}"));
            assert!(message.contains(expected), "{expected}: {message}");
        }
        let message = error_of(&format!(
            "apiVersion: {API_VERSION}\nkind: AgentConfig\nmetadata: {{ name: Node_A }}\nspec:\n  etcd: {{}}\n"
        ));
        assert!(message.contains("metadata.name"), "{message}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let message = error_of(&format!(
            "apiVersion: {API_VERSION}\nkind: AgentConfig\nspec:\n  typo: 1\n"
        ));
        assert!(message.contains("typo"), "{message}");
    }
}
