//! Protocol detection from the first bytes a client sends, without configuration: TLS (with
//! the SNI host name from the ClientHello), HTTP/2 with prior knowledge (the connection
//! preface), HTTP/1.x (method, target, version), else opaque TCP. Bytes are untrusted: every
//! length is checked, nothing allocates more than the input, and a prefix too short to decide
//! says so instead of guessing.

/// What a connection speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// A TLS handshake; `sni` is the server name the client asked for, if it sent one.
    Tls { sni: Option<String> },
    /// HTTP/2 with prior knowledge (h2c, gRPC without TLS).
    Http2,
    /// HTTP/1.0 or HTTP/1.1.
    Http1 { method: String, target: String },
    /// Anything else.
    Opaque,
}

impl Protocol {
    /// A stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Tls { .. } => "tls",
            Self::Http2 => "http2",
            Self::Http1 { .. } => "http1",
            Self::Opaque => "opaque",
        }
    }
}

/// The verdict on a prefix of the client's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    Known(Protocol),
    /// The prefix is consistent with a protocol but too short to decide; read more.
    NeedMore,
}

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
pub const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest HTTP/1 request line the detector looks at before calling the stream opaque.
pub const MAX_REQUEST_LINE: usize = 8192;

const HTTP1_METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
];

/// Classifies the first bytes of a client stream.
pub fn detect(prefix: &[u8]) -> Detection {
    if prefix.is_empty() {
        return Detection::NeedMore;
    }
    if prefix[0] == 0x16 {
        return detect_tls(prefix);
    }
    let preface_len = prefix.len().min(HTTP2_PREFACE.len());
    if prefix[..preface_len] == HTTP2_PREFACE[..preface_len] {
        return if prefix.len() >= HTTP2_PREFACE.len() {
            Detection::Known(Protocol::Http2)
        } else {
            Detection::NeedMore
        };
    }
    detect_http1(prefix)
}

fn detect_http1(prefix: &[u8]) -> Detection {
    let method_prefix = |method: &str| {
        let len = prefix.len().min(method.len());
        prefix[..len] == method.as_bytes()[..len]
    };
    if !HTTP1_METHODS.iter().any(|method| method_prefix(method)) {
        return Detection::Known(Protocol::Opaque);
    }
    let Some(line_end) = prefix.windows(2).position(|pair| pair == b"\r\n") else {
        return if prefix.len() >= MAX_REQUEST_LINE {
            Detection::Known(Protocol::Opaque)
        } else {
            Detection::NeedMore
        };
    };
    let Ok(line) = std::str::from_utf8(&prefix[..line_end]) else {
        return Detection::Known(Protocol::Opaque);
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Detection::Known(Protocol::Opaque);
    };
    let known_method = HTTP1_METHODS.contains(&method);
    let http_version = version == "HTTP/1.1" || version == "HTTP/1.0";
    if known_method && http_version && !target.is_empty() {
        Detection::Known(Protocol::Http1 {
            method: method.to_owned(),
            target: target.to_owned(),
        })
    } else {
        Detection::Known(Protocol::Opaque)
    }
}

/// A big-endian cursor over untrusted bytes.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if count > self.bytes.len() {
            return None;
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|bytes| bytes[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3).map(|bytes| {
            usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2])
        })
    }

    /// A vector with a `width`-byte length prefix.
    fn vector(&mut self, width: usize) -> Option<&'a [u8]> {
        let len = match width {
            1 => usize::from(self.u8()?),
            2 => usize::from(self.u16()?),
            _ => self.u24()?,
        };
        self.take(len)
    }
}

/// Record type of a TLS handshake record, and handshake type of a ClientHello.
const TLS_HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const EXTENSION_SERVER_NAME: u16 = 0x0000;
const SERVER_NAME_HOST: u8 = 0x00;
/// TLS records carry at most 2^14 bytes of plaintext (RFC 8446, section 5.1).
const MAX_TLS_RECORD: usize = 1 << 14;

fn detect_tls(prefix: &[u8]) -> Detection {
    let mut record = Reader { bytes: prefix };
    let header = (record.u8(), record.u16(), record.u16());
    let (Some(TLS_HANDSHAKE), Some(version), Some(length)) = header else {
        return Detection::NeedMore;
    };
    let length = usize::from(length);
    // SSL 3.0 .. TLS 1.3 all put 0x03 in the record version's major byte.
    if version >> 8 != 0x03 || length == 0 || length > MAX_TLS_RECORD {
        return Detection::Known(Protocol::Opaque);
    }
    let Some(body) = record.take(length) else {
        return Detection::NeedMore;
    };
    // The ClientHello may in principle span records; the SNI is then not read (rare: it
    // would need a hello larger than 16 KiB).
    let sni = client_hello_sni(body);
    match sni {
        HelloParse::NotHello => Detection::Known(Protocol::Opaque),
        HelloParse::Sni(sni) => Detection::Known(Protocol::Tls { sni }),
    }
}

enum HelloParse {
    NotHello,
    Sni(Option<String>),
}

fn client_hello_sni(body: &[u8]) -> HelloParse {
    let mut reader = Reader { bytes: body };
    if reader.u8() != Some(CLIENT_HELLO) {
        return HelloParse::NotHello;
    }
    let Some(hello_len) = reader.u24() else {
        return HelloParse::NotHello;
    };
    // A hello cut by the record boundary is still TLS; the SNI is unknown then.
    let hello = reader.take(hello_len).unwrap_or(reader.bytes);
    let mut hello = Reader { bytes: hello };
    let parsed = (|| {
        hello.take(2)?; // legacy_version
        hello.take(32)?; // random
        hello.vector(1)?; // legacy_session_id
        hello.vector(2)?; // cipher_suites
        hello.vector(1)?; // legacy_compression_methods
        let mut extensions = Reader {
            bytes: hello.vector(2)?,
        };
        while !extensions.bytes.is_empty() {
            let kind = extensions.u16()?;
            let data = extensions.vector(2)?;
            if kind == EXTENSION_SERVER_NAME {
                return Some(server_name(data));
            }
        }
        Some(None)
    })();
    HelloParse::Sni(parsed.flatten())
}

/// The host name of a server_name extension (RFC 6066, section 3), if well formed.
fn server_name(data: &[u8]) -> Option<String> {
    let mut list = Reader {
        bytes: Reader { bytes: data }.vector(2)?,
    };
    while !list.bytes.is_empty() {
        let name_type = list.u8()?;
        let name = list.vector(2)?;
        if name_type == SERVER_NAME_HOST {
            let host = std::str::from_utf8(name).ok()?;
            let valid = !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.');
            return valid.then(|| host.to_ascii_lowercase());
        }
    }
    None
}

/// How many leading client bytes the detector may look at.
pub const MAX_SNIFF: usize = MAX_TLS_RECORD + 5;

/// Classifies a connection from its first client bytes, fed in as they pass by.
#[derive(Debug, Default)]
pub struct Sniffer {
    seen: Vec<u8>,
    protocol: Option<Protocol>,
}

impl Sniffer {
    /// The detected protocol; `None` while the client has not sent enough to tell.
    pub fn protocol(&self) -> Option<&Protocol> {
        self.protocol.as_ref()
    }

    /// Whether more client bytes could still change the answer.
    pub fn undecided(&self) -> bool {
        self.protocol.is_none()
    }

    /// Feeds the next client bytes (in order); cheap once the protocol is known.
    pub fn observe(&mut self, bytes: &[u8]) {
        if self.protocol.is_some() || bytes.is_empty() {
            return;
        }
        let room = MAX_SNIFF.saturating_sub(self.seen.len());
        self.seen.extend_from_slice(&bytes[..bytes.len().min(room)]);
        match detect(&self.seen) {
            Detection::Known(protocol) => self.protocol = Some(protocol),
            Detection::NeedMore if self.seen.len() >= MAX_SNIFF => {
                self.protocol = Some(Protocol::Opaque)
            }
            Detection::NeedMore => return,
        }
        self.seen = Vec::new();
    }
}

/// A stream whose first client bytes are classified as they pass through: no byte is held
/// back and nothing waits for the client, so server-first protocols are unaffected.
#[derive(Debug)]
pub struct SniffingStream<S> {
    inner: S,
    sniffer: Sniffer,
}

impl<S> SniffingStream<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            sniffer: Sniffer::default(),
        }
    }

    /// The detected protocol; `None` while the client has not sent enough to tell.
    pub fn protocol(&self) -> Option<&Protocol> {
        self.sniffer.protocol()
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for SniffingStream<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = polled {
            let fresh = &buf.filled()[before..];
            if self.sniffer.undecided() && !fresh.is_empty() {
                let fresh = fresh.to_vec();
                self.sniffer.observe(&fresh);
            }
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for SniffingStream<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello record with the given extensions block.
    fn client_hello(extensions: &[u8]) -> Vec<u8> {
        let mut hello = vec![0x03, 0x03];
        hello.extend_from_slice(&[7u8; 32]);
        hello.push(0); // session id
        hello.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        hello.extend_from_slice(&[1, 0]); // null compression
        hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        hello.extend_from_slice(extensions);
        let mut handshake = vec![CLIENT_HELLO];
        handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&hello);
        let mut record = vec![TLS_HANDSHAKE, 0x03, 0x01];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    fn sni_extension(host: &str) -> Vec<u8> {
        let mut entry = vec![SERVER_NAME_HOST];
        entry.extend_from_slice(&(host.len() as u16).to_be_bytes());
        entry.extend_from_slice(host.as_bytes());
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&entry);
        let mut extension = EXTENSION_SERVER_NAME.to_be_bytes().to_vec();
        extension.extend_from_slice(&(list.len() as u16).to_be_bytes());
        extension.extend_from_slice(&list);
        extension
    }

    #[test]
    fn tls_client_hello_yields_the_sni() {
        let mut extensions = vec![0x00, 0x17, 0x00, 0x00]; // extended_master_secret, empty
        extensions.extend_from_slice(&sni_extension("Planner.Agents.Example"));
        let record = client_hello(&extensions);
        assert_eq!(
            detect(&record),
            Detection::Known(Protocol::Tls {
                sni: Some("planner.agents.example".into())
            })
        );
        // Every strict prefix of the record asks for more, never guesses.
        for cut in 1..record.len() {
            assert_eq!(detect(&record[..cut]), Detection::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn tls_without_or_with_a_bad_sni_is_still_tls() {
        assert_eq!(
            detect(&client_hello(&[])),
            Detection::Known(Protocol::Tls { sni: None })
        );
        let bad = client_hello(&sni_extension("bad host\u{0}"));
        assert_eq!(detect(&bad), Detection::Known(Protocol::Tls { sni: None }));
    }

    #[test]
    fn tls_lookalikes_are_opaque() {
        assert_eq!(
            detect(&[0x16, 0x09, 0x01, 0x00, 0x05, 1, 0, 0, 0, 0]),
            Detection::Known(Protocol::Opaque)
        );
        assert_eq!(
            detect(&[0x16, 0x03, 0x01, 0xff, 0xff]),
            Detection::Known(Protocol::Opaque)
        );
        // A handshake record that is not a ClientHello (e.g. a ServerHello sent by a client).
        assert_eq!(
            detect(&[0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0, 0, 0]),
            Detection::Known(Protocol::Opaque)
        );
    }

    #[test]
    fn http2_preface_is_recognised_and_prefixes_wait() {
        let mut bytes = HTTP2_PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(detect(&bytes), Detection::Known(Protocol::Http2));
        assert_eq!(detect(&HTTP2_PREFACE[..10]), Detection::NeedMore);
    }

    #[test]
    fn http1_request_lines() {
        assert_eq!(
            detect(b"POST /mcp HTTP/1.1\r\nHost: tools\r\n\r\n"),
            Detection::Known(Protocol::Http1 {
                method: "POST".into(),
                target: "/mcp".into()
            })
        );
        assert_eq!(
            detect(b"GET /.well-known/agent-card.json HTT"),
            Detection::NeedMore
        );
        assert_eq!(detect(b"PO"), Detection::NeedMore);
        assert_eq!(
            detect(b"GET / HTTP/2.0\r\n"),
            Detection::Known(Protocol::Opaque)
        );
        assert_eq!(
            detect(b"GET  / HTTP/1.1\r\n"),
            Detection::Known(Protocol::Opaque)
        );
        assert_eq!(
            detect(b"SSH-2.0-OpenSSH_9.2\r\n"),
            Detection::Known(Protocol::Opaque)
        );
        assert_eq!(
            detect(&[0xff, 0xfe, 0x00]),
            Detection::Known(Protocol::Opaque)
        );
    }

    #[tokio::test]
    async fn sniffing_stream_passes_bytes_through_and_classifies_across_reads() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(64);
        let mut sniffing = SniffingStream::new(server);
        let writer = tokio::spawn(async move {
            let mut client = client;
            for chunk in [&b"POST /m"[..], b"cp HTTP/1.1\r\n", b"Host: t\r\n\r\n"] {
                client.write_all(chunk).await.expect("write");
            }
        });
        let mut received = Vec::new();
        sniffing.read_to_end(&mut received).await.expect("read");
        writer.await.expect("writer");
        assert_eq!(received, b"POST /mcp HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(
            sniffing.protocol(),
            Some(&Protocol::Http1 {
                method: "POST".into(),
                target: "/mcp".into()
            })
        );
    }

    #[test]
    fn endless_request_lines_are_given_up_on() {
        let mut line = b"GET /".to_vec();
        line.resize(MAX_REQUEST_LINE, b'a');
        assert_eq!(detect(&line), Detection::Known(Protocol::Opaque));
    }
}
