//! The harness the end-to-end tests, `cargo xtask demo` and `cargo xtask bench` share: private
//! cgroup trees (never the root cgroup), processes started inside a chosen cgroup, and real
//! `mesh-agent` processes with their own config, pins and ports. Everything it creates is
//! removed on drop (also when a test panics), and leftovers of runs that were killed outright
//! are swept the next time a tree is created.

use std::{
    fs,
    io::{self, BufRead, Write},
    net::{SocketAddr, TcpListener},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod etcd;
pub mod netns;
pub mod signer;
pub mod two_nodes;

/// Prefix of every cgroup and pin folder the harness creates.
pub const PREFIX: &str = "mesh-e2e";

/// Harness failures.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("no cgroup2 mount found in /proc/self/mountinfo")]
    NoCgroup2,
    #[error(
        "binary {0} not found; build it first (`cargo build -p mesh-agent -p mesh-tests --bins`)"
    )]
    MissingBinary(PathBuf),
    #[error("the agent did not become ready within {timeout:?}; its log:\n{log}")]
    AgentNotReady { timeout: Duration, log: String },
    #[error("command {command} failed: {output}")]
    CommandFailed { command: String, output: String },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// A temporary folder, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh folder under the system's temporary directory, named after `label`.
    pub fn new(label: &str) -> Result<Self, HarnessError> {
        let dir = std::env::temp_dir().join(unique_name(label));
        fs::create_dir_all(&dir).map_err(io_error("creating a temporary folder"))?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, HarnessError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(io_error("reading mountinfo"))?;
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|field| *field == "-")?;
            let whole_filesystem = fields.get(3) == Some(&"/");
            (fields.get(dash + 1) == Some(&"cgroup2") && whole_filesystem)
                .then(|| PathBuf::from(fields[4]))
        })
        .next()
        .ok_or(HarnessError::NoCgroup2)
}

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// A unique name for this process: prefix, pid, sequence number.
pub fn unique_name(label: &str) -> String {
    format!(
        "{PREFIX}-{}-{}-{label}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )
}

/// A private cgroup subtree, removed (with every process still in it killed) on drop.
#[derive(Debug)]
pub struct CgroupTree {
    mount: PathBuf,
    /// Path relative to the cgroup2 mount, e.g. `/mesh-e2e-123-0-capture`.
    relative: PathBuf,
}

impl CgroupTree {
    /// Creates `/<PREFIX>-<pid>-<n>-<label>` below the cgroup2 root after sweeping leftovers of
    /// dead test processes.
    pub fn create(label: &str) -> Result<Self, HarnessError> {
        let mount = cgroup2_mount()?;
        sweep_stale(&mount);
        let relative = PathBuf::from("/").join(unique_name(label));
        let dir = mount.join(relative.strip_prefix("/").unwrap_or(&relative));
        fs::create_dir(&dir).map_err(io_error(format!("creating cgroup {}", dir.display())))?;
        Ok(Self { mount, relative })
    }

    /// The tree's path relative to the cgroup2 mount.
    pub fn relative(&self) -> &Path {
        &self.relative
    }

    /// The tree's absolute directory.
    pub fn dir(&self) -> PathBuf {
        self.absolute(&self.relative)
    }

    /// The absolute directory of a relative cgroup path.
    pub fn absolute(&self, relative: &Path) -> PathBuf {
        self.mount
            .join(relative.strip_prefix("/").unwrap_or(relative))
    }

    /// Creates a child cgroup and returns its path relative to the mount.
    pub fn child(&self, name: &str) -> Result<PathBuf, HarnessError> {
        let relative = self.relative.join(name);
        let dir = self.absolute(&relative);
        fs::create_dir_all(&dir).map_err(io_error(format!("creating cgroup {}", dir.display())))?;
        Ok(relative)
    }

    /// Spawns a command inside a child cgroup (the child joins it before it execs).
    pub fn spawn_in(&self, relative: &Path, command: &mut Command) -> Result<Child, HarnessError> {
        spawn_in_cgroup(&self.absolute(relative), command)
    }

    /// Runs a command inside a child cgroup and returns its output.
    pub fn run_in(
        &self,
        relative: &Path,
        command: &mut Command,
    ) -> Result<std::process::Output, HarnessError> {
        let child = self.spawn_in(
            relative,
            command.stdout(Stdio::piped()).stderr(Stdio::piped()),
        )?;
        child
            .wait_with_output()
            .map_err(io_error("waiting for a command"))
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.dir());
    }
}

/// Kills every process in a cgroup subtree and removes its directories, deepest first.
pub fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    // cgroup.kill (Linux 5.14+) kills the whole subtree at once.
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs);
    dirs.sort_by_key(|path| std::cmp::Reverse(path.components().count()));
    let deadline = Instant::now() + Duration::from_secs(5);
    for path in dirs {
        loop {
            match fs::remove_dir(&path) {
                Ok(()) => break,
                Err(error) if error.kind() == io::ErrorKind::NotFound => break,
                // EBUSY while killed processes are still exiting.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(error) => {
                    eprintln!("harness: cannot remove cgroup {}: {error}", path.display());
                    break;
                }
            }
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

/// The pid encoded in a harness name, `<PREFIX>-<pid>-...`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?
        .strip_prefix('-')?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Removes cgroups and pin folders left by harness processes that no longer exist.
fn sweep_stale(mount: &Path) {
    let stale = |name: &str| {
        owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(entries) = fs::read_dir(mount) {
        for entry in entries.flatten() {
            if entry.file_name().to_str().is_some_and(stale) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    if let Ok(entries) = fs::read_dir(BPFFS) {
        for entry in entries.flatten() {
            let Ok(binary) = mesh_agent_binary() else {
                return;
            };
            if entry.file_name().to_str().is_some_and(stale) {
                let _ = Command::new(binary)
                    .args(["detach", "--pin-dir"])
                    .arg(entry.path())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Where bpffs is mounted and the harness keeps its pin folders.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Spawns `command` so that it joins the cgroup at `dir` before it execs: it never runs a
/// single instruction of its own outside that cgroup.
pub fn spawn_in_cgroup(dir: &Path, command: &mut Command) -> Result<Child, HarnessError> {
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
        .map_err(io_error(format!("opening {}/cgroup.procs", dir.display())))?;
    let fd = procs.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls write(2), which
    // is async-signal-safe, on a descriptor opened before the fork; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let pid_zero = b"0";
            if libc::write(fd, pid_zero.as_ptr().cast(), pid_zero.len()) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(io_error("spawning a process in a cgroup"))?;
    drop(procs);
    Ok(child)
}

/// The target directory binaries are built into, derived from the running executable
/// (`target/<profile>/deps/<test>` or `target/<profile>/<bin>`).
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let parent = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if parent.file_name().is_some_and(|name| name == "deps") {
        parent.parent().map(Path::to_path_buf).unwrap_or(parent)
    } else {
        parent
    }
}

/// Path of the `mesh-agent` binary: `$MESH_AGENT_BIN`, or the one next to this executable.
pub fn mesh_agent_binary() -> Result<PathBuf, HarnessError> {
    binary("MESH_AGENT_BIN", "mesh-agent")
}

/// Path of the `mesh-testpeer` binary: `$MESH_TESTPEER_BIN`, or the one next to this executable.
pub fn testpeer_binary() -> Result<PathBuf, HarnessError> {
    binary("MESH_TESTPEER_BIN", "mesh-testpeer")
}

/// The `mesh-register` workload client (registration API).
pub fn register_binary() -> Result<PathBuf, HarnessError> {
    binary("MESH_REGISTER_BIN", "mesh-register")
}

fn binary(variable: &str, name: &str) -> Result<PathBuf, HarnessError> {
    let path = std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| target_profile_dir().join(name));
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::MissingBinary(path))
    }
}

/// The repository's root (this crate lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The Python of the test virtualenv (`cargo xtask setup` makes it) and the path of one of
/// the test scripts in `tests/python/`.
pub fn python_script(script: &str) -> Result<(PathBuf, PathBuf), HarnessError> {
    let root = workspace_root();
    let python = root.join(".venv/bin/python");
    if !python.is_file() {
        return Err(HarnessError::MissingBinary(python));
    }
    Ok((python, root.join("tests/python").join(script)))
}

/// Starts a server script of `tests/python/` as `script PORT ARGS...` on a free loopback port
/// and waits until it listens; stopped on drop. `quiet` discards its stderr (for the demo);
/// otherwise it goes to this process's stderr, where a failing test shows it.
pub fn start_python_server(
    script: &str,
    args: &[&str],
    quiet: bool,
) -> Result<(KillOnDrop, std::net::SocketAddr), HarnessError> {
    let (python, path) = python_script(script)?;
    let port = free_port()?;
    let child = Command::new(python)
        .arg(path)
        .arg(port.to_string())
        .args(args)
        .stdout(Stdio::null())
        .stderr(if quiet {
            Stdio::null()
        } else {
            Stdio::inherit()
        })
        .spawn()
        .map_err(io_error(format!("starting {script}")))?;
    let server = KillOnDrop(child);
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_for_port(address, Duration::from_secs(30))?;
    Ok((server, address))
}

/// A child process killed (and reaped) on drop, so a failing test leaves no server behind.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until something accepts TCP connections at `address`.
pub fn wait_for_port(address: std::net::SocketAddr, timeout: Duration) -> Result<(), HarnessError> {
    let start = Instant::now();
    while std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
        if start.elapsed() > timeout {
            return Err(HarnessError::Io {
                what: format!("waiting for {address} to accept connections"),
                source: io::ErrorKind::TimedOut.into(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether some line of `log` contains every one of `parts`.
pub fn has_line_with(log: &str, parts: &[&str]) -> bool {
    log.lines()
        .any(|line| parts.iter().all(|part| line.contains(part)))
}

/// The value of the Prometheus sample named exactly `name` (labels included) in a text
/// exposition, if there is one.
pub fn prometheus_sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A Python client of a server-first protocol: connects to `target`, reads the greeting line,
/// sends `line` (which ends in a newline), reads one line back and prints
/// `{"banner": ..., "echo": ...}` as JSON.
pub fn banner_client_script(target: SocketAddr, line: &str) -> String {
    format!(
        "import json, socket\n\
         s = socket.create_connection(('{}', {}), timeout=20)\n\
         banner = b''\n\
         while not banner.endswith(b'\\n'): banner += s.recv(100)\n\
         s.sendall({line:?}.encode())\n\
         echo = b''\n\
         while not echo.endswith(b'\\n'): echo += s.recv(100)\n\
         print(json.dumps({{'banner': banner.decode(), 'echo': echo.decode()}}))\n",
        target.ip(),
        target.port()
    )
}

/// A free TCP port on 127.0.0.1 (and, almost surely, on ::1).
pub fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_error("binding a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io_error("reading a bound port"))?
        .port();
    Ok(port)
}

/// A port on 127.0.0.1 that refuses connections for as long as this value lives: its socket
/// is bound, so nothing else (another test's server, an outgoing connection) takes the port
/// meanwhile, but never listens.
#[derive(Debug)]
pub struct RefusingPort {
    _socket: socket2::Socket,
    pub address: std::net::SocketAddr,
}

/// Reserves a [`RefusingPort`].
pub fn refusing_port() -> Result<RefusingPort, HarnessError> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(io_error("creating a socket"))?;
    let any_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    socket
        .bind(&any_port.into())
        .map_err(io_error("binding a port"))?;
    let address = socket
        .local_addr()
        .map_err(io_error("reading a bound port"))?
        .as_socket()
        .ok_or_else(|| io_error("reading a bound port")(io::Error::other("not an IP address")))?;
    Ok(RefusingPort {
        _socket: socket,
        address,
    })
}

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub accelerate: bool,
    /// `spec.proxy.l7`: HTTP served at L7 (true), or every connection forwarded as opaque TCP.
    pub l7: bool,
    /// `(name, cgroup relative path)` enrolled at start-up.
    pub workloads: Vec<(String, PathBuf)>,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<String>,
    /// cgroup (relative) the agent process runs in; must be inside the tree for acceleration.
    pub agent_cgroup: PathBuf,
    pub log_filter: String,
    /// The `mesh-agent` binary to run; `None` for [`mesh_agent_binary`].
    pub agent_binary: Option<PathBuf>,
    /// Folder of mesh resources (`spec.policy.dir`), reloaded every 100 ms; `None` for none.
    pub policy_dir: Option<PathBuf>,
}

/// A running `mesh-agent` with its own config, port and pin folder. Dropping it kills the
/// agent and detaches everything it pinned.
#[derive(Debug)]
pub struct AgentProcess {
    child: Option<Child>,
    pub config_path: PathBuf,
    pub pin_dir: PathBuf,
    pub port: u16,
    /// Port of the admin endpoint (`/healthz`, `/readyz`, `/metrics`) on 127.0.0.1.
    pub admin_port: u16,
    pub log_path: PathBuf,
    work_dir: PathBuf,
    attach_dir: PathBuf,
    options: AgentOptions,
    /// Command prefix the agent runs under (e.g. `unshare --mount ...`), empty for none.
    launcher: Vec<String>,
    /// etcd mode (`spec.etcd`) instead of a policy folder.
    etcd: Option<etcd::AgentEtcd>,
    /// More `spec` sections, YAML indented for `spec:` (e.g. `  identity: {}\n`).
    extra_spec: String,
    /// Extra lines of `spec.registration` (indented for it), besides the socket.
    registration: String,
    /// `metadata.name`: the node's name.
    node: String,
    /// A simulated node: its name (`metadata.name`) and tunnel listener.
    node_launch: Option<NodeLaunch>,
}

/// How an agent runs as one node of a multi-node setup ([`netns::Network`]).
#[derive(Debug, Clone)]
pub struct NodeLaunch {
    /// `metadata.name`: endpoints registered with this node name are local to it.
    pub name: String,
    /// `spec.listeners.tunnel`.
    pub tunnel: SocketAddr,
    /// Command prefix entering the node's network namespace ([`netns::NetNode::launcher`]).
    pub launcher: Vec<String>,
}

impl AgentProcess {
    /// Writes a config for the tree and starts the agent in `options.agent_cgroup`.
    pub fn start(tree: &CgroupTree, options: AgentOptions) -> Result<Self, HarnessError> {
        Self::start_with_launcher(tree, options, &[])
    }

    /// As [`start`](Self::start), running the agent under a command prefix: `launcher` is
    /// exec'd with the agent's command line appended.
    pub fn start_with_launcher(
        tree: &CgroupTree,
        options: AgentOptions,
        launcher: &[&str],
    ) -> Result<Self, HarnessError> {
        Self::start_full(tree, options, launcher, None, "", None)
    }

    /// As [`start`](Self::start), in etcd mode: resources come from etcd (`spec.etcd`), not
    /// from `options.policy_dir` (which must be `None`).
    pub fn start_with_etcd(
        tree: &CgroupTree,
        options: AgentOptions,
        etcd: etcd::AgentEtcd,
    ) -> Result<Self, HarnessError> {
        Self::start_full(tree, options, &[], Some(etcd), "", None)
    }

    /// As [`start`](Self::start) (or [`start_with_etcd`](Self::start_with_etcd) with
    /// `etcd`), adding `extra_spec` to the config's `spec` (YAML indented by two spaces, e.g.
    /// `"  identity: {}\n"`).
    pub fn start_with_spec(
        tree: &CgroupTree,
        options: AgentOptions,
        etcd: Option<etcd::AgentEtcd>,
        extra_spec: &str,
    ) -> Result<Self, HarnessError> {
        Self::start_full(tree, options, &[], etcd, extra_spec, None)
    }

    /// Starts the agent as node `node` (in its network namespace, with its name and tunnel
    /// listener), adding `extra_spec` to the config's `spec`.
    pub fn start_node(
        tree: &CgroupTree,
        options: AgentOptions,
        node: NodeLaunch,
        extra_spec: &str,
    ) -> Result<Self, HarnessError> {
        let launcher = node.launcher.clone();
        let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
        Self::start_full(tree, options, &launcher, None, extra_spec, Some(node))
    }

    /// As [`start_node`](Self::start_node), in etcd mode (`spec.etcd` from `etcd`; then
    /// `options.policy_dir` must be `None`).
    pub fn start_node_with_etcd(
        tree: &CgroupTree,
        options: AgentOptions,
        node: NodeLaunch,
        etcd: etcd::AgentEtcd,
        extra_spec: &str,
    ) -> Result<Self, HarnessError> {
        let launcher = node.launcher.clone();
        let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
        Self::start_full(tree, options, &launcher, Some(etcd), extra_spec, Some(node))
    }

    /// As [`start`](Self::start) (or [`start_with_etcd`](Self::start_with_etcd) with `etcd`),
    /// with extra `spec.registration` settings: YAML lines indented by four spaces (e.g.
    /// `"    cgroupParents: [\"/x\"]\n"`), and `node` as the node's name (`metadata.name`;
    /// the other constructors use `e2e`). Every agent's registration socket is its own
    /// ([`registration_socket`](Self::registration_socket)).
    pub fn start_with_registration(
        tree: &CgroupTree,
        options: AgentOptions,
        etcd: Option<etcd::AgentEtcd>,
        node: &str,
        registration: &str,
    ) -> Result<Self, HarnessError> {
        Self::start_configured(tree, options, &[], etcd, (node, registration, ""), None)
    }

    /// As [`start_with_spec`](Self::start_with_spec), as node `node` (`metadata.name`) on
    /// this host's network: several such agents can share one etcd as distinct nodes (each
    /// with its own loopback tunnel listener, published in its node record).
    pub fn start_named_with_spec(
        tree: &CgroupTree,
        options: AgentOptions,
        etcd: Option<etcd::AgentEtcd>,
        node: &str,
        extra_spec: &str,
    ) -> Result<Self, HarnessError> {
        Self::start_configured(tree, options, &[], etcd, (node, "", extra_spec), None)
    }

    fn start_full(
        tree: &CgroupTree,
        options: AgentOptions,
        launcher: &[&str],
        etcd: Option<etcd::AgentEtcd>,
        extra_spec: &str,
        node: Option<NodeLaunch>,
    ) -> Result<Self, HarnessError> {
        Self::start_configured(tree, options, launcher, etcd, ("e2e", "", extra_spec), node)
    }

    fn start_configured(
        tree: &CgroupTree,
        options: AgentOptions,
        launcher: &[&str],
        etcd: Option<etcd::AgentEtcd>,
        (node_name, registration, extra_spec): (&str, &str, &str),
        node: Option<NodeLaunch>,
    ) -> Result<Self, HarnessError> {
        let name = unique_name("agent");
        let work_dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&work_dir).map_err(io_error("creating the agent's work folder"))?;
        let port = free_port()?;
        let pin_dir = Path::new(BPFFS).join(&name);
        let mut agent = Self {
            child: None,
            config_path: work_dir.join("agent.yaml"),
            pin_dir,
            port,
            admin_port: free_port()?,
            log_path: work_dir.join("agent.log"),
            work_dir,
            attach_dir: tree.dir(),
            options,
            launcher: launcher.iter().map(|part| (*part).to_owned()).collect(),
            etcd,
            extra_spec: extra_spec.to_owned(),
            registration: registration.to_owned(),
            node: node_name.to_owned(),
            node_launch: node,
        };
        agent.write_config(tree.relative())?;
        agent.spawn(tree)?;
        Ok(agent)
    }

    fn write_config(&self, attach: &Path) -> Result<(), HarnessError> {
        let quote = |text: &str| serde_json::Value::String(text.to_owned()).to_string();
        let mut yaml = String::new();
        yaml.push_str("apiVersion: mesh.agentmesh.dev/v1alpha1\nkind: AgentConfig\n");
        let node_name = self
            .node_launch
            .as_ref()
            .map_or(self.node.as_str(), |node| node.name.as_str());
        yaml.push_str(&format!(
            "metadata:\n  name: {}\nspec:\n  datapath:\n",
            quote(node_name)
        ));
        yaml.push_str(&format!(
            "    pinDir: {}\n",
            quote(&self.pin_dir.to_string_lossy())
        ));
        yaml.push_str(&format!(
            "    attachCgroup: {}\n",
            quote(&attach.to_string_lossy())
        ));
        yaml.push_str(&format!("    accelerate: {}\n", self.options.accelerate));
        let ports: Vec<String> = self
            .options
            .exclude_ports
            .iter()
            .map(u16::to_string)
            .collect();
        let cidrs: Vec<String> = self
            .options
            .exclude_cidrs
            .iter()
            .map(|cidr| quote(cidr))
            .collect();
        yaml.push_str(&format!(
            "    exclude:\n      ports: [{}]\n      cidrs: [{}]\n",
            ports.join(", "),
            cidrs.join(", ")
        ));
        yaml.push_str(&format!(
            "  listeners:\n    outbound: \"127.0.0.1:{}\"\n    outboundV6: \"::1\"\n    admin: \"127.0.0.1:{}\"\n",
            self.port, self.admin_port
        ));
        match &self.node_launch {
            Some(node) => yaml.push_str(&format!("    tunnel: \"{}\"\n", node.tunnel)),
            // Agents sharing this host's network: each its own loopback port (the tunnel is
            // served when spec.identity is set).
            None => yaml.push_str(&format!("    tunnel: \"127.0.0.1:{}\"\n", free_port()?)),
        }
        yaml.push_str(&format!(
            "  proxy:\n    l7: {}\n    connectTimeout: 2s\n    drainTimeout: 2s\n",
            self.options.l7
        ));
        if let Some(dir) = &self.options.policy_dir {
            yaml.push_str(&format!(
                "  policy:\n    dir: {}\n    reloadInterval: 100ms\n",
                quote(&dir.to_string_lossy())
            ));
        }
        if let Some(etcd) = &self.etcd {
            yaml.push_str(&etcd.yaml());
        }
        yaml.push_str(&self.extra_spec);
        yaml.push_str(&format!(
            "  registration:\n    socket: {}\n{}",
            quote(&self.registration_socket().to_string_lossy()),
            self.registration
        ));
        yaml.push_str("  workloads:\n");
        for (name, cgroup) in &self.options.workloads {
            yaml.push_str(&format!(
                "    - name: {}\n      cgroup: {}\n",
                quote(name),
                quote(&cgroup.to_string_lossy())
            ));
        }
        if self.options.workloads.is_empty() {
            yaml.push_str("    []\n");
        }
        fs::write(&self.config_path, yaml).map_err(io_error("writing the agent config"))
    }

    fn spawn(&mut self, tree: &CgroupTree) -> Result<(), HarnessError> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io_error("opening the agent log"))?;
        let log_err = log
            .try_clone()
            .map_err(io_error("duplicating the agent log"))?;
        let binary = self.binary()?;
        let mut command = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .args(["--log", &self.options.log_filter])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let agent_cgroup = self.options.agent_cgroup.clone();
        let child = tree.spawn_in(&agent_cgroup, &mut command)?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30))
    }

    /// Waits until the agent logs that it runs (listeners bound, programs attached).
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        let start = Instant::now();
        let runs_before = self.log().matches("agent running").count();
        loop {
            if self.log().matches("agent running").count() > runs_before {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if exited.is_some() || start.elapsed() > timeout {
                return Err(HarnessError::AgentNotReady {
                    timeout,
                    log: self.log(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn binary(&self) -> Result<PathBuf, HarnessError> {
        match &self.options.agent_binary {
            Some(path) => Ok(path.clone()),
            None => mesh_agent_binary(),
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The agent's registration socket (in its own work folder).
    pub fn registration_socket(&self) -> PathBuf {
        self.work_dir.join("agent.sock")
    }

    /// The agent's outbound listener.
    pub fn listener(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The agent's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the agent with SIGTERM (graceful; capture stays attached) and waits for it.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus, HarnessError> {
        let Some(mut child) = self.child.take() else {
            return Err(HarnessError::Io {
                what: "stopping the agent".into(),
                source: io::Error::other("not running"),
            });
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        child.wait().map_err(io_error("waiting for the agent"))
    }

    /// Kills the agent outright (crash), leaving its pins in place.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the agent again with the same config (and pins) after [`stop`](Self::stop) or
    /// [`kill`](Self::kill).
    pub fn restart(&mut self, tree: &CgroupTree) -> Result<(), HarnessError> {
        self.kill();
        self.spawn(tree)
    }

    /// Runs a `mesh-agent` subcommand against this agent's pins and returns stdout.
    pub fn command(&self, args: &[&str]) -> Result<String, HarnessError> {
        let output = Command::new(self.binary()?)
            .args(args)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .env("NO_COLOR", "1")
            .output()
            .map_err(io_error("running mesh-agent"))?;
        if !output.status.success() {
            return Err(HarnessError::CommandFailed {
                command: format!("mesh-agent {}", args.join(" ")),
                output: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `mesh-agent counters -o json`, parsed.
    pub fn counters(&self) -> Result<serde_json::Value, HarnessError> {
        let text = self.command(&["counters", "-o", "json"])?;
        serde_json::from_str(&text).map_err(|error| HarnessError::CommandFailed {
            command: "mesh-agent counters -o json".into(),
            output: format!("{error}: {text}"),
        })
    }

    /// The counters row of a workload by cgroup path.
    pub fn workload_counters(&self, cgroup: &Path) -> Result<serde_json::Value, HarnessError> {
        let counters = self.counters()?;
        let wanted = cgroup.to_string_lossy();
        Ok(counters["workloads"]
            .as_array()
            .and_then(|rows| {
                rows.iter()
                    .find(|row| row["cgroup"].as_str() == Some(&wanted))
            })
            .cloned()
            .unwrap_or(serde_json::Value::Null))
    }

    /// Removes the agent's pins (detaching its programs); idempotent.
    pub fn detach(&self) -> Result<String, HarnessError> {
        self.command(&["detach"])
    }

    /// The attach cgroup's directory.
    pub fn attach_dir(&self) -> &Path {
        &self.attach_dir
    }

    /// `GET path` on the admin endpoint: (status code, body).
    pub fn admin_get(&self, path: &str) -> Result<(u16, String), HarnessError> {
        let address = SocketAddr::from(([127, 0, 0, 1], self.admin_port));
        let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))
            .map_err(io_error("connecting to the admin endpoint"))?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .map_err(io_error("writing to the admin endpoint"))?;
        let mut response = String::new();
        io::Read::read_to_string(&mut stream, &mut response)
            .map_err(io_error("reading the admin endpoint"))?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        Ok((status, body.to_owned()))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
        if let Err(error) = self.detach() {
            eprintln!(
                "harness: detaching {} failed: {error}",
                self.pin_dir.display()
            );
        }
        if std::thread::panicking() {
            eprintln!(
                "---- agent log ({}) ----\n{}",
                self.log_path.display(),
                self.log()
            );
        }
        let _ = fs::remove_dir_all(&self.work_dir);
    }
}

/// The programs attached to a cgroup, as `bpftool cgroup show` lists them (one line each).
pub fn attached_programs(cgroup_dir: &Path) -> Result<Vec<String>, HarnessError> {
    let output = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup_dir)
        .output()
        .map_err(io_error(
            "running bpftool (install it with `cargo xtask setup`)",
        ))?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

/// Reads lines from a child's stdout until one satisfies `done` or the stream ends.
pub fn read_lines_until(reader: impl io::Read, mut done: impl FnMut(&str) -> bool) -> Vec<String> {
    let mut lines = Vec::new();
    for line in io::BufReader::new(reader).lines().map_while(Result::ok) {
        let stop = done(&line);
        lines.push(line);
        if stop {
            break;
        }
    }
    lines
}

/// Writes all of `data` to a writer, then flushes it.
pub fn write_all_flush(mut writer: impl Write, data: &[u8]) -> io::Result<()> {
    writer.write_all(data)?;
    writer.flush()
}

/// Raises the soft limit on open files to `wanted` (and the hard limit too where allowed, as
/// for root), else as far as the hard limit goes; returns the soft and hard limits in force.
pub fn raise_open_files(wanted: u64) -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the rlimit it is given, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return (0, 0);
    }
    if limit.rlim_cur >= wanted {
        return (limit.rlim_cur, limit.rlim_max);
    }
    for raised in [
        libc::rlimit {
            rlim_cur: wanted,
            rlim_max: limit.rlim_max.max(wanted),
        },
        libc::rlimit {
            rlim_cur: limit.rlim_max.min(wanted),
            rlim_max: limit.rlim_max,
        },
    ] {
        // SAFETY: setrlimit only reads the rlimit it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return (raised.rlim_cur, raised.rlim_max);
        }
    }
    (limit.rlim_cur, limit.rlim_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_harness_names() {
        assert_eq!(owner_pid("mesh-e2e-1234-0-capture"), Some(1234));
        assert_eq!(owner_pid("mesh-e2e-x-0"), None);
        assert_eq!(owner_pid("system.slice"), None);
    }

    #[test]
    fn unique_names_differ_and_carry_the_pid() {
        let first = unique_name("a");
        let second = unique_name("a");
        assert_ne!(first, second);
        assert_eq!(owner_pid(&first), Some(std::process::id()));
    }
}
