//! Who is calling the registration socket, from the kernel: the peer process (a pidfd from
//! `SO_PEERPIDFD`, else the pid from `SO_PEERCRED` opened as a pidfd), its cgroup from
//! `/proc/<pid>/cgroup`, and a re-check that the process is still the one that connected (its
//! pidfd has not signalled an exit) after the cgroup was read, so a recycled pid cannot lend
//! its cgroup to a caller. Also the rules that say which names a cgroup may register.

use std::{
    fs,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Component, Path, PathBuf},
    sync::Arc,
};

/// Why a caller could not be attested or may not use a name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    #[error("cannot identify the calling process: {0}")]
    Peer(String),
    #[error("process {pid} has no cgroup v2 path in /proc/{pid}/cgroup ({reason})")]
    Cgroup { pid: u32, reason: String },
    #[error("process {pid} exited while it was being attested")]
    Exited { pid: u32 },
}

/// A caller attested by the kernel.
#[derive(Debug, Clone)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    /// cgroup v2 path of the process, relative to the cgroup2 mount (starts with `/`).
    pub cgroup: PathBuf,
    /// A pidfd of the process: readable once it exits.
    pub pidfd: Arc<OwnedFd>,
}

/// Attests the peer of a connected unix socket.
pub fn attest(socket: &impl AsFd) -> Result<Peer, AttestError> {
    let fd = socket.as_fd();
    let credentials = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|error| AttestError::Peer(format!("SO_PEERCRED: {error}")))?;
    let uid = credentials.uid();
    let (pid, pidfd) = match peer_pidfd(fd.as_raw_fd()) {
        Ok(pidfd) => (pid_of_pidfd(&pidfd)?, pidfd),
        // Kernels before 6.5: open the pid the credentials name. The window between connect()
        // and here is the only one a recycled pid could use; the liveness check below closes
        // the one after.
        Err(_) => {
            let pid = u32::try_from(credentials.pid())
                .map_err(|_| AttestError::Peer("the peer has no pid".to_owned()))?;
            (pid, pidfd_open(pid)?)
        }
    };
    let text =
        fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|error| AttestError::Cgroup {
            pid,
            reason: error.to_string(),
        })?;
    let cgroup = parse_proc_cgroup(&text).map_err(|reason| AttestError::Cgroup { pid, reason })?;
    if exited(&pidfd) {
        return Err(AttestError::Exited { pid });
    }
    Ok(Peer {
        pid,
        uid,
        cgroup,
        pidfd: Arc::new(pidfd),
    })
}

/// `SO_PEERPIDFD` (Linux 6.5): a pidfd of the process that connected.
fn peer_pidfd(fd: i32) -> std::io::Result<OwnedFd> {
    let mut pidfd: libc::c_int = -1;
    let mut length = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(std::io::Error::other)?;
    // SAFETY: `fd` is a socket owned by the caller for the duration of the call; the output
    // buffer is a c_int and `length` says so.
    let result = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&raw mut pidfd).cast(),
            &raw mut length,
        )
    };
    if result != 0 || pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd) })
}

fn pidfd_open(pid: u32) -> Result<OwnedFd, AttestError> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| AttestError::Peer(format!("pid {pid}")))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(AttestError::Peer(format!(
            "pidfd_open({pid}): {}",
            std::io::Error::last_os_error()
        )));
    }
    let fd = i32::try_from(fd).map_err(|_| AttestError::Peer("pidfd out of range".to_owned()))?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The pid a pidfd refers to, from `/proc/self/fdinfo/<fd>` (`Pid:` line; -1 once reaped).
fn pid_of_pidfd(pidfd: &OwnedFd) -> Result<u32, AttestError> {
    let path = format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd());
    let text = fs::read_to_string(&path)
        .map_err(|error| AttestError::Peer(format!("reading {path}: {error}")))?;
    match parse_fdinfo_pid(&text) {
        Some(pid) if pid > 0 => u32::try_from(pid).map_err(|_| AttestError::Peer(path)),
        Some(_) => Err(AttestError::Peer(
            "the calling process has exited".to_owned(),
        )),
        None => Err(AttestError::Peer(format!("{path} has no Pid line"))),
    }
}

/// The `Pid:` value of a pidfd's fdinfo text.
pub fn parse_fdinfo_pid(text: &str) -> Option<i64> {
    text.lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|value| value.trim().parse().ok())
}

/// Whether the process behind a pidfd has exited (the pidfd polls readable).
pub fn exited(pidfd: &OwnedFd) -> bool {
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let ready = unsafe { libc::poll(&raw mut poll, 1, 0) };
    ready != 0
}

/// The cgroup v2 path of `/proc/<pid>/cgroup` text: the `0::` line (on hybrid hosts the v1
/// hierarchies' lines come first and are ignored). Refused: no such line, a path that is not
/// absolute or that climbs out of the caller's cgroup namespace (`/..`), and a cgroup that was
/// removed (`(deleted)`).
pub fn parse_proc_cgroup(text: &str) -> Result<PathBuf, String> {
    let path = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| "no cgroup v2 line (is cgroup2 mounted?)".to_owned())?;
    if path.ends_with(" (deleted)") {
        return Err(format!("the cgroup {path} was removed"));
    }
    if !path.starts_with('/') {
        return Err(format!("{path:?} is not an absolute cgroup path"));
    }
    let path = Path::new(path);
    if path.components().any(|part| part == Component::ParentDir) {
        return Err(format!(
            "{} lies outside the agent's cgroup namespace",
            path.display()
        ));
    }
    Ok(path.to_path_buf())
}

/// Why a name was granted: the cgroup to enrol for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The cgroup the name belongs to (a configured workload's, or `<parent>/<name>`).
    pub cgroup: PathBuf,
    /// Which rule granted it, for logs.
    pub rule: String,
}

/// The registration rules: configured workloads and registration parents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameRules {
    /// `(name, cgroup)` of the configured workloads.
    pub workloads: Vec<(String, PathBuf)>,
    /// cgroups whose direct children may register their directory's name.
    pub parents: Vec<PathBuf>,
}

/// `/a/./b/` -> `/a/b`; a path with `..` stays as given (never matches a real cgroup).
fn normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for part in path.components() {
        if let Component::Normal(part) = part {
            out.push(part);
        }
    }
    out
}

impl NameRules {
    /// Whether a process in `cgroup` may register `name`. Fail closed: only when the cgroup (or
    /// an ancestor) is a configured workload of that name, or the cgroup lies under a
    /// registration parent in a directory named `name` directly below it.
    pub fn authorize(&self, cgroup: &Path, name: &str) -> Result<Grant, String> {
        let cgroup = normal(cgroup);
        for (workload, path) in &self.workloads {
            let path = normal(path);
            if cgroup.starts_with(&path) {
                if workload == name {
                    return Ok(Grant {
                        cgroup: path,
                        rule: format!("configured workload {workload}"),
                    });
                }
                return Err(format!(
                    "cgroup {} belongs to the configured workload `{workload}`, not `{name}`",
                    cgroup.display()
                ));
            }
        }
        for parent in &self.parents {
            let parent = normal(parent);
            let Ok(below) = cgroup.strip_prefix(&parent) else {
                continue;
            };
            let Some(Component::Normal(first)) = below.components().next() else {
                return Err(format!(
                    "cgroup {} is a registration parent itself; register from a child cgroup \
                     named after the agent",
                    cgroup.display()
                ));
            };
            if first.to_str() == Some(name) {
                // A configured workload's name is its own: no other cgroup may take it.
                if let Some((_, path)) = self.workloads.iter().find(|(other, _)| other == name) {
                    return Err(format!(
                        "`{name}` is the configured workload at {}",
                        normal(path).display()
                    ));
                }
                return Ok(Grant {
                    cgroup: parent.join(first),
                    rule: format!("registration parent {}", parent.display()),
                });
            }
            return Err(format!(
                "cgroup {} may only register `{}` (its directory below {})",
                cgroup.display(),
                first.to_string_lossy(),
                parent.display()
            ));
        }
        Err(format!(
            "cgroup {} is neither a configured workload nor below a registration parent \
             (spec.workloads, spec.registration.cgroupParents)",
            cgroup.display()
        ))
    }

    /// Whether `cgroup` is a workload at all (any name): who may use discovery.
    pub fn is_workload(&self, cgroup: &Path) -> bool {
        let cgroup = normal(cgroup);
        self.workloads
            .iter()
            .any(|(_, path)| cgroup.starts_with(normal(path)))
            || self.parents.iter().any(|parent| {
                cgroup
                    .strip_prefix(normal(parent))
                    .is_ok_and(|below| below.components().next().is_some())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_line_on_pure_and_hybrid_hosts() {
        assert_eq!(
            parse_proc_cgroup("0::/agents/tools\n"),
            Ok(PathBuf::from("/agents/tools"))
        );
        let hybrid = "12:cpu,cpuacct:/user.slice\n11:memory:/user.slice\n\
                      1:name=systemd:/user.slice/session-1.scope\n0::/mesh-e2e/tools\n";
        assert_eq!(
            parse_proc_cgroup(hybrid),
            Ok(PathBuf::from("/mesh-e2e/tools"))
        );
        // Hybrid with the unified line first, and the root.
        assert_eq!(
            parse_proc_cgroup("0::/\n1:name=systemd:/x\n"),
            Ok(PathBuf::from("/"))
        );
        // A v1 controller line mentioning 0:: later in the text is not the unified line.
        assert!(parse_proc_cgroup("3:pids:/0::/x\n").is_err());
    }

    #[test]
    fn bad_cgroup_lines_are_refused() {
        assert!(parse_proc_cgroup("").is_err());
        assert!(parse_proc_cgroup("1:name=systemd:/\n").is_err());
        assert!(parse_proc_cgroup("0::/../../host/x\n").is_err());
        assert!(parse_proc_cgroup("0::relative\n").is_err());
        assert!(parse_proc_cgroup("0::/agents/gone (deleted)\n").is_err());
    }

    #[test]
    fn fdinfo_pid() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nPid:\t4242\nNSpid:\t4242\n";
        assert_eq!(parse_fdinfo_pid(text), Some(4242));
        assert_eq!(parse_fdinfo_pid("Pid:\t-1\n"), Some(-1));
        assert_eq!(parse_fdinfo_pid("pos: 0\n"), None);
    }

    fn rules() -> NameRules {
        NameRules {
            workloads: vec![
                ("planner".to_owned(), PathBuf::from("/apps/planner")),
                ("tools".to_owned(), PathBuf::from("/apps/tools/")),
            ],
            parents: vec![PathBuf::from("/agents.slice")],
        }
    }

    #[test]
    fn configured_workloads_register_their_own_name_only() {
        let rules = rules();
        let grant = rules
            .authorize(Path::new("/apps/planner"), "planner")
            .unwrap();
        assert_eq!(grant.cgroup, PathBuf::from("/apps/planner"));
        // A child cgroup of the workload (a container of the pod) is the workload too.
        let grant = rules
            .authorize(Path::new("/apps/tools/worker-1"), "tools")
            .unwrap();
        assert_eq!(grant.cgroup, PathBuf::from("/apps/tools"));
        let error = rules
            .authorize(Path::new("/apps/planner"), "tools")
            .unwrap_err();
        assert!(error.contains("configured workload `planner`"), "{error}");
        // Component-wise: /apps/planner-2 is not /apps/planner.
        assert!(
            rules
                .authorize(Path::new("/apps/planner-2"), "planner")
                .is_err()
        );
    }

    #[test]
    fn parents_grant_the_directory_name_just_below() {
        let rules = rules();
        let grant = rules
            .authorize(Path::new("/agents.slice/search/main"), "search")
            .unwrap();
        assert_eq!(grant.cgroup, PathBuf::from("/agents.slice/search"));
        let error = rules
            .authorize(Path::new("/agents.slice/search/main"), "main")
            .unwrap_err();
        assert!(error.contains("may only register `search`"), "{error}");
        assert!(
            rules
                .authorize(Path::new("/agents.slice"), "agents.slice")
                .is_err()
        );
        assert!(
            rules
                .authorize(Path::new("/other/search"), "search")
                .is_err()
        );
        assert!(rules.authorize(Path::new("/"), "search").is_err());
        // A configured workload's name cannot be taken below a parent.
        let error = rules
            .authorize(Path::new("/agents.slice/planner"), "planner")
            .unwrap_err();
        assert!(
            error.contains("configured workload at /apps/planner"),
            "{error}"
        );
        assert!(rules.is_workload(Path::new("/agents.slice/x")));
        assert!(rules.is_workload(Path::new("/apps/tools")));
        assert!(!rules.is_workload(Path::new("/agents.slice")));
        assert!(!rules.is_workload(Path::new("/user.slice")));
    }

    #[test]
    fn nothing_configured_denies_everything() {
        let rules = NameRules::default();
        let error = rules.authorize(Path::new("/a/b"), "b").unwrap_err();
        assert!(error.contains("neither a configured workload"), "{error}");
    }

    #[test]
    fn attests_a_real_socket_pair() {
        let (left, _right) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = attest(&left).unwrap();
        assert_eq!(peer.pid, std::process::id());
        assert!(peer.cgroup.is_absolute());
        assert!(!exited(&peer.pidfd));
    }
}
