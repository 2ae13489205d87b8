//! Simulated nodes on one machine: network namespaces, each with a veth pair to a bridge that
//! lives in a namespace of its own (the "switch"), addressed in a private /24 of 10.251.0.0/16
//! picked per run. Nothing is created in the host's namespace: only the namespaces the test
//! made ever see its traffic. Everything is deleted on drop (also when a test panics), and
//! namespaces left by test processes that were killed outright are swept at the next
//! [`Network::create`].
//!
//! Processes join a node's namespace with `nsenter --net` (not `ip netns exec`, which remounts
//! `/sys` and so would hide the cgroup and bpffs mounts from the agent); a thread of the test
//! process can join one too ([`NetNode::run_in`]), to serve or measure from inside a node.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use crate::{HarnessError, PREFIX, io_error, owner_pid, unique_name};

/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";

/// One simulated node's namespace.
#[derive(Debug, Clone)]
pub struct NetNode {
    /// `ip netns` name.
    pub name: String,
    /// Its address on the shared bridge.
    pub address: Ipv4Addr,
}

impl NetNode {
    /// The namespace file, for `nsenter --net=<path>` and `setns(2)`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// A command prefix that runs a program inside this namespace (and nothing else changed).
    pub fn launcher(&self) -> Vec<String> {
        vec![
            "nsenter".to_owned(),
            format!("--net={}", self.path().display()),
            "--".to_owned(),
        ]
    }

    /// `program` run inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        command
    }

    /// Runs `work` on a thread that joined this namespace (sockets it makes live there).
    /// The handle's value is `None` only if joining failed, which this returns as an error.
    pub fn run_in<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Option<T>>, HarnessError> {
        let namespace = fs::File::open(self.path())
            .map_err(io_error(format!("opening {}", self.path().display())))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns(2) on a namespace descriptor this thread owns; it changes only the
            // calling thread's network namespace.
            let joined = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
            if joined != 0 {
                let _ = ready_tx.send(Err(std::io::Error::last_os_error()));
                return None;
            }
            let _ = ready_tx.send(Ok(()));
            Some(work())
        });
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(error)) => Err(HarnessError::Io {
                what: "joining a network namespace".to_owned(),
                source: error,
            }),
            Err(_) => Err(HarnessError::Io {
                what: "joining a network namespace".to_owned(),
                source: std::io::Error::other("the thread ended"),
            }),
        }
    }
}

/// N nodes on one bridge. Dropping it deletes every namespace (and with them the veths).
#[derive(Debug)]
pub struct Network {
    switch: String,
    /// The bridge's own address in the switch namespace (`.254` of the run's /24).
    switch_address: Ipv4Addr,
    nodes: Vec<NetNode>,
}

fn ip(args: &[&str]) -> Result<(), HarnessError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(io_error("running ip (iproute2)"))?;
    if !output.status.success() {
        return Err(HarnessError::CommandFailed {
            command: format!("ip {}", args.join(" ")),
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(())
}

impl Network {
    /// `count` nodes (at most 250), addressed `10.251.<subnet>.1`, `.2`, ...
    pub fn create(label: &str, count: usize) -> Result<Self, HarnessError> {
        sweep_stale();
        let base = unique_name(label);
        // A /24 per run: namespaces isolate them anyway; distinct subnets keep captures and
        // logs of concurrent runs telling.
        let subnet = u8::try_from(std::process::id() % 250).unwrap_or(0) + 1;
        let mut network = Network {
            switch: format!("{base}-sw"),
            switch_address: Ipv4Addr::new(10, 251, subnet, 254),
            nodes: Vec::new(),
        };
        ip(&["netns", "add", &network.switch])?;
        let switch = network.switch.clone();
        ip(&["-n", &switch, "link", "set", "lo", "up"])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        // The switch has an address of its own on the bridge, for services every node shares
        // (etcd, the signer) while their traffic stays inside the test's namespaces.
        ip(&[
            "-n",
            &switch,
            "addr",
            "add",
            &format!("{}/24", network.switch_address),
            "dev",
            "br0",
        ])?;
        for index in 0..count.min(250) {
            let node = NetNode {
                name: format!("{base}-n{index}"),
                address: Ipv4Addr::new(10, 251, subnet, u8::try_from(index + 1).unwrap_or(1)),
            };
            ip(&["netns", "add", &node.name])?;
            network.nodes.push(node.clone());
            let port = format!("p{index}");
            ip(&["-n", &node.name, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &node.name,
            ])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &switch, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                &node.name,
                "addr",
                "add",
                &format!("{}/24", node.address),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &node.name, "link", "set", "eth0", "up"])?;
        }
        Ok(network)
    }

    /// Node `index` (panics past the count asked of [`Network::create`]: a test's mistake).
    pub fn node(&self, index: usize) -> &NetNode {
        &self.nodes[index]
    }

    pub fn nodes(&self) -> &[NetNode] {
        &self.nodes
    }

    /// The switch's namespace, addressed on the bridge (`.254`): every node reaches it, so
    /// shared services (etcd, the signer) run there.
    pub fn switch(&self) -> NetNode {
        NetNode {
            name: self.switch.clone(),
            address: self.switch_address,
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for node in &self.nodes {
            delete_namespace(&node.name);
        }
        delete_namespace(&self.switch);
    }
}

fn delete_namespace(name: &str) {
    let status = Command::new("ip")
        .args(["netns", "delete", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !status.is_ok_and(|status| status.success()) && Path::new(NETNS_DIR).join(name).exists() {
        eprintln!("harness: cannot delete network namespace {name}");
    }
}

/// Deletes namespaces left by harness processes that no longer exist.
fn sweep_stale() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name.starts_with(PREFIX)
            && owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        {
            delete_namespace(name);
        }
    }
}

/// tcpdump writing a node's packets to a pcap file; stopped (and flushed) by
/// [`PacketCapture::finish`], killed on drop.
#[derive(Debug)]
pub struct PacketCapture {
    child: Option<Child>,
    /// Kept open so tcpdump's last words at exit do not meet a closed pipe.
    _stderr: Option<std::process::ChildStderr>,
    pub path: PathBuf,
}

impl PacketCapture {
    /// Starts capturing TCP on `node`'s `eth0` into `path`; returns once tcpdump listens.
    pub fn start(node: &NetNode, path: &Path) -> Result<Self, HarnessError> {
        let mut child = node
            .command("tcpdump")
            // Immediate mode: packets reach the file as they come, not in blocks that a quick
            // stop would lose.
            .args([
                "-i",
                "eth0",
                "-n",
                "-U",
                "--immediate-mode",
                "-s",
                "0",
                "-w",
            ])
            .arg(path)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_error("starting tcpdump (Debian package tcpdump)"))?;
        let stderr = child.stderr.take();
        let mut capture = Self {
            child: Some(child),
            _stderr: None,
            path: path.to_path_buf(),
        };
        let Some(mut stderr) = stderr else {
            return Err(HarnessError::Io {
                what: "reading tcpdump's output".to_owned(),
                source: std::io::Error::other("no stderr"),
            });
        };
        let lines = crate::read_lines_until(&mut stderr, |line| line.contains("listening on"));
        capture._stderr = Some(stderr);
        if !lines.iter().any(|line| line.contains("listening on")) {
            capture.stop();
            return Err(HarnessError::CommandFailed {
                command: "tcpdump".to_owned(),
                output: lines.join("\n"),
            });
        }
        Ok(capture)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = child.wait();
        }
    }

    /// Stops tcpdump (it flushes on SIGINT) and returns the capture's bytes.
    pub fn finish(mut self) -> Result<Vec<u8>, HarnessError> {
        self.stop();
        fs::read(&self.path).map_err(io_error("reading the capture"))
    }

    /// `tcpdump -r <capture> -nn <filter>`, one line per packet.
    pub fn packets(path: &Path, filter: &str) -> Result<Vec<String>, HarnessError> {
        let output = Command::new("tcpdump")
            .args(["-r"])
            .arg(path)
            .args(["-nn", filter])
            .output()
            .map_err(io_error("reading the capture with tcpdump"))?;
        if !output.status.success() {
            return Err(HarnessError::CommandFailed {
                command: format!("tcpdump -r {} -nn {filter}", path.display()),
                output: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

impl Drop for PacketCapture {
    fn drop(&mut self) {
        self.stop();
    }
}
