//! The registration API (`mesh.registry.v1.Registry`, gRPC) on a unix socket: every accepted
//! connection is attested from the kernel before it is served ([`super::attest`]); `Register`
//! checks the name against the caller's cgroup, enrols that cgroup for capture, publishes the
//! instance and keeps it while the response stream lives (probing it, reporting its health,
//! sending heartbeats); `Deregister` ends a session early; `Discover` answers healthy instances
//! across the mesh from the current policy snapshot.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    os::{fd::OwnedFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use mesh_proto::registry::v1::{
    self as api, DeregisterRequest, DeregisterResponse, DiscoverRequest, DiscoverResponse,
    RegisterRequest, RegistrationEvent,
    discover_request::Selector,
    registration_event::Event,
    registry_server::{Registry, RegistryServer as RegistryService},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf, unix::AsyncFd},
    net::{UnixListener, UnixStream},
    sync::{Notify, mpsc, watch},
};
use tonic::{Request, Response, Status, transport::server::Connected};
use tracing::{debug, info, warn};

use crate::{
    config::HealthCheckSpec,
    identity::SpiffeId,
    policy::{
        API_VERSION, AgentInstance, AgentInstanceSpec, Capabilities, DEFAULT_NAMESPACE, Health,
        Kind, Metadata, Protocol, Resource, TypedResource,
    },
};

use super::{
    LocalInstance, LocalRegistry, RegistryError,
    attest::{self, AttestError, NameRules, Peer},
    health::{HealthTracker, probe},
};

/// Heartbeat events on a session stream.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a stopping agent waits for registration connections to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// At most this many live registrations per cgroup.
const MAX_INSTANCES_PER_CGROUP: usize = 64;
/// At most this many MCP tools or A2A skills per instance.
const MAX_CAPABILITIES: usize = 1024;

/// What the registry needs from the data plane: enrol a registered workload's cgroup for
/// capture and name it, and the passive health of its endpoints (the datapath and the proxy,
/// in the agent).
pub trait Enroller: Send + Sync + fmt::Debug {
    /// Enrols `cgroup` (relative to the cgroup2 mount) as the workload `name`.
    fn enrol(&self, cgroup: &Path, name: &str) -> Result<(), String>;

    /// Whether this node's data plane ejected the endpoint after failed requests.
    fn ejected(&self, _address: SocketAddr) -> bool {
        false
    }
}

/// What the server needs from the configuration.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub rules: NameRules,
    pub trust_domain: String,
    pub advertise_address: IpAddr,
    pub health: HealthCheckSpec,
}

/// The registration server.
#[derive(Debug, Clone)]
pub struct RegistryServer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: ServerSettings,
    registry: Arc<LocalRegistry>,
    enroller: Arc<dyn Enroller>,
    shutdown: watch::Receiver<bool>,
    /// Sessions ended by `Deregister`, by record name.
    ended: std::sync::Mutex<std::collections::HashMap<String, Arc<Notify>>>,
}

/// How a caller was attested, attached to each request of its connection.
#[derive(Debug, Clone)]
pub struct Attestation(pub Result<Peer, AttestError>);

/// An accepted connection and its attestation.
#[derive(Debug)]
pub struct AttestedStream {
    stream: UnixStream,
    attestation: Attestation,
}

impl Connected for AttestedStream {
    type ConnectInfo = Attestation;

    fn connect_info(&self) -> Attestation {
        self.attestation.clone()
    }
}

impl AsyncRead for AttestedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AttestedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Binds the socket: its folder is created (0755) when missing; a socket file left by an agent
/// that is gone is removed, one a live process still serves is not (the start fails).
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, RegistryError> {
    let socket_error = |source| RegistryError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent).map_err(socket_error)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
            .map_err(socket_error)?;
    }
    if let Ok(existing) = std::fs::symlink_metadata(path) {
        if !std::os::unix::fs::FileTypeExt::is_socket(&existing.file_type()) {
            return Err(socket_error(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way (not removed)",
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(RegistryError::SocketInUse {
                path: path.to_path_buf(),
            });
        }
        info!(socket = %path.display(), "removing a stale registration socket");
        std::fs::remove_file(path).map_err(socket_error)?;
    }
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(socket_error)?;
    Ok(listener)
}

impl RegistryServer {
    pub fn new(
        settings: ServerSettings,
        registry: Arc<LocalRegistry>,
        enroller: Arc<dyn Enroller>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        RegistryServer {
            inner: Arc::new(Inner {
                settings,
                registry,
                enroller,
                shutdown,
                ended: Default::default(),
            }),
        }
    }

    /// Serves `listener` until shutdown, then removes the socket file.
    pub async fn serve(self, listener: UnixListener) {
        let socket = self.inner.settings.socket.clone();
        let mut shutdown = self.inner.shutdown.clone();
        let incoming = futures_util::stream::unfold(listener, |listener| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let attestation = Attestation(attest::attest(&stream));
                        if let Err(error) = &attestation.0 {
                            debug!(%error, "registration caller not attested");
                        }
                        let stream = AttestedStream {
                            stream,
                            attestation,
                        };
                        return Some((Ok::<_, std::io::Error>(stream), listener));
                    }
                    Err(error) => {
                        warn!(%error, "registration socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        let mut stopping = shutdown.clone();
        let signal = async move { stopped(&mut shutdown).await };
        info!(socket = %socket.display(), "registration API ready");
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .add_service(RegistryService::new(self))
            .serve_with_incoming_shutdown(incoming, signal);
        // Sessions end on shutdown, which lets connections close; a client that keeps its
        // connection open anyway does not hold the agent's stop for more than this.
        let grace = async move {
            stopped(&mut stopping).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            served = server => {
                if let Err(error) = served {
                    warn!(%error, "registration API stopped with an error");
                }
            }
            () = grace => debug!("registration connections still open at stop; closing them"),
        }
        if let Err(error) = std::fs::remove_file(&socket) {
            debug!(%error, socket = %socket.display(), "registration socket not removed");
        }
        info!("registration API stopped");
    }

    fn peer<T>(request: &Request<T>) -> Result<Peer, Status> {
        match request.extensions().get::<Attestation>() {
            Some(Attestation(Ok(peer))) => Ok(peer.clone()),
            Some(Attestation(Err(error))) => {
                warn!(target: "audit", %error, "registration refused: caller not attested");
                Err(Status::permission_denied(format!(
                    "the caller could not be attested: {error}"
                )))
            }
            None => Err(Status::permission_denied(
                "the caller could not be attested",
            )),
        }
    }

    /// The instance record a request asks for, validated.
    fn record(&self, request: &RegisterRequest, id: &str) -> Result<AgentInstance, Status> {
        let settings = &self.inner.settings;
        let name = request.name.trim();
        let namespace = if request.namespace.is_empty() {
            DEFAULT_NAMESPACE
        } else {
            &request.namespace
        };
        let address = match (request.port, request.address.is_empty()) {
            (0, true) => {
                return Err(Status::invalid_argument(
                    "give the instance's port or address",
                ));
            }
            (port, true) => {
                let port = u16::try_from(port).map_err(|_| {
                    Status::invalid_argument(format!("port {port} is out of range"))
                })?;
                SocketAddr::new(settings.advertise_address, port)
            }
            (0, false) => {
                let address: SocketAddr = request.address.parse().map_err(|_| {
                    Status::invalid_argument(format!(
                        "address {:?} is not ip:port",
                        request.address
                    ))
                })?;
                if !address.ip().is_loopback() && address.ip() != settings.advertise_address {
                    return Err(Status::invalid_argument(format!(
                        "address {address}: the IP must be a loopback address or this node's \
                         advertised address {}",
                        settings.advertise_address
                    )));
                }
                address
            }
            (_, false) => {
                return Err(Status::invalid_argument(
                    "give the port or the address, not both",
                ));
            }
        };
        if request.mcp_tools.len() > MAX_CAPABILITIES || request.a2a_skills.len() > MAX_CAPABILITIES
        {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_CAPABILITIES} MCP tools and {MAX_CAPABILITIES} A2A skills"
            )));
        }
        let protocol = match api::Protocol::try_from(request.protocol) {
            Ok(api::Protocol::Unspecified | api::Protocol::Http) => Protocol::Http,
            Ok(api::Protocol::Mcp) => Protocol::Mcp,
            Ok(api::Protocol::A2a) => Protocol::A2a,
            Ok(api::Protocol::Grpc) => Protocol::Grpc,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown protocol {}",
                    request.protocol
                )));
            }
        };
        let identity = SpiffeId::for_agent(&settings.trust_domain, name)
            .map_err(|error| Status::invalid_argument(format!("name {name:?}: {error}")))?;
        let node = self.inner.registry.node();
        let record = TypedResource {
            api_version: API_VERSION.to_owned(),
            kind: Kind::AgentInstance.as_str().to_owned(),
            metadata: Metadata {
                namespace: namespace.to_owned(),
                ..Metadata::named(&format!("{name}.{node}.{id}"))
            },
            spec: AgentInstanceSpec {
                agent: name.to_owned(),
                node: node.to_owned(),
                address,
                protocol,
                capabilities: Capabilities {
                    mcp_tools: request.mcp_tools.clone(),
                    a2a_skills: request.a2a_skills.clone(),
                },
                identity: identity.to_string(),
                health_check_path: (!request.health_check_path.is_empty())
                    .then(|| request.health_check_path.clone()),
                health: Health::Unknown,
                registered_at: Some(
                    humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                ),
            },
        };
        let resource = Resource::AgentInstance(record);
        if let Err(problems) = resource.validate() {
            let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return Err(Status::invalid_argument(problems.join("; ")));
        }
        match resource {
            Resource::AgentInstance(record) => Ok(record),
            _ => Err(Status::internal("record kind")),
        }
    }

    fn new_id(&self, name: &str) -> String {
        let node = self.inner.registry.node();
        loop {
            let id = format!("{:08x}", rand::random::<u32>());
            if !self.inner.registry.contains(&format!("{name}.{node}.{id}")) {
                return id;
            }
        }
    }
}

/// Ends a session's instance however the session task ends.
struct SessionGuard {
    registry: Arc<LocalRegistry>,
    inner: Arc<Inner>,
    name: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.registry.remove(&self.name) {
            info!(instance = %self.name, "instance deregistered");
        }
        if let Ok(mut ended) = self.inner.ended.lock() {
            ended.remove(&self.name);
        }
    }
}

type EventStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<RegistrationEvent, Status>> + Send>>;

fn health_of(health: Health) -> i32 {
    match health {
        Health::Healthy => api::Health::Healthy as i32,
        Health::Unhealthy => api::Health::Unhealthy as i32,
        Health::Unknown => api::Health::Unspecified as i32,
    }
}

fn protocol_of(protocol: Protocol) -> i32 {
    match protocol {
        Protocol::Http => api::Protocol::Http as i32,
        Protocol::Mcp => api::Protocol::Mcp as i32,
        Protocol::A2a => api::Protocol::A2a as i32,
        Protocol::Grpc => api::Protocol::Grpc as i32,
    }
}

#[tonic::async_trait]
impl Registry for RegistryServer {
    type RegisterStream = EventStream;

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        let peer = Self::peer(&request)?;
        let request = request.into_inner();
        let name = request.name.trim().to_owned();
        let grant = match self.inner.settings.rules.authorize(&peer.cgroup, &name) {
            Ok(grant) => grant,
            Err(reason) => {
                warn!(
                    target: "audit", pid = peer.pid, uid = peer.uid,
                    cgroup = %peer.cgroup.display(), name = %name, %reason,
                    "registration refused"
                );
                return Err(Status::permission_denied(format!(
                    "may not register `{name}`: {reason}"
                )));
            }
        };
        let held = self.inner.registry.records_count_of(&peer.cgroup);
        if held >= MAX_INSTANCES_PER_CGROUP {
            return Err(Status::resource_exhausted(format!(
                "cgroup {} already holds {held} registrations (at most {MAX_INSTANCES_PER_CGROUP})",
                peer.cgroup.display()
            )));
        }
        let id = self.new_id(&name);
        let mut record = self.record(&request, &id)?;
        let snapshot = self.inner.registry.store.current();
        if let Some(owner) = snapshot.agent_by_host(&name)
            && owner.name != name
        {
            return Err(Status::failed_precondition(format!(
                "`{name}` is a host name of agent {}",
                owner.name
            )));
        }
        self.inner
            .enroller
            .enrol(&grant.cgroup, &name)
            .map_err(|error| {
                Status::failed_precondition(format!(
                    "cannot enrol cgroup {} for capture: {error}",
                    grant.cgroup.display()
                ))
            })?;
        let health_spec = self.inner.settings.health.clone();
        let mut tracker = HealthTracker::new(&health_spec);
        let first = probe(
            record.spec.address,
            record.spec.health_check_path.as_deref(),
            health_spec.timeout,
        )
        .await;
        tracker.record(first.is_ok());
        record.spec.health = tracker.health();
        let record_name = record.metadata.name.clone();
        info!(
            target: "audit", pid = peer.pid, cgroup = %peer.cgroup.display(), rule = %grant.rule,
            instance = %record_name, address = %record.spec.address,
            health = record.spec.health.as_str(), identity = %record.spec.identity,
            "instance registered"
        );
        let registered = api::Registered {
            instance_id: id.clone(),
            identity: record.spec.identity.clone(),
            node: record.spec.node.clone(),
            address: record.spec.address.to_string(),
            record: record_name.clone(),
            health: health_of(record.spec.health),
        };
        let address = record.spec.address;
        let path = record.spec.health_check_path.clone();
        self.inner.registry.add(LocalInstance {
            record,
            cgroup: peer.cgroup.clone(),
        });
        let ended = Arc::new(Notify::new());
        if let Ok(mut sessions) = self.inner.ended.lock() {
            sessions.insert(record_name.clone(), Arc::clone(&ended));
        }
        let guard = SessionGuard {
            registry: Arc::clone(&self.inner.registry),
            inner: Arc::clone(&self.inner),
            name: record_name.clone(),
        };

        let (events, receiver) = mpsc::channel::<Result<RegistrationEvent, Status>>(8);
        let _ = events
            .send(Ok(RegistrationEvent {
                event: Some(Event::Registered(registered)),
            }))
            .await;
        let mut shutdown = self.inner.shutdown.clone();
        let dataplane = Arc::clone(&self.inner.enroller);
        let exit = peer.pidfd.try_clone().ok().and_then(|fd| {
            // SAFETY: the AsyncFd owns this duplicate of the pidfd; it stays open and the same
            // descriptor until the AsyncFd is dropped.
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
        });
        tokio::spawn(async move {
            let guard = guard;
            let mut probes = tokio::time::interval(health_spec.interval);
            probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            probes.reset();
            let mut beats = tokio::time::interval(HEARTBEAT);
            beats.reset();
            let mut sequence = 0u64;
            loop {
                tokio::select! {
                    _ = events.closed() => {
                        debug!(instance = %record_name, "session stream closed by the workload");
                        break;
                    }
                    _ = process_exit(exit.as_ref()) => {
                        info!(instance = %record_name, pid = peer.pid, "registered process exited");
                        break;
                    }
                    _ = ended.notified() => break,
                    _ = shutdown.changed() => break,
                    _ = beats.tick() => {
                        sequence += 1;
                        let beat = RegistrationEvent {
                            event: Some(Event::Heartbeat(api::Heartbeat { sequence })),
                        };
                        // Never wait for a client that does not read: a full queue drops the
                        // event (the record, not the stream, is what the mesh goes by).
                        if matches!(events.try_send(Ok(beat)), Err(mpsc::error::TrySendError::Closed(_))) {
                            break;
                        }
                    }
                    _ = probes.tick() => {
                        let mut result = probe(address, path.as_deref(), health_spec.timeout).await;
                        // Passive results: an instance that answers the probe but fails real
                        // requests (ejected by this node's balancer) is not healthy either.
                        if result.is_ok() && dataplane.ejected(address) {
                            result = Err(
                                "ejected by the data plane after failed requests".to_owned(),
                            );
                        }
                        let reason = match &result {
                            Ok(()) => "probe succeeded".to_owned(),
                            Err(reason) => reason.clone(),
                        };
                        if let Some(health) = tracker.record(result.is_ok()) {
                            info!(instance = %record_name, health = health.as_str(), %reason, "instance health changed");
                            guard.registry.set_health(&guard.name, health);
                            let event = RegistrationEvent {
                                event: Some(Event::Health(api::HealthChanged {
                                    health: health_of(health),
                                    reason,
                                })),
                            };
                            if matches!(events.try_send(Ok(event)), Err(mpsc::error::TrySendError::Closed(_))) {
                                break;
                            }
                        }
                    }
                }
            }
        });
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|event| (event, receiver))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let peer = Self::peer(&request)?;
        let id = request.into_inner().instance_id;
        let instance = self
            .inner
            .registry
            .records()
            .into_iter()
            .find(|record| record.metadata.name.rsplit('.').next() == Some(id.as_str()))
            .and_then(|record| self.inner.registry.get(&record.metadata.name))
            .ok_or_else(|| Status::not_found(format!("no instance {id:?} on this node")))?;
        if instance.cgroup != peer.cgroup {
            warn!(
                target: "audit", pid = peer.pid, cgroup = %peer.cgroup.display(),
                instance = %instance.record.metadata.name,
                "deregistration refused: another cgroup registered this instance"
            );
            return Err(Status::permission_denied(
                "only the cgroup that registered an instance may deregister it",
            ));
        }
        let name = instance.record.metadata.name;
        let notify = self
            .inner
            .ended
            .lock()
            .ok()
            .and_then(|sessions| sessions.get(&name).cloned());
        if let Some(notify) = notify {
            notify.notify_one();
        }
        self.inner.registry.remove(&name);
        info!(instance = %name, "instance deregistered on request");
        Ok(Response::new(DeregisterResponse {}))
    }

    async fn discover(
        &self,
        request: Request<DiscoverRequest>,
    ) -> Result<Response<DiscoverResponse>, Status> {
        let peer = Self::peer(&request)?;
        if !self.inner.settings.rules.is_workload(&peer.cgroup) {
            warn!(
                target: "audit", pid = peer.pid, cgroup = %peer.cgroup.display(),
                "discovery refused: the caller is not a workload"
            );
            return Err(Status::permission_denied(format!(
                "cgroup {} is not a workload of this node",
                peer.cgroup.display()
            )));
        }
        let snapshot = self.inner.registry.store.current();
        let matches: Vec<&AgentInstance> = match request.into_inner().selector {
            Some(Selector::McpTool(tool)) => snapshot
                .healthy_instances_with_capability(&tool)
                .into_iter()
                .filter(|i| i.spec.capabilities.mcp_tools.contains(&tool))
                .collect(),
            Some(Selector::A2aSkill(skill)) => snapshot
                .healthy_instances_with_capability(&skill)
                .into_iter()
                .filter(|i| i.spec.capabilities.a2a_skills.contains(&skill))
                .collect(),
            Some(Selector::Agent(agent)) => snapshot
                .instances()
                .iter()
                .filter(|i| i.spec.agent == agent && i.spec.health.is_healthy())
                .collect(),
            None => {
                return Err(Status::invalid_argument(
                    "name an MCP tool, an A2A skill or an agent",
                ));
            }
        };
        let instances = matches
            .into_iter()
            .map(|instance| api::Instance {
                agent: instance.spec.agent.clone(),
                namespace: instance.metadata.namespace.clone(),
                instance_id: instance
                    .metadata
                    .name
                    .rsplit('.')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
                node: instance.spec.node.clone(),
                address: instance.spec.address.to_string(),
                health: health_of(instance.spec.health),
                protocol: protocol_of(instance.spec.protocol),
                mcp_tools: instance.spec.capabilities.mcp_tools.clone(),
                a2a_skills: instance.spec.capabilities.a2a_skills.clone(),
                identity: instance.spec.identity.clone(),
            })
            .collect();
        Ok(Response::new(DiscoverResponse { instances }))
    }
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
}

/// Resolves when the process behind the pidfd exits; never without one.
async fn process_exit(pidfd: Option<&AsyncFd<OwnedFd>>) {
    match pidfd {
        Some(fd) => {
            let _ = fd.readable().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_removes_stale_sockets_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/mesh/agent.sock");
        // The folder is created; the mode applied.
        let listener = bind(&path, 0o660).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // Served: a second bind is refused and leaves it alone.
        assert!(matches!(
            bind(&path, 0o660),
            Err(RegistryError::SocketInUse { .. })
        ));
        assert!(path.exists());
        // Stale (nobody listens): removed and bound again.
        drop(listener);
        let _listener = bind(&path, 0o666).unwrap();
        // Not a socket: never removed.
        let file = dir.path().join("file");
        std::fs::write(&file, "keep").unwrap();
        assert!(bind(&file, 0o660).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    }
}
