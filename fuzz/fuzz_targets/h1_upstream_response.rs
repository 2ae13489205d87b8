//! Fuzzes the upstream side of the in-task HTTP/1.1 client on bytes a hostile upstream may
//! send: the response-head parser and framing, and the chunked decoder. No input may panic
//! them, and where the bytes are split never changes the decoded body, trailers or error.
#![no_main]

use bytes::BytesMut;
use http::Method;
use libfuzzer_sys::fuzz_target;
use mesh_agent::proxy::h1_client::{ChunkedDecoder, Decoded, framing, parse_response_head};

/// Decodes `input` fed in pieces of `step` bytes: (data, trailer count) or the error text.
fn decode(input: &[u8], step: usize) -> Result<(Vec<u8>, usize), String> {
    let mut decoder = ChunkedDecoder::default();
    let mut buffer = BytesMut::new();
    let (mut data, mut trailers, mut fed) = (Vec::new(), 0, 0);
    loop {
        match decoder
            .decode(&mut buffer)
            .map_err(|error| error.to_string())?
        {
            Decoded::Data(bytes) => data.extend_from_slice(&bytes),
            Decoded::Trailers(map) => trailers = map.len(),
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

fuzz_target!(|data: &[u8]| {
    let [step, rest @ ..] = data else {
        return;
    };
    let mut buffer = BytesMut::from(rest);
    if let Ok(Some(head)) = parse_response_head(&mut buffer) {
        assert!(buffer.len() < rest.len());
        let _ = framing(&Method::GET, &head);
        let _ = framing(&Method::HEAD, &head);
    }
    // The same chunked stream, whole and in pieces: the same outcome, errors aside (an error
    // may show up earlier or later, but data decoded before it must agree).
    let whole = decode(rest, rest.len().max(1));
    let pieces = decode(rest, usize::from(*step).max(1));
    match (&whole, &pieces) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Ok(_), Err(_)) | (Err(_), Ok(_)) => {
            panic!("split changed the outcome: {whole:?} vs {pieces:?}")
        }
        (Err(_), Err(_)) => {}
    }
});
