//! How long the sidecar takes to answer: a Prometheus histogram of each request's time from its
//! arrival to the end of its response, observed on the request path without a lock.
//!
//! Written here rather than taken from prometheus-client: its `Histogram` takes a mutex on
//! every observation, which every traffic thread would contend for on every request. Here each
//! thread adds into a shard of its own (plain atomic adds, each shard on its own cache lines),
//! and a scrape sums the shards. A scrape may see a request's bucket and not yet its sum (or
//! the reverse); `_count` is always the `+Inf` bucket, as Prometheus expects.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds in seconds: from well under a millisecond (the sidecar's own cost on a fast
/// app) to the 10 s of a slow request; anything longer is in `+Inf`.
pub const BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BOUNDS_NANOS: [u64; 14] = {
    let mut nanos = [0; 14];
    let mut i = 0;
    while i < BOUNDS.len() {
        nanos[i] = (BOUNDS[i] * 1e9) as u64;
        i += 1;
    }
    nanos
};
const BUCKETS: usize = BOUNDS.len() + 1;

/// More shards than the sidecar has traffic threads in any sane config; threads beyond share.
const SHARDS: usize = 16;

/// One thread's counts. 15 buckets and a sum are 128 bytes: aligned so, no two shards share a
/// cache line (or the adjacent line the CPU fetches with it).
#[repr(align(128))]
#[derive(Debug, Default)]
struct Shard {
    /// Non-cumulative: `buckets[i]` counts the requests in `(BOUNDS[i-1], BOUNDS[i]]`.
    buckets: [AtomicU64; BUCKETS],
    sum_nanos: AtomicU64,
}

/// Each shard its own allocation: a [`Timer`] holds its thread's shard, so the reference count
/// a request bumps is one no other thread touches.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    shards: Arc<[Arc<Shard>; SHARDS]>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            shards: Arc::new(std::array::from_fn(|_| Arc::default())),
        }
    }
}

thread_local! {
    /// This thread's shard, handed out round-robin as threads first observe.
    static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
}
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

fn shard_index() -> usize {
    SHARD.with(|s| {
        s.get().unwrap_or_else(|| {
            let i = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
            s.set(Some(i));
            i
        })
    })
}

impl LatencyHistogram {
    pub fn observe(&self, took: Duration) {
        self.shards[shard_index()].observe(took);
    }

    /// Starts timing a request; the time is observed when the returned guard drops.
    pub fn start(&self) -> Timer {
        Timer {
            shard: self.shards[shard_index()].clone(),
            started: Instant::now(),
        }
    }

    /// (sum in seconds, count, non-cumulative buckets with `+Inf` last), over all shards.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut counts = [0u64; BUCKETS];
        let mut sum_nanos = 0u64;
        for shard in self.shards.iter() {
            for (total, bucket) in counts.iter_mut().zip(&shard.buckets) {
                *total += bucket.load(Ordering::Relaxed);
            }
            sum_nanos = sum_nanos.wrapping_add(shard.sum_nanos.load(Ordering::Relaxed));
        }
        let bounds = BOUNDS.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds.zip(counts).collect();
        (sum_nanos as f64 / 1e9, counts.iter().sum(), buckets)
    }
}

impl Shard {
    fn observe(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_NANOS.partition_point(|&bound| bound < nanos);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Observes the time since `start()` when dropped: when the response's last frame is sent,
/// or when the client went away first. Into the shard of the thread that started it (a
/// traffic thread finishes the requests it starts).
pub struct Timer {
    shard: Arc<Shard>,
    started: Instant,
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.shard.observe(self.started.elapsed());
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(h: &LatencyHistogram) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("took_seconds", "Time taken", h.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn each_observation_counts_in_its_bucket_and_above() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(300)); // <= 0.5 ms
        h.observe(Duration::from_micros(500)); // on a bound: that bucket (le is inclusive)
        h.observe(Duration::from_millis(3)); // <= 5 ms
        h.observe(Duration::from_secs(60)); // only +Inf
        let text = encoded(&h);
        for line in [
            "took_seconds_sum 60.0038",
            "took_seconds_count 4",
            "took_seconds_bucket{le=\"0.0005\"} 2",
            "took_seconds_bucket{le=\"0.0025\"} 2",
            "took_seconds_bucket{le=\"0.005\"} 3",
            "took_seconds_bucket{le=\"10.0\"} 3",
            "took_seconds_bucket{le=\"+Inf\"} 4",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn threads_add_into_their_own_shards_and_a_scrape_sees_them_all() {
        let h = LatencyHistogram::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        drop(h.start());
                    }
                });
            }
        });
        let (_, count, buckets) = h.snapshot();
        assert_eq!(count, 4000);
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 0)));
        let used = h
            .shards
            .iter()
            .filter(|s| s.buckets.iter().any(|b| b.load(Ordering::Relaxed) > 0))
            .count();
        assert!(used >= 2, "4 threads added into {used} shard(s)");
    }
}
