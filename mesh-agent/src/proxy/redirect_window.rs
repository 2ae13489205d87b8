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

/// An accelerated workload connection as the L7 path reads it: reads are reported to the
/// datapath while the redirect is in use, and readiness is only given up on `WouldBlock`.
///
/// Tokio's own `poll_read` forgets readiness after a short read, which on plain TCP means the
/// queue is empty. A socket with a redirect queue can return short while bytes wait in the
/// other queue, and no new wake-up comes for them: the connection would stall.
#[derive(Debug)]
pub struct ReadReporting {
    inner: TcpStream,
    reporter: Option<ReadReporter>,
}

impl ReadReporting {
    /// `inner`, reporting through `reporter` (none: reads are only made stall-free).
    pub fn new(inner: TcpStream, reporter: Option<ReadReporter>) -> Self {
        Self { inner, reporter }
    }
}

impl AsyncRead for ReadReporting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let count = loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let socket = socket2::SockRef::from(&this.inner);
            // SAFETY: `recv` only writes into the slice (never de-initialises a byte), and
            // only the bytes it reports are marked initialised below.
            let unfilled = unsafe { buf.unfilled_mut() };
            match this
                .inner
                .try_io(Interest::READABLE, || socket.recv(unfilled))
            {
                Ok(count) => break count,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        };
        // Reading into uninitialised memory keeps an idle connection's buffer untouched
        // (and so out of its resident memory) beyond what was read.
        // SAFETY: `recv` wrote `count` bytes at the start of the unfilled part.
        unsafe { buf.assume_init(count) };
        buf.advance(count);
        if count > 0
            && let Some(reporter) = this.reporter.as_mut()
            && reporter.read(count) != Redirect::Open
        {
            this.reporter = None;
        }
        Poll::Ready(Ok(()))
    }
}

delegate_async_write!([] ReadReporting, inner);
