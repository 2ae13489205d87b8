//! The request headers the L7 path acts on (`Host`, `Content-Type`, `Content-Length`,
//! `Upgrade`, `grpc-timeout`, the MCP headers, the mesh's priority header, `Idempotency-Key`),
//! found in one pass over a request's header map instead of one hashed lookup each.

use http::{HeaderMap, HeaderValue, Version};

use super::priority::PRIORITY_HEADER;

/// The first value of each header the proxy reads, borrowed from the request's header map
/// (the value `HeaderMap::get` would give).
#[derive(Debug, Default, Clone, Copy)]
pub struct KnownHeaders<'h> {
    pub host: Option<&'h HeaderValue>,
    pub content_type: Option<&'h HeaderValue>,
    pub content_length: Option<&'h HeaderValue>,
    pub upgrade: Option<&'h HeaderValue>,
    pub grpc_timeout: Option<&'h HeaderValue>,
    /// `Mcp-Session-Id` (MCP Streamable HTTP, 2025-11-25).
    pub mcp_session: Option<&'h HeaderValue>,
    /// `Mcp-Method` and `Mcp-Name` (MCP, 2026-07-28).
    pub mcp_method: Option<&'h HeaderValue>,
    pub mcp_name: Option<&'h HeaderValue>,
    /// `x-mesh-priority`: the priority class a caller asks for, when policy lets it.
    pub priority: Option<&'h HeaderValue>,
    pub idempotency_key: Option<&'h HeaderValue>,
}

impl<'h> KnownHeaders<'h> {
    /// Walks the header map once; a header that repeats keeps its first value.
    pub fn of(headers: &'h HeaderMap) -> Self {
        let mut known = Self::default();
        for (name, value) in headers {
            // `HeaderName`s are lower case, so one exact comparison per candidate suffices.
            let slot = match name.as_str() {
                "host" => &mut known.host,
                "content-type" => &mut known.content_type,
                "content-length" => &mut known.content_length,
                "upgrade" => &mut known.upgrade,
                "grpc-timeout" => &mut known.grpc_timeout,
                "mcp-session-id" => &mut known.mcp_session,
                "mcp-method" => &mut known.mcp_method,
                "mcp-name" => &mut known.mcp_name,
                PRIORITY_HEADER => &mut known.priority,
                "idempotency-key" => &mut known.idempotency_key,
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        known
    }

    /// A header's value as text, when it is visible ASCII.
    pub fn text(value: Option<&'h HeaderValue>) -> Option<&'h str> {
        value.and_then(|value| value.to_str().ok())
    }

    /// The declared body length, when `Content-Length` is a number.
    pub fn content_length(&self) -> Option<u64> {
        Self::text(self.content_length).and_then(|value| value.trim().parse().ok())
    }

    /// Whether the body is gRPC (`application/grpc`, `application/grpc+proto`, ...).
    pub fn is_grpc(&self) -> bool {
        Self::text(self.content_type).is_some_and(|value| value.starts_with("application/grpc"))
    }

    /// Whether this is an HTTP/1.1 request to switch to WebSocket.
    pub fn is_websocket_upgrade(&self, version: Version) -> bool {
        version == Version::HTTP_11
            && Self::text(self.upgrade).is_some_and(|value| value.eq_ignore_ascii_case("websocket"))
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderName, header};

    use super::*;

    #[test]
    fn every_known_header_is_found_and_a_repeated_one_keeps_its_first_value() {
        let mut headers = HeaderMap::new();
        let names = [
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
        for name in names {
            let name = HeaderName::from_static(name);
            headers.append(name.clone(), HeaderValue::from_static("first"));
            headers.append(name, HeaderValue::from_static("second"));
        }
        headers.insert("x-other", HeaderValue::from_static("ignored"));
        let known = KnownHeaders::of(&headers);
        let found = [
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
        ];
        for (name, value) in names.iter().zip(found) {
            assert_eq!(value, headers.get(*name), "{name}");
            assert_eq!(KnownHeaders::text(value), Some("first"), "{name}");
        }
    }

    #[test]
    fn absent_headers_are_none_and_derived_facts_follow_the_values() {
        let mut headers = HeaderMap::new();
        assert!(KnownHeaders::of(&headers).host.is_none());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static(" 42 "));
        headers.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        let known = KnownHeaders::of(&headers);
        assert!(known.is_grpc());
        assert_eq!(known.content_length(), Some(42));
        assert!(known.is_websocket_upgrade(Version::HTTP_11));
        assert!(!known.is_websocket_upgrade(Version::HTTP_2));
        assert!(known.mcp_session.is_none() && known.priority.is_none());

        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("4x"));
        let known = KnownHeaders::of(&headers);
        assert!(!known.is_grpc());
        assert_eq!(known.content_length(), None);
    }
}
