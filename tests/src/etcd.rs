//! A real etcd for tests: Debian's `etcd` on free loopback ports with a data folder of its
//! own, stopped (killed) and its folder removed on drop. It can be stopped and started again on
//! the same ports and data (an outage), compacted with `etcdctl compact`, and queried with
//! `etcdctl`. Also runs `meshctl` against it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{HarnessError, free_port, io_error, target_profile_dir, unique_name};

/// PEM files of an etcd that serves TLS and requires client certificates: a CA made for the
/// test, etcd's serving certificate (127.0.0.1 and localhost), and a client certificate.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdTlsFiles {
    /// Makes a fresh CA and the server and client certificates it signs, in `dir`.
    pub fn generate(dir: &Path) -> Result<Self, HarnessError> {
        let failed = |what: &str, error: rcgen::Error| HarnessError::CommandFailed {
            command: format!("rcgen ({what})"),
            output: error.to_string(),
        };
        let ca_key = rcgen::KeyPair::generate().map_err(|e| failed("CA key", e))?;
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| failed("CA", e))?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "etcd test CA");
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(|e| failed("CA", e))?;
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose| {
            let key = rcgen::KeyPair::generate().map_err(|e| failed("leaf key", e))?;
            let mut params = rcgen::CertificateParams::new(names).map_err(|e| failed("leaf", e))?;
            params.extended_key_usages = vec![usage];
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "etcd test");
            let cert = params
                .signed_by(&key, &issuer)
                .map_err(|e| failed("leaf", e))?;
            Ok::<_, HarnessError>((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert, client_key) = leaf(
            vec!["mesh-client".into()],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let files = EtcdTlsFiles {
            ca: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        for (path, text) in [
            (&files.ca, ca_cert.pem()),
            (&files.ca_key, ca_key_pem),
            (&files.server_cert, server_cert),
            (&files.server_key, server_key),
            (&files.client_cert, client_cert),
            (&files.client_key, client_key),
        ] {
            fs::write(path, text).map_err(io_error("writing a test certificate"))?;
        }
        Ok(files)
    }
}

impl EtcdTlsFiles {
    /// A client certificate and key whose common name is `user` (etcd's user name under
    /// `--client-cert-auth` with authentication on), next to the CA: `(certificate, key)`.
    pub fn client_for(&self, user: &str) -> Result<(PathBuf, PathBuf), HarnessError> {
        let failed = |error: rcgen::Error| HarnessError::CommandFailed {
            command: format!("rcgen (client certificate for {user})"),
            output: error.to_string(),
        };
        let read = |path: &Path| fs::read_to_string(path).map_err(io_error("reading the test CA"));
        let ca_key = rcgen::KeyPair::from_pem(&read(&self.ca_key)?).map_err(failed)?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&read(&self.ca)?, ca_key).map_err(failed)?;
        let key = rcgen::KeyPair::generate().map_err(failed)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, user);
        let certificate = params.signed_by(&key, &issuer).map_err(failed)?;
        let dir = self.ca.parent().unwrap_or(Path::new("."));
        let (cert_path, key_path) = (
            dir.join(format!("client-{user}.pem")),
            dir.join(format!("client-{user}-key.pem")),
        );
        fs::write(&cert_path, certificate.pem()).map_err(io_error("writing a test certificate"))?;
        fs::write(&key_path, key.serialize_pem()).map_err(io_error("writing a test key"))?;
        Ok((cert_path, key_path))
    }
}

/// A running (or stopped) etcd member of its own one-node cluster.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    /// Set when etcd serves TLS and requires client certificates.
    pub tls: Option<EtcdTlsFiles>,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    work_dir: PathBuf,
    name: String,
    /// `--initial-cluster` when this is one member of several; else a cluster of itself.
    initial_cluster: Option<String>,
    /// Command prefix that etcd, etcdctl and meshctl run under (e.g. a network namespace's
    /// `nsenter`); empty: this process's namespace.
    launcher: Vec<String>,
    /// The address clients reach it at (`127.0.0.1` unless started in a namespace).
    host: String,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers.
    pub fn start() -> Result<Self, HarnessError> {
        Self::start_with(false)
    }

    /// Starts etcd serving TLS on its client port, with `--client-cert-auth` (certificates
    /// made for this server by [`EtcdTlsFiles::generate`]).
    pub fn start_tls() -> Result<Self, HarnessError> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Result<Self, HarnessError> {
        let mut server = Self::prepare(tls)?;
        server.spawn()?;
        Ok(server)
    }

    /// Starts etcd (plain HTTP) inside `node`'s network namespace, serving clients on
    /// `node.address`: every namespace that routes to that address reaches it. etcdctl and
    /// meshctl run in that namespace too.
    pub fn start_in(node: &crate::netns::NetNode) -> Result<Self, HarnessError> {
        let mut server = Self::prepare(false)?;
        server.launcher = node.launcher();
        server.host = node.address.to_string();
        server.spawn()?;
        Ok(server)
    }

    /// Starts a cluster of `members` etcd members on loopback (plain HTTP), and waits until
    /// every member answers. Each member can be stopped and started again on its own.
    pub fn start_cluster(members: usize) -> Result<Vec<Self>, HarnessError> {
        let mut servers = (0..members)
            .map(|_| Self::prepare(false))
            .collect::<Result<Vec<_>, _>>()?;
        let initial_cluster = servers
            .iter()
            .map(|server| format!("{}=http://127.0.0.1:{}", server.name, server.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for server in &mut servers {
            server.initial_cluster = Some(initial_cluster.clone());
            server.launch()?;
        }
        for server in &mut servers {
            server.wait_healthy()?;
        }
        Ok(servers)
    }

    fn prepare(tls: bool) -> Result<Self, HarnessError> {
        let name = unique_name("etcd");
        let work_dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&work_dir).map_err(io_error("creating etcd's work folder"))?;
        let tls = if tls {
            Some(EtcdTlsFiles::generate(&work_dir)?)
        } else {
            None
        };
        Ok(EtcdServer {
            child: None,
            tls,
            client_port: free_port()?,
            peer_port: free_port()?,
            data_dir: work_dir.join("data"),
            log_path: work_dir.join("etcd.log"),
            work_dir,
            name,
            initial_cluster: None,
            launcher: Vec::new(),
            host: "127.0.0.1".to_owned(),
        })
    }

    /// The client URL, `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.client_port)
    }

    /// Client TLS flags shared by etcdctl and meshctl (`--cacert`/`--etcd-ca` spelling aside).
    fn client_tls_args(&self, ca: &str, cert: &str, key: &str) -> Vec<String> {
        match &self.tls {
            Some(files) => vec![
                format!("{ca}={}", files.ca.display()),
                format!("{cert}={}", files.client_cert.display()),
                format!("{key}={}", files.client_key.display()),
            ],
            None => Vec::new(),
        }
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        self.launch()?;
        self.wait_healthy()
    }

    fn launch(&mut self) -> Result<(), HarnessError> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io_error("opening etcd's log"))?;
        let log_err = log
            .try_clone()
            .map_err(io_error("duplicating etcd's log"))?;
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = self.command("etcd");
        if let Some(files) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&files.server_cert)
                .arg("--key-file")
                .arg(&files.server_key)
                .arg("--trusted-ca-file")
                .arg(&files.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.endpoint()])
            .args(["--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args([
                "--initial-cluster",
                &self
                    .initial_cluster
                    .clone()
                    .unwrap_or_else(|| format!("{}={peer}", self.name)),
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io_error(
                "starting etcd (install it with `cargo xtask setup`: Debian's etcd-server)",
            ))?;
        self.child = Some(child);
        Ok(())
    }

    /// `program` under this server's launcher.
    fn command(&self, program: &str) -> Command {
        match self.launcher.split_first() {
            Some((launcher, args)) => {
                let mut command = Command::new(launcher);
                command.args(args).arg(program);
                command
            }
            None => Command::new(program),
        }
    }

    fn wait_healthy(&mut self) -> Result<(), HarnessError> {
        let start = Instant::now();
        loop {
            if self.etcdctl(&["endpoint", "health"]).is_ok() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if exited.is_some() || start.elapsed() > Duration::from_secs(30) {
                return Err(HarnessError::CommandFailed {
                    command: "etcd".into(),
                    output: format!("did not become healthy; its log:\n{}", self.log()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// etcd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Kills etcd (an outage); the data folder stays for [`start_again`](Self::start_again).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports with the same data.
    pub fn start_again(&mut self) -> Result<(), HarnessError> {
        self.stop();
        self.spawn()
    }

    /// Runs `etcdctl` against this server; stdout on success.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, HarnessError> {
        let output = self
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint())
            .args(["--dial-timeout", "1s", "--command-timeout", "5s"])
            .args(self.client_tls_args("--cacert", "--cert", "--key"))
            .args(args)
            .output()
            .map_err(io_error("running etcdctl (Debian's etcd-client)"))?;
        if !output.status.success() {
            return Err(HarnessError::CommandFailed {
                command: format!("etcdctl {}", args.join(" ")),
                output: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Every key under `prefix`, in key order.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>, HarnessError> {
        Ok(self
            .etcdctl(&["get", "--prefix", prefix, "--keys-only"])?
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// The store's current revision.
    pub fn revision(&self) -> Result<i64, HarnessError> {
        let text = self.etcdctl(&["endpoint", "status", "-w", "json"])?;
        let status: serde_json::Value =
            serde_json::from_str(&text).map_err(|error| HarnessError::CommandFailed {
                command: "etcdctl endpoint status -w json".into(),
                output: format!("{error}: {text}"),
            })?;
        status[0]["Status"]["header"]["revision"]
            .as_i64()
            .ok_or_else(|| HarnessError::CommandFailed {
                command: "etcdctl endpoint status -w json".into(),
                output: format!("no revision in {text}"),
            })
    }

    /// Compacts the history up to the current revision (`etcdctl compact`); returns it.
    pub fn compact(&self) -> Result<i64, HarnessError> {
        let revision = self.revision()?;
        self.etcdctl(&["compact", &revision.to_string(), "--physical"])?;
        Ok(revision)
    }

    /// Runs `meshctl` with `--etcd` pointing here.
    pub fn meshctl(&self, args: &[&str]) -> Result<Output, HarnessError> {
        let tls = self.client_tls_args("--etcd-ca", "--etcd-cert", "--etcd-key");
        let mut all: Vec<&str> = tls.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        let binary = meshctl_binary()?;
        run_meshctl(
            self.command(&binary.to_string_lossy()),
            &self.endpoint(),
            &all,
        )
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- etcd log ({}) ----\n{}",
                self.log_path.display(),
                tail(&self.log(), 40)
            );
        }
        self.stop();
        let _ = fs::remove_dir_all(&self.work_dir);
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Path of the `meshctl` binary: `$MESHCTL_BIN`, or the one next to this executable.
pub fn meshctl_binary() -> Result<PathBuf, HarnessError> {
    let path = std::env::var_os("MESHCTL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_profile_dir().join("meshctl"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::MissingBinary(path))
    }
}

/// Runs `meshctl --etcd ENDPOINT ARGS...` and returns its output (whatever the exit code).
pub fn meshctl(endpoint: &str, args: &[&str]) -> Result<Output, HarnessError> {
    run_meshctl(Command::new(meshctl_binary()?), endpoint, args)
}

fn run_meshctl(
    mut command: Command,
    endpoint: &str,
    args: &[&str],
) -> Result<Output, HarnessError> {
    command
        .arg("--etcd")
        .arg(endpoint)
        .args(args)
        .env_remove("MESH_ETCD")
        .env_remove("MESH_PREFIX")
        .stdin(Stdio::null())
        .output()
        .map_err(io_error("running meshctl"))
}

/// The agent side of etcd mode, for [`crate::AgentProcess::start_with_etcd`].
#[derive(Debug, Clone)]
pub struct AgentEtcd {
    /// Client URL(s), comma-separated.
    pub endpoint: String,
    /// TLS to etcd (CA, client certificate and key), when the server has it.
    pub tls: Option<EtcdTlsFiles>,
    pub cache_file: PathBuf,
    pub dial_timeout: Duration,
    pub debounce: Duration,
    pub lease_ttl: Duration,
}

impl AgentEtcd {
    /// Settings for `server`, with a cache file in `dir`.
    pub fn new(server: &EtcdServer, dir: &Path) -> Self {
        AgentEtcd {
            endpoint: server.endpoint(),
            tls: server.tls.clone(),
            cache_file: dir.join("etcd-cache.json"),
            dial_timeout: Duration::from_secs(1),
            debounce: Duration::from_millis(20),
            lease_ttl: Duration::from_secs(5),
        }
    }

    /// The `spec.etcd` section of an agent config (YAML, indented for `spec:`).
    pub fn yaml(&self) -> String {
        let quote = |text: &str| serde_json::Value::String(text.to_owned()).to_string();
        let mut yaml = format!(
            "  etcd:\n    endpoints: [{}]\n    cacheFile: {}\n    dialTimeout: {}ms\n    debounce: {}ms\n    leaseTtl: {}s\n",
            self.endpoint
                .split(',')
                .map(quote)
                .collect::<Vec<_>>()
                .join(", "),
            quote(&self.cache_file.to_string_lossy()),
            self.dial_timeout.as_millis(),
            self.debounce.as_millis(),
            self.lease_ttl.as_secs()
        );
        if let Some(files) = &self.tls {
            yaml.push_str(&format!(
                "    tls:\n      caFile: {}\n      certFile: {}\n      keyFile: {}\n",
                quote(&files.ca.to_string_lossy()),
                quote(&files.client_cert.to_string_lossy()),
                quote(&files.client_key.to_string_lossy())
            ));
        }
        yaml
    }
}
