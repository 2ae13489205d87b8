//! Where each peer node's tunnel listens: static entries from the configuration
//! (`spec.tunnel.peers`) first, then a dynamic source (etcd node records), whose answers are
//! cached for a short while so a busy route does not ask etcd per connection.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// A boxed future, so [`PeerLookup`] stays object safe.
pub type LookupFuture<'a> = Pin<Box<dyn Future<Output = Option<SocketAddr>> + Send + 'a>>;

/// A dynamic source of peer tunnel addresses (etcd node records).
pub trait PeerLookup: Send + Sync + std::fmt::Debug {
    /// The tunnel address node `node` publishes, if any.
    fn lookup<'a>(&'a self, node: &'a str) -> LookupFuture<'a>;
}

/// How long a looked-up address is trusted before it is asked again.
const CACHE_TTL: Duration = Duration::from_secs(10);

/// Tunnel addresses of peer nodes by node name.
#[derive(Debug, Default)]
pub struct PeerDirectory {
    fixed: HashMap<String, SocketAddr>,
    dynamic: Option<Box<dyn PeerLookup>>,
    cache: Mutex<HashMap<String, (SocketAddr, Instant)>>,
}

impl PeerDirectory {
    /// Static peers only.
    pub fn new(fixed: impl IntoIterator<Item = (String, SocketAddr)>) -> Self {
        Self {
            fixed: fixed.into_iter().collect(),
            dynamic: None,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Adds a dynamic source, asked for nodes not listed statically.
    pub fn with_lookup(mut self, lookup: Box<dyn PeerLookup>) -> Self {
        self.dynamic = Some(lookup);
        self
    }

    /// The tunnel address of `node`.
    pub async fn address_of(&self, node: &str) -> Option<SocketAddr> {
        if let Some(address) = self.fixed.get(node) {
            return Some(*address);
        }
        let dynamic = self.dynamic.as_ref()?;
        let now = Instant::now();
        if let Some((address, at)) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            && now.duration_since(*at) < CACHE_TTL
        {
            return Some(*address);
        }
        let found = dynamic.lookup(node).await;
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        match found {
            Some(address) => {
                cache.insert(node.to_owned(), (address, now));
            }
            None => {
                cache.remove(node);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, Default)]
    struct Counting(std::sync::Arc<AtomicUsize>);

    impl PeerLookup for Counting {
        fn lookup<'a>(&'a self, node: &'a str) -> LookupFuture<'a> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let found = (node == "node-c").then(|| "10.0.0.3:15008".parse().unwrap());
            Box::pin(async move { found })
        }
    }

    #[tokio::test]
    async fn static_peers_win_and_dynamic_answers_are_cached() {
        let counting = Box::new(Counting::default());
        let asked = std::sync::Arc::clone(&counting.0);
        let directory =
            PeerDirectory::new([("node-b".to_owned(), "10.0.0.2:15008".parse().unwrap())])
                .with_lookup(counting);
        assert_eq!(
            directory.address_of("node-b").await,
            Some("10.0.0.2:15008".parse().unwrap())
        );
        for _ in 0..3 {
            assert_eq!(
                directory.address_of("node-c").await,
                Some("10.0.0.3:15008".parse().unwrap())
            );
        }
        assert_eq!(directory.address_of("node-x").await, None);
        assert_eq!(
            asked.load(Ordering::SeqCst),
            2,
            "node-c asked once, node-x once"
        );
    }
}
