//! The agent's side of the control plane: resources from etcd into the policy store.
//!
//! # Protocol
//!
//! 1. **List** the synced kinds (`agents`, `accesspolicies`, `trafficpolicies`,
//!    `agentinstances`) in one
//!    transaction, so the listing is one consistent revision `R`.
//! 2. **Watch** each kind's prefix on one watch stream from `R + 1` with progress
//!    notifications; ask for progress every `progress_interval` as a liveness probe (a stream
//!    silent for two intervals is treated as dead).
//! 3. **Debounce**: a change after a quiet period is applied at once (one write of `meshctl
//!    apply` is one revision, delivered in one watch response, so one file lands whole); changes
//!    within `debounce` of the last swap wait for the window to end and become one snapshot
//!    swap, so a burst of writes costs at most one compile per window.
//! 4. **Compaction** (the watch is cancelled with a compact revision): list again.
//! 5. **etcd away** (a request or the stream fails): mark disconnected, keep the active
//!    snapshot, retry with exponential backoff and jitter (200 ms doubling to 30 s), and list
//!    again on reconnection: keys deleted while away disappear, nothing is missed.
//!
//! # Invalid values: per-resource keep-last-good
//!
//! Every value is decoded and validated again on read ([`super::codec::decode`]). An invalid
//! value is logged, counted (`mesh_control_rejected_updates_total`, and
//! `mesh_control_invalid_resources` while it stays) and never replaces the last good version of
//! that key, which stays in force; a key that never had a good version is left out. Unlike the
//! policy folder (all-or-nothing), one bad key written past `meshctl` (which validates) does
//! not freeze every other update of the cluster, and a `Deny` policy that was once valid is
//! never dropped because of a bad edit. Cross-resource problems (two agents claiming one host)
//! reject the whole set: the store keeps its snapshot, as in folder mode. Deletions always
//! apply.
//!
//! # Last known good on disk
//!
//! After every snapshot built from etcd, its resources are written to the cache file
//! ([`super::cache`]). At start, when etcd cannot be listed within the dial timeout, the agent
//! serves the cache and keeps trying; with neither, it fails closed (every request denied)
//! until etcd answers.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use etcd_client::{EventType, WatchOptions, WatchStream};
use rand::Rng;
use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

use crate::policy::{Action, PolicyStore, Resource};

use super::{
    cache::{self, CachedResource},
    codec,
    etcd::{Etcd, EtcdError, Listing},
    keys,
};

/// How the agent syncs.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Last-known-good cache file; `None` to keep none.
    pub cache_file: Option<PathBuf>,
    /// Events are gathered this long before one snapshot swap.
    pub debounce: Duration,
    /// Action for destinations no `Allow` policy targets (`spec.policy.defaultAction`).
    pub default_action: Action,
    /// How often the watch stream is asked for progress (liveness and revision).
    pub progress_interval: Duration,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            cache_file: None,
            debounce: Duration::from_millis(100),
            default_action: Action::Allow,
            progress_interval: Duration::from_secs(30),
        }
    }
}

/// The control plane's state for metrics and the node record. Share it in an `Arc`.
#[derive(Debug, Default)]
pub struct ControlStatus {
    connected: AtomicBool,
    serving_cache: AtomicBool,
    revision: AtomicI64,
    /// Revision of the resources the active snapshot was built from (what is enforced).
    snapshot_revision: AtomicI64,
    /// Wall-clock time (ms since the epoch) the resources were last known to match etcd.
    synced_at_ms: AtomicU64,
    invalid_resources: AtomicU64,
    rejected_updates: AtomicU64,
    snapshots: AtomicU64,
    relists: AtomicU64,
    connection_failures: AtomicU64,
}

/// A copy of [`ControlStatus`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ControlStatusSample {
    pub connected: bool,
    pub serving_cache: bool,
    pub revision: i64,
    /// Revision of the resources the active snapshot was built from.
    pub snapshot_revision: i64,
    /// Seconds since the resources were last known to match etcd; `None` before the first
    /// list (or cache).
    pub snapshot_age_seconds: Option<f64>,
    pub invalid_resources: u64,
    pub rejected_updates: u64,
    pub snapshots: u64,
    pub relists: u64,
    pub connection_failures: u64,
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

impl ControlStatus {
    /// The current values.
    pub fn sample(&self) -> ControlStatusSample {
        let synced = self.synced_at_ms.load(Ordering::Relaxed);
        let now = unix_ms(SystemTime::now());
        ControlStatusSample {
            connected: self.connected.load(Ordering::Relaxed),
            serving_cache: self.serving_cache.load(Ordering::Relaxed),
            revision: self.revision.load(Ordering::Relaxed),
            snapshot_revision: self.snapshot_revision.load(Ordering::Relaxed),
            snapshot_age_seconds: (synced != 0).then(|| now.saturating_sub(synced) as f64 / 1000.0),
            invalid_resources: self.invalid_resources.load(Ordering::Relaxed),
            rejected_updates: self.rejected_updates.load(Ordering::Relaxed),
            snapshots: self.snapshots.load(Ordering::Relaxed),
            relists: self.relists.load(Ordering::Relaxed),
            connection_failures: self.connection_failures.load(Ordering::Relaxed),
        }
    }

    fn synced_now(&self, revision: i64) {
        self.synced_at_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
        self.revision.fetch_max(revision, Ordering::Relaxed);
    }
}

/// One change seen on a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put {
        key: String,
        value: Vec<u8>,
        mod_revision: i64,
    },
    Delete {
        key: String,
        mod_revision: i64,
    },
}

#[derive(Debug, Clone)]
struct Good {
    mod_revision: i64,
    resource: Resource,
}

/// The resources as far as the agent knows etcd, with the last good version of each key.
/// Pure (no I/O): the sync loop feeds it listings and watch events.
#[derive(Debug, Clone)]
pub struct SyncState {
    prefix: String,
    /// Every key present in etcd and the revision of its current value.
    present: BTreeMap<String, i64>,
    /// Last good version per key (may be older than the current value).
    good: BTreeMap<String, Good>,
    /// Keys whose current value is invalid: its revision and problems.
    invalid: BTreeMap<String, (i64, Vec<String>)>,
    /// Deleted keys and the revision of the deletion (ignores stale replays).
    deleted: HashMap<String, i64>,
    revision: i64,
}

impl SyncState {
    /// An empty state for keys under `prefix`.
    pub fn new(prefix: &str) -> Self {
        SyncState {
            prefix: prefix.to_owned(),
            present: BTreeMap::new(),
            good: BTreeMap::new(),
            invalid: BTreeMap::new(),
            deleted: HashMap::new(),
            revision: 0,
        }
    }

    /// Starts from a cached set (etcd unreachable at start): these are the last good values.
    pub fn seed(&mut self, revision: i64, resources: Vec<CachedResource>) {
        self.present.clear();
        self.invalid.clear();
        self.deleted.clear();
        self.good = resources
            .into_iter()
            .map(|cached| {
                self.present.insert(cached.key.clone(), cached.mod_revision);
                (
                    cached.key,
                    Good {
                        mod_revision: cached.mod_revision,
                        resource: cached.resource,
                    },
                )
            })
            .collect();
        self.revision = revision;
    }

    /// Replaces the state with a full listing. Keys absent from it are gone; a key whose listed
    /// value is invalid keeps its last good version. Returns the problems of values not
    /// reported before.
    pub fn reset(&mut self, listing: Listing) -> Vec<String> {
        let mut problems = Vec::new();
        let previous_invalid = std::mem::take(&mut self.invalid);
        let mut good = BTreeMap::new();
        self.present.clear();
        self.deleted.clear();
        for entry in listing.entries {
            self.present.insert(entry.key.clone(), entry.mod_revision);
            match codec::decode(&self.prefix, &entry.key, &entry.value) {
                Ok(resource) => {
                    good.insert(
                        entry.key,
                        Good {
                            mod_revision: entry.mod_revision,
                            resource,
                        },
                    );
                }
                Err(errors) => {
                    let known = previous_invalid
                        .get(&entry.key)
                        .is_some_and(|(revision, _)| *revision == entry.mod_revision);
                    if !known {
                        problems.extend(errors.iter().cloned());
                    }
                    if let Some(last) = self.good.remove(&entry.key) {
                        good.insert(entry.key.clone(), last);
                    }
                    self.invalid.insert(entry.key, (entry.mod_revision, errors));
                }
            }
        }
        self.good = good;
        self.revision = listing.revision;
        problems
    }

    /// Applies one watch event. Returns whether the desired set may have changed, and the
    /// problems of a newly rejected value.
    pub fn apply(&mut self, change: Change) -> (bool, Vec<String>) {
        match change {
            Change::Put {
                key,
                value,
                mod_revision,
            } => {
                let stale = self
                    .present
                    .get(&key)
                    .is_some_and(|current| *current >= mod_revision)
                    || self
                        .deleted
                        .get(&key)
                        .is_some_and(|deleted| *deleted >= mod_revision);
                if stale {
                    return (false, Vec::new());
                }
                self.revision = self.revision.max(mod_revision);
                self.deleted.remove(&key);
                self.present.insert(key.clone(), mod_revision);
                match codec::decode(&self.prefix, &key, &value) {
                    Ok(resource) => {
                        self.invalid.remove(&key);
                        self.good.insert(
                            key,
                            Good {
                                mod_revision,
                                resource,
                            },
                        );
                        (true, Vec::new())
                    }
                    Err(errors) => {
                        self.invalid.insert(key, (mod_revision, errors.clone()));
                        (false, errors)
                    }
                }
            }
            Change::Delete { key, mod_revision } => {
                if self
                    .present
                    .get(&key)
                    .is_some_and(|current| *current > mod_revision)
                {
                    return (false, Vec::new());
                }
                self.revision = self.revision.max(mod_revision);
                self.present.remove(&key);
                self.invalid.remove(&key);
                self.deleted.insert(key.clone(), mod_revision);
                (self.good.remove(&key).is_some(), Vec::new())
            }
        }
    }

    /// The resources in force: the last good version of every present key, in key order.
    pub fn desired(&self) -> Vec<Resource> {
        self.good
            .values()
            .map(|good| good.resource.clone())
            .collect()
    }

    /// The resources in force with their keys, for the cache.
    pub fn cache_entries(&self) -> Vec<CachedResource> {
        self.good
            .iter()
            .map(|(key, good)| CachedResource {
                key: key.clone(),
                mod_revision: good.mod_revision,
                resource: good.resource.clone(),
            })
            .collect()
    }

    /// Keys whose current value is invalid.
    pub fn invalid_count(&self) -> usize {
        self.invalid.len()
    }

    /// Highest revision seen.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Raises the revision after a progress notification.
    pub fn observe_revision(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
    }
}

/// Exponential backoff with jitter: `base` doubling up to `cap`, each delay drawn uniformly
/// from its upper half (so a fleet of agents does not reconnect in step).
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Where the first snapshot came from.
#[derive(Debug, Clone, PartialEq)]
pub enum InitialSource {
    /// Listed from etcd at this revision.
    Etcd { revision: i64, resources: usize },
    /// etcd was unreachable: the cache file, saved `age` ago at `revision`.
    Cache {
        revision: i64,
        resources: usize,
        age: Duration,
    },
    /// Neither: the store serves what it was created with (fail closed in the agent).
    Nothing { reason: String },
}

enum SessionEnd {
    Shutdown,
    Compacted(i64),
    Failed(String),
}

/// Keeps a [`PolicyStore`] in step with etcd. See the module documentation.
#[derive(Debug)]
pub struct Syncer {
    etcd: Etcd,
    options: SyncOptions,
    store: Arc<PolicyStore>,
    status: Arc<ControlStatus>,
    state: SyncState,
    /// The state was just listed: the first session may watch without listing again.
    fresh: bool,
    cached_hash: Option<u64>,
    /// When the last snapshot was installed from etcd (the debounce window runs from it).
    last_install: Option<Instant>,
}

impl Syncer {
    pub fn new(
        etcd: Etcd,
        options: SyncOptions,
        store: Arc<PolicyStore>,
        status: Arc<ControlStatus>,
    ) -> Self {
        let state = SyncState::new(etcd.prefix());
        Syncer {
            etcd,
            options,
            store,
            status,
            state,
            fresh: false,
            cached_hash: None,
            last_install: None,
        }
    }

    /// The status this syncer updates.
    pub fn status(&self) -> Arc<ControlStatus> {
        Arc::clone(&self.status)
    }

    /// Lists etcd once (bounded by the client's timeouts); if that fails, installs the cache
    /// file. Never fails: the sync loop keeps trying afterwards.
    pub async fn initial_load(&mut self) -> InitialSource {
        let etcd_problem = match self.etcd.list_kinds(&keys::SYNCED_KINDS).await {
            Ok(listing) => {
                self.status.relists.fetch_add(1, Ordering::Relaxed);
                let revision = listing.revision;
                self.reset(listing);
                self.status.connected.store(true, Ordering::Relaxed);
                self.status.synced_now(revision);
                self.fresh = true;
                match self.install().await {
                    Ok(resources) => {
                        return InitialSource::Etcd {
                            revision,
                            resources,
                        };
                    }
                    Err(errors) => format!(
                        "the resources in etcd do not compile: {}",
                        errors.join("; ")
                    ),
                }
            }
            Err(error) => {
                self.status
                    .connection_failures
                    .fetch_add(1, Ordering::Relaxed);
                error.to_string()
            }
        };
        let Some(path) = self.options.cache_file.clone() else {
            return InitialSource::Nothing {
                reason: format!("{etcd_problem}; no cache file is configured"),
            };
        };
        let prefix = self.etcd.prefix().to_owned();
        let cache_path = path.clone();
        let read = tokio::task::spawn_blocking(move || cache::read(&cache_path, &prefix)).await;
        let cached = match read {
            Ok(Ok(Some(cached))) => cached,
            Ok(Ok(None)) => {
                return InitialSource::Nothing {
                    reason: format!("{etcd_problem}; no cache file at {} yet", path.display()),
                };
            }
            Ok(Err(error)) => {
                return InitialSource::Nothing {
                    reason: format!("{etcd_problem}; {error}"),
                };
            }
            Err(error) => {
                return InitialSource::Nothing {
                    reason: format!("{etcd_problem}; reading the cache failed: {error}"),
                };
            }
        };
        let age = SystemTime::now()
            .duration_since(cached.saved_at)
            .unwrap_or_default();
        let revision = cached.revision;
        let resources: Vec<Resource> = cached
            .resources
            .iter()
            .map(|cached| cached.resource.clone())
            .collect();
        match self.store.install(
            &format!("etcd cache {}", path.display()),
            &resources,
            self.options.default_action,
        ) {
            Ok(_) => {
                if !self.fresh {
                    self.state.seed(revision, cached.resources);
                }
                self.status.serving_cache.store(true, Ordering::Relaxed);
                self.status.revision.store(revision, Ordering::Relaxed);
                self.status
                    .synced_at_ms
                    .store(unix_ms(cached.saved_at), Ordering::Relaxed);
                InitialSource::Cache {
                    revision,
                    resources: resources.len(),
                    age,
                }
            }
            Err(errors) => InitialSource::Nothing {
                reason: format!(
                    "{etcd_problem}; the cache file {} does not compile: {}",
                    path.display(),
                    errors.join("; ")
                ),
            },
        }
    }

    /// Syncs until `shutdown` turns true (or its sender is dropped).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut need_list = !self.fresh;
        let mut outage_logged = false;
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            match self
                .session(&mut need_list, &mut backoff, &mut shutdown)
                .await
            {
                SessionEnd::Shutdown => break,
                SessionEnd::Compacted(compacted) => {
                    info!(
                        compact_revision = compacted,
                        revision = self.state.revision(),
                        "etcd compacted past the watched revision; listing again"
                    );
                    need_list = true;
                }
                SessionEnd::Failed(problem) => {
                    self.status.connected.store(false, Ordering::Relaxed);
                    self.status
                        .connection_failures
                        .fetch_add(1, Ordering::Relaxed);
                    need_list = true;
                    let delay = backoff.next_delay();
                    if outage_logged {
                        debug!(%problem, ?delay, "etcd still unreachable");
                    } else {
                        outage_logged = true;
                        warn!(
                            %problem, ?delay,
                            revision = self.state.revision(),
                            "lost etcd; serving the last good snapshot and retrying"
                        );
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => {}
                    }
                    continue;
                }
            }
            outage_logged = false;
        }
        self.status.connected.store(false, Ordering::Relaxed);
        info!("stopped syncing from etcd");
    }

    async fn session(
        &mut self,
        need_list: &mut bool,
        backoff: &mut Backoff,
        shutdown: &mut watch::Receiver<bool>,
    ) -> SessionEnd {
        if *need_list {
            let listing = match self.etcd.list_kinds(&keys::SYNCED_KINDS).await {
                Ok(listing) => listing,
                Err(error) => return SessionEnd::Failed(error.to_string()),
            };
            self.status.relists.fetch_add(1, Ordering::Relaxed);
            let revision = listing.revision;
            let was_connected = self.status.connected.swap(true, Ordering::Relaxed);
            self.reset(listing);
            self.status.synced_now(revision);
            let _ = self.install().await;
            if !was_connected {
                info!(revision, "connected to etcd; resources listed");
            }
            *need_list = false;
        }
        let mut stream = match self.open_watch().await {
            Ok(stream) => stream,
            Err(error) => return SessionEnd::Failed(error.to_string()),
        };
        self.status.connected.store(true, Ordering::Relaxed);
        backoff.reset();

        let progress_interval = self
            .options
            .progress_interval
            .max(Duration::from_millis(100));
        let mut progress =
            tokio::time::interval_at(Instant::now() + progress_interval, progress_interval);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_message = Instant::now();
        let mut pending: Option<Instant> = None;
        loop {
            let flush_at = pending.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                message = stream.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => {
                            return self.end(pending, SessionEnd::Failed("etcd closed the watch stream".to_owned())).await;
                        }
                        Err(error) => {
                            let error = self.etcd.error("watching", error);
                            return self.end(pending, SessionEnd::Failed(error.to_string())).await;
                        }
                    };
                    last_message = Instant::now();
                    if response.canceled() {
                        let end = if response.compact_revision() > 0 {
                            SessionEnd::Compacted(response.compact_revision())
                        } else {
                            SessionEnd::Failed(format!(
                                "etcd cancelled the watch: {}",
                                response.cancel_reason()
                            ))
                        };
                        return self.end(pending, end).await;
                    }
                    let header_revision = response.header().map_or(0, |header| header.revision());
                    if response.created() {
                        continue;
                    }
                    if response.events().is_empty() {
                        // A progress notification: everything up to the header's revision
                        // has been delivered.
                        self.state.observe_revision(header_revision);
                        self.status.synced_now(self.state.revision());
                        continue;
                    }
                    let mut changed = false;
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let Ok(key) = kv.key_str() else { continue };
                        let change = match event.event_type() {
                            EventType::Put => Change::Put {
                                key: key.to_owned(),
                                value: kv.value().to_vec(),
                                mod_revision: kv.mod_revision(),
                            },
                            EventType::Delete => Change::Delete {
                                key: key.to_owned(),
                                mod_revision: kv.mod_revision(),
                            },
                        };
                        let (dirty, problems) = self.state.apply(change);
                        changed |= dirty;
                        self.reject_values(&problems);
                    }
                    self.status
                        .invalid_resources
                        .store(self.state.invalid_count() as u64, Ordering::Relaxed);
                    self.status.synced_now(self.state.revision());
                    if changed && pending.is_none() {
                        let now = Instant::now();
                        pending = Some(match self.last_install {
                            Some(last) if now < last + self.options.debounce => {
                                last + self.options.debounce
                            }
                            _ => now,
                        });
                    }
                }
                _ = tokio::time::sleep_until(flush_at), if pending.is_some() => {
                    pending = None;
                    let _ = self.install().await;
                }
                _ = progress.tick() => {
                    if last_message.elapsed() > progress_interval * 2 + self.etcd.settings().request_timeout {
                        return self.end(pending, SessionEnd::Failed(format!(
                            "the watch stream has been silent for {:?}",
                            last_message.elapsed()
                        ))).await;
                    }
                    if let Err(error) = stream.request_progress().await {
                        let error = self.etcd.error("asking for watch progress", error);
                        return self.end(pending, SessionEnd::Failed(error.to_string())).await;
                    }
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return self.end(pending, SessionEnd::Shutdown).await;
                    }
                }
            }
        }
    }

    /// Applies what is pending before leaving a session: events received are real changes.
    async fn end(&mut self, pending: Option<Instant>, end: SessionEnd) -> SessionEnd {
        if pending.is_some() {
            let _ = self.install().await;
        }
        end
    }

    async fn open_watch(&self) -> Result<WatchStream, EtcdError> {
        let start = self.state.revision() + 1;
        let options = || {
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(start)
                .with_progress_notify()
        };
        let prefixes: Vec<String> = keys::SYNCED_KINDS
            .iter()
            .map(|kind| keys::kind_prefix(self.etcd.prefix(), *kind))
            .collect();
        let first = prefixes.first().cloned().unwrap_or_default();
        let mut stream = self
            .etcd
            .call("watching", |mut client| async move {
                client.watch(first, Some(options())).await
            })
            .await?;
        for prefix in prefixes.into_iter().skip(1) {
            stream
                .watch(prefix, Some(options()))
                .await
                .map_err(|error| self.etcd.error("watching", error))?;
        }
        debug!(start_revision = start, "watching etcd");
        Ok(stream)
    }

    fn reset(&mut self, listing: Listing) {
        let problems = self.state.reset(listing);
        self.reject_values(&problems);
        self.status
            .invalid_resources
            .store(self.state.invalid_count() as u64, Ordering::Relaxed);
    }

    fn reject_values(&self, problems: &[String]) {
        for problem in problems {
            warn!("resource in etcd rejected (its last good version stays in force): {problem}");
        }
        if !problems.is_empty() {
            self.status.rejected_updates.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Compiles the desired set into the store and, when it changed, writes the cache.
    async fn install(&mut self) -> Result<usize, Vec<String>> {
        let resources = self.state.desired();
        let snapshot = match self
            .store
            .install("etcd", &resources, self.options.default_action)
        {
            Ok(snapshot) => snapshot,
            Err(errors) => {
                self.status.rejected_updates.fetch_add(1, Ordering::Relaxed);
                return Err(errors);
            }
        };
        self.status.snapshots.fetch_add(1, Ordering::Relaxed);
        self.last_install = Some(Instant::now());
        self.status
            .snapshot_revision
            .fetch_max(self.state.revision(), Ordering::Relaxed);
        self.status.serving_cache.store(false, Ordering::Relaxed);
        debug!(
            revision = self.state.revision(),
            resources = resources.len(),
            "snapshot built from etcd"
        );
        if let Some(path) = self.options.cache_file.clone()
            && self.cached_hash != Some(snapshot.content_hash())
        {
            let prefix = self.etcd.prefix().to_owned();
            let revision = self.state.revision();
            let hash = snapshot.content_hash();
            let entries = self.state.cache_entries();
            let written = tokio::task::spawn_blocking(move || {
                cache::write(&path, &prefix, revision, hash, &entries)
            })
            .await;
            match written {
                Ok(Ok(())) => self.cached_hash = Some(hash),
                Ok(Err(error)) => warn!(%error, "cannot save the last good resources"),
                Err(error) => warn!(%error, "saving the last good resources failed"),
            }
        }
        Ok(resources.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::etcd::RawEntry;

    const PREFIX: &str = keys::DEFAULT_PREFIX;

    fn agent_json(name: &str, port: u16) -> Vec<u8> {
        format!(
            r#"{{"apiVersion":"mesh.agentmesh.dev/v1alpha1","kind":"Agent","metadata":{{"name":"{name}"}},"spec":{{"endpoints":[{{"address":"10.0.0.1:{port}"}}]}}}}"#
        )
        .into_bytes()
    }

    fn key(name: &str) -> String {
        format!("{PREFIX}/agents/default/{name}")
    }

    fn put(name: &str, port: u16, mod_revision: i64) -> Change {
        Change::Put {
            key: key(name),
            value: agent_json(name, port),
            mod_revision,
        }
    }

    fn ports(state: &SyncState) -> Vec<(String, u16)> {
        state
            .desired()
            .into_iter()
            .map(|resource| match resource {
                Resource::Agent(agent) => (
                    agent.metadata.name.clone(),
                    agent.spec.endpoints[0].address.port(),
                ),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn listing(revision: i64, entries: &[(&str, Vec<u8>, i64)]) -> Listing {
        Listing {
            revision,
            entries: entries
                .iter()
                .map(|(name, value, mod_revision)| RawEntry {
                    key: key(name),
                    value: value.clone(),
                    mod_revision: *mod_revision,
                    lease: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn events_update_the_desired_set() {
        let mut state = SyncState::new(PREFIX);
        assert!(
            state
                .reset(listing(5, &[("a", agent_json("a", 80), 3)]))
                .is_empty()
        );
        assert_eq!(ports(&state), [("a".to_owned(), 80)]);
        assert_eq!(state.apply(put("b", 81, 6)), (true, vec![]));
        assert_eq!(state.apply(put("a", 82, 7)), (true, vec![]));
        assert_eq!(ports(&state), [("a".to_owned(), 82), ("b".to_owned(), 81)]);
        let (changed, _) = state.apply(Change::Delete {
            key: key("b"),
            mod_revision: 8,
        });
        assert!(changed);
        assert_eq!(ports(&state), [("a".to_owned(), 82)]);
        assert_eq!(state.revision(), 8);
    }

    #[test]
    fn replayed_events_are_ignored() {
        let mut state = SyncState::new(PREFIX);
        state.apply(put("a", 80, 5));
        state.apply(Change::Delete {
            key: key("a"),
            mod_revision: 6,
        });
        // A replay of the put (older than the deletion) does not bring it back.
        assert_eq!(state.apply(put("a", 80, 5)), (false, vec![]));
        assert!(state.desired().is_empty());
        // A newer put does.
        assert_eq!(state.apply(put("a", 81, 9)), (true, vec![]));
        // An older put for a present key is ignored.
        assert_eq!(state.apply(put("a", 70, 8)), (false, vec![]));
        assert_eq!(ports(&state), [("a".to_owned(), 81)]);
    }

    #[test]
    fn an_invalid_value_keeps_the_last_good_version() {
        let mut state = SyncState::new(PREFIX);
        state.apply(put("a", 80, 5));
        let bad = Change::Put {
            key: key("a"),
            value: agent_json("a", 0),
            mod_revision: 6,
        };
        let (changed, problems) = state.apply(bad);
        assert!(!changed);
        assert!(
            problems[0].contains("spec.endpoints[0].address"),
            "{problems:?}"
        );
        assert_eq!(ports(&state), [("a".to_owned(), 80)]);
        assert_eq!(state.invalid_count(), 1);
        // A key that never had a good version stays out.
        let (changed, problems) = state.apply(Change::Put {
            key: key("b"),
            value: b"{".to_vec(),
            mod_revision: 7,
        });
        assert!(!changed && !problems.is_empty());
        assert_eq!(state.invalid_count(), 2);
        // Fixed: the new version applies and the key is no longer invalid.
        assert_eq!(state.apply(put("a", 83, 8)), (true, vec![]));
        assert_eq!(state.invalid_count(), 1);
        // Deleting an invalid key clears it.
        state.apply(Change::Delete {
            key: key("b"),
            mod_revision: 9,
        });
        assert_eq!(state.invalid_count(), 0);
        assert_eq!(ports(&state), [("a".to_owned(), 83)]);
    }

    #[test]
    fn a_relist_drops_deleted_keys_and_keeps_last_good_of_invalid_ones() {
        let mut state = SyncState::new(PREFIX);
        state.reset(listing(
            4,
            &[("a", agent_json("a", 80), 2), ("b", agent_json("b", 81), 3)],
        ));
        // While away: b deleted, a made invalid, c added.
        let problems = state.reset(listing(
            9,
            &[("a", agent_json("a", 0), 7), ("c", agent_json("c", 82), 8)],
        ));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(ports(&state), [("a".to_owned(), 80), ("c".to_owned(), 82)]);
        assert_eq!(state.revision(), 9);
        // The same invalid value listed again is not reported twice.
        let problems = state.reset(listing(
            10,
            &[("a", agent_json("a", 0), 7), ("c", agent_json("c", 82), 8)],
        ));
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn a_cache_seed_is_replaced_by_the_first_listing() {
        let mut state = SyncState::new(PREFIX);
        let mut cached = SyncState::new(PREFIX);
        cached.apply(put("a", 80, 2));
        cached.apply(put("old", 81, 3));
        state.seed(3, cached.cache_entries());
        assert_eq!(ports(&state).len(), 2);
        // etcd says: `old` is gone, `a` changed to an invalid value (last good: the cached one).
        state.reset(listing(12, &[("a", agent_json("a", 0), 11)]));
        assert_eq!(ports(&state), [("a".to_owned(), 80)]);
    }

    #[test]
    fn foreign_keys_are_rejected_not_applied() {
        let mut state = SyncState::new(PREFIX);
        let (changed, problems) = state.apply(Change::Put {
            key: format!("{PREFIX}/agents/default/a/extra"),
            value: agent_json("a", 80),
            mod_revision: 2,
        });
        assert!(!changed);
        assert!(problems[0].contains("belongs under"), "{problems:?}");
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|delay| *delay <= Duration::from_secs(30)));
        assert!(delays[11] >= Duration::from_secs(15));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(200));
    }

    #[test]
    fn status_reports_age_after_a_sync() {
        let status = ControlStatus::default();
        assert_eq!(status.sample().snapshot_age_seconds, None);
        status.synced_now(42);
        let sample = status.sample();
        assert_eq!(sample.revision, 42);
        assert!(sample.snapshot_age_seconds.is_some_and(|age| age < 5.0));
    }
}
