//! Listeners and the forwarding of captured connections. This stage carries opaque TCP;
//! protocol detection and L7 handling plug in at [`outbound::OutboundProxy::handle`].

pub mod outbound;
pub mod sniff;
pub mod splice;

pub use outbound::{OutboundProxy, PROTOCOL_LABELS, ProxyStats, ProxyStatsSnapshot};
