//! etcd mode: this node's instance records in etcd, under
//! `<prefix>/agentinstances/<namespace>/<agent>.<node>.<id>`, all attached to one lease of the
//! node (`spec.registration.leaseTtl`), renewed every third of its TTL. A record is written
//! when an instance registers or its health changes, deleted when it goes; a stopping agent
//! revokes the lease (every record goes at once), a dead one lets it expire (every record goes
//! within the TTL). The writing is [`LeasedRecords`]'; this module says what the records are.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    control::{
        Etcd, codec, keys,
        records::{LeasedRecords, RecordSource},
    },
    policy::Resource,
};

use super::LocalRegistry;

impl RecordSource for LocalRegistry {
    fn records(&self, prefix: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
        let mut records = BTreeMap::new();
        for record in LocalRegistry::records(self) {
            let resource = Resource::AgentInstance(record);
            let key = keys::resource_key(prefix, &resource.key());
            let value = codec::encode(&resource).map_err(|error| error.to_string())?;
            records.insert(key, value);
        }
        Ok(records)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        LocalRegistry::subscribe(self)
    }
}

/// The writer of this node's instance records.
pub fn instance_publisher(
    etcd: Etcd,
    registry: Arc<LocalRegistry>,
    ttl: Duration,
) -> LeasedRecords {
    LeasedRecords::new(etcd, registry, ttl, "instance")
}
