//! Per-object back-off of failed reconciles. A GracefulRollout whose reconcile fails (its
//! Deployment unreadable, the apiserver overloaded) is retried after 1 s, then 2, 4 … up to
//! 5 min, and from the start again once a reconcile of it succeeds. A fixed retry interval
//! turns a thousand broken objects into a steady load on an apiserver that may be the
//! reason they fail; one object's failures never slow another's retries.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

const FIRST: Duration = Duration::from_secs(1);
const LONGEST: Duration = Duration::from_secs(300);

/// Consecutive failures of each object that is failing (none for the others).
#[derive(Default)]
pub struct Backoffs {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoffs {
    /// Counts a failure of `key`; returns how long to wait before retrying it.
    pub fn failed(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        let delay = FIRST.saturating_mul(1 << (*n).min(16)).min(LONGEST);
        *n = n.saturating_add(1);
        delay
    }

    /// A reconcile of `key` succeeded: its next failure starts again at `FIRST`.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// How many objects are failing now.
    #[cfg(test)]
    fn failing(&self) -> usize {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_per_object_up_to_the_cap_and_reset_on_success() {
        let b = Backoffs::default();
        let delays: Vec<u64> = (0..11).map(|_| b.failed("shop/web").as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        // Another object's failures are its own.
        assert_eq!(b.failed("shop/cart"), FIRST);
        assert_eq!(b.failing(), 2);
        b.succeeded("shop/web");
        assert_eq!(b.failed("shop/web"), FIRST);
        b.succeeded("shop/web");
        b.succeeded("shop/cart");
        assert_eq!(b.failing(), 0);
    }
}
