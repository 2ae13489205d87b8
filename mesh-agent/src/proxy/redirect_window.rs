//! Keeps the in-kernel redirect of an accelerated workload socket open while the agent reads
//! it. `sk_msg` lets a workload socket queue at most `REDIRECT_WINDOW` bytes on the agent's
//! end beyond what the agent reported reading; a reader that never reports sends the workload
//! to TCP for good after its first window. [`ReadReporter`] counts what the agent read and
//! reports it every quarter window (the opaque upload and the L7 path both use it);
//! [`ReadReporting`] is the L7 path's stream, which also reads without stalling.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use tokio::{
    io::{AsyncRead, Interest, ReadBuf},
    net::TcpStream,
};
use tracing::{debug, trace};

use super::prefixed::delegate_async_write;
use crate::datapath::Datapath;

/// How often (in bytes read) the datapath hears how far the agent has read.
const REPORT_STEP: u64 = mesh_common::REDIRECT_WINDOW / 4;

/// Reports reads of one accelerated connection to the datapath.
#[derive(Debug)]
pub struct ReadReporter {
    datapath: Arc<Datapath>,
    workload_end: SocketAddr,
    agent_end: SocketAddr,
    consumed: u64,
    next_report: u64,
}

impl ReadReporter {
    /// A reporter for the workload socket at `workload_end` connected to `agent_end`, of which
    /// the agent has read `already_read` bytes (the detector's prefix).
    pub fn new(
        datapath: Arc<Datapath>,
        workload_end: SocketAddr,
        agent_end: SocketAddr,
        already_read: u64,
    ) -> Self {
        Self {
            datapath,
            workload_end,
            agent_end,
            consumed: already_read,
            // The first read reports at once: a socket that fell back before the agent read
            // anything is found out at its first bytes.
            next_report: already_read,
        }
    }

    /// Bytes read so far, the detector's prefix included.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Counts `count` bytes read and, every quarter window, reports them. Once it says
    /// [`Redirect::FellBack`] or [`Redirect::Unreported`], later reports are pointless.
    pub fn read(&mut self, count: usize) -> Redirect {
        self.consumed = self.consumed.saturating_add(count as u64);
        if self.consumed < self.next_report {
            return Redirect::Open;
        }
        self.next_report = self.consumed.saturating_add(REPORT_STEP);
        let reported = self
            .datapath
            .report_consumed(self.workload_end, self.agent_end, self.consumed)
            .and_then(|()| {
                self.datapath
                    .redirect_finished(self.workload_end, self.agent_end)
            });
        trace!(consumed = self.consumed, ?reported, workload = %self.workload_end, agent = %self.agent_end, "reported reads to the datapath");
        match reported {
            Ok(None) => Redirect::Open,
            Ok(Some(redirected)) => Redirect::FellBack { redirected },
            Err(error) => {
                // Unreported, the redirect stops at its window and the connection goes on
                // over TCP: nothing is lost.
                debug!(%error, workload = %self.workload_end, "cannot report reads to the datapath");
                Redirect::Unreported
            }
        }
    }
}

/// What a report found out about the workload socket's redirect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect {
    /// Still redirecting (or not yet time to ask).
    Open,
    /// The socket takes TCP for good, after redirecting `redirected` bytes in all.
    FellBack { redirected: u64 },
    /// The datapath's maps could not be reached; the window runs out on its own.
    Unreported,
}

/// An accelerated workload connection as the L7 path reads it, through a [`RedirectReader`].
#[derive(Debug)]
pub struct ReadReporting {
    inner: TcpStream,
    reader: RedirectReader,
}

impl ReadReporting {
    /// `inner`, reporting through `reporter` (none: nothing is known about the redirect, and
    /// only `WouldBlock` proves the socket drained).
    pub fn new(inner: TcpStream, reporter: Option<ReadReporter>) -> Self {
        Self {
            inner,
            reader: RedirectReader::new(reporter),
        }
    }
}

impl AsyncRead for ReadReporting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Self { inner, reader } = &mut *self;
        reader.poll_read(inner, cx, buf)
    }
}

delegate_async_write!([] ReadReporting, inner);

/// Reads an accelerated workload socket: reads are reported to the datapath while the
/// redirect is in use, and readiness is given up only when the socket is known to be drained.
///
/// Tokio's own `poll_read` forgets readiness after a short read, which on plain TCP means the
/// queue is empty. A socket with a redirect queue can return short while bytes wait in its
/// TCP queue, and no new wake-up comes for them: the connection would stall. [`ShortReads`]
/// says when a short read does prove the socket drained; otherwise the reader reads again
/// until `WouldBlock`.
#[derive(Debug)]
pub struct RedirectReader {
    reporter: Option<ReadReporter>,
    short_reads: ShortReads,
}

impl RedirectReader {
    /// A reader reporting through `reporter` (none: nothing is known about the redirect, and
    /// only `WouldBlock` proves the socket drained).
    pub fn new(reporter: Option<ReadReporter>) -> Self {
        let short_reads = if reporter.is_some() {
            ShortReads::Redirecting { unbroken: 0 }
        } else {
            ShortReads::Unknown
        };
        Self {
            reporter,
            short_reads,
        }
    }

    /// Whether the redirect fell back and every byte it carried has been read: the socket's
    /// TCP queue is all that is left (splice(2) can take it from here).
    pub fn only_tcp_left(&self) -> bool {
        matches!(
            self.short_reads,
            ShortReads::Tcp | ShortReads::FellBack { unread: 0 }
        )
    }

    /// Reads `socket` into `buf`, as `AsyncRead::poll_read` does.
    pub fn poll_read(
        &mut self,
        socket: &TcpStream,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Self {
            reporter,
            short_reads,
        } = self;
        let count = loop {
            ready!(socket.poll_read_ready(cx))?;
            let fd = socket2::SockRef::from(socket);
            // SAFETY: `recv` only writes into the slice (never de-initialises a byte), and
            // only the bytes it reports are marked initialised below.
            let unfilled = unsafe { buf.unfilled_mut() };
            let asked = unfilled.len();
            // A read that proves the socket drained gives up readiness as tokio's own reader
            // does: by answering `WouldBlock` to `try_io` (which forgets only the readiness
            // this read was made on), with the bytes kept here.
            let mut drained_with = None;
            let read = socket.try_io(Interest::READABLE, || {
                let count = match fd.recv(unfilled) {
                    Ok(count) => count,
                    Err(error) => {
                        if error.kind() == io::ErrorKind::WouldBlock {
                            short_reads.drained();
                        }
                        return Err(error);
                    }
                };
                if count == 0 {
                    return Ok(0);
                }
                let (report, consumed) = match reporter.as_mut() {
                    Some(reporter) => (reporter.read(count), reporter.consumed()),
                    None => (Redirect::Open, 0),
                };
                if report != Redirect::Open {
                    *reporter = None;
                }
                if short_reads.after_read(count as u64, count < asked, report, consumed) {
                    drained_with = Some(count);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(count)
            });
            match read {
                Ok(count) => break count,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(count) = drained_with {
                        break count;
                    }
                }
                Err(error) => return Poll::Ready(Err(error)),
            }
        };
        // Reading into uninitialised memory keeps an idle connection's buffer untouched
        // (and so out of its resident memory) beyond what was read.
        // SAFETY: `recv` wrote `count` bytes at the start of the unfilled part.
        unsafe { buf.assume_init(count) };
        buf.advance(count);
        Poll::Ready(Ok(()))
    }
}

/// Bytes read without the socket being seen drained, below which a short read of a socket
/// still redirecting proves it drained.
///
/// `sk_msg` sends a workload socket to TCP when a message would take its redirected total
/// past the allowance, which is at least what the agent last reported plus
/// `REDIRECT_WINDOW` (the allowance map has room for every accelerated socket, so no entry is
/// evicted while its socket is open). The agent reports every `REDIRECT_WINDOW / 4` bytes,
/// right after the read that crossed the step (at most 408 KiB, hyper's largest buffer), and
/// one message is at most 45 pages of 32 KiB (1.44 MiB). So when the redirect falls back, the
/// redirect queue holds more than 3 MiB - 408 KiB - 1.44 MiB (1.17 MiB) that the agent has not
/// read, and the agent reads all of it, in full reads, before its next short read: a short
/// read after fewer unbroken bytes than that cannot follow a fallback. Once the redirect queue
/// is drained and has not fallen back, nothing waits in the TCP queue either (bytes go there
/// only after a fallback), so the socket is drained. (Reading that backlog also crosses a
/// report step, whose report finds the fallback: the run is the second of two guards.)
const TRUSTED_RUN: u64 = mesh_common::REDIRECT_WINDOW / 4;

/// What a short read of an accelerated workload socket proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShortReads {
    /// The redirect is in use as far as the agent knows; `unbroken` bytes were read since
    /// the socket was last seen drained (see [`TRUSTED_RUN`]).
    Redirecting { unbroken: u64 },
    /// The redirect fell back, and `unread` of the bytes it carried were not read by the
    /// end of the last read: the redirect queue is read first, so a read that draws on it
    /// may return short while bytes wait in the TCP queue.
    FellBack { unread: u64 },
    /// Only the TCP queue is left: a short read drains it, as on any TCP socket.
    Tcp,
    /// Nothing is known about the redirect (the datapath cannot be reached): only
    /// `WouldBlock` proves the socket drained.
    Unknown,
}

impl ShortReads {
    /// Accounts a read of `count` bytes (`short`: fewer than asked), with what the reporter
    /// found out at it and the bytes read in all up to it (`consumed`, used with a report);
    /// says whether the socket is now known to be drained.
    fn after_read(&mut self, count: u64, short: bool, report: Redirect, consumed: u64) -> bool {
        match report {
            Redirect::Open => {}
            Redirect::FellBack { redirected } => {
                if matches!(self, Self::Redirecting { .. }) {
                    *self = Self::FellBack {
                        unread: redirected.saturating_sub(consumed),
                    };
                    return false;
                }
            }
            Redirect::Unreported => *self = Self::Unknown,
        }
        match self {
            Self::Redirecting { unbroken } => {
                *unbroken = unbroken.saturating_add(count);
                if short && *unbroken < TRUSTED_RUN {
                    *unbroken = 0;
                    true
                } else {
                    false
                }
            }
            Self::FellBack { unread: 0 } => {
                // Every redirected byte was read before this read: only TCP is left.
                *self = Self::Tcp;
                short
            }
            Self::FellBack { unread } => {
                *unread = unread.saturating_sub(count);
                false
            }
            Self::Tcp => short,
            Self::Unknown => false,
        }
    }

    /// The socket answered `WouldBlock`: both of its queues are empty.
    fn drained(&mut self) {
        match self {
            Self::Redirecting { unbroken } => *unbroken = 0,
            // Every redirected byte has been read.
            Self::FellBack { .. } => *self = Self::Tcp,
            Self::Tcp | Self::Unknown => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;

    #[test]
    fn a_short_read_after_a_short_run_proves_a_redirecting_socket_drained() {
        let mut reads = ShortReads::Redirecting { unbroken: 0 };
        assert!(reads.after_read(100, true, Redirect::Open, 100));
        assert_eq!(reads, ShortReads::Redirecting { unbroken: 0 });
        // A full read proves nothing; the run goes on.
        assert!(!reads.after_read(64 * KIB, false, Redirect::Open, 64 * KIB + 100));
        assert!(reads.after_read(10, true, Redirect::Open, 64 * KIB + 110));
    }

    #[test]
    fn a_long_run_of_full_reads_makes_the_next_short_read_wait_for_would_block() {
        let mut reads = ShortReads::Redirecting { unbroken: 0 };
        let mut consumed = 0;
        while consumed < TRUSTED_RUN {
            consumed += 64 * KIB;
            assert!(!reads.after_read(64 * KIB, false, Redirect::Open, consumed));
        }
        // The redirect may have fallen back behind this backlog: not proof.
        assert!(!reads.after_read(1, true, Redirect::Open, consumed + 1));
        assert!(!reads.after_read(1, true, Redirect::Open, consumed + 2));
        // Until the socket says `WouldBlock`.
        reads.drained();
        assert!(reads.after_read(1, true, Redirect::Open, consumed + 3));
    }

    #[test]
    fn after_a_fallback_short_reads_prove_nothing_until_the_redirected_bytes_are_read() {
        let mut reads = ShortReads::Redirecting { unbroken: 0 };
        let report = Redirect::FellBack { redirected: 5000 };
        assert!(!reads.after_read(1000, true, report, 1000));
        assert_eq!(reads, ShortReads::FellBack { unread: 4000 });
        assert!(!reads.after_read(2000, true, Redirect::Open, 3000));
        // The read that takes the last redirected bytes is not proof either ...
        assert!(!reads.after_read(2000, true, Redirect::Open, 5000));
        // ... but from then on only TCP is left.
        assert!(reads.after_read(300, true, Redirect::Open, 5300));
        assert_eq!(reads, ShortReads::Tcp);
        assert!(!reads.after_read(300, false, Redirect::Open, 5600));
        assert!(reads.after_read(3, true, Redirect::Open, 5603));
    }

    #[test]
    fn a_fallback_found_at_the_first_read_with_nothing_redirected_leaves_only_tcp() {
        let mut reads = ShortReads::Redirecting { unbroken: 0 };
        let report = Redirect::FellBack { redirected: 0 };
        assert!(!reads.after_read(500, true, report, 500));
        assert!(reads.after_read(500, true, Redirect::Open, 1000));
    }

    #[test]
    fn would_block_after_a_fallback_means_every_redirected_byte_was_read() {
        let mut reads = ShortReads::FellBack { unread: 5000 };
        reads.drained();
        assert_eq!(reads, ShortReads::Tcp);
    }

    #[test]
    fn an_unreachable_datapath_leaves_only_would_block_as_proof() {
        let mut reads = ShortReads::Redirecting { unbroken: 0 };
        assert!(!reads.after_read(10, true, Redirect::Unreported, 10));
        reads.drained();
        assert!(!reads.after_read(10, true, Redirect::Open, 20));
        assert_eq!(reads, ShortReads::Unknown);
    }
}
