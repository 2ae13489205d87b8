//! Listeners and the forwarding of captured connections: protocol detection on the first
//! client bytes, the L7 path for HTTP/1.1 and HTTP/2 (MCP, A2A, gRPC, WebSocket), and opaque
//! TCP (spliced) for everything else; pooled HTTP/1.1 connections to upstreams (`upstream`);
//! the worker threads that serve the connections (`workers`).

pub mod balance;
pub mod buffer_stash;
pub mod dedup;
pub mod dialer;
pub mod h1_client;
pub mod h1_server;
pub mod http;
pub mod json_scan;
pub mod jsonrpc;
pub mod outbound;
pub mod prefixed;
pub mod priority;
pub mod redirect_window;
pub mod request_headers;
pub mod reused_timer;
pub mod sniff;
pub mod splice;
pub mod sse;
pub mod upstream;
pub mod workers;

pub use outbound::{OutboundProxy, PROTOCOL_LABELS, ProxyStats, ProxyStatsSnapshot};
