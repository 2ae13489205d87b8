//! Local rate limiting: token buckets per (source workload, destination agent, tool when the
//! limit names one), configured by the destination's [`TrafficSettings`]. The [`RateLimit`]
//! trait is the seam for a global (distributed) limiter later.
//!
//! Buckets use GCRA (the "virtual scheduling" form of a token bucket): each bucket is one
//! theoretical arrival time, updated with integer `Duration` arithmetic, so there is no float
//! drift, and a configuration change (new rate or burst) applies to existing buckets at once.
//! Time is a parameter (`now`), so callers and tests control the clock.
//!
//! Memory is bounded: at most `max_keys` buckets (split over shards). When a shard is full,
//! buckets that have refilled completely (idle: forgetting them changes nothing) are dropped
//! first; if none are, the least recently used sixteenth of the shard is evicted. An evicted
//! bucket that is still active restarts full, which only happens under key churn beyond the cap.

use std::{
    fmt,
    hash::BuildHasher,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use hashbrown::HashTable;

use super::snapshot::TrafficSettings;

/// Default cap on the number of buckets of a [`RateLimiter`].
pub const DEFAULT_MAX_KEYS: usize = 65_536;

const SHARDS: usize = 16;

/// Who calls whom (and which tool) for rate limiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitKey<'a> {
    pub source: &'a str,
    pub destination: &'a str,
    /// MCP tool (or A2A skill) the request names, if any.
    pub tool: Option<&'a str>,
}

/// A rate limiter. `check` takes one request's worth of budget, or says how long to wait.
pub trait RateLimit: Send + Sync + fmt::Debug {
    /// Applies the limit of `settings` (the destination's traffic settings) that matches `key`.
    /// `Ok` when the request may proceed (also when no limit applies); `Err(retry_after)` when
    /// the caller is over its limit.
    fn check(
        &self,
        settings: &TrafficSettings,
        key: &RateLimitKey<'_>,
        now: Instant,
    ) -> Result<(), Duration>;
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Theoretical arrival time: the bucket is full at or after this instant.
    tat: Instant,
    last_seen: Instant,
}

/// In-process, sharded token-bucket limiter.
pub struct RateLimiter {
    shards: Vec<Mutex<Shard>>,
    max_keys_per_shard: usize,
    /// Seeded at random per limiter: the key parts come from peers (source names, tool
    /// names). foldhash's quality variant: the shard comes from the high bits and the slot
    /// from the low ones, so both must mix every input byte (SipHash did, at several times
    /// the cost per request).
    hasher: foldhash::quality::RandomState,
}

/// One shard's buckets, found by the hash the limiter computed once per request (it also
/// picked the shard).
type Shard = HashTable<(BucketKey, Bucket)>;

/// Whose bucket it is; copied to the heap only when a bucket is created.
/// Compared with [`BucketKey::is`], against the parts of a request's key.
#[derive(Debug)]
struct BucketKey {
    source: Box<str>,
    destination: Box<str>,
    tool: Option<Box<str>>,
}

impl BucketKey {
    fn new(source: &str, destination: &str, tool: Option<&str>) -> Self {
        BucketKey {
            source: source.into(),
            destination: destination.into(),
            tool: tool.map(Into::into),
        }
    }

    fn is(&self, source: &str, destination: &str, tool: Option<&str>) -> bool {
        *self.source == *source && *self.destination == *destination && self.tool.as_deref() == tool
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("keys", &self.len())
            .field("max_keys", &(self.max_keys_per_shard * SHARDS))
            .finish()
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new(DEFAULT_MAX_KEYS)
    }
}

impl RateLimiter {
    /// A limiter holding at most about `max_keys` buckets (rounded up to a multiple of 16).
    pub fn new(max_keys: usize) -> Self {
        RateLimiter {
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            max_keys_per_shard: max_keys.div_ceil(SHARDS).max(1),
            hasher: foldhash::quality::RandomState::default(),
        }
    }

    /// Number of buckets held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// True when no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every bucket that has refilled completely by `now`; returns how many. Optional:
    /// full shards prune themselves, this keeps memory low between bursts of new keys.
    pub fn prune(&self, now: Instant) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let mut buckets = shard.lock().unwrap_or_else(PoisonError::into_inner);
                let before = buckets.len();
                buckets.retain(|(_, b)| b.tat > now);
                before - buckets.len()
            })
            .sum()
    }

    /// The hash of a bucket's key: it picks the shard and finds the bucket in it.
    fn hash(&self, source: &str, destination: &str, tool: Option<&str>) -> u64 {
        self.hasher.hash_one((source, destination, tool))
    }

    /// The shard of a key's hash. Bits 32 and up: the table inside the shard places entries by
    /// the low bits and tells them apart by the top seven, so neither is constant in a shard.
    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[((hash >> 32) as usize) % SHARDS]
    }
}

/// GCRA: takes one token from `bucket` at `now`, or says how long until one is there.
fn take_token(
    bucket: &mut Bucket,
    now: Instant,
    interval: Duration,
    tolerance: Duration,
) -> Result<(), Duration> {
    bucket.last_seen = bucket.last_seen.max(now);
    let tat = bucket.tat.max(now);
    let ahead = tat.saturating_duration_since(now);
    if ahead > tolerance {
        return Err(ahead - tolerance);
    }
    match tat.checked_add(interval) {
        Some(next) => {
            bucket.tat = next;
            Ok(())
        }
        // A rate so low the next token is beyond the clock's range: never again.
        None => Err(interval),
    }
}

/// Makes room in a full shard: idle buckets first, else the least recently used sixteenth.
fn make_room(buckets: &mut Shard, capacity: usize, now: Instant) {
    if buckets.len() < capacity {
        return;
    }
    buckets.retain(|(_, b)| b.tat > now);
    if buckets.len() < capacity {
        return;
    }
    let evict = (buckets.len() / 16).max(1);
    let mut last_seen: Vec<Instant> = buckets.iter().map(|(_, b)| b.last_seen).collect();
    let (older, &mut cutoff, _) = last_seen.select_nth_unstable(evict - 1);
    // Everything seen before the cut-off goes, then as many seen at it as make `evict`.
    let mut at_cutoff = evict - older.iter().filter(|&&seen| seen < cutoff).count();
    buckets.retain(|(_, b)| {
        if b.last_seen < cutoff {
            false
        } else if b.last_seen == cutoff && at_cutoff > 0 {
            at_cutoff -= 1;
            false
        } else {
            true
        }
    });
}

impl RateLimit for RateLimiter {
    fn check(
        &self,
        settings: &TrafficSettings,
        key: &RateLimitKey<'_>,
        now: Instant,
    ) -> Result<(), Duration> {
        let Some(rule) = settings.rate_limit_for(key.source, key.tool) else {
            return Ok(());
        };
        // Validated > 0 and finite; guard anyway so a bad value never panics.
        let rate = rule.requests_per_second;
        if !(rate.is_finite() && rate > 0.0) {
            return Ok(());
        }
        let interval = Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::MAX);
        let tolerance = interval
            .checked_mul(rule.burst.saturating_sub(1))
            .unwrap_or(Duration::MAX);

        let tool = rule.tool.as_ref().and(key.tool);
        let hash = self.hash(key.source, key.destination, tool);
        let mut buckets = self
            .shard(hash)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // One lookup when the bucket exists (every request but a key's first).
        let found = buckets.find_mut(hash, |(id, _)| id.is(key.source, key.destination, tool));
        if let Some((_, bucket)) = found {
            return take_token(bucket, now, interval, tolerance);
        }
        make_room(&mut buckets, self.max_keys_per_shard, now);
        let mut bucket = Bucket {
            tat: now,
            last_seen: now,
        };
        let verdict = take_token(&mut bucket, now, interval, tolerance);
        let id = BucketKey::new(key.source, key.destination, tool);
        buckets.insert_unique(hash, (id, bucket), |(id, _)| {
            self.hash(&id.source, &id.destination, id.tool.as_deref())
        });
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Pattern, snapshot::RateLimitRule};

    fn settings(rules: &[(&str, Option<&str>, f64, u32)]) -> TrafficSettings {
        TrafficSettings {
            rate_limits: rules
                .iter()
                .map(|&(from, tool, rps, burst)| RateLimitRule {
                    from: Pattern::parse(from).unwrap(),
                    tool: tool.map(str::to_owned),
                    requests_per_second: rps,
                    burst,
                })
                .collect(),
            ..TrafficSettings::default()
        }
    }

    fn key<'a>(source: &'a str, tool: Option<&'a str>) -> RateLimitKey<'a> {
        RateLimitKey {
            source,
            destination: "tools",
            tool,
        }
    }

    #[test]
    fn burst_then_refill_with_retry_after() {
        let limiter = RateLimiter::default();
        let s = settings(&[("*", None, 10.0, 3)]);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check(&s, &key("a", None), t0), Ok(()));
        }
        // Burst spent: the next token comes 100 ms after the first was taken.
        assert_eq!(
            limiter.check(&s, &key("a", None), t0),
            Err(Duration::from_millis(100))
        );
        let t1 = t0 + Duration::from_millis(40);
        assert_eq!(
            limiter.check(&s, &key("a", None), t1),
            Err(Duration::from_millis(60))
        );
        let t2 = t0 + Duration::from_millis(100);
        assert_eq!(limiter.check(&s, &key("a", None), t2), Ok(()));
        assert!(limiter.check(&s, &key("a", None), t2).is_err());
        // Sustained rate: one every 100 ms.
        for i in 2..20u64 {
            let t = t0 + Duration::from_millis(100 * i);
            assert_eq!(limiter.check(&s, &key("a", None), t), Ok(()), "at {i}");
            assert!(limiter.check(&s, &key("a", None), t).is_err(), "at {i}");
        }
        // After a long pause the whole burst is back, not more.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(limiter.check(&s, &key("a", None), later), Ok(()));
        }
        assert!(limiter.check(&s, &key("a", None), later).is_err());
    }

    #[test]
    fn keys_are_independent_and_tools_get_their_own_bucket() {
        let limiter = RateLimiter::default();
        let s = settings(&[("*", None, 1.0, 1), ("*", Some("search"), 1.0, 1)]);
        let t0 = Instant::now();
        assert!(limiter.check(&s, &key("a", None), t0).is_ok());
        assert!(limiter.check(&s, &key("a", None), t0).is_err());
        // Another source has its own bucket.
        assert!(limiter.check(&s, &key("b", None), t0).is_ok());
        // The tool-specific limit is separate from the general one.
        assert!(limiter.check(&s, &key("a", Some("search")), t0).is_ok());
        assert!(limiter.check(&s, &key("a", Some("search")), t0).is_err());
        // Other tools share the general bucket, already spent.
        assert!(limiter.check(&s, &key("a", Some("fs_read")), t0).is_err());
        // Another destination is a different bucket.
        let other = RateLimitKey {
            source: "a",
            destination: "planner",
            tool: None,
        };
        assert!(limiter.check(&s, &other, t0).is_ok());
    }

    #[test]
    fn no_matching_limit_allows() {
        let limiter = RateLimiter::default();
        let s = settings(&[("planner", None, 1.0, 1)]);
        let t0 = Instant::now();
        for _ in 0..100 {
            assert!(limiter.check(&s, &key("other", None), t0).is_ok());
        }
        assert!(limiter.is_empty());
        assert!(
            limiter
                .check(&TrafficSettings::default(), &key("a", None), t0)
                .is_ok()
        );
    }

    #[test]
    fn configuration_change_applies_to_existing_buckets() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        let slow = settings(&[("*", None, 1.0, 1)]);
        assert!(limiter.check(&slow, &key("a", None), t0).is_ok());
        assert_eq!(
            limiter.check(&slow, &key("a", None), t0),
            Err(Duration::from_secs(1))
        );
        let fast = settings(&[("*", None, 1.0, 5)]);
        for _ in 0..4 {
            assert!(limiter.check(&fast, &key("a", None), t0).is_ok());
        }
        assert!(limiter.check(&fast, &key("a", None), t0).is_err());
    }

    #[test]
    fn idle_buckets_are_pruned_and_keys_are_capped() {
        let limiter = RateLimiter::new(SHARDS * 4);
        let s = settings(&[("*", None, 10.0, 2)]);
        let t0 = Instant::now();
        let names: Vec<String> = (0..1000).map(|i| format!("w{i}")).collect();
        for name in &names {
            assert!(limiter.check(&s, &key(name, None), t0).is_ok());
            assert!(limiter.len() <= SHARDS * 4);
        }
        assert!(!limiter.is_empty());
        // 100 ms later every bucket has refilled (one token taken, 10/s): all idle.
        assert_eq!(limiter.prune(t0 + Duration::from_millis(50)), 0);
        let pruned = limiter.prune(t0 + Duration::from_millis(100));
        assert!(pruned > 0);
        assert!(limiter.is_empty());
    }

    #[test]
    fn eviction_prefers_idle_then_oldest() {
        let limiter = RateLimiter::new(1);
        // One key per shard: fill a shard with a hot key, then a new key in the same shard
        // must evict it (capacity 1), restarting the hot key's bucket.
        let s = settings(&[("*", None, 1.0, 1)]);
        let t0 = Instant::now();
        assert!(limiter.check(&s, &key("hot", None), t0).is_ok());
        let shard_of =
            |name: &str| std::ptr::from_ref(limiter.shard(limiter.hash(name, "tools", None)));
        let neighbour = (0..10_000)
            .map(|i| format!("n{i}"))
            .find(|n| shard_of(n) == shard_of("hot"))
            .unwrap();
        assert!(limiter.check(&s, &key(&neighbour, None), t0).is_ok());
        assert_eq!(limiter.len(), 1);
        assert!(limiter.check(&s, &key("hot", None), t0).is_ok());
    }

    #[test]
    fn extreme_rates_do_not_panic() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        for rps in [
            1e-300,
            1e-9,
            1e300,
            f64::MIN_POSITIVE,
            f64::INFINITY,
            f64::NAN,
            -1.0,
            0.0,
        ] {
            let s = settings(&[("*", None, rps, u32::MAX)]);
            for _ in 0..3 {
                let _ = limiter.check(&s, &key("a", None), t0);
            }
            let s = settings(&[("*", None, rps, 1)]);
            for _ in 0..3 {
                let _ = limiter.check(&s, &key("b", None), t0);
            }
        }
    }

    #[test]
    fn buckets_are_told_apart_by_every_part_of_their_key() {
        let limiter = RateLimiter::default();
        let s = settings(&[("*", None, 1.0, 1), ("*", Some("t"), 1.0, 1)]);
        let t0 = Instant::now();
        let long = "w".repeat(4096);
        let keys = [
            (long.as_str(), "tools", None),
            ("a:b", "c", None),
            ("a", "b:c", None),
            ("a", "b", Some("t")),
            ("a", "b", None),
            ("ab", "", None),
            ("", "ab", None),
        ];
        for (source, destination, tool) in keys {
            let key = RateLimitKey {
                source,
                destination,
                tool,
            };
            assert!(
                limiter.check(&s, &key, t0).is_ok(),
                "{source:.8} {destination} {tool:?}"
            );
            assert!(
                limiter.check(&s, &key, t0).is_err(),
                "{source:.8} {destination} {tool:?}"
            );
        }
        assert_eq!(limiter.len(), keys.len());
    }

    #[test]
    fn a_full_shard_evicts_its_least_recently_seen_sixteenth() {
        let mut shard = Shard::new();
        let t0 = Instant::now();
        for i in 0..32u32 {
            let seen = t0 + Duration::from_millis(u64::from(i % 4));
            let bucket = Bucket {
                tat: t0 + Duration::from_secs(10),
                last_seen: seen,
            };
            let id = BucketKey::new(&i.to_string(), "d", None);
            // The source is the bucket's number, and its hash here.
            shard.insert_unique(u64::from(i), (id, bucket), |(id, _)| {
                id.source.parse().unwrap()
            });
        }
        make_room(&mut shard, 32, t0);
        // Two go (32 / 16), both among the eight seen first, though all eight tie.
        assert_eq!(shard.len(), 30);
        let first_seen = shard.iter().filter(|(_, b)| b.last_seen == t0).count();
        assert_eq!(first_seen, 6);
    }

    #[test]
    fn limiter_is_a_shareable_trait_object() {
        let limiter: std::sync::Arc<dyn RateLimit> = std::sync::Arc::new(RateLimiter::default());
        let s = settings(&[("*", None, 1.0, 1)]);
        let t0 = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let limiter = limiter.clone();
                let s = s.clone();
                std::thread::spawn(move || limiter.check(&s, &key("a", None), t0).is_ok())
            })
            .collect();
        let allowed = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(allowed, 1);
    }
}
