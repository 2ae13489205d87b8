//! `mesh-testpeer`: the workload side of the end-to-end tests, run inside a test cgroup. It
//! dials an address, reports what `getpeername`/`getsockname` say, sends a deterministic byte
//! stream, half-closes, reads until EOF, and prints one JSON line with sizes and SHA-256 sums.
//!
//! After connecting it does its I/O the way event-loop clients (tokio, Go, Node, asyncio,
//! curl) do: non-blocking socket, poll(2) for readiness, retry on EAGAIN.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    process::ExitCode,
    time::Duration,
};

use clap::Parser;
use sha2::{Digest, Sha256};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-testpeer",
    about = "Test workload: dial, send, half-close, read, report"
)]
struct Args {
    /// Address to dial.
    #[arg(long)]
    to: SocketAddr,
    /// Bytes to send before half-closing.
    #[arg(long, default_value_t = 0)]
    send: u64,
    /// Seed of the byte stream.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Connect timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

/// A fast deterministic byte stream (xorshift64*), so both ends can agree on content.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let word = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Waits until the socket is ready for `events` (POLLIN or POLLOUT).
fn wait_ready(stream: &TcpStream, events: libc::c_short) -> std::io::Result<()> {
    let mut poll_fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `poll_fd` is a valid, exclusively borrowed pollfd array of length 1.
        let ready = unsafe { libc::poll(&mut poll_fd, 1, -1) };
        if ready >= 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// `write_all` for a non-blocking socket.
fn write_all_polled(stream: &mut TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match stream.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(count) => data = &data[count..],
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                wait_ready(stream, libc::POLLOUT)?
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn report_error(stage: &str, error: &std::io::Error) -> ExitCode {
    println!(
        "{}",
        serde_json::json!({ "error": error.to_string(), "stage": stage, "kind": format!("{:?}", error.kind()) })
    );
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let stream = match TcpStream::connect_timeout(&args.to, Duration::from_millis(args.timeout_ms))
    {
        Ok(stream) => stream,
        Err(error) => return report_error("connect", &error),
    };
    if let Err(error) = stream.set_nonblocking(true) {
        return report_error("nonblocking", &error);
    }
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let local = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();

    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(error) => return report_error("clone", &error),
    };
    let (total, seed) = (args.send, args.seed.max(1));
    let sender = std::thread::spawn(move || -> std::io::Result<String> {
        let mut pattern = Pattern(seed);
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 256 * 1024];
        let mut remaining = total;
        while remaining > 0 {
            let take = remaining.min(buffer.len() as u64) as usize;
            pattern.fill(&mut buffer[..take]);
            write_all_polled(&mut writer, &buffer[..take])?;
            hasher.update(&buffer[..take]);
            remaining -= take as u64;
        }
        writer.shutdown(Shutdown::Write)?;
        Ok(hex(&hasher.finalize()))
    });

    let mut reader = stream;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut buffer = vec![0u8; 256 * 1024];
    let read_error = loop {
        match reader.read(&mut buffer) {
            Ok(0) => break None,
            Ok(count) => {
                hasher.update(&buffer[..count]);
                received += count as u64;
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                if let Err(error) = wait_ready(&reader, libc::POLLIN) {
                    break Some(error);
                }
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => break Some(error),
        }
    };
    let sent_sha256 = match sender.join() {
        Ok(Ok(digest)) => digest,
        Ok(Err(error)) => return report_error("send", &error),
        Err(_) => return report_error("send", &std::io::Error::other("sender thread panicked")),
    };
    if let Some(error) = read_error {
        return report_error("receive", &error);
    }
    println!(
        "{}",
        serde_json::json!({
            "peer": peer,
            "local": local,
            "sent": total,
            "sent_sha256": sent_sha256,
            "received": received,
            "received_sha256": hex(&hasher.finalize()),
        })
    );
    ExitCode::SUCCESS
}
