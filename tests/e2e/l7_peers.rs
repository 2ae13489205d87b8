//! End-to-end tests of the L7 path with more real peers: `grpcio` over h2c (unary, server
//! streaming, bidirectional streaming, deadlines, a denied method), the `websockets` library,
//! the `a2a-sdk` agent server and client in both protocol generations, and a Server-Sent
//! Events stream paced by its client. Every client runs in the enrolled "planner" cgroup and
//! dials the server's real address; the kernel hands the connection to the agent, which has to
//! recognise the protocol and carry it without changing or holding back a byte.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    fs,
    io::{BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use mesh_tests::unique_name;
use serde_json::{Value, json};

mod common;
use common::*;

/// An `AccessPolicy` denying one gRPC method of agent `echo` to everyone.
const GRPC_DENY: &str = "---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: no-forbidden-method
spec:
  targetAgent: echo
  action: Deny
  rules:
    - from: [\"*\"]
      http:
        paths: [\"/echo.Echo/Forbidden\"]
";

/// A file removed when the test ends, passed or failed.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn strings(values: impl IntoIterator<Item = String>) -> Value {
    Value::from(values.into_iter().collect::<Vec<_>>())
}

#[test]
fn grpc_unary_streaming_bidi_deadline_and_denied_method_through_the_mesh() {
    let (_server, address) = start_python_server("grpc_echo_server.py", &[]);
    let resources = agent_resource("echo", &["echo.mesh"], address, "Grpc") + GRPC_DENY;
    let mesh = Mesh::start("l7-grpc", &resources);
    let report = mesh.python_probe("grpc_probe.py", &[&address.to_string(), "1"], 60);

    let say = &report["say"];
    assert_eq!(say["response"], "echo:hello", "{report}");
    assert_eq!(say["code"], "OK", "{report}");
    assert_eq!(
        say["trailers"]["x-echo-trailer"], "done",
        "the server's trailers reach the client: {report}"
    );
    assert_eq!(report["count"]["code"], "OK", "{report}");
    assert_eq!(
        report["count"]["messages"],
        strings((0..100).map(|index| index.to_string())),
        "100 server-streamed messages arrive complete and in order"
    );
    assert_eq!(report["chat"]["code"], "OK", "{report}");
    assert_eq!(
        report["chat"]["messages"],
        strings((0..50).map(|index| format!("chat:{index}"))),
        "a ping-pong over one bidirectional stream: nothing is held back either way"
    );

    let forbidden = &report["forbidden"];
    assert_eq!(forbidden["code"], "PERMISSION_DENIED", "{report}");
    assert!(
        forbidden["details"]
            .as_str()
            .is_some_and(|details| details.contains("denied by mesh policy")),
        "the status message says who refused: {report}"
    );
    assert_eq!(
        report["server"]["calls"].get("Forbidden"),
        None,
        "the denied call never reached the server: {report}"
    );

    let slow = &report["slow"];
    assert_eq!(slow["code"], "DEADLINE_EXCEEDED", "{report}");
    let seconds = slow["seconds"].as_f64().unwrap();
    assert!(
        (0.9..3.0).contains(&seconds),
        "the 1 s deadline ended the 5 s call: {seconds}"
    );
    // The deadline travelled through the mesh as grpc-timeout: the server saw it (grpcio
    // rounds the time left up a little; a call without a deadline shows ~9.2e18 s).
    let seen = report["server"]["slow_deadlines"][0].as_f64();
    assert!(
        seen.is_some_and(|left| left > 0.0 && left < 1.5),
        "the server saw the caller's deadline: {report}"
    );

    assert!(mesh.metric("mesh_proxy_connections_by_protocol_total{protocol=\"http2\"}") >= 1.0);
    assert!(mesh.metric("mesh_http_denied_requests_total") >= 1.0);
    let log = mesh.agent.log();
    assert!(
        log.contains("request denied by policy") && log.contains("/echo.Echo/Forbidden"),
        "the agent logs the denied method:\n{log}"
    );
}

#[test]
fn grpc_calls_without_a_deadline_get_deadline_exceeded_from_the_mesh_request_timeout() {
    let (_server, address) = start_python_server("grpc_echo_server.py", &[]);
    let resources = agent_resource("echo", &["echo.mesh"], address, "Grpc")
        + GRPC_DENY
        + "---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: echo-timeouts
spec:
  targetAgent: echo
  timeouts:
    request: 1s
";
    let mesh = Mesh::start("l7-grpc-timeout", &resources);
    let report = mesh.python_probe("grpc_probe.py", &[&address.to_string(), "none"], 60);
    // The fast calls are unaffected by the 1 s limit.
    assert_eq!(report["say"]["code"], "OK", "{report}");
    assert_eq!(report["count"]["code"], "OK", "{report}");
    assert_eq!(report["chat"]["code"], "OK", "{report}");
    let slow = &report["slow"];
    assert_eq!(
        slow["code"], "DEADLINE_EXCEEDED",
        "the mesh answers its own timeout in gRPC terms: {report}"
    );
    assert!(
        slow["details"]
            .as_str()
            .is_some_and(|details| details.contains("did not answer within")),
        "the status message comes from the mesh: {report}"
    );
    let seconds = slow["seconds"].as_f64().unwrap();
    assert!((0.9..3.0).contains(&seconds), "{seconds}");
    // grpcio reports "no deadline" as ~9.2e18 seconds left.
    let seen = report["server"]["slow_deadlines"][0].as_f64();
    assert!(
        seen.is_some_and(|left| left > 1e9),
        "the caller set no deadline: {report}"
    );
    assert!(mesh.metric("mesh_http_upstream_timeouts_total") >= 1.0);
}

#[test]
fn websocket_messages_and_a_one_mebibyte_frame_echo_through_the_mesh_and_close_cleanly() {
    let log_file = RemoveOnDrop(std::env::temp_dir().join(unique_name("ws-server.log")));
    let log_file = &log_file.0;
    let (_server, address) =
        start_python_server("ws_echo_server.py", &[log_file.to_str().unwrap()]);
    let resources = agent_resource("ws-echo", &["ws-echo.mesh"], address, "Http");
    let mesh = Mesh::start("l7-websocket", &resources);
    let url = format!("ws://{address}/chat?room=1");
    let report = mesh.python_probe("ws_probe.py", &[&url], 60);

    assert_eq!(report["greeting"], "hello /chat?room=1", "{report}");
    assert_eq!(
        report["texts"],
        strings((0..100).map(|index| format!("message {index}"))),
        "100 messages echoed in order"
    );
    assert_eq!(
        report["binary"],
        json!({"type": "bytes", "length": 1_048_576, "intact": true}),
        "{report}"
    );
    assert_eq!(report["close"], json!({"code": 1000, "reason": "done"}));
    // The close handshake reached the server with its code and reason.
    let start = Instant::now();
    let server_log = loop {
        let text = fs::read_to_string(log_file).unwrap_or_default();
        if !text.is_empty() || start.elapsed() > Duration::from_secs(10) {
            break text;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(server_log.trim(), "closed 1000 done 101");
    assert!(mesh.metric("mesh_http_websocket_upgrades_total") >= 1.0);
}

#[test]
fn a2a_sdk_client_and_server_talk_through_the_mesh_in_both_protocol_versions() {
    let (_server, address) = start_python_server("a2a_shout_server.py", &[]);
    let resources = agent_resource("shouter", &["shouter.mesh"], address, "A2a");
    let mesh = Mesh::start("l7-a2a", &resources);
    let base = format!("http://{address}");
    for (version, methods) in [
        ("1.0", ["SendMessage", "SendStreamingMessage"]),
        ("0.3", ["message/send", "message/stream"]),
    ] {
        let report = mesh.python_probe(
            "a2a_probe.py",
            &[&base, version, "hello there big world"],
            60,
        );
        assert_eq!(report["methods"], json!(methods), "{version}: {report}");
        assert_eq!(report["card"]["name"], "shouter", "{version}: {report}");
        assert_eq!(
            report["card"]["skills"],
            json!(["shout"]),
            "{version}: {report}"
        );

        let send = &report["send"];
        assert_eq!(send["ok"], true, "{version}: {report}");
        assert_eq!(send["state"], "TASK_STATE_COMPLETED", "{version}: {report}");
        assert_eq!(
            send["chunks"],
            json!(["HELLO\nTHERE\nBIG\nWORLD"]),
            "{version}"
        );
        assert_eq!(
            send["status_text"], "shouted 4 words",
            "{version}: {report}"
        );

        let stream = &report["stream"];
        assert_eq!(stream["ok"], true, "{version}: {report}");
        assert_eq!(
            stream["chunks"],
            json!(["HELLO", "THERE", "BIG", "WORLD"]),
            "{version}: every artifact chunk streamed, in order: {report}"
        );
        assert_eq!(
            stream["state"], "TASK_STATE_COMPLETED",
            "{version}: {report}"
        );
        assert_eq!(stream["status_text"], "shouted 4 words", "{version}");
        // The server paces the chunks 100 ms apart; a buffering proxy would deliver them
        // together at the end.
        let spread = stream["chunk_spread"].as_f64().unwrap();
        assert!(
            spread >= 0.15,
            "{version}: chunks arrived as they were sent, not all at once: {spread}"
        );
    }
    assert!(mesh.metric("mesh_jsonrpc_requests_total{family=\"a2a\"}") >= 4.0);
}

#[test]
fn a_denied_a2a_method_gives_the_sdk_client_a_json_rpc_error() {
    let (_server, address) = start_python_server("a2a_shout_server.py", &[]);
    let resources = agent_resource("shouter", &["shouter.mesh"], address, "A2a")
        + "---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: shouter-no-streaming
spec:
  targetAgent: shouter
  action: Deny
  rules:
    - from: [planner]
      a2a:
        methods: [SendStreamingMessage, message/stream]
";
    let mesh = Mesh::start("l7-a2a-deny", &resources);
    let base = format!("http://{address}");
    for version in ["1.0", "0.3"] {
        let report = mesh.python_probe("a2a_probe.py", &[&base, version, "quiet please"], 60);
        assert_eq!(report["send"]["ok"], true, "{version}: {report}");
        assert_eq!(
            report["send"]["chunks"],
            json!(["QUIET\nPLEASE"]),
            "{version}"
        );
        let stream = &report["stream"];
        assert_eq!(stream["ok"], false, "{version}: {report}");
        let error = stream["error"].as_str().unwrap();
        // v1.0 names the code; the v0.3 client keeps only the message of codes it does not
        // know. Either way the JSON-RPC error reached it, not a bare HTTP failure.
        assert!(
            error.contains("denied by mesh policy")
                && !error.contains("HTTP Error")
                && (version == "0.3" || error.contains("JSON-RPC Error -32043")),
            "{version}: the SDK surfaces the mesh's JSON-RPC error: {error}"
        );
    }
    // On the wire: a JSON-RPC error with the request's id, in a 200 response as A2A's
    // JSON-RPC binding answers errors.
    let (status, head, body) = mesh.curl(&[
        "-H",
        "content-type: application/json",
        "--data",
        r#"{"jsonrpc":"2.0","id":"req-7","method":"message/stream","params":{"message":{"role":"user","messageId":"m1","parts":[{"kind":"text","text":"hi"}]}}}"#,
        &format!("{base}/"),
    ]);
    assert_eq!(status, 200, "{head}{body}");
    let answer: Value = serde_json::from_str(&body).expect("a JSON body");
    assert_eq!(answer["id"], "req-7", "{answer}");
    assert_eq!(answer["error"]["code"], -32043, "{answer}");
    assert!(mesh.metric("mesh_http_denied_requests_total") >= 2.0);
    let log = mesh.agent.log();
    assert!(
        log.contains("request denied by policy") && log.contains("SendStreamingMessage"),
        "{log}"
    );
}

/// An SSE server in this process that sends event n+1 only after the client acknowledged
/// event n with `GET /ack?n=<n>` (on another connection): a proxy that held back any part of
/// the stream would stall it.
struct PacedSseServer {
    address: SocketAddr,
    state: Arc<(Mutex<PacedState>, Condvar)>,
}

#[derive(Debug, Default)]
struct PacedState {
    /// The highest event acknowledged.
    acked: Option<usize>,
    /// Events written to the stream.
    sent: usize,
    /// The event whose acknowledgement never came.
    stalled: Option<usize>,
}

/// How long the server waits for an acknowledgement.
const ACK_WAIT: Duration = Duration::from_secs(10);

impl PacedSseServer {
    fn start(events: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind SSE server");
        let address = listener.local_addr().expect("address");
        let state = Arc::new((Mutex::new(PacedState::default()), Condvar::new()));
        let shared = Arc::clone(&state);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let shared = Arc::clone(&shared);
                thread::spawn(move || serve_paced(stream, &shared, events));
            }
        });
        Self { address, state }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PacedState> {
        self.state.0.lock().unwrap()
    }
}

/// Serves keep-alive requests: `/events` (the paced stream) and `/ack?n=N`.
fn serve_paced(stream: TcpStream, state: &(Mutex<PacedState>, Condvar), events: usize) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut writer = stream;
    while let Some(request) = read_request(&mut reader) {
        let target = request.target();
        if let Some(number) = target.strip_prefix("/ack?n=") {
            let (lock, changed) = state;
            let number: usize = number.parse().expect("ack number");
            let mut state = lock.lock().unwrap();
            state.acked = state.acked.max(Some(number));
            changed.notify_all();
            drop(state);
            if writer
                .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                .is_err()
            {
                return;
            }
            continue;
        }
        let _ = send_paced_events(&mut writer, state, events);
        return;
    }
}

fn send_paced_events(
    writer: &mut TcpStream,
    (lock, changed): &(Mutex<PacedState>, Condvar),
    events: usize,
) -> std::io::Result<()> {
    writer.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
          transfer-encoding: chunked\r\n\r\n",
    )?;
    for index in 0..events {
        let event = format!("id: {index}\ndata: event {index}\n\n");
        writer.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())?;
        writer.flush()?;
        let mut state = lock.lock().unwrap();
        state.sent += 1;
        let (state, wait) = changed
            .wait_timeout_while(state, ACK_WAIT, |state| {
                state.acked.is_none_or(|acked| acked < index)
            })
            .unwrap();
        if wait.timed_out() {
            let mut state = state;
            state.stalled = Some(index);
            break;
        }
    }
    writer.write_all(b"0\r\n\r\n")?;
    writer.flush()
}

#[test]
fn sse_events_pass_through_one_by_one_without_buffering() {
    const EVENTS: usize = 5;
    let server = PacedSseServer::start(EVENTS);
    let resources = agent_resource("ticker", &["ticker.mesh"], server.address, "Http");
    let mesh = Mesh::start("l7-sse", &resources);
    // curl -N prints each event as it arrives; the loop acknowledges an event (with another
    // curl, on another captured connection) when its blank line arrives.
    let base = format!("http://{}", server.address);
    let script = format!(
        r#"last=""
curl -sSN --max-time 60 -H 'accept: text/event-stream' '{base}/events' | while IFS= read -r line; do
  line=${{line%$'\r'}}
  echo "$line"
  case "$line" in
    "id: "*) last=${{line#id: }} ;;
    "") if [ -n "$last" ]; then
          curl -sS --max-time 10 -o /dev/null -w 'ack %{{http_code}}\n' "{base}/ack?n=$last"
          last=""
        fi ;;
  esac
done"#
    );
    let started = Instant::now();
    let output = mesh
        .tree
        .run_in(&mesh.planner, Command::new("bash").args(["-c", &script]))
        .expect("run curl");
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let expected: String = (0..EVENTS)
        .map(|index| format!("id: {index}\ndata: event {index}\n\nack 204\n"))
        .collect();
    assert_eq!(
        stdout,
        expected,
        "every event arrived before the next was sent; stderr: {}\nagent log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        mesh.agent.log()
    );
    let state = server.state();
    assert_eq!(state.stalled, None, "the server never waited in vain");
    assert_eq!(state.sent, EVENTS);
    assert_eq!(state.acked, Some(EVENTS - 1));
    assert!(
        elapsed < ACK_WAIT,
        "no event waited for a timeout: {elapsed:?}"
    );
    // The stream and every acknowledgement were served at L7, not carried as opaque bytes.
    assert!(mesh.metric("mesh_http_requests_total") >= (EVENTS + 1) as f64);
}
