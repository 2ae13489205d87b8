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
//!   the peer's TCP send buffer. The agent compares, per direction, the bytes the verdict
//!   redirected with the bytes the destination socket has taken (`TCP_INFO` bytes acked plus
//!   `SIOCOUTQ`); when the backlog passes [`PAUSE_ABOVE`] it takes the source socket out of the
//!   verdict map, so its bytes stay in its TCP receive queue and its window closes, and puts
//!   it back once the backlog is under [`RESUME_BELOW`];
//! - half-close: when a source reaches EOF and everything before its FIN has reached the
//!   destination socket, the agent shuts the destination's write side; when both directions
//!   are done (or either socket fails) it removes both sockets from the maps and closes them
//!   (an error on one side resets the other);
//! - revocation: a caller-supplied check runs on every tick and cuts the connection (RST both
//!   ways) when policy no longer allows it.

use std::{
    io,
    net::Shutdown,
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream};
use tracing::debug;

use super::{DatapathError, DatapathMaps, SpliceSocket};

/// Bytes the agent may move itself while emptying the receive queues before a hand-off; a
/// writer that keeps them busy longer is left on the user-space path.
const DRAIN_BUDGET: usize = 8 << 20;
/// Kernel backlog (redirected but not yet in the destination socket) above which a direction's
/// source is paused.
pub const PAUSE_ABOVE: u64 = 4 << 20;
/// Backlog under which a paused direction resumes.
pub const RESUME_BELOW: u64 = 1 << 20;
/// Supervision tick while bytes are moving or a direction is paused or finishing.
const TICK_MIN: Duration = Duration::from_millis(1);
/// Supervision tick of an idle connection (the longest a revocation waits to take effect).
const TICK_MAX: Duration = Duration::from_millis(100);

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

/// Removes a connection's sockets from the kernel maps however the supervision ends.
struct Spliced<'a> {
    maps: &'a DatapathMaps,
    cookies: [u64; 2],
}

impl Drop for Spliced<'_> {
    fn drop(&mut self) {
        if let Err(error) = self.maps.splice_remove(self.cookies) {
            debug!(%error, "removing spliced sockets from the maps failed");
        }
    }
}

/// One direction of a spliced connection.
struct Direction<'a> {
    name: &'static str,
    src: &'a TcpStream,
    dst: &'a TcpStream,
    src_socket: SpliceSocket,
    /// Bytes the destination socket had taken when the kernel took over.
    dst_base: u64,
    /// Bytes the agent moved itself (prefix and hand-off drain).
    by_agent: u64,
    eof: bool,
    paused: bool,
    done: bool,
}

/// Hands an authorised opaque connection to the kernel and supervises it to its end. The
/// caller has already written the sniffed prefix to `upstream`. `revoked` is asked on every
/// tick whether policy still allows the connection.
pub async fn offload(
    maps: &DatapathMaps,
    client: &TcpStream,
    upstream: &TcpStream,
    prefix_sent: u64,
    workload_cgroup: u64,
    revoked: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Offload, OffloadError> {
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
    // 3. Into the maps; from here on the kernel moves the bytes.
    if let Err(error) = maps.splice_add(pair, workload_cgroup) {
        debug!(%error, "the kernel path refused the connection; carrying it in user space");
        return declined(
            to_upstream,
            to_workload,
            "the socket maps refused the sockets",
        );
    }
    let guard = Spliced {
        maps,
        cookies: [client_cookie, upstream_cookie],
    };
    debug!(
        client_cookie,
        upstream_cookie, "connection handed to the kernel (sk_skb redirect)"
    );
    // Bytes that landed between the last read and the hand-off raised no event the verdict
    // saw: have the kernel look at the receive queues now.
    kick(client.as_raw_fd())?;
    kick(upstream.as_raw_fd())?;

    let mut directions = [
        Direction {
            name: "to upstream",
            src: client,
            dst: upstream,
            src_socket: pair[0],
            dst_base: upstream_base,
            by_agent: to_upstream,
            eof: false,
            paused: false,
            done: false,
        },
        Direction {
            name: "to workload",
            src: upstream,
            dst: client,
            src_socket: pair[1],
            dst_base: client_base,
            by_agent: to_workload,
            eof: false,
            paused: false,
            done: false,
        },
    ];
    let end = supervise(maps, &mut directions, revoked).await;
    let redirected = |direction: &Direction<'_>| {
        maps.splice_redirected(direction.src_socket.cookie)
            .ok()
            .flatten()
            .unwrap_or(0)
    };
    let kernel_up = redirected(&directions[0]);
    let kernel_down = redirected(&directions[1]);
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

/// Watches both sockets until the connection ends, passing half-closes on and pausing a
/// direction whose destination falls behind.
async fn supervise(
    maps: &DatapathMaps,
    directions: &mut [Direction<'_>; 2],
    revoked: &(dyn Fn() -> bool + Send + Sync),
) -> OffloadEnd {
    let mut tick = TICK_MIN;
    let mut last_redirected = [0u64; 2];
    loop {
        if directions.iter().all(|direction| direction.done) {
            return OffloadEnd::Closed;
        }
        let [first, second] = &*directions;
        let watch_first = !first.eof;
        let watch_second = !second.eof;
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
            // A side already at EOF is still watched for errors.
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
            () = tokio::time::sleep(tick) => {}
        }
        if revoked() {
            return OffloadEnd::Revoked;
        }
        let mut busy = false;
        for (index, direction) in directions.iter_mut().enumerate() {
            if direction.done {
                continue;
            }
            if !direction.eof && read_closed(direction.src) {
                direction.eof = true;
            }
            match step(maps, direction) {
                Ok(Step {
                    moving,
                    redirected,
                    finish,
                }) => {
                    busy |= moving || redirected != last_redirected[index];
                    last_redirected[index] = redirected;
                    if finish == Finish::InUserSpace
                        && let Err(error) = finish_in_user_space(direction).await
                    {
                        debug!(direction = direction.name, %error, "finishing in user space failed");
                        return OffloadEnd::Failed;
                    }
                }
                Err(error) => {
                    debug!(direction = direction.name, %error, "kernel path supervision failed");
                    return OffloadEnd::Failed;
                }
            }
        }
        tick = if busy {
            TICK_MIN
        } else {
            (tick * 2).min(TICK_MAX)
        };
    }
}

struct Step {
    /// The direction has a backlog, is paused or is finishing.
    moving: bool,
    redirected: u64,
    finish: Finish,
}

/// One supervision step of a direction: backpressure, and the half-close once its source is
/// at EOF and everything it sent is in the destination socket.
fn step(maps: &DatapathMaps, direction: &mut Direction<'_>) -> Result<Step, OffloadError> {
    // Taking the source's socket lock (TCP_INFO does) waits out a verdict run in progress, so
    // the count read next includes every skb received before the FIN that EOF reflects.
    let _ = taken(direction.src.as_raw_fd())?;
    let redirected = maps
        .splice_redirected(direction.src_socket.cookie)?
        .unwrap_or(0);
    let delivered = taken(direction.dst.as_raw_fd())?.saturating_sub(direction.dst_base);
    let backlog = redirected.saturating_sub(delivered);
    if direction.paused && !direction.eof && backlog <= RESUME_BELOW {
        match maps.splice_resume(direction.src_socket) {
            Ok(()) => {
                kick(direction.src.as_raw_fd())?;
                direction.paused = false;
            }
            // Only established sockets may join a socket map: a FIN that arrived while the
            // source was paused leaves the rest of its bytes to the agent.
            Err(_) if read_closed(direction.src) => direction.eof = true,
            Err(error) => return Err(error.into()),
        }
    } else if !direction.paused && backlog > PAUSE_ABOVE {
        maps.splice_pause(direction.src_socket.cookie)?;
        direction.paused = true;
        debug!(
            direction = direction.name,
            backlog, "destination behind; pausing the source"
        );
    }
    let finish = if direction.eof && backlog == 0 {
        if direction.paused {
            Finish::InUserSpace
        } else {
            // Everything before the FIN is in the destination's send queue: pass it on.
            socket2::SockRef::from(direction.dst).shutdown(Shutdown::Write)?;
            direction.done = true;
            Finish::Done
        }
    } else {
        Finish::NotYet
    };
    Ok(Step {
        moving: backlog > 0 || direction.paused || direction.eof,
        redirected,
        finish,
    })
}

/// Where a direction stands after a supervision step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    NotYet,
    Done,
    /// Its source reached EOF while paused and the kernel has delivered all it took: the
    /// agent moves the rest of the source's receive queue itself, then passes the FIN on.
    InUserSpace,
}

/// Moves what is left in a paused source (up to its FIN) to the destination and half-closes
/// the destination. Returns the bytes moved.
async fn finish_in_user_space(direction: &mut Direction<'_>) -> io::Result<u64> {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut budget = usize::MAX;
    let mut moved = 0;
    loop {
        let drained = drain(direction.src, direction.dst, &mut buffer, &mut budget).await?;
        moved += drained.moved;
        if drained.eof {
            break;
        }
        if drained.moved == 0 {
            direction.src.readable().await?;
        }
    }
    socket2::SockRef::from(direction.dst).shutdown(Shutdown::Write)?;
    debug!(
        direction = direction.name,
        moved, "source finished while paused; the agent moved its last bytes"
    );
    direction.by_agent += moved;
    direction.done = true;
    Ok(moved)
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
/// Bytes of `struct tcp_info` read (up to and including `tcpi_bytes_acked`).
const TCP_INFO_LEN: usize = TCPI_BYTES_ACKED + 8;

fn bytes_acked(fd: RawFd) -> io::Result<u64> {
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
        return Err(io::Error::other("kernel tcp_info lacks tcpi_bytes_acked"));
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&info[TCPI_BYTES_ACKED..TCP_INFO_LEN]);
    Ok(u64::from_ne_bytes(word))
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
