//! Types and constants shared by the mesh's kernel programs (`mesh-ebpf`) and the node agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding, so the kernel and userspace
//! agree byte for byte. Addresses are kept in network byte order exactly as the kernel hands
//! them to eBPF programs (`[u32; 4]`, IPv4 in the first word); ports are always host byte order.
//! With the `user` feature the types implement `aya::Pod` so the agent can read and write maps.
#![no_std]

/// Default port of the agent's outbound capture listener.
pub const OUTBOUND_PORT: u16 = 15001;
/// Default port of the agent's inbound capture listener.
pub const INBOUND_PORT: u16 = 15006;
/// Default port of the mutual-TLS tunnel between node agents.
pub const TUNNEL_PORT: u16 = 15008;
/// Default port of the admin endpoint (metrics, health).
pub const ADMIN_PORT: u16 = 15020;

/// `SO_MARK` the agent puts on its own upstream sockets; capture never touches a marked socket.
pub const AGENT_SOCKET_MARK: u32 = 0x4d45_5348; // "MESH"

/// How many cgroup levels above a socket's own cgroup the kernel programs search for an
/// enrolled workload (enrolling a pod's cgroup covers its containers).
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// `AF_INET` as the kernel numbers it.
pub const FAMILY_INET: u32 = 2;
/// `AF_INET6` as the kernel numbers it.
pub const FAMILY_INET6: u32 = 10;

/// Names of the maps in the eBPF object, as the agent looks them up and pins them.
pub mod map_names {
    /// `Array<DatapathConfig>`, one entry.
    pub const CONFIG: &str = "MESH_CONFIG";
    /// `HashMap<u64 cgroup id, WorkloadInfo>`: enrolled workloads.
    pub const WORKLOADS: &str = "MESH_WORKLOADS";
    /// `LpmTrie<[u8; 4], u8>`: IPv4 destinations never captured.
    pub const EXCLUDE_V4: &str = "MESH_EXCLUDE_V4";
    /// `LpmTrie<[u8; 16], u8>`: IPv6 destinations never captured.
    pub const EXCLUDE_V6: &str = "MESH_EXCLUDE_V6";
    /// `HashMap<u16 port, u8>`: destination ports never captured.
    pub const EXCLUDE_PORTS: &str = "MESH_EXCLUDE_PORTS";
    /// `LruHashMap<u64 socket cookie, ConnInfo>`: captured sockets by cookie.
    pub const ORIG_BY_COOKIE: &str = "MESH_ORIG_BY_COOKIE";
    /// `LruHashMap<Endpoint, ConnInfo>`: captured connections by client address and port.
    pub const CONNS: &str = "MESH_CONNS";
    /// `SockHash<SockTuple>`: sockets of local hops eligible for in-kernel redirection.
    pub const SOCKS: &str = "MESH_SOCKS";
    /// `HashMap<SockTuple, RedirectState>`: per socket of `MESH_SOCKS` (keyed as seen from that
    /// socket), the bytes `sk_msg` redirected from it and whether it fell back to TCP for good.
    /// Created when the socket joins `MESH_SOCKS`, removed when it closes: a socket without an
    /// entry is never redirected.
    pub const REDIRECT_STATE: &str = "MESH_REDIRECT_STATE";
    /// `LruHashMap<SockTuple, u64>`: redirected-byte count up to which a socket may be redirected,
    /// written by the agent as it reads what the socket sent (absent: [`REDIRECT_WINDOW`]).
    pub const REDIRECT_ALLOWANCE: &str = "MESH_REDIRECT_ALLOWANCE";
    /// `LruHashMap<SockTuple, u32>`: highest TCP sequence seen per flow and direction, so
    /// retransmitted payload is counted once.
    pub const FLOW_SEQ: &str = "MESH_FLOW_SEQ";
    /// `PerCpuHashMap<u64 cgroup id, TrafficCounters>`: per-workload accounting.
    pub const COUNTERS: &str = "MESH_COUNTERS";
    /// `PerCpuArray<u64>` indexed by [`super::DatapathEvent`].
    pub const EVENTS: &str = "MESH_EVENTS";
    /// `LruHashMap<u64 cgroup id, CgroupVerdict>`: which workload a cgroup's packets count
    /// for, so the accounting programs walk a cgroup's ancestors once, not per packet.
    pub const CGROUP_VERDICTS: &str = "MESH_CGROUP_VERDICTS";
    /// `Array<u64>` of one: the enrolment generation, bumped by the agent after every change
    /// to `MESH_WORKLOADS` (so older `MESH_CGROUP_VERDICTS` entries no longer count).
    pub const ENROL_GENERATION: &str = "MESH_ENROL_GENERATION";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
    pub const GETPEERNAME6: &str = "mesh_getpeername6";
    pub const SOCK_OPS: &str = "mesh_sock_ops";
    pub const SK_MSG: &str = "mesh_sk_msg";
    pub const SKB_INGRESS: &str = "mesh_skb_ingress";
    pub const SKB_EGRESS: &str = "mesh_skb_egress";
}

/// Bits of [`DatapathConfig::flags`].
pub mod config_flags {
    /// Capture is on: connect() of enrolled workloads is redirected to the agent.
    pub const CAPTURE: u32 = 1 << 0;
    /// Local hops between a workload and the agent are spliced in the kernel by `sk_msg`.
    pub const ACCELERATE: u32 = 1 << 1;
}

/// The agent's settings for the kernel programs: entry 0 of the `MESH_CONFIG` array.
/// An all-zero value (before the agent wrote it) means capture is off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// IPv4 address of the outbound listener, network byte order.
    pub redirect_ip4: u32,
    /// IPv6 address of the outbound listener, network byte order.
    pub redirect_ip6: [u32; 4],
    /// Port of the outbound listener (host byte order).
    pub redirect_port: u32,
    /// [`config_flags`].
    pub flags: u32,
    /// Thread-group id of the running agent: its sockets are never captured.
    pub agent_tgid: u32,
    /// `SO_MARK` of the agent's own sockets: never captured.
    pub agent_mark: u32,
}

/// An enrolled workload: value of `MESH_WORKLOADS`, keyed by cgroup id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadInfo {
    /// Agent-chosen identifier, stable while the workload is enrolled.
    pub workload_id: u32,
    /// Reserved for per-workload options.
    pub flags: u32,
}

/// One end of a connection: address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// [`FAMILY_INET`] or [`FAMILY_INET6`].
    pub family: u32,
    /// Port, host byte order.
    pub port: u32,
    /// Address in network byte order; IPv4 uses word 0 and leaves the rest zero.
    pub addr: [u32; 4],
}

impl Endpoint {
    /// An IPv4 endpoint from the address as the kernel stores it (network byte order).
    pub const fn v4(addr_be: u32, port: u16) -> Self {
        Self {
            family: FAMILY_INET,
            port: port as u32,
            addr: [addr_be, 0, 0, 0],
        }
    }

    /// An IPv6 endpoint from the address words as the kernel stores them.
    pub const fn v6(addr_be: [u32; 4], port: u16) -> Self {
        Self {
            family: FAMILY_INET6,
            port: port as u32,
            addr: addr_be,
        }
    }

    /// The IPv4 address carried in an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), if it is one.
    pub const fn mapped_v4(addr_be: [u32; 4]) -> Option<u32> {
        if addr_be[0] == 0 && addr_be[1] == 0 && addr_be[2] == u32::from_be(0x0000_ffff) {
            Some(addr_be[3])
        } else {
            None
        }
    }
}

/// A captured connection: where the workload wanted to go and who it is.
/// Value of `MESH_ORIG_BY_COOKIE` and `MESH_CONNS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    /// The destination the workload dialled.
    pub original_dst: Endpoint,
    /// cgroup id of the enrolled workload the socket belongs to.
    pub workload_cgroup: u64,
    /// Socket cookie of the workload's socket.
    pub cookie: u64,
}

/// Key of `MESH_SOCKS`: a socket as seen from its own side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub family: u32,
    /// Local port, host byte order.
    pub local_port: u32,
    /// Remote port, host byte order.
    pub remote_port: u32,
    /// Reserved, zero.
    pub pad: u32,
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
}

impl SockTuple {
    /// The socket with local end `local` connected to `remote` (both of one family).
    pub const fn new(local: Endpoint, remote: Endpoint) -> Self {
        Self {
            family: local.family,
            local_port: local.port,
            remote_port: remote.port,
            pad: 0,
            local_addr: local.addr,
            remote_addr: remote.addr,
        }
    }

    /// The same connection as seen from the other end.
    pub const fn reversed(&self) -> Self {
        Self {
            family: self.family,
            local_port: self.remote_port,
            remote_port: self.local_port,
            pad: 0,
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
        }
    }

    /// The local end.
    pub const fn local(&self) -> Endpoint {
        Endpoint {
            family: self.family,
            port: self.local_port,
            addr: self.local_addr,
        }
    }

    /// The remote end.
    pub const fn remote(&self) -> Endpoint {
        Endpoint {
            family: self.family,
            port: self.remote_port,
            addr: self.remote_addr,
        }
    }
}

/// Bytes an `sk_msg` redirect may queue on the receiving socket beyond what its reader has
/// taken (the redirect has no flow control of its own): a socket whose redirected bytes would
/// pass its allowance (this window, or what the agent wrote to `MESH_REDIRECT_ALLOWANCE`)
/// falls back to TCP for the rest of its life.
pub const REDIRECT_WINDOW: u64 = 4 << 20;

/// Redirect bookkeeping of one socket: value of `MESH_REDIRECT_STATE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectState {
    /// Bytes `sk_msg` redirected from this socket to its peer.
    pub redirected: u64,
    /// Non-zero once a message of this socket took the TCP path: every later one does too, so
    /// bytes never overtake earlier ones still travelling through TCP.
    pub fallen_back: u64,
}

/// What the accounting programs remember of a cgroup: the enrolled workload it belongs to
/// (0: none), as of enrolment generation `generation` (value of `MESH_CGROUP_VERDICTS`,
/// keyed by cgroup id). A verdict of another generation is stale and worked out again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupVerdict {
    pub workload: u64,
    pub generation: u64,
}

/// Per-workload traffic counters (per CPU in the kernel, summed by the agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    /// Bytes of IP packets sent (headers included).
    pub tx_bytes: u64,
    /// Bytes of IP packets received (headers included).
    pub rx_bytes: u64,
    /// IP packets sent.
    pub tx_packets: u64,
    /// IP packets received.
    pub rx_packets: u64,
    /// TCP/UDP payload bytes sent (TCP retransmissions counted once), including bytes handed
    /// over by in-kernel redirection.
    pub tx_payload_bytes: u64,
    /// TCP/UDP payload bytes received (TCP retransmissions counted once), including bytes
    /// handed over by in-kernel redirection.
    pub rx_payload_bytes: u64,
    /// TCP connections the workload opened (SYN sent).
    pub connections_out: u64,
    /// TCP connections the workload accepted (SYN received).
    pub connections_in: u64,
    /// Outbound connections redirected to the agent.
    pub connections_captured: u64,
    /// Payload bytes that went socket to socket through `sk_msg` (both directions).
    pub redirected_bytes: u64,
}

impl TrafficCounters {
    /// Field-wise sum, used to fold the per-CPU values.
    pub fn add(&mut self, other: &Self) {
        self.tx_bytes = self.tx_bytes.wrapping_add(other.tx_bytes);
        self.rx_bytes = self.rx_bytes.wrapping_add(other.rx_bytes);
        self.tx_packets = self.tx_packets.wrapping_add(other.tx_packets);
        self.rx_packets = self.rx_packets.wrapping_add(other.rx_packets);
        self.tx_payload_bytes = self.tx_payload_bytes.wrapping_add(other.tx_payload_bytes);
        self.rx_payload_bytes = self.rx_payload_bytes.wrapping_add(other.rx_payload_bytes);
        self.connections_out = self.connections_out.wrapping_add(other.connections_out);
        self.connections_in = self.connections_in.wrapping_add(other.connections_in);
        self.connections_captured = self
            .connections_captured
            .wrapping_add(other.connections_captured);
        self.redirected_bytes = self.redirected_bytes.wrapping_add(other.redirected_bytes);
    }
}

/// Datapath events counted in `MESH_EVENTS` (index = discriminant).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatapathEvent {
    /// A connect() was redirected to the agent.
    Captured = 0,
    /// A captured connect() could not be recorded (map full or error); it was left uncaptured.
    RecordFailed = 1,
    /// A connect() of an enrolled workload was skipped because its destination is excluded.
    Excluded = 2,
    /// A connection was published for the agent in `MESH_CONNS`.
    Published = 3,
    /// A socket could not be added to `MESH_SOCKS`.
    SockHashFailed = 4,
    /// A message was redirected socket to socket.
    Redirected = 5,
    /// A message took the TCP path: its peer was not in `MESH_SOCKS`, or its socket fell back
    /// to TCP (its peer's queue reached the redirect window).
    RedirectMissed = 6,
}

impl DatapathEvent {
    /// Number of distinct events (size of `MESH_EVENTS`).
    pub const COUNT: u32 = 7;
    /// All events, in index order.
    pub const ALL: [DatapathEvent; 7] = [
        Self::Captured,
        Self::RecordFailed,
        Self::Excluded,
        Self::Published,
        Self::SockHashFailed,
        Self::Redirected,
        Self::RedirectMissed,
    ];

    /// A stable snake_case name, used in metrics and CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Captured => "captured",
            Self::RecordFailed => "record_failed",
            Self::Excluded => "excluded",
            Self::Published => "published",
            Self::SockHashFailed => "sockhash_failed",
            Self::Redirected => "redirected",
            Self::RedirectMissed => "redirect_missed",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and integer arrays, with
    // field sizes that leave no implicit padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::DatapathConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WorkloadInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: as above (Endpoint is 24 bytes, so the u64 fields that follow are 8-aligned).
    unsafe impl aya::Pod for super::ConnInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockTuple {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TrafficCounters {}
    // SAFETY: as above (two u64 fields).
    unsafe impl aya::Pod for super::RedirectState {}
    // SAFETY: as above (two u64 fields).
    unsafe impl aya::Pod for super::CgroupVerdict {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    // The kernel programs and the agent read these with fixed layouts: any change of size is a
    // wire-format change and must be deliberate.
    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<DatapathConfig>(), 4 + 16 + 4 + 4 + 4 + 4);
        assert_eq!(size_of::<WorkloadInfo>(), 8);
        assert_eq!(size_of::<Endpoint>(), 24);
        assert_eq!(size_of::<ConnInfo>(), 24 + 8 + 8);
        assert_eq!(align_of::<ConnInfo>(), 8);
        assert_eq!(size_of::<SockTuple>(), 16 + 32);
        assert_eq!(size_of::<RedirectState>(), 16);
        assert_eq!(size_of::<TrafficCounters>(), 10 * 8);
        assert_eq!(size_of::<CgroupVerdict>(), 16);
    }

    #[test]
    fn endpoint_v4_keeps_network_order_address_and_host_port() {
        let addr_be = u32::from_ne_bytes([127, 0, 0, 1]);
        let endpoint = Endpoint::v4(addr_be, 8080);
        assert_eq!(endpoint.family, FAMILY_INET);
        assert_eq!(endpoint.port, 8080);
        assert_eq!(endpoint.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(&endpoint.addr[1..], &[0, 0, 0]);
    }

    #[test]
    fn mapped_v4_detects_only_mapped_addresses() {
        let mapped = [
            0,
            0,
            u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            u32::from_ne_bytes([10, 1, 2, 3]),
        ];
        assert_eq!(
            Endpoint::mapped_v4(mapped),
            Some(u32::from_ne_bytes([10, 1, 2, 3]))
        );
        let loopback6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        assert_eq!(Endpoint::mapped_v4(loopback6), None);
    }

    #[test]
    fn sock_tuple_reversal_swaps_ends_and_is_an_involution() {
        let tuple = SockTuple {
            family: FAMILY_INET,
            local_port: 40000,
            remote_port: 15001,
            pad: 0,
            local_addr: [1, 0, 0, 0],
            remote_addr: [2, 0, 0, 0],
        };
        let reversed = tuple.reversed();
        assert_eq!(reversed.local(), tuple.remote());
        assert_eq!(reversed.remote(), tuple.local());
        assert_eq!(reversed.reversed(), tuple);
    }

    #[test]
    fn counters_add_is_fieldwise() {
        let mut total = TrafficCounters {
            tx_bytes: 1,
            redirected_bytes: 5,
            ..Default::default()
        };
        total.add(&TrafficCounters {
            tx_bytes: 2,
            rx_payload_bytes: 7,
            ..Default::default()
        });
        assert_eq!(total.tx_bytes, 3);
        assert_eq!(total.rx_payload_bytes, 7);
        assert_eq!(total.redirected_bytes, 5);
    }

    #[test]
    fn event_indices_are_dense_and_named_uniquely() {
        for (index, event) in DatapathEvent::ALL.iter().enumerate() {
            assert_eq!(*event as u32 as usize, index);
            for other in &DatapathEvent::ALL[index + 1..] {
                assert_ne!(event.name(), other.name());
            }
        }
        assert_eq!(DatapathEvent::ALL.len() as u32, DatapathEvent::COUNT);
    }
}
