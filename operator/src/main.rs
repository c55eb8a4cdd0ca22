//! graceful-operator: runs the GracefulRollout controller (on the replica that holds the
//! leader Lease) and the sidecar-injection webhook (on every replica).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::Parser;
use graceful_operator::crd::GracefulRollout;
use graceful_operator::{leader, metrics, rollout, webhook};
use kube::Client;
use kube::api::{Api, ListParams};
use prometheus_client::registry::Registry;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "GracefulRollout controller and sidecar-injection webhook"
)]
struct Args {
    /// Health (/healthz, /readyz) and /metrics, plain HTTP; never the webhook's port.
    #[arg(long, env = "GRACEFUL_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Run the controller only while holding this Lease (in the operator's namespace).
    #[arg(long, env = "GRACEFUL_LEASE_NAME", default_value = "graceful-operator")]
    lease_name: String,
    /// Act without leader election (a single replica, or local development).
    #[arg(long, env = "GRACEFUL_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Serve the injection webhook.
    #[arg(long, env = "GRACEFUL_WEBHOOK", default_value_t = true, action = clap::ArgAction::Set)]
    webhook: bool,
    /// Run the rollout controller.
    #[arg(long, env = "GRACEFUL_CONTROLLER", default_value_t = true, action = clap::ArgAction::Set)]
    controller: bool,
    /// Log as JSON lines (for log pipelines) instead of text.
    #[arg(long, env = "GRACEFUL_LOG_JSON")]
    log_json: bool,
    #[command(flatten)]
    webhook_args: webhook::WebhookArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn,tower=warn,hyper=warn".into());
    // Colour only on a terminal: `kubectl logs` shows escape codes verbatim.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if args.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let _ = rustls::crypto::ring::default_provider().install_default();

    let client = Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
    let mut registry = Registry::default();
    let metrics = Arc::new(metrics::Metrics::new(&mut registry));
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(metrics::serve(
        args.metrics_addr,
        Arc::new(registry),
        ready.clone(),
    ));

    let mut tasks = tokio::task::JoinSet::new();
    if args.webhook {
        let (client, wargs) = (client.clone(), args.webhook_args.clone());
        tasks.spawn(async move {
            webhook::serve(client, wargs, shutdown_signal())
                .await
                .context("injection webhook")
        });
    }
    if args.controller {
        check_crd(&client).await?;
        let namespace = args.webhook_args.operator_namespace.clone();
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| hostname());
        let (client, no_election, lease) = (
            client.clone(),
            args.no_leader_election,
            args.lease_name.clone(),
        );
        let ready = ready.clone();
        tasks.spawn(async move {
            let leading = if no_election {
                tokio::sync::watch::channel(true).1
            } else {
                leader::Elector::new(client.clone(), &namespace, &lease, &identity)
                    .lead()
                    .await
            };
            ready.store(true, Ordering::Relaxed);
            rollout::run(client, metrics, leading.clone()).await;
            if !*leading.borrow() {
                anyhow::bail!("lost leadership; exiting so a fresh process can stand for election");
            }
            Ok(())
        });
    } else {
        ready.store(true, Ordering::Relaxed);
    }
    // The first task to end (shutdown signal, a fatal error) ends the process.
    match tasks.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(e.into()),
        None => Ok(()),
    }
}

/// Fail fast, with the fix, when the CRD is not installed.
async fn check_crd(client: &Client) -> anyhow::Result<()> {
    let api: Api<GracefulRollout> = Api::all(client.clone());
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => anyhow::bail!(
            "the GracefulRollout CRD (gracefulrollouts.graceful.dev) is not installed: \
             run `kubectl apply -f crds/gracefulrollouts.yaml` or `helm install graceful charts/graceful`"
        ),
        Err(e) => Err(e).context("listing GracefulRollouts"),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "graceful-operator".into())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
