//! The certificate signer for tests: `mesh-agent ca init` in a folder of its own, then
//! `mesh-agent ca run` against a real etcd (optionally inside a test network namespace),
//! killed on drop, its log printed when the test fails.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    HarnessError, KillOnDrop, TempDir, etcd::EtcdServer, io_error, mesh_agent_binary,
    netns::NetNode,
};

/// How the signer runs.
#[derive(Debug, Clone, Copy)]
pub struct SignerOptions<'a> {
    pub trust_domain: &'a str,
    /// `--certificate-ttl`, e.g. `"1h"`.
    pub certificate_ttl: &'a str,
    /// More `ca run` arguments.
    pub extra: &'a [&'a str],
    /// Run `ca run` inside this network namespace (etcd must be reachable from there).
    pub namespace: Option<&'a NetNode>,
}

/// A running `mesh-agent ca run`.
#[derive(Debug)]
pub struct SignerProcess {
    process: Option<KillOnDrop>,
    log: PathBuf,
    /// The CA folder (`ca-key.pem`, `ca.pem`, `bundle.pem`).
    pub dir: PathBuf,
    _work: TempDir,
}

impl SignerProcess {
    /// Makes a CA, starts the signer and waits until it runs.
    pub fn start(etcd: &EtcdServer, options: SignerOptions<'_>) -> Result<Self, HarnessError> {
        let binary = mesh_agent_binary()?;
        let work = TempDir::new("signer")?;
        let dir = work.path().join("ca");
        let output = Command::new(&binary)
            .args([
                "ca",
                "init",
                "--trust-domain",
                options.trust_domain,
                "--dir",
            ])
            .arg(&dir)
            .output()
            .map_err(io_error("running mesh-agent ca init"))?;
        if !output.status.success() {
            return Err(HarnessError::CommandFailed {
                command: "mesh-agent ca init".into(),
                output: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        let log = work.path().join("signer.log");
        let file = fs::File::create(&log).map_err(io_error("creating the signer's log"))?;
        let file_err = file
            .try_clone()
            .map_err(io_error("duplicating the signer's log"))?;
        let mut command = match options.namespace {
            Some(node) => node.command(&binary.to_string_lossy()),
            None => Command::new(&binary),
        };
        let child = command
            .args(["ca", "run", "--etcd", &etcd.endpoint(), "--resync", "1s"])
            .args(options.extra)
            .args(["--certificate-ttl", options.certificate_ttl, "--dir"])
            .arg(&dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file_err)
            .spawn()
            .map_err(io_error("starting mesh-agent ca run"))?;
        let signer = SignerProcess {
            process: Some(KillOnDrop(child)),
            log,
            dir,
            _work: work,
        };
        signer.wait_for_log("signer running", Duration::from_secs(60))?;
        Ok(signer)
    }

    /// The signer's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> Result<(), HarnessError> {
        let start = Instant::now();
        while !self.log().contains(text) {
            if start.elapsed() > timeout {
                return Err(HarnessError::CommandFailed {
                    command: "mesh-agent ca run".into(),
                    output: format!("no {text:?} within {timeout:?}; its log:\n{}", self.log()),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for SignerProcess {
    fn drop(&mut self) {
        self.process.take();
        if std::thread::panicking() {
            eprintln!("---- signer log ----\n{}", self.log());
        }
    }
}
