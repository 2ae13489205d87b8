//! HTTP/1.1 to an upstream, driven inside the request's own task: the request head and its
//! buffered body go out in one write, the response head is parsed here (httparse), and the
//! response body is read off the connection by whoever polls it (the client's connection,
//! writing it back). No connection task, channel or second hyper state machine sits in
//! between. The pool ([`super::upstream`]) uses it for requests whose body the proxy holds
//! whole and small (every request without a body, and the JSON-RPC bodies it inspects, up
//! to [`INLINE_BODY`]); a streamed or larger request body goes through hyper's client, which
//! reads the response while the body is still going out.
//!
//! Response framing follows RFC 9112 §6.3: no body for HEAD and for 1xx, 204 and 304; chunked
//! when `Transfer-Encoding` ends in `chunked`; else until the upstream closes when there is a
//! `Transfer-Encoding` at all; else `Content-Length` (every value equal); else until the
//! upstream closes. Interim 1xx responses are skipped. A connection is reused only after a
//! complete, keep-alive response with nothing left over. Head size, header count, chunk-size
//! lines and trailers are bounded; anything malformed is an error, never a guess.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version, header};
use hyper::body::{Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWriteExt},
    time::Instant,
};

use smallvec::SmallVec;
use sync_wrapper::SyncWrapper;

use super::buffer_stash::UPSTREAM_READS;
use super::dialer::Upstream;
use super::request_headers::{RawHeaders, RequestHeaders};
use super::reused_timer::ReusedTimer;

/// Largest response head (status line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most response headers accepted.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 1024;
/// Most bytes of trailers accepted.
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// A body up to this size is copied behind the head so both go out in one write (the proxy
/// sends larger ones through hyper's client).
pub const INLINE_BODY: usize = 16 * 1024;

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("upstream I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("upstream closed the connection before the response ended")]
    ClosedEarly,
    #[error("upstream response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("malformed upstream response: {0}")]
    Malformed(&'static str),
}

/// How a request failed: before a byte of it reached the upstream (so it may go again on
/// another connection), or after.
#[derive(Debug)]
pub enum SendFailure {
    NotSent(H1Error),
    Failed(H1Error),
    /// No response head by the deadline (the request may have reached the upstream).
    TimedOut,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// What its framing headers say, read off the raw fields while parsing.
    framing_fields: FramingFields,
}

/// What a response's `Connection`, `Transfer-Encoding` and `Content-Length` fields say, read
/// in one pass over the parsed fields (every value of each, in order). A fault is kept, not
/// raised: it matters only if the framing depends on that field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FramingFields {
    /// `Connection` lists `close` / `keep-alive`.
    close: bool,
    keep_alive: bool,
    /// `Transfer-Encoding`: absent, or whether its last coding is `chunked`.
    transfer_coding: Option<Result<bool, &'static str>>,
    content_length: Result<Option<u64>, &'static str>,
    has_content_length: bool,
}

impl FramingFields {
    fn scan(fields: &[httparse::Header<'_>]) -> Self {
        let mut scanned = Self {
            close: false,
            keep_alive: false,
            transfer_coding: None,
            content_length: Ok(None),
            has_content_length: false,
        };
        for field in fields {
            let name = field.name;
            // Told apart by length first: most fields are none of these.
            if !matches!(name.len(), 10 | 14 | 17) {
                continue;
            }
            if name.eq_ignore_ascii_case("connection") {
                for token in list_items(field.value) {
                    scanned.close |= token.eq_ignore_ascii_case(b"close");
                    scanned.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                let previous = scanned.transfer_coding.unwrap_or(Ok(false));
                scanned.transfer_coding = Some(if is_visible_text(field.value) {
                    // The last coding of all the values decides; an empty list changes nothing.
                    previous.map(|chunked| {
                        list_items(field.value)
                            .last()
                            .map_or(chunked, |coding| coding.eq_ignore_ascii_case(b"chunked"))
                    })
                } else {
                    Err("invalid Transfer-Encoding")
                });
            } else if name.eq_ignore_ascii_case("content-length") {
                scanned.has_content_length = true;
                if let Ok(seen) = scanned.content_length {
                    scanned.content_length = content_length_items(field.value, seen);
                }
            }
        }
        scanned
    }
}

/// The non-empty items of a comma-separated field value, trimmed.
pub fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&byte| byte == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
}

/// Whether a field value is text `HeaderValue::to_str` takes (visible ASCII, space, tab).
pub fn is_visible_text(value: &[u8]) -> bool {
    // No early exit: the check over a short value is a few vector instructions.
    value.iter().fold(true, |visible, &byte| {
        visible & (byte.wrapping_sub(0x20) < 0x5f || byte == b'\t')
    })
}

/// A message's length after one more `Content-Length` value (`seen`: the length the earlier
/// values gave): each value is one number or a list of them, every one the same
/// (RFC 9110 §8.6); anything else is an error.
pub fn content_length_items(value: &[u8], seen: Option<u64>) -> Result<Option<u64>, &'static str> {
    let mut length = seen;
    for item in value.split(|&byte| byte == b',').map(<[u8]>::trim_ascii) {
        if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
            return Err("invalid Content-Length");
        }
        // 19 digits or fewer always fit a u64.
        let parsed = item
            .iter()
            .fold(0u64, |total, &digit| total * 10 + u64::from(digit - b'0'));
        if length.is_some_and(|seen| seen != parsed) {
            return Err("conflicting Content-Length values");
        }
        length = Some(parsed);
    }
    Ok(length)
}

/// Parses a response head at the start of `buffer` and takes it off: `Ok(None)` while
/// incomplete. Header values are slices of the head's bytes, not copies.
pub fn parse_response_head(buffer: &mut BytesMut) -> Result<Option<ResponseHead>, H1Error> {
    // Most responses have a few headers: room for 16 first (the slots are initialised on
    // every parse), all the allowed ones only when that is not enough.
    match parse_response_head_with::<16>(buffer) {
        Err(TooManyHeaders) => parse_response_head_with::<MAX_HEADERS>(buffer)
            .map_err(|TooManyHeaders| H1Error::Malformed("more than 100 headers"))?,
        Ok(parsed) => parsed,
    }
}

/// More headers than a parse had room for.
#[derive(Debug)]
pub struct TooManyHeaders;

/// What is wrong with a head httparse could not take.
#[derive(Debug)]
pub enum HeadFault {
    /// More headers than the parse had room for (try again with more).
    TooManyHeaders,
    /// Over [`MAX_HEAD_BYTES`], complete or not.
    TooLarge,
    Invalid,
}

/// The length of the head httparse found in a buffer of `buffered` bytes (request or
/// response): `Ok(None)` while incomplete and within [`MAX_HEAD_BYTES`].
pub fn head_length(
    parsed: Result<httparse::Status<usize>, httparse::Error>,
    buffered: usize,
) -> Result<Option<usize>, HeadFault> {
    match parsed {
        Ok(httparse::Status::Complete(consumed)) if consumed > MAX_HEAD_BYTES => {
            Err(HeadFault::TooLarge)
        }
        Ok(httparse::Status::Complete(consumed)) => Ok(Some(consumed)),
        Ok(httparse::Status::Partial) if buffered > MAX_HEAD_BYTES => Err(HeadFault::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadFault::TooManyHeaders),
        Err(_) => Err(HeadFault::Invalid),
    }
}

fn parse_response_head_with<const SLOTS: usize>(
    buffer: &mut BytesMut,
) -> Result<Result<Option<ResponseHead>, H1Error>, TooManyHeaders> {
    let mut slots = [httparse::EMPTY_HEADER; SLOTS];
    let mut response = httparse::Response::new(&mut slots);
    let base = buffer.as_ptr();
    let consumed = match head_length(response.parse(buffer), buffer.len()) {
        Ok(Some(consumed)) => consumed,
        Ok(None) => return Ok(Ok(None)),
        Err(HeadFault::TooManyHeaders) => return Err(TooManyHeaders),
        Err(HeadFault::TooLarge) => return Ok(Err(H1Error::HeadTooLarge)),
        Err(HeadFault::Invalid) => {
            return Ok(Err(H1Error::Malformed("invalid status line or header")));
        }
    };
    let framing_fields = FramingFields::scan(response.headers);
    let spans = field_spans(base, response.headers);
    let (version, code) = (response.version, response.code);
    Ok(finish_head(
        buffer,
        consumed,
        (version, code),
        &spans,
        framing_fields,
    ))
}

/// Builds the head the parser found in the first `consumed` bytes of `buffer` (`spans`: the
/// offsets and lengths of each header's name and value), and takes those bytes off.
fn finish_head(
    buffer: &mut BytesMut,
    consumed: usize,
    (version, code): (Option<u8>, Option<u16>),
    spans: &[[u32; 4]],
    framing_fields: FramingFields,
) -> Result<Option<ResponseHead>, H1Error> {
    let version = match version {
        Some(0) => Version::HTTP_10,
        Some(1) => Version::HTTP_11,
        _ => return Err(H1Error::Malformed("unsupported HTTP version")),
    };
    let status = code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(H1Error::Malformed("invalid status code"))?;
    let head = buffer.split_to(consumed).freeze();
    let headers = header_map(&head, spans).map_err(H1Error::Malformed)?;
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        framing_fields,
    }))
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// The framing of the body that follows `head`, answering a request with `method`, and
/// whether the connection may carry another request after it.
pub fn framing(method: &Method, head: &ResponseHead) -> Result<(Framing, bool), H1Error> {
    let fields = &head.framing_fields;
    let keep_alive = match head.version {
        Version::HTTP_11 => !fields.close,
        _ => fields.keep_alive,
    };
    let status = head.status;
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Empty, keep_alive));
    }
    if let Some(coding) = fields.transfer_coding {
        let chunked = coding.map_err(H1Error::Malformed)?;
        // With a Content-Length too, the message may be an attempt at smuggling: read it as
        // the transfer coding says, then close (RFC 9112 §6.3, item 3).
        let reusable = keep_alive && chunked && !fields.has_content_length;
        return Ok(if chunked {
            (Framing::Chunked, reusable)
        } else {
            (Framing::UntilClose, false)
        });
    }
    Ok(match fields.content_length.map_err(H1Error::Malformed)? {
        Some(length) => (Framing::Length(length), keep_alive),
        None => (Framing::UntilClose, false),
    })
}

/// One step of [`ChunkedDecoder::decode`].
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    NeedMore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Decoder of the chunked transfer coding, fed from a buffer that grows as bytes arrive.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    trailer_bytes: usize,
    trailers: HeaderMap,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: ChunkState::Size,
            trailer_bytes: 0,
            trailers: HeaderMap::new(),
        }
    }
}

impl ChunkedDecoder {
    /// Whether the terminating chunk and trailers have been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Takes what it can from the front of `buffer`: data, the trailers, the end, or a
    /// request for more bytes.
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Decoded, H1Error> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(Decoded::End),
                ChunkState::Size => {
                    let Some(line) = take_line(buffer, MAX_CHUNK_LINE, "chunk-size line too long")?
                    else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = parse_chunk_size(&line)?;
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(remaining) => {
                    if buffer.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(buffer.len());
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Decoded::Data(buffer.split_to(take).freeze()));
                }
                ChunkState::DataEnd => {
                    if buffer.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buffer[..2] != b"\r\n" {
                        return Err(H1Error::Malformed("chunk data not followed by CRLF"));
                    }
                    buffer.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let room = MAX_TRAILER_BYTES.saturating_sub(self.trailer_bytes);
                    let Some(line) = take_line(buffer, room, "trailers too large")? else {
                        return Ok(Decoded::NeedMore);
                    };
                    self.trailer_bytes += line.len() + 2;
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                        if !self.trailers.is_empty() {
                            return Ok(Decoded::Trailers(std::mem::take(&mut self.trailers)));
                        }
                        return Ok(Decoded::End);
                    }
                    let (name, value) = split_field(&line)?;
                    self.trailers.append(name, value);
                }
            }
        }
    }
}

/// Takes one CRLF-terminated line off `buffer` (without the CRLF), if a whole one is there;
/// a line longer than `limit` is the error `too_long`.
fn take_line(
    buffer: &mut BytesMut,
    limit: usize,
    too_long: &'static str,
) -> Result<Option<Bytes>, H1Error> {
    let window = &buffer[..buffer.len().min(limit + 2)];
    match window.windows(2).position(|pair| pair == b"\r\n") {
        Some(end) => {
            let line = buffer.split_to(end).freeze();
            buffer.advance(2);
            Ok(Some(line))
        }
        None if buffer.len() >= limit + 2 => Err(H1Error::Malformed(too_long)),
        None => Ok(None),
    }
}

/// A chunk-size line: hex digits, then optional whitespace and `;extensions` (ignored).
fn parse_chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let digits = line
        .iter()
        .position(|byte| !byte.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 16 {
        return Err(H1Error::Malformed("invalid chunk size"));
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .position(|byte| *byte != b' ' && *byte != b'\t')
        .unwrap_or(rest.len())..];
    if !rest.is_empty() && rest[0] != b';' {
        return Err(H1Error::Malformed("invalid chunk size"));
    }
    let text = std::str::from_utf8(&line[..digits])
        .map_err(|_| H1Error::Malformed("invalid chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| H1Error::Malformed("invalid chunk size"))
}

/// A trailer field line: `name: value`.
fn split_field(line: &[u8]) -> Result<(HeaderName, HeaderValue), H1Error> {
    let colon = line
        .iter()
        .position(|byte| *byte == b':')
        .ok_or(H1Error::Malformed("trailer without a colon"))?;
    let name = HeaderName::from_bytes(&line[..colon])
        .map_err(|_| H1Error::Malformed("invalid trailer name"))?;
    let value = line[colon + 1..].trim_ascii();
    let value =
        HeaderValue::from_bytes(value).map_err(|_| H1Error::Malformed("invalid trailer value"))?;
    Ok((name, value))
}

/// Where each parsed field's name and value sit in the buffer httparse read: offset and
/// length of the name, offset and length of the value. A head is at most [`MAX_HEAD_BYTES`]
/// (64 KiB), so they fit `u32`; room for 12 fields inline (an MCP SDK client sends about 9).
pub type FieldSpans = SmallVec<[[u32; 4]; 12]>;

/// The spans of the fields httparse found in a buffer starting at `base`, whose head is at
/// most [`MAX_HEAD_BYTES`]. The parser's borrow of the buffer must end before the head is
/// split off it, so the fields are kept as offsets, not slices.
pub fn field_spans(base: *const u8, parsed: &[httparse::Header<'_>]) -> FieldSpans {
    let base = base as usize;
    parsed
        .iter()
        .map(|field| {
            [
                field.name.as_ptr() as usize - base,
                field.name.len(),
                field.value.as_ptr() as usize - base,
                field.value.len(),
            ]
            .map(|offset| offset as u32)
        })
        .collect()
}

/// The name and value of a field at `span` in `head`.
pub fn field_at<'h>(head: &'h [u8], span: &[u32; 4]) -> (&'h [u8], &'h [u8]) {
    let [name_at, name_len, value_at, value_len] = span.map(|offset| offset as usize);
    (
        &head[name_at..name_at + name_len],
        &head[value_at..value_at + value_len],
    )
}

/// A header map of the fields at `spans` in `head`: values are slices of `head`, not copies.
pub fn header_map(head: &Bytes, spans: &[[u32; 4]]) -> Result<HeaderMap, &'static str> {
    let mut headers = HeaderMap::with_capacity(spans.len());
    for span in spans {
        let (name, value) = field_at(head, span);
        let name = HeaderName::from_bytes(name).map_err(|_| "invalid header name")?;
        let value = HeaderValue::from_maybe_shared(head.slice_ref(value))
            .map_err(|_| "invalid header value")?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The options a message's `Connection` headers list (`close`, `keep-alive`, or names of
/// more headers that describe only this connection).
pub fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
}

/// The fields of `headers` that go on to the next hop: all but the hop-by-hop ones, those
/// a `Connection` header names (usually there is none), and `Content-Length` (each hop
/// frames its own body).
pub fn end_to_end_fields(headers: &HeaderMap) -> impl Iterator<Item = (&str, &HeaderValue)> {
    // Usually there is no `Connection` header: a look at the names finds that without a
    // hashed lookup.
    let listed: Vec<&str> = if headers.keys().any(|name| name == header::CONNECTION) {
        connection_tokens(headers).collect()
    } else {
        Vec::new()
    };
    headers
        .iter()
        .map(|(name, value)| (name.as_str(), value))
        .filter(move |&(name, _)| {
            name != header::CONTENT_LENGTH.as_str()
                && !is_hop_by_hop(name.as_bytes())
                && !listed
                    .iter()
                    .any(|listed| listed.eq_ignore_ascii_case(name))
        })
}

/// Writes one header field line (`name: value` and CRLF) into `out`.
pub fn put_field(out: &mut BytesMut, name: &str, value: &[u8]) {
    put_field_bytes(out, name.as_bytes(), value);
}

/// [`put_field`] for a name as the client sent it.
fn put_field_bytes(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// [`end_to_end_fields`] of fields as the HTTP/1.1 server read them (names in any case).
fn raw_end_to_end_fields(raw: &RawHeaders) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut listed: Vec<&[u8]> = Vec::new();
    for (name, value) in raw.iter() {
        if name.eq_ignore_ascii_case(b"connection") {
            listed.extend(list_items(value));
        }
    }
    raw.iter().filter(move |&(name, _)| {
        !name.eq_ignore_ascii_case(b"content-length")
            && !is_hop_by_hop(name)
            && !listed
                .iter()
                .any(|listed| listed.eq_ignore_ascii_case(name))
    })
}

/// Whether a header name, in any case, is one of [`HOP_BY_HOP`] (most names are told apart
/// by their length alone).
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    name.len() < 64
        && HOP_BY_HOP_LENGTHS & (1 << name.len()) != 0
        && HOP_BY_HOP
            .iter()
            .any(|hop| hop.as_bytes().eq_ignore_ascii_case(name))
}

/// Bit `n` is set when a name in [`HOP_BY_HOP`] is `n` bytes long.
const HOP_BY_HOP_LENGTHS: u64 = {
    let mut lengths = 0u64;
    let mut index = 0;
    while index < HOP_BY_HOP.len() {
        lengths |= 1 << HOP_BY_HOP[index].len();
        index += 1;
    }
    lengths
};

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Writes a forwarded request for `body` into `out`: request line, the caller's `headers`
/// less the hop-by-hop ones (and those its `Connection` names) and any `Content-Length` (the
/// proxy frames the body itself), `host` when the caller sent none, `Content-Length`, the
/// blank line, and the body itself when it is small. Writing straight from the caller's
/// headers spares a copy of the header map per request.
pub fn encode_request(
    method: &Method,
    target: &str,
    headers: &RequestHeaders,
    host: Option<&HeaderValue>,
    body: &[u8],
    out: &mut BytesMut,
) {
    out.reserve(
        64 + target.len()
            + headers.len() * 32
            + body.len().min(INLINE_BODY)
            + method.as_str().len(),
    );
    out.put_slice(method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    match headers {
        RequestHeaders::Map(map) => {
            if let Some(host) = host.filter(|_| !map.contains_key(header::HOST)) {
                put_field(out, header::HOST.as_str(), host.as_bytes());
            }
            for (name, value) in end_to_end_fields(map) {
                put_field(out, name, value.as_bytes());
            }
        }
        RequestHeaders::Raw(raw) => {
            if let Some(host) = host.filter(|_| {
                !raw.iter()
                    .any(|(name, _)| name.eq_ignore_ascii_case(b"host"))
            }) {
                put_field(out, header::HOST.as_str(), host.as_bytes());
            }
            for (name, value) in raw_end_to_end_fields(raw) {
                put_field_bytes(out, name, value);
            }
        }
    }
    let needs_length =
        !body.is_empty() || matches!(*method, Method::POST | Method::PUT | Method::PATCH);
    if needs_length {
        let mut digits = itoa::Buffer::new();
        let length = digits.format(body.len());
        put_field(out, header::CONTENT_LENGTH.as_str(), length.as_bytes());
    }
    out.put_slice(b"\r\n");
    if body.len() <= INLINE_BODY {
        out.put_slice(body);
    }
}

/// An HTTP/1.1 connection to an upstream, between requests or carrying one.
pub struct RawConnection {
    /// Only ever used through `&mut` (a tunnelled stream is not `Sync`, and response bodies
    /// must be).
    io: SyncWrapper<Upstream>,
    buffer: BytesMut,
    /// Bounds each exchange (until the response head); kept from request to request.
    timer: ReusedTimer,
}

impl std::fmt::Debug for RawConnection {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RawConnection")
            .field("buffered", &self.buffer.len())
            .finish_non_exhaustive()
    }
}

impl RawConnection {
    pub fn new(io: Upstream) -> Self {
        Self {
            io: SyncWrapper::new(io),
            buffer: BytesMut::new(),
            timer: ReusedTimer::default(),
        }
    }

    /// Whether an idle connection may carry a request: the upstream has neither closed it
    /// nor sent anything unasked (either makes it unusable). Does not wait.
    pub fn idle_usable(&mut self) -> bool {
        if !self.buffer.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        let mut read = tokio::io::ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        matches!(
            Pin::new(self.io.get_mut()).poll_read(&mut cx, &mut read),
            Poll::Pending
        )
    }

    /// Releases the read buffer of a connection going idle (it is allocated again for the
    /// next response).
    pub fn release_buffer(&mut self) {
        UPSTREAM_READS.with(|stash| stash.release(&mut self.buffer));
    }

    /// Sends a request (its head already encoded by [`encode_request`], `body` its whole
    /// body) and reads the response head, by `deadline` at the latest
    /// ([`SendFailure::TimedOut`] after it). The body of the response is read as the returned
    /// [`RawBody`] is polled; it hands the connection back once the body has ended.
    pub async fn send(
        mut self: Box<Self>,
        method: &Method,
        head: &[u8],
        body: &Bytes,
        deadline: Instant,
    ) -> Result<Response<RawBody>, SendFailure> {
        // Taken out while the exchange borrows the connection.
        let mut timer = std::mem::take(&mut self.timer);
        let exchanged = {
            let mut exchange = std::pin::pin!(self.exchange(head, body));
            std::future::poll_fn(|cx| {
                if let Poll::Ready(result) = exchange.as_mut().poll(cx) {
                    return Poll::Ready(result);
                }
                ready!(timer.poll_deadline(deadline, cx));
                Poll::Ready(Err(SendFailure::TimedOut))
            })
            .await
        };
        self.timer = timer;
        let head = exchanged?;
        let (framing, reusable) = framing(method, &head).map_err(SendFailure::Failed)?;
        let state = match framing {
            Framing::Empty | Framing::Length(0) => BodyState::Done,
            Framing::Length(length) => BodyState::Length(length),
            Framing::Chunked => BodyState::Chunked(Box::default()),
            Framing::UntilClose => BodyState::UntilClose,
        };
        let mut response = Response::new(RawBody {
            conn: Some(self),
            state,
            reusable,
        });
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        Ok(response)
    }

    /// Writes the request and reads the response head.
    async fn exchange(&mut self, head: &[u8], body: &Bytes) -> Result<ResponseHead, SendFailure> {
        // One write for head and small body: an error there means no byte left.
        let first = self
            .io
            .get_mut()
            .write(head)
            .await
            .map_err(|error| SendFailure::NotSent(error.into()))?;
        if first == 0 {
            return Err(SendFailure::NotSent(H1Error::ClosedEarly));
        }
        let sent = async {
            self.io.get_mut().write_all(&head[first..]).await?;
            if body.len() > INLINE_BODY {
                self.io.get_mut().write_all(body).await?;
            }
            self.io.get_mut().flush().await
        };
        sent.await
            .map_err(|error| SendFailure::Failed(error.into()))?;
        self.read_head().await.map_err(SendFailure::Failed)
    }

    /// Reads until a final (non-1xx) response head is complete.
    async fn read_head(&mut self) -> Result<ResponseHead, H1Error> {
        loop {
            if !self.buffer.is_empty()
                && let Some(head) = parse_response_head(&mut self.buffer)?
            {
                if head.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(H1Error::Malformed(
                        "101 to a request that asked for no upgrade",
                    ));
                }
                if head.status.is_informational() {
                    continue;
                }
                return Ok(head);
            }
            if std::future::poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                return Err(H1Error::ClosedEarly);
            }
        }
    }

    /// Reads what the socket has into the buffer; `Ok(0)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        UPSTREAM_READS.with(|stash| stash.make_room(&mut self.buffer));
        tokio_util::io::poll_read_buf(Pin::new(self.io.get_mut()), cx, &mut self.buffer)
    }
}

#[derive(Debug)]
enum BodyState {
    Length(u64),
    /// Boxed: the decoder holds room for trailers, which most bodies never need.
    Chunked(Box<ChunkedDecoder>),
    UntilClose,
    Done,
}

/// A response body read straight off its upstream connection.
#[derive(Debug)]
pub struct RawBody {
    /// Boxed: it moves between the pool and response bodies, which stay small.
    conn: Option<Box<RawConnection>>,
    state: BodyState,
    reusable: bool,
}

impl RawBody {
    /// The connection, once the body has ended and it may carry another request.
    pub fn finished_connection(&mut self) -> Option<Box<RawConnection>> {
        if !matches!(self.state, BodyState::Done) || !self.reusable {
            return None;
        }
        let conn = self.conn.take()?;
        // Bytes beyond the response: the upstream is out of step; do not reuse.
        conn.buffer.is_empty().then_some(conn)
    }

    /// After an error: the connection is closed, the body over.
    fn fail(&mut self) {
        self.conn = None;
        self.reusable = false;
        self.state = BodyState::Done;
    }
}

impl hyper::body::Body for RawBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(remaining) => {
                    if !conn.buffer.is_empty() {
                        let take = usize::try_from(*remaining)
                            .unwrap_or(usize::MAX)
                            .min(conn.buffer.len());
                        *remaining -= take as u64;
                        let data = conn.buffer.split_to(take).freeze();
                        if *remaining == 0 {
                            this.state = BodyState::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                BodyState::Chunked(decoder) => match decoder.decode(&mut conn.buffer) {
                    Err(error) => {
                        this.fail();
                        return Poll::Ready(Some(Err(error)));
                    }
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::Trailers(trailers)) => {
                        this.state = BodyState::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Decoded::End) => {
                        this.state = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => {}
                },
                BodyState::UntilClose => {
                    if !conn.buffer.is_empty() {
                        let data = conn.buffer.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => {
                    this.fail();
                    return Poll::Ready(Some(Err(error.into())));
                }
                Poll::Ready(Ok(0)) => {
                    if matches!(this.state, BodyState::UntilClose) {
                        this.state = BodyState::Done;
                        this.reusable = false;
                        return Poll::Ready(None);
                    }
                    this.fail();
                    return Poll::Ready(Some(Err(H1Error::ClosedEarly)));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Done => SizeHint::with_exact(0),
            BodyState::Length(remaining) => SizeHint::with_exact(remaining),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;

    fn parse(text: &[u8]) -> Result<Option<ResponseHead>, H1Error> {
        parse_response_head(&mut BytesMut::from(text))
    }

    fn head(text: &str) -> ResponseHead {
        parse(text.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn a_head_is_parsed_once_complete() {
        let text = "HTTP/1.1 201 Created\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 0\r\n\r\nrest";
        assert!(parse(&text.as_bytes()[..20]).unwrap().is_none());
        let mut buffer = BytesMut::from(text.as_bytes());
        let parsed = parse_response_head(&mut buffer).unwrap().unwrap();
        assert_eq!(&buffer[..], b"rest");
        assert_eq!(parsed.status, StatusCode::CREATED);
        assert_eq!(parsed.version, Version::HTTP_11);
        assert_eq!(parsed.headers.get_all("x-a").iter().count(), 2);
        // More headers than the first parse has room for.
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "x-b: c\r\n".repeat(40));
        assert_eq!(head(&many).headers.get_all("x-b").iter().count(), 40);
    }

    #[test]
    fn bad_heads_are_errors() {
        for text in [
            "HTTP/2.0 200 OK\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "garbage\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        ] {
            assert!(parse(text.as_bytes()).is_err(), "{text:?}");
        }
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "x: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(matches!(parse(many.as_bytes()), Err(H1Error::Malformed(_))));
        let endless = format!("HTTP/1.1 200 OK\r\nx: {}", "y".repeat(MAX_HEAD_BYTES + 1));
        assert!(matches!(
            parse(endless.as_bytes()),
            Err(H1Error::HeadTooLarge)
        ));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let get = Method::GET;
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                &get,
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n",
                &get,
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                &Method::HEAD,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                &get,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
                &get,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                &get,
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                &get,
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
                &get,
                Framing::Chunked,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                &get,
                Framing::UntilClose,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", &get, Framing::UntilClose, false),
            (
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                &get,
                Framing::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                &get,
                Framing::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n",
                &get,
                Framing::Length(1),
                true,
            ),
        ];
        for (text, method, expected, reusable) in cases {
            assert_eq!(
                framing(method, &head(text)).unwrap(),
                (expected, reusable),
                "{text:?}"
            );
        }
        for text in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1e3\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
        ] {
            assert!(framing(&get, &head(text)).is_err(), "{text:?}");
        }
    }

    #[test]
    fn framing_fields_read_every_value_in_order() {
        let get = Method::GET;
        /// A head and its framing (`None`: an error).
        type Case = (&'static [u8], Option<(Framing, bool)>);
        let cases: [Case; 6] = [
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: \r\n\r\n",
                Some((Framing::Chunked, true)),
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n",
                Some((Framing::Chunked, true)),
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
                Some((Framing::UntilClose, false)),
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: ch\xffunked\r\n\r\n",
                None,
            ),
            (
                b"HTTP/1.1 200 OK\r\nconnection: x-a\r\nconnection: Close\r\ncontent-length: 2\r\n\r\n",
                Some((Framing::Length(2), false)),
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2, 2\r\n\r\n",
                Some((Framing::Length(2), true)),
            ),
        ];
        for (text, expected) in cases {
            let head = parse(text).unwrap().unwrap();
            assert_eq!(
                framing(&get, &head).ok(),
                expected,
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
        // A fault in a field the framing does not depend on is no error.
        let head = parse(b"HTTP/1.1 204 No Content\r\ncontent-length: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(framing(&get, &head).unwrap(), (Framing::Empty, true));
    }

    #[test]
    fn content_length_values_are_one_number_or_a_list_of_the_same() {
        assert_eq!(content_length_items(b"0", None), Ok(Some(0)));
        assert_eq!(content_length_items(b" 17 ", None), Ok(Some(17)));
        assert_eq!(content_length_items(b"17,17", Some(17)), Ok(Some(17)));
        assert_eq!(
            content_length_items(b"9999999999999999999", None),
            Ok(Some(9_999_999_999_999_999_999))
        );
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b"1 2",
            b"1,",
            b"0x10",
            b"12345678901234567890",
        ] {
            assert!(content_length_items(bad, None).is_err(), "{bad:?}");
        }
        assert!(content_length_items(b"5", Some(6)).is_err());
        assert!(content_length_items(b"5, 6", None).is_err());
    }

    #[test]
    fn the_hop_by_hop_test_names_exactly_the_hop_by_hop_headers() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(name.as_bytes()), "{name}");
            assert!(
                is_hop_by_hop(name.to_ascii_uppercase().as_bytes()),
                "{name}"
            );
        }
        let long = "x".repeat(70);
        for name in [
            "content-length",
            "host",
            "trailer",
            "connections",
            "connectiom",
            "keep_alive",
            "upgradee",
            "t",
            "",
            &long,
        ] {
            assert!(!is_hop_by_hop(name.as_bytes()), "{name}");
        }
    }

    /// Decodes `input` fed in pieces of `step` bytes: the data, the trailers, or the error.
    fn decode_in_steps(input: &[u8], step: usize) -> Result<(Vec<u8>, HeaderMap), String> {
        let mut decoder = ChunkedDecoder::default();
        let mut buffer = BytesMut::new();
        let mut data = Vec::new();
        let mut trailers = HeaderMap::new();
        let mut fed = 0;
        loop {
            match decoder
                .decode(&mut buffer)
                .map_err(|error| error.to_string())?
            {
                Decoded::Data(bytes) => data.extend_from_slice(&bytes),
                Decoded::Trailers(map) => trailers = map,
                Decoded::End => return Ok((data, trailers)),
                Decoded::NeedMore if fed == input.len() => return Err("incomplete".into()),
                Decoded::NeedMore => {
                    let end = (fed + step).min(input.len());
                    buffer.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_the_same_however_they_arrive() {
        let input = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-checksum: abc\r\n\r\n";
        for step in [1, 2, 3, 7, input.len()] {
            let (data, trailers) = decode_in_steps(input, step).unwrap();
            assert_eq!(data, b"hello, world");
            assert_eq!(trailers.get("x-checksum").unwrap(), "abc");
        }
        let (data, trailers) = decode_in_steps(b"A\r\n0123456789\r\n0\r\n\r\n", 4).unwrap();
        assert_eq!(data, b"0123456789");
        assert!(trailers.is_empty());
    }

    #[test]
    fn bad_chunked_bodies_are_errors() {
        for input in [
            &b"x\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5 junk\r\nhello\r\n0\r\n\r\n",
            b"0\r\nno colon\r\n\r\n",
        ] {
            assert!(decode_in_steps(input, 3).is_err(), "{input:?}");
        }
        let long_line = format!("5;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert!(decode_in_steps(long_line.as_bytes(), 64).is_err());
        let big_trailers = format!(
            "0\r\n{}\r\n",
            "x-t: v\r\n".repeat(MAX_TRAILER_BYTES / 8 + 1)
        );
        assert!(decode_in_steps(big_trailers.as_bytes(), 512).is_err());
    }

    #[test]
    fn requests_are_framed_by_the_proxy() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("svc"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-private, keep-alive"),
        );
        headers.insert("x-private", HeaderValue::from_static("secret"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        let other = HeaderValue::from_static("other");
        let mut out = BytesMut::new();
        encode_request(
            &Method::POST,
            "/rpc?x=1",
            &RequestHeaders::Map(headers),
            Some(&other),
            b"{}",
            &mut out,
        );
        assert_eq!(
            &out[..],
            b"POST /rpc?x=1 HTTP/1.1\r\nhost: svc\r\nx-kept: 1\r\ncontent-length: 2\r\n\r\n{}"
        );
        out.clear();
        let mut bare = HeaderMap::new();
        bare.insert("x-kept", HeaderValue::from_static("1"));
        let bare = RequestHeaders::Map(bare);
        encode_request(&Method::GET, "/", &bare, Some(&other), b"", &mut out);
        assert_eq!(
            &out[..],
            b"GET / HTTP/1.1\r\nhost: other\r\nx-kept: 1\r\n\r\n"
        );
        out.clear();
        let none = RequestHeaders::Map(HeaderMap::new());
        encode_request(&Method::POST, "/", &none, None, b"", &mut out);
        assert_eq!(&out[..], b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
    }

    #[test]
    fn raw_requests_are_framed_by_the_proxy_and_keep_their_field_names_case() {
        let mut buffer = BytesMut::from(
            &b"POST /rpc HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\
               Connection: X-Private, keep-alive\r\nx-private: secret\r\n\
               Keep-Alive: timeout=5\r\nTE: trailers\r\nX-Kept: 1\r\nx-kept: 2\r\n\r\n{}"[..],
        );
        let Ok(Some(super::super::h1_server::Parsed::Request(request))) =
            super::super::h1_server::parse_request_head(&mut buffer)
        else {
            panic!("not a request");
        };
        let raw = RequestHeaders::Raw(request.headers);
        let other = HeaderValue::from_static("other");
        let mut out = BytesMut::new();
        encode_request(&Method::POST, "/rpc", &raw, Some(&other), b"{}", &mut out);
        assert_eq!(
            &out[..],
            b"POST /rpc HTTP/1.1\r\nHost: svc\r\nX-Kept: 1\r\nx-kept: 2\r\ncontent-length: 2\r\n\r\n{}"
        );
        let mut bare = BytesMut::from(&b"GET / HTTP/1.1\r\nx-kept: 1\r\n\r\n"[..]);
        let Ok(Some(super::super::h1_server::Parsed::Request(request))) =
            super::super::h1_server::parse_request_head(&mut bare)
        else {
            panic!("not a request");
        };
        out.clear();
        let raw = RequestHeaders::Raw(request.headers);
        encode_request(&Method::GET, "/", &raw, Some(&other), b"", &mut out);
        assert_eq!(
            &out[..],
            b"GET / HTTP/1.1\r\nhost: other\r\nx-kept: 1\r\n\r\n"
        );
    }

    /// An upstream that reads one request head, then writes `reply` and, if `close`, closes.
    async fn scripted(reply: &'static [u8], close: bool) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buffer = [0u8; 1024];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let read = stream.read(&mut buffer).await.unwrap();
                if read == 0 {
                    return;
                }
                seen.extend_from_slice(&buffer[..read]);
            }
            stream.write_all(reply).await.unwrap();
            if close {
                stream.shutdown().await.unwrap();
            } else {
                // Hold the connection open until the client goes.
                let _ = stream.read(&mut buffer).await;
            }
        });
        address
    }

    async fn exchange(
        address: std::net::SocketAddr,
        method: Method,
    ) -> Result<(Response<()>, Vec<u8>, Option<HeaderMap>, bool), H1Error> {
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let conn = Box::new(RawConnection::new(Upstream::Direct(stream)));
        let mut head = BytesMut::new();
        let none = RequestHeaders::Map(HeaderMap::new());
        encode_request(&method, "/", &none, None, b"", &mut head);
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let response = match conn.send(&method, &head, &Bytes::new(), deadline).await {
            Ok(response) => response,
            Err(SendFailure::NotSent(error) | SendFailure::Failed(error)) => return Err(error),
            Err(SendFailure::TimedOut) => panic!("no response in 30 s"),
        };
        let (parts, mut body) = response.into_parts();
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        let reusable = body.finished_connection().is_some();
        Ok((Response::from_parts(parts, ()), data, trailers, reusable))
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_never_answers_times_out_at_each_requests_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buffer = [0u8; 1024];
            // Reads the request, answers nothing, holds the connection open.
            while stream.read(&mut buffer).await.is_ok_and(|read| read > 0) {}
        });
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let conn = Box::new(RawConnection::new(Upstream::Direct(stream)));
        let mut head = BytesMut::new();
        let none = RequestHeaders::Map(HeaderMap::new());
        encode_request(&Method::GET, "/", &none, None, b"", &mut head);
        let start = Instant::now();
        let deadline = start + std::time::Duration::from_secs(7);
        let sent = conn
            .send(&Method::GET, &head, &Bytes::new(), deadline)
            .await;
        assert!(matches!(sent, Err(SendFailure::TimedOut)), "{sent:?}");
        assert_eq!(Instant::now(), deadline);
    }

    #[tokio::test]
    async fn responses_are_read_off_the_connection() {
        let address = scripted(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n",
            false,
        )
        .await;
        let (head, data, trailers, reusable) = exchange(address, Method::GET).await.unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(data, b"abc");
        assert_eq!(trailers.unwrap().get("x-t").unwrap(), "1");
        assert!(reusable);

        let address = scripted(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true).await;
        let (_, data, _, reusable) = exchange(address, Method::GET).await.unwrap();
        assert_eq!(data, b"until the end");
        assert!(!reusable);

        let address = scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n", false).await;
        let (_, data, _, reusable) = exchange(address, Method::HEAD).await.unwrap();
        assert!(data.is_empty());
        assert!(reusable);

        // More bytes than the response: the connection is out of step, not reused.
        let address = scripted(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA",
            false,
        )
        .await;
        let (_, data, _, reusable) = exchange(address, Method::GET).await.unwrap();
        assert_eq!(data, b"ok");
        assert!(!reusable);
    }

    #[tokio::test]
    async fn broken_responses_are_errors() {
        let address = scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", true).await;
        assert!(matches!(
            exchange(address, Method::GET).await,
            Err(H1Error::ClosedEarly)
        ));
        let address = scripted(b"HTTP/1.1 200 OK\r\ncontent-le", true).await;
        assert!(matches!(
            exchange(address, Method::GET).await,
            Err(H1Error::ClosedEarly)
        ));
        let address = scripted(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", false).await;
        assert!(matches!(
            exchange(address, Method::GET).await,
            Err(H1Error::Malformed(_))
        ));
        let address = scripted(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            false,
        )
        .await;
        assert!(matches!(
            exchange(address, Method::GET).await,
            Err(H1Error::Malformed(_))
        ));
    }
}
