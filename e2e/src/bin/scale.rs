//! `make scale`: graceful in a big cluster, simulated with KWOK on this machine (graceful_e2e::scale
//! says what is real and what is not). Fake nodes, then a fleet that grows through the sizes
//! given (pods); at each size: the operator at rest, the time from a template change to the
//! first step, many GracefulRollouts at once against as many native rollouts, and the
//! operator's API requests per rollout by verb and resource, and real sidecars' API requests per
//! drain in a namespace of the fleet. Tables on stdout and in --out.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use graceful_e2e::cluster;
use graceful_e2e::scale::{self, Fleet, OperatorProcess, quantile};
use k8s_openapi::jiff::Timestamp;

#[derive(Parser)]
#[command(
    about = "The operator in a big cluster: KWOK fake nodes, thousands of pods, many rollouts at once"
)]
struct Args {
    /// Fake nodes.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Fleet sizes in pods, smallest first; the fleet grows in place.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    sizes: Vec<usize>,
    /// Pods per Deployment.
    #[arg(long, default_value_t = 10)]
    replicas: i32,
    /// Namespaces the Deployments are spread over.
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    /// Rollouts started at once (at most the fleet's Deployments); as many native ones are added.
    #[arg(long, default_value_t = 100)]
    at_once: usize,
    /// Single rollouts timed from the template change to the first step.
    #[arg(long, default_value_t = 20)]
    samples: usize,
    /// Seconds the operator is watched at rest.
    #[arg(long, default_value_t = 30)]
    rest: u64,
    /// Real (injected, on the real node) pods drained beside the fleet at each size.
    #[arg(long, default_value_t = 3)]
    real_pods: i32,
    #[arg(long, default_value = "target/scale/scale.md")]
    out: PathBuf,
}

struct Row {
    pods: usize,
    /// From the fleet rolled out to the operator at rest.
    quiet: Duration,
    managed: usize,
    rss_rest: f64,
    cpu_rest: f64,
    rest_requests_per_min: f64,
    first_step: (Duration, Duration),
    at_once: usize,
    graceful: (Duration, Duration),
    native: (Duration, Duration),
    rss_busy: f64,
    cpu_busy: f64,
    requests_per_rollout: f64,
    by_verb: Vec<((String, String), u64)>,
    unselected: Vec<((String, String), u64)>,
    sidecar_per_drain: f64,
    sidecar_by_verb: Vec<((String, String), u64)>,
    sidecar_unselected: u64,
    slices_beside: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = cluster::client().await?;
    scale::kwok(&["start"])?;
    scale::kwok(&["nodes", &args.nodes.to_string()])?;
    eprintln!(
        "scale: {} fake nodes Ready",
        scale::fake_nodes_ready(&client).await?
    );
    let mut fleet = Fleet::new(&client, args.namespaces, args.replicas).await?;
    let mut rows = Vec::new();
    for &pods in &args.sizes {
        let deployments = (pods / args.replicas as usize).max(1);
        let at_once = args.at_once.min(deployments);
        // Growing to 10,000 pods alone takes 15-20 min here (the apiserver creating and admitting them).
        let settle = Duration::from_secs(300) + Duration::from_millis(200) * pods as u32;
        eprintln!("scale: growing to {deployments} managed + {at_once} native Deployments");
        let grew = std::time::Instant::now();
        fleet.grow(deployments, at_once, settle).await?;
        eprintln!("scale: settled in {:.0?}", grew.elapsed());
        let op = OperatorProcess::leader(&client).await?;
        // Rolled out is not at rest: at 11,000 pods the operator was still reconciling the
        // fleet's creation events for minutes after, and its "rest" was 3,564 requests a minute.
        let quiet = until_quiet(&op, settle).await?;
        eprintln!("scale: the operator quiet {quiet:.0?} after the fleet settled");

        let from = Timestamp::now();
        let rest = Duration::from_secs(args.rest);
        let ((), rss_rest, cpu_rest) = op
            .during(async {
                tokio::time::sleep(rest).await;
                Ok(())
            })
            .await?;
        let rest_requests = op.requests(from, Timestamp::now())?.total();
        let rest_requests_per_min = rest_requests as f64 * 60.0 / rest.as_secs_f64();

        let first = fleet
            .first_step_latency(args.samples.min(deployments), settle)
            .await?;
        let first_step = (quantile(&first, 0.5), quantile(&first, 0.99));
        eprintln!(
            "scale: at rest {rss_rest:.1} MiB, {cpu_rest:.3} cores, {rest_requests_per_min:.0} requests/min; template change to first step p50 {} s, p99 {} s",
            secs(first_step.0),
            secs(first_step.1)
        );

        let from = Timestamp::now();
        let rolled = fleet.roll_at_once(&fleet.managed[..at_once], settle);
        let (took, rss_busy, cpu_busy) = op.during(rolled).await?;
        let requests = op.requests(from, Timestamp::now())?;
        let graceful = (quantile(&took, 0.5), quantile(&took, 1.0));
        let took = fleet.roll_at_once(&fleet.native[..at_once], settle).await?;
        let native = (quantile(&took, 0.5), quantile(&took, 1.0));
        let sidecars = fleet.sidecar_drains(args.real_pods, settle).await?;

        let row = Row {
            pods: fleet.pods(),
            quiet,
            managed: deployments,
            rss_rest,
            cpu_rest,
            rest_requests_per_min,
            first_step,
            at_once,
            graceful,
            native,
            rss_busy,
            cpu_busy,
            requests_per_rollout: requests.total() as f64 / at_once as f64,
            by_verb: requests.by_verb_and_resource().into_iter().collect(),
            unselected: requests.unselected().into_iter().collect(),
            sidecar_per_drain: sidecars.per_drain(),
            sidecar_by_verb: sidecars
                .requests
                .by_verb_and_resource()
                .into_iter()
                .collect(),
            sidecar_unselected: sidecars.requests.unselected().values().sum(),
            slices_beside: sidecars.slices_in_namespace,
        };
        eprintln!("{}", table(std::slice::from_ref(&row), &args));
        rows.push(row);
    }
    let report = table(&rows, &args);
    println!("{report}");
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).context("creating the report's directory")?;
    }
    std::fs::write(&args.out, &report).context("writing the report")?;
    eprintln!("scale: report in {}", args.out.display());
    drop(fleet);
    scale::kwok(&["down"])?;
    Ok(())
}

/// The operator at rest: under `QUIET_CORES` of a core over `QUIET_WINDOW`, a pace its
/// safety-net rechecks of settled GracefulRollouts (each every 10 min) stay under at 1,000.
const QUIET_CORES: f64 = 0.01;
const QUIET_WINDOW: Duration = Duration::from_secs(10);

/// Waits until the operator is at rest, or `bound` has passed (then "at rest" is measured as it
/// is, said on stderr); returns how long it waited.
async fn until_quiet(op: &OperatorProcess, bound: Duration) -> anyhow::Result<Duration> {
    let started = std::time::Instant::now();
    loop {
        let window = async {
            tokio::time::sleep(QUIET_WINDOW).await;
            Ok(())
        };
        let ((), _, cores) = op.during(window).await?;
        if cores < QUIET_CORES {
            return Ok(started.elapsed());
        }
        if started.elapsed() > bound {
            eprintln!(
                "scale: the operator still uses {cores:.3} cores; measuring it at rest anyway"
            );
            return Ok(started.elapsed());
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn table(rows: &[Row], args: &Args) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| pods (all) | GracefulRollouts | operator RSS MiB at rest / busy | operator CPU cores at rest / busy | API requests/min at rest | template change to first step s p50 / p99 | {0} at once: graceful s p50 / all | native s p50 / all | API requests per rollout | sidecar API requests per drain (EndpointSlices in its namespace) |",
        rows.first().map_or(0, |r| r.at_once)
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} / {:.1} | {:.3} / {:.3} | {:.0} | {} / {} | {} / {} | {} / {} | {:.1} | {:.2} ({}) |",
            r.pods,
            r.managed,
            r.rss_rest,
            r.rss_busy,
            r.cpu_rest,
            r.cpu_busy,
            r.rest_requests_per_min,
            secs(r.first_step.0),
            secs(r.first_step.1),
            secs(r.graceful.0),
            secs(r.graceful.1),
            secs(r.native.0),
            secs(r.native.1),
            r.requests_per_rollout,
            r.sidecar_per_drain,
            r.slices_beside,
        );
    }
    for r in rows {
        let _ = writeln!(
            out,
            "\nThe operator's API requests during the {} rollouts at {} pods, per rollout:\n\n| verb | resource | per rollout | without a selector |\n|---|---|---:|---:|",
            r.at_once, r.pods
        );
        for ((verb, resource), n) in &r.by_verb {
            let unselected = r
                .unselected
                .iter()
                .find(|(k, _)| k.0 == *verb && k.1 == *resource)
                .map_or(0, |(_, n)| *n);
            let _ = writeln!(
                out,
                "| {verb} | {resource} | {:.2} | {:.2} |",
                *n as f64 / r.at_once as f64,
                unselected as f64 / r.at_once as f64
            );
        }
    }
    for r in rows {
        let by: Vec<String> = r
            .sidecar_by_verb
            .iter()
            .map(|((verb, resource), n)| format!("{n} {verb} {resource}"))
            .collect();
        let _ = writeln!(
            out,
            "\nReal sidecars draining at {} pods, in a namespace of {} EndpointSlices, {} drains: {} ({} without a selector).",
            r.pods,
            r.slices_beside,
            args.real_pods,
            by.join(", "),
            r.sidecar_unselected
        );
    }
    for r in rows {
        let _ = writeln!(
            out,
            "\nAt {} pods the operator was at rest (under {QUIET_CORES} of a core over {:?}) {:.0?} after the fleet was rolled out.",
            r.pods, QUIET_WINDOW, r.quiet
        );
    }
    let _ = writeln!(
        out,
        "\n{} fake nodes (KWOK), {} pods per Deployment over {} namespaces, minServingSeconds 0; {} single rollouts timed to the first step; {} s at rest; {}; `make scale`.",
        args.nodes,
        args.replicas,
        args.namespaces,
        args.samples,
        args.rest,
        Timestamp::now().strftime("%Y-%m-%d")
    );
    out
}
