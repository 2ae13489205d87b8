//! A deadline timer kept from one request to the next on a connection. Registering a timer
//! with tokio's wheel and taking it out again costs a lock and a wheel update each; a
//! connection that serves request after request with the same allowance would pay that
//! twice per request. Here the timer stays registered at an earlier request's deadline and
//! only the deadline to check moves: when the timer fires and the current deadline is still
//! ahead, the timer is moved to it then (at most once per allowance, not once per request).

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::time::{Instant, Sleep};

/// The instant `allowance` from now; an allowance too long to represent ends in 30 years.
pub fn deadline_after(allowance: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(allowance)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400))
}

/// A connection's timer, made on first use.
#[derive(Debug, Default)]
pub struct ReusedTimer {
    sleep: Option<Pin<Box<Sleep>>>,
}

impl ReusedTimer {
    /// Ready once `deadline` has passed. The timer never fires after the deadline: one set
    /// later (a longer allowance before) is moved to it at once.
    pub fn poll_deadline(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        loop {
            ready!(sleep.as_mut().poll(cx));
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            // Set for an earlier request: move it to this one's deadline.
            sleep.as_mut().reset(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn wait(timer: &mut ReusedTimer, deadline: Instant) {
        std::future::poll_fn(|cx| timer.poll_deadline(deadline, cx)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_each_deadline_whether_earlier_or_later_than_the_last() {
        let mut timer = ReusedTimer::default();
        let start = Instant::now();
        wait(&mut timer, start + Duration::from_secs(5)).await;
        assert_eq!(Instant::now(), start + Duration::from_secs(5));
        // A later deadline on a timer that already fired.
        wait(&mut timer, start + Duration::from_secs(8)).await;
        assert_eq!(Instant::now(), start + Duration::from_secs(8));
        // A deadline set while the timer waits for a later one: it fires at the earlier.
        let mut later = ReusedTimer::default();
        let far = Instant::now() + Duration::from_secs(60);
        assert!(
            std::future::poll_fn(|cx| Poll::Ready(later.poll_deadline(far, cx)))
                .await
                .is_pending()
        );
        let near = Instant::now() + Duration::from_secs(1);
        wait(&mut later, near).await;
        assert_eq!(Instant::now(), near);
    }

    #[tokio::test(start_paused = true)]
    async fn an_allowance_too_long_to_represent_ends_far_away() {
        let far = deadline_after(Duration::MAX);
        assert!(far > Instant::now() + Duration::from_secs(29 * 365 * 86_400));
        assert_eq!(
            deadline_after(Duration::from_secs(3)),
            Instant::now() + Duration::from_secs(3)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_left_at_an_old_deadline_waits_for_the_new_one() {
        let mut timer = ReusedTimer::default();
        let start = Instant::now();
        // Registered for 2 s, then the request ends early (nobody waits for it).
        let first = start + Duration::from_secs(2);
        assert!(
            std::future::poll_fn(|cx| Poll::Ready(timer.poll_deadline(first, cx)))
                .await
                .is_pending()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The next request allows 2 s from now: the timer fires at 2 s for the old one and
        // must not end this one then.
        let second = Instant::now() + Duration::from_secs(2);
        wait(&mut timer, second).await;
        assert_eq!(Instant::now(), second);
    }
}
