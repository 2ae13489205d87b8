//! Fuzzes the client side of the in-task HTTP/1.1 server on bytes a hostile client may send:
//! the request-head parser, over a stream of pipelined requests. No input may panic it; a
//! request taken off the buffer shrinks it, a handed-off one leaves it whole; where the bytes
//! are split never changes what is parsed; any parsed head's fields make a header map; and
//! they encode, forwarded as a request's or sent back as a response's, into a head that parses
//! again with the framing chosen.
#![no_main]

use bytes::BytesMut;
use http::{HeaderValue, Method, StatusCode};
use libfuzzer_sys::fuzz_target;
use mesh_agent::proxy::{
    h1_client::{HOP_BY_HOP, encode_request},
    h1_server::{Parsed, ResponseFraming, encode_response_head, parse_request_head},
    request_headers::{RawHeaders, RequestHeaders},
};

/// Parses requests off `input` fed in pieces of `step` bytes: each request's method, target,
/// header count and body length, then how the stream ended.
fn parse_all(input: &[u8], step: usize) -> (Vec<String>, String) {
    let mut buffer = BytesMut::new();
    let (mut seen, mut fed, mut skip) = (Vec::new(), 0, 0);
    loop {
        // The body of the last request follows its head: skip it, across feeds.
        let skipped = skip.min(buffer.len());
        let _ = buffer.split_to(skipped);
        skip -= skipped;
        let before = buffer.len();
        let parsed = if skip > 0 {
            Ok(None)
        } else {
            parse_request_head(&mut buffer)
        };
        match parsed {
            Err(error) => return (seen, error.to_string()),
            Ok(Some(Parsed::Handoff)) => {
                assert_eq!(
                    buffer.len(),
                    before,
                    "a handed-off request stays in the buffer"
                );
                return (seen, "handoff".into());
            }
            Ok(Some(Parsed::Request(head))) => {
                assert!(buffer.len() < before);
                seen.push(format!(
                    "{} {} {} {} {}",
                    head.method,
                    head.uri,
                    head.headers.len(),
                    head.body_len,
                    head.keep_alive
                ));
                // Fields httparse took always make a header map (the proxy builds one
                // lazily, on the paths that need it).
                let map = head
                    .headers
                    .to_map()
                    .expect("parsed fields make a header map");
                assert_eq!(map.len(), head.headers.len());
                check_response_encoding(&map);
                check_request_encoding(&head.headers);
                skip = head.body_len;
            }
            Ok(None) if fed == input.len() => return (seen, "incomplete".into()),
            Ok(None) => {
                let end = (fed + step).min(input.len());
                buffer.extend_from_slice(&input[fed..end]);
                fed = end;
            }
        }
    }
}

/// How many of `fields` are named `name` (in any case).
fn count_named(fields: &[httparse::Header<'_>], name: &str) -> usize {
    fields
        .iter()
        .filter(|field| field.name.eq_ignore_ascii_case(name))
        .count()
}

/// The raw fields forwarded as a request's: the encoded head parses, with one
/// `Content-Length` and no hop-by-hop field.
fn check_request_encoding(headers: &RawHeaders) {
    let mut out = BytesMut::new();
    encode_request(
        &Method::POST,
        "/",
        &RequestHeaders::Raw(headers.clone()),
        None,
        b"{}",
        &mut out,
    );
    let mut slots = [httparse::EMPTY_HEADER; 256];
    let mut request = httparse::Request::new(&mut slots);
    let parsed = request.parse(&out);
    assert!(
        matches!(parsed, Ok(httparse::Status::Complete(length)) if length + 2 == out.len()),
        "encoded request does not parse: {parsed:?} {:?}",
        String::from_utf8_lossy(&out)
    );
    let named = |name: &str| count_named(request.headers, name);
    assert_eq!(named("content-length"), 1);
    for hop in HOP_BY_HOP {
        assert_eq!(named(hop), 0, "{hop} forwarded");
    }
}

/// The fields as a response's: the encoded head parses, and says what the framing says.
fn check_response_encoding(headers: &http::HeaderMap) {
    for (body_size, head_request) in [(None, false), (Some(3), false), (None, true)] {
        let mut out = BytesMut::new();
        let framing = encode_response_head(
            StatusCode::OK,
            headers,
            body_size,
            head_request,
            true,
            Some(&HeaderValue::from_static("Mon, 30 Nov 2026 12:00:00 GMT")),
            &mut out,
        );
        let mut slots = [httparse::EMPTY_HEADER; 256];
        let mut response = httparse::Response::new(&mut slots);
        let parsed = response.parse(&out);
        assert!(
            matches!(parsed, Ok(httparse::Status::Complete(length)) if length == out.len()),
            "encoded head does not parse: {parsed:?} {:?}",
            String::from_utf8_lossy(&out)
        );
        let named = |name: &str| count_named(response.headers, name);
        match framing {
            ResponseFraming::Chunked => {
                assert_eq!(named("transfer-encoding"), 1);
                assert_eq!(named("content-length"), 0);
            }
            ResponseFraming::Length(_) => {
                assert_eq!(named("transfer-encoding"), 0);
                assert_eq!(named("content-length"), 1);
            }
            ResponseFraming::None => assert_eq!(named("transfer-encoding"), 0),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [step, rest @ ..] = data else {
        return;
    };
    let whole = parse_all(rest, rest.len().max(1));
    let pieces = parse_all(rest, usize::from(*step).max(1));
    assert_eq!(
        whole, pieces,
        "where the bytes were split changed the parse"
    );
});
