//! `mesh-loadgen`: the load generator and server of the datapath benchmark. The same binary
//! drives every path under comparison (direct, through the mesh, through a reference proxy),
//! so differences come from the path and not from the tools.
//!
//! `serve` answers on a tiny framed protocol: a connection opens with one mode byte, `R`
//! (request/response: a 4-byte little-endian size, then echo that many bytes per request until
//! EOF) or `B` (bulk: swallow everything until EOF, then answer the byte count as 8 bytes
//! little-endian). The client subcommands print one JSON object on stdout.
//!
//! The L7 benchmark's modes speak HTTP/1.1 with keep-alive: `http-server` (a thread per
//! connection; `GET` answers a fixed text body, `POST /mcp` a fixed JSON-RPC result), `http`
//! (back-to-back requests from a template on N connections for a fixed time; every response's
//! status, `Content-Length` and body are checked; latencies go to a log-linear histogram) and
//! `http-idle` (open many keep-alive connections, one request each, then hold them idle).
//!
//! Sockets are blocking, but a read or write that reports EAGAIN anyway waits in poll(2) and
//! retries, so clients stay correct whatever path the kernel takes.

use std::{
    io::{self, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::ExitCode,
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-loadgen",
    about = "Benchmark load generator and servers (connect, request/response, bulk, HTTP/1.1)"
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
    /// Serve HTTP/1.1 with keep-alive until killed: `GET` answers a fixed text body,
    /// `POST /mcp` a fixed JSON-RPC result, anything else 404. Prints `listening <addr>`.
    HttpServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Keep-alive HTTP/1.1 requests, back to back on each connection, for the given time. A
    /// response with another status, without `Content-Length`, without the expected body text,
    /// or with `Connection: close` fails the run.
    Http {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        #[arg(long, default_value_t = 3000)]
        duration_ms: u64,
        /// Requests per connection before measuring starts.
        #[arg(long, default_value_t = 100)]
        warmup: usize,
        /// Offered load in requests per second over all connections, each sending on a fixed
        /// schedule (latency counts from when a request was due); 0: back to back.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[command(flatten)]
        request: HttpRequestArgs,
    },
    /// Open `count` keep-alive connections and make one request on each; print
    /// `{"open": <count>, ...}` as one line, hold them idle until stdin closes, then close them.
    HttpIdle {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Threads opening the connections.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        #[command(flatten)]
        request: HttpRequestArgs,
    },
}

/// The request an HTTP client mode sends, and what every response must be.
#[derive(Debug, Clone, clap::Args)]
struct HttpRequestArgs {
    #[arg(long, default_value = "GET")]
    method: String,
    #[arg(long, default_value = "/")]
    path: String,
    /// `Host` header (default: the `--to` address).
    #[arg(long)]
    host: Option<String>,
    /// Another request header, `Name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Request body, sent with `Content-Length`.
    #[arg(long)]
    body: Option<String>,
    /// The status every response must have.
    #[arg(long, default_value_t = 200)]
    expect_status: u16,
    /// Text every response body must contain.
    #[arg(long)]
    expect_body: Option<String>,
    /// How long to wait for a connection or a response before failing.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

fn wait_ready(stream: &TcpStream, events: libc::c_short) -> io::Result<()> {
    wait_ready_for(stream, events, -1).map(|_| ())
}

/// Waits until the socket is ready for `events` or `timeout_ms` passed (-1: no limit); false
/// on timeout.
fn wait_ready_for(
    stream: &TcpStream,
    events: libc::c_short,
    timeout_ms: libc::c_int,
) -> io::Result<bool> {
    let mut poll_fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `poll_fd` is a valid, exclusively borrowed pollfd array of length 1.
        let ready = unsafe { libc::poll(&mut poll_fd, 1, timeout_ms) };
        if ready >= 0 {
            return Ok(ready > 0);
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

/// The longest request or response head (start line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, message.into())
}

/// The same error with what was going on in front of its message.
fn context(error: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(error.kind(), format!("{what}: {error}"))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The start line and the headers of an HTTP/1.1 message that matter here.
#[derive(Debug)]
struct Head {
    start_line: String,
    content_length: Option<usize>,
    chunked: bool,
    close: bool,
}

impl Head {
    fn parse(bytes: &[u8]) -> io::Result<Self> {
        let text = std::str::from_utf8(bytes).map_err(|_| invalid("message head is not UTF-8"))?;
        let mut lines = text.split("\r\n");
        let start_line = lines.next().unwrap_or_default().to_owned();
        let mut head = Self {
            start_line,
            content_length: None,
            chunked: false,
            close: false,
        };
        for line in lines.filter(|line| !line.is_empty()) {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| invalid(format!("malformed header line {line:?}")))?;
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                head.content_length = Some(
                    value
                        .parse()
                        .map_err(|_| invalid(format!("bad Content-Length {value:?}")))?,
                );
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                head.chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                head.close = value.to_ascii_lowercase().contains("close");
            }
        }
        Ok(head)
    }
}

/// A connection with a read buffer, for parsing HTTP/1.1 messages as they arrive.
struct HttpConn {
    stream: TcpStream,
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    /// How long a read may wait, in ms (-1: no limit).
    timeout_ms: libc::c_int,
}

impl HttpConn {
    fn new(stream: TcpStream, timeout: Option<Duration>) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(timeout)?;
        let timeout_ms = timeout.map_or(-1, |timeout| {
            libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX)
        });
        Ok(Self {
            stream,
            buffer: vec![0; 8 * 1024],
            start: 0,
            end: 0,
            timeout_ms,
        })
    }

    /// Reads more bytes into the buffer (making room first); 0 at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buffer.len() {
            if self.start > 0 {
                self.buffer.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let doubled = self.buffer.len() * 2;
                self.buffer.resize(doubled, 0);
            }
        }
        loop {
            match self.stream.read(&mut self.buffer[self.end..]) {
                Ok(count) => {
                    self.end += count;
                    return Ok(count);
                }
                // EAGAIN: SO_RCVTIMEO expired, or a spurious wake-up.
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    if !wait_ready_for(&self.stream, libc::POLLIN, self.timeout_ms)? {
                        return Err(io::Error::new(
                            ErrorKind::TimedOut,
                            format!("nothing received within {} ms", self.timeout_ms),
                        ));
                    }
                }
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// The next message head; `None` when the peer closed the connection between messages.
    fn head(&mut self) -> io::Result<Option<Head>> {
        let mut scanned: usize = 0;
        loop {
            let data = &self.buffer[self.start..self.end];
            let from = scanned.saturating_sub(3);
            if let Some(at) = find(&data[from..], b"\r\n\r\n") {
                let length = from + at + 4;
                let head = Head::parse(&data[..length])?;
                self.start += length;
                return Ok(Some(head));
            }
            scanned = data.len();
            if scanned > MAX_HEAD {
                return Err(invalid("message head longer than 64 KiB"));
            }
            if self.fill()? == 0 {
                return if scanned == 0 {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "connection closed in the middle of a message head",
                    ))
                };
            }
        }
    }

    /// The next `length` bytes.
    fn take(&mut self, length: usize) -> io::Result<&[u8]> {
        while self.end - self.start < length {
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a body",
                ));
            }
        }
        let from = self.start;
        self.start += length;
        Ok(&self.buffer[from..from + length])
    }

    /// The next line, without its CRLF.
    fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(at) = find(&self.buffer[self.start..self.end], b"\r\n") {
                let line =
                    String::from_utf8_lossy(&self.buffer[self.start..self.start + at]).into_owned();
                self.start += at + 2;
                return Ok(line);
            }
            if self.end - self.start > MAX_HEAD {
                return Err(invalid("line longer than 64 KiB"));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a line",
                ));
            }
        }
    }

    /// Reads and drops a chunked body, trailers included.
    fn skip_chunked(&mut self) -> io::Result<()> {
        loop {
            let line = self.line()?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
            if size == 0 {
                while !self.line()?.is_empty() {}
                return Ok(());
            }
            self.take(size)?;
            if !self.line()?.is_empty() {
                return Err(invalid("chunk not followed by CRLF"));
            }
        }
    }
}

/// The fixed body `http-server` answers a `GET` with.
const HTTP_GET_BODY: &str = "hello from the mesh-loadgen upstream\n";
/// The fixed JSON-RPC result `http-server` answers a `POST /mcp` with.
const HTTP_MCP_RESULT: &str =
    r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"3"}],"isError":false}}"#;

fn http_response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The three answers of `http-server`.
struct HttpAnswers {
    get: Vec<u8>,
    mcp: Vec<u8>,
    not_found: Vec<u8>,
}

fn serve_http_connection(stream: TcpStream, answers: &HttpAnswers) -> io::Result<()> {
    let mut conn = HttpConn::new(stream, None)?;
    while let Some(head) = conn.head()? {
        if head.chunked {
            conn.skip_chunked()?;
        } else if let Some(length) = head.content_length {
            conn.take(length)?;
        }
        let mut parts = head.start_line.split(' ');
        let answer = match (parts.next(), parts.next()) {
            (Some("GET"), Some(_)) => &answers.get,
            (Some("POST"), Some(path)) if path == "/mcp" || path.starts_with("/mcp?") => {
                &answers.mcp
            }
            _ => &answers.not_found,
        };
        write_all(&mut conn.stream, answer)?;
        if head.close {
            break;
        }
    }
    Ok(())
}

fn http_server(listen: SocketAddr) -> io::Result<()> {
    // Direct clients hold thousands of connections open here.
    mesh_tests::raise_open_files(1 << 16);
    let listener = TcpListener::bind(listen)?;
    // A deeper accept queue than the standard library's, for bursts of connects; listen(2)
    // again on a listening socket only changes its backlog.
    // SAFETY: listen(2) on a socket this function owns; no memory is involved.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    let answers = Arc::new(HttpAnswers {
        get: http_response("200 OK", "text/plain", HTTP_GET_BODY),
        mcp: http_response("200 OK", "application/json", HTTP_MCP_RESULT),
        not_found: http_response("404 Not Found", "text/plain", "not found\n"),
    });
    println!("listening {}", listener.local_addr()?);
    io::stdout().flush()?;
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let answers = Arc::clone(&answers);
                // Small stacks: thousands of idle connections each hold a thread.
                let spawned = thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || {
                        if let Err(error) = serve_http_connection(stream, &answers)
                            && !matches!(
                                error.kind(),
                                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
                            )
                        {
                            eprintln!("mesh-loadgen http-server: connection: {error}");
                        }
                    });
                if let Err(error) = spawned {
                    eprintln!("mesh-loadgen http-server: no thread for a connection: {error}");
                }
            }
            Err(error) => {
                eprintln!("mesh-loadgen http-server: accept: {error}");
                // Out of descriptors, say: do not spin.
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
    Ok(())
}

/// A log-linear latency histogram in nanoseconds: exact below 128 ns, then 64 buckets per
/// power of two (at most 1/64 relative error); constant memory, merged across threads.
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    max: u64,
}

impl Histogram {
    /// Index of the largest value, `u64::MAX`, plus one.
    const BUCKETS: usize = 57 * 64 + 128;

    fn new() -> Self {
        Self {
            counts: vec![0; Self::BUCKETS],
            total: 0,
            sum: 0,
            max: 0,
        }
    }

    fn index(value: u64) -> usize {
        if value < 128 {
            return value as usize;
        }
        let shift = 63 - value.leading_zeros() - 6;
        shift as usize * 64 + (value >> shift) as usize
    }

    /// The smallest value of a bucket and the bucket's width.
    fn bucket(index: usize) -> (u64, u64) {
        if index < 128 {
            return (index as u64, 1);
        }
        let shift = index / 64 - 1;
        let mantissa = (index % 64 + 64) as u64;
        (mantissa << shift, 1 << shift)
    }

    fn record(&mut self, nanos: u64) {
        self.counts[Self::index(nanos)] += 1;
        self.total += 1;
        self.sum += u128::from(nanos);
        self.max = self.max.max(nanos);
    }

    fn merge(&mut self, other: &Self) {
        for (count, more) in self.counts.iter_mut().zip(&other.counts) {
            *count += more;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    /// The value at a quantile (bucket midpoint, at most the largest value seen), in ns.
    fn quantile(&self, quantile: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((quantile * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, width) = Self::bucket(index);
                return (low + width / 2).min(self.max);
            }
        }
        self.max
    }

    fn summary(&self) -> serde_json::Value {
        let micros = |nanos: u64| nanos as f64 / 1000.0;
        let mean = if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64 / 1000.0
        };
        serde_json::json!({
            "samples": self.total,
            "p50_us": micros(self.quantile(0.50)),
            "p90_us": micros(self.quantile(0.90)),
            "p99_us": micros(self.quantile(0.99)),
            "p999_us": micros(self.quantile(0.999)),
            "max_us": micros(self.max),
            "mean_us": mean,
        })
    }
}

/// A request ready to send, and what its responses must be.
struct HttpRequest {
    bytes: Vec<u8>,
    expect_status: u16,
    expect_body: Option<Vec<u8>>,
    timeout: Duration,
}

impl HttpRequest {
    fn new(to: SocketAddr, args: &HttpRequestArgs) -> io::Result<Self> {
        let host = args.host.clone().unwrap_or_else(|| to.to_string());
        let mut text = format!("{} {} HTTP/1.1\r\nhost: {host}\r\n", args.method, args.path);
        for header in &args.headers {
            if !header.contains(':') {
                return Err(io::Error::new(
                    ErrorKind::InvalidInput,
                    format!("--header {header:?} is not `Name: value`"),
                ));
            }
            text.push_str(header.trim());
            text.push_str("\r\n");
        }
        if let Some(body) = &args.body {
            text.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
        } else {
            text.push_str("\r\n");
        }
        Ok(Self {
            bytes: text.into_bytes(),
            expect_status: args.expect_status,
            expect_body: args
                .expect_body
                .as_ref()
                .map(|text| text.as_bytes().to_vec()),
            timeout: Duration::from_millis(args.timeout_ms.max(1)),
        })
    }

    fn connect(&self, to: SocketAddr) -> io::Result<HttpConn> {
        let stream = TcpStream::connect_timeout(&to, self.timeout)
            .map_err(|error| context(error, format_args!("connecting to {to}")))?;
        HttpConn::new(stream, Some(self.timeout))
    }

    /// Sends the request and reads and checks the response.
    fn exchange(&self, conn: &mut HttpConn) -> io::Result<()> {
        write_all(&mut conn.stream, &self.bytes)?;
        let head = conn.head()?.ok_or_else(|| {
            io::Error::new(
                ErrorKind::UnexpectedEof,
                "the server closed the connection instead of answering",
            )
        })?;
        let status: u16 = head
            .start_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line {:?}", head.start_line)))?;
        let Some(length) = head.content_length else {
            return Err(invalid(format!(
                "{} response without Content-Length{}",
                status,
                if head.chunked { " (chunked)" } else { "" }
            )));
        };
        let body = conn.take(length)?;
        let shown = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        if status != self.expect_status {
            return Err(io::Error::other(format!(
                "status {status}, expected {}: {}",
                self.expect_status,
                shown()
            )));
        }
        if let Some(expected) = &self.expect_body
            && find(body, expected).is_none()
        {
            return Err(io::Error::other(format!(
                "the response body lacks {:?}: {}",
                String::from_utf8_lossy(expected),
                shown()
            )));
        }
        if head.close {
            return Err(io::Error::other(
                "the server ended keep-alive (Connection: close)",
            ));
        }
        Ok(())
    }
}

/// How a connection spaces its requests: back to back, or one every `interval` from `offset`
/// after the start (connections of a paced run are staggered).
#[derive(Debug, Clone, Copy)]
enum Pace {
    BackToBack,
    Every {
        interval: Duration,
        offset: Duration,
    },
}

fn http_connection(
    to: SocketAddr,
    request: &HttpRequest,
    warmup: usize,
    pace: Pace,
    start_line: &Barrier,
    stop: &AtomicBool,
) -> io::Result<Histogram> {
    let set_up = || -> io::Result<HttpConn> {
        let mut conn = request.connect(to)?;
        for number in 0..warmup {
            request
                .exchange(&mut conn)
                .map_err(|error| context(error, format_args!("warm-up request {number}")))?;
        }
        Ok(conn)
    };
    let conn = set_up();
    // Arrive exactly once, also after a failed set-up, so nobody waits forever.
    start_line.wait();
    let mut conn = conn?;
    let mut histogram = Histogram::new();
    let began = Instant::now();
    let mut number = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let start = match pace {
            Pace::BackToBack => Instant::now(),
            Pace::Every { interval, offset } => {
                let due = began + offset + interval * number;
                let now = Instant::now();
                if due > now {
                    // On time: latency counts from when the request really leaves.
                    thread::sleep(due - now);
                    Instant::now()
                } else {
                    // Behind schedule because earlier answers were slow: count from when this
                    // request was due, so a stall is not hidden (no coordinated omission).
                    due
                }
            }
        };
        request
            .exchange(&mut conn)
            .map_err(|error| context(error, format_args!("request {number}")))?;
        histogram.record(elapsed_nanos(start));
        number = number.saturating_add(1);
    }
    Ok(histogram)
}

fn http_test(
    to: SocketAddr,
    connections: usize,
    duration: Duration,
    warmup: usize,
    rate: f64,
    request: HttpRequest,
) -> io::Result<serde_json::Value> {
    mesh_tests::raise_open_files(connections as u64 + 1024);
    let request = Arc::new(request);
    let next = AtomicUsize::new(0);
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(connections as f64 / rate));
    let (per_connection, elapsed) = run_threads(connections, duration, move |start, stop| {
        let index = next.fetch_add(1, Ordering::Relaxed);
        let pace = interval.map_or(Pace::BackToBack, |interval| Pace::Every {
            interval,
            offset: interval.mul_f64(index as f64 / connections as f64),
        });
        http_connection(to, &request, warmup, pace, start, stop)
            .map_err(|error| context(error, format_args!("connection {index}")))
    })?;
    let mut histogram = Histogram::new();
    for one in &per_connection {
        histogram.merge(one);
    }
    let mut result = histogram.summary();
    result["connections"] = connections.into();
    result["offered_rate"] = rate.into();
    result["requests"] = histogram.total.into();
    result["warmup_requests"] = (connections * warmup).into();
    result["seconds"] = elapsed.as_secs_f64().into();
    result["requests_per_second"] = (histogram.total as f64 / elapsed.as_secs_f64()).into();
    Ok(result)
}

fn http_idle(
    to: SocketAddr,
    count: usize,
    threads: usize,
    request: HttpRequest,
) -> io::Result<serde_json::Value> {
    let (soft, hard) = mesh_tests::raise_open_files(count as u64 + 1024);
    if soft < count as u64 + 64 {
        return Err(io::Error::other(format!(
            "the open-file limit is {soft} (hard {hard}), too low for {count} connections: \
             raise it (ulimit -n) or run as root"
        )));
    }
    let request = Arc::new(request);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|thread_index| {
            let share = count / threads + usize::from(thread_index < count % threads);
            let request = Arc::clone(&request);
            thread::spawn(move || -> io::Result<Vec<TcpStream>> {
                let mut open = Vec::with_capacity(share);
                for number in 0..share {
                    let mut conn = request.connect(to)?;
                    request.exchange(&mut conn).map_err(|error| {
                        context(error, format_args!("connection {} of {share}", number + 1))
                    })?;
                    open.push(conn.stream);
                }
                Ok(open)
            })
        })
        .collect();
    let mut open = Vec::with_capacity(count);
    let mut failure = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(streams)) => open.extend(streams),
            Ok(Err(error)) => failure = failure.or(Some(error)),
            Err(_) => failure = failure.or(Some(io::Error::other("an opening thread panicked"))),
        }
    }
    if let Some(error) = failure {
        return Err(context(
            error,
            format_args!("opening {count} connections ({} were open)", open.len()),
        ));
    }
    let ready = serde_json::json!({
        "open": open.len(),
        "seconds_to_open": started.elapsed().as_secs_f64(),
        "open_files_limit": soft,
    });
    println!("{ready}");
    io::stdout().flush()?;
    // Hold the connections until whoever started us closes our stdin.
    io::stdin().read_to_end(&mut Vec::new())?;
    let held_seconds = started.elapsed().as_secs_f64();
    drop(open);
    Ok(serde_json::json!({ "closed": count, "seconds": held_seconds }))
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
        Mode::HttpServer { listen } => http_server(listen).map(|()| serde_json::Value::Null),
        Mode::Http {
            to,
            connections,
            duration_ms,
            warmup,
            rate,
            request,
        } => HttpRequest::new(to, &request).and_then(|request| {
            http_test(
                to,
                connections.max(1),
                Duration::from_millis(duration_ms),
                warmup,
                rate,
                request,
            )
        }),
        Mode::HttpIdle {
            to,
            count,
            threads,
            request,
        } => HttpRequest::new(to, &request)
            .and_then(|request| http_idle(to, count, threads.clamp(1, count.max(1)), request)),
    };
    match result {
        Ok(report) => {
            // Whoever reads may be gone already (http-idle's reader stops after one line).
            let _ = writeln!(io::stdout(), "{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("mesh-loadgen: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_contiguous_and_precise() {
        let mut previous = 0;
        for index in 1..Histogram::BUCKETS {
            let (low, width) = Histogram::bucket(index);
            assert!(low > previous, "bucket {index}");
            assert_eq!(Histogram::index(low), index);
            assert_eq!(Histogram::index(low + (width - 1)), index);
            assert!(width == 1 || (width as f64) / (low as f64) <= 1.0 / 64.0);
            previous = low;
        }
        assert_eq!(Histogram::index(u64::MAX), Histogram::BUCKETS - 1);
    }

    #[test]
    fn histogram_quantiles_merge_across_threads() {
        let mut first = Histogram::new();
        let mut second = Histogram::new();
        for micros in 1..=100u64 {
            first.record(micros * 1000);
            second.record(micros * 1000 + 500);
        }
        first.merge(&second);
        assert_eq!(first.total, 200);
        let p50 = first.quantile(0.5) as f64;
        assert!((p50 - 50_500.0).abs() / 50_500.0 < 0.02, "{p50}");
        assert_eq!(first.quantile(1.0), 100_500);
        assert_eq!(Histogram::new().quantile(0.99), 0);
    }

    #[test]
    fn heads_parse_length_chunking_and_close() {
        let head =
            Head::parse(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: Close\r\n\r\n")
                .unwrap();
        assert_eq!(head.start_line, "HTTP/1.1 200 OK");
        assert_eq!(head.content_length, Some(12));
        assert!(head.close && !head.chunked);
        let head =
            Head::parse(b"POST /mcp HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n").unwrap();
        assert!(head.chunked && head.content_length.is_none());
        assert!(Head::parse(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n").is_err());
    }
}
