//! `make demo`'s measurement: graceful-demo deployed three ways, each rolled out under the same
//! steady load from vegeta, one table at the end.
//!
//! 1. plain: no sidecar, the default RollingUpdate;
//! 2. injected: `graceful.dev/inject: "true"`, the same RollingUpdate (`kubectl rollout restart`);
//! 3. managed: injected and sequenced by a GracefulRollout.

use std::time::{Duration, Instant};

use clap::Parser;
use graceful_e2e::graceful;
use graceful_e2e::load::{Load, LoadReport};
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::{Result, cluster, demo, rollout, wait};

#[derive(Parser)]
#[command(about = "Requests dropped by rollouts with and without graceful, on the e2e cluster")]
struct Args {
    /// Rollouts per way.
    #[arg(long, default_value_t = 3)]
    rollouts: usize,
    /// Requests per second over all connections.
    #[arg(long, default_value_t = 300)]
    rate: u32,
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// Keep the namespaces afterwards, to look around.
    #[arg(long)]
    keep: bool,
}

struct Row {
    way: &'static str,
    total: LoadReport,
    walls: Vec<Duration>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

const APP: &str = "web";
const TIMEOUT: Duration = Duration::from_secs(300);

async fn plain(
    ns: &TestNamespace,
    load: &Load,
    n: usize,
    injected: bool,
) -> Result<Vec<(LoadReport, Duration)>> {
    if injected {
        ns.apply(&graceful::injected_deployment(APP, 3, "v1"))
            .await?;
        ns.apply(&graceful::named_port_service(APP)).await?;
    } else {
        ns.apply(&demo::deployment(APP, 3, "v1")).await?;
        ns.apply(&demo::service(APP)).await?;
    }
    wait::rollout(&ns.api(), APP, Duration::from_secs(180)).await?;
    let ip = wait::cluster_ip(&ns.api(), APP).await?;
    wait::service_serving(&ns.api(), APP, &ip, 80, 3, Duration::from_secs(60)).await?;
    let url = format!("http://{ip}/");
    let figures = rollout::rollouts_under_load(ns, APP, &url, load, n, TIMEOUT).await?;
    Ok(figures.rollouts.into_iter().zip(figures.wall).collect())
}

async fn managed(ns: &TestNamespace, load: &Load, n: usize) -> Result<Vec<(LoadReport, Duration)>> {
    let url = graceful::deploy_managed_demo(ns, APP, 3, serde_json::json!({})).await?;
    let mut out = Vec::new();
    for i in 1..=n {
        let (_, report, wall) = graceful::rollout_under_load(ns, APP, &url, load, TIMEOUT).await?;
        eprintln!(
            "managed rollout {i}/{n}: {report}, rolled out in {:.1}s",
            wall.as_secs_f64()
        );
        out.push((report, wall));
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = cluster::client().await?;
    let load = Load {
        rate: args.rate,
        connections: args.connections,
        ..Load::default()
    };
    let mut rows = Vec::new();
    for (i, way) in ["plain", "injected", "managed"].into_iter().enumerate() {
        let started = Instant::now();
        eprintln!(
            "\n== [{}/3] {way}: {} rollouts of 3 replicas under {} req/s over {} keep-alive connections",
            i + 1,
            args.rollouts,
            args.rate,
            args.connections
        );
        let ns = TestNamespace::create(&client, &format!("demo-{way}")).await?;
        let result = match way {
            "plain" => plain(&ns, &load, args.rollouts, false).await,
            "injected" => plain(&ns, &load, args.rollouts, true).await,
            _ => managed(&ns, &load, args.rollouts).await,
        };
        let runs = match result {
            Ok(r) => r,
            Err(e) => {
                ns.print_diagnostics();
                return Err(e.into());
            }
        };
        let mut total = LoadReport::default();
        for (r, _) in &runs {
            total.merge(r);
        }
        eprintln!("== {way} done in {:.0}s", started.elapsed().as_secs_f64());
        rows.push(Row {
            way,
            total,
            walls: runs.into_iter().map(|(_, w)| w).collect(),
        });
        if args.keep {
            std::mem::forget(ns);
        }
    }

    println!(
        "\n| way | rollouts | requests sent | failed | p99 (ms) | rollout wall time (median) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.1}s |",
            r.way,
            r.walls.len(),
            r.total.sent,
            r.total.failed,
            r.total.p99_ms,
            median(r.walls.clone()).as_secs_f64()
        );
    }
    println!(
        "\nplain: the demo app alone (exits on SIGTERM), RollingUpdate; injected: graceful.dev/inject=true, \
         same RollingUpdate; managed: injected + GracefulRollout. Failed = refused, reset, timed out or non-2xx, \
         as vegeta counted them."
    );
    Ok(())
}
