//! Kernel programs of the mesh datapath.
//!
//! - `cgroup/connect4|6` redirect the TCP connects of enrolled workloads to the agent's outbound
//!   listener and remember the original destination by socket cookie.
//! - `cgroup/getpeername4|6` hand the dialled address back, so capture is invisible.
//! - `sockops` publishes each captured connection by client address and port for the agent, and
//!   (with acceleration on) puts both ends of a workload-to-agent hop into `MESH_SOCKS`.
//! - `sk_msg` splices bytes between the two ends of such a hop inside the kernel, while the
//!   receiving end's queue stays within a window; past it the sending socket falls back to
//!   TCP for good (the redirect itself has no flow control).
//! - `cgroup_skb` ingress and egress count bytes, packets and connections per workload.
//!
//! Every map is pinned by name so an agent restart keeps capture state and counters; sizes are
//! defaults that the agent overrides from its configuration at load time.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, sk_action,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_socket_cookie, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock_addr, map, sk_msg, sock_ops},
    maps::{
        Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockOpsContext},
};
use mesh_common::{
    CgroupVerdict, ConnInfo, DatapathConfig, DatapathEvent, Endpoint, FAMILY_INET, FAMILY_INET6,
    MAX_CGROUP_DEPTH, REDIRECT_WINDOW, RedirectState, SockTuple, TrafficCounters, WorkloadInfo,
    config_flags,
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// cgroup_skb verdict: let the packet through (accounting never drops).
const SKB_PASS: i32 = 1;
/// cgroup/connect and getpeername verdict: carry on.
const SOCK_ADDR_OK: i32 = 1;

#[map(name = "MESH_CONFIG")]
static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

#[map(name = "MESH_WORKLOADS")]
static WORKLOADS: HashMap<u64, WorkloadInfo> = HashMap::pinned(4096, 0);

#[map(name = "MESH_EXCLUDE_V4")]
static EXCLUDE_V4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(1024, 0);

#[map(name = "MESH_EXCLUDE_V6")]
static EXCLUDE_V6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(1024, 0);

#[map(name = "MESH_EXCLUDE_PORTS")]
static EXCLUDE_PORTS: HashMap<u16, u8> = HashMap::pinned(256, 0);

#[map(name = "MESH_ORIG_BY_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, ConnInfo> = LruHashMap::pinned(65536, 0);

#[map(name = "MESH_CONNS")]
static CONNS: LruHashMap<Endpoint, ConnInfo> = LruHashMap::pinned(65536, 0);

#[map(name = "MESH_SOCKS")]
static SOCKS: SockHash<SockTuple> = SockHash::pinned(65536, 0);

#[map(name = "MESH_REDIRECT_STATE")]
static REDIRECT_STATE: HashMap<SockTuple, RedirectState> = HashMap::pinned(65536, 0);

#[map(name = "MESH_REDIRECT_ALLOWANCE")]
static REDIRECT_ALLOWANCE: LruHashMap<SockTuple, u64> = LruHashMap::pinned(65536, 0);

#[map(name = "MESH_FLOW_SEQ")]
static FLOW_SEQ: LruHashMap<SockTuple, u32> = LruHashMap::pinned(65536, 0);

#[map(name = "MESH_COUNTERS")]
static COUNTERS: PerCpuHashMap<u64, TrafficCounters> = PerCpuHashMap::pinned(4096, 0);

#[map(name = "MESH_EVENTS")]
static EVENTS: PerCpuArray<u64> = PerCpuArray::pinned(DatapathEvent::COUNT, 0);

#[map(name = "MESH_CGROUP_VERDICTS")]
static CGROUP_VERDICTS: LruHashMap<u64, CgroupVerdict> = LruHashMap::pinned(16384, 0);

#[map(name = "MESH_ENROL_GENERATION")]
static ENROL_GENERATION: Array<u64> = Array::pinned(1, 0);

#[inline(always)]
fn config() -> Option<&'static DatapathConfig> {
    CONFIG.get(0)
}

#[inline(always)]
fn count_event(event: DatapathEvent) {
    if let Some(slot) = EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: a per-CPU map value of this CPU, valid until the program returns.
        unsafe { *slot += 1 };
    }
}

/// The per-CPU counters of a workload, created on first use.
#[inline(always)]
fn counters_of(workload_cgroup: u64) -> Option<*mut TrafficCounters> {
    if let Some(counters) = COUNTERS.get_ptr_mut(workload_cgroup) {
        return Some(counters);
    }
    let _ = COUNTERS.insert(
        workload_cgroup,
        TrafficCounters::default(),
        BPF_NOEXIST as u64,
    );
    COUNTERS.get_ptr_mut(workload_cgroup)
}

/// Whether a cgroup id is enrolled.
#[inline(always)]
fn is_enrolled(cgroup_id: u64) -> bool {
    // SAFETY: the map value is read (copied or compared) at once; no reference outlives this statement.
    unsafe { WORKLOADS.get(cgroup_id) }.is_some()
}

/// The enrolled workload a cgroup belongs to: the cgroup itself or its deepest enrolled
/// ancestor. `ancestor_at(level)` returns the ancestor at a depth (0 = root), 0 past the leaf.
#[inline(always)]
fn enrolled_workload(leaf: u64, ancestor_at: impl Fn(i32) -> u64) -> Option<u64> {
    if is_enrolled(leaf) {
        return Some(leaf);
    }
    let mut depth = MAX_CGROUP_DEPTH;
    for level in 1..MAX_CGROUP_DEPTH {
        let ancestor = ancestor_at(level);
        if ancestor == 0 || ancestor == leaf {
            depth = level;
            break;
        }
    }
    // Deepest first, so the most specific enrolment wins; each hit returns at once.
    for step in 1..MAX_CGROUP_DEPTH {
        if step >= depth {
            break;
        }
        let ancestor = ancestor_at(depth - step);
        if is_enrolled(ancestor) {
            return Some(ancestor);
        }
    }
    None
}

/// The enrolled workload the current task belongs to.
#[inline(always)]
fn current_workload() -> Option<u64> {
    // SAFETY: cgroup-id helpers have no memory arguments (the skb pointer is this program's own context) and are allowed for this hook.
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: cgroup-id helpers have no memory arguments (the skb pointer is this program's own context) and are allowed for this hook.
    enrolled_workload(leaf, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    })
}

/// The enrolled workload that owns a packet's socket. Every packet under the attach cgroup
/// asks (on a node, every packet of every process), so the answer is remembered per cgroup
/// for the current enrolment generation: one lookup instead of a walk up the ancestors with
/// a lookup per level.
#[inline(always)]
fn skb_workload(ctx: &SkBuffContext) -> Option<u64> {
    let skb = ctx.skb.skb;
    // SAFETY: cgroup-id helpers have no memory arguments (the skb pointer is this program's own context) and are allowed for this hook.
    let leaf = unsafe { bpf_skb_cgroup_id(skb) };
    if leaf == 0 {
        return None;
    }
    let generation = ENROL_GENERATION.get(0).copied().unwrap_or(0);
    // SAFETY: the map value is read (copied) at once; no reference outlives this statement.
    if let Some(verdict) = unsafe { CGROUP_VERDICTS.get(leaf) }.copied()
        && verdict.generation == generation
    {
        return (verdict.workload != 0).then_some(verdict.workload);
    }
    // SAFETY: cgroup-id helpers have no memory arguments (the skb pointer is this program's own context) and are allowed for this hook.
    let workload = enrolled_workload(leaf, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level)
    });
    let verdict = CgroupVerdict {
        workload: workload.unwrap_or(0),
        generation,
    };
    let _ = CGROUP_VERDICTS.insert(leaf, verdict, BPF_ANY as u64);
    workload
}

/// Whether the current connect() must be left alone: capture off, not TCP, or the agent itself.
#[inline(always)]
fn capture_settings(ctx: &SockAddrContext) -> Option<(&'static DatapathConfig, u64)> {
    // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
    let sock_type = unsafe { (*ctx.sock_addr).type_ };
    if sock_type != SOCK_STREAM {
        return None;
    }
    let cfg = config()?;
    if cfg.flags & config_flags::CAPTURE == 0 {
        return None;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == cfg.agent_tgid {
        return None;
    }
    let workload = current_workload()?;
    Some((cfg, workload))
}

#[inline(always)]
fn v4_excluded(cfg: &DatapathConfig, addr_be: u32, port: u16) -> bool {
    if addr_be == cfg.redirect_ip4 && u32::from(port) == cfg.redirect_port {
        return true;
    }
    // SAFETY: the map value is read (copied or compared) at once; no reference outlives this statement.
    if unsafe { EXCLUDE_PORTS.get(port) }.is_some() {
        return true;
    }
    EXCLUDE_V4
        .get(Key::new(32, addr_be.to_ne_bytes()))
        .is_some()
}

#[inline(always)]
fn v6_excluded(cfg: &DatapathConfig, addr_be: [u32; 4], port: u16) -> bool {
    if addr_be == cfg.redirect_ip6 && u32::from(port) == cfg.redirect_port {
        return true;
    }
    // SAFETY: the map value is read (copied or compared) at once; no reference outlives this statement.
    if unsafe { EXCLUDE_PORTS.get(port) }.is_some() {
        return true;
    }
    let mut bytes = [0u8; 16];
    let mut word = 0;
    while word < 4 {
        let chunk = addr_be[word].to_ne_bytes();
        bytes[word * 4] = chunk[0];
        bytes[word * 4 + 1] = chunk[1];
        bytes[word * 4 + 2] = chunk[2];
        bytes[word * 4 + 3] = chunk[3];
        word += 1;
    }
    EXCLUDE_V6.get(Key::new(128, bytes)).is_some()
}

/// Records a captured socket and bumps its workload's capture counter. Returns false when the
/// record could not be written: the connect then goes through uncaptured rather than to an agent
/// that could not tell where it was meant to go.
#[inline(always)]
fn record_capture(ctx: &SockAddrContext, original_dst: Endpoint, workload_cgroup: u64) -> bool {
    // SAFETY: the context pointer is the one the kernel passed to this program; the cookie helper is allowed for this hook.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let info = ConnInfo {
        original_dst,
        workload_cgroup,
        cookie,
    };
    if ORIG_BY_COOKIE.insert(cookie, info, BPF_ANY as u64).is_err() {
        count_event(DatapathEvent::RecordFailed);
        return false;
    }
    if let Some(counters) = counters_of(workload_cgroup) {
        // SAFETY: a per-CPU map value of this CPU, valid until the program returns.
        unsafe { (*counters).connections_captured += 1 };
    }
    count_event(DatapathEvent::Captured);
    true
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    let Some((cfg, workload)) = capture_settings(&ctx) else {
        return SOCK_ADDR_OK;
    };
    // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
    let addr_be = unsafe { (*ctx.sock_addr).user_ip4 };
    // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
    let port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16);
    if v4_excluded(cfg, addr_be, port) {
        count_event(DatapathEvent::Excluded);
        return SOCK_ADDR_OK;
    }
    if record_capture(&ctx, Endpoint::v4(addr_be, port), workload) {
        // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
        unsafe {
            (*ctx.sock_addr).user_ip4 = cfg.redirect_ip4;
            (*ctx.sock_addr).user_port = u32::from((cfg.redirect_port as u16).to_be());
        }
    }
    SOCK_ADDR_OK
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    let Some((cfg, workload)) = capture_settings(&ctx) else {
        return SOCK_ADDR_OK;
    };
    let addr_be = read_user_ip6(&ctx);
    // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
    let port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16);
    let mapped_v4 = Endpoint::mapped_v4(addr_be);
    let excluded = match mapped_v4 {
        Some(v4) => v4_excluded(cfg, v4, port),
        None => v6_excluded(cfg, addr_be, port),
    };
    if excluded {
        count_event(DatapathEvent::Excluded);
        return SOCK_ADDR_OK;
    }
    if record_capture(&ctx, Endpoint::v6(addr_be, port), workload) {
        // A dual-stack socket dialling an IPv4-mapped address can only reach an IPv4 listener.
        let redirect = match mapped_v4 {
            Some(_) => [addr_be[0], addr_be[1], addr_be[2], cfg.redirect_ip4],
            None => cfg.redirect_ip6,
        };
        write_user_ip6(&ctx, redirect);
        // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
        unsafe { (*ctx.sock_addr).user_port = u32::from((cfg.redirect_port as u16).to_be()) };
    }
    SOCK_ADDR_OK
}

/// Reads `user_ip6` one word at a time: the verifier only allows 4-byte accesses at fixed
/// context offsets, which a copy of the whole array could turn into a memcpy.
#[inline(always)]
fn read_user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
    read_ctx_words(unsafe { core::ptr::addr_of!((*ctx.sock_addr).user_ip6) })
}

/// Reads a four-word address field of a context struct with four 4-byte loads.
#[inline(always)]
fn read_ctx_words(field: *const [u32; 4]) -> [u32; 4] {
    let base = field as *const u32;
    // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
    unsafe {
        [
            core::ptr::read_volatile(base),
            core::ptr::read_volatile(base.add(1)),
            core::ptr::read_volatile(base.add(2)),
            core::ptr::read_volatile(base.add(3)),
        ]
    }
}

/// Writes `user_ip6` one word at a time (see [`read_user_ip6`]).
#[inline(always)]
fn write_user_ip6(ctx: &SockAddrContext, words: [u32; 4]) {
    // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
    let base = unsafe { core::ptr::addr_of_mut!((*ctx.sock_addr).user_ip6) } as *mut u32;
    // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
    unsafe {
        core::ptr::write_volatile(base, words[0]);
        core::ptr::write_volatile(base.add(1), words[1]);
        core::ptr::write_volatile(base.add(2), words[2]);
        core::ptr::write_volatile(base.add(3), words[3]);
    }
}

#[inline(always)]
fn captured_original(ctx: &SockAddrContext) -> Option<Endpoint> {
    // SAFETY: the context pointer is the one the kernel passed to this program; the cookie helper is allowed for this hook.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the map value is read (copied or compared) at once; no reference outlives this statement.
    unsafe { ORIG_BY_COOKIE.get(cookie) }.map(|info| info.original_dst)
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(original) = captured_original(&ctx)
        && original.family == FAMILY_INET
    {
        // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
        unsafe {
            (*ctx.sock_addr).user_ip4 = original.addr[0];
            (*ctx.sock_addr).user_port = u32::from((original.port as u16).to_be());
        }
    }
    SOCK_ADDR_OK
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(original) = captured_original(&ctx)
        && original.family == FAMILY_INET6
    {
        write_user_ip6(&ctx, original.addr);
        // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
        unsafe { (*ctx.sock_addr).user_port = u32::from((original.port as u16).to_be()) };
    }
    SOCK_ADDR_OK
}

/// The connection of a sock_ops callback as seen from its own socket. `remote_port` arrives in
/// network byte order in the upper half of the word on little-endian machines; `local_port` in
/// host byte order.
#[inline(always)]
fn sock_ops_tuple(ctx: &SockOpsContext) -> SockTuple {
    let family = ctx.family();
    let ops = ctx.ops;
    // Volatile loads at fixed offsets: the verifier refuses a context access through a pointer
    // the compiler computed (it would otherwise pick the IPv4 or IPv6 field by pointer).
    // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
    let (local_addr, remote_addr) = unsafe {
        if family == FAMILY_INET {
            (
                [
                    core::ptr::read_volatile(core::ptr::addr_of!((*ops).local_ip4)),
                    0,
                    0,
                    0,
                ],
                [
                    core::ptr::read_volatile(core::ptr::addr_of!((*ops).remote_ip4)),
                    0,
                    0,
                    0,
                ],
            )
        } else {
            (
                read_ctx_words(core::ptr::addr_of!((*ops).local_ip6)),
                read_ctx_words(core::ptr::addr_of!((*ops).remote_ip6)),
            )
        }
    };
    SockTuple {
        family,
        local_port: ctx.local_port(),
        remote_port: u32::from(remote_port_host(ctx.remote_port())),
        pad: 0,
        local_addr,
        remote_addr,
    }
}

#[inline(always)]
fn remote_port_host(raw: u32) -> u16 {
    u16::from_be((raw >> 16) as u16)
}

/// Whether an endpoint is the agent's outbound listener (also as an IPv4-mapped address).
#[inline(always)]
fn is_outbound_listener(cfg: &DatapathConfig, endpoint: &Endpoint) -> bool {
    if endpoint.port != cfg.redirect_port {
        return false;
    }
    if endpoint.family == FAMILY_INET {
        return endpoint.addr[0] == cfg.redirect_ip4;
    }
    match Endpoint::mapped_v4(endpoint.addr) {
        Some(v4) => v4 == cfg.redirect_ip4,
        None => endpoint.addr == cfg.redirect_ip6,
    }
}

/// Normalises an endpoint for `MESH_CONNS`: the agent's IPv4 listener sees IPv4-mapped clients
/// as plain IPv4.
#[inline(always)]
fn conn_key(endpoint: Endpoint) -> Endpoint {
    if endpoint.family == FAMILY_INET6
        && let Some(v4) = Endpoint::mapped_v4(endpoint.addr)
    {
        return Endpoint::v4(v4, endpoint.port as u16);
    }
    endpoint
}

#[sock_ops]
pub fn mesh_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        on_active_established(&ctx);
    } else if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        on_passive_established(&ctx);
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        on_close(&ctx);
    }
    0
}

/// A workload's captured connect() reached the agent: publish it for the agent's accept loop.
#[inline(always)]
fn on_active_established(ctx: &SockOpsContext) {
    // SAFETY: the context pointer is the one the kernel passed to this program; the cookie helper is allowed for this hook.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the map value is read (copied or compared) at once; no reference outlives this statement.
    let Some(info) = (unsafe { ORIG_BY_COOKIE.get(cookie) }) else {
        return;
    };
    let info = *info;
    let tuple = sock_ops_tuple(ctx);
    if CONNS
        .insert(conn_key(tuple.local()), info, BPF_ANY as u64)
        .is_ok()
    {
        count_event(DatapathEvent::Published);
    } else {
        count_event(DatapathEvent::RecordFailed);
    }
    // Clean up both records when the socket closes instead of waiting for LRU eviction.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    let accelerate = config().is_some_and(|cfg| cfg.flags & config_flags::ACCELERATE != 0);
    if accelerate {
        add_to_sockhash(ctx, tuple);
    }
}

/// Puts the socket of a sock_ops callback into `MESH_SOCKS` under its own tuple, with fresh
/// redirect bookkeeping (written first: `sk_msg` never redirects a socket without it). The close
/// callback removes both.
#[inline(always)]
fn add_to_sockhash(ctx: &SockOpsContext, tuple: SockTuple) {
    if REDIRECT_STATE
        .insert(tuple, RedirectState::default(), BPF_ANY as u64)
        .is_err()
    {
        count_event(DatapathEvent::SockHashFailed);
        return;
    }
    let _ = REDIRECT_ALLOWANCE.remove(tuple);
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    let mut key = tuple;
    if SOCKS
        // SAFETY: `ctx.ops` is the sock_ops context the kernel passed to this program, valid for its run.
        .update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64)
        .is_err()
    {
        count_event(DatapathEvent::SockHashFailed);
    }
}

/// The agent accepted a captured connection: its end joins the workload's end in `MESH_SOCKS`.
#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext) {
    let Some(cfg) = config() else {
        return;
    };
    if cfg.flags & config_flags::ACCELERATE == 0 {
        return;
    }
    let tuple = sock_ops_tuple(ctx);
    if !is_outbound_listener(cfg, &tuple.local()) {
        return;
    }
    // SAFETY: the map value is read (copied or compared) at once; no reference outlives this statement.
    if unsafe { CONNS.get(conn_key(tuple.remote())) }.is_none() {
        return;
    }
    add_to_sockhash(ctx, tuple);
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    // SAFETY: the context pointer is the one the kernel passed to this program; the cookie helper is allowed for this hook.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let _ = ORIG_BY_COOKIE.remove(cookie);
    let tuple = sock_ops_tuple(ctx);
    let _ = CONNS.remove(conn_key(tuple.local()));
    let _ = REDIRECT_STATE.remove(tuple);
    let _ = REDIRECT_ALLOWANCE.remove(tuple);
}

/// The connection of an sk_msg call as seen from the sending socket; same port encodings as
/// sock_ops.
#[inline(always)]
fn sk_msg_tuple(ctx: &SkMsgContext) -> SockTuple {
    let msg = ctx.msg;
    // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
    let family = unsafe { (*msg).family };
    let (local_addr, remote_addr) = if family == FAMILY_INET {
        // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
        unsafe { ([(*msg).local_ip4, 0, 0, 0], [(*msg).remote_ip4, 0, 0, 0]) }
    } else {
        // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
        unsafe {
            (
                read_ctx_words(core::ptr::addr_of!((*msg).local_ip6)),
                read_ctx_words(core::ptr::addr_of!((*msg).remote_ip6)),
            )
        }
    };
    SockTuple {
        family,
        // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
        local_port: unsafe { (*msg).local_port },
        // SAFETY: the context pointer is valid for the program's run and the verifier checks that this hook may access these fields.
        remote_port: u32::from(remote_port_host(unsafe { (*msg).remote_port })),
        pad: 0,
        local_addr,
        remote_addr,
    }
}

/// Redirects a message into the peer socket's receive queue (ingress), or lets it take the TCP
/// path. The redirect has no flow control (the peer's queue grows until the kernel refuses
/// memory, and the sender then sees `ENOMEM`), so a socket may only queue up to its allowance
/// on its peer: `REDIRECT_WINDOW` beyond what the peer's reader took, as far as the agent
/// reports it (`MESH_REDIRECT_ALLOWANCE`), else `REDIRECT_WINDOW` in all. A message that would
/// pass it, or whose peer is missing, takes the TCP path, and so does every later message of
/// that socket: the receiver reads its redirect queue before its TCP queue, so a redirected
/// byte must never follow one sent through TCP.
#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    let tuple = sk_msg_tuple(&ctx);
    let size = u64::from(ctx.size());
    let Some(state) = REDIRECT_STATE.get_ptr_mut(tuple) else {
        count_event(DatapathEvent::RedirectMissed);
        return sk_action::SK_PASS;
    };
    // SAFETY: a map value pointer the verifier checked for null, valid until the program
    // returns; one writer per entry (sk_msg runs under its socket's lock).
    let redirected = unsafe {
        if (*state).fallen_back != 0 {
            count_event(DatapathEvent::RedirectMissed);
            return sk_action::SK_PASS;
        }
        (*state).redirected
    };
    // SAFETY: the map value is read (copied) at once; no reference outlives this statement.
    let allowance = unsafe { REDIRECT_ALLOWANCE.get(tuple) }
        .copied()
        .unwrap_or(REDIRECT_WINDOW);
    let mut peer = tuple.reversed();
    let verdict = if redirected + size > allowance {
        i64::from(sk_action::SK_DROP)
    } else {
        SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS))
    };
    if verdict != i64::from(sk_action::SK_PASS) {
        // Over the allowance, or no peer socket (the agent's end is not in the map yet or is
        // gone): the TCP path, from now on.
        // SAFETY: as above.
        unsafe { (*state).fallen_back = 1 };
        count_event(DatapathEvent::RedirectMissed);
        return sk_action::SK_PASS;
    }
    // SAFETY: as above.
    unsafe { (*state).redirected = redirected + size };
    count_event(DatapathEvent::Redirected);
    // Bytes that skip the TCP stack skip cgroup_skb too: account for them here.
    let from_agent = config().is_some_and(|cfg| is_outbound_listener(cfg, &tuple.local()));
    let client = if from_agent {
        tuple.remote()
    } else {
        tuple.local()
    };
    // SAFETY: the map value is read (copied or compared) at once; no reference outlives this statement.
    if let Some(info) = unsafe { CONNS.get(conn_key(client)) }
        && let Some(counters) = counters_of(info.workload_cgroup)
    {
        // SAFETY: a per-CPU map value of this CPU, valid until the program returns.
        unsafe {
            if from_agent {
                (*counters).rx_payload_bytes += size;
            } else {
                (*counters).tx_payload_bytes += size;
            }
            (*counters).redirected_bytes += size;
        }
    }
    sk_action::SK_PASS
}

/// Direction of a packet relative to the workload's socket (kept in `SockTuple::pad`).
const DIRECTION_TX: u32 = 0;
const DIRECTION_RX: u32 = 1;

/// What accounting needs from a packet.
struct PacketFacts {
    /// L4 payload length.
    payload: u64,
    /// SYN without ACK: the first packet of a connection.
    syn_only: bool,
    /// TCP only: the flow (as seen from the workload's socket, direction in `pad`) and the
    /// sequence number just past the payload.
    tcp: Option<(SockTuple, u32)>,
    rst: bool,
}

/// Four bytes of a header as the kernel keeps them (network order), like a `u32` load.
#[inline(always)]
fn ne_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// An address of an IPv6 header at `at`, as four network-order words.
#[inline(always)]
fn addr16(bytes: &[u8], at: usize) -> [u32; 4] {
    [
        ne_u32(bytes, at),
        ne_u32(bytes, at + 4),
        ne_u32(bytes, at + 8),
        ne_u32(bytes, at + 12),
    ]
}

/// Reads what accounting needs of a packet with one load of the IP header (two for IPv6) and
/// one of the TCP header (each `bpf_skb_load_bytes` call costs about as much as the rest of the
/// program, so the fields are not read one by one).
#[inline(always)]
fn packet_facts(ctx: &SkBuffContext, direction: u32) -> Option<PacketFacts> {
    let len = u64::from(ctx.len());
    // The fixed IPv4 header; an IPv6 one is read again in full (40 bytes).
    let header = ctx.load::<[u8; 20]>(0).ok()?;
    let first = header[0];
    let (family, l4_offset, protocol, source, destination) = match first >> 4 {
        4 => (
            FAMILY_INET,
            usize::from(first & 0x0f) * 4,
            header[9],
            [ne_u32(&header, 12), 0, 0, 0],
            [ne_u32(&header, 16), 0, 0, 0],
        ),
        6 => {
            let header = ctx.load::<[u8; 40]>(0).ok()?;
            (
                FAMILY_INET6,
                40,
                header[6],
                addr16(&header, 8),
                addr16(&header, 24),
            )
        }
        _ => return None,
    };
    match protocol {
        IPPROTO_TCP => {
            // Ports, sequence number, acknowledgement number, data offset and flags.
            let tcp = ctx.load::<[u8; 14]>(l4_offset).ok()?;
            let source_port = u16::from_be_bytes([tcp[0], tcp[1]]);
            let destination_port = u16::from_be_bytes([tcp[2], tcp[3]]);
            let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            let data_offset = tcp[12];
            let flags = tcp[13];
            let payload = len.saturating_sub(l4_offset as u64 + u64::from(data_offset >> 4) * 4);
            let syn = flags & 0x02 != 0;
            let (local_port, remote_port, local_addr, remote_addr) = if direction == DIRECTION_TX {
                (source_port, destination_port, source, destination)
            } else {
                (destination_port, source_port, destination, source)
            };
            let flow = SockTuple {
                family,
                local_port: u32::from(local_port),
                remote_port: u32::from(remote_port),
                pad: direction,
                local_addr,
                remote_addr,
            };
            // SYN occupies one sequence number before the first payload byte.
            let start = if syn { seq.wrapping_add(1) } else { seq };
            Some(PacketFacts {
                payload,
                syn_only: flags & 0x12 == 0x02,
                tcp: Some((flow, start.wrapping_add(payload as u32))),
                rst: flags & 0x04 != 0,
            })
        }
        IPPROTO_UDP => Some(PacketFacts {
            payload: len.saturating_sub(l4_offset as u64 + 8),
            syn_only: false,
            tcp: None,
            rst: false,
        }),
        _ => Some(PacketFacts {
            payload: 0,
            syn_only: false,
            tcp: None,
            rst: false,
        }),
    }
}

/// Payload bytes of a packet that the flow has not carried before: retransmissions (and
/// segments the receiver dropped and got again) count once, so payload counters equal what
/// the application sent or received.
#[inline(always)]
fn new_payload(facts: &PacketFacts) -> u64 {
    let Some((flow, end)) = facts.tcp else {
        return facts.payload;
    };
    if facts.rst {
        let _ = FLOW_SEQ.remove(flow);
        return 0;
    }
    let advances = facts.payload > 0 || facts.syn_only;
    if !advances {
        // A bare ACK (or FIN): no payload to count and no sequence to remember.
        return 0;
    }
    match FLOW_SEQ.get_ptr_mut(flow) {
        None => {
            let _ = FLOW_SEQ.insert(flow, end, BPF_ANY as u64);
            facts.payload
        }
        Some(high) => {
            // SAFETY: a map value, valid until the program returns; a concurrent packet of
            // the same flow can at worst make one segment count twice or not at all, as with
            // a lookup then an update.
            let ahead = end.wrapping_sub(unsafe { *high }) as i32;
            if ahead <= 0 {
                return 0;
            }
            // Updated in place: an update through the map would allocate a fresh LRU element
            // and free the old one on every packet.
            // SAFETY: as above.
            unsafe { *high = end };
            // Bytes of this segment past the highest sequence seen so far.
            let ahead = ahead as u64;
            if ahead < facts.payload {
                ahead
            } else {
                facts.payload
            }
        }
    }
}

#[inline(always)]
fn account_packet(ctx: &SkBuffContext, direction: u32) {
    let Some(workload) = skb_workload(ctx) else {
        return;
    };
    let Some(facts) = packet_facts(ctx, direction) else {
        return;
    };
    let payload = new_payload(&facts);
    let Some(counters) = counters_of(workload) else {
        return;
    };
    // SAFETY: a per-CPU map value of this CPU, valid until the program returns.
    unsafe {
        if direction == DIRECTION_TX {
            (*counters).tx_bytes += u64::from(ctx.len());
            (*counters).tx_packets += 1;
            (*counters).tx_payload_bytes += payload;
            if facts.syn_only {
                (*counters).connections_out += 1;
            }
        } else {
            (*counters).rx_bytes += u64::from(ctx.len());
            (*counters).rx_packets += 1;
            (*counters).rx_payload_bytes += payload;
            if facts.syn_only {
                (*counters).connections_in += 1;
            }
        }
    }
}

#[cgroup_skb(egress)]
pub fn mesh_skb_egress(ctx: SkBuffContext) -> i32 {
    account_packet(&ctx, DIRECTION_TX);
    SKB_PASS
}

#[cgroup_skb(ingress)]
pub fn mesh_skb_ingress(ctx: SkBuffContext) -> i32 {
    account_packet(&ctx, DIRECTION_RX);
    SKB_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: eBPF programs cannot panic at run time (the verifier rejects any path that could
    // reach here), so this is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
