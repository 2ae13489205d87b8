//! The kernel fast path for opaque connections: once the agent has authorised a connection at
//! L4 and needs no L7 work on it, it hands its two sockets (the accepted client-side socket and
//! the upstream socket) to the kernel, whose `sk_skb` verdict redirects every received skb to
//! the other socket's egress. This module owns that hand-off and the connection's life after
//! it:
//!
//! - before the hand-off, every byte the agent already took off either socket (the sniffed
//!   prefix, anything that arrived since) is written to the other side, and both receive
//!   queues are read empty, so the kernel only ever sees whole, unread skbs: nothing is lost,
//!   doubled or reordered;
//! - flow control: the redirected bytes are queued on the peer's psock, which writes them into
//!   the peer's TCP send buffer, without a bound of its own. The agent compares, per
//!   direction, the bytes the verdict redirected with the bytes the destination socket has
//!   taken (`TCP_INFO` bytes acked plus `SIOCOUTQ`), on a tick and whenever the verdict reports
//!   (on the `MESH_SPLICE_WAKE` ring) that a socket's count crossed the limit the agent set.
//!   When the backlog passes [`PAUSE_ABOVE`] the agent takes the direction back: the verdict
//!   leaves the source's skbs on the source socket (charged to its receive buffer, so TCP's
//!   window holds the sender back), and once the destination has taken everything redirected
//!   before, the agent copies the rest in order, checking each read against what the source
//!   received minus what was carried (a socket can present the skb that carried its FIN a
//!   second time; the connection is then reset, never given a byte twice). (Removing the socket from the verdict map instead would race with a verdict run in
//!   progress, which then drops its skb.);
//! - half-close: when a source reaches EOF and everything before its FIN has reached the
//!   destination socket, the agent shuts the destination's write side; when both directions
//!   are done (or either socket fails) it removes both sockets from the maps and closes them
//!   (an error on one side resets the other);
//! - revocation: a caller-supplied check runs on every tick and cuts the connection (RST both
//!   ways) when policy no longer allows it.

use std::{
    collections::HashMap,
    io,
    net::Shutdown,
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex, Once, PoisonError},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
    sync::Notify,
};
use tracing::{debug, warn};

use super::{Datapath, DatapathError, DatapathMaps, SpliceSocket};

/// Bytes the agent may move itself while emptying the receive queues before a hand-off; a
/// writer that keeps them busy longer is left on the user-space path.
const DRAIN_BUDGET: usize = 8 << 20;
/// Kernel backlog (redirected but not yet in the destination socket) above which the agent
/// takes a direction back from the kernel.
pub const PAUSE_ABOVE: u64 = 4 << 20;
/// Step by which the wake-up limit moves.
const RESUME_BELOW: u64 = 1 << 20;
/// Supervision tick while a direction is being handed back or finishing.
const TICK_MIN: Duration = Duration::from_millis(1);
/// Supervision tick otherwise (the longest a revocation waits to take effect); a backlog that
/// grows wakes the supervision through the ring instead.
const TICK_MAX: Duration = Duration::from_millis(250);

/// Why the kernel path could not be used, or failed.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error("socket operation failed: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Map(#[from] DatapathError),
}

/// How a connection the kernel carried ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadEnd {
    /// Both sides finished; each half-close was passed on.
    Closed,
    /// A socket failed (reset, timeout); the other side was reset.
    Failed,
    /// Policy no longer allows the connection; both sides were reset.
    Revoked,
}

/// What a hand-off carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadReport {
    /// Bytes delivered client -> upstream (agent and kernel together).
    pub to_upstream: u64,
    /// Bytes delivered upstream -> client.
    pub to_workload: u64,
    /// The part of both that the kernel redirected.
    pub kernel_bytes: u64,
    pub end: OffloadEnd,
}

/// The result of [`offload`].
#[derive(Debug)]
pub enum Offload {
    /// The kernel carried the connection to its end.
    Carried(OffloadReport),
    /// Not handed off (a side finished or kept the agent busy during the hand-off, or the
    /// maps refused the sockets); the caller carries on in user space. The counts are what
    /// the agent already moved.
    Declined {
        to_upstream: u64,
        to_workload: u64,
        reason: &'static str,
    },
}

/// The connections the kernel carries, by socket cookie, and the reader of the wake-up ring
/// that nudges them.
#[derive(Debug)]
pub struct SpliceWakers {
    waiting: Mutex<HashMap<u64, Arc<Notify>>>,
    reader: Once,
}

impl Default for SpliceWakers {
    fn default() -> Self {
        Self {
            waiting: Mutex::new(HashMap::new()),
            reader: Once::new(),
        }
    }
}

impl SpliceWakers {
    fn register(&self, cookies: [u64; 2]) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        for cookie in cookies {
            waiting.insert(cookie, Arc::clone(&notify));
        }
        notify
    }

    fn unregister(&self, cookies: [u64; 2]) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        for cookie in cookies {
            waiting.remove(&cookie);
        }
    }

    fn wake(&self, cookie: u64) {
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(notify) = waiting.get(&cookie) {
            notify.notify_one();
        }
    }

    /// Starts the ring reader on first use (it needs the agent's runtime).
    fn ensure_reader(self: &Arc<Self>, maps: &DatapathMaps) {
        self.reader.call_once(|| {
            let Some(ring) = maps.take_splice_wake() else {
                return;
            };
            // SAFETY: the ring owns its map descriptor, which stays open and unchanged for as
            // long as the ring (moved into the AsyncFd) lives.
            match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
                Ok(ring) => {
                    tokio::spawn(read_wakeups(ring, Arc::clone(self)));
                }
                Err(error) => {
                    warn!(%error, "cannot watch the splice wake-up ring; pacing by tick only");
                }
            }
        });
    }
}

async fn read_wakeups(mut ring: AsyncFd<RingBuf<MapData>>, wakers: Arc<SpliceWakers>) {
    loop {
        let Ok(mut guard) = ring.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if let Some(bytes) = item.get(..8) {
                let mut word = [0u8; 8];
                word.copy_from_slice(bytes);
                wakers.wake(u64::from_ne_bytes(word));
            }
        }
        guard.clear_ready();
    }
}

/// Removes a connection's sockets from the kernel maps however the supervision ends.
struct Spliced<'a> {
    maps: &'a DatapathMaps,
    wakers: &'a SpliceWakers,
    cookies: [u64; 2],
}

impl Drop for Spliced<'_> {
    fn drop(&mut self) {
        self.wakers.unregister(self.cookies);
        if let Err(error) = self.maps.splice_remove(self.cookies) {
            debug!(%error, "removing spliced sockets from the maps failed");
        }
    }
}

/// Who carries a direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carrier {
    /// The kernel redirects the source's skbs to the destination.
    Kernel,
    /// The verdict now leaves the source's bytes on the source; the agent takes over once
    /// everything the kernel redirected has reached the destination socket.
    HandingBack,
    /// The agent copies the rest (until the source's EOF).
    Agent,
}

/// One direction of a spliced connection.
struct Direction<'a> {
    name: &'static str,
    src: &'a TcpStream,
    dst: &'a TcpStream,
    src_socket: SpliceSocket,
    /// Bytes the destination socket had taken when the kernel took over.
    dst_base: u64,
    /// Bytes the agent moved itself (prefix, hand-off drain, and after a hand-back).
    by_agent: u64,
    /// The wake-up limit last written for the source.
    limit: u64,
    carrier: Carrier,
    eof: bool,
    done: bool,
}

/// Hands an authorised opaque connection to the kernel and supervises it to its end. The
/// caller has already written the sniffed prefix to `upstream`. `revoked` is asked on every
/// tick whether policy still allows the connection.
pub async fn offload(
    datapath: &Datapath,
    client: &TcpStream,
    upstream: &TcpStream,
    prefix_sent: u64,
    workload_cgroup: u64,
    revoked: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Offload, OffloadError> {
    let maps = datapath.maps();
    let wakers = datapath.splice_wakers();
    wakers.ensure_reader(maps);
    // 1. Empty both receive queues, forwarding what they held.
    let mut buffer = vec![0u8; 64 * 1024];
    let mut budget = DRAIN_BUDGET;
    let mut to_upstream = prefix_sent;
    let mut to_workload = 0u64;
    let declined = |to_upstream, to_workload, reason| {
        Ok(Offload::Declined {
            to_upstream,
            to_workload,
            reason,
        })
    };
    loop {
        let up = drain(client, upstream, &mut buffer, &mut budget).await?;
        to_upstream += up.moved;
        let down = drain(upstream, client, &mut buffer, &mut budget).await?;
        to_workload += down.moved;
        if up.eof || down.eof {
            return declined(
                to_upstream,
                to_workload,
                "a side finished during the hand-off",
            );
        }
        if up.exhausted || down.exhausted {
            return declined(
                to_upstream,
                to_workload,
                "bulk data kept arriving during the hand-off",
            );
        }
        if up.moved == 0 && down.moved == 0 {
            break;
        }
    }
    // 2. What each destination has taken so far: the baseline for the kernel's share.
    let client_cookie = socket_cookie(client.as_raw_fd())?;
    let upstream_cookie = socket_cookie(upstream.as_raw_fd())?;
    let client_base = taken(client.as_raw_fd())?;
    let upstream_base = taken(upstream.as_raw_fd())?;
    let pair = [
        SpliceSocket {
            cookie: client_cookie,
            fd: client.as_raw_fd(),
        },
        SpliceSocket {
            cookie: upstream_cookie,
            fd: upstream.as_raw_fd(),
        },
    ];
    // 3. Into the maps: redirect targets and peers first, then the verdict, socket by socket;
    //    from here on the kernel moves the bytes.
    if let Err(error) = maps.splice_prepare(pair, workload_cgroup) {
        debug!(%error, "the kernel path refused the connection; carrying it in user space");
        return declined(
            to_upstream,
            to_workload,
            "the socket maps refused the sockets",
        );
    }
    let guard = Spliced {
        maps,
        wakers,
        cookies: [client_cookie, upstream_cookie],
    };
    let wake = wakers.register([client_cookie, upstream_cookie]);
    for socket in pair {
        if let Err(error) = maps.splice_set_limit(socket.cookie, PAUSE_ABOVE) {
            debug!(%error, "no wake-up limit; pacing by tick only");
        }
    }
    // Only established sockets may join the verdict map. The first one failing means nothing
    // was redirected yet: the agent keeps the connection. The second one failing after the
    // first joined (a FIN raced the hand-off) leaves its direction to the agent from the
    // start (it never reached the verdict).
    if let Err(error) = maps.splice_resume(pair[0]) {
        drop(guard);
        debug!(%error, "the kernel path refused the connection; carrying it in user space");
        return declined(
            to_upstream,
            to_workload,
            "a socket could not join the verdict map",
        );
    }
    let upstream_joined = match maps.splice_resume(pair[1]) {
        Ok(()) => true,
        Err(_) if read_closed(upstream) => false,
        Err(error) => {
            drop(guard);
            return Err(error.into());
        }
    };
    debug!(
        client_cookie,
        upstream_cookie, "connection handed to the kernel (sk_skb redirect)"
    );
    // Bytes that landed between the last read and the hand-off raised no event the verdict
    // saw: have the kernel look at the receive queues now.
    kick(client.as_raw_fd())?;
    if upstream_joined {
        kick(upstream.as_raw_fd())?;
    }

    let mut directions = [
        Direction {
            name: "to upstream",
            src: client,
            dst: upstream,
            src_socket: pair[0],
            dst_base: upstream_base,
            by_agent: to_upstream,
            limit: PAUSE_ABOVE,
            carrier: Carrier::Kernel,
            eof: false,
            done: false,
        },
        Direction {
            name: "to workload",
            src: upstream,
            dst: client,
            src_socket: pair[1],
            dst_base: client_base,
            by_agent: to_workload,
            limit: PAUSE_ABOVE,
            // Not in the verdict map: plain TCP, which the agent carries.
            carrier: if upstream_joined {
                Carrier::Kernel
            } else {
                Carrier::Agent
            },
            eof: false,
            done: false,
        },
    ];
    let end = supervise(maps, &mut directions, &wake, revoked).await;
    let redirected = |direction: &Direction<'_>| {
        maps.splice_redirected(direction.src_socket.cookie)
            .ok()
            .flatten()
            .unwrap_or(0)
    };
    let kernel_up = redirected(&directions[0]);
    let kernel_down = redirected(&directions[1]);
    if end == OffloadEnd::Closed {
        let dropped = discard_leftovers(client) + discard_leftovers(upstream);
        if dropped > 0 {
            debug!(
                dropped,
                "dropped bytes presented again after the end of the streams"
            );
        }
    }
    drop(guard);
    if end != OffloadEnd::Closed {
        reset(client);
        reset(upstream);
    }
    Ok(Offload::Carried(OffloadReport {
        to_upstream: directions[0].by_agent + kernel_up,
        to_workload: directions[1].by_agent + kernel_down,
        kernel_bytes: kernel_up + kernel_down,
        end,
    }))
}

/// A direction's copy by the agent, once taken back from the kernel.
type Copy<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<u64>> + Send + 'a>>;

/// Drives a direction's copy, or never completes when there is none.
async fn run_copy(copy: &mut Option<Copy<'_>>) -> io::Result<u64> {
    match copy {
        Some(copy) => copy.await,
        None => std::future::pending().await,
    }
}

/// Watches both sockets until the connection ends, passing half-closes on and taking back a
/// direction whose destination falls behind.
async fn supervise<'a>(
    maps: &'a DatapathMaps,
    directions: &mut [Direction<'a>; 2],
    wake: &Notify,
    revoked: &(dyn Fn() -> bool + Send + Sync),
) -> OffloadEnd {
    let mut tick = TICK_MAX;
    let mut copies: [Option<Copy<'a>>; 2] = [None, None];
    for (direction, copy) in directions.iter().zip(copies.iter_mut()) {
        if direction.carrier == Carrier::Agent {
            *copy = Some(copy_rest(maps, direction));
        }
    }
    loop {
        if directions.iter().all(|direction| direction.done) {
            return OffloadEnd::Closed;
        }
        let [first, second] = &*directions;
        // The kernel-carried sources are watched for EOF; the others only for errors (their
        // readability belongs to the copy).
        let watch_first = !first.eof && first.carrier != Carrier::Agent;
        let watch_second = !second.eof && second.carrier != Carrier::Agent;
        let [first_copy, second_copy] = &mut copies;
        tokio::select! {
            ready = first.src.ready(Interest::READABLE | Interest::ERROR), if watch_first => {
                if readiness_failed(first, ready) {
                    return OffloadEnd::Failed;
                }
            }
            ready = second.src.ready(Interest::READABLE | Interest::ERROR), if watch_second => {
                if readiness_failed(second, ready) {
                    return OffloadEnd::Failed;
                }
            }
            ready = first.src.ready(Interest::ERROR), if !watch_first => {
                if readiness_failed(first, ready) {
                    return OffloadEnd::Failed;
                }
            }
            ready = second.src.ready(Interest::ERROR), if !watch_second => {
                if readiness_failed(second, ready) {
                    return OffloadEnd::Failed;
                }
            }
            copied = run_copy(first_copy) => {
                if !copy_finished(&mut directions[0], copied) {
                    return OffloadEnd::Failed;
                }
                copies[0] = None;
            }
            copied = run_copy(second_copy) => {
                if !copy_finished(&mut directions[1], copied) {
                    return OffloadEnd::Failed;
                }
                copies[1] = None;
            }
            () = wake.notified() => {}
            () = tokio::time::sleep(tick) => {}
        }
        if revoked() {
            return OffloadEnd::Revoked;
        }
        let mut busy = false;
        for (direction, copy) in directions.iter_mut().zip(copies.iter_mut()) {
            if direction.done || direction.carrier == Carrier::Agent {
                continue;
            }
            if !direction.eof && read_closed(direction.src) {
                direction.eof = true;
            }
            match step(maps, direction) {
                Ok(moving) => busy |= moving,
                Err(error) => {
                    debug!(direction = direction.name, %error, "kernel path supervision failed");
                    return OffloadEnd::Failed;
                }
            }
            if direction.carrier == Carrier::Agent {
                // Everything the kernel redirected is in the destination socket: the rest of
                // the source's bytes (queued on the source) follow in order.
                *copy = Some(copy_rest(maps, direction));
            }
        }
        // Growth of a backlog wakes the supervision through the ring; only a direction being
        // handed back or finishing needs a short tick.
        tick = if busy { TICK_MIN } else { TICK_MAX };
    }
}

/// Records the end of a direction's copy; false when it failed.
fn copy_finished(direction: &mut Direction<'_>, copied: io::Result<u64>) -> bool {
    match copied {
        Ok(copied) => {
            direction.by_agent += copied;
            direction.done = true;
            true
        }
        Err(error) => {
            debug!(direction = direction.name, %error, "copy after the hand-back failed");
            false
        }
    }
}

/// One supervision step of a kernel-carried direction: the hand-back when its destination
/// falls behind, and the half-close once its source is at EOF and everything it sent is in the
/// destination socket. Returns whether the direction needs a short tick.
fn step(maps: &DatapathMaps, direction: &mut Direction<'_>) -> Result<bool, OffloadError> {
    if direction.eof || direction.carrier == Carrier::HandingBack {
        // Taking the source's socket lock (TCP_INFO does) waits out a verdict run in
        // progress, so the count read next is final for what came before (the FIN, or the
        // hand-back).
        let _ = taken(direction.src.as_raw_fd())?;
    }
    let redirected = maps
        .splice_redirected(direction.src_socket.cookie)?
        .unwrap_or(0);
    let delivered = taken(direction.dst.as_raw_fd())?.saturating_sub(direction.dst_base);
    let backlog = redirected.saturating_sub(delivered);
    match direction.carrier {
        Carrier::Kernel if backlog > PAUSE_ABOVE && !direction.eof => {
            // The kernel would queue without bound: the agent carries this direction from
            // here, at the destination's pace. (Taking the socket out of the verdict map
            // instead could drop an skb whose verdict runs at that moment.)
            maps.splice_take_back(direction.src_socket.cookie)?;
            direction.carrier = Carrier::HandingBack;
            debug!(
                direction = direction.name,
                backlog, "destination behind; the agent takes this direction back"
            );
            Ok(true)
        }
        Carrier::Kernel => {
            // Wake when the backlog would pass the mark; moved in steps, not on every tick.
            let limit = delivered + PAUSE_ABOVE;
            if limit >= direction.limit + RESUME_BELOW {
                maps.splice_set_limit(direction.src_socket.cookie, limit)?;
                direction.limit = limit;
            }
            if direction.eof && backlog == 0 {
                // Everything before the FIN is in the destination's send queue: pass it on.
                socket2::SockRef::from(direction.dst).shutdown(Shutdown::Write)?;
                direction.done = true;
                return Ok(false);
            }
            Ok(direction.eof)
        }
        Carrier::HandingBack => {
            if backlog == 0 {
                direction.carrier = Carrier::Agent;
                return Ok(false);
            }
            Ok(true)
        }
        Carrier::Agent => Ok(false),
    }
}

/// Copies what the source still receives to the destination until the source's EOF, then
/// half-closes the destination; returns the bytes copied. The source's bytes are read from
/// the socket (the verdict leaves them there); EOF counts only once every byte the source
/// received is accounted for (the agent's, the kernel's, the copy's), so none still queued
/// inside the kernel is cut off.
fn copy_rest<'a>(maps: &'a DatapathMaps, direction: &Direction<'a>) -> Copy<'a> {
    Box::pin(copy_rest_of(
        maps,
        direction.name,
        direction.src,
        direction.dst,
        direction.src_socket.cookie,
        direction.by_agent,
    ))
}

async fn copy_rest_of(
    maps: &DatapathMaps,
    name: &'static str,
    src: &TcpStream,
    dst: &TcpStream,
    cookie: u64,
    read_before: u64,
) -> io::Result<u64> {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    // Final: the verdict redirects nothing after the hand-back.
    let redirected = maps
        .splice_redirected(cookie)
        .map_err(io::Error::other)?
        .unwrap_or(0);
    loop {
        let read = src.try_io(Interest::READABLE, || {
            nix::sys::socket::recv(
                src.as_raw_fd(),
                &mut buffer,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)
        });
        match read {
            Ok(0) => {}
            Ok(count) => {
                // Fail closed: never pass on more than the source received (what the agent
                // read before, what the kernel redirected, what this copy moved); at the end
                // of a stream a socket can present the skb that carried the FIN a second time.
                // The FIN counts one in `tcpi_bytes_received`: the check is lenient by one.
                let received = tcp_info_word(src.as_raw_fd(), TCPI_BYTES_RECEIVED)?;
                let allowed = received.saturating_sub(read_before + redirected);
                if copied + count as u64 > allowed {
                    warn!(
                        direction = name,
                        received,
                        read_before,
                        redirected,
                        copied,
                        count,
                        "read more bytes than the source received after the hand-back; resetting the connection"
                    );
                    return Err(io::Error::other(
                        "byte accounting mismatch after the hand-back",
                    ));
                }
                write_all(dst, &buffer[..count]).await?;
                copied += count as u64;
                continue;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if !read_closed(src) {
                    src.readable().await?;
                    continue;
                }
            }
            Err(error) => return Err(error),
        }
        // The source is at EOF, or says so: check that nothing is still on its way.
        let received = received_so_far(src.as_raw_fd())?;
        if received.fin && received.data <= read_before + redirected + copied {
            break;
        }
        tokio::time::sleep(TICK_MIN).await;
    }
    socket2::SockRef::from(dst).shutdown(Shutdown::Write)?;
    debug!(
        direction = name,
        copied, "the agent carried the rest of this direction"
    );
    Ok(copied)
}

/// Reads and drops what a finished source still presents past its counted bytes, so closing
/// it sends a FIN, not the RST that unread data would cause.
fn discard_leftovers(stream: &TcpStream) -> u64 {
    let mut buffer = [0u8; 16 * 1024];
    let mut dropped = 0u64;
    while let Ok(count) = nix::sys::socket::recv(
        stream.as_raw_fd(),
        &mut buffer,
        nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    ) {
        if count == 0 {
            break;
        }
        dropped += count as u64;
    }
    dropped
}

/// Whether a readiness event means the socket failed. Plain readability (which a spliced
/// socket only shows transiently) is cleared so the next wait sleeps.
fn readiness_failed(direction: &Direction<'_>, ready: io::Result<tokio::io::Ready>) -> bool {
    let stream = direction.src;
    let ready = match ready {
        Ok(ready) => ready,
        Err(_) => return true,
    };
    if let Ok(Some(error)) = stream.take_error() {
        debug!(source_of = direction.name, %error, "spliced socket failed");
        return true;
    }
    if ready.is_error() {
        return true;
    }
    if !ready.is_read_closed() {
        let _ = stream.try_io(Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }
    false
}

/// Whether the peer of a socket has sent its FIN (`RCV_SHUTDOWN`), asked of the kernel.
fn read_closed(stream: &TcpStream) -> bool {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout: poll only reports the socket's state.
    let polled = unsafe { libc::poll(&mut poll, 1, 0) };
    polled > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
}

/// What one drain pass did.
struct Drained {
    moved: u64,
    eof: bool,
    exhausted: bool,
}

/// Reads `from` until its receive queue is empty (EAGAIN), writing everything to `to`.
async fn drain(
    from: &TcpStream,
    to: &TcpStream,
    buffer: &mut [u8],
    budget: &mut usize,
) -> io::Result<Drained> {
    let mut moved = 0u64;
    loop {
        // Straight to the kernel: tokio's cached readiness may not know of bytes yet.
        let count = match nix::sys::socket::recv(
            from.as_raw_fd(),
            buffer,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(count) => count,
            Err(nix::errno::Errno::EAGAIN) => {
                return Ok(Drained {
                    moved,
                    eof: false,
                    exhausted: false,
                });
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
        };
        if count == 0 {
            return Ok(Drained {
                moved,
                eof: true,
                exhausted: false,
            });
        }
        write_all(to, &buffer[..count]).await?;
        moved += count as u64;
        *budget = budget.saturating_sub(count);
        if *budget == 0 {
            return Ok(Drained {
                moved,
                eof: false,
                exhausted: true,
            });
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => data = &data[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// The socket's cookie (`SO_COOKIE`), the key of the splice maps.
fn socket_cookie(fd: RawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut length = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `length` are valid for writes of the sizes passed.
    let result = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut length,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Offset of `tcpi_bytes_acked` (u64) in `struct tcp_info` (stable kernel ABI since 4.1).
const TCPI_BYTES_ACKED: usize = 120;
/// Offset of `tcpi_bytes_received` (u64; a received FIN counts one).
const TCPI_BYTES_RECEIVED: usize = 128;
/// Bytes of `struct tcp_info` read (up to and including `tcpi_bytes_received`).
const TCP_INFO_LEN: usize = TCPI_BYTES_RECEIVED + 8;

fn bytes_acked(fd: RawFd) -> io::Result<u64> {
    tcp_info_word(fd, TCPI_BYTES_ACKED)
}

/// Bytes a socket received, read in one `TCP_INFO` snapshot with whether its peer's FIN is
/// among them (the FIN counts one in `tcpi_bytes_received`).
struct Received {
    data: u64,
    fin: bool,
}

fn received_so_far(fd: RawFd) -> io::Result<Received> {
    let info = tcp_info(fd)?;
    let total = word_at(&info, TCPI_BYTES_RECEIVED);
    // CLOSE_WAIT, LAST_ACK, CLOSING, TIME_WAIT, CLOSE: the peer's FIN has arrived.
    let fin = matches!(info[0], 6 | 7 | 8 | 9 | 11);
    Ok(Received {
        data: if fin { total.saturating_sub(1) } else { total },
        fin,
    })
}

fn word_at(info: &[u8; TCP_INFO_LEN], offset: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&info[offset..offset + 8]);
    u64::from_ne_bytes(word)
}

fn tcp_info_word(fd: RawFd, offset: usize) -> io::Result<u64> {
    Ok(word_at(&tcp_info(fd)?, offset))
}

fn tcp_info(fd: RawFd) -> io::Result<[u8; TCP_INFO_LEN]> {
    let mut info = [0u8; TCP_INFO_LEN];
    let mut length = TCP_INFO_LEN as libc::socklen_t;
    // SAFETY: `info` and `length` are valid for writes of the sizes passed.
    let result = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut length,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    if (length as usize) < TCP_INFO_LEN {
        return Err(io::Error::other(
            "kernel tcp_info lacks tcpi_bytes_acked/tcpi_bytes_received",
        ));
    }
    Ok(info)
}

fn unsent(fd: RawFd) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// Every byte a socket has been given to send so far: acknowledged plus still queued. Read
/// until the acknowledged count is stable around the queue read, so an ACK in between can
/// neither double-count nor miss bytes.
fn taken(fd: RawFd) -> io::Result<u64> {
    loop {
        let before = bytes_acked(fd)?;
        let queued = unsent(fd)?;
        if bytes_acked(fd)? == before {
            return Ok(before + queued);
        }
    }
}

/// Makes the kernel look at bytes already in a socket's receive queue: setting `SO_RCVLOWAT`
/// runs the socket's data-ready callback, which is the verdict program for a spliced socket.
fn kick(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the option value is a valid int for the size passed.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes with RST when the socket is dropped.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn taken_counts_every_byte_handed_to_a_socket() {
        let (mut writer, mut reader) = pair().await;
        let base = taken(writer.as_raw_fd()).unwrap();
        writer.write_all(&[7u8; 300_000]).await.unwrap();
        assert_eq!(taken(writer.as_raw_fd()).unwrap() - base, 300_000);
        let mut sink = vec![0u8; 300_000];
        reader.read_exact(&mut sink).await.unwrap();
        assert_eq!(taken(writer.as_raw_fd()).unwrap() - base, 300_000);
    }

    #[tokio::test]
    async fn received_counts_data_and_the_fin_apart() {
        let (mut writer, reader) = pair().await;
        writer.write_all(b"hello").await.unwrap();
        while received_so_far(reader.as_raw_fd()).unwrap().data < 5 {
            tokio::task::yield_now().await;
        }
        let before_fin = received_so_far(reader.as_raw_fd()).unwrap();
        assert_eq!((before_fin.data, before_fin.fin), (5, false));
        writer.shutdown().await.unwrap();
        while !read_closed(&reader) {
            tokio::task::yield_now().await;
        }
        let after_fin = received_so_far(reader.as_raw_fd()).unwrap();
        assert_eq!((after_fin.data, after_fin.fin), (5, true));
    }

    #[tokio::test]
    async fn cookies_differ_per_socket_and_stay_stable() {
        let (one, two) = pair().await;
        let first = socket_cookie(one.as_raw_fd()).unwrap();
        assert_ne!(first, socket_cookie(two.as_raw_fd()).unwrap());
        assert_eq!(first, socket_cookie(one.as_raw_fd()).unwrap());
    }

    #[tokio::test]
    async fn drain_forwards_queued_bytes_and_reports_eof() {
        let (mut writer, from) = pair().await;
        let (to, mut reader) = pair().await;
        writer.write_all(b"hello").await.unwrap();
        writer.shutdown().await.unwrap();
        // Wait until both the bytes and the FIN are queued.
        while !read_closed(&from) {
            tokio::task::yield_now().await;
        }
        let mut buffer = vec![0u8; 16];
        let mut budget = DRAIN_BUDGET;
        let drained = drain(&from, &to, &mut buffer, &mut budget).await.unwrap();
        assert_eq!(drained.moved, 5);
        assert!(drained.eof);
        let mut got = [0u8; 5];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }
}
