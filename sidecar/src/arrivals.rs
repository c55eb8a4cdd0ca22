//! When traffic arrives (new connections and new requests), and the quiet window the drain
//! derives from it: how long a silence must last before it says that every data plane has let
//! the pod go. docs/drain.md gives the rule's reasoning and its residual risk.
//!
//! The request path pays one clock read and, at most once per bucket, one relaxed store: the
//! record is a ring of 50 ms buckets over the last 10 s, each holding the number of the last
//! bucket period it saw traffic in (so a stale slot reads as empty without ever being cleared).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// Resolution of the record.
pub const BUCKET: Duration = Duration::from_millis(50);
/// How far back the traffic before the trigger is read.
pub const LOOKBACK: Duration = Duration::from_secs(10);
const SLOTS: usize = (LOOKBACK.as_millis() / BUCKET.as_millis()) as usize;

pub struct Arrivals {
    born: Instant,
    /// slot `b % SLOTS` holds `b + 1` when bucket `b` saw traffic (0: never).
    slots: Box<[AtomicU64]>,
    /// The last arrival, in ms since `born` (0: none yet).
    last_ms: AtomicU64,
    /// The last new connection, in ms since `born` (0: none yet).
    last_connection_ms: AtomicU64,
}

impl Default for Arrivals {
    fn default() -> Self {
        Self::new()
    }
}

impl Arrivals {
    pub fn new() -> Self {
        Self {
            born: Instant::now(),
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            last_ms: AtomicU64::new(0),
            last_connection_ms: AtomicU64::new(0),
        }
    }

    /// A request started; `first` on its connection. A connection counts at its first
    /// request, not at its accept: a TCP health check that connects and leaves says nothing
    /// about where requests are routed, and keeps coming long after they stopped.
    pub fn request(&self, first: bool) {
        let ms = self.note();
        if first {
            bump(&self.last_connection_ms, ms);
        }
    }

    fn note(&self) -> u64 {
        // +1 so that an arrival in the first millisecond still reads as one.
        let ms = self.born.elapsed().as_millis() as u64 + 1;
        let bucket = ms / BUCKET.as_millis() as u64;
        let slot = &self.slots[bucket as usize % SLOTS];
        if slot.load(Ordering::Relaxed) != bucket + 1 {
            slot.store(bucket + 1, Ordering::Relaxed);
        }
        bump(&self.last_ms, ms);
        ms
    }

    /// The last arrival of any kind, if there was one.
    pub fn last(&self) -> Option<Instant> {
        self.at(self.last_ms.load(Ordering::Relaxed))
    }

    /// The last new connection, if there was one.
    pub fn last_connection(&self) -> Option<Instant> {
        self.at(self.last_connection_ms.load(Ordering::Relaxed))
    }

    fn at(&self, ms: u64) -> Option<Instant> {
        (ms > 0).then(|| self.born + Duration::from_millis(ms - 1))
    }

    /// Which buckets of the lookback before `until` saw traffic, oldest first. Buckets from
    /// before the process started are left out: nothing is known of them.
    pub fn record(&self, until: Instant) -> Vec<bool> {
        let end = until.duration_since(self.born).as_millis() as u64 / BUCKET.as_millis() as u64;
        let start = end.saturating_sub(SLOTS as u64 - 1);
        (start..=end)
            .map(|b| self.slots[b as usize % SLOTS].load(Ordering::Relaxed) == b + 1)
            .collect()
    }

    /// [`Arrivals::record`] from `since`'s bucket on (at most the lookback).
    pub fn record_since(&self, since: Instant, until: Instant) -> Vec<bool> {
        let bucket =
            |t: Instant| t.saturating_duration_since(self.born).as_millis() / BUCKET.as_millis();
        let record = self.record(until);
        // The record ends with `until`'s bucket.
        let keep = (bucket(until) - bucket(since).min(bucket(until)) + 1) as usize;
        record[record.len().saturating_sub(keep)..].to_vec()
    }
}

/// Only ever raises the value; skips the atomic read-modify-write when it would not.
fn bump(cell: &AtomicU64, ms: u64) {
    if cell.load(Ordering::Relaxed) < ms {
        cell.fetch_max(ms, Ordering::Relaxed);
    }
}

/// The rule's knobs.
#[derive(Clone, Copy, Debug)]
pub struct QuietRule {
    /// The shortest window, whatever the traffic: below it a scheduling hiccup of the
    /// client or the balancer could pass for silence.
    pub min: Duration,
    /// The window of a pod that had no traffic at all in the lookback.
    pub idle: Duration,
    /// The longest window: a pod with sparse traffic waits this long at most.
    pub max: Duration,
}

/// How many of the longest gaps seen before the trigger a silence must last.
pub const GAP_FACTOR: u32 = 3;
/// The same after deregistration, doubled: a lagging data plane's share of this pod can halve
/// while it still sends (in a rollout it lists the new pods before it drops this one).
pub const LAGGING_GAP_FACTOR: u32 = 2 * GAP_FACTOR;

/// Where a drain's quiet window came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// No traffic in the lookback.
    Idle,
    /// The gaps of the traffic in the lookback.
    Traffic,
    /// `--quiet-window DUR`.
    Fixed,
    /// The gaps of the traffic that kept coming after deregistration: a data plane that lags
    /// the others sends only its share of what all of them sent before, so more sparsely.
    Lagging,
}

/// The window chosen for one drain, and why.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct QuietWindow {
    pub seconds: f64,
    pub basis: Basis,
    /// The longest gap between arrivals before the trigger (bucket resolution), if any.
    pub longest_gap_seconds: Option<f64>,
}

impl QuietWindow {
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }
}

impl QuietRule {
    /// The window from the traffic before the trigger (`record`, oldest bucket first, the
    /// trigger's bucket last): `GAP_FACTOR` times the typical gap between arrivals, within
    /// [min, max]; `idle` when nothing came. The typical gap is the longest one seen (the open
    /// gap since the last arrival included) or the mean one (the record's span over the number
    /// of buckets with traffic), whichever is longer: a few arrivals show little of their gaps.
    pub fn window(&self, record: &[bool]) -> QuietWindow {
        let Some(first) = record.iter().position(|&b| b) else {
            return QuietWindow {
                seconds: self.idle.as_secs_f64(),
                basis: Basis::Idle,
                longest_gap_seconds: None,
            };
        };
        // Empty buckets in a row after the first arrival, up to the trigger.
        let mut longest = 0;
        let mut run = 0;
        for &seen in &record[first..] {
            run = if seen { 0 } else { run + 1 };
            longest = longest.max(run);
        }
        // Two arrivals one empty bucket apart can be up to two buckets apart in time.
        let seen = record.iter().filter(|&&b| b).count() as u32;
        let mean = BUCKET * record.len() as u32 / seen;
        let gap = (BUCKET * (longest + 1)).max(mean);
        let window = (gap * GAP_FACTOR).clamp(self.min, self.max.max(self.min));
        QuietWindow {
            seconds: window.as_secs_f64(),
            basis: Basis::Traffic,
            longest_gap_seconds: Some(gap.as_secs_f64()),
        }
    }
}

impl QuietRule {
    /// `window` once traffic kept coming after deregistration (`since`: the record from then
    /// on): `LAGGING_GAP_FACTOR` times the longest gap between two of those arrivals, when that is
    /// longer, up to `max`. Only closed gaps count (the silence since the last arrival is what
    /// the window measures), and a fixed window stays as asked. It only ever grows: a silence
    /// as long as the lagging traffic's own gaps is no sign that it stopped.
    pub fn widened(&self, window: QuietWindow, since: &[bool]) -> QuietWindow {
        if window.basis == Basis::Fixed {
            return window;
        }
        let mut longest = None;
        let mut run = 0;
        let mut seen = false;
        for &arrival in since {
            if arrival {
                if seen {
                    longest = longest.max(Some(run));
                }
                seen = true;
                run = 0;
            } else {
                run += 1;
            }
        }
        let Some(longest) = longest else {
            return window;
        };
        let gap = BUCKET * (longest + 1);
        let wider = (gap * LAGGING_GAP_FACTOR).min(self.max.max(self.min));
        if wider.as_secs_f64() <= window.seconds {
            return window;
        }
        QuietWindow {
            seconds: wider.as_secs_f64(),
            basis: Basis::Lagging,
            longest_gap_seconds: Some(gap.as_secs_f64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: QuietRule = QuietRule {
        min: Duration::from_millis(250),
        idle: Duration::from_secs(1),
        max: Duration::from_secs(10),
    };

    fn record(pattern: &str) -> Vec<bool> {
        pattern.chars().map(|c| c == 'x').collect()
    }

    #[test]
    fn no_traffic_is_idle() {
        let w = RULE.window(&record(&".".repeat(SLOTS)));
        assert_eq!((w.seconds, w.basis), (1.0, Basis::Idle));
        assert_eq!(RULE.window(&[]).basis, Basis::Idle);
    }

    #[test]
    fn busy_traffic_gets_the_minimum() {
        // An arrival in every bucket: gaps under 100 ms, 3 x 50 ms < min.
        let w = RULE.window(&record(&"x".repeat(SLOTS)));
        assert_eq!((w.seconds, w.basis), (0.25, Basis::Traffic));
        // One empty bucket now and then: gaps up to 100 ms -> 300 ms.
        let w = RULE.window(&record(&"xx.x".repeat(SLOTS / 4)));
        assert!((w.seconds - 0.3).abs() < 1e-9, "{w:?}");
    }

    #[test]
    fn sparse_traffic_waits_three_gaps() {
        // An arrival per second: 19 empty buckets between -> gap 1 s -> 3 s.
        let second = format!("x{}", ".".repeat(19));
        let w = RULE.window(&record(&second.repeat(10)));
        assert!((w.seconds - 3.0).abs() < 1e-9, "{w:?}");
        assert_eq!(w.longest_gap_seconds, Some(1.0));
    }

    #[test]
    fn the_silence_since_the_last_arrival_counts_as_a_gap() {
        // Busy, then 2 s quiet before the trigger: the traffic may be arriving in bursts.
        let w = RULE.window(&record(&format!("{}{}", "x".repeat(160), ".".repeat(40))));
        assert!((w.seconds - 6.15).abs() < 1e-9, "{w:?}");
    }

    #[test]
    fn the_time_before_the_first_arrival_counts_only_in_the_mean() {
        // A pod that joined a balancer 2.5 s before the trigger, busy since: 50 of 200 buckets,
        // a mean gap of 200 ms.
        let w = RULE.window(&record(&format!("{}{}", ".".repeat(150), "x".repeat(50))));
        assert!((w.seconds - 0.6).abs() < 1e-9, "{w:?}");
    }

    #[test]
    fn few_arrivals_count_by_their_mean_gap() {
        // Two arrivals in 10 s, close together: the gap between them says little, the rate
        // (one per 5 s) says the next may be seconds away.
        let w = RULE.window(&record(&format!("{}xx", ".".repeat(198))));
        assert_eq!(w.seconds, 10.0);
        let w = RULE.window(&record(&format!("{}x.", ".".repeat(8))));
        assert!(
            (w.seconds - 1.5).abs() < 1e-9,
            "one arrival in 0.5 s: {w:?}"
        );
    }

    #[test]
    fn long_gaps_are_capped() {
        let w = RULE.window(&record(&format!("x{}", ".".repeat(199))));
        assert_eq!(w.seconds, 10.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_record_shows_what_arrived_and_forgets_what_is_older_than_the_lookback() {
        let a = Arrivals::new();
        assert_eq!(a.last(), None);
        a.request(false);
        tokio::time::advance(Duration::from_millis(500)).await;
        a.request(true);
        let r = a.record(Instant::now());
        assert_eq!(r.len(), 11, "only the buckets since the start");
        assert_eq!(r.iter().filter(|&&b| b).count(), 2, "{r:?}");
        assert!(r[0] && r[10]);
        assert!(a.last_connection().is_some());
        assert_eq!(a.last(), a.last_connection());

        // 12 s later the old arrivals are outside the lookback, even where slots are reused.
        tokio::time::advance(Duration::from_secs(12)).await;
        let r = a.record(Instant::now());
        assert_eq!(r.len(), SLOTS);
        assert!(r.iter().all(|&b| !b), "stale slots read as empty");
        a.request(false);
        assert_eq!(a.record(Instant::now()).iter().filter(|&&b| b).count(), 1);
    }

    #[test]
    fn traffic_after_deregistration_widens_the_window_to_its_own_gaps() {
        let busy = RULE.window(&record(&"x".repeat(SLOTS)));
        assert_eq!(busy.seconds, 0.25);
        // A lagging data plane's share: an arrival every 400 ms (8 buckets).
        let w = RULE.widened(busy, &record(&"x.......".repeat(5)));
        assert_eq!(w.basis, Basis::Lagging);
        assert!((w.seconds - 2.4).abs() < 1e-9, "{w:?}");
        assert_eq!(w.longest_gap_seconds, Some(0.4));
        // Gaps shorter than the window's change nothing; nor does a single arrival, nor the
        // silence since the last one.
        assert_eq!(RULE.widened(w, &record("x.......x...x")), w);
        assert_eq!(
            RULE.widened(busy, &record(&format!("x{}", ".".repeat(100)))),
            busy
        );
        assert_eq!(RULE.widened(busy, &record(&".".repeat(100))), busy);
        // Up to the cap; a fixed window stays as asked.
        let sparse = RULE.widened(busy, &record(&format!("x{}x", ".".repeat(150))));
        assert_eq!(sparse.seconds, 10.0);
        let fixed = QuietWindow {
            seconds: 0.0,
            basis: Basis::Fixed,
            longest_gap_seconds: None,
        };
        assert_eq!(RULE.widened(fixed, &record("x...x")), fixed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_record_since_a_moment_starts_at_its_bucket() {
        let arrivals = Arrivals::new();
        tokio::time::advance(Duration::from_millis(120)).await;
        arrivals.request(true);
        let since = Instant::now();
        tokio::time::advance(Duration::from_millis(200)).await;
        arrivals.request(true);
        let now = Instant::now();
        let all = arrivals.record(now);
        let after = arrivals.record_since(since, now);
        assert_eq!(after.len(), 5, "{after:?}");
        assert_eq!(after, ["x", ".", ".", ".", "x"].map(|c| c == "x"));
        assert_eq!(&all[all.len() - 5..], &after[..]);
        // Before the process started, or longer ago than the lookback: the whole record.
        assert_eq!(arrivals.record_since(arrivals.born, now), all);
    }
}
