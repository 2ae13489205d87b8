//! etcd mode: this node's instance records in etcd, under
//! `<prefix>/agentinstances/<namespace>/<agent>.<node>.<id>`, all attached to one lease of the
//! node (`spec.registration.leaseTtl`), renewed every third of its TTL. A record is written
//! when an instance registers or its health changes, deleted when it goes; a stopping agent
//! revokes the lease (every record goes at once), a dead one lets it expire (every record goes
//! within the TTL). While etcd is away the publisher keeps retrying; a lease that expired
//! meanwhile is granted again and every live record rewritten.

use std::{collections::HashMap, sync::Arc, time::Duration};

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    control::{Etcd, EtcdError, codec, keys},
    policy::Resource,
};

use super::LocalRegistry;

/// How soon a failed write is tried again.
const RETRY: Duration = Duration::from_millis(500);

/// Keeps this node's instance records in etcd.
#[derive(Debug)]
pub struct InstancePublisher {
    etcd: Etcd,
    registry: Arc<LocalRegistry>,
    ttl: Duration,
}

struct Lease {
    id: i64,
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
}

impl InstancePublisher {
    pub fn new(etcd: Etcd, registry: Arc<LocalRegistry>, ttl: Duration) -> Self {
        InstancePublisher {
            etcd,
            registry,
            ttl: ttl.max(Duration::from_secs(2)),
        }
    }

    /// Publishes until `shutdown`, then revokes the lease.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.registry.subscribe();
        let mut renew = tokio::time::interval(self.ttl / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lease: Option<Lease> = None;
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
                    if let Some(current) = lease.as_mut() {
                        match self.renew(current).await {
                            Ok(true) => {}
                            Ok(false) => {
                                info!("instance lease expired; registering the instances again");
                                lease = None;
                                published.clear();
                                dirty = true;
                            }
                            Err(error) => {
                                debug!(%error, "instance lease not renewed; retrying");
                                lease = self.reopen(current.id).await;
                                if lease.is_none() {
                                    published.clear();
                                }
                                dirty = true;
                            }
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
            match self.reconcile(&mut lease, &mut published).await {
                Ok(()) => {
                    if failing {
                        info!("instance records written to etcd again");
                    }
                    dirty = false;
                    failing = false;
                }
                Err(error) => {
                    if !failing {
                        warn!(%error, "cannot write instance records to etcd; retrying");
                    }
                    failing = true;
                }
            }
        }
        if let Some(current) = lease {
            let id = current.id;
            match self
                .etcd
                .call("revoking the instance lease", |mut client| async move {
                    client.lease_revoke(id).await
                })
                .await
            {
                Ok(_) => info!("instance records removed from etcd"),
                Err(error) => debug!(%error, "instance lease not revoked; it expires on its own"),
            }
        }
    }

    /// Makes etcd hold exactly the registry's records (as far as this node wrote them).
    async fn reconcile(
        &self,
        lease: &mut Option<Lease>,
        published: &mut HashMap<String, Vec<u8>>,
    ) -> Result<(), EtcdError> {
        let mut desired = HashMap::new();
        for record in self.registry.records() {
            let resource = Resource::AgentInstance(record);
            let key = keys::resource_key(self.etcd.prefix(), &resource.key());
            let value = codec::encode(&resource).map_err(|error| EtcdError::Failed {
                endpoints: String::new(),
                what: "encoding an instance record".to_owned(),
                cause: error.to_string(),
            })?;
            desired.insert(key, value);
        }
        if lease.is_none() && !desired.is_empty() {
            *lease = Some(self.grant().await?);
        }
        let Some(current) = lease.as_ref() else {
            published.clear();
            return Ok(());
        };
        for (key, value) in &desired {
            if published.get(key) == Some(value) {
                continue;
            }
            let (put_key, put_value, id) = (key.clone(), value.clone(), current.id);
            self.etcd
                .call("writing an instance record", |mut client| async move {
                    client
                        .put(put_key, put_value, Some(PutOptions::new().with_lease(id)))
                        .await
                })
                .await?;
            published.insert(key.clone(), value.clone());
            debug!(%key, "instance record written");
        }
        let gone: Vec<String> = published
            .keys()
            .filter(|key| !desired.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            let delete_key = key.clone();
            self.etcd
                .call("deleting an instance record", |mut client| async move {
                    client.delete(delete_key, None).await
                })
                .await?;
            published.remove(&key);
            debug!(%key, "instance record deleted");
        }
        Ok(())
    }

    async fn grant(&self) -> Result<Lease, EtcdError> {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let granted = self
            .etcd
            .call("granting the instance lease", |mut client| async move {
                client.lease_grant(ttl, None).await
            })
            .await?;
        let id = granted.id();
        let (keeper, responses) = self
            .etcd
            .call(
                "keeping the instance lease alive",
                |mut client| async move { client.lease_keep_alive(id).await },
            )
            .await?;
        info!(lease = id, ttl_seconds = ttl, "instance lease granted");
        Ok(Lease {
            id,
            keeper,
            responses,
        })
    }

    /// Renews once; `Ok(false)` when etcd says the lease expired.
    async fn renew(&self, lease: &mut Lease) -> Result<bool, EtcdError> {
        let timeout = self.etcd.settings().request_timeout;
        let renewed = tokio::time::timeout(timeout, async {
            lease.keeper.keep_alive().await?;
            lease.responses.message().await
        })
        .await;
        let unreachable = |cause: String| EtcdError::Unreachable {
            endpoints: self.etcd.settings().endpoints.join(","),
            what: "keeping the instance lease alive".to_owned(),
            cause,
        };
        match renewed {
            Ok(Ok(Some(response))) => Ok(response.ttl() > 0),
            Ok(Ok(None)) => Err(unreachable("the keep-alive stream ended".to_owned())),
            Ok(Err(error)) => Err(self.etcd.error("keeping the instance lease alive", error)),
            Err(_) => Err(unreachable(format!("no answer within {timeout:?}"))),
        }
    }

    async fn reopen(&self, id: i64) -> Option<Lease> {
        self.etcd
            .call(
                "keeping the instance lease alive",
                |mut client| async move { client.lease_keep_alive(id).await },
            )
            .await
            .ok()
            .map(|(keeper, responses)| Lease {
                id,
                keeper,
                responses,
            })
    }
}
