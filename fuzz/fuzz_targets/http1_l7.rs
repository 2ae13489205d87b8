//! Fuzzes the L7 path end to end on HTTP/1.1 framing: arbitrary client bytes go into the
//! agent's HTTP server (hyper with the mesh's request handling: destination lookup, body
//! inspection, JSON-RPC extraction, policy, dedup, admission) over an in-memory stream, with
//! upstreams that refuse. No input may panic it, hang it, or make it answer with anything but
//! well-formed HTTP/1.x responses.
#![no_main]

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    policy::{Action, PolicySnapshot, PolicyStore, parse_documents},
    proxy::http::{CallerContext, HttpProxy, HttpVersion},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// No retries and short timeouts, so every input finishes fast.
const POLICY: &str = "apiVersion: mesh.agentmesh.dev/v1alpha1
kind: Agent
metadata: {name: tools}
spec:
  hosts: [tools.mesh]
  endpoints: [{address: \"127.0.0.1:9\"}]
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: tools}
spec:
  targetAgent: tools
  rules:
    - from: [fuzzer]
      mcp: {tools: [add]}
---
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: all}
spec:
  targetAgent: \"*\"
  timeouts: {request: 200ms}
  retries: {attempts: 0}
  dedup: {window: 0s}
";

struct World {
    runtime: tokio::runtime::Runtime,
    proxy: Arc<HttpProxy>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let report = parse_documents(POLICY, "fuzz.yaml");
        assert!(report.is_clean(), "{:?}", report.errors);
        let snapshot = PolicySnapshot::compile(&report.resources(), Action::Allow)
            .unwrap_or_else(|errors| panic!("{errors:?}"));
        let store = Arc::new(PolicyStore::new(snapshot));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|error| panic!("runtime: {error}"));
        let proxy =
            runtime.block_on(async { Arc::new(HttpProxy::new(store, Duration::from_millis(100))) });
        World { runtime, proxy }
    })
}

fuzz_target!(|data: &[u8]| {
    let world = world();
    world.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let caller = CallerContext {
            source: Arc::from("fuzzer"),
            original_dst: SocketAddr::from(([127, 0, 0, 1], 9)),
        };
        let serving = tokio::spawn(Arc::clone(&world.proxy).serve_connection(
            server,
            HttpVersion::Http1,
            caller,
        ));
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "the connection neither answered nor closed");
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1."),
            "not an HTTP response: {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
        serving.abort();
    });
});
