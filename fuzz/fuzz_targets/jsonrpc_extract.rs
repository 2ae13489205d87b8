//! Fuzzes JSON-RPC extraction: no body may panic it; an accepted body yields non-empty methods
//! and names that are no longer than the body, batches within the limit, headers that mirror
//! the body agree with it, and error bodies that are valid JSON-RPC responses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::proxy::jsonrpc::{
    FORBIDDEN, FORBIDDEN_MESSAGE, MAX_BATCH, MessageKind, check_mcp_headers, parse_request,
};

fuzz_target!(|data: &[u8]| {
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
