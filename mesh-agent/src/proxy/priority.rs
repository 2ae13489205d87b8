//! Admission with priority queues: at most `maxConcurrent` requests in flight per destination
//! agent; past that, requests wait in one bounded FIFO queue per class and a freed slot goes to
//! the oldest request of the highest class waiting. A full queue sheds: a new request of a
//! higher class takes the place of the newest waiter of the lowest class, otherwise the new
//! request is refused. Shed requests are answered (429/503 with `Retry-After`, or the
//! protocol's error), never dropped silently.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::oneshot;

use crate::policy::{Priority, PriorityClass, TrafficSettings};

/// Header a caller may set to pick its class, where policy allows it (lower case, as
/// `HeaderName` holds it).
pub const PRIORITY_HEADER: &str = "x-mesh-priority";

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Shed {
    #[error("the agent is saturated and its {class:?} queue is full")]
    QueueFull { class: PriorityClass },
    #[error("displaced from the queue by a higher-priority request")]
    Displaced,
}

/// The class of a request to an agent with `traffic` settings: a class the caller asked for
/// by header (when allowed), else the first `sources` entry matching the caller, else the
/// default.
pub fn class_of(traffic: &TrafficSettings, source: &str, header: Option<&str>) -> PriorityClass {
    if traffic.priority.header_allowed
        && let Some(class) = header.and_then(parse_class)
    {
        return class;
    }
    traffic
        .priority_sources
        .iter()
        .find(|(pattern, _)| pattern.matches(source))
        .map_or(traffic.priority.default_class, |(_, class)| *class)
}

fn parse_class(text: &str) -> Option<PriorityClass> {
    let text = text.trim();
    [
        ("high", PriorityClass::High),
        ("normal", PriorityClass::Normal),
        ("low", PriorityClass::Low),
    ]
    .into_iter()
    .find_map(|(name, class)| text.eq_ignore_ascii_case(name).then_some(class))
}

fn index(class: PriorityClass) -> usize {
    match class {
        PriorityClass::High => 0,
        PriorityClass::Normal => 1,
        PriorityClass::Low => 2,
    }
}

/// A queued request's half of the hand-over: it receives the slot itself, so a slot handed
/// to a caller that gave up in the meantime is freed again when the channel drops it.
type Waiter = oneshot::Sender<Result<Slot, Shed>>;

#[derive(Debug, Default)]
struct AgentQueue {
    in_flight: u32,
    waiting: [VecDeque<Waiter>; 3],
}

impl AgentQueue {
    fn queued(&self) -> usize {
        self.waiting.iter().map(VecDeque::len).sum()
    }
}

/// Admission state of every destination agent.
#[derive(Debug, Default)]
pub struct Admission {
    agents: Mutex<HashMap<String, AgentQueue>>,
}

/// A slot in flight; frees it (handing it to the next waiter) on drop.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    agent: String,
    /// False once the slot was accounted for by hand; drop then does nothing.
    armed: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut agents = self
            .admission
            .agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(queue) = agents.get_mut(&self.agent) else {
            return;
        };
        // Hand the slot to the oldest waiter of the highest class that still waits.
        let mut offer = Some(Slot {
            admission: Arc::clone(&self.admission),
            agent: self.agent.clone(),
            armed: true,
        });
        for waiters in &mut queue.waiting {
            while let Some(waiter) = waiters.pop_front() {
                let Some(slot) = offer.take() else { return };
                match waiter.send(Ok(slot)) {
                    Ok(()) => return,
                    // That caller gave up: the slot comes back, try the next one.
                    Err(Ok(back)) => offer = Some(back),
                    Err(Err(_)) => return,
                }
            }
        }
        // Nobody waits: the slot is free. Defuse the unused copy so its drop does not
        // recurse into this lock.
        if let Some(mut unused) = offer {
            unused.armed = false;
        }
        queue.in_flight = queue.in_flight.saturating_sub(1);
        if queue.in_flight == 0 && queue.queued() == 0 {
            agents.remove(&self.agent);
        }
    }
}

impl Admission {
    /// Waits for a slot to `agent` in `class`; `None` when the agent has no limit.
    pub async fn admit(
        self: &Arc<Self>,
        agent: &str,
        class: PriorityClass,
        priority: &Priority,
    ) -> Result<Option<Slot>, Shed> {
        if priority.max_concurrent == 0 {
            return Ok(None);
        }
        let receiver = {
            let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
            let queue = agents.entry(agent.to_owned()).or_default();
            // Waiters that gave up still sit in the queues; they do not count as load.
            for waiters in &mut queue.waiting {
                waiters.retain(|waiter| !waiter.is_closed());
            }
            if queue.in_flight < priority.max_concurrent && queue.queued() == 0 {
                queue.in_flight += 1;
                return Ok(Some(Slot {
                    admission: Arc::clone(self),
                    agent: agent.to_owned(),
                    armed: true,
                }));
            }
            if queue.queued() >= priority.max_queue as usize {
                // Full: displace the newest waiter of the lowest class below this one.
                let lower = (index(class) + 1..3)
                    .rev()
                    .find(|lower| !queue.waiting[*lower].is_empty());
                match lower.and_then(|lower| queue.waiting[lower].pop_back()) {
                    Some(displaced) => {
                        let _ = displaced.send(Err(Shed::Displaced));
                    }
                    None => return Err(Shed::QueueFull { class }),
                }
            }
            let (sender, receiver) = oneshot::channel();
            queue.waiting[index(class)].push_back(sender);
            receiver
        };
        // A dropped sender means the queue was torn down with no slot to give.
        match receiver.await {
            Ok(Ok(slot)) => Ok(Some(slot)),
            Ok(Err(shed)) => Err(shed),
            Err(_) => Err(Shed::QueueFull { class }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PrioritySource, TrafficPolicySpec};

    fn limited(max_concurrent: u32, max_queue: u32) -> Priority {
        Priority {
            max_concurrent,
            max_queue,
            ..Priority::default()
        }
    }

    #[tokio::test]
    async fn no_limit_admits_everything_at_once() {
        let admission = Arc::new(Admission::default());
        let priority = limited(0, 1);
        for _ in 0..100 {
            let slot = admission
                .admit("a", PriorityClass::Low, &priority)
                .await
                .unwrap();
            assert!(slot.is_none());
        }
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_highest_class_first_then_in_order() {
        let admission = Arc::new(Admission::default());
        let priority = limited(1, 16);
        let held = admission
            .admit("a", PriorityClass::Normal, &priority)
            .await
            .unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, class) in [
            ("low-1", PriorityClass::Low),
            ("normal-1", PriorityClass::Normal),
            ("high-1", PriorityClass::High),
            ("low-2", PriorityClass::Low),
            ("high-2", PriorityClass::High),
        ] {
            let admission = Arc::clone(&admission);
            let order = Arc::clone(&order);
            let priority = priority.clone();
            tasks.push(tokio::spawn(async move {
                let slot = admission.admit("a", class, &priority).await.unwrap();
                order.lock().unwrap().push(name);
                drop(slot);
            }));
            // Queue them in this order.
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
        }
        drop(held);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["high-1", "high-2", "normal-1", "low-1", "low-2"]
        );
    }

    #[tokio::test]
    async fn a_full_queue_sheds_lower_classes_first_and_refuses_the_rest() {
        let admission = Arc::new(Admission::default());
        let priority = limited(1, 2);
        let _held = admission
            .admit("a", PriorityClass::Normal, &priority)
            .await
            .unwrap();
        let spawn = |class| {
            let admission = Arc::clone(&admission);
            let priority = priority.clone();
            tokio::spawn(async move { admission.admit("a", class, &priority).await.map(|_| ()) })
        };
        let low = spawn(PriorityClass::Low);
        tokio::task::yield_now().await;
        let normal = spawn(PriorityClass::Normal);
        tokio::task::yield_now().await;
        // Full (2 waiting): a high request displaces the low one.
        let high = spawn(PriorityClass::High);
        assert_eq!(low.await.unwrap(), Err(Shed::Displaced));
        // Full again, nothing lower than normal left to displace: refused.
        let refused = admission.admit("a", PriorityClass::Normal, &priority).await;
        assert_eq!(
            refused.unwrap_err(),
            Shed::QueueFull {
                class: PriorityClass::Normal
            }
        );
        high.abort();
        normal.abort();
    }

    #[tokio::test]
    async fn waiters_that_gave_up_do_not_take_slots() {
        let admission = Arc::new(Admission::default());
        let priority = limited(1, 4);
        let held = admission
            .admit("a", PriorityClass::Normal, &priority)
            .await
            .unwrap();
        let gave_up = {
            let admission = Arc::clone(&admission);
            let priority = priority.clone();
            tokio::spawn(async move { admission.admit("a", PriorityClass::High, &priority).await })
        };
        tokio::task::yield_now().await;
        gave_up.abort();
        let _ = gave_up.await;
        let next = {
            let admission = Arc::clone(&admission);
            let priority = priority.clone();
            tokio::spawn(async move {
                admission
                    .admit("a", PriorityClass::Low, &priority)
                    .await
                    .map(|slot| slot.is_some())
            })
        };
        tokio::task::yield_now().await;
        drop(held);
        assert_eq!(next.await.unwrap(), Ok(true));
    }

    #[test]
    fn classes_come_from_the_header_when_allowed_then_the_source_then_the_default() {
        let with = |header_allowed: bool| {
            let spec = TrafficPolicySpec {
                priority: Priority {
                    sources: vec![
                        PrioritySource {
                            from: "planner*".into(),
                            class: PriorityClass::High,
                        },
                        PrioritySource {
                            from: "planner-batch".into(),
                            class: PriorityClass::Low,
                        },
                        PrioritySource {
                            from: "batch".into(),
                            class: PriorityClass::Low,
                        },
                    ],
                    header_allowed,
                    ..Priority::default()
                },
                ..TrafficPolicySpec::default()
            };
            TrafficSettings::from_spec(&spec, None)
        };
        let traffic = with(false);
        assert_eq!(class_of(&traffic, "planner-1", None), PriorityClass::High);
        assert_eq!(
            class_of(&traffic, "planner-batch", None),
            PriorityClass::High,
            "the first matching source decides"
        );
        assert_eq!(class_of(&traffic, "batch", None), PriorityClass::Low);
        assert_eq!(class_of(&traffic, "other", None), PriorityClass::Normal);
        assert_eq!(
            class_of(&traffic, "batch", Some("high")),
            PriorityClass::Low,
            "the header is ignored unless allowed"
        );
        let traffic = with(true);
        assert_eq!(
            class_of(&traffic, "batch", Some(" High ")),
            PriorityClass::High
        );
        assert_eq!(
            class_of(&traffic, "planner-1", Some("LOW")),
            PriorityClass::Low
        );
        assert_eq!(
            class_of(&traffic, "other", Some("urgent!")),
            PriorityClass::Normal
        );
        assert_eq!(
            class_of(&traffic, "batch", Some("highest")),
            PriorityClass::Low,
            "a header naming no class leaves the source's"
        );
    }
}
