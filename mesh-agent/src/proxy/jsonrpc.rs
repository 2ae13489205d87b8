//! JSON-RPC 2.0 extraction for MCP and A2A request bodies: what the proxy needs for policy,
//! telemetry and routing (message kind, method, id, MCP tool/prompt/resource name, protocol
//! family, A2A streaming), the agreement check between the body and the MCP 2026-07-28
//! `Mcp-Method` / `Mcp-Name` request headers, and the JSON-RPC error bodies the mesh answers
//! with when it refuses a request.
//!
//! Bodies are untrusted. The parser builds no tree of the request: it scans the body once
//! ([`super::json_scan`]), keeps only a handful of strings (slices of the body, copied only
//! for the message it returns), checks the grammar of everything else as it skips it, and
//! bounds the body size ([`MAX_BODY_BYTES`]), the nesting depth ([`MAX_DEPTH`]) and the
//! batch length ([`MAX_BATCH`]). It is deliberately strict where
//! leniency would let the proxy and the upstream server read different requests: a duplicate
//! `jsonrpc`, `method`, `id` or `params` member, or a duplicate `params.name` / `params.uri`,
//! is rejected rather than resolved one way or the other.

use std::borrow::Cow;
use std::fmt;

use serde::{Serialize, Serializer};
use smallvec::{SmallVec, smallvec};
use smol_str::SmolStr;

use super::json_scan::{Kind, Scalar, ScanError, Scanner};

/// Largest body the parser looks at. The caller bounds bodies much tighter; this is the
/// backstop.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Most messages accepted in one batch.
pub const MAX_BATCH: usize = 64;
/// Deepest nesting of arrays and objects accepted anywhere in the body (the top level is
/// depth 1).
pub const MAX_DEPTH: usize = 64;
/// Longest header or body value quoted in a [`HeaderMismatch`], in characters.
pub const MAX_QUOTED_CHARS: usize = 128;

/// JSON-RPC 2.0: the body is not valid JSON.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC 2.0: the JSON is not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC 2.0: the method does not exist.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC 2.0: invalid method parameters.
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC 2.0: internal error.
pub const INTERNAL_ERROR: i64 = -32603;
/// Mesh: the request was denied by an access policy. Sent with [`FORBIDDEN_MESSAGE`].
/// A code of its own: MCP and A2A use -32001..-32007 and -32042 for their own errors (A2A's
/// -32001 is `TaskNotFoundError`); `error.data.mesh` (see [`mesh_error_data`]) marks it too.
pub const FORBIDDEN: i64 = -32043;
/// The message that goes with [`FORBIDDEN`].
pub const FORBIDDEN_MESSAGE: &str = "forbidden by mesh policy";
/// Mesh (not a JSON-RPC standard code; server-error range, mnemonic HTTP 429): a rate limit
/// or a retry budget refused the request. Clients should back off and retry.
pub const RATE_LIMITED: i64 = -32029;
/// The message that goes with [`RATE_LIMITED`].
pub const RATE_LIMITED_MESSAGE: &str = "rate limited by mesh policy";
/// Mesh (not a JSON-RPC standard code; server-error range, mnemonic HTTP 503): no healthy
/// upstream, an open circuit breaker, or a timeout. Clients may retry later.
pub const UNAVAILABLE: i64 = -32053;
/// The message that goes with [`UNAVAILABLE`].
pub const UNAVAILABLE_MESSAGE: &str = "upstream unavailable";

/// The identifier of a JSON-RPC request. Fractional and out-of-range numbers are rejected at
/// parse time, so every id the parser accepts fits here and compares exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RpcId {
    Number(i64),
    String(String),
    Null,
}

impl fmt::Display for RpcId {
    /// Numbers bare, strings quoted and escaped (so a string id "1" and the number 1 look
    /// different in logs, and an id cannot inject control characters), null as `null`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::String(s) => write!(f, "{s:?}"),
            Self::Null => f.write_str("null"),
        }
    }
}

impl Serialize for RpcId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Number(n) => serializer.serialize_i64(*n),
            Self::String(s) => serializer.serialize_str(s),
            Self::Null => serializer.serialize_unit(),
        }
    }
}

/// What a JSON-RPC message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// A method call with an id: expects a response.
    Request,
    /// A method call without an id: expects nothing back.
    Notification,
    /// A result or error (an MCP client answering a server's request, e.g. sampling).
    Response,
}

impl MessageKind {
    /// A stable label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Notification => "notification",
            Self::Response => "response",
        }
    }
}

/// The agent protocol a method belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Model Context Protocol.
    Mcp,
    /// Agent2Agent (v0.3 slash-style or v1.0 PascalCase method names).
    A2a,
    /// A method neither protocol defines, or a response (which carries no method).
    Unknown,
}

impl Family {
    /// A stable label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Mcp => "mcp",
            Self::A2a => "a2a",
            Self::Unknown => "unknown",
        }
    }
}

/// One JSON-RPC message, reduced to what the proxy acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: MessageKind,
    /// The method; `None` exactly for responses. Never empty. Held inline up to 23 bytes
    /// (every method the mesh knows): parsing a request allocates nothing for it.
    pub method: Option<SmolStr>,
    /// The id; `None` for notifications.
    pub id: Option<RpcId>,
    /// The MCP target name: `params.name` for `tools/call` and `prompts/get`, `params.uri`
    /// for `resources/read`, `resources/subscribe` and `resources/unsubscribe`. Always
    /// present for those methods (a call without it is rejected), `None` otherwise. Inline
    /// up to 23 bytes, like the method.
    pub tool: Option<SmolStr>,
    pub protocol: Family,
    /// An A2A method answered with a stream of events (`message/stream`, `tasks/resubscribe`,
    /// `SendStreamingMessage`, `SubscribeToTask`).
    pub a2a_streaming: bool,
}

/// A parsed request body: one message, or a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonRpcRequest {
    /// The messages in body order; exactly one unless `batch` (held inline then).
    pub messages: SmallVec<[Message; 1]>,
    /// The body was a JSON array (even of one element).
    pub batch: bool,
}

impl JsonRpcRequest {
    /// Checks the MCP 2026-07-28 standard headers against the whole body: any of them on a
    /// batch is a mismatch (a batch has no single method); otherwise see
    /// [`check_mcp_headers`].
    pub fn check_mcp_headers(
        &self,
        mcp_method: Option<&str>,
        mcp_name: Option<&str>,
    ) -> Result<(), HeaderMismatch> {
        if mcp_method.is_none() && mcp_name.is_none() {
            return Ok(());
        }
        match self.messages.as_slice() {
            [single] if !self.batch => check_mcp_headers(single, mcp_method, mcp_name),
            _ => Err(HeaderMismatch::NotApplicable {
                header: present_header(mcp_method),
                what: "batch",
            }),
        }
    }

    /// The messages that expect a response (requests with an id).
    pub fn requests(&self) -> impl Iterator<Item = &Message> {
        self.messages
            .iter()
            .filter(|m| m.kind == MessageKind::Request)
    }

    /// The error body refusing this whole request, shaped as the body was: an object for a
    /// single request, an array with one entry per request for a batch. `None` when nothing
    /// in the body expects a response (notifications and responses only): the transport then
    /// answers with a status code alone.
    pub fn error_body(
        &self,
        code: i64,
        message: &str,
        data: Option<serde_json::Value>,
    ) -> Option<Vec<u8>> {
        if self.batch {
            batch_error_response(&self.messages, code, message, data)
        } else {
            let request = self.requests().next()?;
            Some(error_response(request.id.as_ref(), code, message, data))
        }
    }
}

/// Why a body is not an acceptable JSON-RPC 2.0 request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonRpcError {
    #[error("body of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("body nests arrays and objects deeper than {max} levels")]
    TooDeep { max: usize },
    #[error("body is not valid JSON: {0}")]
    Parse(String),
    #[error("empty batch")]
    EmptyBatch,
    #[error("batch has more than {max} messages")]
    BatchTooLarge { max: usize },
    #[error("invalid request{}: {reason}", at(*.index))]
    InvalidRequest {
        /// Position in the batch, for batches.
        index: Option<usize>,
        /// The message's id, when it had a valid one.
        id: Option<RpcId>,
        reason: &'static str,
    },
    #[error("invalid params{}: {reason}", at(*.index))]
    InvalidParams {
        index: Option<usize>,
        id: Option<RpcId>,
        reason: &'static str,
    },
}

fn at(index: Option<usize>) -> String {
    index
        .map(|i| format!(" at batch index {i}"))
        .unwrap_or_default()
}

impl JsonRpcError {
    /// The JSON-RPC error code to answer with.
    pub fn code(&self) -> i64 {
        match self {
            Self::Parse(_) | Self::TooDeep { .. } => PARSE_ERROR,
            Self::InvalidParams { .. } => INVALID_PARAMS,
            Self::TooLarge { .. }
            | Self::EmptyBatch
            | Self::BatchTooLarge { .. }
            | Self::InvalidRequest { .. } => INVALID_REQUEST,
        }
    }

    /// The id to answer with: the offending message's, for a single (non-batch) message whose
    /// id was readable; otherwise `None` (null), as JSON-RPC 2.0 prescribes.
    pub fn id(&self) -> Option<&RpcId> {
        match self {
            Self::InvalidRequest {
                index: None, id, ..
            }
            | Self::InvalidParams {
                index: None, id, ..
            } => id.as_ref(),
            _ => None,
        }
    }

    /// The complete JSON-RPC error body answering a request that failed to parse.
    pub fn to_response(&self) -> Vec<u8> {
        error_response(self.id(), self.code(), &self.to_string(), None)
    }
}

/// Parses a JSON-RPC 2.0 request body (one message or a batch) and extracts what the proxy
/// needs. Never panics; allocates at most in proportion to the body.
pub fn parse_request(body: &[u8]) -> Result<JsonRpcRequest, JsonRpcError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(JsonRpcError::TooLarge {
            len: body.len(),
            max: MAX_BODY_BYTES,
        });
    }
    let mut scanner = Scanner::new(body, MAX_DEPTH)?;
    let top = match scanner.peek_kind()? {
        Kind::Object => Top::Single(raw_message(&mut scanner)?),
        Kind::Array => {
            let mut elements = Vec::new();
            let mut overflow = false;
            scanner.array(|scanner| {
                if elements.len() == MAX_BATCH {
                    overflow = true;
                    return scanner.skip_value();
                }
                let element = if scanner.peek_kind()? == Kind::Object {
                    Some(raw_message(scanner)?)
                } else {
                    scanner.skip_value()?;
                    None
                };
                elements.push(element);
                Ok(())
            })?;
            Top::Batch { elements, overflow }
        }
        Kind::Null | Kind::Other => {
            scanner.skip_value()?;
            Top::Other
        }
    };
    scanner.finish()?;
    match top {
        Top::Single(raw) => Ok(JsonRpcRequest {
            messages: smallvec![validate(raw, None)?],
            batch: false,
        }),
        Top::Batch { elements, overflow } => {
            if overflow {
                return Err(JsonRpcError::BatchTooLarge { max: MAX_BATCH });
            }
            if elements.is_empty() {
                return Err(JsonRpcError::EmptyBatch);
            }
            let messages = elements
                .into_iter()
                .enumerate()
                .map(|(i, element)| match element {
                    Some(raw) => validate(raw, Some(i)),
                    None => Err(JsonRpcError::InvalidRequest {
                        index: Some(i),
                        id: None,
                        reason: "batch element is not an object",
                    }),
                })
                .collect::<Result<_, _>>()?;
            Ok(JsonRpcRequest {
                messages,
                batch: true,
            })
        }
        Top::Other => Err(JsonRpcError::InvalidRequest {
            index: None,
            id: None,
            reason: "body is neither an object nor an array",
        }),
    }
}

impl From<ScanError> for JsonRpcError {
    fn from(error: ScanError) -> Self {
        match error {
            ScanError::TooDeep { max } => Self::TooDeep { max },
            ScanError::Syntax { .. } => Self::Parse(error.to_string()),
        }
    }
}

/// Checks the MCP 2026-07-28 standard request headers against the message they travel with:
/// `Mcp-Method` must equal the body's method, `Mcp-Name` (after undoing the
/// `=?base64?…?=` encoding the specification allows for non-ASCII values) must equal the
/// extracted tool/prompt/resource name, a response carries neither, and a call that names
/// a target (`tools/call`, `prompts/get`, `resources/read`, ...) and carries `Mcp-Method`
/// must carry `Mcp-Name` too. Whether the headers are required at all depends on the
/// negotiated protocol version and is the caller's decision.
pub fn check_mcp_headers(
    message: &Message,
    mcp_method: Option<&str>,
    mcp_name: Option<&str>,
) -> Result<(), HeaderMismatch> {
    if mcp_method.is_none() && mcp_name.is_none() {
        return Ok(());
    }
    if message.kind == MessageKind::Response {
        return Err(HeaderMismatch::NotApplicable {
            header: present_header(mcp_method),
            what: "response",
        });
    }
    if let Some(header) = mcp_method
        && message.method.as_deref() != Some(header)
    {
        return Err(HeaderMismatch::value(
            MCP_METHOD_HEADER,
            header,
            message.method.as_deref(),
        ));
    }
    match mcp_name {
        Some(header) => {
            let decoded =
                decode_header_value(header).ok_or_else(|| HeaderMismatch::BadEncoding {
                    header: MCP_NAME_HEADER,
                    value: quote(header),
                })?;
            if message.tool.as_deref() != Some(decoded.as_ref()) {
                return Err(HeaderMismatch::value(
                    MCP_NAME_HEADER,
                    header,
                    message.tool.as_deref(),
                ));
            }
        }
        None => {
            if mcp_method.is_some() && message.tool.is_some() {
                return Err(HeaderMismatch::MissingName {
                    method: quote(message.method.as_deref().unwrap_or_default()),
                });
            }
        }
    }
    Ok(())
}

/// The MCP 2026-07-28 request header mirroring the JSON-RPC method.
pub const MCP_METHOD_HEADER: &str = "Mcp-Method";
/// The MCP 2026-07-28 request header mirroring the tool, prompt or resource name.
pub const MCP_NAME_HEADER: &str = "Mcp-Name";

fn present_header(mcp_method: Option<&str>) -> &'static str {
    if mcp_method.is_some() {
        MCP_METHOD_HEADER
    } else {
        MCP_NAME_HEADER
    }
}

/// The MCP request headers and the body disagree. Quoted values are cut to
/// [`MAX_QUOTED_CHARS`] characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderMismatch {
    #[error("{header} header {header_value:?} disagrees with the body's {}", body(.body_value))]
    Value {
        header: &'static str,
        header_value: String,
        /// `None` when the body carries no such value.
        body_value: Option<String>,
    },
    #[error("{header} header on a {what}, which has no single method")]
    NotApplicable {
        header: &'static str,
        /// "batch" or "response".
        what: &'static str,
    },
    #[error("Mcp-Method header without the Mcp-Name header on a {method:?} call")]
    MissingName { method: String },
    #[error("{header} header {value:?} is not valid =?base64?…?= encoding")]
    BadEncoding { header: &'static str, value: String },
}

fn body(value: &Option<String>) -> String {
    match value {
        Some(v) => format!("{v:?}"),
        None => "(absent)".to_owned(),
    }
}

impl HeaderMismatch {
    fn value(header: &'static str, header_value: &str, body_value: Option<&str>) -> Self {
        Self::Value {
            header,
            header_value: quote(header_value),
            body_value: body_value.map(quote),
        }
    }
}

/// The first [`MAX_QUOTED_CHARS`] characters of `s`, with an ellipsis when cut.
fn quote(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

const BASE64_PREFIX: &str = "=?base64?";
const BASE64_SUFFIX: &str = "?=";

/// Undoes the MCP header value encoding: a value wearing both `=?base64?` and `?=` is the
/// standard Base64 of the UTF-8 value; anything else is the value itself. `None` when the
/// markers are there but the payload is not Base64 of UTF-8.
pub fn decode_header_value(value: &str) -> Option<Cow<'_, str>> {
    let Some(payload) = value
        .strip_prefix(BASE64_PREFIX)
        .and_then(|rest| rest.strip_suffix(BASE64_SUFFIX))
    else {
        return Some(Cow::Borrowed(value));
    };
    let bytes = decode_base64(payload.as_bytes())?;
    String::from_utf8(bytes).ok().map(Cow::Owned)
}

/// Standard-alphabet Base64 with optional `=` padding; `None` on anything else.
fn decode_base64(input: &[u8]) -> Option<Vec<u8>> {
    fn sextet(b: u8) -> Option<u32> {
        match b {
            b'A'..=b'Z' => Some(u32::from(b - b'A')),
            b'a'..=b'z' => Some(u32::from(b - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(b - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let trimmed = match input {
        [rest @ .., b'=', b'='] | [rest @ .., b'='] if input.len().is_multiple_of(4) => rest,
        _ => input,
    };
    if trimmed.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(trimmed.len() / 4 * 3 + 2);
    for group in trimmed.chunks(4) {
        let mut acc = 0u32;
        for &b in group {
            acc = (acc << 6) | sextet(b)?;
        }
        match group.len() {
            4 => out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]),
            3 => out.extend_from_slice(&[(acc >> 10) as u8, (acc >> 2) as u8]),
            2 => out.push((acc >> 4) as u8),
            _ => return None,
        }
    }
    Some(out)
}

/// A JSON-RPC 2.0 error response: `{"jsonrpc":"2.0","id":…,"error":{"code":…,"message":…}}`
/// with `data` when given, and `id` null when `None`.
pub fn error_response(
    id: Option<&RpcId>,
    code: i64,
    message: &str,
    data: Option<serde_json::Value>,
) -> Vec<u8> {
    let value = error_value(id, code, message, data);
    serde_json::to_vec(&value).unwrap_or_else(|_| FALLBACK_ERROR.to_vec())
}

/// The error array answering a batch: one entry per message that is a request with an id
/// (notifications and responses get none). `None` when there is no such message; JSON-RPC
/// then says to return nothing at all.
pub fn batch_error_response(
    messages: &[Message],
    code: i64,
    message: &str,
    data: Option<serde_json::Value>,
) -> Option<Vec<u8>> {
    let entries: Vec<serde_json::Value> = messages
        .iter()
        .filter(|m| m.kind == MessageKind::Request)
        .map(|m| error_value(m.id.as_ref(), code, message, data.clone()))
        .collect();
    if entries.is_empty() {
        return None;
    }
    Some(serde_json::to_vec(&entries).unwrap_or_else(|_| FALLBACK_ERROR.to_vec()))
}

/// The `error.data` the mesh attaches to its own errors, so a client can tell a mesh refusal
/// from an application error with the same code: `{"mesh": {"reason": …}}`.
pub fn mesh_error_data(reason: &str) -> serde_json::Value {
    serde_json::json!({ "mesh": { "reason": reason } })
}

/// Only reachable if serializing a `serde_json::Value` failed, which it cannot.
const FALLBACK_ERROR: &[u8] =
    br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"internal error"}}"#;

fn error_value(
    id: Option<&RpcId>,
    code: i64,
    message: &str,
    data: Option<serde_json::Value>,
) -> serde_json::Value {
    let id = match id {
        Some(RpcId::Number(n)) => serde_json::Value::from(*n),
        Some(RpcId::String(s)) => serde_json::Value::from(s.as_str()),
        Some(RpcId::Null) | None => serde_json::Value::Null,
    };
    let mut error = serde_json::Map::new();
    error.insert("code".to_owned(), code.into());
    error.insert("message".to_owned(), message.into());
    if let Some(data) = data {
        error.insert("data".to_owned(), data);
    }
    serde_json::json!({ "jsonrpc": "2.0", "id": id, "error": error })
}

/// Whether a `Content-Type` value is JSON: `application/json` or `application/<x>+json`,
/// case-insensitively, with or without parameters.
pub fn is_json_content_type(value: &str) -> bool {
    // A byte scan: a `str` pattern search costs more than the few bytes a media type has.
    let essence = match value.bytes().position(|byte| byte == b';') {
        Some(end) => &value[..end],
        None => value,
    }
    .trim_ascii();
    // What nearly every client sends, without the byte-by-byte checks below.
    if essence.eq_ignore_ascii_case("application/json") {
        return true;
    }
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    if !kind.eq_ignore_ascii_case("application") || subtype.is_empty() {
        return false;
    }
    let valid = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    if !valid(subtype) {
        return false;
    }
    if subtype.eq_ignore_ascii_case("json") {
        return true;
    }
    subtype.len() > 5
        && subtype
            .get(subtype.len() - 5..)
            .is_some_and(|suffix| suffix.eq_ignore_ascii_case("+json"))
}

// ---------------------------------------------------------------------------------------
// Classification.

/// Methods that name a target in `params.name`.
const NAME_METHODS: [&str; 2] = ["tools/call", "prompts/get"];
/// Methods that name a target in `params.uri`.
const URI_METHODS: [&str; 3] = [
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
];

const MCP_METHODS: [&str; 12] = [
    "initialize",
    "ping",
    "completion/complete",
    "logging/setLevel",
    "server/discover",
    "sampling/createMessage",
    "elicitation/create",
    "roots/list",
    // MCP tasks (2025-11-25 and later); tasks/get and tasks/cancel are shared with A2A v0.3.
    "tasks/result",
    "tasks/list",
    "tasks/update",
    "tasks/delete",
];
const MCP_PREFIXES: [&str; 4] = ["tools/", "resources/", "prompts/", "notifications/"];

const A2A_METHODS: [&str; 18] = [
    // v0.3
    "message/send",
    "message/stream",
    "tasks/resubscribe",
    "agent/getAuthenticatedExtendedCard",
    // v1.0
    "SendMessage",
    "SendStreamingMessage",
    "GetTask",
    "ListTasks",
    "CancelTask",
    "SubscribeToTask",
    "CreateTaskPushNotificationConfig",
    "SetTaskPushNotificationConfig",
    "GetTaskPushNotificationConfig",
    "ListTaskPushNotificationConfigs",
    "ListTaskPushNotificationConfig",
    "DeleteTaskPushNotificationConfig",
    "GetExtendedAgentCard",
    "GetAuthenticatedExtendedCard",
];
const A2A_PREFIXES: [&str; 1] = ["tasks/pushNotificationConfig/"];
const A2A_STREAMING: [&str; 4] = [
    "message/stream",
    "tasks/resubscribe",
    "SendStreamingMessage",
    "SubscribeToTask",
];

/// The protocol a method belongs to. `tasks/get` and `tasks/cancel` exist in both MCP
/// (`params.taskId`) and A2A v0.3 (`params.id`), so the params decide.
fn classify(method: &str, params: &RawParams<'_>) -> Family {
    if method == "tasks/get" || method == "tasks/cancel" {
        return match (params.task_id, params.a2a_id) {
            (true, false) => Family::Mcp,
            (false, true) => Family::A2a,
            _ => Family::Unknown,
        };
    }
    if MCP_METHODS.contains(&method) || MCP_PREFIXES.iter().any(|p| method.starts_with(p)) {
        Family::Mcp
    } else if A2A_METHODS.contains(&method) || A2A_PREFIXES.iter().any(|p| method.starts_with(p)) {
        Family::A2a
    } else {
        Family::Unknown
    }
}

// ---------------------------------------------------------------------------------------
// Validation of what the streaming pass collected.

fn validate(raw: RawMessage<'_>, index: Option<usize>) -> Result<Message, JsonRpcError> {
    let id = match raw.id {
        None => None,
        Some(Scalar::Str(s)) => Some(RpcId::String(s.into_owned())),
        Some(Scalar::Int(n)) => Some(RpcId::Number(n)),
        Some(Scalar::Null) => Some(RpcId::Null),
        Some(_) => {
            return Err(JsonRpcError::InvalidRequest {
                index,
                id: None,
                reason: "id must be a string, an integer or null",
            });
        }
    };
    let invalid = |reason| JsonRpcError::InvalidRequest {
        index,
        id: id.clone(),
        reason,
    };
    if let Some(reason) = raw.duplicate {
        return Err(invalid(reason));
    }
    if !matches!(&raw.jsonrpc, Some(Scalar::Str(v)) if v == "2.0") {
        return Err(invalid("jsonrpc must be \"2.0\""));
    }
    let Some(method) = raw.method else {
        // A response.
        if raw.params.is_some() {
            return Err(invalid("a response carries no params"));
        }
        return match (raw.result, raw.error, &id) {
            (true, true, _) => Err(invalid("a response carries result or error, not both")),
            (false, false, _) => Err(invalid("no method, result or error")),
            (_, _, None) => Err(invalid("a response needs an id")),
            _ => Ok(Message {
                kind: MessageKind::Response,
                method: None,
                id,
                tool: None,
                protocol: Family::Unknown,
                a2a_streaming: false,
            }),
        };
    };
    let method = match method {
        Scalar::Str(m) if !m.is_empty() => SmolStr::new(m),
        _ => return Err(invalid("method must be a non-empty string")),
    };
    if raw.result || raw.error {
        return Err(invalid("a request carries no result or error"));
    }
    let params = raw.params.unwrap_or_default();
    if params.shape == Shape::Other {
        return Err(invalid("params must be an object or an array"));
    }
    let invalid_params = |reason| JsonRpcError::InvalidParams {
        index,
        id: id.clone(),
        reason,
    };
    if params.duplicate {
        return Err(invalid_params("duplicate params.name or params.uri"));
    }
    let protocol = classify(&method, &params);
    let tool = if NAME_METHODS.contains(&method.as_str()) {
        match params.name {
            Some(Scalar::Str(name)) => Some(SmolStr::new(name)),
            _ => return Err(invalid_params("params.name must be a string")),
        }
    } else if URI_METHODS.contains(&method.as_str()) {
        match params.uri {
            Some(Scalar::Str(uri)) => Some(SmolStr::new(uri)),
            _ => return Err(invalid_params("params.uri must be a string")),
        }
    } else {
        None
    };
    let a2a_streaming = A2A_STREAMING.contains(&method.as_str());
    Ok(Message {
        kind: if id.is_some() {
            MessageKind::Request
        } else {
            MessageKind::Notification
        },
        method: Some(method),
        id,
        tool,
        protocol,
        a2a_streaming,
    })
}

// ---------------------------------------------------------------------------------------
// The scan: keeps only the members listed below, as slices of the body where it can, and
// skips the rest (checking its grammar, allocating nothing).

enum Top<'a> {
    Single(RawMessage<'a>),
    /// `None` elements were not objects. At most [`MAX_BATCH`] are kept; `overflow` says
    /// there were more.
    Batch {
        elements: Vec<Option<RawMessage<'a>>>,
        overflow: bool,
    },
    Other,
}

#[derive(Default)]
struct RawMessage<'a> {
    jsonrpc: Option<Scalar<'a>>,
    method: Option<Scalar<'a>>,
    id: Option<Scalar<'a>>,
    params: Option<RawParams<'a>>,
    result: bool,
    error: bool,
    /// Set to a reason when a member we read appeared twice.
    duplicate: Option<&'static str>,
}

/// Scans a message object at the scanner's cursor.
fn raw_message<'a>(scanner: &mut Scanner<'a>) -> Result<RawMessage<'a>, ScanError> {
    let mut raw = RawMessage::default();
    scanner.object(|scanner, key| {
        let (taken, reason) = match &*key {
            "jsonrpc" => (
                raw.jsonrpc.replace(scanner.scalar()?).is_some(),
                "duplicate member \"jsonrpc\"",
            ),
            "method" => (
                raw.method.replace(scanner.scalar()?).is_some(),
                "duplicate member \"method\"",
            ),
            "id" => (
                raw.id.replace(scanner.scalar()?).is_some(),
                "duplicate member \"id\"",
            ),
            "params" => (
                raw.params.replace(raw_params(scanner)?).is_some(),
                "duplicate member \"params\"",
            ),
            "result" => {
                scanner.skip_value()?;
                (
                    std::mem::replace(&mut raw.result, true),
                    "duplicate member \"result\"",
                )
            }
            "error" => {
                scanner.skip_value()?;
                (
                    std::mem::replace(&mut raw.error, true),
                    "duplicate member \"error\"",
                )
            }
            _ => {
                scanner.skip_value()?;
                (false, "")
            }
        };
        if taken && raw.duplicate.is_none() {
            raw.duplicate = Some(reason);
        }
        Ok(())
    })?;
    Ok(raw)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Shape {
    #[default]
    Absent,
    Object,
    Array,
    Other,
}

/// What the parser keeps of `params`.
#[derive(Default)]
struct RawParams<'a> {
    shape: Shape,
    name: Option<Scalar<'a>>,
    uri: Option<Scalar<'a>>,
    /// `params.taskId` is present (MCP tasks).
    task_id: bool,
    /// `params.id` is present (A2A v0.3 tasks).
    a2a_id: bool,
    duplicate: bool,
}

/// Scans a `params` value at the scanner's cursor. `"params": null` is taken as absent;
/// several clients send it.
fn raw_params<'a>(scanner: &mut Scanner<'a>) -> Result<RawParams<'a>, ScanError> {
    let mut params = RawParams::default();
    match scanner.peek_kind()? {
        Kind::Object => {
            params.shape = Shape::Object;
            scanner.object(|scanner, key| {
                match &*key {
                    "name" => {
                        let value = scanner.scalar()?;
                        params.duplicate |= params.name.replace(value).is_some();
                    }
                    "uri" => {
                        let value = scanner.scalar()?;
                        params.duplicate |= params.uri.replace(value).is_some();
                    }
                    "taskId" => {
                        scanner.skip_value()?;
                        params.task_id = true;
                    }
                    "id" => {
                        scanner.skip_value()?;
                        params.a2a_id = true;
                    }
                    _ => scanner.skip_value()?,
                }
                Ok(())
            })?;
        }
        Kind::Array => {
            params.shape = Shape::Array;
            scanner.skip_value()?;
        }
        Kind::Null => scanner.skip_value()?,
        Kind::Other => {
            params.shape = Shape::Other;
            scanner.skip_value()?;
        }
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(body: &str) -> Message {
        let request = parse_request(body.as_bytes()).expect("parses");
        assert!(!request.batch);
        assert_eq!(request.messages.len(), 1);
        request.messages.into_iter().next().expect("one message")
    }

    fn err(body: &str) -> JsonRpcError {
        parse_request(body.as_bytes()).expect_err("rejected")
    }

    #[test]
    fn mcp_tools_call_extracts_tool_name() {
        let m = one(
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"arguments":{"name":"decoy","deep":[1,{"a":null}]},"name":"get_weather","_meta":{"progressToken":1}}}"#,
        );
        assert_eq!(m.kind, MessageKind::Request);
        assert_eq!(m.method.as_deref(), Some("tools/call"));
        assert_eq!(m.id, Some(RpcId::Number(7)));
        assert_eq!(m.tool.as_deref(), Some("get_weather"));
        assert_eq!(m.protocol, Family::Mcp);
        assert!(!m.a2a_streaming);
    }

    #[test]
    fn mcp_list_initialize_and_targets() {
        let m = one(r#"{"jsonrpc":"2.0","id":"a-1","method":"tools/list","params":{}}"#);
        assert_eq!(m.id, Some(RpcId::String("a-1".into())));
        assert_eq!((m.protocol, m.tool), (Family::Mcp, None));

        let m = one(
            r#"{"method":"initialize","jsonrpc":"2.0","id":0,"params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"c","version":"1"}}}"#,
        );
        assert_eq!(m.method.as_deref(), Some("initialize"));
        assert_eq!((m.protocol, m.tool), (Family::Mcp, None));

        let m = one(r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"p"}}"#);
        assert_eq!(m.tool.as_deref(), Some("p"));
        let m = one(
            r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///x","name":"no"}}"#,
        );
        assert_eq!(m.tool.as_deref(), Some("file:///x"));
        let m = one(r#"{"jsonrpc":"2.0","id":1,"method":"server/discover"}"#);
        assert_eq!(m.protocol, Family::Mcp);
        // Escapes decode exactly as the upstream server will decode them.
        let m = one(
            r#"{"jsonrpc":"2.0","id":1,"meth\u006fd":"tools\/call","params":{"name":"\u00e9t\u00e9"}}"#,
        );
        assert_eq!(m.method.as_deref(), Some("tools/call"));
        assert_eq!(m.tool.as_deref(), Some("été"));
    }

    #[test]
    fn notification_has_no_id() {
        let m = one(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        assert_eq!(m.kind, MessageKind::Notification);
        assert_eq!(m.id, None);
        assert_eq!(m.protocol, Family::Mcp);
        let m = one(r#"{"jsonrpc":"2.0","method":"ping","id":null}"#);
        assert_eq!((m.kind, m.id), (MessageKind::Request, Some(RpcId::Null)));
    }

    #[test]
    fn responses() {
        let m = one(r#"{"jsonrpc":"2.0","id":3,"result":{"content":[]}}"#);
        assert_eq!(m.kind, MessageKind::Response);
        assert_eq!((m.method, m.protocol), (None, Family::Unknown));
        let m = one(r#"{"jsonrpc":"2.0","id":null,"error":{"code":-1,"message":"x"}}"#);
        assert_eq!((m.kind, m.id), (MessageKind::Response, Some(RpcId::Null)));
        assert!(matches!(
            err(r#"{"jsonrpc":"2.0","result":1}"#),
            JsonRpcError::InvalidRequest { .. }
        ));
        assert!(matches!(
            err(r#"{"jsonrpc":"2.0","id":1,"result":1,"error":{}}"#),
            JsonRpcError::InvalidRequest { .. }
        ));
        assert!(matches!(
            err(r#"{"jsonrpc":"2.0","id":1,"method":"ping","result":1}"#),
            JsonRpcError::InvalidRequest { .. }
        ));
    }

    #[test]
    fn batch() {
        let r = parse_request(
            br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}},
                 {"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}},
                 {"jsonrpc":"2.0","id":"x","result":{}}]"#,
        )
        .expect("batch parses");
        assert!(r.batch);
        let kinds: Vec<_> = r.messages.iter().map(|m| m.kind).collect();
        assert_eq!(
            kinds,
            [
                MessageKind::Request,
                MessageKind::Notification,
                MessageKind::Response
            ]
        );
        assert_eq!(r.messages[0].tool.as_deref(), Some("a"));
        assert_eq!(r.requests().count(), 1);

        let single = parse_request(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#).expect("ok");
        assert!(single.batch);
        assert_eq!(err("[]"), JsonRpcError::EmptyBatch);
        assert!(matches!(
            err(r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}, 5]"#),
            JsonRpcError::InvalidRequest { index: Some(1), .. }
        ));
    }

    #[test]
    fn a2a_methods_and_streaming() {
        let cases = [
            ("message/send", false),
            ("message/stream", true),
            ("tasks/resubscribe", true),
            ("tasks/pushNotificationConfig/set", false),
            ("tasks/pushNotificationConfig/list", false),
            ("agent/getAuthenticatedExtendedCard", false),
            ("SendMessage", false),
            ("SendStreamingMessage", true),
            ("GetTask", false),
            ("ListTasks", false),
            ("CancelTask", false),
            ("SubscribeToTask", true),
            ("CreateTaskPushNotificationConfig", false),
            ("DeleteTaskPushNotificationConfig", false),
            ("ListTaskPushNotificationConfigs", false),
            ("GetExtendedAgentCard", false),
        ];
        for (method, streaming) in cases {
            let m = one(&format!(
                r#"{{"jsonrpc":"2.0","id":"r","method":"{method}","params":{{"message":{{"role":"user","parts":[]}}}}}}"#
            ));
            assert_eq!(m.protocol, Family::A2a, "{method}");
            assert_eq!(m.a2a_streaming, streaming, "{method}");
            assert_eq!(m.tool, None);
        }
        // Shared names: the params tell MCP tasks from A2A v0.3 tasks.
        let m = one(r#"{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"id":"t1"}}"#);
        assert_eq!(m.protocol, Family::A2a);
        let m = one(r#"{"jsonrpc":"2.0","id":1,"method":"tasks/cancel","params":{"taskId":"t"}}"#);
        assert_eq!(m.protocol, Family::Mcp);
        let m = one(r#"{"jsonrpc":"2.0","id":1,"method":"frobnicate"}"#);
        assert_eq!((m.protocol, m.a2a_streaming), (Family::Unknown, false));
    }

    #[test]
    fn malformed_bodies_are_typed_errors() {
        for body in ["", "{", r#"{"jsonrpc":"2.0""#, "nul", "{}}", "\u{feff}{}"] {
            assert!(
                matches!(err(body), JsonRpcError::Parse(_)),
                "{body:?}: {:?}",
                err(body)
            );
        }
        for body in ["5", r#""str""#, "null", "true"] {
            assert!(
                matches!(err(body), JsonRpcError::InvalidRequest { .. }),
                "{body}"
            );
        }
        let invalid = [
            r#"{"id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
            r#"{"jsonrpc":2.0,"id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":5}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":""}"#,
            r#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":[1],"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":18446744073709551615,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":"x"}"#,
            r#"{"jsonrpc":"2.0"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call"}"#,
            r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}"#,
        ];
        for body in invalid {
            assert!(
                matches!(err(body), JsonRpcError::InvalidRequest { .. }),
                "{body}: {:?}",
                err(body)
            );
        }
        let invalid_params = [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["a"]}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}"#,
        ];
        for body in invalid_params {
            let e = err(body);
            assert!(
                matches!(e, JsonRpcError::InvalidParams { .. }),
                "{body}: {e:?}"
            );
            assert_eq!(e.code(), INVALID_PARAMS);
            assert_eq!(e.id(), Some(&RpcId::Number(1)));
        }
    }

    #[test]
    fn huge_batch_and_deep_nesting_are_rejected() {
        let element = r#"{"jsonrpc":"2.0","method":"notifications/x"}"#;
        let ok = format!("[{}]", vec![element; MAX_BATCH].join(","));
        assert_eq!(
            parse_request(ok.as_bytes()).map(|r| r.messages.len()),
            Ok(MAX_BATCH)
        );
        let big = format!("[{}]", vec![element; MAX_BATCH + 1].join(","));
        assert_eq!(err(&big), JsonRpcError::BatchTooLarge { max: MAX_BATCH });

        let deep = |n: usize| {
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":{{"a":{}1{}}}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        assert!(parse_request(deep(MAX_DEPTH - 2).as_bytes()).is_ok());
        assert_eq!(
            err(&deep(MAX_DEPTH - 1)),
            JsonRpcError::TooDeep { max: MAX_DEPTH }
        );
        assert_eq!(
            err(&"[".repeat(100_000)),
            JsonRpcError::TooDeep { max: MAX_DEPTH }
        );
        // Brackets inside strings do not count.
        let quoted = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":{{"a":"{}\"{}"}}}}"#,
            "[".repeat(500),
            "{".repeat(500)
        );
        assert!(parse_request(quoted.as_bytes()).is_ok());

        let huge = vec![b' '; MAX_BODY_BYTES + 1];
        assert!(matches!(
            parse_request(&huge),
            Err(JsonRpcError::TooLarge { .. })
        ));
    }

    fn call(body: &str) -> Message {
        one(body)
    }

    #[test]
    fn header_agreement() {
        let tool_call = call(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather"}}"#,
        );
        assert_eq!(check_mcp_headers(&tool_call, None, None), Ok(()));
        assert_eq!(
            check_mcp_headers(&tool_call, Some("tools/call"), Some("get_weather")),
            Ok(())
        );
        // Mcp-Name alone is checked too.
        assert_eq!(
            check_mcp_headers(&tool_call, None, Some("get_weather")),
            Ok(())
        );
        // Base64 sentinel form ("get_weather").
        assert_eq!(
            check_mcp_headers(
                &tool_call,
                Some("tools/call"),
                Some("=?base64?Z2V0X3dlYXRoZXI=?=")
            ),
            Ok(())
        );
        assert!(matches!(
            check_mcp_headers(&tool_call, Some("tools/call"), Some("=?base64?***?=")),
            Err(HeaderMismatch::BadEncoding { .. })
        ));

        let e = check_mcp_headers(&tool_call, Some("tools/list"), Some("get_weather"))
            .expect_err("method mismatch");
        assert_eq!(
            e,
            HeaderMismatch::Value {
                header: MCP_METHOD_HEADER,
                header_value: "tools/list".into(),
                body_value: Some("tools/call".into()),
            }
        );
        let text = e.to_string();
        assert!(
            text.contains("Mcp-Method")
                && text.contains("tools/list")
                && text.contains("tools/call")
        );

        let e = check_mcp_headers(&tool_call, Some("tools/call"), Some("delete_all"))
            .expect_err("name mismatch");
        assert!(matches!(
            e,
            HeaderMismatch::Value {
                header: MCP_NAME_HEADER,
                ..
            }
        ));
        assert!(matches!(
            check_mcp_headers(&tool_call, Some("tools/call"), None),
            Err(HeaderMismatch::MissingName { .. })
        ));

        let list = call(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#);
        assert_eq!(check_mcp_headers(&list, Some("tools/list"), None), Ok(()));
        assert!(matches!(
            check_mcp_headers(&list, Some("tools/list"), Some("x")),
            Err(HeaderMismatch::Value {
                body_value: None,
                ..
            })
        ));

        let response = call(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#);
        assert!(matches!(
            check_mcp_headers(&response, Some("tools/call"), None),
            Err(HeaderMismatch::NotApplicable {
                what: "response",
                ..
            })
        ));
        assert_eq!(check_mcp_headers(&response, None, None), Ok(()));

        let batch =
            parse_request(br#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#).expect("batch");
        assert!(matches!(
            batch.check_mcp_headers(Some("tools/list"), None),
            Err(HeaderMismatch::NotApplicable { what: "batch", .. })
        ));
        assert_eq!(batch.check_mcp_headers(None, None), Ok(()));
        let single =
            parse_request(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).expect("single");
        assert_eq!(single.check_mcp_headers(Some("tools/list"), None), Ok(()));

        // Long values are cut in the error.
        let long = "x".repeat(1000);
        let e = check_mcp_headers(&list, Some(&long), None).expect_err("mismatch");
        let HeaderMismatch::Value { header_value, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(header_value.chars().count(), MAX_QUOTED_CHARS + 1);
    }

    #[test]
    fn header_value_decoding() {
        assert_eq!(decode_header_value("plain").as_deref(), Some("plain"));
        assert_eq!(
            decode_header_value("=?base64?dMO2w7ZsX3VuaWNvZGU=?=").as_deref(),
            Some("tööl_unicode")
        );
        assert_eq!(
            decode_header_value("=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?=").as_deref(),
            Some("=?base64?literal?=")
        );
        assert_eq!(decode_header_value("=?base64?YQ?=").as_deref(), Some("a"));
        assert_eq!(decode_header_value("=?base64?YWI?=").as_deref(), Some("ab"));
        assert_eq!(decode_header_value("=?base64??=").as_deref(), Some(""));
        assert_eq!(decode_header_value("=?base64?Y?="), None);
        assert_eq!(decode_header_value("=?base64?/w==?="), None); // not UTF-8
        assert_eq!(
            decode_header_value("=?base64?unterminated").as_deref(),
            Some("=?base64?unterminated")
        );
    }

    #[test]
    fn error_response_round_trips() {
        for (id, expected) in [
            (Some(RpcId::Number(-4)), serde_json::json!(-4)),
            (
                Some(RpcId::String("a\"b".into())),
                serde_json::json!("a\"b"),
            ),
            (Some(RpcId::Null), serde_json::Value::Null),
            (None, serde_json::Value::Null),
        ] {
            let body = error_response(id.as_ref(), FORBIDDEN, FORBIDDEN_MESSAGE, None);
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["jsonrpc"], "2.0");
            assert_eq!(v["id"], expected);
            assert_eq!(v["error"]["code"], FORBIDDEN);
            assert_eq!(v["error"]["message"], FORBIDDEN_MESSAGE);
            assert!(v["error"].get("data").is_none());
            assert!(v.get("result").is_none());
        }
        let body = error_response(
            Some(&RpcId::Number(1)),
            RATE_LIMITED,
            RATE_LIMITED_MESSAGE,
            Some(mesh_error_data("rate limit")),
        );
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"]["data"]["mesh"]["reason"], "rate limit");

        // The error body parses back as a valid response with the same id.
        let m = one(std::str::from_utf8(&body).expect("utf8"));
        assert_eq!(
            (m.kind, m.id),
            (MessageKind::Response, Some(RpcId::Number(1)))
        );

        let e = err(r#"{"jsonrpc":"2.0","id":"q","method":"tools/call"}"#);
        let v: serde_json::Value = serde_json::from_slice(&e.to_response()).expect("json");
        assert_eq!(
            (v["id"].as_str(), v["error"]["code"].as_i64()),
            (Some("q"), Some(INVALID_PARAMS))
        );
        let v: serde_json::Value = serde_json::from_slice(&err("{").to_response()).expect("json");
        assert_eq!(
            (v["id"].is_null(), v["error"]["code"].as_i64()),
            (true, Some(PARSE_ERROR))
        );
    }

    #[test]
    fn batch_error_bodies() {
        let r = parse_request(
            br#"[{"jsonrpc":"2.0","id":1,"method":"a"},{"jsonrpc":"2.0","method":"n"},
                 {"jsonrpc":"2.0","id":"two","method":"b"},{"jsonrpc":"2.0","id":9,"result":1}]"#,
        )
        .expect("batch");
        let body = r
            .error_body(UNAVAILABLE, UNAVAILABLE_MESSAGE, None)
            .expect("has requests");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        let ids: Vec<_> = v
            .as_array()
            .expect("array")
            .iter()
            .map(|e| e["id"].clone())
            .collect();
        assert_eq!(ids, [serde_json::json!(1), serde_json::json!("two")]);
        assert!(
            v.as_array()
                .expect("array")
                .iter()
                .all(|e| e["error"]["code"] == UNAVAILABLE)
        );

        let notes = parse_request(br#"[{"jsonrpc":"2.0","method":"n"}]"#).expect("batch");
        assert_eq!(notes.error_body(FORBIDDEN, FORBIDDEN_MESSAGE, None), None);
        let note = parse_request(br#"{"jsonrpc":"2.0","method":"n"}"#).expect("single");
        assert_eq!(note.error_body(FORBIDDEN, FORBIDDEN_MESSAGE, None), None);
        let single = parse_request(br#"{"jsonrpc":"2.0","id":5,"method":"n"}"#).expect("single");
        let v: serde_json::Value = serde_json::from_slice(
            &single
                .error_body(FORBIDDEN, FORBIDDEN_MESSAGE, None)
                .expect("body"),
        )
        .expect("json");
        assert_eq!(v["id"], 5);
    }

    #[test]
    fn rpc_id_display_and_hash() {
        assert_eq!(RpcId::Number(-1).to_string(), "-1");
        assert_eq!(RpcId::String("1".into()).to_string(), "\"1\"");
        assert_eq!(RpcId::String("a\nb".into()).to_string(), "\"a\\nb\"");
        assert_eq!(RpcId::Null.to_string(), "null");
        let mut pending = std::collections::HashMap::new();
        pending.insert(RpcId::Number(1), "one");
        pending.insert(RpcId::String("1".into()), "string one");
        assert_eq!(pending.len(), 2);
        assert_eq!(pending.get(&RpcId::Number(1)), Some(&"one"));
    }

    #[test]
    fn json_content_types() {
        for yes in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/json;charset=UTF-8",
            " application/json ",
            "application/vnd.api+json",
            "application/problem+JSON; q=1",
        ] {
            assert!(is_json_content_type(yes), "{yes}");
        }
        for no in [
            "",
            "text/json",
            "application/jsonx",
            "application/+json",
            "application/x-ndjson",
            "text/event-stream",
            "application/json5",
            "application",
            "application/js on",
            "application/ä+json",
        ] {
            assert!(!is_json_content_type(no), "{no}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic sweep; the fuzz target does the real work.
        let seed = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a\u00e9","uri":[{}]}}]"#;
        for cut in 0..seed.len() {
            let _ = parse_request(&seed[..cut]);
            let mut mutated = seed.to_vec();
            mutated[cut] ^= 0x20;
            let _ = parse_request(&mutated);
            mutated[cut] = 0xff;
            let _ = parse_request(&mutated);
        }
    }
}
