//! Fuzzes protocol detection: no input may panic it, a verdict on a prefix never contradicts
//! the verdict on the whole input, and a detected SNI is a plausible lower-case host name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::proxy::sniff::{Detection, Protocol, detect};

fuzz_target!(|data: &[u8]| {
    let whole = detect(data);
    if let Detection::Known(Protocol::Tls { sni: Some(host) }) = &whole {
        assert!(!host.is_empty() && host.len() <= 253);
        assert!(
            host.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        );
    }
    // Once a prefix is decided, more bytes cannot change the protocol family.
    for cut in [1, 2, 5, 9, 24, 64] {
        if cut >= data.len() {
            break;
        }
        if let Detection::Known(early) = detect(&data[..cut]) {
            if let Detection::Known(late) = &whole {
                assert_eq!(
                    early.label(),
                    late.label(),
                    "prefix {cut} decided differently"
                );
            }
        }
    }
});
