//! The baseline measurement (make baseline): the plain demo rolled out under steady load, failed
//! requests counted by vegeta. Prints one line per rollout and the total.

use clap::Parser;
use graceful_e2e::load::Load;
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::{cluster, rollout};

#[derive(Parser)]
#[command(about = "Failed requests of plain RollingUpdate rollouts under load")]
struct Args {
    #[arg(long, default_value_t = 5)]
    rollouts: usize,
    /// Requests per second over all connections.
    #[arg(long, default_value_t = 300)]
    rate: u32,
    #[arg(long, default_value_t = 8)]
    connections: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = cluster::client().await?;
    let ns = TestNamespace::create(&client, "baseline").await?;
    let load = Load {
        rate: args.rate,
        connections: args.connections,
        ..Load::default()
    };
    let figures = rollout::baseline(&ns, &load, args.rollouts).await?;
    println!("{figures}");
    let total = figures.total();
    println!(
        "baseline: {} failed of {} requests over {} rollouts ({:.2}%)",
        total.failed,
        total.sent,
        args.rollouts,
        100.0 * total.failed as f64 / total.sent.max(1) as f64
    );
    Ok(())
}
