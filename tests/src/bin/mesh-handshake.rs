//! `mesh-handshake`: measures how many new node-to-node tunnel connections a node agent accepts
//! per second. Each connection is what a peer agent opens: TCP, TLS 1.3 with a client
//! certificate issued by the mesh CA (ECDSA P-256, no session resumption, so every handshake
//! is a full one), then the HTTP/2 connection preface and SETTINGS exchange; it is closed once
//! the server's SETTINGS arrive. The server's certificate is verified as a peer agent verifies
//! it: a chain to the trust bundle, and a node identity of the trust domain.
//!
//! Prints one JSON object: handshakes, failures, handshakes per second, latency p50/p99.

use std::{
    fs,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use clap::Parser;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
    StreamOwned,
    client::{
        Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime, pem::PemObject,
    },
    version::TLS13,
};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-handshake",
    about = "New mutual-TLS tunnel connections per second against a node agent's tunnel port"
)]
struct Args {
    /// The agent's tunnel listener (port 15008).
    #[arg(long)]
    to: SocketAddr,
    /// The mesh CA folder (`ca.pem`, `ca-key.pem`, `bundle.pem`), to issue the client
    /// certificate and trust the server's.
    #[arg(long)]
    ca_dir: PathBuf,
    #[arg(long)]
    trust_domain: String,
    /// Connections opened in parallel.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[arg(long, default_value_t = 3000)]
    duration_ms: u64,
}

/// The HTTP/2 client connection preface followed by an empty SETTINGS frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
/// Frame type of SETTINGS.
const SETTINGS: u8 = 0x4;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("{}", serde_json::json!({ "error": error }));
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<serde_json::Value, String> {
    let config = Arc::new(client_config(args)?);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency.max(1))
        .map(|_| {
            let (config, stop, to) = (Arc::clone(&config), Arc::clone(&stop), args.to);
            thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let begun = Instant::now();
                    match handshake(to, &config) {
                        Ok(()) => latencies.push(begun.elapsed().as_secs_f64() * 1e6),
                        Err(error) => failures.push(error.to_string()),
                    }
                }
                (latencies, failures)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(args.duration_ms));
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    for worker in workers {
        let (done, failed) = worker.join().map_err(|_| "a worker panicked".to_owned())?;
        latencies.extend(done);
        failures.extend(failed);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if latencies.is_empty() {
        return Err(format!(
            "no handshake completed; first failure: {}",
            failures.first().map_or("none", String::as_str)
        ));
    }
    latencies.sort_by(f64::total_cmp);
    let at = |quantile: f64| {
        let index = ((latencies.len() - 1) as f64 * quantile).round() as usize;
        latencies[index]
    };
    Ok(serde_json::json!({
        "handshakes": latencies.len(),
        "failures": failures.len(),
        "first_failure": failures.first(),
        "seconds": elapsed,
        "handshakes_per_second": latencies.len() as f64 / elapsed,
        "p50_us": at(0.5),
        "p99_us": at(0.99),
    }))
}

/// One tunnel connection: TCP, TLS, HTTP/2 preface and SETTINGS both ways, then close.
fn handshake(to: SocketAddr, config: &Arc<ClientConfig>) -> io::Result<()> {
    let tcp = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let name = ServerName::IpAddress(to.ip().into());
    let connection = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
    let mut tls = StreamOwned::new(connection, tcp);
    tls.write_all(PREFACE)?;
    tls.flush()?;
    // The server's first frame must be its SETTINGS.
    let mut header = [0u8; 9];
    tls.read_exact(&mut header)?;
    if header[3] != SETTINGS {
        return Err(io::Error::other(format!(
            "the server's first HTTP/2 frame has type {}, not SETTINGS",
            header[3]
        )));
    }
    let length =
        usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    let mut payload = vec![0u8; length];
    tls.read_exact(&mut payload)?;
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(())
}

fn client_config(args: &Args) -> Result<ClientConfig, String> {
    let read = |file: &str| {
        let path = args.ca_dir.join(file);
        fs::read_to_string(&path).map_err(|error| format!("reading {}: {error}", path.display()))
    };
    let ca_key = KeyPair::from_pem(&read("ca-key.pem")?).map_err(|error| error.to_string())?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.pem")?, ca_key)
        .map_err(|error| format!("the CA certificate: {error}"))?;
    let identity = format!("spiffe://{}/agent/handshake-bench", args.trust_domain);
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        identity
            .as_str()
            .try_into()
            .map_err(|error| format!("{error}"))?,
    )];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().map_err(|error| error.to_string())?;
    let certificate = params
        .signed_by(&key, &issuer)
        .map_err(|error| format!("issuing the client certificate: {error}"))?;
    let mut roots = RootCertStore::empty();
    for block in CertificateDer::pem_slice_iter(read("bundle.pem")?.as_bytes()) {
        let anchor = block.map_err(|error| format!("bundle.pem: {error}"))?;
        roots
            .add(anchor)
            .map_err(|error| format!("bundle.pem: {error}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(NodeVerifier {
        roots,
        node_prefix: format!("spiffe://{}/node/", args.trust_domain),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&TLS13])
        .map_err(|error| error.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(
            vec![certificate.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .map_err(|error| format!("the client certificate: {error}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// Verifies the server as a peer agent does: chain to the bundle, a node identity's URI SAN.
#[derive(Debug)]
struct NodeVerifier {
    roots: RootCertStore,
    node_prefix: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let certificate = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|error| rustls::Error::General(format!("server certificate: {error}")))?;
        certificate
            .verify_for_usage(
                self.algorithms.all,
                &self.roots.roots,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .map_err(|error| rustls::Error::General(format!("server chain: {error}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(end_entity)
            .map_err(|error| rustls::Error::General(format!("server certificate: {error}")))?;
        let is_node = parsed
            .subject_alternative_name()
            .ok()
            .flatten()
            .is_some_and(|names| {
                names.value.general_names.iter().any(|name| {
                    matches!(name, x509_parser::extensions::GeneralName::URI(uri)
                        if uri.starts_with(&self.node_prefix))
                })
            });
        if is_node {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server presents no {}<name> identity",
                self.node_prefix
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _certificate: &CertificateDer<'_>,
        _signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, certificate, signature, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
