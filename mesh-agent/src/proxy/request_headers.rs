//! A request's head as the L7 path reads it ([`RequestParts`]), with its header fields either
//! as hyper gave them (a `HeaderMap`) or as the HTTP/1.1 server read them ([`RawHeaders`]:
//! slices of the head's bytes, turned into a map only on the paths that need one); and the
//! fields the proxy acts on (`Host`, `Content-Type`, `Content-Length`, `Upgrade`,
//! `grpc-timeout`, the MCP headers, the mesh's priority header, `Idempotency-Key`), found in
//! one pass ([`KnownHeaders`]).

use std::borrow::Cow;

use bytes::Bytes;
use http::{Extensions, HeaderMap, Method, Uri, Version};

use super::{
    h1_client::{self, FieldSpans},
    priority::PRIORITY_HEADER,
};

/// The fields of a request head the HTTP/1.1 server parsed: names and values are slices of
/// `head`, in the order and case the client sent them. httparse has checked them (names are
/// tokens, values hold no control characters but tab), so they make a valid `HeaderMap`.
#[derive(Debug, Clone, Default)]
pub struct RawHeaders {
    head: Bytes,
    spans: FieldSpans,
}

impl RawHeaders {
    /// The fields at `spans` ([`h1_client::field_spans`]) in `head`, which is at most
    /// `MAX_HEAD_BYTES`.
    pub fn new(head: Bytes, spans: FieldSpans) -> Self {
        debug_assert!(head.len() <= h1_client::MAX_HEAD_BYTES);
        Self { head, spans }
    }

    /// Each field's name and value, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans
            .iter()
            .map(|span| h1_client::field_at(&self.head, span))
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The fields as a header map (values share the head's bytes).
    pub fn to_map(&self) -> Result<HeaderMap, &'static str> {
        h1_client::header_map(&self.head, &self.spans)
    }
}

/// A request's header fields.
#[derive(Debug, Clone)]
pub enum RequestHeaders {
    Map(HeaderMap),
    Raw(RawHeaders),
}

impl RequestHeaders {
    /// The fields the proxy acts on, in one pass.
    pub fn known(&self) -> KnownHeaders<'_> {
        let mut known = KnownHeaders::default();
        match self {
            Self::Map(map) => {
                for (name, value) in map {
                    known.offer(name.as_str().as_bytes(), value.as_bytes());
                }
            }
            Self::Raw(raw) => {
                for (name, value) in raw.iter() {
                    known.offer(name, value);
                }
            }
        }
        known
    }

    /// The fields as a header map: borrowed when they are one already.
    pub fn to_map(&self) -> Result<Cow<'_, HeaderMap>, &'static str> {
        match self {
            Self::Map(map) => Ok(Cow::Borrowed(map)),
            Self::Raw(raw) => raw.to_map().map(Cow::Owned),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Map(map) => map.len(),
            Self::Raw(raw) => raw.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request's head: what `http::request::Parts` holds, with the fields as
/// [`RequestHeaders`].
#[derive(Debug)]
pub struct RequestParts {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: RequestHeaders,
    pub extensions: Extensions,
}

impl From<http::request::Parts> for RequestParts {
    fn from(parts: http::request::Parts) -> Self {
        Self {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: RequestHeaders::Map(parts.headers),
            extensions: parts.extensions,
        }
    }
}

/// The first value of each header the proxy reads (the value `HeaderMap::get` would give),
/// borrowed from the request's fields.
#[derive(Debug, Default, Clone, Copy)]
pub struct KnownHeaders<'h> {
    pub host: Option<&'h [u8]>,
    pub content_type: Option<&'h [u8]>,
    pub content_length: Option<&'h [u8]>,
    pub upgrade: Option<&'h [u8]>,
    pub grpc_timeout: Option<&'h [u8]>,
    /// `Mcp-Session-Id` (MCP Streamable HTTP, 2025-11-25).
    pub mcp_session: Option<&'h [u8]>,
    /// `Mcp-Method` and `Mcp-Name` (MCP, 2026-07-28).
    pub mcp_method: Option<&'h [u8]>,
    pub mcp_name: Option<&'h [u8]>,
    /// `x-mesh-priority`: the priority class a caller asks for, when policy lets it.
    pub priority: Option<&'h [u8]>,
    pub idempotency_key: Option<&'h [u8]>,
}

impl<'h> KnownHeaders<'h> {
    /// Takes a field (its name in any case) if it is a known header seen for the first
    /// time; a header that repeats keeps its first value. Most fields are told apart by
    /// their length alone.
    fn offer(&mut self, name: &[u8], value: &'h [u8]) {
        let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
        let slot = match name.len() {
            4 if is("host") => &mut self.host,
            7 if is("upgrade") => &mut self.upgrade,
            8 if is("mcp-name") => &mut self.mcp_name,
            10 if is("mcp-method") => &mut self.mcp_method,
            12 if is("content-type") => &mut self.content_type,
            12 if is("grpc-timeout") => &mut self.grpc_timeout,
            14 if is("content-length") => &mut self.content_length,
            14 if is("mcp-session-id") => &mut self.mcp_session,
            15 if is("idempotency-key") => &mut self.idempotency_key,
            15 if is(PRIORITY_HEADER) => &mut self.priority,
            _ => return,
        };
        slot.get_or_insert(value);
    }

    /// A header's value as text, when it is visible ASCII, space or tab (what
    /// `HeaderValue::to_str` takes).
    pub fn text(value: Option<&'h [u8]>) -> Option<&'h str> {
        let value = value?;
        if !h1_client::is_visible_text(value) {
            return None;
        }
        std::str::from_utf8(value).ok()
    }

    /// The declared body length, when `Content-Length` is one number.
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
            .and_then(|value| h1_client::content_length_items(value, None).ok())
            .flatten()
    }

    /// Whether the body is gRPC (`application/grpc`, `application/grpc+proto`, ...).
    pub fn is_grpc(&self) -> bool {
        self.content_type
            .is_some_and(|value| value.starts_with(b"application/grpc"))
    }

    /// Whether this is an HTTP/1.1 request to switch to WebSocket.
    pub fn is_websocket_upgrade(&self, version: Version) -> bool {
        version == Version::HTTP_11
            && self
                .upgrade
                .is_some_and(|value| value.eq_ignore_ascii_case(b"websocket"))
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderName, HeaderValue, header};

    use super::*;

    const KNOWN: [&str; 10] = [
        "host",
        "content-type",
        "content-length",
        "upgrade",
        "grpc-timeout",
        "mcp-session-id",
        "mcp-method",
        "mcp-name",
        PRIORITY_HEADER,
        "idempotency-key",
    ];

    fn found(known: &KnownHeaders<'_>) -> [Option<Vec<u8>>; 10] {
        [
            known.host,
            known.content_type,
            known.content_length,
            known.upgrade,
            known.grpc_timeout,
            known.mcp_session,
            known.mcp_method,
            known.mcp_name,
            known.priority,
            known.idempotency_key,
        ]
        .map(|value| value.map(<[u8]>::to_vec))
    }

    /// The raw fields of `head` as httparse reads them (the server itself hands requests
    /// with `Upgrade` or an odd `Content-Length` to hyper).
    fn raw(head: &str) -> RawHeaders {
        let head = Bytes::copy_from_slice(head.as_bytes());
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut slots);
        assert!(request.parse(&head).unwrap().is_complete());
        let spans = h1_client::field_spans(head.as_ptr(), request.headers);
        RawHeaders::new(head.clone(), spans)
    }

    #[test]
    fn every_known_header_is_found_and_a_repeated_one_keeps_its_first_value() {
        let mut map = HeaderMap::new();
        let mut head = String::from("GET / HTTP/1.1\r\n");
        for name in KNOWN {
            let header = HeaderName::from_static(name);
            map.append(header.clone(), HeaderValue::from_static("first"));
            map.append(header, HeaderValue::from_static("second"));
            // Sent in upper case: names are matched without regard to case.
            let shouted = name.to_ascii_uppercase();
            head.push_str(&format!("{shouted}: first\r\n{name}: second\r\n"));
        }
        map.insert("x-other", HeaderValue::from_static("ignored"));
        head.push_str("x-other: ignored\r\nx-a-name-longer-than-any-known-one: x\r\n\r\n");
        let raw = RequestHeaders::Raw(raw(&head));
        let map = RequestHeaders::Map(map);
        for headers in [&map, &raw] {
            for (name, value) in KNOWN.iter().zip(found(&headers.known())) {
                assert_eq!(value.as_deref(), Some(&b"first"[..]), "{name}");
            }
        }
        assert_eq!(raw.len(), 22);
        let rebuilt = raw.to_map().unwrap();
        assert_eq!(rebuilt.get_all(header::HOST).iter().count(), 2);
        assert_eq!(rebuilt[PRIORITY_HEADER], "first");
    }

    #[test]
    fn absent_headers_are_none_and_derived_facts_follow_the_values() {
        let empty = RequestHeaders::Map(HeaderMap::new());
        assert!(found(&empty.known()).iter().all(Option::is_none));
        let raw = RequestHeaders::Raw(raw(
            "GET / HTTP/1.1\r\ncontent-type: application/grpc+proto\r\n\
             Upgrade: WebSocket\r\nGRPC-Timeout: 5S\r\n\r\n",
        ));
        let known = raw.known();
        assert!(known.is_grpc());
        assert!(known.is_websocket_upgrade(Version::HTTP_11));
        assert!(!known.is_websocket_upgrade(Version::HTTP_2));
        assert_eq!(KnownHeaders::text(known.grpc_timeout), Some("5S"));
        assert!(known.mcp_session.is_none() && known.priority.is_none());

        let known = KnownHeaders {
            content_type: Some(b"text/plain"),
            content_length: Some(b" 42 "),
            ..KnownHeaders::default()
        };
        assert!(!known.is_grpc());
        assert_eq!(known.content_length(), Some(42));
        let known = KnownHeaders {
            content_length: Some(b"4x"),
            ..KnownHeaders::default()
        };
        assert_eq!(known.content_length(), None);
        assert_eq!(KnownHeaders::text(Some(b"caf\xc3\xa9")), None);
        assert_eq!(KnownHeaders::text(Some(b"a\tb c")), Some("a\tb c"));
    }
}
