//! A small Kubernetes API client for what the agent needs and nothing more: list and watch
//! pods over HTTPS with the service account's bearer token (re-read for every request, since
//! projected tokens rotate), trusting only the configured CA. Responses are bounded in size.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Largest list response accepted (a node's pods, with their specs).
pub const MAX_LIST_BYTES: usize = 64 * 1024 * 1024;
/// Largest single watch event accepted.
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// Why the API server could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes API server address {0:?}: expected https://HOST[:PORT]")]
    Address(String),
    #[error("cannot read {what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "KUBERNETES_SERVICE_HOST is not set (not in a pod?): give the API server's https:// address"
    )]
    NotInCluster,
    #[error("the CA file {0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("TLS settings for the API server: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot reach the Kubernetes API server at {address}: {cause}")]
    Unreachable { address: String, cause: String },
    #[error("the Kubernetes API server answered {status} to {path}: {body}")]
    Status {
        status: u16,
        path: String,
        body: String,
    },
    #[error("the Kubernetes API server sent more than {limit} bytes for {path}")]
    TooLarge { path: String, limit: usize },
    #[error("cannot decode the API server's answer to {path}: {cause}")]
    Decode { path: String, cause: String },
}

/// Where the API server is and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeSettings {
    /// `https://host:port`.
    pub api_server: String,
    /// Bearer token file (the service account's projected token).
    pub token_file: PathBuf,
    /// PEM CA certificate(s) of the API server.
    pub ca_file: PathBuf,
    /// Time allowed to connect and get response headers.
    pub request_timeout: Duration,
}

/// A client for the API server. Cheap to clone.
#[derive(Clone)]
pub struct KubeClient {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    token_file: PathBuf,
    request_timeout: Duration,
}

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeClient")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl KubeClient {
    /// Reads the CA and checks the address; does not connect.
    pub fn new(settings: &KubeSettings) -> Result<Self, KubeError> {
        let rest = settings
            .api_server
            .strip_prefix("https://")
            .ok_or_else(|| KubeError::Address(settings.api_server.clone()))?
            .trim_end_matches('/');
        let (host, port) =
            split_host_port(rest).ok_or_else(|| KubeError::Address(settings.api_server.clone()))?;
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| KubeError::Address(settings.api_server.clone()))?;
        let ca = std::fs::read(&settings.ca_file).map_err(|source| KubeError::File {
            what: "the API server's CA file",
            path: settings.ca_file.clone(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(&ca).flatten() {
            roots.add(certificate)?;
        }
        if roots.is_empty() {
            return Err(KubeError::NoCertificate(settings.ca_file.clone()));
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(KubeClient {
            host,
            port,
            server_name,
            connector: TlsConnector::from(Arc::new(config)),
            token_file: settings.token_file.clone(),
            request_timeout: settings.request_timeout,
        })
    }

    fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Sends `GET path` and returns the response once its headers arrived (2xx only).
    async fn get(&self, path: &str) -> Result<hyper::Response<Incoming>, KubeError> {
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|source| KubeError::File {
                what: "the service account token",
                path: self.token_file.clone(),
                source,
            })?;
        let unreachable = |cause: String| KubeError::Unreachable {
            address: self.address(),
            cause,
        };
        let exchange = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|error| unreachable(error.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let tls = self
                .connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|error| unreachable(format!("TLS: {error}")))?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|error| unreachable(error.to_string()))?;
            tokio::spawn(async move {
                // The connection ends with the response body (or an error the body reports).
                let _ = connection.await;
            });
            let request = hyper::Request::get(path)
                .header(hyper::header::HOST, self.address())
                .header(
                    hyper::header::AUTHORIZATION,
                    format!("Bearer {}", token.trim()),
                )
                .header(hyper::header::ACCEPT, "application/json")
                .header(hyper::header::USER_AGENT, "mesh-agent")
                .body(Empty::<Bytes>::new())
                .map_err(|error| unreachable(error.to_string()))?;
            sender
                .send_request(request)
                .await
                .map_err(|error| unreachable(error.to_string()))
        };
        let response = tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.request_timeout)))??;
        let status = response.status();
        if !status.is_success() {
            let body = Limited::new(response.into_body(), 4096)
                .collect()
                .await
                .map(|body| String::from_utf8_lossy(&body.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(KubeError::Status {
                status: status.as_u16(),
                path: path.to_owned(),
                body,
            });
        }
        Ok(response)
    }

    /// `GET path`, the whole JSON body decoded (at most [`MAX_LIST_BYTES`]).
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, KubeError> {
        let response = self.get(path).await?;
        let body = Limited::new(response.into_body(), MAX_LIST_BYTES)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<http_body_util::LengthLimitError>() {
                    KubeError::TooLarge {
                        path: path.to_owned(),
                        limit: MAX_LIST_BYTES,
                    }
                } else {
                    KubeError::Unreachable {
                        address: self.address(),
                        cause: error.to_string(),
                    }
                }
            })?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|error| KubeError::Decode {
            path: path.to_owned(),
            cause: error.to_string(),
        })
    }

    /// `GET path` of a watch: a stream of newline-separated JSON events.
    pub async fn watch(&self, path: &str) -> Result<EventLines, KubeError> {
        let response = self.get(path).await?;
        Ok(EventLines {
            body: response.into_body(),
            buffer: BytesMut::new(),
            path: path.to_owned(),
        })
    }
}

/// The lines of a watch response, one event each.
#[derive(Debug)]
pub struct EventLines {
    body: Incoming,
    buffer: BytesMut,
    path: String,
}

impl EventLines {
    /// The next complete line; `None` when the server ended the watch.
    pub async fn next_line(&mut self) -> Result<Option<Bytes>, KubeError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line = self.buffer.split_to(end + 1).freeze();
                let line = line.slice(..end);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(line));
            }
            if self.buffer.len() > MAX_EVENT_BYTES {
                return Err(KubeError::TooLarge {
                    path: self.path.clone(),
                    limit: MAX_EVENT_BYTES,
                });
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                Some(Err(error)) => {
                    return Err(KubeError::Decode {
                        path: self.path.clone(),
                        cause: error.to_string(),
                    });
                }
                None => return Ok(None),
            }
        }
    }
}

/// `host:port`, `[v6]:port` or `host` (port 443).
fn split_host_port(text: &str) -> Option<(String, u16)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if after.is_empty() => 443,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            Some((host.to_owned(), port.parse().ok().filter(|p| *p != 0)?))
        }
        None if !text.is_empty() && !text.contains('/') => Some((text.to_owned(), 443)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_server_addresses_split_into_host_and_port() {
        assert_eq!(
            split_host_port("10.96.0.1:443"),
            Some(("10.96.0.1".into(), 443))
        );
        assert_eq!(
            split_host_port("kubernetes.default.svc"),
            Some(("kubernetes.default.svc".into(), 443))
        );
        assert_eq!(
            split_host_port("[fd00::1]:6443"),
            Some(("fd00::1".into(), 6443))
        );
        assert_eq!(split_host_port("[fd00::1]"), Some(("fd00::1".into(), 443)));
        assert_eq!(split_host_port("host:0"), None);
        assert_eq!(split_host_port("host:x"), None);
        assert_eq!(split_host_port(""), None);
        assert_eq!(split_host_port("a/b"), None);
    }

    #[test]
    fn plain_http_and_unreadable_cas_are_refused_with_the_reason() {
        let settings = KubeSettings {
            api_server: "http://10.96.0.1:443".into(),
            token_file: "/nonexistent/token".into(),
            ca_file: "/nonexistent/ca.crt".into(),
            request_timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            KubeClient::new(&settings),
            Err(KubeError::Address(_))
        ));
        let settings = KubeSettings {
            api_server: "https://10.96.0.1".into(),
            ..settings
        };
        let error = KubeClient::new(&settings).unwrap_err().to_string();
        assert!(error.contains("/nonexistent/ca.crt"), "{error}");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "nothing").unwrap();
        let settings = KubeSettings {
            ca_file: ca,
            ..settings
        };
        assert!(matches!(
            KubeClient::new(&settings),
            Err(KubeError::NoCertificate(_))
        ));
    }
}
