//! Fuzzes the SSE parser: no stream may panic it, and where a chunk boundary falls never
//! changes the events, the error, or the last event ID.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::proxy::sse::SseParser;

fuzz_target!(|data: &[u8]| {
    // Two bytes choose the split, one the per-event bound; the rest is the stream.
    let [s0, s1, bound, stream @ ..] = data else {
        return;
    };
    let split = usize::from(u16::from_le_bytes([*s0, *s1])) % (stream.len() + 1);
    let max = if *bound == 0 {
        1 << 20
    } else {
        usize::from(*bound) * 4
    };

    let mut whole = SseParser::new(max);
    let whole_events = whole.feed(stream);

    let mut parts = SseParser::new(max);
    let split_events = parts.feed(&stream[..split]).and_then(|mut events| {
        events.extend(parts.feed(&stream[split..])?);
        Ok(events)
    });

    assert_eq!(whole_events, split_events, "split at {split}");
    if whole_events.is_ok() {
        assert_eq!(whole.last_event_id(), parts.last_event_id());
        assert_eq!(whole.retry(), parts.retry());
    }
});
