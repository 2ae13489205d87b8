//! One etcd lease held by this node: granted on first use, renewed on its holder's schedule
//! (every third of the TTL), granted again after it expired (etcd away for longer than the
//! TTL), revoked on a clean stop. The node record ([`super::node`]) and every set of records
//! the node keeps alive ([`super::records`]: registered instances, pod identities) hold their
//! keys through one of these, so a node that dies takes its keys with it within the TTL.

use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use tracing::{debug, info};

use super::etcd::{Etcd, EtcdError};

/// Shortest TTL granted (etcd's own minimum is a few seconds).
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// A lease of this node. See the module documentation.
pub struct NodeLease {
    etcd: Etcd,
    ttl: Duration,
    /// What the lease holds, for logs and errors (`"node"`, `"instance"`, ...).
    what: &'static str,
    held: Option<Held>,
}

struct Held {
    id: i64,
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
}

impl std::fmt::Debug for NodeLease {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NodeLease")
            .field("what", &self.what)
            .field("ttl", &self.ttl)
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl NodeLease {
    /// A lease of `ttl` (at least [`MIN_TTL`]), not granted yet.
    pub fn new(etcd: Etcd, ttl: Duration, what: &'static str) -> Self {
        NodeLease {
            etcd,
            ttl: ttl.max(MIN_TTL),
            what,
            held: None,
        }
    }

    /// The TTL granted.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The TTL in whole seconds, as etcd takes it.
    pub fn ttl_seconds(&self) -> i64 {
        i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX)
    }

    /// How often the holder should renew: a third of the TTL.
    pub fn renew_interval(&self) -> Duration {
        self.ttl / 3
    }

    /// The lease held now, if any.
    pub fn id(&self) -> Option<i64> {
        self.held.as_ref().map(|held| held.id)
    }

    /// The lease's id, granted first when none is held.
    pub async fn ensure(&mut self) -> Result<i64, EtcdError> {
        if let Some(held) = &self.held {
            return Ok(held.id);
        }
        let ttl = self.ttl_seconds();
        let granted = self
            .etcd
            .call(&self.context("granting"), |mut client| async move {
                client.lease_grant(ttl, None).await
            })
            .await?;
        let id = granted.id();
        let (keeper, responses) = self
            .etcd
            .call(&self.context("keeping alive"), |mut client| async move {
                client.lease_keep_alive(id).await
            })
            .await?;
        self.held = Some(Held {
            id,
            keeper,
            responses,
        });
        info!(
            lease = id,
            ttl_seconds = ttl,
            what = self.what,
            "lease granted"
        );
        Ok(id)
    }

    /// Renews the held lease once (nothing to do without one). `Ok(false)` when etcd says it
    /// expired: it is forgotten, and keys written with it are gone. An error leaves the lease
    /// held with a new keep-alive stream when one can be opened (it may still be alive), or
    /// forgets it when not (the next [`ensure`](Self::ensure) grants a new one).
    pub async fn renew(&mut self) -> Result<bool, EtcdError> {
        let Some(held) = self.held.as_mut() else {
            return Ok(true);
        };
        let timeout = self.etcd.settings().request_timeout;
        let renewed = tokio::time::timeout(timeout, async {
            held.keeper.keep_alive().await?;
            held.responses.message().await
        })
        .await;
        let unreachable = |cause: String| EtcdError::Unreachable {
            endpoints: self.etcd.settings().endpoints.join(","),
            what: format!("keeping the {} lease alive", self.what),
            cause,
        };
        let error = match renewed {
            Ok(Ok(Some(response))) if response.ttl() > 0 => return Ok(true),
            Ok(Ok(Some(_))) => {
                info!(
                    lease = held.id,
                    what = self.what,
                    "lease expired (etcd was away for longer than its TTL)"
                );
                self.held = None;
                return Ok(false);
            }
            Ok(Ok(None)) => unreachable("the keep-alive stream ended".to_owned()),
            Ok(Err(error)) => self
                .etcd
                .error(&format!("keeping the {} lease alive", self.what), error),
            Err(_) => unreachable(format!("no answer within {timeout:?}")),
        };
        // The stream may be broken: open a new one for the same lease.
        let id = held.id;
        let reopened = self
            .etcd
            .call(&self.context("keeping alive"), |mut client| async move {
                client.lease_keep_alive(id).await
            })
            .await;
        self.held = reopened.ok().map(|(keeper, responses)| Held {
            id,
            keeper,
            responses,
        });
        Err(error)
    }

    /// Revokes the lease (every key written with it goes at once); without etcd it expires on
    /// its own. True when revoked.
    pub async fn revoke(mut self) -> bool {
        let Some(held) = self.held.take() else {
            return false;
        };
        let id = held.id;
        match self
            .etcd
            .call(&self.context("revoking"), |mut client| async move {
                client.lease_revoke(id).await
            })
            .await
        {
            Ok(_) => true,
            Err(error) => {
                debug!(%error, what = self.what, "lease not revoked; it expires on its own");
                false
            }
        }
    }

    fn context(&self, action: &str) -> String {
        format!("{action} the {} lease", self.what)
    }
}
