//! Records a node keeps in etcd for as long as it lives: a set of keys (its registered
//! instances, its pods' identities, ...) written under one [`NodeLease`] of the node. A record
//! is written when it appears or changes and deleted when it goes; a stopping agent revokes
//! the lease (every record goes at once), a dead one lets it expire (every record goes within
//! the TTL). While etcd is away the writer keeps retrying; a lease that expired meanwhile is
//! granted again and every live record rewritten.
//!
//! What the records are comes from a [`RecordSource`]; this module only keeps etcd equal to it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use etcd_client::PutOptions;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    etcd::{Etcd, EtcdError},
    lease::NodeLease,
};

/// How soon a failed write is tried again.
const RETRY: Duration = Duration::from_millis(500);

/// Where a set of records comes from.
pub trait RecordSource: Send + Sync + std::fmt::Debug {
    /// The records as they should be in etcd now: full key (under `prefix`) -> value. An error
    /// (a record that cannot be encoded) is retried later.
    fn records(&self, prefix: &str) -> Result<BTreeMap<String, Vec<u8>>, String>;

    /// Changes whenever [`records`](Self::records) may have changed; closed when the source
    /// is gone.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

/// Keeps one source's records in etcd under a lease. See the module documentation.
#[derive(Debug)]
pub struct LeasedRecords {
    etcd: Etcd,
    source: Arc<dyn RecordSource>,
    lease: NodeLease,
    /// What the records are, for logs (`"instance"`, `"pod identity"`).
    what: &'static str,
}

impl LeasedRecords {
    /// Records of `source`, `what` they are (for logs), under a lease of `ttl`.
    pub fn new(
        etcd: Etcd,
        source: Arc<dyn RecordSource>,
        ttl: Duration,
        what: &'static str,
    ) -> Self {
        LeasedRecords {
            lease: NodeLease::new(etcd.clone(), ttl, what),
            etcd,
            source,
            what,
        }
    }

    /// Publishes until `shutdown` (or until the source is gone), then revokes the lease.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.source.subscribe();
        let mut renew = tokio::time::interval(self.lease.renew_interval());
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut published: HashMap<String, Vec<u8>> = HashMap::new();
        let mut dirty = true;
        let mut failing = false;
        loop {
            let retry = tokio::time::sleep(if dirty {
                RETRY
            } else {
                Duration::from_secs(3600)
            });
            tokio::select! {
                _ = renew.tick() => {
                    let before = self.lease.id();
                    match self.lease.renew().await {
                        Ok(true) => {}
                        Ok(false) => {
                            info!(what = self.what, "writing the records again under a new lease");
                            published.clear();
                            dirty = true;
                        }
                        Err(error) => {
                            debug!(%error, what = self.what, "lease not renewed; retrying");
                            if self.lease.id() != before {
                                published.clear();
                            }
                            dirty = true;
                        }
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    dirty = true;
                }
                _ = retry, if dirty => {}
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
            }
            if !dirty {
                continue;
            }
            match self.reconcile(&mut published).await {
                Ok(()) => {
                    if failing {
                        info!(what = self.what, "records written to etcd again");
                    }
                    dirty = false;
                    failing = false;
                }
                Err(error) => {
                    if !failing {
                        warn!(%error, what = self.what, "cannot write records to etcd; retrying");
                    }
                    failing = true;
                }
            }
        }
        let what = self.what;
        if self.lease.revoke().await {
            info!(what, "records removed from etcd");
        }
    }

    /// Makes etcd hold exactly the source's records (as far as this node wrote them).
    async fn reconcile(
        &mut self,
        published: &mut HashMap<String, Vec<u8>>,
    ) -> Result<(), EtcdError> {
        let desired =
            self.source
                .records(self.etcd.prefix())
                .map_err(|cause| EtcdError::Failed {
                    endpoints: String::new(),
                    what: format!("encoding the {} records", self.what),
                    cause,
                })?;
        if self.lease.id().is_none() && !desired.is_empty() {
            self.lease.ensure().await?;
        }
        let Some(id) = self.lease.id() else {
            published.clear();
            return Ok(());
        };
        for (key, value) in &desired {
            if published.get(key) == Some(value) {
                continue;
            }
            let (put_key, put_value) = (key.clone(), value.clone());
            self.etcd
                .call(
                    &format!("writing a {} record", self.what),
                    |mut client| async move {
                        client
                            .put(put_key, put_value, Some(PutOptions::new().with_lease(id)))
                            .await
                    },
                )
                .await?;
            published.insert(key.clone(), value.clone());
            debug!(%key, what = self.what, "record written");
        }
        let gone: Vec<String> = published
            .keys()
            .filter(|key| !desired.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            let delete_key = key.clone();
            self.etcd
                .call(
                    &format!("deleting a {} record", self.what),
                    |mut client| async move { client.delete(delete_key, None).await },
                )
                .await?;
            published.remove(&key);
            debug!(%key, what = self.what, "record deleted");
        }
        Ok(())
    }
}
