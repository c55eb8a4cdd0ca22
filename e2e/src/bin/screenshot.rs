//! `make screenshot`: the chart's dashboard queries drawn by a real Prometheus during a
//! GracefulRollout under load, saved as a PNG (docs/dashboard.png). Grafana cannot be had on
//! this machine (neither Debian nor npm ship it), so the panels are Prometheus' own graph page,
//! one graph per dashboard panel, rendered by headless Chromium (Debian's).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use graceful_e2e::chart::{self, chart_dir};
use graceful_e2e::cluster;
use graceful_e2e::graceful;
use graceful_e2e::load::Load;
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::prometheus::{INTERVAL, Prometheus};
use graceful_operator::crd::GracefulRollout;
use serde_json::json;

/// The dashboard panels drawn, by title: a rollout and its drains at a glance.
const PANELS: &[&str] = &[
    "GracefulRollouts by phase",
    "Sidecars by drain phase",
    "Drain phase time, draining pods",
    "Requests served after the drain began",
    "Requests",
    "Open connections",
];

#[derive(Parser)]
#[command(about = "Screenshot of the dashboard's queries during a GracefulRollout under load")]
struct Args {
    /// Where the PNG goes.
    #[arg(long, default_value = "docs/dashboard.png")]
    out: PathBuf,
    /// Rollouts before the one the screenshot is taken in (history on the graphs).
    #[arg(long, default_value_t = 2)]
    before: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let exprs = panel_exprs()?;
    let client = cluster::client().await?;
    let ns = TestNamespace::create(&client, "screenshot").await?;
    let prometheus = Prometheus::start(client.clone(), &chart::alert_rules()).await?;
    let scraping = std::time::Instant::now();
    let url = graceful::deploy_managed_demo(&ns, "web", 3, json!({"minServingSeconds": 2})).await?;
    let (shot, report) = Load::default()
        .during(&url, async {
            for i in 1..=args.before {
                let since = graceful::trigger(&ns, "web").await?;
                graceful::wait_rollout_finished(&ns, "web", since, Duration::from_secs(180))
                    .await?;
                eprintln!("rollout {i} done");
            }
            // The last one is photographed while a pod drains, after two scrapes of it.
            let since = graceful::trigger(&ns, "web").await?;
            graceful_e2e::wait::until("a pod draining", Duration::from_secs(120), || async {
                let gr = ns.api::<GracefulRollout>().get("web").await?;
                Ok(gr.status.is_some_and(|s| s.draining > 0).then_some(()))
            })
            .await?;
            tokio::time::sleep(2 * INTERVAL).await;
            // The graphs span what Prometheus has seen, to the next 10 s.
            let range = Duration::from_secs(scraping.elapsed().as_secs().div_ceil(10) * 10);
            let page = prometheus.graph_url(&exprs, range);
            let out = args.out.clone();
            let shot = tokio::task::spawn_blocking(move || screenshot(&page, &out)).await?;
            graceful::wait_rollout_finished(&ns, "web", since, Duration::from_secs(180)).await?;
            Ok::<_, anyhow::Error>(shot)
        })
        .await?;
    shot??;
    eprintln!("load: {report}");
    if report.failed != 0 {
        bail!("requests failed during the screenshot's rollouts: {report}");
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// The first query of each panel in `PANELS`, with Grafana's `$__rate_interval` as 4 scrapes.
fn panel_exprs() -> anyhow::Result<Vec<String>> {
    let path = chart_dir().join("dashboards/graceful.json");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    let panels = dashboard["panels"].as_array().context("no panels")?;
    PANELS
        .iter()
        .map(|title| {
            let panel = panels
                .iter()
                .find(|p| p["title"] == *title)
                .with_context(|| format!("no panel {title:?} in the dashboard"))?;
            let expr = panel["targets"][0]["expr"]
                .as_str()
                .with_context(|| format!("panel {title:?} has no query"))?;
            Ok(expr.replace("$__rate_interval", &format!("{}s", 4 * INTERVAL.as_secs())))
        })
        .collect()
}

/// Headless Chromium renders `url` into `out`. Everything not on loopback goes to a proxy that
/// does not exist, and its own background traffic is off: nothing leaves this machine.
fn screenshot(url: &str, out: &std::path::Path) -> anyhow::Result<()> {
    let out = std::path::absolute(out)?;
    let profile = tempdir("graceful-chromium")?;
    let status = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--dns-prefetch-disable",
            "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=127.0.0.1",
            // Tall enough for every panel: the page must not scroll (its last query box takes
            // the focus, and a scrolled page is captured from its top, blank).
            "--window-size=1400,4000",
            "--virtual-time-budget=20000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", out.display()))
        .arg(url)
        .status()
        .context("running chromium (apt-get install chromium)")?;
    let _ = std::fs::remove_dir_all(&profile);
    if !status.success() || !out.is_file() {
        bail!("chromium exited with {status} without {}", out.display());
    }
    Ok(())
}

fn tempdir(prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
