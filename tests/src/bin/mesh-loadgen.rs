//! `mesh-loadgen`: the load generator and server of the datapath benchmark. The same binary
//! drives every path under comparison (direct, through the mesh, through a reference proxy),
//! so differences come from the path and not from the tools.
//!
//! `serve` answers on a tiny framed protocol: a connection opens with one mode byte, `R`
//! (request/response: a 4-byte little-endian size, then echo that many bytes per request until
//! EOF) or `B` (bulk: swallow everything until EOF, then answer the byte count as 8 bytes
//! little-endian). The client subcommands print one JSON object on stdout.
//!
//! Sockets are blocking, but a read or write that reports EAGAIN anyway waits in poll(2) and
//! retries, so clients stay correct over the accelerated (sk_msg) path, where the kernel may
//! wake a blocking reader without data.

use std::{
    io::{self, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::ExitCode,
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-loadgen",
    about = "Benchmark load generator and server (connect, request/response, bulk)"
)]
struct Args {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Serve the benchmark protocol until killed; prints `listening <addr>` when ready.
    Serve {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Open and close connections one after another; time connect() and the first
    /// one-byte round trip on each.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// Request/response on persistent connections: each connection sends `size` bytes and
    /// waits for the echo, back to back, for the given time.
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        #[arg(long, default_value_t = 64)]
        size: u32,
        #[arg(long, default_value_t = 3000)]
        duration_ms: u64,
        /// Requests per connection before measuring starts.
        #[arg(long, default_value_t = 200)]
        warmup: usize,
    },
    /// Stream bytes one way for the given time on `streams` connections; throughput counts
    /// only bytes the server confirms it received.
    Bulk {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[arg(long, default_value_t = 3000)]
        duration_ms: u64,
    },
}

fn wait_ready(stream: &TcpStream, events: libc::c_short) -> io::Result<()> {
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
        let error = io::Error::last_os_error();
        if error.kind() != ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Reads into `buffer` (some bytes, or 0 at EOF), riding over spurious EAGAIN.
fn read_some(stream: &mut TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buffer) {
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                wait_ready(stream, libc::POLLIN)?
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

fn read_exact(stream: &mut TcpStream, mut buffer: &mut [u8]) -> io::Result<()> {
    while !buffer.is_empty() {
        let count = read_some(stream, buffer)?;
        if count == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        buffer = &mut buffer[count..];
    }
    Ok(())
}

fn write_all(stream: &mut TcpStream, mut data: &[u8]) -> io::Result<()> {
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

fn serve_connection(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    if read_some(&mut stream, &mut mode)? == 0 {
        // A connection closed before saying anything: a readiness probe.
        return Ok(());
    }
    match mode[0] {
        b'R' => {
            let mut size = [0u8; 4];
            read_exact(&mut stream, &mut size)?;
            let size = u32::from_le_bytes(size) as usize;
            let mut buffer = vec![0u8; size.max(1)];
            loop {
                // EOF at a request boundary is the client finishing.
                let first = read_some(&mut stream, &mut buffer[..size])?;
                if first == 0 {
                    return Ok(());
                }
                read_exact(&mut stream, &mut buffer[first..size])?;
                write_all(&mut stream, &buffer[..size])?;
            }
        }
        b'B' => {
            let mut buffer = vec![0u8; 256 * 1024];
            let mut total: u64 = 0;
            loop {
                let count = read_some(&mut stream, &mut buffer)?;
                if count == 0 {
                    break;
                }
                total += count as u64;
            }
            write_all(&mut stream, &total.to_le_bytes())
        }
        other => Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("unknown mode byte {other:#04x}"),
        )),
    }
}

fn serve(listen: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    println!("listening {}", listener.local_addr()?);
    io::stdout().flush()?;
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                thread::spawn(move || {
                    if let Err(error) = serve_connection(stream)
                        && error.kind() != ErrorKind::ConnectionReset
                    {
                        eprintln!("mesh-loadgen serve: connection: {error}");
                    }
                });
            }
            Err(error) => eprintln!("mesh-loadgen serve: accept: {error}"),
        }
    }
    Ok(())
}

/// Percentiles of a latency sample in microseconds.
fn summary(mut nanos: Vec<u64>) -> serde_json::Value {
    nanos.sort_unstable();
    let at = |quantile: f64| -> f64 {
        if nanos.is_empty() {
            return 0.0;
        }
        let index = ((nanos.len() as f64 - 1.0) * quantile).round() as usize;
        nanos[index.min(nanos.len() - 1)] as f64 / 1000.0
    };
    let mean = if nanos.is_empty() {
        0.0
    } else {
        nanos.iter().sum::<u64>() as f64 / nanos.len() as f64 / 1000.0
    };
    serde_json::json!({
        "samples": nanos.len(),
        "p50_us": at(0.50),
        "p90_us": at(0.90),
        "p99_us": at(0.99),
        "p999_us": at(0.999),
        "max_us": at(1.0),
        "mean_us": mean,
    })
}

fn elapsed_nanos(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn connect_test(to: SocketAddr, count: usize) -> io::Result<serde_json::Value> {
    let mut connect = Vec::with_capacity(count);
    let mut first_byte = Vec::with_capacity(count);
    let mut request = vec![b'R'];
    request.extend_from_slice(&1u32.to_le_bytes());
    request.push(b'x');
    for _ in 0..count {
        let start = Instant::now();
        let mut stream = TcpStream::connect(to)?;
        connect.push(elapsed_nanos(start));
        stream.set_nodelay(true)?;
        write_all(&mut stream, &request)?;
        let mut reply = [0u8; 1];
        read_exact(&mut stream, &mut reply)?;
        first_byte.push(elapsed_nanos(start));
        drop(stream);
    }
    Ok(serde_json::json!({
        "connect": summary(connect),
        "connect_and_first_response": summary(first_byte),
    }))
}

fn rr_connection(
    to: SocketAddr,
    size: u32,
    warmup: usize,
    start_line: &Barrier,
    stop: &AtomicBool,
) -> io::Result<Vec<u64>> {
    let request = vec![0x5a_u8; size as usize];
    let mut reply = vec![0u8; size as usize];
    let mut set_up = || -> io::Result<TcpStream> {
        let mut stream = TcpStream::connect(to)?;
        stream.set_nodelay(true)?;
        let mut header = vec![b'R'];
        header.extend_from_slice(&size.to_le_bytes());
        write_all(&mut stream, &header)?;
        for _ in 0..warmup {
            write_all(&mut stream, &request)?;
            read_exact(&mut stream, &mut reply)?;
        }
        Ok(stream)
    };
    let stream = set_up();
    // Arrive exactly once, also after a failed set-up, so nobody waits forever.
    start_line.wait();
    let mut stream = stream?;
    let mut latencies = Vec::with_capacity(1 << 16);
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        write_all(&mut stream, &request)?;
        read_exact(&mut stream, &mut reply)?;
        latencies.push(elapsed_nanos(start));
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(latencies)
}

/// Runs `work` on `count` threads that start together after their set-up (each must arrive
/// at the barrier exactly once); the main thread lets them run for `duration`, raises the
/// stop flag and returns the results with the time from the start to the last thread done.
fn run_threads<T: Send + 'static>(
    count: usize,
    duration: Duration,
    work: impl Fn(&Barrier, &AtomicBool) -> io::Result<T> + Send + Sync + 'static,
) -> io::Result<(Vec<T>, Duration)> {
    let start_line = Arc::new(Barrier::new(count + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let work = Arc::new(work);
    let handles: Vec<_> = (0..count)
        .map(|_| {
            let start_line = Arc::clone(&start_line);
            let stop = Arc::clone(&stop);
            let work = Arc::clone(&work);
            thread::spawn(move || {
                let result = work(&start_line, &stop);
                if result.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                result
            })
        })
        .collect();
    start_line.wait();
    let started = Instant::now();
    thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut results = Vec::with_capacity(count);
    for handle in handles {
        let result = handle
            .join()
            .map_err(|_| io::Error::other("a load thread panicked"))?;
        results.push(result?);
    }
    Ok((results, started.elapsed().max(Duration::from_nanos(1))))
}

fn rr_test(
    to: SocketAddr,
    connections: usize,
    size: u32,
    duration: Duration,
    warmup: usize,
) -> io::Result<serde_json::Value> {
    let (per_connection, elapsed) = run_threads(connections, duration, move |start, stop| {
        rr_connection(to, size, warmup, start, stop)
    })?;
    let latencies: Vec<u64> = per_connection.into_iter().flatten().collect();
    let requests = latencies.len();
    let mut result = summary(latencies);
    result["connections"] = connections.into();
    result["size_bytes"] = size.into();
    result["requests_per_second"] = (requests as f64 / elapsed.as_secs_f64()).into();
    Ok(result)
}

fn bulk_stream(to: SocketAddr, start_line: &Barrier, stop: &AtomicBool) -> io::Result<u64> {
    let stream = TcpStream::connect(to).and_then(|mut stream| {
        write_all(&mut stream, b"B")?;
        Ok(stream)
    });
    // Arrive exactly once, also after a failed set-up, so nobody waits forever.
    start_line.wait();
    let mut stream = stream?;
    let chunk = vec![0xa5_u8; 256 * 1024];
    let mut sent: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        write_all(&mut stream, &chunk)?;
        sent += chunk.len() as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut confirmed = [0u8; 8];
    read_exact(&mut stream, &mut confirmed)?;
    let confirmed = u64::from_le_bytes(confirmed);
    if confirmed != sent {
        return Err(io::Error::other(format!(
            "server confirmed {confirmed} bytes, {sent} were sent"
        )));
    }
    Ok(sent)
}

fn bulk_test(to: SocketAddr, streams: usize, duration: Duration) -> io::Result<serde_json::Value> {
    // Time runs until the last confirmation: bytes still in flight when the stop flag rose
    // count only once the server has them.
    let (per_stream, elapsed) = run_threads(streams, duration, move |start, stop| {
        bulk_stream(to, start, stop)
    })?;
    let elapsed = elapsed.as_secs_f64();
    let bytes: u64 = per_stream.iter().sum();
    Ok(serde_json::json!({
        "streams": streams,
        "bytes": bytes,
        "seconds": elapsed,
        "gbit_per_second": bytes as f64 * 8.0 / elapsed / 1e9,
    }))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Mode::Serve { listen } => serve(listen).map(|()| serde_json::Value::Null),
        Mode::Connect { to, count } => connect_test(to, count),
        Mode::Rr {
            to,
            connections,
            size,
            duration_ms,
            warmup,
        } => rr_test(
            to,
            connections.max(1),
            size.max(1),
            Duration::from_millis(duration_ms),
            warmup,
        ),
        Mode::Bulk {
            to,
            streams,
            duration_ms,
        } => bulk_test(to, streams.max(1), Duration::from_millis(duration_ms)),
    };
    match result {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("mesh-loadgen: {error}");
            ExitCode::FAILURE
        }
    }
}
