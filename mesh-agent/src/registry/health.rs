//! Active health probes of registered instances: a TCP connect, or an HTTP/1.1 `GET` of the
//! path the instance registered (2xx and 3xx are healthy), within a timeout; and the
//! thresholds that turn probe results into a health state without flapping.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{config::HealthCheckSpec, policy::Health};

/// One probe: `Ok(())` healthy, `Err(reason)` not.
pub async fn probe(
    address: SocketAddr,
    path: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        let mut stream = TcpStream::connect(address)
            .await
            .map_err(|error| format!("connect to {address}: {error}"))?;
        let Some(path) = path else {
            return Ok(());
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: mesh-agent-health\r\n\
             Connection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|error| format!("GET {path}: {error}"))?;
        let mut head = [0u8; 64];
        let mut read = 0;
        while read < 12 {
            let n = stream
                .read(&mut head[read..])
                .await
                .map_err(|error| format!("GET {path}: {error}"))?;
            if n == 0 {
                break;
            }
            read += n;
        }
        match parse_status(&head[..read]) {
            Some(status) if (200..400).contains(&status) => Ok(()),
            Some(status) => Err(format!("GET {path}: status {status}")),
            None => Err(format!("GET {path}: not an HTTP response")),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer from {address} within {timeout:?}")),
    }
}

/// The status code of an HTTP/1.x status line.
pub fn parse_status(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head.get(..12)?).ok()?;
    let rest = text.strip_prefix("HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.as_bytes().get(1) != Some(&b' ') {
        return None;
    }
    code.parse().ok()
}

/// Probe results folded into a health state: `unhealthy_threshold` failures in a row turn an
/// instance unhealthy, `healthy_threshold` successes in a row turn it healthy. The first
/// result decides at once (an instance is not left `Unknown` for several intervals).
#[derive(Debug, Clone)]
pub struct HealthTracker {
    health: Health,
    successes: u32,
    failures: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl HealthTracker {
    pub fn new(spec: &HealthCheckSpec) -> Self {
        HealthTracker {
            health: Health::Unknown,
            successes: 0,
            failures: 0,
            healthy_threshold: spec.healthy_threshold.max(1),
            unhealthy_threshold: spec.unhealthy_threshold.max(1),
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Folds one result in; returns the new health when it changed.
    pub fn record(&mut self, healthy: bool) -> Option<Health> {
        if healthy {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        let next = match self.health {
            Health::Unknown if healthy => Health::Healthy,
            Health::Unknown => Health::Unhealthy,
            Health::Unhealthy if self.successes >= self.healthy_threshold => Health::Healthy,
            Health::Healthy if self.failures >= self.unhealthy_threshold => Health::Unhealthy,
            current => current,
        };
        (next != self.health).then(|| {
            self.health = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(parse_status(b"HTTP/1.1 20"), None);
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH_9.2"), None);
        assert_eq!(parse_status(b""), None);
    }

    #[test]
    fn thresholds_hold_off_flapping() {
        let spec = HealthCheckSpec {
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            ..HealthCheckSpec::default()
        };
        let mut tracker = HealthTracker::new(&spec);
        assert_eq!(tracker.record(true), Some(Health::Healthy));
        assert_eq!(tracker.record(false), None);
        assert_eq!(tracker.record(false), None);
        assert_eq!(tracker.record(true), None);
        assert_eq!(tracker.record(false), None);
        assert_eq!(tracker.record(false), None);
        assert_eq!(tracker.record(false), Some(Health::Unhealthy));
        assert_eq!(tracker.record(true), None);
        assert_eq!(tracker.record(true), Some(Health::Healthy));
        let mut fresh = HealthTracker::new(&spec);
        assert_eq!(fresh.record(false), Some(Health::Unhealthy));
    }

    #[tokio::test]
    async fn probes_tcp_and_http() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for status in ["200 OK", "500 Internal Server Error"] {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buffer = [0u8; 512];
                let _ = stream.read(&mut buffer).await.unwrap();
                let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                stream.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let timeout = Duration::from_secs(5);
        assert_eq!(probe(address, Some("/healthz"), timeout).await, Ok(()));
        let error = probe(address, Some("/healthz"), timeout).await.unwrap_err();
        assert!(error.contains("status 500"), "{error}");
        server.await.unwrap();
        // Nothing listens any more: the connect fails.
        assert!(probe(address, None, timeout).await.is_err());
    }
}
