//! How the proxy reaches an endpoint: the one place that decides between a direct TCP
//! connection (an endpoint on this node, or one with no node) and the node-to-node tunnel (an
//! endpoint registered on another node). Callers hand it the source workload, the endpoint's
//! address and its node, and get a byte stream back; they never branch on the route.
//!
//! A tunnelled connection carries the source workload's identity
//! (`spiffe://<trust-domain>/agent/<name>`, the kernel-attested workload name), so anything
//! pooled on top of one must be keyed by that source as well: [`Dialer::identity_key`].

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader, ReadBuf},
    net::TcpStream,
};

use crate::{
    identity::SpiffeId,
    policy::PolicySnapshot,
    tunnel::{
        Freshness, Peer, PeerDirectory, TunnelClient, TunnelError, TunnelStream, dial_uncaptured,
    },
};

/// Why an endpoint could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0}")]
    Direct(#[from] std::io::Error),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

/// Reaches endpoints directly or through the tunnel.
#[derive(Debug)]
pub struct Dialer {
    /// This node's name (`metadata.name`): endpoints of other nodes go through the tunnel.
    node: String,
    connect_timeout: Duration,
    tunnel: Arc<TunnelClient>,
    peers: PeerDirectory,
}

impl Dialer {
    pub fn new(
        node: &str,
        connect_timeout: Duration,
        tunnel: Arc<TunnelClient>,
        peers: PeerDirectory,
    ) -> Self {
        Self {
            node: node.to_owned(),
            connect_timeout,
            tunnel,
            peers,
        }
    }

    /// A dialer without tunnel credentials: endpoints of other nodes fail closed.
    pub fn direct(node: &str, connect_timeout: Duration) -> Self {
        let tunnel = TunnelClient::new(None, Default::default(), Default::default());
        Self::new(
            node,
            connect_timeout,
            Arc::new(tunnel),
            PeerDirectory::default(),
        )
    }

    /// Whether an endpoint on `node` is reached through the tunnel.
    pub fn is_remote(&self, node: Option<&str>) -> bool {
        node.is_some_and(|node| node != self.node)
    }

    /// What a connection to an endpoint on `node` for `source` is tied to besides the
    /// endpoint: the source, when the route is the tunnel (the peer sees its identity).
    pub fn identity_key(&self, source: &Arc<str>, node: Option<&str>) -> Option<Arc<str>> {
        self.is_remote(node).then(|| Arc::clone(source))
    }

    /// Connects to `endpoint` (on `node`) on behalf of workload `source`.
    pub async fn connect(
        &self,
        source: &str,
        endpoint: SocketAddr,
        node: Option<&str>,
    ) -> Result<Upstream, DialError> {
        match node.filter(|node| *node != self.node) {
            None => Ok(Upstream::Direct(
                dial_uncaptured(endpoint, self.connect_timeout).await?,
            )),
            Some(node) => {
                let trust_domain = self
                    .tunnel
                    .trust_domain()
                    .ok_or(TunnelError::NoCredentials)?;
                let identity = SpiffeId::for_workload(trust_domain, source)
                    .map_err(|error| TunnelError::Identity(source.to_owned(), error.to_string()))?;
                let address = self
                    .peers
                    .address_of(node)
                    .await
                    .ok_or_else(|| TunnelError::UnknownNode(node.to_owned()))?;
                // Boxed: opening a tunnel (TLS handshake included) is a future of several KiB,
                // and unboxed it would size every caller's future, the per-request HTTP path
                // among them, which then copies it on each request.
                let stream = Box::pin(self.tunnel.open(
                    &identity,
                    Peer { node, address },
                    endpoint,
                ))
                .await?;
                Ok(Upstream::Tunnel(Box::new(BufReader::new(stream))))
            }
        }
    }
}

/// The node an endpoint address is registered on, if any agent of `snapshot` lists it.
pub fn node_of(snapshot: &PolicySnapshot, address: SocketAddr) -> Option<Arc<str>> {
    snapshot.agent_by_address(address).and_then(|agent| {
        agent
            .endpoints
            .iter()
            .find(|endpoint| endpoint.address == address)
            .and_then(|endpoint| endpoint.node.clone())
    })
}

/// A connection to an endpoint.
#[derive(Debug)]
pub enum Upstream {
    Direct(TcpStream),
    /// Buffered so the proxy can wait for a server-first protocol's first bytes without
    /// consuming them.
    Tunnel(Box<BufReader<TunnelStream>>),
}

impl Upstream {
    /// For a tunnelled connection, whether its tunnel connection may still carry new work
    /// (what is pooled on top must not be reused once it is retired); `None` when direct.
    pub fn freshness(&self) -> Option<Freshness> {
        match self {
            Upstream::Direct(_) => None,
            Upstream::Tunnel(stream) => Some(stream.get_ref().freshness()),
        }
    }

    /// Waits until the endpoint has sent something (or closed), without consuming it.
    pub async fn wait_readable(&mut self) -> std::io::Result<()> {
        match self {
            Upstream::Direct(stream) => stream.readable().await,
            Upstream::Tunnel(stream) => stream.fill_buf().await.map(|_| ()),
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Direct(stream) => Pin::new(stream).poll_read(cx, buf),
            Upstream::Tunnel(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Direct(stream) => Pin::new(stream).poll_write(cx, buf),
            Upstream::Tunnel(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Direct(stream) => Pin::new(stream).poll_flush(cx),
            Upstream::Tunnel(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Direct(stream) => Pin::new(stream).poll_shutdown(cx),
            Upstream::Tunnel(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::{
        TunnelStats,
        testing::{TestCa, TestCredentials},
    };

    /// A listener nobody should reach, and a way to tell whether anyone did.
    fn sentinel() -> (std::net::TcpListener, SocketAddr) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        (listener, address)
    }

    fn untouched(listener: &std::net::TcpListener) -> bool {
        matches!(listener.accept(), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock)
    }

    #[tokio::test]
    async fn endpoints_on_other_nodes_fail_closed_without_credentials() {
        let (listener, address) = sentinel();
        let dialer = Dialer::direct("node-a", Duration::from_secs(1));
        let error = dialer
            .connect("client", address, Some("node-b"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, DialError::Tunnel(TunnelError::NoCredentials)),
            "{error}"
        );
        assert!(error.to_string().contains("fail closed"), "{error}");
        assert!(untouched(&listener), "nothing may go out in plaintext");
    }

    #[tokio::test]
    async fn endpoints_of_this_node_or_of_no_node_are_dialled_directly() {
        let (listener, address) = sentinel();
        let dialer = Dialer::direct("node-a", Duration::from_secs(1));
        for node in [Some("node-a"), None] {
            assert!(!dialer.is_remote(node));
            let upstream = dialer.connect("client", address, node).await.unwrap();
            assert!(matches!(upstream, Upstream::Direct(_)));
        }
        assert!(dialer.is_remote(Some("node-b")));
        assert!(!untouched(&listener));
    }

    #[tokio::test]
    async fn unknown_nodes_and_unnamed_workloads_are_refused() {
        let ca = TestCa::new();
        let tunnel = TunnelClient::new(
            Some(TestCredentials::new(&ca, "mesh.test", "node-a")),
            Default::default(),
            Arc::new(TunnelStats::default()),
        );
        let (listener, address) = sentinel();
        let dialer = Dialer::new(
            "node-a",
            Duration::from_secs(1),
            Arc::new(tunnel),
            PeerDirectory::default(),
        );
        let error = dialer
            .connect("client", address, Some("node-b"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, DialError::Tunnel(TunnelError::UnknownNode(ref node)) if node == "node-b"),
            "{error}"
        );
        // A workload enrolled by hand has no name, hence no identity to present.
        let error = dialer
            .connect("cgroup:42", address, Some("node-b"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, DialError::Tunnel(TunnelError::Identity(..))),
            "{error}"
        );
        assert!(untouched(&listener));
    }
}
