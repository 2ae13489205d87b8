//! Server-Sent Events observation: an incremental parser following the WHATWG HTML "event
//! stream interpretation" rules, for streams the proxy passes through untouched (MCP
//! Streamable HTTP responses, A2A `message/stream`). It learns the last event ID (for
//! `Last-Event-ID` resumption) and counts events; it never changes a byte of the stream.
//!
//! The stream is untrusted: chunk boundaries may fall anywhere (inside a UTF-8 sequence, the
//! BOM, or between the CR and LF of a line end) without changing what is parsed; comments are
//! skipped without being buffered; and the bytes held for one event are bounded by the
//! `max_event_bytes` given to [`SseParser::new`].

/// Whether a `Content-Type` value is `text/event-stream` (case-insensitive, parameters
/// allowed).
pub fn looks_like_sse(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event` field; `None` when absent or empty (the spec's default type, "message").
    pub event: Option<String>,
    /// The `data` lines joined with LF.
    pub data: String,
    /// The value of the `id` field carried by this event itself, if any (`Some("")` resets
    /// the last event ID). The spec's `lastEventId` of this event, which also covers an id
    /// inherited from earlier events, is [`SseParser::last_event_id`] as it stood when the
    /// event was dispatched.
    pub id: Option<String>,
    /// The `retry` field (reconnection time, milliseconds) carried by this event, if valid.
    pub retry: Option<u64>,
}

/// Why the parser stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("server-sent event exceeds {max} bytes")]
    EventTooLarge { max: usize },
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Incremental SSE parser. Feed it the stream's bytes as they arrive, in chunks of any size.
///
/// After an error the parser is spent: every later [`feed`](Self::feed) returns the same
/// error (the proxy keeps forwarding bytes but stops observing the stream), and
/// [`last_event_id`](Self::last_event_id) keeps the last value learned before it.
#[derive(Debug, Clone)]
pub struct SseParser {
    max_event_bytes: usize,
    /// Bytes of the BOM matched so far at the start of the stream; `None` once decided.
    bom_matched: Option<usize>,
    /// The previous chunk ended with CR: an LF starting the next one belongs to it.
    skip_lf: bool,
    /// The current line is a comment, skipped up to its end without buffering.
    in_comment: bool,
    /// The current (non-comment) line so far.
    line: Vec<u8>,
    /// Bytes of the complete non-comment lines of the current event.
    event_bytes: usize,
    data: String,
    event_type: String,
    event_id: Option<String>,
    event_retry: Option<u64>,
    last_event_id: String,
    retry: Option<u64>,
    failed: Option<SseError>,
}

impl SseParser {
    /// A parser that refuses any event whose field lines (every non-comment line from the
    /// end of the previous event, not counting line ends) exceed `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            max_event_bytes,
            bom_matched: Some(0),
            skip_lf: false,
            in_comment: false,
            line: Vec::new(),
            event_bytes: 0,
            data: String::new(),
            event_type: String::new(),
            event_id: None,
            event_retry: None,
            last_event_id: String::new(),
            retry: None,
            failed: None,
        }
    }

    /// The spec's last event ID buffer: set by every `id` field (without NUL), kept across
    /// events; `None` while empty. This is what a reconnecting client sends as
    /// `Last-Event-ID`.
    pub fn last_event_id(&self) -> Option<&str> {
        (!self.last_event_id.is_empty()).then_some(self.last_event_id.as_str())
    }

    /// The latest valid `retry` value seen on the stream, in milliseconds (even one in a
    /// block that dispatched no event).
    pub fn retry(&self) -> Option<u64> {
        self.retry
    }

    /// Parses the next chunk of the stream and returns the events it completes.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let mut events = Vec::new();
        let result = self.feed_inner(chunk, &mut events);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
            // Release what the oversized event held.
            self.line = Vec::new();
            self.data = String::new();
            self.event_type = String::new();
            self.event_id = None;
        }
        result.map(|()| events)
    }

    fn feed_inner(&mut self, mut chunk: &[u8], events: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if let Some(matched) = self.bom_matched {
            chunk = self.strip_bom(matched, chunk, events)?;
        }
        self.scan(chunk, events)
    }

    /// Consumes a BOM at the very start of the stream, however it is split across chunks.
    /// Returns the rest of the chunk to scan.
    fn strip_bom<'c>(
        &mut self,
        mut matched: usize,
        chunk: &'c [u8],
        events: &mut Vec<SseEvent>,
    ) -> Result<&'c [u8], SseError> {
        let mut rest = chunk;
        while let Some((&b, tail)) = rest.split_first() {
            if b == BOM[matched] {
                matched += 1;
                rest = tail;
                if matched == BOM.len() {
                    self.bom_matched = None;
                    return Ok(rest);
                }
            } else {
                // Not a BOM after all: the bytes held back are ordinary stream bytes.
                self.bom_matched = None;
                self.scan(&BOM[..matched], events)?;
                return Ok(rest);
            }
        }
        self.bom_matched = Some(matched);
        Ok(rest)
    }

    fn scan(&mut self, mut bytes: &[u8], events: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if self.skip_lf {
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
            if !bytes.is_empty() {
                self.skip_lf = false;
            }
        }
        while !bytes.is_empty() {
            let end = bytes.iter().position(|&b| b == b'\r' || b == b'\n');
            let (content, terminator) = match end {
                Some(i) => (&bytes[..i], Some(bytes[i])),
                None => (bytes, None),
            };
            self.append(content)?;
            let Some(terminator) = terminator else {
                break;
            };
            bytes = &bytes[content.len() + 1..];
            if terminator == b'\r' {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
            self.end_line(events);
        }
        Ok(())
    }

    /// Adds bytes (no line ends) to the current line.
    fn append(&mut self, content: &[u8]) -> Result<(), SseError> {
        if content.is_empty() || self.in_comment {
            return Ok(());
        }
        if self.line.is_empty() && content[0] == b':' {
            self.in_comment = true;
            return Ok(());
        }
        let held = self
            .event_bytes
            .saturating_add(self.line.len())
            .saturating_add(content.len());
        if held > self.max_event_bytes {
            return Err(SseError::EventTooLarge {
                max: self.max_event_bytes,
            });
        }
        self.line.extend_from_slice(content);
        Ok(())
    }

    fn end_line(&mut self, events: &mut Vec<SseEvent>) {
        if self.in_comment {
            self.in_comment = false;
            return;
        }
        if self.line.is_empty() {
            self.dispatch(events);
            return;
        }
        let line = std::mem::take(&mut self.line);
        self.event_bytes += line.len();
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (&line[..], &[][..]),
        };
        match field {
            b"event" => self.event_type = String::from_utf8_lossy(value).into_owned(),
            b"data" => {
                self.data.push_str(&String::from_utf8_lossy(value));
                self.data.push('\n');
            }
            // An id containing NUL is ignored.
            b"id" if !value.contains(&0) => {
                let id = String::from_utf8_lossy(value).into_owned();
                self.last_event_id.clone_from(&id);
                self.event_id = Some(id);
            }
            // Only ASCII digits; a value that overflows u64 is ignored like any invalid one.
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                let parsed = std::str::from_utf8(value)
                    .ok()
                    .and_then(|digits| digits.parse::<u64>().ok());
                if let Some(ms) = parsed {
                    self.retry = Some(ms);
                    self.event_retry = Some(ms);
                }
            }
            _ => {}
        }
        // Keep the allocation for the next line, unless one huge line inflated it.
        if line.capacity() <= 4096 {
            self.line = line;
            self.line.clear();
        }
    }

    fn dispatch(&mut self, events: &mut Vec<SseEvent>) {
        self.event_bytes = 0;
        let event_type = std::mem::take(&mut self.event_type);
        let id = self.event_id.take();
        let retry = self.event_retry.take();
        if self.data.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        events.push(SseEvent {
            event: (!event_type.is_empty()).then_some(event_type),
            data,
            id,
            retry,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_whole(stream: &[u8], max: usize) -> Result<Vec<SseEvent>, SseError> {
        SseParser::new(max).feed(stream)
    }

    fn ev(event: Option<&str>, data: &str, id: Option<&str>, retry: Option<u64>) -> SseEvent {
        SseEvent {
            event: event.map(str::to_owned),
            data: data.to_owned(),
            id: id.map(str::to_owned),
            retry,
        }
    }

    #[test]
    fn multi_line_data_and_fields() {
        let events = parse_whole(
            b"event: update\ndata: first\ndata:second\ndata\ndata:  indented\nid: 7\n\n",
            1024,
        )
        .expect("ok");
        assert_eq!(
            events,
            [ev(
                Some("update"),
                "first\nsecond\n\n indented",
                Some("7"),
                None
            )]
        );
    }

    #[test]
    fn comments_and_unknown_fields_are_ignored() {
        let mut p = SseParser::new(64);
        let events = p
            .feed(b": keep-alive\n:\nfoo: bar\ndata: x\n: between\n\n")
            .expect("ok");
        assert_eq!(events, [ev(None, "x", None, None)]);
        // A comment longer than the bound is skipped, not buffered.
        let mut long = b":".to_vec();
        long.extend(std::iter::repeat_n(b'c', 10_000));
        long.extend_from_slice(b"\ndata: y\n\n");
        assert_eq!(p.feed(&long).expect("ok"), [ev(None, "y", None, None)]);
    }

    #[test]
    fn line_endings_and_crlf_split_across_chunks() {
        let mut p = SseParser::new(1024);
        assert_eq!(p.feed(b"data: a\r").expect("ok"), []);
        // The LF completes the CRLF; it must not be read as an empty line (dispatch).
        assert_eq!(p.feed(b"\ndata: b\r").expect("ok"), []);
        assert_eq!(p.feed(b"\n\r").expect("ok"), [ev(None, "a\nb", None, None)]);
        assert_eq!(p.feed(b"\n").expect("ok"), []);
        assert_eq!(
            p.feed(b"data: c\r\r").expect("ok"),
            [ev(None, "c", None, None)]
        );
        assert_eq!(
            p.feed(b"data: d\n\n").expect("ok"),
            [ev(None, "d", None, None)]
        );
        // A CR alone ends a line, even when the chunk after it is empty.
        assert_eq!(p.feed(b"data: e\r").expect("ok"), []);
        assert_eq!(p.feed(b"").expect("ok"), []);
        assert_eq!(p.feed(b"\r").expect("ok"), [ev(None, "e", None, None)]);
    }

    #[test]
    fn bom_at_start_only() {
        let mut p = SseParser::new(1024);
        assert_eq!(p.feed(b"\xEF").expect("ok"), []);
        assert_eq!(p.feed(b"\xBB").expect("ok"), []);
        assert_eq!(
            p.feed(b"\xBFdata: x\n\n").expect("ok"),
            [ev(None, "x", None, None)]
        );
        // A second BOM is part of the field name, so the line is an unknown field.
        assert_eq!(p.feed(b"\xEF\xBB\xBFdata: y\n\n").expect("ok"), []);
        // A partial BOM is kept as (invalid UTF-8) content.
        let events = parse_whole(b"\xEF\xBBdata: z\n\ndata: w\n\n", 1024).expect("ok");
        assert_eq!(events, [ev(None, "w", None, None)]);
        let events = parse_whole(b"\xEFdata\n\n", 1024).expect("ok");
        assert_eq!(events, []);
    }

    #[test]
    fn id_persists_and_nul_is_ignored() {
        let mut p = SseParser::new(1024);
        assert_eq!(p.last_event_id(), None);
        let events = p
            .feed(b"id: 1\ndata: a\n\ndata: b\n\nid: 2\n\nid: x\0y\ndata: c\n\n")
            .expect("ok");
        assert_eq!(
            events,
            [
                ev(None, "a", Some("1"), None),
                ev(None, "b", None, None),
                ev(None, "c", None, None)
            ]
        );
        // "id: 2" without data dispatched nothing but still set the buffer; the NUL id was
        // ignored.
        assert_eq!(p.last_event_id(), Some("2"));
        // An empty id resets it.
        assert_eq!(
            p.feed(b"id\ndata: d\n\n").expect("ok"),
            [ev(None, "d", Some(""), None)]
        );
        assert_eq!(p.last_event_id(), None);
        assert_eq!(p.feed(b"id: \xFF\n\n").expect("ok"), []);
        assert_eq!(p.last_event_id(), Some("\u{FFFD}"));
    }

    #[test]
    fn retry_parsing() {
        let mut p = SseParser::new(1024);
        let events = p
            .feed(b"retry: 3000\ndata: a\n\nretry: 12x\ndata: b\n\nretry:-1\nretry: \ndata: c\n\n")
            .expect("ok");
        assert_eq!(
            events,
            [
                ev(None, "a", None, Some(3000)),
                ev(None, "b", None, None),
                ev(None, "c", None, None)
            ]
        );
        assert_eq!(p.retry(), Some(3000));
        assert_eq!(p.feed(b"retry: 5\n\n").expect("ok"), []);
        assert_eq!(p.retry(), Some(5));
        assert_eq!(
            p.feed(b"retry: 99999999999999999999999\n\n").expect("ok"),
            []
        );
        assert_eq!(p.retry(), Some(5));
    }

    #[test]
    fn event_type_resets_and_empty_data_is_not_dispatched() {
        let events = parse_whole(
            b"event: a\n\ndata: x\n\nevent:\ndata:\n\nevent: b\ndata: y\n",
            1024,
        )
        .expect("ok");
        // The trailing incomplete event is never dispatched.
        assert_eq!(
            events,
            [ev(None, "x", None, None), ev(None, "", None, None)]
        );
    }

    #[test]
    fn bound_exceeded() {
        // Exactly at the bound is fine; one byte more is not.
        let ok = b"data: 0123456789\n\n"; // 16 bytes of field line
        assert_eq!(parse_whole(ok, 16).expect("ok").len(), 1);
        assert_eq!(
            parse_whole(ok, 15),
            Err(SseError::EventTooLarge { max: 15 })
        );
        // The bound is per event: many small events are fine.
        let many = b"data: 0123456789\n\n".repeat(100);
        assert_eq!(parse_whole(&many, 16).expect("ok").len(), 100);
        // Lines of one event add up.
        assert!(parse_whole(b"data: 12345\ndata: 12345\n\n", 16).is_err());
        // A line that never ends is refused once it is too long, not buffered forever.
        let mut p = SseParser::new(1000);
        let mut err = None;
        for _ in 0..100 {
            if let Err(e) = p.feed(&[b'x'; 100]) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(SseError::EventTooLarge { max: 1000 }));
        assert!(p.line.capacity() <= 1000);
        // The parser is spent afterwards.
        assert!(p.feed(b"\n\ndata: a\n\n").is_err());
    }

    const STREAM: &[u8] = b"\xEF\xBB\xBF: hello\r\n\
        retry: 1500\r\n\
        event: message\r\nid: 1\r\ndata: {\"jsonrpc\":\"2.0\",\r\ndata: \"id\":1}\r\n\r\n\
        data: caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80\n\n\
        id: 2\rdata: cr only\r\r\
        : comment \xFF\n\
        data\ndata:\n\n\
        id: 3\0\n\
        event: end\ndata: bye\r\n\r\n\
        data: bad \xE2\x82\n\
        data: trailing, not dispatched";

    fn expected_stream_events() -> Vec<SseEvent> {
        vec![
            ev(
                Some("message"),
                "{\"jsonrpc\":\"2.0\",\n\"id\":1}",
                Some("1"),
                Some(1500),
            ),
            ev(None, "café € 😀", None, None),
            ev(None, "cr only", Some("2"), None),
            ev(None, "\n", None, None),
            ev(Some("end"), "bye", None, None),
        ]
    }

    #[test]
    fn whole_stream() {
        let mut p = SseParser::new(1024);
        assert_eq!(p.feed(STREAM).expect("ok"), expected_stream_events());
        assert_eq!(p.last_event_id(), Some("2"));
    }

    #[test]
    fn every_split_gives_the_same_events() {
        for max in [1024, 40] {
            let whole = parse_whole(STREAM, max);
            for cut in 0..=STREAM.len() {
                let mut p = SseParser::new(max);
                let split = p.feed(&STREAM[..cut]).and_then(|mut first| {
                    first.extend(p.feed(&STREAM[cut..])?);
                    Ok(first)
                });
                assert_eq!(split, whole, "split at {cut}, max {max}");
            }
        }
        // Byte by byte.
        let mut p = SseParser::new(1024);
        let mut events = Vec::new();
        for b in STREAM {
            events.extend(p.feed(std::slice::from_ref(b)).expect("ok"));
        }
        assert_eq!(events, expected_stream_events());
        assert_eq!(p.last_event_id(), Some("2"));
    }

    #[test]
    fn every_three_way_split_gives_the_same_events() {
        let whole = parse_whole(STREAM, 1024).expect("ok");
        for a in 0..=STREAM.len() {
            for b in a..=STREAM.len() {
                let mut p = SseParser::new(1024);
                let mut events = p.feed(&STREAM[..a]).expect("ok");
                events.extend(p.feed(&STREAM[a..b]).expect("ok"));
                events.extend(p.feed(&STREAM[b..]).expect("ok"));
                assert_eq!(events, whole, "splits at {a}, {b}");
            }
        }
    }

    #[test]
    fn content_types() {
        assert!(looks_like_sse("text/event-stream"));
        assert!(looks_like_sse("Text/Event-Stream; charset=utf-8"));
        assert!(looks_like_sse(" text/event-stream ;"));
        assert!(!looks_like_sse("text/event-streams"));
        assert!(!looks_like_sse("application/json"));
        assert!(!looks_like_sse(""));
    }
}
