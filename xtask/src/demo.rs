//! `cargo xtask demo`: the mesh on this machine in standalone mode (no etcd). Starts a real
//! agent in a fresh private cgroup tree, enrols a demo workload, lets it call a local HTTP
//! server through the kernel capture (and a bystander call it directly for contrast), prints
//! what each side saw and the kernel's per-workload counters, then removes everything.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, bail};
use mesh_tests::{AgentOptions, AgentProcess, CgroupTree, attached_programs};

use crate::util::{build, step};

/// A tiny HTTP server that tells each caller which address it connected from.
struct DemoServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DemoServer {
    fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the demo server")?;
        let address = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut request = [0u8; 4096];
                        let _ = stream.read(&mut request);
                        let body = format!(
                            "hello from the demo server; this connection came from {peer}\n"
                        );
                        let _ = write!(
                            stream,
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Self {
            address,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn curl(tree: &CgroupTree, cgroup: &Path, url: &str) -> anyhow::Result<String> {
    let output = tree.run_in(
        cgroup,
        Command::new("curl").args([
            "-sS",
            "--max-time",
            "5",
            "-w",
            "curl: from local port %{local_port} to %{remote_ip}:%{remote_port} (as getpeername reports it)\n",
            url,
        ]),
    )?;
    if !output.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("    {line}\n")).collect()
}

pub fn run() -> anyhow::Result<()> {
    build(false)?;
    let server = DemoServer::start()?;
    let url = format!("http://{}/", server.address);

    let tree = CgroupTree::create("demo")?;
    let agent_cgroup = tree.child("agent")?;
    let workload = tree.child("workload")?;
    let bystander = tree.child("bystander")?;
    step(&format!(
        "cgroups: {} (attach point), agent in {}, enrolled workload {}, bystander {}",
        tree.relative().display(),
        agent_cgroup.display(),
        workload.display(),
        bystander.display()
    ));

    let agent = AgentProcess::start(
        &tree,
        AgentOptions {
            accelerate: true,
            workloads: vec![("demo-workload".into(), workload.clone())],
            exclude_ports: vec![],
            exclude_cidrs: vec![],
            agent_cgroup: agent_cgroup.clone(),
            log_filter: "info,mesh_agent=debug".into(),
            agent_binary: None,
            policy_dir: None,
        },
    )?;
    step(&format!(
        "agent running (pid {:?}), outbound listener {}",
        agent.pid(),
        agent.listener()
    ));
    eprint!("{}", indent(&attached_programs(&tree.dir())?.join("\n")));

    step(&format!(
        "enrolled workload calls {url}: the kernel redirects it through the agent"
    ));
    for _ in 0..3 {
        eprint!("{}", indent(&curl(&tree, &workload, &url)?));
    }
    step(&format!(
        "bystander (not enrolled) calls {url}: untouched by the mesh"
    ));
    eprint!("{}", indent(&curl(&tree, &bystander, &url)?));

    step("what the agent logged about the captured connections");
    let log = agent.log();
    let forwarded: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("forwarding captured"))
        .collect();
    eprint!("{}", indent(&forwarded.join("\n")));

    step("kernel counters per workload (mesh-agent counters)");
    eprint!("{}", indent(&agent.command(&["counters"])?));

    step("cleaning up: stopping the agent, detaching programs, removing pins and cgroups");
    let pin_dir = agent.pin_dir.clone();
    let tree_dir = tree.dir();
    drop(agent);
    drop(tree);
    drop(server);
    if pin_dir.exists() || tree_dir.exists() {
        bail!(
            "cleanup left {} or {} behind",
            pin_dir.display(),
            tree_dir.display()
        );
    }
    step("done: no cgroup, pin or attachment left behind");
    Ok(())
}
