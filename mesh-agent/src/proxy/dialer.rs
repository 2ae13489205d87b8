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
    tunnel::{Peer, PeerDirectory, TunnelClient, TunnelError, TunnelStream, dial_uncaptured},
};

/// Why an endpoint could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0}")]
    Direct(#[from] std::io::Error),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

impl DialError {
    /// Whether the failure happened before anything reached the destination workload.
    pub fn is_connect_failure(&self) -> bool {
        match self {
            DialError::Direct(_) => true,
            DialError::Tunnel(error) => error.is_connect_failure(),
        }
    }
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
                let identity = SpiffeId::for_agent(trust_domain, source)
                    .map_err(|error| TunnelError::Identity(source.to_owned(), error.to_string()))?;
                let address = self
                    .peers
                    .address_of(node)
                    .await
                    .ok_or_else(|| TunnelError::UnknownNode(node.to_owned()))?;
                let stream = self
                    .tunnel
                    .open(&identity, Peer { node, address }, endpoint)
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
