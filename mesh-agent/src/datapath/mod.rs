//! The agent's side of the eBPF datapath: loads the kernel programs embedded in the binary,
//! pins their maps and links under a bpffs folder (so a restart keeps capture and counters),
//! attaches them idempotently to the configured cgroup, enrols and unenrols workloads, and
//! answers "who is this accepted connection from and where did it want to go".

mod accounting;
pub mod cgroup;
mod error;
mod maps;
pub mod sys;

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSkb, CgroupSockAddr, SkMsg, SockOps},
};
use ipnet::IpNet;
use mesh_common::{ConnInfo, DatapathConfig, Endpoint, config_flags, map_names, program_names};
use tracing::{debug, info, warn};

use self::{
    accounting::{Accounting, LinksLock},
    sys::AttachType,
};
pub use self::{
    cgroup::Cgroup,
    error::DatapathError,
    maps::{DatapathMaps, WorkloadCounters},
};

/// The kernel object built from `mesh-ebpf`, embedded at compile time.
static EBPF_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

/// What the datapath needs to know, resolved from the agent configuration.
#[derive(Debug, Clone)]
pub struct DatapathSettings {
    pub pin_dir: PathBuf,
    pub attach_cgroup: PathBuf,
    pub outbound_v4: SocketAddr,
    pub outbound_v6: Option<Ipv6Addr>,
    pub accelerate: bool,
    pub max_workloads: u32,
    pub max_connections: u32,
    pub exclude_cidrs: Vec<IpNet>,
    pub exclude_ports: Vec<u16>,
}

/// A captured connection as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapturedConnection {
    /// Where the workload dialled.
    pub original_dst: SocketAddr,
    /// cgroup id of the enrolled workload that dialled.
    pub workload_cgroup: u64,
}

/// The programs attached to the attach cgroup, and how they attach. The accounting programs
/// are attached per workload instead (`accounting`).
const CGROUP_PROGRAMS: [(&str, AttachType); 5] = [
    (program_names::CONNECT4, AttachType::CgroupInet4Connect),
    (program_names::CONNECT6, AttachType::CgroupInet6Connect),
    (
        program_names::GETPEERNAME4,
        AttachType::CgroupInet4Getpeername,
    ),
    (
        program_names::GETPEERNAME6,
        AttachType::CgroupInet6Getpeername,
    ),
    (program_names::SOCK_OPS, AttachType::CgroupSockOps),
];

/// Links an agent of an earlier version pinned for the accounting programs on the attach
/// cgroup; removed at start.
const LEGACY_LINKS: [&str; 2] = [program_names::SKB_INGRESS, program_names::SKB_EGRESS];

/// The loaded and attached datapath. Dropping it leaves the attachments in place (they are
/// pinned); [`detach`] removes them.
#[derive(Debug)]
pub struct Datapath {
    // The loaded programs, kept for the lifetime of the agent; `None` when opened from pins.
    _ebpf: Option<Ebpf>,
    /// Exclusive lock on the pin folder while this agent owns it; `None` when opened from pins.
    _lock: Option<nix::fcntl::Flock<fs::File>>,
    maps: DatapathMaps,
    accounting: Accounting,
    cgroup_mount: PathBuf,
    attach: Cgroup,
    accelerated: bool,
    /// Process id of the agent that owns the datapath (this process, or the running agent when
    /// opened from pins).
    agent_pid: u32,
}

impl Datapath {
    /// Loads, pins and attaches everything, then writes the settings the programs read.
    pub fn start(settings: &DatapathSettings) -> Result<Self, DatapathError> {
        check_privileges()?;
        let cgroup_mount = cgroup::cgroup2_mount()?;
        let attach = cgroup::resolve(&cgroup_mount, &settings.attach_cgroup)?;
        ensure_bpffs(&settings.pin_dir)?;
        let links_dir = settings.pin_dir.join("links");
        create_dir(&links_dir)?;
        let lock = lock_pin_dir(&settings.pin_dir)?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&settings.pin_dir)
            .map_max_entries(map_names::WORKLOADS, settings.max_workloads)
            .map_max_entries(map_names::COUNTERS, settings.max_workloads)
            .map_max_entries(map_names::ORIG_BY_COOKIE, settings.max_connections)
            .map_max_entries(map_names::CONNS, settings.max_connections)
            .map_max_entries(map_names::SOCKS, settings.max_connections)
            .map_max_entries(map_names::REDIRECT_STATE, settings.max_connections)
            .map_max_entries(map_names::REDIRECT_ALLOWANCE, settings.max_connections)
            .map_max_entries(map_names::FLOW_SEQ, settings.max_connections)
            .load(EBPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                source: Box::new(source),
            })?;
        let maps = DatapathMaps::from_ebpf(&mut ebpf)?;
        // Verdicts the programs remembered under a previous agent are not trusted.
        maps.bump_enrol_generation()?;

        // Acceleration needs the agent's accepted sockets to pass through sock_ops, i.e. the
        // agent must run inside the attach cgroup.
        let own_cgroup = cgroup::cgroup_of_pid(std::process::id())?;
        let mut accelerated = settings.accelerate;
        if accelerated && !cgroup::is_within(&own_cgroup, &attach.path) {
            warn!(
                agent_cgroup = %own_cgroup.display(),
                attach_cgroup = %attach.path.display(),
                "in-kernel acceleration disabled: the agent runs outside the attach cgroup; \
                 run it inside that subtree (or attach at /) to enable it"
            );
            accelerated = false;
        }

        let config = datapath_config(settings, accelerated)?;
        maps.write_exclusions(&settings.exclude_cidrs, &settings.exclude_ports)?;
        if !accelerated {
            maps.clear_sockets()?;
        }

        let cgroup_dir = fs::File::open(&attach.dir).map_err(|source| DatapathError::Io {
            what: format!("opening cgroup {}", attach.dir.display()),
            source,
        })?;
        for (name, attach_type) in CGROUP_PROGRAMS {
            let prog_fd = load_program(&mut ebpf, name)?;
            attach_cgroup_link(
                name,
                prog_fd.as_fd(),
                &cgroup_dir,
                &attach,
                attach_type,
                &links_dir,
            )?;
        }
        for name in LEGACY_LINKS {
            remove_link(&links_dir.join(name))?;
        }
        let accounting = Accounting::install(
            &settings.pin_dir,
            load_program(&mut ebpf, program_names::SKB_INGRESS)?,
            load_program(&mut ebpf, program_names::SKB_EGRESS)?,
        )?;
        accounting.reconcile_all(&accounting.lock()?, &maps, &attach.dir)?;
        if accelerated {
            let prog_fd = load_program(&mut ebpf, program_names::SK_MSG)?;
            maps.attach_sk_msg(prog_fd.as_fd())?;
        }
        // Capture starts only once every program is attached and the settings are in place.
        maps.write_config(&config)?;
        info!(
            attach_cgroup = %attach.path.display(),
            pin_dir = %settings.pin_dir.display(),
            accelerated,
            "datapath attached"
        );
        Ok(Self {
            _ebpf: Some(ebpf),
            _lock: Some(lock),
            maps,
            accounting,
            cgroup_mount,
            attach,
            accelerated,
            agent_pid: std::process::id(),
        })
    }

    /// Opens the state a running (or earlier) agent pinned under `pin_dir`, without loading
    /// anything: for operator commands such as `mesh-agent enrol` and `mesh-agent counters`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        if !pin_dir.join(map_names::CONFIG).exists() {
            return Err(DatapathError::NotRunning {
                pin_dir: pin_dir.to_path_buf(),
            });
        }
        let maps = DatapathMaps::open_pinned(pin_dir)?;
        let accounting = Accounting::open_pinned(pin_dir);
        let cgroup_mount = cgroup::cgroup2_mount()?;
        let link_pin = pin_dir.join("links").join(program_names::CONNECT4);
        let link = sys::obj_get(&link_pin).map_err(|source| DatapathError::Io {
            what: format!("opening {}", link_pin.display()),
            source,
        })?;
        let link_info = sys::cgroup_link_info(&link).map_err(|source| DatapathError::Io {
            what: format!("reading {}", link_pin.display()),
            source,
        })?;
        let path = cgroup::path_of_id(&cgroup_mount, link_info.cgroup_id, 1_000_000).ok_or(
            DatapathError::AttachCgroupGone {
                cgroup_id: link_info.cgroup_id,
            },
        )?;
        let attach = cgroup::resolve(&cgroup_mount, &path)?;
        let config = maps.config()?;
        let accelerated = config.flags & config_flags::ACCELERATE != 0;
        Ok(Self {
            _ebpf: None,
            _lock: None,
            maps,
            accounting,
            cgroup_mount,
            attach,
            accelerated,
            agent_pid: config.agent_tgid,
        })
    }

    /// The datapath's maps.
    pub fn maps(&self) -> &DatapathMaps {
        &self.maps
    }

    /// Whether in-kernel acceleration is active.
    pub fn accelerated(&self) -> bool {
        self.accelerated
    }

    /// Whether the workload socket connected to `agent_end` from `workload_end` has taken the
    /// TCP path for good, and if so how many bytes it redirected before (final from then on).
    pub fn redirect_finished(
        &self,
        workload_end: SocketAddr,
        agent_end: SocketAddr,
    ) -> Result<Option<u64>, DatapathError> {
        let workload_socket =
            mesh_common::SockTuple::new(endpoint_of(workload_end), endpoint_of(agent_end));
        // The first read may copy `redirected` just before the last redirect's update; once
        // `fallen_back` is seen set no redirect follows, so a second read is final.
        match self.maps.redirect_state(&workload_socket)? {
            Some(state) if state.fallen_back != 0 => Ok(self
                .maps
                .redirect_state(&workload_socket)?
                .map(|state| state.redirected)),
            _ => Ok(None),
        }
    }

    /// Tells `sk_msg` that the agent has read `consumed` bytes of what the workload socket
    /// connected to `agent_end` from `workload_end` sent: it may queue up to
    /// [`mesh_common::REDIRECT_WINDOW`] more on the agent's socket.
    pub fn report_consumed(
        &self,
        workload_end: SocketAddr,
        agent_end: SocketAddr,
        consumed: u64,
    ) -> Result<(), DatapathError> {
        let workload_socket =
            mesh_common::SockTuple::new(endpoint_of(workload_end), endpoint_of(agent_end));
        self.maps.set_redirect_allowance(
            &workload_socket,
            consumed.saturating_add(mesh_common::REDIRECT_WINDOW),
        )
    }

    /// The cgroup the programs are attached to.
    pub fn attach_cgroup(&self) -> &Cgroup {
        &self.attach
    }

    /// The cgroup2 mount point.
    pub fn cgroup_mount(&self) -> &Path {
        &self.cgroup_mount
    }

    /// Enrols a cgroup (relative to the cgroup2 mount) for capture and accounting.
    pub fn enrol_cgroup(&self, path: &Path) -> Result<Cgroup, DatapathError> {
        let cgroup = cgroup::resolve(&self.cgroup_mount, path)?;
        self.check_enrollable(&cgroup)?;
        let lock = self.accounting.lock()?;
        let was_enrolled = self.maps.is_enrolled(cgroup.id)?;
        self.maps.enrol(cgroup.id)?;
        if let Err(error) = self.relink_subtree(&lock, &cgroup.dir) {
            // All or nothing: a workload that would not be counted is not enrolled.
            if !was_enrolled {
                self.maps.unenrol(cgroup.id)?;
            }
            return Err(error);
        }
        info!(cgroup = %cgroup.path.display(), cgroup_id = cgroup.id, "workload enrolled");
        Ok(cgroup)
    }

    /// Enrols the cgroup a process runs in.
    pub fn enrol_pid(&self, pid: u32) -> Result<Cgroup, DatapathError> {
        let path = cgroup::cgroup_of_pid(pid)?;
        self.enrol_cgroup(&path)
    }

    /// Removes a cgroup from capture and accounting; connections already open stay as they
    /// are.
    pub fn unenrol_cgroup(&self, path: &Path) -> Result<Cgroup, DatapathError> {
        let cgroup = cgroup::resolve(&self.cgroup_mount, path)?;
        let lock = self.accounting.lock()?;
        self.maps.unenrol(cgroup.id)?;
        info!(cgroup = %cgroup.path.display(), "workload unenrolled");
        // Enrolled cgroups below it may now be outermost and need links of their own.
        self.relink_subtree(&lock, &cgroup.dir)?;
        Ok(cgroup)
    }

    /// Removes a cgroup from capture by id (its directory may be gone already).
    pub fn unenrol_id(&self, cgroup_id: u64) -> Result<(), DatapathError> {
        let lock = self.accounting.lock()?;
        self.maps.unenrol(cgroup_id)?;
        info!(cgroup_id, "workload unenrolled");
        self.accounting.remove_links(&lock, cgroup_id)?;
        // Only a nested enrolment below it can have lost its accounting; without one, every
        // enrolled cgroup has links and there is nothing to walk.
        if self.accounting.unlinked_enrolments(&self.maps)? {
            self.accounting
                .reconcile_all(&lock, &self.maps, &self.attach.dir)?;
        }
        Ok(())
    }

    /// Re-derives the accounting links in the subtree of a cgroup whose enrolment changed.
    fn relink_subtree(&self, lock: &LinksLock, dir: &Path) -> Result<(), DatapathError> {
        let covered = Accounting::has_enrolled_ancestor(&self.maps, &self.cgroup_mount, dir)?;
        self.accounting
            .reconcile_subtree(lock, &self.maps, dir, covered)
    }

    fn check_enrollable(&self, cgroup: &Cgroup) -> Result<(), DatapathError> {
        if !cgroup::is_within(&cgroup.path, &self.attach.path) {
            return Err(DatapathError::OutsideAttachCgroup {
                cgroup: cgroup.path.clone(),
                attach: self.attach.path.clone(),
            });
        }
        // An agent that is not running has no cgroup to protect.
        if let Ok(agent_cgroup) = cgroup::cgroup_of_pid(self.agent_pid)
            && cgroup::is_within(&agent_cgroup, &cgroup.path)
        {
            return Err(DatapathError::SelfEnrolment {
                cgroup: cgroup.path.clone(),
            });
        }
        Ok(())
    }

    /// Looks up an accepted connection by the client's address and port.
    pub fn lookup(&self, client: SocketAddr) -> Result<Option<CapturedConnection>, DatapathError> {
        Ok(self
            .maps
            .connection(&endpoint_of(client))?
            .map(|info| captured_connection(&info)))
    }
}

/// The kernel's key for a socket address.
pub fn endpoint_of(address: SocketAddr) -> Endpoint {
    match address.ip() {
        IpAddr::V4(v4) => Endpoint::v4(u32::from_ne_bytes(v4.octets()), address.port()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Endpoint::v4(u32::from_ne_bytes(v4.octets()), address.port()),
            None => Endpoint::v6(ipv6_words(v6), address.port()),
        },
    }
}

/// The socket address of a kernel endpoint; IPv4-mapped IPv6 addresses become IPv4.
pub fn socket_addr_of(endpoint: &Endpoint) -> SocketAddr {
    let port = endpoint.port as u16;
    if endpoint.family == mesh_common::FAMILY_INET {
        return SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(endpoint.addr[0].to_ne_bytes())),
            port,
        );
    }
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(endpoint.addr) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
        None => SocketAddr::new(IpAddr::V6(v6), port),
    }
}

fn ipv6_words(address: Ipv6Addr) -> [u32; 4] {
    let octets = address.octets();
    let mut words = [0u32; 4];
    for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
        *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    words
}

fn captured_connection(info: &ConnInfo) -> CapturedConnection {
    CapturedConnection {
        original_dst: socket_addr_of(&info.original_dst),
        workload_cgroup: info.workload_cgroup,
    }
}

fn datapath_config(
    settings: &DatapathSettings,
    accelerated: bool,
) -> Result<DatapathConfig, DatapathError> {
    let SocketAddr::V4(outbound) = settings.outbound_v4 else {
        return Err(DatapathError::InvalidSetting {
            setting: "outbound listener",
            problem: format!("{} is not an IPv4 address", settings.outbound_v4),
        });
    };
    let mut flags = config_flags::CAPTURE;
    if accelerated {
        flags |= config_flags::ACCELERATE;
    }
    Ok(DatapathConfig {
        redirect_ip4: u32::from_ne_bytes(outbound.ip().octets()),
        redirect_ip6: ipv6_words(settings.outbound_v6.unwrap_or(Ipv6Addr::LOCALHOST)),
        redirect_port: u32::from(outbound.port()),
        flags,
        agent_tgid: std::process::id(),
        agent_mark: mesh_common::AGENT_SOCKET_MARK,
    })
}

/// Verifies the kernel accepted a program and returns a duplicate of its fd.
fn load_program(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<std::os::fd::OwnedFd, DatapathError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?;
    let program_error = |source| DatapathError::Program {
        name,
        source: Box::new(source),
    };
    let fd = match program {
        aya::programs::Program::CgroupSockAddr(program) => {
            load_typed::<CgroupSockAddr>(program, name)?;
            program
                .fd()
                .map_err(program_error)?
                .as_fd()
                .try_clone_to_owned()
        }
        aya::programs::Program::SockOps(program) => {
            load_typed::<SockOps>(program, name)?;
            program
                .fd()
                .map_err(program_error)?
                .as_fd()
                .try_clone_to_owned()
        }
        aya::programs::Program::CgroupSkb(program) => {
            load_typed::<CgroupSkb>(program, name)?;
            program
                .fd()
                .map_err(program_error)?
                .as_fd()
                .try_clone_to_owned()
        }
        aya::programs::Program::SkMsg(program) => {
            load_typed::<SkMsg>(program, name)?;
            program
                .fd()
                .map_err(program_error)?
                .as_fd()
                .try_clone_to_owned()
        }
        _ => return Err(DatapathError::MissingProgram { name }),
    };
    fd.map_err(|source| DatapathError::Io {
        what: format!("duplicating fd of {name}"),
        source,
    })
}

/// The program kinds the agent loads, so one function can load each.
trait LoadableProgram {
    fn load_into_kernel(&mut self) -> Result<(), aya::programs::ProgramError>;
}

macro_rules! loadable {
    ($($kind:ty),*) => {
        $(impl LoadableProgram for $kind {
            fn load_into_kernel(&mut self) -> Result<(), aya::programs::ProgramError> {
                self.load()
            }
        })*
    };
}
loadable!(CgroupSockAddr, SockOps, CgroupSkb, SkMsg);

fn load_typed<P: LoadableProgram>(
    program: &mut P,
    name: &'static str,
) -> Result<(), DatapathError> {
    match program.load_into_kernel() {
        Ok(()) | Err(aya::programs::ProgramError::AlreadyLoaded) => Ok(()),
        Err(source) => Err(DatapathError::Program {
            name,
            source: Box::new(source),
        }),
    }
}

/// Attaches a cgroup program through a pinned link: swaps the program of an existing link on
/// the same cgroup atomically (restart, upgrade), or creates and pins a new link.
fn attach_cgroup_link(
    name: &'static str,
    prog: std::os::fd::BorrowedFd<'_>,
    cgroup_dir: &fs::File,
    attach: &Cgroup,
    attach_type: AttachType,
    links_dir: &Path,
) -> Result<(), DatapathError> {
    let pin = links_dir.join(name);
    if pin.exists() {
        let existing =
            sys::obj_get(&pin).map_err(|source| DatapathError::Attach { name, source })?;
        let link_info = sys::cgroup_link_info(&existing)
            .map_err(|source| DatapathError::Attach { name, source })?;
        if link_info.cgroup_id == attach.id && link_info.attach_type == attach_type as u32 {
            sys::link_update(existing.as_fd(), prog)
                .map_err(|source| DatapathError::Attach { name, source })?;
            debug!(
                program = name,
                link_id = link_info.link_id,
                "replaced program of pinned link"
            );
            return Ok(());
        }
        // The configuration moved the attach point: drop the stale link first.
        warn!(
            program = name,
            old_cgroup_id = link_info.cgroup_id,
            new_cgroup = %attach.path.display(),
            "attach cgroup changed; moving the link"
        );
        let _ = sys::link_detach(existing.as_fd());
        remove_pin(&pin)?;
    }
    let link = sys::link_create(prog, cgroup_dir.as_fd(), attach_type).map_err(|source| {
        if matches!(
            source.raw_os_error(),
            Some(libc::EINVAL | libc::EOPNOTSUPP | KERNEL_ENOTSUPP)
        ) {
            DatapathError::UnsupportedHook { name, source }
        } else {
            DatapathError::Attach { name, source }
        }
    })?;
    sys::obj_pin(link.as_fd(), &pin).map_err(|source| DatapathError::Pin {
        path: pin.clone(),
        source,
    })?;
    debug!(program = name, pin = %pin.display(), "attached and pinned link");
    Ok(())
}

/// Takes the pin folder for this agent: two agents must never drive one datapath.
fn lock_pin_dir(pin_dir: &Path) -> Result<nix::fcntl::Flock<fs::File>, DatapathError> {
    let dir = fs::File::open(pin_dir).map_err(|source| DatapathError::Io {
        what: format!("opening {}", pin_dir.display()),
        source,
    })?;
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                DatapathError::PinDirInUse {
                    pin_dir: pin_dir.to_path_buf(),
                }
            } else {
                DatapathError::Io {
                    what: format!("locking {}", pin_dir.display()),
                    source: errno.into(),
                }
            }
        },
    )
}

/// Detaches every program and removes every pin under `pin_dir`: the inverse of
/// [`Datapath::start`]. Safe to run when nothing (or only part) is there.
pub fn detach(pin_dir: &Path) -> Result<DetachReport, DatapathError> {
    let mut report = DetachReport::default();
    if !pin_dir.exists() {
        return Ok(report);
    }
    for links in ["links", accounting::LINKS_DIR] {
        report.links += remove_folder(&pin_dir.join(links), remove_link)?;
    }
    remove_folder(&pin_dir.join(accounting::PROGRAMS_DIR), remove_pin)?;
    for entry in read_dir(pin_dir)? {
        let path = entry.path();
        if path.is_dir() {
            continue;
        }
        remove_pin(&path)?;
        report.maps += 1;
    }
    remove_dir(pin_dir)?;
    Ok(report)
}

/// Removes each pin in a folder with `remove`, then the folder; returns how many pins there
/// were (none when the folder is not there).
fn remove_folder(
    folder: &Path,
    remove: fn(&Path) -> Result<(), DatapathError>,
) -> Result<usize, DatapathError> {
    if !folder.exists() {
        return Ok(0);
    }
    let entries = read_dir(folder)?;
    for entry in &entries {
        remove(&entry.path())?;
    }
    remove_dir(folder)?;
    Ok(entries.len())
}

/// What [`detach`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DetachReport {
    pub links: usize,
    pub maps: usize,
}

/// Detaches a pinned link (a link whose cgroup is gone is detached already) and removes its
/// pin. Nothing to do when the pin is not there.
fn remove_link(pin: &Path) -> Result<(), DatapathError> {
    if !pin.exists() {
        return Ok(());
    }
    if let Ok(link) = sys::obj_get(pin)
        && let Err(error) = sys::link_detach(link.as_fd())
        && error.raw_os_error() != Some(libc::ENOLINK)
    {
        warn!(link = %pin.display(), %error, "detaching link failed; removing its pin");
    }
    remove_pin(pin)
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>, DatapathError> {
    let entries = fs::read_dir(dir).map_err(|source| DatapathError::Io {
        what: format!("listing {}", dir.display()),
        source,
    })?;
    Ok(entries.flatten().collect())
}

fn remove_pin(path: &Path) -> Result<(), DatapathError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Io {
            what: format!("removing pin {}", path.display()),
            source,
        }),
    }
}

fn remove_dir(path: &Path) -> Result<(), DatapathError> {
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Io {
            what: format!("removing {}", path.display()),
            source,
        }),
    }
}

fn create_dir(path: &Path) -> Result<(), DatapathError> {
    fs::create_dir_all(path).map_err(|source| DatapathError::Io {
        what: format!("creating {}", path.display()),
        source,
    })
}

/// Makes sure the pin folder lies on a bpffs, mounting one at the conventional place (or the
/// pin folder's parent) when none is there.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    let mounts = cgroup::parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").map_err(
        |source| DatapathError::Io {
            what: "reading /proc/self/mountinfo".into(),
            source,
        },
    )?);
    let covered = mounts
        .iter()
        .any(|mount| mount.fs_type == "bpf" && pin_dir.starts_with(&mount.mount_point));
    if covered {
        return Ok(());
    }
    let mount_point = pin_dir
        .parent()
        .unwrap_or(Path::new("/sys/fs/bpf"))
        .to_path_buf();
    info!(mount_point = %mount_point.display(), "bpffs not mounted; mounting it");
    create_dir(&mount_point)?;
    nix::mount::mount(
        Some("bpf"),
        &mount_point,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|errno| DatapathError::NoBpffs {
        mount_point,
        source: std::io::Error::from(errno),
    })
}

/// The kernel-internal `ENOTSUPP`, which `bpf(2)` can leak to userspace.
const KERNEL_ENOTSUPP: i32 = 524;

/// Capabilities the datapath needs, by bit number in `CapEff`.
const REQUIRED_CAPABILITIES: [(u32, &str); 3] = [
    (39, "CAP_BPF"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
];

/// Fails early, naming the missing capabilities, instead of with an opaque EPERM later.
fn check_privileges() -> Result<(), DatapathError> {
    let status = fs::read_to_string("/proc/self/status").map_err(|source| DatapathError::Io {
        what: "reading /proc/self/status".into(),
        source,
    })?;
    let effective = parse_cap_eff(&status).unwrap_or(0);
    let missing = missing_capabilities(effective);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DatapathError::MissingPrivileges {
            missing: missing.join(", "),
        })
    }
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

fn missing_capabilities(effective: u64) -> Vec<&'static str> {
    // CAP_SYS_ADMIN covers CAP_BPF on kernels that predate it.
    let has = |bit: u32| effective & (1u64 << bit) != 0;
    REQUIRED_CAPABILITIES
        .iter()
        .filter(|(bit, name)| !(has(*bit) || (*name == "CAP_BPF" && has(21))))
        .map(|(_, name)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_round_trip_through_socket_addresses() {
        for text in [
            "127.0.0.1:8080",
            "[::1]:443",
            "[fd00::1:2]:15001",
            "10.1.2.3:1",
        ] {
            let address: SocketAddr = text.parse().expect("address");
            assert_eq!(socket_addr_of(&endpoint_of(address)), address, "{text}");
        }
    }

    #[test]
    fn mapped_addresses_key_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:4000".parse().expect("address");
        let plain: SocketAddr = "127.0.0.1:4000".parse().expect("address");
        assert_eq!(endpoint_of(mapped), endpoint_of(plain));
        let endpoint = Endpoint::v6(ipv6_words("::ffff:10.0.0.1".parse().expect("v6")), 80);
        assert_eq!(
            socket_addr_of(&endpoint),
            "10.0.0.1:80".parse::<SocketAddr>().expect("v4")
        );
    }

    #[test]
    fn endpoint_bytes_are_in_network_order() {
        let endpoint = endpoint_of("1.2.3.4:5".parse().expect("address"));
        assert_eq!(endpoint.addr[0].to_ne_bytes(), [1, 2, 3, 4]);
        let endpoint = endpoint_of("[102:304::]:5".parse().expect("address"));
        assert_eq!(endpoint.addr[0].to_ne_bytes(), [1, 2, 3, 4]);
        assert_eq!(endpoint.port, 5);
    }

    #[test]
    fn datapath_config_encodes_listener_and_flags() {
        let settings = DatapathSettings {
            pin_dir: PathBuf::from("/sys/fs/bpf/x"),
            attach_cgroup: PathBuf::from("/"),
            outbound_v4: "127.0.0.1:15001".parse().expect("address"),
            outbound_v6: Some(Ipv6Addr::LOCALHOST),
            accelerate: true,
            max_workloads: 1,
            max_connections: 16,
            exclude_cidrs: vec![],
            exclude_ports: vec![],
        };
        let config = datapath_config(&settings, false).expect("config");
        assert_eq!(config.redirect_ip4.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(config.redirect_port, 15001);
        assert_eq!(config.flags, config_flags::CAPTURE);
        assert_eq!(config.redirect_ip6[3].to_ne_bytes(), [0, 0, 0, 1]);
        let accelerated = datapath_config(&settings, true).expect("config");
        assert_eq!(
            accelerated.flags,
            config_flags::CAPTURE | config_flags::ACCELERATE
        );
        let v6_only = DatapathSettings {
            outbound_v4: "[::1]:1".parse().expect("address"),
            ..settings
        };
        assert!(datapath_config(&v6_only, true).is_err());
    }

    #[test]
    fn capabilities_are_read_from_proc_status() {
        assert_eq!(
            parse_cap_eff("Name:\tx\nCapEff:\t000001ffffffffff\n"),
            Some(0x1ff_ffff_ffff)
        );
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
        assert!(missing_capabilities(0x1ff_ffff_ffff).is_empty());
        assert_eq!(
            missing_capabilities(0),
            vec!["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
        );
        // CAP_SYS_ADMIN alone stands in for CAP_BPF.
        assert_eq!(
            missing_capabilities((1 << 21) | (1 << 12)),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn attach_types_match_the_kernel_enum() {
        use aya_obj::generated::bpf_attach_type as kernel;
        assert_eq!(
            AttachType::CgroupInetIngress as u32,
            kernel::BPF_CGROUP_INET_INGRESS as u32
        );
        assert_eq!(
            AttachType::CgroupInetEgress as u32,
            kernel::BPF_CGROUP_INET_EGRESS as u32
        );
        assert_eq!(
            AttachType::CgroupSockOps as u32,
            kernel::BPF_CGROUP_SOCK_OPS as u32
        );
        assert_eq!(
            AttachType::SkMsgVerdict as u32,
            kernel::BPF_SK_MSG_VERDICT as u32
        );
        assert_eq!(
            AttachType::CgroupInet4Connect as u32,
            kernel::BPF_CGROUP_INET4_CONNECT as u32
        );
        assert_eq!(
            AttachType::CgroupInet6Connect as u32,
            kernel::BPF_CGROUP_INET6_CONNECT as u32
        );
        assert_eq!(
            AttachType::CgroupInet4Getpeername as u32,
            kernel::BPF_CGROUP_INET4_GETPEERNAME as u32
        );
        assert_eq!(
            AttachType::CgroupInet6Getpeername as u32,
            kernel::BPF_CGROUP_INET6_GETPEERNAME as u32
        );
    }
}
