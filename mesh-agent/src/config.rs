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
    /// Kubernetes: enrol this node's pods (watched through the API server) by their cgroups,
    /// named by their service accounts' SPIFFE IDs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesSpec>,
    /// The node-to-node tunnel: how endpoints on other nodes are reached.
    #[serde(default)]
    pub tunnel: TunnelSpec,
    /// Workload identity (SPIFFE certificates for mTLS between nodes); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentitySpec>,
    /// The local registration API (unix socket) and the health probes of registered instances.
    #[serde(default)]
    pub registration: RegistrationSpec,
}

/// Workload identity: the node's SPIFFE certificate, and its workloads', issued by the local CA
/// (standalone, `localCa`) or by the signer through etcd (etcd mode).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentitySpec {
    /// The SPIFFE trust domain, `spiffe://<trustDomain>/...`.
    pub trust_domain: String,
    /// Lifetime of the certificates the local CA issues (the etcd signer sets its own).
    #[serde(with = "humantime_serde")]
    pub certificate_ttl: Duration,
    /// How long start-up waits for the node's certificate before going on without it
    /// (issuance keeps being retried in the background).
    #[serde(with = "humantime_serde")]
    pub issue_timeout: Duration,
    /// Standalone only: the CA folder on this machine (created at first start). One machine
    /// only: in a cluster the CA key stays with the signer (`mesh-agent ca run`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_ca: Option<LocalCaSpec>,
    /// etcd mode: how long a certificate request waits for the signer's answer.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

/// The trust domain of workload identities when `spec.identity` does not name one.
pub const DEFAULT_TRUST_DOMAIN: &str = "mesh.local";

impl Default for IdentitySpec {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            certificate_ttl: Duration::from_secs(4 * 3600),
            issue_timeout: Duration::from_secs(15),
            local_ca: None,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The local registration API: where its socket is, which cgroups may register which names,
/// and how registered instances are probed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistrationSpec {
    /// Unix socket of the API; none to turn registration off.
    pub socket: Option<PathBuf>,
    /// File mode of the socket, octal (`"0666"`): who may connect. Access is decided by
    /// attestation (the caller's cgroup), not by the mode.
    pub socket_mode: String,
    /// cgroups (relative to the cgroup2 mount) whose direct children may register the name of
    /// their directory (`/agents.slice` lets `/agents.slice/tools/...` register `tools`).
    pub cgroup_parents: Vec<PathBuf>,
    /// Address instances are published with when they register only a port (another node
    /// reaches them through this node's agent).
    pub advertise_address: IpAddr,
    /// etcd mode: TTL of the lease holding this node's instance records.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Active health probes of the registered instances.
    pub health: HealthCheckSpec,
}

impl Default for RegistrationSpec {
    fn default() -> Self {
        Self {
            socket: Some(PathBuf::from("/run/mesh/agent.sock")),
            socket_mode: "0666".to_owned(),
            cgroup_parents: Vec::new(),
            advertise_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            lease_ttl: Duration::from_secs(10),
            health: HealthCheckSpec::default(),
        }
    }
}

/// The standalone CA's folder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalCaSpec {
    /// Relative to the config file.
    pub dir: PathBuf,
}

impl Default for LocalCaSpec {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/agent-mesh/ca"),
        }
    }
}

/// `spec.kubernetes`: pod enrolment. In a pod, the defaults find the API server and the
/// service account's token and CA where Kubernetes puts them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesSpec {
    /// The node whose pods are enrolled; default `$NODE_NAME` (the downward API's
    /// `spec.nodeName`, as the DaemonSet sets it), else `metadata.name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// `https://host:port`; default from `KUBERNETES_SERVICE_HOST` and `_PORT`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_server: Option<String>,
    /// Bearer token file, re-read for every request (projected tokens rotate).
    pub token_file: PathBuf,
    /// CA certificate(s) of the API server.
    pub ca_file: PathBuf,
    /// Only pods matching this label selector join the mesh, e.g.
    /// `mesh.agentmesh.dev/enrol=true`; absent: every pod of the node (host-network pods never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<String>,
    /// Time allowed to connect and get an answer's headers.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for KubernetesSpec {
    fn default() -> Self {
        Self {
            node_name: None,
            api_server: None,
            token_file: PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token"),
            ca_file: PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"),
            label_selector: None,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// The node-to-node tunnel (mutual TLS, HTTP/2 CONNECT; listener `spec.listeners.tunnel`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct TunnelSpec {
    /// Time allowed for the TCP connect to a peer node, and to a local target of a stream.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for a TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// HTTP/2 PING interval; a peer silent for `keepaliveTimeout` after one is dropped.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Concurrent streams accepted per peer connection.
    pub max_streams: u32,
    /// Address other nodes reach this node's tunnel at, published in its node record (etcd
    /// mode). Default: the tunnel listener's address, unless it is a wildcard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_address: Option<SocketAddr>,
    /// Peer nodes' tunnel addresses, for setups without etcd (and before node records).
    pub peers: Vec<TunnelPeerSpec>,
}

impl Default for TunnelSpec {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            max_streams: 1024,
            advertise_address: None,
            peers: Vec::new(),
        }
    }
}

impl KubernetesSpec {
    /// The API server address: the configured one, else the in-cluster service's.
    pub fn api_server(&self) -> Result<String, ConfigError> {
        if let Some(address) = &self.api_server {
            return Ok(address.clone());
        }
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            invalid(
                "spec.kubernetes.apiServer",
                "not set, and KUBERNETES_SERVICE_HOST is not in the environment (outside a pod, \
                 give the API server's https:// address)",
            )
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".to_owned());
        Ok(if host.contains(':') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        })
    }
}

impl RegistrationSpec {
    /// The socket mode as a number (validated by [`AgentConfig::validate`]).
    pub fn socket_mode_bits(&self) -> Result<u32, ConfigError> {
        let text = self.socket_mode.trim_start_matches("0o");
        u32::from_str_radix(text, 8)
            .ok()
            .filter(|mode| *mode <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "spec.registration.socketMode",
                    format!(
                        "{:?} is not an octal file mode such as \"0660\"",
                        self.socket_mode
                    ),
                )
            })
    }
}

/// How registered instances are probed: a TCP connect, or an HTTP GET of the path they
/// registered, every `interval`; `unhealthyThreshold` failures in a row mark an instance
/// unhealthy (no traffic, not discovered), `healthyThreshold` successes bring it back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheckSpec {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheckSpec {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
        }
    }
}

/// A peer node's tunnel, by node name (the `node` of its agents' endpoints).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TunnelPeerSpec {
    pub node: String,
    pub address: SocketAddr,
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
    /// cgroup (relative to the cgroup2 mount) the programs attach to: every enrolled workload,
    /// and the agent itself for in-kernel acceleration, must live below it.
    pub attach_cgroup: PathBuf,
    /// Splice bytes between workloads and the agent inside the kernel (`sk_msg`). Off by
    /// default: on current kernels a workload socket in a sockmap can see a spurious EAGAIN
    /// from a *blocking* read at end of stream (poll-based clients are unaffected); see the
    /// README's operations section.
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
    /// Node-to-node tunnel (mutual TLS); served when workload identity credentials are
    /// available; none to turn it off.
    pub tunnel: Option<SocketAddr>,
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
            tunnel: Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                mesh_common::TUNNEL_PORT,
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
    /// Threads that serve captured connections, each with a single-threaded runtime; a
    /// connection stays on one for its life. 0: one per CPU.
    pub worker_threads: usize,
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
            worker_threads: 0,
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
        if let Some(identity) = &mut config.spec.identity
            && let Some(local_ca) = &mut identity.local_ca
            && local_ca.dir.is_relative()
            && let Some(parent) = path.parent()
        {
            local_ca.dir = parent.join(&local_ca.dir);
        }
        config.validate()?;
        Ok(config)
    }

    /// The trust domain of this mesh's SPIFFE IDs: `spec.identity.trustDomain`, else
    /// [`DEFAULT_TRUST_DOMAIN`]. Every identity the agent names (pods, registered workloads,
    /// certificates) is in it.
    pub fn trust_domain(&self) -> &str {
        self.spec
            .identity
            .as_ref()
            .map_or(DEFAULT_TRUST_DOMAIN, |identity| {
                identity.trust_domain.as_str()
            })
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
        if self.spec.proxy.worker_threads > crate::proxy::workers::MAX_WORKERS {
            return Err(invalid(
                "spec.proxy.workerThreads",
                format!(
                    "must be at most {} (0: one per CPU)",
                    crate::proxy::workers::MAX_WORKERS
                ),
            ));
        }
        if let Some(etcd) = &self.spec.etcd {
            self.validate_etcd(etcd)?;
        }
        if let Some(kubernetes) = &self.spec.kubernetes {
            if let Some(address) = &kubernetes.api_server
                && !address.starts_with("https://")
            {
                return Err(invalid(
                    "spec.kubernetes.apiServer",
                    format!("{address:?}: the API server is reached over https:// only"),
                ));
            }
            let node = kubernetes
                .node_name
                .as_deref()
                .unwrap_or(&self.metadata.name);
            if node.is_empty() {
                return Err(invalid(
                    "spec.kubernetes.nodeName",
                    "the node whose pods to enrol: set it, or metadata.name",
                ));
            }
            if kubernetes.request_timeout.is_zero() {
                return Err(invalid(
                    "spec.kubernetes.requestTimeout",
                    "must be greater than zero",
                ));
            }
        }
        self.validate_tunnel()?;
        if let Some(identity) = &self.spec.identity {
            self.validate_identity(identity)?;
        }
        self.validate_registration()?;
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

    fn validate_tunnel(&self) -> Result<(), ConfigError> {
        let tunnel = &self.spec.tunnel;
        if self
            .spec
            .listeners
            .tunnel
            .is_some_and(|address| address.port() == 0)
        {
            return Err(invalid(
                "spec.listeners.tunnel",
                "needs a port, e.g. 0.0.0.0:15008",
            ));
        }
        for (field, value) in [
            ("connectTimeout", tunnel.connect_timeout),
            ("handshakeTimeout", tunnel.handshake_timeout),
            ("keepaliveInterval", tunnel.keepalive_interval),
            ("keepaliveTimeout", tunnel.keepalive_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(
                    &format!("spec.tunnel.{field}"),
                    "must be greater than zero",
                ));
            }
        }
        if tunnel.max_streams == 0 {
            return Err(invalid("spec.tunnel.maxStreams", "must be at least 1"));
        }
        if let Some(address) = tunnel.advertise_address
            && (address.ip().is_unspecified() || address.port() == 0)
        {
            return Err(invalid(
                "spec.tunnel.advertiseAddress",
                "must be an address other nodes can reach, with a port",
            ));
        }
        let mut nodes = std::collections::HashSet::new();
        for (index, peer) in tunnel.peers.iter().enumerate() {
            let field = format!("spec.tunnel.peers[{index}]");
            if peer.node.is_empty() {
                return Err(invalid(&format!("{field}.node"), "must not be empty"));
            }
            if peer.node == self.metadata.name {
                return Err(invalid(
                    &format!("{field}.node"),
                    format!("{:?} is this node (metadata.name)", peer.node),
                ));
            }
            if !nodes.insert(peer.node.as_str()) {
                return Err(invalid(
                    &format!("{field}.node"),
                    format!("{:?} is listed twice", peer.node),
                ));
            }
            if peer.address.ip().is_unspecified() || peer.address.port() == 0 {
                return Err(invalid(
                    &format!("{field}.address"),
                    "must be a reachable address with a port",
                ));
            }
        }
        Ok(())
    }

    /// Where other nodes reach this node's tunnel: `spec.tunnel.advertiseAddress`, else the
    /// listener's address when it is not a wildcard.
    pub fn tunnel_advertise_address(&self) -> Option<SocketAddr> {
        self.spec.tunnel.advertise_address.or_else(|| {
            self.spec
                .listeners
                .tunnel
                .filter(|address| !address.ip().is_unspecified())
        })
    }

    fn validate_identity(&self, identity: &IdentitySpec) -> Result<(), ConfigError> {
        if let Err(error) = crate::identity::SpiffeId::new(&identity.trust_domain, &[]) {
            return Err(invalid("spec.identity.trustDomain", error.to_string()));
        }
        if let Err(error) =
            crate::identity::SpiffeId::for_node(&identity.trust_domain, &self.metadata.name)
        {
            return Err(invalid(
                "metadata.name",
                format!("names the node's SPIFFE ID: {error}"),
            ));
        }
        if identity.certificate_ttl < Duration::from_secs(10)
            || identity.certificate_ttl > Duration::from_secs(30 * 24 * 3600)
        {
            return Err(invalid(
                "spec.identity.certificateTtl",
                "must be between 10s and 30d (short-lived certificates: hours)",
            ));
        }
        if identity.issue_timeout.is_zero() || identity.request_timeout.is_zero() {
            return Err(invalid(
                "spec.identity",
                "issueTimeout and requestTimeout must be greater than zero",
            ));
        }
        match (&self.spec.etcd, &identity.local_ca) {
            (Some(_), Some(_)) => Err(invalid(
                "spec.identity.localCa",
                "in etcd mode certificates come from the signer (`mesh-agent ca run`); the CA \
                 key must not live on nodes: remove localCa",
            )),
            (None, Some(local_ca)) if local_ca.dir.as_os_str().is_empty() => {
                Err(invalid("spec.identity.localCa.dir", "must not be empty"))
            }
            _ => Ok(()),
        }
    }

    fn validate_registration(&self) -> Result<(), ConfigError> {
        let registration = &self.spec.registration;
        registration.socket_mode_bits()?;
        let name = &self.metadata.name;
        let edge =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let valid = name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && edge(name.chars().next())
            && edge(name.chars().next_back());
        if registration.socket.is_some() && !name.is_empty() && !valid {
            return Err(invalid(
                "metadata.name",
                format!(
                    "{name:?} must be a node name (lowercase letters, digits, `-`, `.`): it names \
                     this node in the records of registered instances"
                ),
            ));
        }
        if let Some(socket) = &registration.socket
            && (socket.as_os_str().is_empty() || socket.as_os_str().len() > 100)
        {
            return Err(invalid(
                "spec.registration.socket",
                "must be a path of 1 to 100 bytes (a unix socket address)",
            ));
        }
        for (index, parent) in registration.cgroup_parents.iter().enumerate() {
            if !parent.is_absolute()
                || parent
                    .components()
                    .any(|part| matches!(part, std::path::Component::ParentDir))
            {
                return Err(invalid(
                    &format!("spec.registration.cgroupParents[{index}]"),
                    "must be an absolute cgroup path (relative to the cgroup2 mount) without `..`",
                ));
            }
        }
        let address = registration.advertise_address;
        if address.is_unspecified() || address.is_multicast() {
            return Err(invalid(
                "spec.registration.advertiseAddress",
                "must be a unicast address of this node",
            ));
        }
        if registration.lease_ttl < Duration::from_secs(2) {
            return Err(invalid("spec.registration.leaseTtl", "must be at least 2s"));
        }
        let health = &registration.health;
        if health.interval.is_zero() || health.timeout.is_zero() {
            return Err(invalid(
                "spec.registration.health",
                "interval and timeout must be greater than zero",
            ));
        }
        if health.healthy_threshold == 0 || health.unhealthy_threshold == 0 {
            return Err(invalid(
                "spec.registration.health",
                "healthyThreshold and unhealthyThreshold must be at least 1",
            ));
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
        let message = error_of(&format!("{head}spec:\n  proxy:\n    workerThreads: 65\n"));
        assert!(message.contains("spec.proxy.workerThreads"), "{message}");
        let config = parse(&format!("{head}spec:\n  proxy:\n    workerThreads: 4\n")).expect("ok");
        assert_eq!(config.spec.proxy.worker_threads, 4);
    }

    #[test]
    fn identity_is_checked() {
        let head =
            format!("apiVersion: {API_VERSION}\nkind: AgentConfig\nmetadata: {{ name: node-a }}\n");
        let config = parse(&format!("{head}spec:\n  identity: {{}}\n")).expect("valid");
        let identity = config.spec.identity.expect("identity");
        assert_eq!(identity.trust_domain, "mesh.local");
        assert_eq!(identity.certificate_ttl, Duration::from_secs(4 * 3600));
        assert_eq!(identity.local_ca, None);
        let config = parse(&format!(
            "{head}spec:\n  identity: {{ trustDomain: prod.example, certificateTtl: 20s, localCa: {{ dir: /tmp/ca }} }}\n"
        ))
        .expect("valid");
        let identity = config.spec.identity.expect("identity");
        assert_eq!(identity.certificate_ttl, Duration::from_secs(20));
        assert_eq!(
            identity.local_ca.expect("localCa").dir,
            PathBuf::from("/tmp/ca")
        );
        let cases = [
            (
                "identity: { trustDomain: Bad.Domain }",
                "spec.identity.trustDomain",
            ),
            (
                "identity: { certificateTtl: 1s }",
                "spec.identity.certificateTtl",
            ),
            (
                "identity: { localCa: { dir: /ca } }\n  etcd: {}",
                "spec.identity.localCa",
            ),
            ("identity: { typo: 1 }", "typo"),
        ];
        for (body, expected) in cases {
            let message = error_of(&format!("{head}spec:\n  {body}\n"));
            assert!(message.contains(expected), "{expected}: {message}");
        }
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
                "spec.etcd.endpoints[0]: an https:// endpoint needs TLS settings",
            ),
            (
                "spec:\n  etcd: { endpoints: [\"http://e:2379\"], tls: { caFile: ca.pem } }\n",
                "use https://",
            ),
            (
                "spec:\n  etcd: { endpoints: [\"https://e:2379\"], tls: { caFile: ca.pem, certFile: c.pem } }\n",
                "certFile and keyFile go together",
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
        let config = parse(&format!(
            "{head}spec:\n  etcd: {{ endpoints: [\"https://e:2379\"], tls: {{ caFile: ca.pem, certFile: c.pem, keyFile: k.pem, serverName: etcd.local }} }}\n"
        ))
        .expect("TLS settings are valid");
        let tls = config.spec.etcd.and_then(|etcd| etcd.tls).expect("tls");
        assert_eq!(tls.server_name.as_deref(), Some("etcd.local"));
    }

    #[test]
    fn kubernetes_pod_enrolment_is_checked() {
        let head =
            format!("apiVersion: {API_VERSION}\nkind: AgentConfig\nmetadata: {{ name: node-a }}\n");
        let config = parse(&format!(
            "{head}spec:\n  kubernetes: {{ labelSelector: \"mesh.agentmesh.dev/enrol=true\" }}\n"
        ))
        .expect("valid");
        let kubernetes = config.spec.kubernetes.expect("kubernetes");
        assert_eq!(
            kubernetes.token_file,
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
        let message = error_of(&format!(
            "{head}spec:\n  kubernetes: {{ apiServer: \"http://10.96.0.1\" }}\n"
        ));
        assert!(message.contains("spec.kubernetes.apiServer"), "{message}");
        let message = error_of(&format!(
            "{head}spec:\n  kubernetes: {{ requestTimeout: 0s }}\n"
        ));
        assert!(
            message.contains("spec.kubernetes.requestTimeout"),
            "{message}"
        );
    }

    #[test]
    fn registration_is_checked() {
        let head = format!("apiVersion: {API_VERSION}\nkind: AgentConfig\n");
        let config = parse(&format!(
            "{head}spec:\n  registration:\n    cgroupParents: [/agents.slice]\n    socketMode: \"0660\"\n    health: {{ interval: 2s }}\n"
        ))
        .expect("valid");
        let registration = &config.spec.registration;
        assert_eq!(registration.socket_mode_bits().unwrap(), 0o660);
        assert_eq!(
            registration.socket,
            Some(PathBuf::from("/run/mesh/agent.sock"))
        );
        assert_eq!(registration.health.interval, Duration::from_secs(2));
        assert_eq!(registration.health.unhealthy_threshold, 2);
        let off = parse(&format!(
            "{head}spec:\n  registration: {{ socket: null }}\n"
        ))
        .unwrap();
        assert_eq!(off.spec.registration.socket, None);
        let message = error_of(&format!(
            "apiVersion: {API_VERSION}\nkind: AgentConfig\nmetadata: {{ name: Node_A }}\n"
        ));
        assert!(message.contains("metadata.name"), "{message}");
        // Without the API, a standalone name is free-form as before.
        parse(&format!(
            "apiVersion: {API_VERSION}\nkind: AgentConfig\nmetadata: {{ name: Node_A }}\nspec:\n  registration: {{ socket: null }}\n"
        ))
        .unwrap();
        let cases = [
            ("socketMode: \"0999\"", "spec.registration.socketMode"),
            (
                "cgroupParents: [relative]",
                "spec.registration.cgroupParents[0]",
            ),
            (
                "cgroupParents: [/a/../b]",
                "spec.registration.cgroupParents[0]",
            ),
            (
                "advertiseAddress: 0.0.0.0",
                "spec.registration.advertiseAddress",
            ),
            ("leaseTtl: 1s", "spec.registration.leaseTtl"),
            (
                "health: { healthyThreshold: 0 }",
                "spec.registration.health",
            ),
            ("health: { timeout: 0s }", "spec.registration.health"),
        ];
        for (body, expected) in cases {
            let message = error_of(&format!("{head}spec:\n  registration:\n    {body}\n"));
            assert!(message.contains(expected), "{expected}: {message}");
        }
    }

    #[test]
    fn tunnel_settings_and_peers_are_checked() {
        let head =
            format!("apiVersion: {API_VERSION}\nkind: AgentConfig\nmetadata: {{ name: node-a }}\n");
        let config = parse(&format!(
            "{head}spec:\n  listeners: {{ tunnel: \"10.0.0.1:15008\" }}\n  tunnel:\n    keepaliveInterval: 5s\n    peers: [{{node: node-b, address: \"10.0.0.2:15008\"}}]\n"
        ))
        .expect("valid");
        assert_eq!(
            config.spec.tunnel.keepalive_interval,
            Duration::from_secs(5)
        );
        assert_eq!(config.spec.tunnel.max_streams, 1024);
        assert_eq!(config.spec.tunnel.peers[0].node, "node-b");
        assert_eq!(
            config.tunnel_advertise_address(),
            Some("10.0.0.1:15008".parse().unwrap())
        );
        // The default listener is a wildcard: nothing to advertise without advertiseAddress.
        let default = parse(&head).expect("valid");
        assert_eq!(default.spec.listeners.tunnel.map(|a| a.port()), Some(15008));
        assert_eq!(default.tunnel_advertise_address(), None);
        let disabled =
            parse(&format!("{head}spec:\n  listeners: {{ tunnel: null }}\n")).expect("valid");
        assert_eq!(disabled.spec.listeners.tunnel, None);
        let cases = [
            (
                "spec:\n  tunnel: { maxStreams: 0 }\n",
                "spec.tunnel.maxStreams",
            ),
            (
                "spec:\n  tunnel: { handshakeTimeout: 0s }\n",
                "spec.tunnel.handshakeTimeout",
            ),
            (
                "spec:\n  tunnel: { peers: [{node: node-a, address: \"10.0.0.1:15008\"}] }\n",
                "this node",
            ),
            (
                "spec:\n  tunnel: { peers: [{node: b, address: \"10.0.0.2:1\"}, {node: b, address: \"10.0.0.3:1\"}] }\n",
                "spec.tunnel.peers[1].node",
            ),
            (
                "spec:\n  tunnel: { peers: [{node: b, address: \"0.0.0.0:15008\"}] }\n",
                "spec.tunnel.peers[0].address",
            ),
            (
                "spec:\n  tunnel: { advertiseAddress: \"0.0.0.0:15008\" }\n",
                "spec.tunnel.advertiseAddress",
            ),
        ];
        for (body, expected) in cases {
            let message = error_of(&format!("{head}{body}"));
            assert!(message.contains(expected), "{expected}: {message}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let message = error_of(&format!(
            "apiVersion: {API_VERSION}\nkind: AgentConfig\nspec:\n  typo: 1\n"
        ));
        assert!(message.contains("typo"), "{message}");
    }
}
