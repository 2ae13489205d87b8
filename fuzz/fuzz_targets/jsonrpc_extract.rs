//! Fuzzes JSON-RPC extraction: no body may panic it; an accepted body yields non-empty methods
//! and names that are no longer than the body, batches within the limit, headers that mirror
//! the body agree with it, and error bodies that are valid JSON-RPC responses. The JSON
//! scanner under it accepts exactly the texts serde_json accepts, and decodes the same keys,
//! strings and integers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::proxy::json_scan::{Kind, Scalar, ScanError, Scanner};
use mesh_agent::proxy::jsonrpc::{
    FORBIDDEN, FORBIDDEN_MESSAGE, MAX_BATCH, MAX_DEPTH, MessageKind, check_mcp_headers,
    parse_request,
};
use serde_json::Value;

/// Every key, string and `i64` integer of the text, in text order, each string decoded.
fn scan_all(data: &[u8]) -> Result<Vec<String>, ScanError> {
    fn walk(scanner: &mut Scanner<'_>, out: &mut Vec<String>) -> Result<(), ScanError> {
        match scanner.peek_kind()? {
            Kind::Object => scanner.object(|scanner, key| {
                out.push(key.into_owned());
                walk(scanner, out)
            }),
            Kind::Array => scanner.array(|scanner| walk(scanner, out)),
            Kind::Null | Kind::Other => {
                match scanner.scalar()? {
                    Scalar::Str(value) => out.push(value.into_owned()),
                    Scalar::Int(n) => out.push(n.to_string()),
                    Scalar::Null | Scalar::Other => {}
                }
                Ok(())
            }
        }
    }
    let mut scanner = Scanner::new(data, MAX_DEPTH)?;
    let mut out = Vec::new();
    walk(&mut scanner, &mut out)?;
    scanner.finish()?;
    Ok(out)
}

/// The same from serde_json's tree (object members in its order, duplicates collapsed).
fn tree_tokens(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(members) => {
            for (key, member) in members {
                out.push(key.clone());
                tree_tokens(member, out);
            }
        }
        Value::Array(elements) => elements.iter().for_each(|e| tree_tokens(e, out)),
        Value::String(s) => out.push(s.clone()),
        Value::Number(n) => out.extend(n.as_i64().map(|n| n.to_string())),
        Value::Null | Value::Bool(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    match (scan_all(data), serde_json::from_slice::<Value>(data)) {
        (Err(ScanError::TooDeep { .. }), _) => {}
        (Ok(mut scanned), Ok(tree)) => {
            let mut expected = Vec::new();
            tree_tokens(&tree, &mut expected);
            // serde_json keeps one of duplicate keys; compare when none were collapsed.
            if scanned.len() == expected.len() {
                scanned.sort();
                expected.sort();
                assert_eq!(scanned, expected);
            }
        }
        (Err(ScanError::Syntax { .. }), Err(_)) => {}
        // serde_json refuses numbers beyond f64's range; the scanner only reads integers.
        (Ok(_), Err(e)) if e.to_string().starts_with("number out of range") => {}
        (scanned, tree) => panic!("scanner {scanned:?}, serde_json {tree:?}"),
    }
    let request = match parse_request(data) {
        Ok(request) => request,
        Err(e) => {
            // Every rejection renders as a valid JSON-RPC error response.
            let reply = parse_request(&e.to_response()).map(|r| r.messages);
            assert!(matches!(reply.as_deref(), Ok([m]) if m.kind == MessageKind::Response));
            return;
        }
    };
    assert!(!request.messages.is_empty() && request.messages.len() <= MAX_BATCH);
    assert!(request.batch || request.messages.len() == 1);
    for message in &request.messages {
        assert_eq!(
            message.method.is_none(),
            message.kind == MessageKind::Response
        );
        if let Some(method) = &message.method {
            assert!(!method.is_empty());
            assert!(method.len() <= data.len());
        }
        if let Some(tool) = &message.tool {
            assert!(tool.len() <= data.len());
        }
        assert_eq!(
            message.id.is_none(),
            message.kind == MessageKind::Notification
        );
        // Headers mirroring the body's method always agree with it.
        if message.kind != MessageKind::Response && message.tool.is_none() {
            assert!(check_mcp_headers(message, message.method.as_deref(), None).is_ok());
        }
    }
    if let Some(body) = request.error_body(FORBIDDEN, FORBIDDEN_MESSAGE, None) {
        // One error response per request, shaped like the body, with the requests' ids.
        let Ok(reply) = parse_request(&body) else {
            panic!(
                "error body does not parse: {}",
                String::from_utf8_lossy(&body)
            );
        };
        assert_eq!(reply.batch, request.batch);
        let ids: Vec<_> = request.requests().map(|m| m.id.clone()).collect();
        let reply_ids: Vec<_> = reply.messages.iter().map(|m| m.id.clone()).collect();
        assert_eq!(ids, reply_ids);
        assert!(
            reply
                .messages
                .iter()
                .all(|m| m.kind == MessageKind::Response)
        );
    }
});
