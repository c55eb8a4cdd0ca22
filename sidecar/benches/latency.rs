//! What timing a request costs the request path: the sidecar's sharded `LatencyHistogram`
//! against prometheus-client's `Histogram` (a mutex per observation) and against not timing at
//! all, side by side in one run, on 1 thread and on every core at once (each traffic thread
//! observes its own requests). Medians of interleaved rounds, in ns per request.
//!   cargo bench -p graceful-sidecar --bench latency   (ROUNDS=9, OBSERVATIONS=2000000)

use std::hint::black_box;
use std::time::Instant;

use graceful_sidecar::latency::{BOUNDS, LatencyHistogram};
use prometheus_client::metrics::histogram::Histogram;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// ns per request of `each` run `n` times on each of `threads` threads at once.
fn per_request(threads: usize, n: usize, each: &(dyn Fn() + Sync)) -> f64 {
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..n {
                    each();
                }
            });
        }
    });
    started.elapsed().as_nanos() as f64 / n as f64
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let rounds = env("ROUNDS", 9);
    let n = env("OBSERVATIONS", 2_000_000);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let sharded = LatencyHistogram::default();
    let locked = Histogram::new(BOUNDS);
    // Each way takes the request's start and end time, as the proxy does.
    let untimed = || {
        black_box(Instant::now());
        black_box(Instant::now());
    };
    // As in the proxy, each request's guard owns what it observes into (the body outlives the
    // handler): prometheus-client's a clone of the Histogram, ours its thread's shard.
    let sharded_way = || drop(black_box(sharded.start()));
    let locked_way = || {
        let guard = (locked.clone(), Instant::now());
        let (histogram, started) = black_box(guard);
        histogram.observe(started.elapsed().as_secs_f64());
    };
    let ways: [(&str, &(dyn Fn() + Sync)); 3] = [
        ("two clock reads, no histogram", &untimed),
        ("graceful LatencyHistogram", &sharded_way),
        ("prometheus-client Histogram", &locked_way),
    ];
    println!("| way | ns/request, 1 thread | ns/request, {cores} threads at once |");
    println!("|---|---:|---:|");
    let mut results = vec![(Vec::new(), Vec::new()); ways.len()];
    for _ in 0..rounds {
        for (i, (_, way)) in ways.iter().enumerate() {
            results[i].0.push(per_request(1, n, *way));
            results[i].1.push(per_request(cores, n, *way));
        }
    }
    for ((name, _), (one, all)) in ways.iter().zip(results) {
        println!("| {name} | {:.1} | {:.1} |", median(one), median(all));
    }
    println!(
        "\nMedians of {rounds} interleaved rounds of {n} requests per thread; {cores} cores; wall time per request per thread."
    );
}
