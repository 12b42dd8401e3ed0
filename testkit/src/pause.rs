//! Sleeping for a given time and no longer, so a benchmark knows what the
//! backend's latency really is.
//!
//! tokio's timer ticks in whole milliseconds and rounds up, so a plain
//! `sleep(100 ms)` ends 100–102 ms later; a benchmark that subtracts the
//! nominal 100 ms would charge the difference to palaver. [`until`] uses the
//! timer for the coarse part only.

use std::time::Duration;

use tokio::time::Instant;

/// Margin left by the coarse part of a pause: tokio's timer ticks in whole
/// milliseconds and rounds up, so its sleeps end up to ~2 ms late.
const COARSE_MARGIN: Duration = Duration::from_millis(3);
/// The last stretch of a pause, spent yielding on the worker that writes the
/// reply: waking a parked thread takes tens of microseconds, and hundreds on
/// a VM whose idle vCPUs halt, which a benchmark would charge to palaver.
const SPIN: Duration = Duration::from_micros(300);

/// Returns at `deadline` (a few microseconds after it), or at once if it has
/// passed.
///
/// Three stages: tokio's timer up to [`COARSE_MARGIN`] before the end, then
/// `std::thread::sleep` on a blocking thread (tens of microseconds late at
/// most) up to [`SPIN`] before it, then yielding until the end.
pub async fn until(deadline: Instant) {
    if deadline <= Instant::now() {
        return;
    }
    if let Some(coarse) = deadline.checked_sub(COARSE_MARGIN) {
        tokio::time::sleep_until(coarse).await;
    }
    if let Some(fine) = deadline.checked_sub(SPIN) {
        let rest = fine.saturating_duration_since(Instant::now());
        if !rest.is_zero() {
            let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
        }
    }
    while Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
}

/// [`until`] `d` from now.
pub async fn pause(d: Duration) {
    until(Instant::now() + d).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ends_at_the_deadline_not_at_the_next_timer_tick() {
        // tokio's timer alone ends a 20.3 ms sleep at 21 ms or later; the
        // pause must end within a small part of that millisecond. Best of
        // five, so that one descheduling on a busy machine does not decide.
        let d = Duration::from_micros(20_300);
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let start = Instant::now();
            pause(d).await;
            let took = start.elapsed();
            assert!(took >= d, "ended early: {took:?} for {d:?}");
            best = best.min(took - d);
        }
        assert!(best < Duration::from_micros(400), "best overshoot {best:?}");
    }

    #[tokio::test]
    async fn a_past_deadline_returns_at_once() {
        let start = Instant::now();
        until(start - Duration::from_millis(1)).await;
        pause(Duration::ZERO).await;
        assert!(start.elapsed() < Duration::from_millis(5));
    }
}
