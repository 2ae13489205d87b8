//! HTTP/1.1 from a client, served inside the connection's own task. Request heads are parsed
//! here (httparse); a request with no body, or with a `Content-Length` body of at most
//! [`MAX_INLINE_REQUEST_BODY`] bytes, is read whole and handed to the proxy; its response is
//! written back with its own framing (`Content-Length`, chunked, or none for HEAD, 1xx, 204
//! and 304), in one write when the body is in hand, with a flush whenever the body has nothing
//! ready, so SSE passes through unbuffered. Requests are answered one after the other, so
//! pipelined requests are safe. The read buffer is given back while the connection waits
//! idle, and the write buffer once a response is out, so an idle keep-alive connection holds
//! no buffer.
//!
//! While a request is in flight, and while its response body has nothing to send, the
//! connection keeps reading (up to [`MAX_READ_AHEAD`] bytes), so a client that goes away
//! cancels its request or ends its stream at once, as with hyper's server.
//!
//! Everything else (a chunked or larger request body, `Expect`, `Upgrade`, `CONNECT`,
//! HTTP/1.0) hands the connection, with every byte read so far, to hyper's server for the
//! rest of its life ([`Served::Handoff`]): the common requests take the short path, the rare
//! ones keep hyper's complete implementation.

use std::{
    future::Future,
    pin::{Pin, pin},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, header};
use hyper::body::Body;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    time::Instant,
};

use super::buffer_stash::{self, CLIENT_BUFFERS};
use super::h1_client::{self, HeadFault, MAX_HEAD_BYTES, MAX_HEADERS, TooManyHeaders, put_field};
use super::request_headers::RawHeaders;
use super::reused_timer::ReusedTimer;

/// Largest request body read whole on this path; a larger one goes to hyper's server.
pub const MAX_INLINE_REQUEST_BODY: usize = 64 * 1024;
/// Most bytes read ahead of the request in flight (pipelined requests) before reading stops
/// until the response is out.
pub const MAX_READ_AHEAD: usize = 64 * 1024;
/// How long a client may take to send a complete request head, counted from the end of the
/// previous response (an idle keep-alive connection is closed after this too).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long, and for how many bytes, a refused client's remaining bytes are read and dropped
/// before the connection closes.
const LINGER: Duration = Duration::from_secs(1);
const MAX_LINGER_BYTES: usize = 256 * 1024;
/// Response bytes gathered before they are written even though the body has more ready.
const WRITE_BATCH: usize = 64 * 1024;
/// A body frame at least this large is written as it is, not copied into the write buffer.
const DIRECT_WRITE: usize = 8 * 1024;
/// The largest write buffer kept between writes of one response (the largest the buffer
/// stash keeps, too).
const MAX_KEPT_WRITE_BUFFER: usize = buffer_stash::MAX_CLIENT_BUFFER;

/// How serving a connection ended.
#[derive(Debug)]
pub enum Served<S> {
    /// The connection is closed (or the client went away).
    Closed,
    /// A request this path does not serve: hyper's server takes the connection, starting with
    /// `buffered` (that request's head included).
    Handoff { io: S, buffered: Bytes },
}

/// Why a connection was closed on an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("client I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("no complete request (head and body) within {HEADER_READ_TIMEOUT:?}")]
    RequestTimeout,
    #[error("client closed the connection in the middle of a request")]
    ClosedEarly,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("request head over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers")]
    HeadTooLarge,
    #[error("response body failed: {0}")]
    ResponseBody(String),
    #[error("response body ended {missing} bytes short of its Content-Length")]
    ResponseBodyShort { missing: u64 },
}

/// A request head this path serves, with what framing the exchange needs.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    /// The request target (origin form, or absolute form through a proxy).
    pub uri: Uri,
    /// The fields as the client sent them (a header map is built only where one is needed).
    pub headers: RawHeaders,
    /// Bytes of body that follow the head.
    pub body_len: usize,
    /// Whether the client lets the connection stay open after the response.
    pub keep_alive: bool,
    /// Whether the client takes trailers (`TE: trailers`); without it, a chunked response's
    /// trailers are left out, as hyper's server does.
    pub accepts_trailers: bool,
}

/// A whole HTTP/1.1 request as the server hands it to its service.
#[derive(Debug)]
pub struct ServedRequest {
    pub method: Method,
    pub uri: Uri,
    pub headers: RawHeaders,
    pub body: Bytes,
}

/// What the bytes at the start of a buffer are.
// A request is most of what the parse returns; boxing it would cost an allocation per request
// to shrink a value that lives one step on the stack.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Parsed {
    /// A request for this path; its head has been taken off the buffer.
    Request(RequestHead),
    /// A request for hyper's server; nothing was taken off the buffer.
    Handoff,
}

/// Parses a request head at the start of `buffer`: `Ok(None)` while incomplete. Header
/// values are slices of the head's bytes, not copies.
pub fn parse_request_head(buffer: &mut BytesMut) -> Result<Option<Parsed>, ServerError> {
    // Most requests have a few headers: room for 16 first (the slots are initialised on every
    // parse), all the allowed ones only when that is not enough.
    match parse_with::<16>(buffer) {
        Err(TooManyHeaders) => {
            parse_with::<MAX_HEADERS>(buffer).map_err(|TooManyHeaders| ServerError::HeadTooLarge)?
        }
        Ok(parsed) => parsed,
    }
}

fn parse_with<const SLOTS: usize>(
    buffer: &mut BytesMut,
) -> Result<Result<Option<Parsed>, ServerError>, TooManyHeaders> {
    let mut slots = [httparse::EMPTY_HEADER; SLOTS];
    let mut parsed = httparse::Request::new(&mut slots);
    let base = buffer.as_ptr();
    let consumed = match h1_client::head_length(parsed.parse(buffer), buffer.len()) {
        Ok(Some(consumed)) => consumed,
        Ok(None) => return Ok(Ok(None)),
        Err(HeadFault::TooManyHeaders) => return Err(TooManyHeaders),
        Err(HeadFault::TooLarge) => return Ok(Err(ServerError::HeadTooLarge)),
        Err(HeadFault::Invalid) => {
            return Ok(Err(ServerError::Malformed(
                "invalid request line or header",
            )));
        }
    };
    // HTTP/1.0 (keep-alive by opt-in, close-delimited responses) is left to hyper.
    if parsed.version != Some(1) {
        return Ok(Ok(Some(Parsed::Handoff)));
    }
    let method = match parsed
        .method
        .map(|method| Method::from_bytes(method.as_bytes()))
    {
        Some(Ok(method)) if method != Method::CONNECT => method,
        Some(Ok(_)) => return Ok(Ok(Some(Parsed::Handoff))),
        _ => return Ok(Err(ServerError::Malformed("invalid method"))),
    };
    let mut body_len: Option<u64> = None;
    let mut keep_alive = true;
    let mut accepts_trailers = false;
    let has_token = |value: &[u8], token: &[u8]| {
        h1_client::list_items(value).any(|listed| listed.eq_ignore_ascii_case(token))
    };
    for field in parsed.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("content-length") {
            // Every value must be the same number; anything else is hyper's to refuse.
            match h1_client::content_length_items(field.value, body_len) {
                Ok(length) => body_len = length,
                Err(_) => return Ok(Ok(Some(Parsed::Handoff))),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Ok(Ok(Some(Parsed::Handoff)));
        } else if name.eq_ignore_ascii_case("connection") && has_token(field.value, b"close") {
            keep_alive = false;
        } else if name.eq_ignore_ascii_case("te") && has_token(field.value, b"trailers") {
            accepts_trailers = true;
        }
    }
    let body_len = match body_len {
        None => 0,
        Some(length) if length <= MAX_INLINE_REQUEST_BODY as u64 => length as usize,
        Some(_) => return Ok(Ok(Some(Parsed::Handoff))),
    };
    let target = parsed.path.map(|path| {
        let at = path.as_ptr() as usize - base as usize;
        (at, path.len())
    });
    let spans = h1_client::field_spans(base, parsed.headers);
    let head = buffer.split_to(consumed).freeze();
    let framing = (body_len, keep_alive, accepts_trailers);
    Ok(finish_request(head, method, target, spans, framing).map(Some))
}

/// Builds the request the parser found in `head`.
fn finish_request(
    head: Bytes,
    method: Method,
    target: Option<(usize, usize)>,
    spans: h1_client::FieldSpans,
    (body_len, keep_alive, accepts_trailers): (usize, bool, bool),
) -> Result<Parsed, ServerError> {
    let (at, len) = target.ok_or(ServerError::Malformed("no request target"))?;
    let uri = Uri::from_maybe_shared(head.slice(at..at + len))
        .map_err(|_| ServerError::Malformed("invalid request target"))?;
    Ok(Parsed::Request(RequestHead {
        method,
        uri,
        headers: RawHeaders::new(head, spans),
        body_len,
        keep_alive,
        accepts_trailers,
    }))
}

/// How a response body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body is sent (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
}

/// Writes a response head into `out` and says how its body must be framed (`date` is added
/// when given: the caller gives one when the response has none). Hop-by-hop
/// headers of the response are left out (this connection has its own); the framing headers
/// are the ones this function decides: the response's `Content-Length` when it has one,
/// else the body's exact size when it knows it, else chunked.
pub fn encode_response_head(
    status: StatusCode,
    headers: &HeaderMap,
    body_size: Option<u64>,
    head_request: bool,
    keep_alive: bool,
    date: Option<&HeaderValue>,
    out: &mut BytesMut,
) -> ResponseFraming {
    let declared = declared_length(headers);
    let bodiless_status = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if head_request || bodiless_status {
        ResponseFraming::None
    } else if let Some(length) = declared.or(body_size) {
        ResponseFraming::Length(length)
    } else {
        ResponseFraming::Chunked
    };
    out.reserve(128 + headers.len() * 48);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in h1_client::end_to_end_fields(headers) {
        put_field(out, name, value.as_bytes());
    }
    // The length a HEAD or 304 response announces is the one its GET would have.
    let announced = match framing {
        ResponseFraming::Length(length) => Some(length),
        ResponseFraming::None if status == StatusCode::NO_CONTENT || status.is_informational() => {
            None
        }
        ResponseFraming::None => declared.or(body_size.filter(|&size| size > 0)),
        ResponseFraming::Chunked => None,
    };
    if let Some(length) = announced {
        put_field(
            out,
            header::CONTENT_LENGTH.as_str(),
            itoa::Buffer::new().format(length).as_bytes(),
        );
    }
    if framing == ResponseFraming::Chunked {
        put_field(out, header::TRANSFER_ENCODING.as_str(), b"chunked");
    }
    if !keep_alive {
        put_field(out, header::CONNECTION.as_str(), b"close");
    }
    if let Some(date) = date {
        put_field(out, header::DATE.as_str(), date.as_bytes());
    }
    out.put_slice(b"\r\n");
    framing
}

/// A chunk-size line: the length in hex, then CRLF.
fn put_chunk_size(out: &mut BytesMut, length: usize) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut rest = length;
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[rest & 0xf];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    out.put_slice(&digits[at..]);
    out.put_slice(b"\r\n");
}

/// The response's `Content-Length` when it has exactly one valid value (found by a look at
/// the few names a response has, not a hashed lookup).
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers
        .iter()
        .filter(|(name, _)| *name == header::CONTENT_LENGTH);
    let (_, first) = values.next()?;
    if values.next().is_some() {
        return None;
    }
    h1_client::content_length_items(first.as_bytes(), None)
        .ok()
        .flatten()
}

/// The current time as an HTTP date, formatted once per second per thread.
fn http_date() -> HeaderValue {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, HeaderValue)> =
            const { std::cell::RefCell::new((0, HeaderValue::from_static(""))) };
    }
    let now = std::time::SystemTime::now();
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second || cached.1.is_empty() {
            let formatted = httpdate::fmt_http_date(now);
            // An HTTP date is plain ASCII; the empty fallback is never used in practice.
            cached.1 = HeaderValue::from_str(&formatted).unwrap_or(HeaderValue::from_static(""));
            cached.0 = second;
        }
        cached.1.clone()
    })
}

/// One client connection and its buffers.
struct Connection<S> {
    io: S,
    read: BytesMut,
    write: BytesMut,
    /// Fires at most every [`HEADER_READ_TIMEOUT`]; `head_deadline` says whether it counts.
    timer: ReusedTimer,
    head_deadline: Instant,
}

/// Serves HTTP/1.1 requests on `io` with `service` until the client closes, an error closes
/// the connection, or a request needs hyper's server.
pub async fn serve<S, F, Fut, B>(io: S, mut service: F) -> Result<Served<S>, ServerError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(ServedRequest) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut connection = Connection {
        io,
        read: BytesMut::new(),
        write: BytesMut::new(),
        timer: ReusedTimer::default(),
        head_deadline: Instant::now() + HEADER_READ_TIMEOUT,
    };
    loop {
        let head = match connection.next_head().await {
            Ok(Some(Parsed::Request(head))) => head,
            Ok(Some(Parsed::Handoff)) => {
                return Ok(Served::Handoff {
                    buffered: connection.read.split().freeze(),
                    io: connection.io,
                });
            }
            Ok(None) => return Ok(Served::Closed),
            Err(error) => {
                let status = match error {
                    ServerError::Malformed(_) => Some(StatusCode::BAD_REQUEST),
                    ServerError::HeadTooLarge => Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
                    // A client that began a request and stalled is told; an idle keep-alive
                    // connection that reached the timeout is closed without a word (a client
                    // may be about to reuse it, and would read a 408 as its answer).
                    ServerError::RequestTimeout if !connection.read.is_empty() => {
                        Some(StatusCode::REQUEST_TIMEOUT)
                    }
                    _ => None,
                };
                if let Some(status) = status {
                    Box::pin(connection.refuse(status)).await;
                }
                return Err(error);
            }
        };
        // Boxed: the rest of an exchange (the body, the handler, the response) is the larger
        // part of serving a request (about 1 KiB of state), and inline it would size the
        // connection's future, which an idle keep-alive connection holds between requests.
        match Box::pin(connection.exchange(head, &mut service)).await? {
            Exchanged::KeepAlive => {}
            Exchanged::Closed => return Ok(Served::Closed),
        }
        // Written and flushed: the buffer waits in the thread's stash, not in this connection.
        CLIENT_BUFFERS.with(|stash| stash.release(&mut connection.write));
        connection.head_deadline = Instant::now() + HEADER_READ_TIMEOUT;
    }
}

/// How an exchange left its connection.
enum Exchanged {
    /// Open for the client's next request.
    KeepAlive,
    /// Closed: the exchange was the last one, or the client went away during it.
    Closed,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Serves the request whose head was read: its body, the service's response, written
    /// back; closes the connection when the request or response says so.
    async fn exchange<F, Fut, B>(
        &mut self,
        head: RequestHead,
        service: &mut F,
    ) -> Result<Exchanged, ServerError>
    where
        F: FnMut(ServedRequest) -> Fut,
        Fut: Future<Output = Response<B>>,
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let body = match self.read_body(head.body_len).await {
            Ok(body) => body,
            Err(error @ ServerError::RequestTimeout) => {
                self.refuse(StatusCode::REQUEST_TIMEOUT).await;
                return Err(error);
            }
            Err(error) => return Err(error),
        };
        let head_request = head.method == Method::HEAD;
        let (keep_alive, trailers) = (head.keep_alive, head.accepts_trailers);
        let request = ServedRequest {
            method: head.method,
            uri: head.uri,
            headers: head.headers,
            body,
        };
        let Some(response) = self.run(service(request)).await? else {
            return Ok(Exchanged::Closed);
        };
        self.write_response(response, head_request, keep_alive, trailers)
            .await?;
        if !keep_alive {
            self.io.shutdown().await?;
            return Ok(Exchanged::Closed);
        }
        Ok(Exchanged::KeepAlive)
    }

    /// Reads what the socket has into the read buffer; `Ok(0)` at end of stream. With
    /// `release_when_idle`, an empty buffer is given back while the socket has nothing.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        release_when_idle: bool,
    ) -> Poll<std::io::Result<usize>> {
        CLIENT_BUFFERS.with(|stash| stash.make_room(&mut self.read));
        let polled = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read);
        if polled.is_pending() && release_when_idle && self.read.is_empty() {
            CLIENT_BUFFERS.with(|stash| stash.release(&mut self.read));
        }
        polled
    }

    /// Whether the head deadline has passed.
    fn poll_head_timeout(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.timer.poll_deadline(self.head_deadline, cx)
    }

    /// Reads more of the request before the head deadline: the bytes read, 0 at end of
    /// stream. With `release_when_idle`, see [`Connection::poll_fill`].
    async fn fill_before_deadline(
        &mut self,
        release_when_idle: bool,
    ) -> Result<usize, ServerError> {
        std::future::poll_fn(|cx| {
            if let Poll::Ready(read) = self.poll_fill(cx, release_when_idle) {
                return Poll::Ready(read.map_err(ServerError::from));
            }
            self.poll_head_timeout(cx)
                .map(|()| Err(ServerError::RequestTimeout))
        })
        .await
    }

    /// The next request head: `Ok(None)` when the client closed between requests.
    async fn next_head(&mut self) -> Result<Option<Parsed>, ServerError> {
        loop {
            if !self.read.is_empty()
                && let Some(parsed) = parse_request_head(&mut self.read)?
            {
                return Ok(Some(parsed));
            }
            if self.fill_before_deadline(true).await? == 0 {
                return if self.read.is_empty() {
                    Ok(None)
                } else {
                    Err(ServerError::ClosedEarly)
                };
            }
        }
    }

    /// The `length` body bytes after the head.
    async fn read_body(&mut self, length: usize) -> Result<Bytes, ServerError> {
        if length == 0 {
            return Ok(Bytes::new());
        }
        while self.read.len() < length {
            self.read.reserve(length - self.read.len());
            if self.fill_before_deadline(false).await? == 0 {
                return Err(ServerError::ClosedEarly);
            }
        }
        Ok(self.read.split_to(length).freeze())
    }

    /// Runs a request's handler while reading ahead, so that a client that goes away cancels
    /// it: `Ok(None)` then.
    async fn run<R>(&mut self, handler: impl Future<Output = R>) -> Result<Option<R>, ServerError> {
        let mut handler = pin!(handler);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(response) = handler.as_mut().poll(cx) {
                return Poll::Ready(Ok(Some(response)));
            }
            match ready!(self.poll_read_ahead(cx)) {
                ServerError::ClosedEarly => Poll::Ready(Ok(None)),
                error => Poll::Ready(Err(error)),
            }
        })
        .await
    }

    /// Reads ahead of the exchange in flight (pipelined requests), up to [`MAX_READ_AHEAD`]
    /// bytes: ready only when the client closed its side or the connection failed. Hyper's
    /// server does the same: the client closing its side ends the exchange (a half-close
    /// cannot be told from a client that left).
    fn poll_read_ahead(&mut self, cx: &mut Context<'_>) -> Poll<ServerError> {
        while self.read.len() < MAX_READ_AHEAD {
            match ready!(self.poll_fill(cx, false)) {
                Ok(0) => return Poll::Ready(ServerError::ClosedEarly),
                Ok(_) => {}
                Err(error) => return Poll::Ready(error.into()),
            }
        }
        Poll::Pending
    }

    /// Writes a response: head and body, framed as the head says.
    async fn write_response<B>(
        &mut self,
        response: Response<B>,
        head_request: bool,
        keep_alive: bool,
        trailers: bool,
    ) -> Result<(), ServerError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let (parts, body) = response.into_parts();
        let body_size = if body.is_end_stream() {
            Some(0)
        } else {
            body.size_hint().exact()
        };
        self.write.clear();
        CLIENT_BUFFERS.with(|stash| stash.make_room(&mut self.write));
        let date = (!parts.headers.contains_key(header::DATE)).then(http_date);
        let framing = encode_response_head(
            parts.status,
            &parts.headers,
            body_size,
            head_request,
            keep_alive,
            date.as_ref(),
            &mut self.write,
        );
        drop(parts);
        let mut remaining = match framing {
            ResponseFraming::None => {
                drop(body);
                return self.flush_write().await;
            }
            ResponseFraming::Length(length) => Some(length),
            ResponseFraming::Chunked => None,
        };
        let mut body = pin!(body);
        loop {
            // A frame ready now joins the batch; when the body has none ready, what is
            // gathered goes out before waiting for more.
            let polled = std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await;
            let next = match polled {
                Poll::Ready(next) => next,
                Poll::Pending => {
                    self.flush_write().await?;
                    // While the body has nothing (an SSE stream between events), a client
                    // that leaves ends the response at once, not at the next event.
                    std::future::poll_fn(|cx| {
                        if let Poll::Ready(next) = body.as_mut().poll_frame(cx) {
                            return Poll::Ready(Ok(next));
                        }
                        self.poll_read_ahead(cx).map(Err)
                    })
                    .await?
                }
            };
            let frame = match next {
                None => break,
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    // What was gathered still goes out; the missing end tells the client.
                    let _ = self.flush_write().await;
                    return Err(ServerError::ResponseBody(error.to_string()));
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    if data.is_empty() {
                        continue;
                    }
                    let overlong = match &mut remaining {
                        Some(left) => {
                            let take = (data.len() as u64).min(*left);
                            *left -= take;
                            self.put_data(data.slice(..take as usize)).await?;
                            take < data.len() as u64
                        }
                        None => {
                            put_chunk_size(&mut self.write, data.len());
                            self.put_data(data).await?;
                            self.write.put_slice(b"\r\n");
                            false
                        }
                    };
                    if overlong {
                        // More than the announced length: the rest cannot be sent.
                        let _ = self.flush_write().await;
                        return Err(ServerError::ResponseBody(
                            "body longer than its Content-Length".to_owned(),
                        ));
                    }
                }
                Err(frame) => {
                    // Trailers go out after the last chunk, only to a client that asked for
                    // them; a sized body has no place for them.
                    if let (None, true, Ok(fields)) = (remaining, trailers, frame.into_trailers()) {
                        self.write.put_slice(b"0\r\n");
                        for (name, value) in &fields {
                            put_field(&mut self.write, name.as_str(), value.as_bytes());
                        }
                        self.write.put_slice(b"\r\n");
                        return self.flush_write().await;
                    }
                }
            }
            if self.write.len() >= WRITE_BATCH {
                self.flush_write().await?;
            }
        }
        match remaining {
            Some(0) => {}
            Some(missing) => {
                let _ = self.flush_write().await;
                return Err(ServerError::ResponseBodyShort { missing });
            }
            None => self.write.put_slice(b"0\r\n\r\n"),
        }
        self.flush_write().await
    }

    /// Answers with an empty `status` response the server gives itself, then closes the
    /// connection: the client is told why, and the connection closes on the error either way.
    async fn refuse(&mut self, status: StatusCode) {
        self.write.clear();
        encode_response_head(
            status,
            &HeaderMap::new(),
            Some(0),
            false,
            false,
            Some(&http_date()),
            &mut self.write,
        );
        let _ = self.io.write_all(&self.write).await;
        let _ = self.io.shutdown().await;
        self.linger().await;
    }

    /// Reads and drops what the client still sends after a refusal, for a short while:
    /// closing with unread bytes would reset the connection, and the reset can destroy the
    /// refusal before the client reads it.
    async fn linger(&mut self) {
        let mut drained = 0;
        let _ = tokio::time::timeout(LINGER, async {
            while drained < MAX_LINGER_BYTES {
                self.read.clear();
                match std::future::poll_fn(|cx| self.poll_fill(cx, false)).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => drained += read,
                }
            }
        })
        .await;
    }

    /// Adds body bytes to what goes out next: copied behind the head or the bytes gathered
    /// so far when small, written as they are (after what was gathered) when large.
    async fn put_data(&mut self, data: Bytes) -> Result<(), ServerError> {
        if data.len() < DIRECT_WRITE {
            self.write.put_slice(&data);
            return Ok(());
        }
        self.flush_write().await?;
        self.io.write_all(&data).await?;
        Ok(())
    }

    async fn flush_write(&mut self) -> Result<(), ServerError> {
        if !self.write.is_empty() {
            self.io.write_all(&self.write).await?;
            self.write.clear();
        }
        self.io.flush().await?;
        // A buffer a large response made grow is not kept for the connection's life.
        if self.write.capacity() > MAX_KEPT_WRITE_BUFFER {
            self.write = BytesMut::new();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
    use hyper::body::Frame;
    use tokio::io::AsyncReadExt;

    use super::*;

    /// What a test service answers: `/sized` a sized body, `/stream` three frames of unknown
    /// total size (one large), `/echo` the request body.
    fn answer(request: ServedRequest) -> Response<BoxBody<Bytes, Infallible>> {
        let body = match request.uri.path() {
            "/stream" => {
                let frames = [
                    Bytes::from_static(b"first"),
                    Bytes::from(vec![b'x'; 20_000]),
                    Bytes::from_static(b"last"),
                ];
                StreamBody::new(futures_util::stream::iter(
                    frames.map(|data| Ok::<_, Infallible>(Frame::data(data))),
                ))
                .boxed()
            }
            "/echo" => Full::new(request.body).boxed(),
            _ => Full::new(Bytes::from_static(b"hello")).boxed(),
        };
        Response::new(body)
    }

    #[tokio::test]
    async fn a_connection_answers_pipelined_requests_in_order_with_their_framing() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let served = tokio::spawn(serve(server, |request| async move { answer(request) }));
        client
            .write_all(
                b"GET /sized HTTP/1.1\r\n\r\n\
                  GET /stream HTTP/1.1\r\n\r\n\
                  HEAD /sized HTTP/1.1\r\n\r\n\
                  POST /echo HTTP/1.1\r\nContent-Length: 4\r\n\r\nping\
                  GET /sized HTTP/1.1\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        assert!(matches!(served.await.unwrap(), Ok(Served::Closed)));
        let text: String = String::from_utf8(received)
            .unwrap()
            .split_inclusive("\r\n")
            .filter(|line| !line.starts_with("date: "))
            .collect();
        let sized = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        let stream = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
             5\r\nfirst\r\n4e20\r\n{}\r\n4\r\nlast\r\n0\r\n\r\n",
            "x".repeat(20_000)
        );
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
        let echo = "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nping";
        let last = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello";
        assert_eq!(text, format!("{sized}{stream}{head}{echo}{last}"));
    }

    #[tokio::test]
    async fn a_request_for_hyper_hands_over_the_connection_with_its_bytes() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let first_request = b"GET /sized HTTP/1.1\r\n\r\n";
        let upload = b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n";
        client
            .write_all(&[&first_request[..], &upload[..]].concat())
            .await
            .unwrap();
        let served = serve(server, |request| async move { answer(request) })
            .await
            .unwrap();
        let Served::Handoff { buffered, .. } = served else {
            panic!("expected a handoff");
        };
        assert_eq!(&buffered[..], &upload[..]);
        let mut first = vec![0; 256];
        let read = client.read(&mut first).await.unwrap();
        assert!(String::from_utf8_lossy(&first[..read]).ends_with("\r\n\r\nhello"));
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_gives_both_buffers_back() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        // On this test's thread (the current-thread runtime), like the connection's task.
        let served = tokio::spawn(serve(server, |request| async move { answer(request) }));
        let stashed_before = CLIENT_BUFFERS.with(|stash| stash.len());
        client
            .write_all(b"GET /sized HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut response = vec![0; 256];
        let mut read = 0;
        while !response[..read].ends_with(b"hello") {
            read += client.read(&mut response[read..]).await.unwrap();
        }
        // Let the connection reach its wait for the next request.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            CLIENT_BUFFERS.with(|stash| stash.len()),
            stashed_before + 2,
            "the read and the write buffer wait in the stash"
        );
        drop(client);
        assert!(matches!(served.await.unwrap(), Ok(Served::Closed)));
    }

    /// What a client that writes `sent` and then stalls reads back, and how serving ended.
    async fn stalled_client(
        sent: &[u8],
    ) -> (String, Result<Served<tokio::io::DuplexStream>, ServerError>) {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let served = tokio::spawn(serve(server, |request| async move { answer(request) }));
        client.write_all(sent).await.unwrap();
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        let text = String::from_utf8(received).unwrap();
        (text, served.await.unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_head_that_stalls_is_answered_408_at_the_deadline() {
        let started = Instant::now();
        let (text, served) = stalled_client(b"GET /sized HTTP/1.1\r\nHost: a\r\n").await;
        assert!(
            text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{text}"
        );
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(matches!(served, Err(ServerError::RequestTimeout)));
        assert!(started.elapsed() >= HEADER_READ_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_body_that_stalls_is_answered_408() {
        let (text, served) =
            stalled_client(b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\npart").await;
        assert!(
            text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{text}"
        );
        assert!(matches!(served, Err(ServerError::RequestTimeout)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_is_closed_at_the_deadline_without_an_answer() {
        let started = Instant::now();
        let (text, served) = stalled_client(b"GET /sized HTTP/1.1\r\n\r\n").await;
        // The one answer is the request's; the timeout adds nothing.
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nhello"), "{text}");
        assert!(matches!(served, Err(ServerError::RequestTimeout)));
        assert!(started.elapsed() >= HEADER_READ_TIMEOUT);
    }

    fn parse(bytes: &[u8]) -> (Result<Option<Parsed>, ServerError>, BytesMut) {
        let mut buffer = BytesMut::from(bytes);
        let parsed = parse_request_head(&mut buffer);
        (parsed, buffer)
    }

    fn request(bytes: &[u8]) -> (RequestHead, BytesMut) {
        match parse(bytes) {
            (Ok(Some(Parsed::Request(head))), rest) => (head, rest),
            (other, _) => panic!("expected a request, got {other:?}"),
        }
    }

    #[test]
    fn a_request_head_is_parsed_and_taken_off_the_buffer() {
        let (head, rest) = request(
            b"POST /mcp?x=1 HTTP/1.1\r\nHost: tools\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello",
        );
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.uri.path(), "/mcp");
        assert_eq!(head.uri.query(), Some("x=1"));
        let headers = head.headers.to_map().unwrap();
        assert_eq!(headers["host"], "tools");
        assert_eq!(headers.get_all("x-a").iter().count(), 2);
        assert_eq!(head.body_len, 5);
        assert!(head.keep_alive);
        assert_eq!(&rest[..], b"hello");
    }

    #[test]
    fn an_incomplete_head_waits_and_takes_nothing() {
        let (parsed, rest) = parse(b"GET / HTTP/1.1\r\nHost: a\r\n");
        assert!(matches!(parsed, Ok(None)));
        assert_eq!(rest.len(), 25);
    }

    #[test]
    fn connection_close_is_seen_among_other_tokens() {
        let (head, _) = request(b"GET / HTTP/1.1\r\nConnection: TE, Close\r\nTE: trailers\r\n\r\n");
        assert!(!head.keep_alive);
        assert!(head.accepts_trailers);
        let (head, _) = request(b"GET / HTTP/1.1\r\nTE: gzip\r\n\r\n");
        assert!(head.keep_alive);
        assert!(!head.accepts_trailers);
        assert_eq!(head.body_len, 0);
    }

    #[test]
    fn requests_this_path_does_not_serve_are_handed_off_untouched() {
        for bytes in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n",
        ] {
            let (parsed, rest) = parse(bytes);
            assert!(
                matches!(parsed, Ok(Some(Parsed::Handoff))),
                "{:?}: {parsed:?}",
                String::from_utf8_lossy(bytes)
            );
            assert_eq!(
                &rest[..],
                bytes,
                "nothing is taken off a handed-off request"
            );
        }
        // Equal repeated lengths are one length.
        let (head, _) =
            request(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(head.body_len, 3);
    }

    #[test]
    fn malformed_and_oversized_heads_are_refused() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n").0,
            Err(ServerError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"G\x01T / HTTP/1.1\r\n\r\n").0,
            Err(ServerError::Malformed(_))
        ));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for index in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{index}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&many).0, Err(ServerError::HeadTooLarge)));
        let mut long = b"GET / HTTP/1.1\r\nx-long: ".to_vec();
        long.resize(MAX_HEAD_BYTES + 10, b'a');
        assert!(matches!(parse(&long).0, Err(ServerError::HeadTooLarge)));
        // Many headers within the limit need the second, larger parse.
        let mut fifty = b"GET / HTTP/1.1\r\n".to_vec();
        for index in 0..50 {
            fifty.extend_from_slice(format!("x-{index}: v\r\n").as_bytes());
        }
        fifty.extend_from_slice(b"\r\n");
        assert_eq!(request(&fifty).0.headers.len(), 50);
    }

    fn head(
        status: StatusCode,
        headers: &[(&str, &str)],
        body_size: Option<u64>,
        head_request: bool,
        keep_alive: bool,
    ) -> (String, ResponseFraming) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let mut out = BytesMut::new();
        let framing = encode_response_head(
            status,
            &map,
            body_size,
            head_request,
            keep_alive,
            (!map.contains_key(header::DATE))
                .then_some(&HeaderValue::from_static("Mon, 30 Nov 2026 12:00:00 GMT")),
            &mut out,
        );
        (String::from_utf8(out.to_vec()).unwrap(), framing)
    }

    #[test]
    fn response_heads_carry_the_framing_this_connection_needs() {
        let (text, framing) = head(
            StatusCode::OK,
            &[("content-length", "5")],
            None,
            false,
            true,
        );
        assert_eq!(framing, ResponseFraming::Length(5));
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: Mon, 30 Nov 2026 12:00:00 GMT\r\n\r\n"
        );
        let (text, framing) = head(StatusCode::OK, &[], None, false, true);
        assert_eq!(framing, ResponseFraming::Chunked);
        assert!(text.contains("transfer-encoding: chunked\r\n"));
        let (text, framing) = head(StatusCode::OK, &[], Some(0), false, false);
        assert_eq!(framing, ResponseFraming::Length(0));
        assert!(text.contains("content-length: 0\r\n") && text.contains("connection: close\r\n"));
        // Hop-by-hop headers of the upstream's response, and those it names, stay behind.
        let (text, _) = head(
            StatusCode::OK,
            &[
                ("transfer-encoding", "chunked"),
                ("connection", "x-private"),
                ("x-private", "1"),
                ("keep-alive", "timeout=5"),
                ("x-kept", "1"),
                ("date", "Sun, 29 Nov 2026 12:00:00 GMT"),
            ],
            None,
            false,
            true,
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nx-kept: 1\r\ndate: Sun, 29 Nov 2026 12:00:00 GMT\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        // HEAD and 304 announce the length without a body; 204 has neither.
        let (text, framing) = head(
            StatusCode::OK,
            &[("content-length", "42")],
            None,
            true,
            true,
        );
        assert_eq!(framing, ResponseFraming::None);
        assert!(text.contains("content-length: 42\r\n"));
        let (text, framing) = head(
            StatusCode::NOT_MODIFIED,
            &[("content-length", "42")],
            None,
            false,
            true,
        );
        assert_eq!(framing, ResponseFraming::None);
        assert!(text.contains("content-length: 42\r\n"));
        let (text, framing) = head(
            StatusCode::NO_CONTENT,
            &[("content-length", "0")],
            Some(0),
            false,
            true,
        );
        assert_eq!(framing, ResponseFraming::None);
        assert!(!text.contains("content-length"));
    }
}
