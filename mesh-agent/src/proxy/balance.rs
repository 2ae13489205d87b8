//! Endpoint choice and passive health: power of two choices over each endpoint's cost (EWMA
//! of its response latency times its requests in flight, divided by its weight), outlier
//! detection that ejects an endpoint after consecutive failures for a growing time, half-open
//! probing when the ejection ends, and a cap on the share of an agent's endpoints ejected at
//! once (past it, the least recently ejected come back: a mesh that ejects everything serves
//! nothing).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rand::Rng;
use smallvec::SmallVec;

use crate::{
    fast_map::FastHashMap,
    policy::{AgentEntry, CircuitBreaker},
};

/// Weight of a new latency sample in the moving average (1/8).
const EWMA_SHIFT: u32 = 3;
/// Latency assumed for an endpoint with no sample yet (1 ms), so new endpoints get traffic.
const INITIAL_LATENCY_NANOS: u64 = 1_000_000;
/// Latency sample a failure counts as, so failing endpoints lose the two-choice draws.
const FAILURE_PENALTY_NANOS: u64 = 250_000_000;
/// What is known of an endpoint's latency fades toward [`INITIAL_LATENCY_NANOS`] with this
/// half-life when no sample comes, so a penalised endpoint is tried again eventually.
const DECAY_HALF_LIFE: Duration = Duration::from_secs(5);
/// Longest ejection, however often an endpoint failed.
const MAX_EJECTION: Duration = Duration::from_secs(300);
/// Endpoints remembered; the least used are forgotten past this.
const MAX_TRACKED: usize = 16_384;

/// What is known of one endpoint.
#[derive(Debug)]
pub struct EndpointHealth {
    address: SocketAddr,
    ewma_nanos: AtomicU64,
    /// When the last sample came, in nanoseconds since `epoch`.
    sampled_at: AtomicU64,
    /// No response measured yet (new, or back from ejection): such an endpoint costs nothing
    /// in the draws, so it is tried at once instead of being starved by faster known ones.
    unsampled: std::sync::atomic::AtomicBool,
    epoch: Instant,
    in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
    state: Mutex<Ejection>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Ejection {
    /// Ejected until then; `None` when in service.
    until: Option<Instant>,
    /// When the current ejection started (to bring back the oldest first).
    since: Option<Instant>,
    /// Ejections so far in a row; each one lasts `ejectionTime * count`.
    count: u32,
    /// A half-open probe is out: no other request may use the endpoint until it returns.
    probing: bool,
}

impl EndpointHealth {
    fn new(address: SocketAddr) -> Self {
        Self {
            address,
            ewma_nanos: AtomicU64::new(INITIAL_LATENCY_NANOS),
            sampled_at: AtomicU64::new(0),
            unsampled: std::sync::atomic::AtomicBool::new(true),
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            state: Mutex::new(Ejection::default()),
        }
    }

    fn ejection(&self) -> Ejection {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn nanos_since_epoch(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The latency average as of `now`: it fades toward the neutral value while no sample
    /// comes.
    fn latency_nanos(&self, now: Instant) -> u64 {
        if self.unsampled.load(Ordering::Relaxed) {
            return 1;
        }
        let ewma = self.ewma_nanos.load(Ordering::Relaxed);
        let age = self
            .nanos_since_epoch(now)
            .saturating_sub(self.sampled_at.load(Ordering::Relaxed));
        let halvings = age as f64 / DECAY_HALF_LIFE.as_nanos() as f64;
        let keep = 0.5f64.powf(halvings);
        let neutral = INITIAL_LATENCY_NANOS as f64;
        (neutral + (ewma as f64 - neutral) * keep).max(1.0) as u64
    }

    fn add_sample(&self, sample_nanos: u64, now: Instant) {
        let new = if self.unsampled.swap(false, Ordering::Relaxed) {
            sample_nanos
        } else {
            let old = self.latency_nanos(now);
            old - (old >> EWMA_SHIFT) + (sample_nanos >> EWMA_SHIFT)
        };
        self.ewma_nanos.store(new.max(1), Ordering::Relaxed);
        self.sampled_at
            .store(self.nanos_since_epoch(now), Ordering::Relaxed);
    }

    /// Latency-and-load cost: lower is better.
    fn cost(&self, weight: u32, now: Instant) -> u128 {
        let ewma = u128::from(self.latency_nanos(now));
        let load = u128::from(self.in_flight.load(Ordering::Relaxed)) + 1;
        ewma * load / u128::from(weight.max(1))
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejection().until.is_some_and(|until| now < until)
    }
}

/// A chosen endpoint; counts as in flight until [`Balancer::record`] or drop.
#[derive(Debug)]
pub struct Pick {
    health: Arc<EndpointHealth>,
    started: Instant,
    finished: bool,
}

impl Pick {
    pub fn address(&self) -> SocketAddr {
        self.health.address
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        if !self.finished {
            self.health.in_flight.fetch_sub(1, Ordering::Relaxed);
            // An abandoned request (caller gone) says nothing about the endpoint; a probe
            // that never returned must not keep the endpoint locked out forever.
            let mut state = self
                .health
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            state.probing = false;
        }
    }
}

/// How a request to an endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response that says the endpoint works (any status but 502, 503, 504).
    Success,
    /// Connect failure, reset, timeout or a gateway status: counts toward ejection.
    Failure,
}

/// Passive health and choice for every endpoint the proxy talks to.
#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Mutex<FastHashMap<SocketAddr, Arc<EndpointHealth>>>,
}

impl Balancer {
    fn health(&self, address: SocketAddr) -> Arc<EndpointHealth> {
        let mut endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if endpoints.len() >= MAX_TRACKED && !endpoints.contains_key(&address) {
            endpoints.retain(|_, health| Arc::strong_count(health) > 1);
        }
        Arc::clone(
            endpoints
                .entry(address)
                .or_insert_with(|| Arc::new(EndpointHealth::new(address))),
        )
    }

    /// Whether the endpoint at `address` is ejected now (passive health); `false` for one never
    /// used.
    pub fn is_ejected(&self, address: SocketAddr) -> bool {
        self.endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&address)
            .is_some_and(|health| health.is_ejected(Instant::now()))
    }

    /// Health of one endpoint, for tests and the admin endpoint.
    pub fn endpoint(&self, address: SocketAddr) -> Arc<EndpointHealth> {
        self.health(address)
    }

    /// Chooses an endpoint of `agent` not in `tried`: two random candidates by weight, the
    /// cheaper wins. Ejected endpoints are skipped, except one half-open probe once their
    /// ejection ended, and except when more than `maxEjectedPercent` would be out.
    pub fn pick(
        &self,
        agent: &AgentEntry,
        tried: &[SocketAddr],
        breaker: &CircuitBreaker,
        now: Instant,
    ) -> Option<Pick> {
        // Inline up to a few endpoints: most agents have that many, and a pick happens on
        // every request.
        let mut candidates: SmallVec<[(Arc<EndpointHealth>, u32); 8]> = SmallVec::new();
        let mut ejected: SmallVec<[(Arc<EndpointHealth>, u32, Instant); 4]> = SmallVec::new();
        let mut in_service = 0usize;
        let mut probe: Option<(Arc<EndpointHealth>, u32)> = None;
        let mut serving = 0usize;
        for endpoint in agent
            .endpoints
            .iter()
            .filter(|endpoint| endpoint.weight > 0)
        {
            serving += 1;
            let health = self.health(endpoint.address);
            let state = health.ejection();
            let out = state.until.is_some_and(|until| now < until);
            if !out && state.until.is_none() {
                in_service += 1;
            }
            if tried.contains(&endpoint.address) {
                continue;
            }
            match state.until {
                None => candidates.push((health, endpoint.weight)),
                Some(until) if now >= until => {
                    // Ejection over: half-open, one probe at a time.
                    if !state.probing && probe.is_none() {
                        probe = Some((health, endpoint.weight));
                    }
                }
                Some(_) => ejected.push((health, endpoint.weight, state.since.unwrap_or(now))),
            }
        }
        // Never eject more than the allowed share: bring back the longest-ejected first.
        let allowed_out = serving * breaker.max_ejected_percent as usize / 100;
        let out_now = serving.saturating_sub(in_service);
        if out_now > allowed_out || (candidates.is_empty() && probe.is_none()) {
            ejected.sort_by_key(|(_, _, since)| *since);
            let returning = out_now
                .saturating_sub(allowed_out)
                .max(usize::from(candidates.is_empty() && probe.is_none()));
            candidates.extend(
                ejected
                    .into_iter()
                    .take(returning)
                    .map(|(health, weight, _)| (health, weight)),
            );
        }
        let chosen = if let Some((health, _)) = probe {
            health
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .probing = true;
            health
        } else {
            choose_two(&candidates, now)?
        };
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Pick {
            health: chosen,
            started: now,
            finished: false,
        })
    }

    /// A pick of one given endpoint of `agent` (session affinity), if it serves: listed
    /// with a weight above 0, not tried yet, and not ejected.
    pub fn pick_pinned(
        &self,
        agent: &AgentEntry,
        address: SocketAddr,
        tried: &[SocketAddr],
        now: Instant,
    ) -> Option<Pick> {
        let listed = agent
            .endpoints
            .iter()
            .any(|endpoint| endpoint.address == address && endpoint.weight > 0);
        if !listed || tried.contains(&address) {
            return None;
        }
        let health = self.health(address);
        if health.ejection().until.is_some() {
            return None;
        }
        health.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Pick {
            health,
            started: now,
            finished: false,
        })
    }

    /// Records how a request ended: updates the latency average, and ejects or restores the
    /// endpoint.
    pub fn record(&self, mut pick: Pick, outcome: Outcome, breaker: &CircuitBreaker) {
        pick.finished = true;
        let health = &pick.health;
        health.in_flight.fetch_sub(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut state = health.state.lock().unwrap_or_else(PoisonError::into_inner);
        let was_probe = state.probing;
        state.probing = false;
        match outcome {
            Outcome::Success => {
                let sample =
                    u64::try_from(now.duration_since(pick.started).as_nanos()).unwrap_or(u64::MAX);
                health.add_sample(sample, now);
                health.consecutive_failures.store(0, Ordering::Relaxed);
                if state.until.is_some() {
                    // Back in service with a clean slate: the penalties of the failures
                    // that ejected it would otherwise keep it out of the draws.
                    health
                        .ewma_nanos
                        .store(INITIAL_LATENCY_NANOS, Ordering::Relaxed);
                    health.unsampled.store(true, Ordering::Relaxed);
                    tracing::info!(endpoint = %health.address, "endpoint recovered; back in service");
                }
                *state = Ejection::default();
            }
            Outcome::Failure => {
                health.add_sample(FAILURE_PENALTY_NANOS, now);
                let failures = health.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                let threshold = breaker.consecutive_failures;
                if threshold > 0 && (was_probe || failures >= threshold) {
                    state.count = state.count.saturating_add(1);
                    let duration = breaker
                        .ejection_time
                        .saturating_mul(state.count)
                        .min(MAX_EJECTION);
                    state.until = Some(now + duration);
                    state.since = Some(now);
                    health.consecutive_failures.store(0, Ordering::Relaxed);
                    tracing::warn!(
                        endpoint = %health.address, failures, ejections = state.count,
                        ?duration, half_open_probe_failed = was_probe,
                        "endpoint ejected"
                    );
                }
            }
        }
    }
}

/// Power of two choices: two distinct candidates drawn by weight, the cheaper one.
fn choose_two(
    candidates: &[(Arc<EndpointHealth>, u32)],
    now: Instant,
) -> Option<Arc<EndpointHealth>> {
    let draw = |exclude: Option<usize>| -> Option<usize> {
        let total: u64 = candidates
            .iter()
            .enumerate()
            .filter(|(index, _)| Some(*index) != exclude)
            .map(|(_, (_, weight))| u64::from(*weight))
            .sum();
        if total == 0 {
            return None;
        }
        let mut ticket = rand::rng().random_range(0..total);
        for (index, (_, weight)) in candidates.iter().enumerate() {
            if Some(index) == exclude {
                continue;
            }
            let weight = u64::from(*weight);
            if ticket < weight {
                return Some(index);
            }
            ticket -= weight;
        }
        None
    };
    if let [(only, weight)] = candidates {
        // One candidate: nothing to draw.
        return (*weight > 0).then(|| Arc::clone(only));
    }
    let first = draw(None)?;
    let Some(second) = draw(Some(first)) else {
        return Some(Arc::clone(&candidates[first].0));
    };
    let cost = |index: usize| candidates[index].0.cost(candidates[index].1, now);
    let winner = if cost(second) < cost(first) {
        second
    } else {
        first
    };
    Some(Arc::clone(&candidates[winner].0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Capabilities, Endpoint, Protocol};

    fn agent(addresses: &[(u16, u32)]) -> AgentEntry {
        AgentEntry {
            name: "tools".into(),
            namespace: "default".into(),
            hosts: vec![],
            endpoints: addresses
                .iter()
                .map(|(port, weight)| Endpoint {
                    address: SocketAddr::from(([127, 0, 0, 1], *port)),
                    weight: *weight,
                    node: None,
                })
                .collect(),
            protocol: Protocol::default(),
            capabilities: Capabilities::default(),
            fallback: None,
        }
    }

    fn breaker(failures: u32, max_percent: u32) -> CircuitBreaker {
        CircuitBreaker {
            consecutive_failures: failures,
            ejection_time: Duration::from_millis(50),
            max_ejected_percent: max_percent,
        }
    }

    fn port(pick: &Pick) -> u16 {
        pick.address().port()
    }

    #[test]
    fn drained_and_tried_endpoints_are_not_picked() {
        let balancer = Balancer::default();
        let agent = agent(&[(1, 1), (2, 0), (3, 1)]);
        let breaker = breaker(3, 50);
        for _ in 0..50 {
            let pick = balancer
                .pick(&agent, &[], &breaker, Instant::now())
                .unwrap();
            assert_ne!(port(&pick), 2, "weight 0 is drained");
            let tried = [SocketAddr::from(([127, 0, 0, 1], 1))];
            let other = balancer
                .pick(&agent, &tried, &breaker, Instant::now())
                .unwrap();
            assert_eq!(port(&other), 3);
        }
    }

    #[test]
    fn the_slower_or_busier_endpoint_loses_two_choices() {
        let balancer = Balancer::default();
        let agent = agent(&[(1, 1), (2, 1)]);
        let breaker = breaker(0, 50);
        let slow = balancer.endpoint(SocketAddr::from(([127, 0, 0, 1], 1)));
        slow.add_sample(u64::MAX / 2, Instant::now());
        // With two endpoints, both are always drawn: the cheaper always wins.
        for _ in 0..50 {
            let pick = balancer
                .pick(&agent, &[], &breaker, Instant::now())
                .unwrap();
            assert_eq!(port(&pick), 2);
            balancer.record(pick, Outcome::Success, &breaker);
        }
        // Load counts too: many requests in flight on 2 make 1 the cheaper again.
        slow.ewma_nanos.store(2_000_000, Ordering::Relaxed);
        let fast = balancer.endpoint(SocketAddr::from(([127, 0, 0, 1], 2)));
        fast.add_sample(1_000_000, Instant::now());
        fast.ewma_nanos.store(1_000_000, Ordering::Relaxed);
        let held: Vec<Pick> = (0..4)
            .map(|_| {
                balancer
                    .pick(&agent, &[], &breaker, Instant::now())
                    .unwrap()
            })
            .collect();
        assert!(held.iter().any(|pick| port(pick) == 1), "{held:?}");
    }

    #[test]
    fn an_untried_endpoint_wins_the_draw_until_its_first_answer() {
        let balancer = Balancer::default();
        let agent = agent(&[(1, 1), (2, 1)]);
        let breaker = breaker(0, 50);
        let known = balancer.endpoint(SocketAddr::from(([127, 0, 0, 1], 1)));
        known.add_sample(100_000, Instant::now());
        let pick = balancer
            .pick(&agent, &[], &breaker, Instant::now())
            .unwrap();
        assert_eq!(port(&pick), 2, "the new endpoint is tried first");
        balancer.record(pick, Outcome::Success, &breaker);
        assert!(
            !balancer
                .endpoint(pick_address(2))
                .unsampled
                .load(Ordering::Relaxed)
        );
    }

    fn pick_address(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn latency_knowledge_fades_toward_neutral_without_samples() {
        let health = EndpointHealth::new(SocketAddr::from(([127, 0, 0, 1], 1)));
        let now = Instant::now();
        health.add_sample(FAILURE_PENALTY_NANOS * 8, now);
        let fresh = health.latency_nanos(now);
        let later = health.latency_nanos(now + DECAY_HALF_LIFE);
        let much_later = health.latency_nanos(now + DECAY_HALF_LIFE * 20);
        assert!(
            fresh > later && later > much_later,
            "{fresh} {later} {much_later}"
        );
        assert!(much_later < INITIAL_LATENCY_NANOS + 1_000_000);
    }

    #[test]
    fn consecutive_failures_eject_then_a_half_open_probe_restores() {
        let balancer = Balancer::default();
        let agent = agent(&[(1, 1), (2, 1)]);
        let breaker = breaker(2, 50);
        let bad = SocketAddr::from(([127, 0, 0, 1], 1));
        let tried_good = [SocketAddr::from(([127, 0, 0, 1], 2))];
        for _ in 0..2 {
            let pick = balancer
                .pick(&agent, &tried_good, &breaker, Instant::now())
                .unwrap();
            assert_eq!(pick.address(), bad);
            balancer.record(pick, Outcome::Failure, &breaker);
        }
        assert!(balancer.endpoint(bad).is_ejected(Instant::now()));
        for _ in 0..20 {
            let pick = balancer
                .pick(&agent, &[], &breaker, Instant::now())
                .unwrap();
            assert_eq!(port(&pick), 2, "ejected endpoints get no traffic");
        }
        // After the ejection: exactly one probe goes to the bad endpoint.
        let later = Instant::now() + Duration::from_millis(60);
        let probe = balancer.pick(&agent, &[], &breaker, later).unwrap();
        assert_eq!(probe.address(), bad);
        let meanwhile = balancer.pick(&agent, &[], &breaker, later).unwrap();
        assert_eq!(port(&meanwhile), 2, "one probe at a time");
        balancer.record(probe, Outcome::Success, &breaker);
        assert!(!balancer.endpoint(bad).is_ejected(later));
        let picks: Vec<u16> = (0..40)
            .map(|_| port(&balancer.pick(&agent, &[], &breaker, later).unwrap()))
            .collect();
        assert!(picks.contains(&1), "recovered endpoint serves again");
    }

    #[test]
    fn a_failed_probe_ejects_again_for_longer() {
        let balancer = Balancer::default();
        let agent = agent(&[(1, 1), (2, 1)]);
        let breaker = breaker(1, 50);
        let bad = SocketAddr::from(([127, 0, 0, 1], 1));
        let tried_good = [SocketAddr::from(([127, 0, 0, 1], 2))];
        let pick = balancer
            .pick(&agent, &tried_good, &breaker, Instant::now())
            .unwrap();
        balancer.record(pick, Outcome::Failure, &breaker);
        let later = Instant::now() + Duration::from_millis(60);
        let probe = balancer.pick(&agent, &tried_good, &breaker, later).unwrap();
        assert_eq!(probe.address(), bad);
        balancer.record(probe, Outcome::Failure, &breaker);
        let state = balancer.endpoint(bad).ejection();
        assert_eq!(state.count, 2);
        assert!(state.until.unwrap() > Instant::now() + Duration::from_millis(80));
    }

    #[test]
    fn never_more_than_the_allowed_share_is_ejected() {
        let balancer = Balancer::default();
        let agent = agent(&[(1, 1), (2, 1)]);
        let breaker = breaker(1, 50);
        for port in [1u16, 2] {
            let tried: Vec<SocketAddr> = [1u16, 2]
                .iter()
                .filter(|other| **other != port)
                .map(|other| SocketAddr::from(([127, 0, 0, 1], *other)))
                .collect();
            let pick = balancer
                .pick(&agent, &tried, &breaker, Instant::now())
                .unwrap();
            balancer.record(pick, Outcome::Failure, &breaker);
        }
        // Both failed, but at most 50% may be out: one of them still takes traffic.
        let pick = balancer.pick(&agent, &[], &breaker, Instant::now());
        assert!(pick.is_some());
    }
}
