//! Forwarding of opaque TCP between two sockets, one direction at a time: small messages
//! are copied through a buffer, bulk transfers move socket -> pipe -> socket with splice(2)
//! and never enter the agent's memory. A direction ends with a half-close (shutdown of the
//! write side) when its source reaches EOF.
//!
//! Not for sockets in the splice maps (acceleration): their received bytes can sit in a queue
//! that splice does not read; `datapath::offload` reads those itself.

use std::{
    io,
    net::Shutdown,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use tokio::{io::Interest, net::TcpStream};

/// Bytes asked of one splice call; the pipe is sized to hold them.
const PIPE_CAPACITY: usize = 1 << 20;

/// The copy buffer of one direction. A read that fills it marks a bulk transfer.
const COPY_CHUNK: usize = 32 * 1024;

/// A non-blocking pipe used as the in-kernel buffer of one direction.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Self> {
        let mut fds: [libc::c_int; 2] = [-1, -1];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe means fewer splice calls; the default (64 KiB) is kept when the
        // system limit (fs.pipe-max-size) refuses more.
        // SAFETY: F_SETPIPE_SZ on an open pipe descriptor; it only changes the pipe's size.
        let sized = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_CAPACITY) };
        let capacity = usize::try_from(sized).unwrap_or(64 * 1024);
        Ok(Self {
            read,
            write,
            capacity,
        })
    }
}

fn splice(from: RawFd, to: RawFd, length: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (borrowed from live
    // owners by the callers); null offsets mean "use and advance the file position", which
    // is what sockets and pipes require.
    let moved = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            length,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(moved).map_err(|_| io::Error::last_os_error())
}

/// What one direction carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// All bytes delivered to the destination.
    pub total: u64,
    /// The part of `total` that went through splice.
    pub spliced: u64,
}

/// Moves bytes from `from` to `to` until `from` reaches EOF, then half-closes `to`, and
/// returns the bytes moved. Small reads go through a buffer (cheapest for request/response
/// traffic); a read that fills the
/// buffer switches the direction to splice through a pipe, made on first use, until a
/// splice moves less than a buffer's worth again.
pub async fn forward_one_way(from: &TcpStream, to: &TcpStream) -> io::Result<Moved> {
    let mut total: u64 = 0;
    let mut spliced: u64 = 0;
    let mut buffer = vec![0u8; COPY_CHUNK];
    let mut pipe: Option<Pipe> = None;
    let mut splicing = false;
    loop {
        from.readable().await?;
        if splicing && let Some(pipe) = &pipe {
            let moved = match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), pipe.capacity)
            }) {
                Ok(moved) => moved,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            };
            if moved == 0 {
                break;
            }
            let drained = drain(pipe, to, moved).await?;
            total += drained;
            spliced += drained;
            splicing = moved >= COPY_CHUNK;
            continue;
        }
        let count = match read_draining(from, &mut buffer) {
            Ok(count) => count,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        };
        if count == 0 {
            break;
        }
        write_all(to, &buffer[..count]).await?;
        total += count as u64;
        if count == buffer.len() {
            if pipe.is_none() {
                match Pipe::new() {
                    Ok(made) => pipe = Some(made),
                    // Out of descriptors or memory: keep copying, which needs neither.
                    Err(error) => tracing::debug!(%error, "cannot make a pipe; copying"),
                }
            }
            splicing = pipe.is_some();
        }
    }
    socket2::SockRef::from(to).shutdown(Shutdown::Write)?;
    Ok(Moved { total, spliced })
}

/// Reads what the socket has. A short read means the receive queue is empty, so the
/// socket's readiness is cleared at once: the next wait goes straight to the poller instead
/// of spending a read call on EAGAIN first. (Tokio clears readiness only if no new event
/// arrived since it was observed, so bytes that land meanwhile are not missed.)
fn read_draining(from: &TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
    let capacity = buffer.len();
    let mut short_read = None;
    let result = from.try_io(Interest::READABLE, || {
        let count = nix::sys::socket::recv(
            from.as_raw_fd(),
            buffer,
            nix::sys::socket::MsgFlags::empty(),
        )
        .map_err(io::Error::from)?;
        if count > 0 && count < capacity {
            short_read = Some(count);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(count)
    });
    match short_read {
        Some(count) => Ok(count),
        None => result,
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

/// Moves `in_pipe` bytes from the pipe into `to`, waiting for room in its send buffer.
async fn drain(pipe: &Pipe, to: &TcpStream, mut in_pipe: usize) -> io::Result<u64> {
    let mut moved_total: u64 = 0;
    while in_pipe > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || {
            splice(pipe.read.as_raw_fd(), to.as_raw_fd(), in_pipe)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(moved) => {
                in_pipe -= moved;
                moved_total += moved as u64;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(moved_total)
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
    async fn carries_bulk_and_small_writes_in_order_and_half_closes() {
        // writer -> source ==splice==> sink -> reader
        let (mut writer, source) = pair().await;
        let (sink, mut reader) = pair().await;
        let data: Vec<u8> = (0..5_000_000u32).map(|index| (index % 251) as u8).collect();
        let sent = data.clone();
        let writing = tokio::spawn(async move {
            // Small writes (copied), one big one (spliced), small ones again (copied).
            for chunk in sent[..1000].chunks(10) {
                writer.write_all(chunk).await.unwrap();
            }
            writer
                .write_all(&sent[1000..sent.len() - 1000])
                .await
                .unwrap();
            for chunk in sent[sent.len() - 1000..].chunks(10) {
                writer.write_all(chunk).await.unwrap();
            }
            writer.shutdown().await.unwrap();
            writer
        });
        let (moved, received) = tokio::join!(forward_one_way(&source, &sink), async {
            let mut received = Vec::new();
            reader.read_to_end(&mut received).await.unwrap();
            received
        });
        writing.await.unwrap();
        let moved = moved.unwrap();
        assert_eq!(moved.total, data.len() as u64);
        assert!(
            moved.spliced > 0 && moved.spliced < moved.total,
            "the big write went through splice, the small ones were copied: {moved:?}"
        );
        assert_eq!(received, data, "bytes arrive complete and in order");
    }

    #[tokio::test]
    async fn small_requests_are_copied_not_spliced() {
        let (mut writer, source) = pair().await;
        let (sink, mut reader) = pair().await;
        writer
            .write_all(b"GET /tools HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        writer.shutdown().await.unwrap();
        let moved = forward_one_way(&source, &sink).await.unwrap();
        let mut received = Vec::new();
        reader.read_to_end(&mut received).await.unwrap();
        assert_eq!(moved.total, received.len() as u64);
        assert_eq!(moved.spliced, 0, "small requests are copied");
        assert!(received.starts_with(b"GET /tools"));
    }
}
