//! The tunnel over loopback with real rustls on both sides: a client pool on "node-a", a
//! server on "node-b" delivering to a local echo target.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
    task::JoinHandle,
};

use super::{
    Peer, TunnelClient, TunnelError, TunnelServer, TunnelSettings, TunnelStats,
    testing::{TestCa, TestCredentials},
};
use crate::{
    identity::SpiffeId,
    policy::{Action, PolicySnapshot, PolicyStore, parse_documents},
};

const TD: &str = "mesh.test";
const EOF_MARK: &[u8] = b"<eof>";

/// Echoes every chunk; at end of input writes [`EOF_MARK`] and closes its side.
async fn echo_target() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buffer).await {
                        Ok(0) => {
                            let _ = stream.write_all(EOF_MARK).await;
                            let _ = stream.shutdown().await;
                            return;
                        }
                        Ok(read) => {
                            if stream.write_all(&buffer[..read]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    address
}

fn unused_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Node B's registry: `echo` at `echo` and `closed` at a port nobody listens on, both on
/// node-b; only `client` may call them.
fn policy(echo: SocketAddr, closed: SocketAddr) -> Arc<PolicyStore> {
    let text = format!(
        r#"
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata: {{name: echo}}
spec:
  endpoints: [{{address: "{echo}", node: node-b}}]
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata: {{name: closed}}
spec:
  endpoints: [{{address: "{closed}", node: node-b}}]
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: echo-access}}
spec:
  targetAgent: echo
  action: Allow
  rules: [{{from: [client]}}]
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: closed-access}}
spec:
  targetAgent: closed
  action: Allow
  rules: [{{from: [client]}}]
"#
    );
    let report = parse_documents(&text, "test.yaml");
    assert!(report.is_clean(), "{:?}", report.errors);
    let snapshot = PolicySnapshot::compile(&report.resources(), Action::Allow).unwrap();
    Arc::new(PolicyStore::new(snapshot))
}

fn settings() -> TunnelSettings {
    TunnelSettings {
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(2),
        ..TunnelSettings::default()
    }
}

struct Server {
    address: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    stats: Arc<TunnelStats>,
}

impl Server {
    async fn start(ca: &Arc<TestCa>, policy: &Arc<PolicyStore>, bind: SocketAddr) -> Server {
        let listener = TcpListener::bind(bind).await.unwrap();
        let address = listener.local_addr().unwrap();
        let stats = Arc::new(TunnelStats::default());
        let server = Arc::new(TunnelServer::new(
            TestCredentials::new(ca, TD, "node-b"),
            Arc::clone(policy),
            "node-b",
            settings(),
            Arc::clone(&stats),
        ));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(server.serve(listener, stopped));
        Server {
            address,
            stop,
            task,
            stats,
        }
    }

    async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.task.await.unwrap();
    }

    fn peer(&self) -> Peer<'static> {
        Peer {
            node: "node-b",
            address: self.address,
        }
    }
}

struct Setup {
    ca: Arc<TestCa>,
    policy: Arc<PolicyStore>,
    echo: SocketAddr,
    closed: SocketAddr,
    server: Server,
    client: TunnelClient,
    client_stats: Arc<TunnelStats>,
}

async fn setup() -> Setup {
    let ca = TestCa::new();
    let echo = echo_target().await;
    let closed = unused_port();
    let policy = policy(echo, closed);
    let server = Server::start(&ca, &policy, "127.0.0.1:0".parse().unwrap()).await;
    let client_stats = Arc::new(TunnelStats::default());
    let client = TunnelClient::new(
        Some(TestCredentials::new(&ca, TD, "node-a")),
        settings(),
        Arc::clone(&client_stats),
    );
    Setup {
        ca,
        policy,
        echo,
        closed,
        server,
        client,
        client_stats,
    }
}

fn agent(name: &str) -> SpiffeId {
    SpiffeId::for_agent(TD, name).unwrap()
}

async fn read_exactly(stream: &mut super::TunnelStream, count: usize) -> Vec<u8> {
    let mut buffer = vec![0u8; count];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buffer))
        .await
        .expect("read timed out")
        .unwrap();
    buffer
}

#[tokio::test]
async fn bytes_flow_both_ways_and_half_close_reaches_each_side() {
    let setup = setup().await;
    let mut stream = setup
        .client
        .open(&agent("client"), setup.server.peer(), setup.echo)
        .await
        .unwrap();
    stream.write_all(b"ping").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 4).await, b"ping");
    // A large payload both ways, with backpressure on the way.
    let big: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let expected = big.clone();
    let writing = tokio::spawn(async move {
        writer.write_all(&big).await.unwrap();
        // Half-close: the target sees end of input, and can still answer.
        writer.shutdown().await.unwrap();
        writer
    });
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut received))
        .await
        .expect("read timed out")
        .unwrap();
    let _writer = writing.await.unwrap();
    assert_eq!(received.len(), expected.len() + EOF_MARK.len());
    assert_eq!(&received[..expected.len()], &expected[..]);
    assert_eq!(&received[expected.len()..], EOF_MARK);
    let server = setup.server.stats.snapshot();
    assert_eq!(server.server_connections, 1);
    assert_eq!(server.server_streams, 1);
    assert_eq!(setup.client_stats.snapshot().client_streams, 1);
}

#[tokio::test]
async fn many_concurrent_streams_share_one_connection() {
    let setup = setup().await;
    let client = Arc::new(setup.client);
    let mut tasks = Vec::new();
    for index in 0..64u32 {
        let client = Arc::clone(&client);
        let peer = setup.server.peer();
        let echo = setup.echo;
        tasks.push(tokio::spawn(async move {
            let mut stream = client.open(&agent("client"), peer, echo).await.unwrap();
            let message = format!("stream {index:04}");
            stream.write_all(message.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
            let mut received = Vec::new();
            stream.read_to_end(&mut received).await.unwrap();
            assert_eq!(received, [message.as_bytes(), EOF_MARK].concat());
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("stream timed out")
            .unwrap();
    }
    assert_eq!(client.connections(), 1);
    assert_eq!(setup.client_stats.snapshot().client_connections, 1);
    let server = setup.server.stats.snapshot();
    assert_eq!(server.server_connections, 1);
    assert_eq!(server.server_streams, 64);
}

#[tokio::test]
async fn a_peer_from_another_trust_domain_is_refused() {
    let setup = setup().await;
    let foreign = SpiffeId::for_agent("other.test", "client").unwrap();
    let client = TunnelClient::new(
        Some(TestCredentials::presenting(&setup.ca, TD, foreign)),
        settings(),
        Arc::new(TunnelStats::default()),
    );
    let error = client
        .open(&agent("client"), setup.server.peer(), setup.echo)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            TunnelError::Protocol { .. } | TunnelError::Tls { .. }
        ),
        "{error}"
    );
    let server = setup.server.stats.snapshot();
    assert_eq!(server.server_handshake_failures, 1);
    assert_eq!(server.server_connections, 0);
    assert_eq!(server.server_streams, 0);
}

#[tokio::test]
async fn a_target_not_registered_on_this_node_is_refused() {
    let setup = setup().await;
    // A loopback service of node B that no agent registered (say, its admin port), and an
    // address elsewhere: the tunnel is not a relay.
    let unregistered = echo_target().await;
    for target in [unregistered, "10.9.9.9:80".parse().unwrap()] {
        let error = setup
            .client
            .open(&agent("client"), setup.server.peer(), target)
            .await
            .unwrap_err();
        match &error {
            TunnelError::Denied { reason, .. } => {
                assert!(reason.contains("not an endpoint"), "{reason}")
            }
            other => panic!("expected a refusal, got {other}"),
        }
    }
    assert_eq!(setup.server.stats.snapshot().server_denied, 2);
    assert_eq!(setup.client_stats.snapshot().client_streams_refused, 2);
}

#[tokio::test]
async fn a_source_the_policy_denies_is_refused() {
    let setup = setup().await;
    let error = setup
        .client
        .open(&agent("intruder"), setup.server.peer(), setup.echo)
        .await
        .unwrap_err();
    match &error {
        TunnelError::Denied { reason, .. } => {
            assert!(
                reason.contains("no AccessPolicy rule allows intruder"),
                "{reason}"
            )
        }
        other => panic!("expected a refusal, got {other}"),
    }
    // The same connection pool still serves the allowed source.
    let mut stream = setup
        .client
        .open(&agent("client"), setup.server.peer(), setup.echo)
        .await
        .unwrap();
    stream.write_all(b"ok").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 2).await, b"ok");
}

#[tokio::test]
async fn a_target_that_refuses_is_a_bad_gateway() {
    let setup = setup().await;
    let error = setup
        .client
        .open(&agent("client"), setup.server.peer(), setup.closed)
        .await
        .unwrap_err();
    assert!(
        matches!(error, TunnelError::TargetUnreachable { .. }),
        "{error}"
    );
    assert_eq!(setup.server.stats.snapshot().server_target_failures, 1);
}

#[tokio::test]
async fn a_server_that_is_not_the_expected_node_is_refused() {
    let setup = setup().await;
    let wrong = Peer {
        node: "node-c",
        address: setup.server.address,
    };
    let error = setup
        .client
        .open(&agent("client"), wrong, setup.echo)
        .await
        .unwrap_err();
    match &error {
        TunnelError::PeerIdentity {
            presented,
            expected,
            ..
        } => {
            assert_eq!(presented, "spiffe://mesh.test/node/node-b");
            assert_eq!(expected, "spiffe://mesh.test/node/node-c");
        }
        other => panic!("expected an identity mismatch, got {other}"),
    }
}

#[tokio::test]
async fn without_credentials_nothing_goes_out() {
    let setup = setup().await;
    let client = TunnelClient::new(None, settings(), Arc::new(TunnelStats::default()));
    let error = client
        .open(&agent("client"), setup.server.peer(), setup.echo)
        .await
        .unwrap_err();
    assert!(matches!(error, TunnelError::NoCredentials), "{error}");
    assert_eq!(setup.server.stats.snapshot().server_connections, 0);
}

#[tokio::test]
async fn an_unreachable_peer_fails_fast_with_a_clear_error() {
    let setup = setup().await;
    let nowhere = Peer {
        node: "node-b",
        address: unused_port(),
    };
    let error = setup
        .client
        .open(&agent("client"), nowhere, setup.echo)
        .await
        .unwrap_err();
    assert!(matches!(error, TunnelError::Connect { .. }), "{error}");
    assert!(error.to_string().contains("node node-b"), "{error}");
}

#[tokio::test]
async fn the_client_reconnects_after_the_server_restarts() {
    let setup = setup().await;
    let source = agent("client");
    let peer = setup.server.peer();
    let mut stream = setup.client.open(&source, peer, setup.echo).await.unwrap();
    stream.write_all(b"one").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 3).await, b"one");
    drop(stream);
    let address = setup.server.address;
    setup.server.shutdown().await;
    let restarted = Server::start(&setup.ca, &setup.policy, address).await;
    let mut stream = setup
        .client
        .open(&source, restarted.peer(), setup.echo)
        .await
        .unwrap();
    stream.write_all(b"two").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 3).await, b"two");
    assert_eq!(setup.client_stats.snapshot().client_connections, 2);
    assert_eq!(restarted.stats.snapshot().server_connections, 1);
}

#[tokio::test]
async fn requests_other_than_connect_get_405() {
    let setup = setup().await;
    let credentials = TestCredentials::new(&setup.ca, TD, "node-a");
    let config = crate::identity::TlsCredentials::client_config(&*credentials, &agent("client"))
        .await
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(setup.server.address)
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls_pki_types::ServerName::IpAddress(setup.server.address.ip().into()),
            tcp,
        )
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(format!("https://{}/", setup.echo))
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(setup.server.stats.snapshot().server_bad_requests, 1);
}

#[tokio::test]
async fn the_agents_own_identities_from_a_local_ca_carry_the_tunnel() {
    use crate::identity::{Identities, LocalCa, RenewalSettings, TlsCredentials};
    let dir = tempfile::tempdir().unwrap();
    let ca: Arc<dyn crate::identity::CertificateAuthority> =
        Arc::new(LocalCa::open(dir.path(), TD, Duration::from_secs(3600)).unwrap());
    let node_b = Identities::start("node-b", Arc::clone(&ca), RenewalSettings::default()).unwrap();
    let node_a = Identities::start("node-a", ca, RenewalSettings::default()).unwrap();
    node_b.wait_for_node(Duration::from_secs(10)).await.unwrap();
    let echo = echo_target().await;
    let policy = policy(echo, unused_port());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server_stats = Arc::new(TunnelStats::default());
    let server = Arc::new(TunnelServer::new(
        node_b.credentials_handle(),
        policy,
        "node-b",
        settings(),
        Arc::clone(&server_stats),
    ));
    let (_stop, stopped) = watch::channel(false);
    tokio::spawn(server.serve(listener, stopped));
    let client = TunnelClient::new(
        Some(node_a.credentials_handle()),
        settings(),
        Arc::new(TunnelStats::default()),
    );
    assert_eq!(client.trust_domain(), Some(node_a.trust_domain()));
    let peer = Peer {
        node: "node-b",
        address,
    };
    let mut stream = client.open(&agent("client"), peer, echo).await.unwrap();
    stream.write_all(b"svid").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 4).await, b"svid");
    // The peer saw the workload's identity, so the policy refuses another workload.
    let error = client
        .open(&agent("intruder"), peer, echo)
        .await
        .unwrap_err();
    assert!(matches!(error, TunnelError::Denied { .. }), "{error}");
    assert_eq!(server_stats.snapshot().server_denied, 1);
}

#[tokio::test]
async fn a_stopping_server_lets_open_streams_finish_and_takes_no_new_ones() {
    let setup = setup().await;
    let source = agent("client");
    let peer = setup.server.peer();
    let mut stream = setup.client.open(&source, peer, setup.echo).await.unwrap();
    stream.write_all(b"before").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 6).await, b"before");
    let Server { stop, task, .. } = setup.server;
    stop.send(true).unwrap();
    // New streams are refused once the stop is seen (GOAWAY, listener closed)...
    let mut refused = None;
    for _ in 0..200 {
        match setup.client.open(&source, peer, setup.echo).await {
            Ok(extra) => drop(extra),
            Err(error) => {
                refused = Some(error);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused.is_some(), "a stopping server kept taking streams");
    // ...while the open one still carries bytes both ways, to its end.
    stream.write_all(b"during").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 6).await, b"during");
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, EOF_MARK);
    drop(stream);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the server finished draining once its last stream closed")
        .unwrap();
}

#[tokio::test]
async fn l7_conditions_of_the_receiving_nodes_policy_do_not_block_the_stream() {
    // Node B allows `client` only some HTTP paths of `echo`: the calling node judges each
    // request; node B lets `client` reach `echo`, and still refuses everyone else.
    let ca = TestCa::new();
    let echo = echo_target().await;
    let text = format!(
        r#"
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata: {{name: echo}}
spec:
  endpoints: [{{address: "{echo}", node: node-b}}]
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: echo-paths}}
spec:
  targetAgent: echo
  action: Allow
  rules: [{{from: [client], http: {{paths: ["/api/*"]}}}}]
"#
    );
    let report = parse_documents(&text, "test.yaml");
    assert!(report.is_clean(), "{:?}", report.errors);
    let policy = Arc::new(PolicyStore::new(
        PolicySnapshot::compile(&report.resources(), Action::Allow).unwrap(),
    ));
    let server = Server::start(&ca, &policy, "127.0.0.1:0".parse().unwrap()).await;
    let client = TunnelClient::new(
        Some(TestCredentials::new(&ca, TD, "node-a")),
        settings(),
        Arc::new(TunnelStats::default()),
    );
    let mut stream = client
        .open(&agent("client"), server.peer(), echo)
        .await
        .unwrap();
    stream.write_all(b"ok").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 2).await, b"ok");
    let error = client
        .open(&agent("other"), server.peer(), echo)
        .await
        .unwrap_err();
    assert!(matches!(error, TunnelError::Denied { .. }), "{error}");
}

#[tokio::test]
async fn a_renewed_certificate_retires_the_connection_and_open_streams_finish_on_it() {
    let setup = setup().await;
    let credentials = TestCredentials::new(&setup.ca, TD, "node-a");
    let stats = Arc::new(TunnelStats::default());
    let client = TunnelClient::new(
        Some(Arc::clone(&credentials) as Arc<dyn crate::identity::TlsCredentials>),
        settings(),
        Arc::clone(&stats),
    );
    let source = agent("client");
    let mut old = client
        .open(&source, setup.server.peer(), setup.echo)
        .await
        .unwrap();
    old.write_all(b"before").await.unwrap();
    assert_eq!(read_exactly(&mut old, 6).await, b"before");
    // Streams before the renewal share the connection.
    let mut second = client
        .open(&source, setup.server.peer(), setup.echo)
        .await
        .unwrap();
    second.write_all(b"2").await.unwrap();
    assert_eq!(read_exactly(&mut second, 1).await, b"2");
    assert_eq!(stats.snapshot().client_connections, 1);

    credentials.renew(&source);
    let mut new = client
        .open(&source, setup.server.peer(), setup.echo)
        .await
        .unwrap();
    new.write_all(b"after").await.unwrap();
    assert_eq!(read_exactly(&mut new, 5).await, b"after");
    let snapshot = stats.snapshot();
    assert_eq!(
        snapshot.client_connections, 2,
        "a new connection after the renewal"
    );
    assert_eq!(snapshot.client_connections_retired, 1);
    assert_eq!(setup.server.stats.snapshot().server_connections, 2);
    // The streams opened before go on, on the old connection, to their end.
    for (stream, message) in [
        (&mut old, &b"still open"[..]),
        (&mut second, &b"me too"[..]),
    ] {
        stream.write_all(message).await.unwrap();
        assert_eq!(read_exactly(stream, message.len()).await, message);
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
            .await
            .expect("read timed out")
            .unwrap();
        assert_eq!(rest, EOF_MARK);
    }
    // Later streams share the new connection.
    let mut later = client
        .open(&source, setup.server.peer(), setup.echo)
        .await
        .unwrap();
    later.write_all(b"x").await.unwrap();
    assert_eq!(read_exactly(&mut later, 1).await, b"x");
    assert_eq!(stats.snapshot().client_connections, 2);
    assert_eq!(stats.snapshot().client_streams_refused, 0);
    assert_eq!(client.connections(), 1);
    // With its streams done (and dropped) and no handle left, the old connection closes.
    drop((old, second));
    let start = std::time::Instant::now();
    while setup.server.stats.snapshot().server_connections_active != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the retired connection stayed open: {:?}",
            setup.server.stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_server_closes_a_connection_when_the_callers_certificate_expires() {
    let setup = setup().await;
    // Valid for 4 s: the server sends GOAWAY a drain timeout (2 s) before, closes at expiry.
    let credentials =
        TestCredentials::with_client_lifetime(&setup.ca, TD, "node-a", Duration::from_secs(4));
    let stats = Arc::new(TunnelStats::default());
    let client = TunnelClient::new(Some(credentials), settings(), Arc::clone(&stats));
    let mut stream = client
        .open(&agent("client"), setup.server.peer(), setup.echo)
        .await
        .unwrap();
    stream.write_all(b"hello").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 5).await, b"hello");
    // The stream is left open; the connection must not outlive the certificate.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "the stream outlived the caller's certificate"
    );
    assert_eq!(setup.server.stats.snapshot().server_connections_expired, 1);
    assert!(rest.is_empty() || rest == EOF_MARK, "{rest:?}");
    assert_eq!(setup.server.stats.snapshot().server_connections_active, 0);
    let start = std::time::Instant::now();
    while client.connections() != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the client kept the connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
