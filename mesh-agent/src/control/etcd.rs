//! The connection to etcd: endpoint checks, one lazily connecting client (requests made while
//! etcd is away fail after a bounded time instead of hanging), errors classified into
//! "unreachable" (retry, serve the last good state, exit code 4) and the rest, and a consistent
//! listing of several kinds at one revision.

use std::{
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions, Txn, TxnOp,
    TxnOpResponse,
};

use crate::policy::Kind;

use super::keys;

/// Largest listing accepted from etcd (gRPC's default, 4 MiB, is about 7k resources): the
/// whole mesh is listed in one response at start and after a compaction.
const MAX_LISTING_BYTES: usize = 512 * 1024 * 1024;

/// Where etcd is and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// Client URLs, `http://host:port` (or `host:port`).
    pub endpoints: Vec<String>,
    /// Key prefix, `/mesh/v1` by default.
    pub prefix: String,
    /// Time allowed to open a connection.
    pub dial_timeout: Duration,
    /// Time allowed for one request (a connection included).
    pub request_timeout: Duration,
    /// TLS to etcd (`https://` endpoints); `None` for plain `http://`.
    pub tls: Option<EtcdTls>,
}

/// TLS settings for etcd: the CA that signed etcd's serving certificate, and a client
/// certificate when etcd requires one (`--client-cert-auth`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EtcdTls {
    /// PEM file with the CA certificate(s) to trust for etcd's server certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate (chain), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Name to verify in etcd's certificate instead of the endpoint's host.
    pub server_name: Option<String>,
}

impl EtcdTls {
    /// Reads the files into etcd-client's TLS options; the error names the file and the fix.
    fn options(&self) -> Result<TlsOptions, EtcdError> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path).map_err(|error| EtcdError::Tls {
                problem: format!("cannot read the etcd {what} {}: {error}", path.display()),
            })
        };
        let ca = read(&self.ca_file, "CA file")?;
        if !String::from_utf8_lossy(&ca).contains("-----BEGIN CERTIFICATE-----") {
            return Err(EtcdError::Tls {
                problem: format!(
                    "the etcd CA file {} holds no PEM certificate",
                    self.ca_file.display()
                ),
            });
        }
        let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let identity =
                    Identity::from_pem(read(cert, "client certificate")?, read(key, "client key")?);
                options = options.identity(identity);
            }
            (None, None) => {}
            _ => {
                return Err(EtcdError::Tls {
                    problem: "an etcd client certificate needs both its certificate file and its \
                              key file"
                        .to_owned(),
                });
            }
        }
        if let Some(name) = &self.server_name {
            options = options.domain_name(name.clone());
        }
        Ok(options)
    }
}

impl EtcdSettings {
    /// Settings for `endpoints` with the default prefix and timeouts.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdSettings {
            endpoints,
            prefix: keys::DEFAULT_PREFIX.to_owned(),
            dial_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            tls: None,
        }
    }

    fn endpoint_list(&self) -> String {
        self.endpoints.join(",")
    }
}

/// What went wrong talking to etcd.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    /// No answer: etcd is down, the address is wrong, or the network is in the way.
    #[error(
        "cannot reach etcd at {endpoints} ({what}): {cause}. Is etcd running, and is this its \
         client URL? Set it with --etcd or MESH_ETCD (meshctl), spec.etcd.endpoints (agent)"
    )]
    Unreachable {
        endpoints: String,
        what: String,
        cause: String,
    },
    /// etcd answered with an error.
    #[error("etcd at {endpoints} refused {what}: {cause}")]
    Failed {
        endpoints: String,
        what: String,
        cause: String,
    },
    /// An endpoint that cannot be used.
    #[error("invalid etcd endpoint {endpoint:?}: {problem}")]
    Endpoint { endpoint: String, problem: String },
    /// TLS settings that cannot be used.
    #[error("etcd TLS: {problem}")]
    Tls { problem: String },
}

impl EtcdError {
    /// True when etcd could not be reached (as opposed to refusing a request).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, EtcdError::Unreachable { .. })
    }
}

/// Why an endpoint cannot be used, if it cannot. `tls` says whether TLS settings are given:
/// `https://` needs them (the CA to trust), `http://` must not have them (a plaintext
/// endpoint with TLS settings is a mistake that would silently send secrets in clear).
pub fn endpoint_problem(endpoint: &str, tls: bool) -> Option<String> {
    let rest = if let Some(rest) = endpoint.strip_prefix("https://") {
        if !tls {
            return Some(
                "an https:// endpoint needs TLS settings: the CA that signed etcd's certificate \
                 (spec.etcd.tls.caFile, or meshctl --etcd-ca)"
                    .to_owned(),
            );
        }
        rest
    } else if let Some(rest) = endpoint.strip_prefix("http://") {
        if tls {
            return Some(
                "TLS settings are given but this endpoint is plain http://: use https://"
                    .to_owned(),
            );
        }
        rest
    } else {
        endpoint
    };
    let rest = rest.trim_end_matches('/');
    let scheme = if tls { "https" } else { "http" };
    if rest.is_empty() || rest.contains('/') || rest.contains("://") {
        return Some(format!("expected {scheme}://HOST:PORT"));
    }
    let port = rest.rsplit_once(':').map(|(_, port)| port);
    match port.map(str::parse::<u16>) {
        Some(Ok(port)) if port != 0 => None,
        _ => Some(format!(
            "expected {scheme}://HOST:PORT with a port (etcd's client port is 2379)"
        )),
    }
}

/// One key as listed or watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    /// Lease the key is attached to (0 for none).
    pub lease: i64,
}

impl RawEntry {
    fn from_kv(kv: &etcd_client::KeyValue) -> Option<Self> {
        Some(RawEntry {
            key: kv.key_str().ok()?.to_owned(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        })
    }
}

/// Keys of several kinds read at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The store's revision the listing reflects; watch from `revision + 1`.
    pub revision: i64,
    pub entries: Vec<RawEntry>,
}

/// A client for the control plane's keys. Cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    settings: EtcdSettings,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Etcd {
    /// Checks the endpoints and prepares a client. Connecting is lazy: this does not fail
    /// when etcd is down; the first request does (after the request timeout).
    pub async fn connect(settings: EtcdSettings) -> Result<Self, EtcdError> {
        if settings.endpoints.is_empty() {
            return Err(EtcdError::Endpoint {
                endpoint: String::new(),
                problem: "no endpoint given".to_owned(),
            });
        }
        for endpoint in &settings.endpoints {
            if let Some(problem) = endpoint_problem(endpoint, settings.tls.is_some()) {
                return Err(EtcdError::Endpoint {
                    endpoint: endpoint.clone(),
                    problem,
                });
            }
        }
        if let Some(problem) = keys::prefix_problem(&settings.prefix) {
            return Err(EtcdError::Endpoint {
                endpoint: settings.prefix.clone(),
                problem: format!("key prefix {problem}"),
            });
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(settings.dial_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &settings.tls {
            options = options.with_tls(tls.options()?);
        }
        let connect = Client::connect(&settings.endpoints, Some(options));
        let client = match tokio::time::timeout(settings.request_timeout, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => return Err(classify(&settings, "connecting", error)),
            Err(_) => {
                return Err(EtcdError::Unreachable {
                    endpoints: settings.endpoint_list(),
                    what: "connecting".to_owned(),
                    cause: format!("no answer within {:?}", settings.request_timeout),
                });
            }
        };
        Ok(Etcd { client, settings })
    }

    /// The settings this client was made with.
    pub fn settings(&self) -> &EtcdSettings {
        &self.settings
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.settings.prefix
    }

    /// A handle on the underlying client (shares the connection).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs one request within the request timeout and classifies its error.
    pub async fn call<T, F>(
        &self,
        what: &str,
        request: impl FnOnce(Client) -> F,
    ) -> Result<T, EtcdError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.settings.request_timeout, request(self.client())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(classify(&self.settings, what, error)),
            Err(_) => Err(EtcdError::Unreachable {
                endpoints: self.settings.endpoint_list(),
                what: what.to_owned(),
                cause: format!("no answer within {:?}", self.settings.request_timeout),
            }),
        }
    }

    /// An error of a request made outside [`Etcd::call`] (watch and lease streams).
    pub fn error(&self, what: &str, error: etcd_client::Error) -> EtcdError {
        classify(&self.settings, what, error)
    }

    /// Lists every key of `kinds` at one revision (one transaction).
    pub async fn list_kinds(&self, kinds: &[Kind]) -> Result<Listing, EtcdError> {
        let prefix = self.settings.prefix.clone();
        let operations: Vec<TxnOp> = kinds
            .iter()
            .map(|kind| {
                TxnOp::get(
                    keys::kind_prefix(&prefix, *kind),
                    Some(GetOptions::new().with_prefix()),
                )
            })
            .collect();
        let response = self
            .call("listing resources", |client| async move {
                client
                    .kv_client()
                    .max_decoding_message_size(MAX_LISTING_BYTES)
                    .txn(Txn::new().and_then(operations))
                    .await
            })
            .await?;
        let mut listing = Listing {
            revision: response.header().map_or(0, |header| header.revision()),
            entries: Vec::new(),
        };
        for operation in response.op_responses() {
            if let TxnOpResponse::Get(get) = operation {
                listing
                    .entries
                    .extend(get.kvs().iter().filter_map(RawEntry::from_kv));
            }
        }
        Ok(listing)
    }

    /// Lists every key under `prefix` (e.g. node records).
    pub async fn list_prefix(&self, prefix: &str) -> Result<Listing, EtcdError> {
        let key = prefix.to_owned();
        let response = self
            .call("listing keys", |client| async move {
                client
                    .kv_client()
                    .max_decoding_message_size(MAX_LISTING_BYTES)
                    .get(key, Some(GetOptions::new().with_prefix()))
                    .await
            })
            .await?;
        Ok(Listing {
            revision: response.header().map_or(0, |header| header.revision()),
            entries: response
                .kvs()
                .iter()
                .filter_map(RawEntry::from_kv)
                .collect(),
        })
    }

    /// Reads one key.
    pub async fn get(&self, key: &str) -> Result<Option<RawEntry>, EtcdError> {
        let key = key.to_owned();
        let response = self
            .call("reading a key", |mut client| async move {
                client.get(key, None).await
            })
            .await?;
        Ok(response.kvs().first().and_then(RawEntry::from_kv))
    }
}

/// Sorts an etcd client error into unreachable or failed.
fn classify(settings: &EtcdSettings, what: &str, error: etcd_client::Error) -> EtcdError {
    let endpoints = settings.endpoint_list();
    let unreachable = match &error {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        _ => false,
    };
    let cause = match &error {
        etcd_client::Error::GRpcStatus(status)
            if status.code() == tonic::Code::PermissionDenied =>
        {
            format!(
                "{:?}: {} (etcd authentication is on and this client's user, the common name \
                 of its certificate, has no role allowing it; roles are set with `meshctl rbac`)",
                status.code(),
                status.message()
            )
        }
        etcd_client::Error::GRpcStatus(status) => {
            format!("{:?}: {}", status.code(), status.message())
        }
        other => other.to_string(),
    };
    if unreachable {
        EtcdError::Unreachable {
            endpoints,
            what: what.to_owned(),
            cause,
        }
    } else {
        EtcdError::Failed {
            endpoints,
            what: what.to_owned(),
            cause,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert_eq!(endpoint_problem("http://127.0.0.1:2379", false), None);
        assert_eq!(endpoint_problem("127.0.0.1:2379", false), None);
        assert_eq!(endpoint_problem("http://etcd-1.example:2379/", false), None);
        assert_eq!(endpoint_problem("http://[::1]:2379", false), None);
        assert!(endpoint_problem("https://etcd:2379", false).is_some_and(|p| p.contains("TLS")));
        assert!(endpoint_problem("http://etcd", false).is_some());
        assert!(endpoint_problem("http://etcd:0", false).is_some());
        assert!(endpoint_problem("http://etcd:2379/v3", false).is_some());
        assert!(endpoint_problem("", false).is_some());
        // With TLS settings: https (or no scheme) only.
        assert_eq!(endpoint_problem("https://etcd:2379", true), None);
        assert_eq!(endpoint_problem("etcd:2379", true), None);
        assert!(endpoint_problem("http://etcd:2379", true).is_some_and(|p| p.contains("https")));
        assert!(endpoint_problem("https://etcd", true).is_some_and(|p| p.contains("https://")));
    }

    #[tokio::test]
    async fn unusable_tls_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = EtcdSettings::new(vec!["https://127.0.0.1:2379".to_owned()]);
        settings.tls = Some(EtcdTls {
            ca_file: dir.path().join("missing-ca.pem"),
            ..EtcdTls::default()
        });
        let error = Etcd::connect(settings.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing-ca.pem"), "{error}");

        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        settings.tls = Some(EtcdTls {
            ca_file: ca.clone(),
            ..EtcdTls::default()
        });
        let error = Etcd::connect(settings.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("no PEM certificate"), "{error}");

        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        settings.tls = Some(EtcdTls {
            ca_file: ca,
            cert_file: Some(dir.path().join("client.pem")),
            ..EtcdTls::default()
        });
        let error = Etcd::connect(settings).await.unwrap_err().to_string();
        assert!(error.contains("key file"), "{error}");
    }

    #[tokio::test]
    async fn an_absent_etcd_is_unreachable_within_the_timeout() {
        // A port nothing listens on: bind one, then close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .unwrap();
        let mut settings = EtcdSettings::new(vec![format!("http://127.0.0.1:{port}")]);
        settings.dial_timeout = Duration::from_millis(200);
        settings.request_timeout = Duration::from_millis(500);
        let etcd = Etcd::connect(settings).await.unwrap();
        let started = std::time::Instant::now();
        let error = etcd.list_kinds(&keys::SYNCED_KINDS).await.unwrap_err();
        assert!(error.is_unreachable(), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(error.to_string().contains("MESH_ETCD"), "{error}");
    }
}
