//! Runs the agent: attaches the datapath, enrols the configured workloads, serves the capture
//! listeners, and stops gracefully on SIGINT or SIGTERM (leaving capture attached, so the
//! workloads stay inside the mesh across a restart).
//!
//! Mesh resources come from one of two sources, behind one interface ([`PolicySource`]): the
//! policy folder (standalone) or etcd (`spec.etcd`). Both hand the complete list of resources to
//! [`PolicyStore::install`], which compiles it and swaps the snapshot; the proxy never knows
//! which source it came from.
//!
//! Endpoints registered on other nodes are reached through the node-to-node tunnel
//! ([`crate::tunnel`]); the tunnel listener is served when workload identity credentials are
//! available ([`tunnel_credentials`]). Without them, cross-node endpoints fail closed.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch};
use tracing::{error, info, warn};

use crate::{
    admin::{self, AdminState},
    config::{AgentConfig, ConfigError, EtcdSpec},
    control::{
        ControlStatus, Etcd, EtcdError, EtcdSettings, InitialSource, SyncOptions, Syncer,
        node::{EtcdPeers, NodeRegistration},
    },
    datapath::{Datapath, DatapathError, DatapathSettings},
    kube::{KubeSettings, PodEnroller, PodEnrolmentSettings},
    policy::{Action, PolicySnapshot, PolicyStore},
    proxy::{OutboundProxy, dialer::Dialer, workers::ConnectionWorkers},
    tunnel::{PeerDirectory, TunnelClient, TunnelServer, TunnelSettings, TunnelStats},
    workloads::{ConfiguredWorkload, WorkloadKeeper},
};

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("cannot listen on {address}: {source}. Is another agent running, or the port taken?")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("the policy folder {dir} has invalid resources (fix them, or run `mesh-agent validate`):\n  {}", problems.join("\n  "))]
    Policy {
        dir: std::path::PathBuf,
        problems: Vec<String>,
    },
    #[error("etcd settings: {0}")]
    Etcd(EtcdError),
    #[error("pod enrolment (spec.kubernetes): {0}")]
    Kubernetes(#[from] crate::kube::KubeError),
    #[error(transparent)]
    Registration(#[from] crate::registry::RegistryError),
    #[error("workload identity: {0}")]
    Identity(String),
    #[error(transparent)]
    Workers(#[from] crate::proxy::workers::WorkerError),
}

/// Where the agent's mesh resources come from. Both sources end in [`PolicyStore::install`].
#[derive(Debug)]
pub enum PolicySource {
    /// No resources: every destination open (or closed with `defaultAction: Deny`).
    Empty,
    /// A folder of resource files, polled for changes (standalone mode).
    Folder(std::path::PathBuf),
    /// etcd: listed, watched, cached on disk.
    Etcd(Box<Syncer>, Option<Box<NodeRegistration>>),
}

impl PolicySource {
    /// Loads the first snapshot into `store`. A folder that does not load stops the agent; etcd
    /// never does (it falls back to the cache, else fails closed) and reports what it served.
    pub async fn load(
        &mut self,
        config: &AgentConfig,
        store: &PolicyStore,
    ) -> Result<(), AgentError> {
        let default_action = config.spec.policy.default_action;
        match self {
            PolicySource::Empty => Ok(()),
            PolicySource::Folder(dir) => {
                let snapshot = store.reload_dir(dir, default_action).map_err(|problems| {
                    AgentError::Policy {
                        dir: dir.clone(),
                        problems,
                    }
                })?;
                info!(
                    dir = %dir.display(),
                    resources = snapshot.resource_count(),
                    hash = format!("{:016x}", snapshot.content_hash()),
                    "policy loaded"
                );
                Ok(())
            }
            PolicySource::Etcd(syncer, _) => {
                match syncer.initial_load().await {
                    InitialSource::Etcd {
                        revision,
                        resources,
                    } => info!(revision, resources, "policy loaded from etcd"),
                    InitialSource::Cache {
                        revision,
                        resources,
                        age,
                    } => warn!(
                        revision,
                        resources,
                        age = %humantime::format_duration(Duration::from_secs(age.as_secs())),
                        "etcd unreachable: serving the last good resources from the cache \
                         file; catching up when etcd answers"
                    ),
                    InitialSource::Nothing { reason } => error!(
                        %reason,
                        "no resources from etcd nor from the cache: every request is denied \
                         until etcd answers (fail closed)"
                    ),
                }
                Ok(())
            }
        }
    }

    /// Keeps the store up to date until `shutdown`.
    pub fn spawn(
        self,
        config: &AgentConfig,
        store: Arc<PolicyStore>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let policy = &config.spec.policy;
        match self {
            PolicySource::Empty => Vec::new(),
            PolicySource::Folder(dir) => {
                let (default_action, interval) = (policy.default_action, policy.reload_interval);
                vec![tokio::spawn(async move {
                    store
                        .watch_dir(dir, default_action, interval, shutdown)
                        .await;
                })]
            }
            PolicySource::Etcd(syncer, node) => {
                let mut tasks = vec![tokio::spawn(syncer.run(shutdown.clone()))];
                if let Some(node) = node {
                    tasks.push(tokio::spawn(node.run(shutdown)));
                }
                tasks
            }
        }
    }
}

/// The policy source the configuration asks for, and (in etcd mode) the control-plane status
/// shown by `/metrics`.
pub async fn policy_source(
    config: &AgentConfig,
    store: &Arc<PolicyStore>,
) -> Result<(PolicySource, Option<Arc<ControlStatus>>), AgentError> {
    if let Some(spec) = &config.spec.etcd {
        let etcd = Etcd::connect(etcd_settings(spec))
            .await
            .map_err(AgentError::Etcd)?;
        let status = Arc::new(ControlStatus::default());
        let syncer = Syncer::new(
            etcd.clone(),
            SyncOptions {
                cache_file: Some(spec.cache_file.clone()),
                debounce: spec.debounce,
                default_action: config.spec.policy.default_action,
                ..SyncOptions::default()
            },
            Arc::clone(store),
            Arc::clone(&status),
        );
        let node = NodeRegistration::new(
            etcd,
            &config.metadata.name,
            spec.lease_ttl,
            Arc::clone(store),
            Arc::clone(&status),
        )
        .with_tunnel_address(
            config
                .tunnel_advertise_address()
                // Published only when the tunnel is served (it needs workload identity).
                .filter(|_| {
                    config.spec.listeners.tunnel.is_some() && config.spec.identity.is_some()
                }),
        );
        return Ok((
            PolicySource::Etcd(Box::new(syncer), Some(Box::new(node))),
            Some(status),
        ));
    }
    Ok(match &config.spec.policy.dir {
        Some(dir) => (PolicySource::Folder(dir.clone()), None),
        None => (PolicySource::Empty, None),
    })
}

/// Tunnel settings from `spec.tunnel` (the drain timeout is the proxy's).
pub fn tunnel_settings(config: &AgentConfig) -> TunnelSettings {
    let tunnel = &config.spec.tunnel;
    TunnelSettings {
        connect_timeout: tunnel.connect_timeout,
        handshake_timeout: tunnel.handshake_timeout,
        keepalive_interval: tunnel.keepalive_interval,
        keepalive_timeout: tunnel.keepalive_timeout,
        max_streams: tunnel.max_streams,
        drain_timeout: config.spec.proxy.drain_timeout,
    }
}

/// Client settings for `spec.etcd`.
pub fn etcd_settings(spec: &EtcdSpec) -> EtcdSettings {
    EtcdSettings {
        endpoints: spec.endpoints.clone(),
        prefix: spec.prefix.clone(),
        dial_timeout: spec.dial_timeout,
        request_timeout: spec.dial_timeout.max(Duration::from_secs(1)) * 2,
        tls: spec.tls.as_ref().map(|tls| tls.settings()),
    }
}

/// The datapath settings an agent configuration asks for.
pub fn datapath_settings(config: &AgentConfig) -> Result<DatapathSettings, ConfigError> {
    let datapath = &config.spec.datapath;
    Ok(DatapathSettings {
        pin_dir: datapath.pin_dir.clone(),
        attach_cgroup: datapath.attach_cgroup.clone(),
        outbound_v4: config.spec.listeners.outbound,
        outbound_v6: config.spec.listeners.outbound_v6,
        accelerate: datapath.accelerate,
        max_workloads: datapath.max_workloads,
        max_connections: datapath.max_connections,
        exclude_cidrs: config.excluded_cidrs()?,
        exclude_ports: datapath.exclude.ports.clone(),
    })
}

/// Runs until SIGINT/SIGTERM.
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    config.validate()?;
    let settings = datapath_settings(&config)?;
    let listeners = &config.spec.listeners;
    let mut addresses = vec![listeners.outbound];
    if let Some(v6) = listeners.outbound_v6 {
        addresses.push(SocketAddr::new(IpAddr::V6(v6), listeners.outbound.port()));
    }
    // Bind every listener before touching kernel state: a port that is taken (say, by another
    // agent) fails here and leaves the datapath that is serving untouched.
    let outbound_listeners = addresses
        .iter()
        .map(|address| bind(*address).map(|listener| (*address, listener)))
        .collect::<Result<Vec<_>, _>>()?;
    // The tunnel needs workload identity (spec.identity) for its mutual TLS.
    let tunnel_listener = match (listeners.tunnel, &config.spec.identity) {
        (Some(address), Some(_)) => Some((address, bind(address)?)),
        (Some(_), None) => {
            info!(
                "tunnel listener off: no workload identity (spec.identity); endpoints on \
                 other nodes are refused"
            );
            None
        }
        (None, _) => None,
    };
    let admin_listener = match listeners.admin {
        Some(address) => Some((
            address,
            TcpListener::bind(address)
                .await
                .map_err(|source| AgentError::Listen { address, source })?,
        )),
        None => None,
    };
    // Policy before the datapath: a folder that does not load stops the agent here, before
    // any connection is served under a policy nobody wrote. In etcd mode the agent starts
    // closed (every request denied) until etcd or the cache provides resources.
    let initial_action = if config.spec.etcd.is_some() {
        Action::Deny
    } else {
        config.spec.policy.default_action
    };
    let policy = Arc::new(PolicyStore::new(PolicySnapshot::empty(initial_action)));
    let (mut source, control) = policy_source(&config, &policy).await?;
    source.load(&config, &policy).await?;
    let datapath = Arc::new(Datapath::start(&settings)?);
    // After the datapath: its privilege check and pin-folder lock speak first (a second agent
    // on the same pins is refused there, not by the socket).
    let registration_listener = crate::registry::bind_configured(&config)?;
    let tunnel_stats = Arc::new(TunnelStats::default());
    let mut peers = PeerDirectory::new(
        config
            .spec
            .tunnel
            .peers
            .iter()
            .map(|peer| (peer.node.clone(), peer.address)),
    );
    if let PolicySource::Etcd(_, Some(node)) = &source {
        peers = peers.with_lookup(Box::new(EtcdPeers::new(node.etcd().clone())));
    }
    // Credentials arrive with the identities, below; until then cross-node endpoints fail
    // closed.
    let tunnel_client = Arc::new(TunnelClient::new(
        None,
        tunnel_settings(&config),
        Arc::clone(&tunnel_stats),
    ));
    let dialer = Arc::new(Dialer::new(
        &config.metadata.name,
        config.spec.proxy.connect_timeout,
        Arc::clone(&tunnel_client),
        peers,
    ));
    let proxy = Arc::new(
        OutboundProxy::new(
            Arc::clone(&datapath),
            config.spec.proxy.connect_timeout,
            addresses.clone(),
            !config.spec.datapath.accelerate,
            config.spec.proxy.l7,
            Arc::clone(&policy),
        )
        .with_dialer(dialer)
        .with_workers(Arc::new(start_workers(config.spec.proxy.worker_threads)?)),
    );

    // The configured workloads are enrolled now, and again whenever a workload's cgroup is
    // created anew (a restarted service) or appears late; one that cannot be enrolled is
    // reported and tried again, the others are served.
    let mut workload_keeper = {
        let proxy = Arc::clone(&proxy);
        WorkloadKeeper::new(
            Arc::clone(&datapath),
            config
                .spec
                .workloads
                .iter()
                .map(|workload| ConfiguredWorkload {
                    name: workload.name.clone(),
                    cgroup: workload.cgroup.clone(),
                }),
            move |cgroup_id, name| proxy.name_workload(cgroup_id, name),
        )
    };
    workload_keeper.check_all();

    let pod_enroller = match &config.spec.kubernetes {
        Some(spec) => Some(Arc::new(PodEnroller::new(
            PodEnrolmentSettings {
                client: KubeSettings {
                    api_server: spec.api_server()?,
                    token_file: spec.token_file.clone(),
                    ca_file: spec.ca_file.clone(),
                    request_timeout: spec.request_timeout,
                },
                node_name: spec
                    .node_name
                    .clone()
                    .or_else(|| {
                        std::env::var("NODE_NAME")
                            .ok()
                            .filter(|name| !name.is_empty())
                    })
                    .unwrap_or_else(|| config.metadata.name.clone()),
                label_selector: spec.label_selector.clone(),
                trust_domain: config.trust_domain().to_owned(),
                cgroup_root: datapath.attach_cgroup().dir.clone(),
            },
            Arc::clone(&datapath),
            Arc::clone(&proxy),
        )?)),
        None => None,
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let admin = Arc::new(AdminState {
        datapath: Arc::clone(&datapath),
        proxy: Arc::clone(&proxy),
        ready: AtomicBool::new(false),
        cgroup_paths: Default::default(),
        control,
        pods: pod_enroller.as_ref().map(|enroller| enroller.status()),
        workloads: workload_keeper.status(),
        tunnel: Arc::clone(&tunnel_stats),
        identity: Default::default(),
    });
    let admin_server = match admin_listener {
        Some((address, listener)) => {
            info!(%address, "admin endpoint ready (/healthz, /readyz, /metrics)");
            Some(tokio::spawn(admin::serve(
                listener,
                Arc::clone(&admin),
                shutdown_rx.clone(),
            )))
        }
        None => None,
    };
    let mut servers = source.spawn(&config, Arc::clone(&policy), shutdown_rx.clone());
    servers.push(tokio::spawn(workload_keeper.run(shutdown_rx.clone())));
    if let Some(enroller) = pod_enroller {
        // etcd mode: the pods' identities are published for the signer, under a node lease.
        if let Some(spec) = &config.spec.etcd {
            let etcd = Etcd::connect(etcd_settings(spec))
                .await
                .map_err(AgentError::Etcd)?;
            let records =
                crate::kube::PodIdentityRecords::new(Arc::clone(&enroller), &config.metadata.name);
            servers.push(tokio::spawn(
                records
                    .publisher(etcd, spec.lease_ttl)
                    .run(shutdown_rx.clone()),
            ));
        }
        servers.push(tokio::spawn(enroller.run(shutdown_rx.clone())));
    }
    if let Some(listener) = registration_listener {
        let enroller = Arc::new(crate::registry::DatapathEnroller {
            datapath: Arc::clone(&datapath),
            proxy: Arc::clone(&proxy),
        });
        let tasks = crate::registry::spawn(
            &config,
            listener,
            Arc::clone(&policy),
            enroller,
            shutdown_rx.clone(),
        )
        .await
        .map_err(AgentError::Etcd)?;
        servers.extend(tasks);
    }
    for (address, listener) in outbound_listeners {
        info!(%address, "outbound capture listener ready");
        servers.push(tokio::spawn(Arc::clone(&proxy).serve(
            listener,
            shutdown_rx.clone(),
            config.spec.proxy.drain_timeout,
        )));
    }
    // Workload identity (spec.identity): the node certificate is issued before the agent
    // reports ready (in etcd mode after the node record is written, which the signer checks).
    // A failure is logged and leaves mTLS unavailable; plain capture serves regardless. The
    // node-to-node transport takes `Identities::credentials_handle()`.
    let identities = crate::identity::start_for_agent(&config).await;
    if let Some(identities) = &identities {
        let _ = admin.identity.set(identities.clone());
        let credentials = identities.credentials_handle();
        tunnel_client.set_credentials(Arc::clone(&credentials));
        if let Some((address, listener)) = tunnel_listener {
            info!(%address, identity = %credentials.node_identity(), "tunnel listener ready (mutual TLS)");
            let server = Arc::new(TunnelServer::new(
                credentials,
                Arc::clone(&policy),
                &config.metadata.name,
                tunnel_settings(&config),
                Arc::clone(&tunnel_stats),
            ));
            servers.push(tokio::spawn(server.serve(listener, shutdown_rx.clone())));
        }
    } else if tunnel_listener.is_some() {
        warn!(
            "tunnel listener off: workload identity unavailable (see above); endpoints on other nodes are refused"
        );
    }
    admin.set_ready(true);
    info!(node = %config.metadata.name, accelerated = datapath.accelerated(), "agent running");

    wait_for_signal().await?;
    info!("stopping: no new connections; draining open ones (capture stays attached)");
    admin.set_ready(false);
    let _ = shutdown_tx.send(true);
    for server in servers {
        if let Err(error) = server.await {
            warn!(%error, "listener task failed");
        }
    }
    if let Some(admin_server) = admin_server {
        let _ = admin_server.await;
    }
    info!(stats = ?proxy.stats(), "agent stopped");
    Ok(())
}

/// The threads that serve captured connections: `configured`, or one per CPU.
fn start_workers(configured: usize) -> Result<ConnectionWorkers, AgentError> {
    let count = match configured {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        count => count,
    };
    let workers = ConnectionWorkers::start(count)?;
    info!(threads = workers.len(), "connection workers started");
    Ok(workers)
}

fn bind(address: SocketAddr) -> Result<TcpListener, AgentError> {
    let listen_error = |source| AgentError::Listen { address, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(listen_error)?;
    socket.set_reuse_address(true).map_err(listen_error)?;
    if address.is_ipv6() {
        socket.set_only_v6(true).map_err(listen_error)?;
    }
    socket.set_nonblocking(true).map_err(listen_error)?;
    socket.bind(&address.into()).map_err(listen_error)?;
    socket.listen(4096).map_err(listen_error)?;
    TcpListener::from_std(std::net::TcpListener::from(socket)).map_err(listen_error)
}

async fn wait_for_signal() -> Result<(), AgentError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM received"),
        _ = interrupt.recv() => info!("SIGINT received"),
    }
    Ok(())
}
