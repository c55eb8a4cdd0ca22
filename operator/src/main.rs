//! graceful-operator: runs the GracefulRollout controller (on the replica that holds the
//! leader Lease) and the sidecar-injection webhook (on every replica).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::Parser;
use graceful_operator::crd::GracefulRollout;
use graceful_operator::outage::{ApiOutages, OutageLayer};
use graceful_operator::scope::{Scope, ScopeArgs};
use graceful_operator::{leader, metrics, rollout, uninstall, webhook};
use kube::Client;
use kube::api::ListParams;
use kube::client::ClientBuilder;
use prometheus_client::registry::Registry;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "GracefulRollout controller and sidecar-injection webhook",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
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
    /// GracefulRollouts reconciled at once (at least 1).
    #[arg(long, env = "GRACEFUL_RECONCILE_CONCURRENCY", default_value_t = rollout::DEFAULT_CONCURRENCY,
          value_parser = clap::value_parser!(u16).range(1..))]
    reconcile_concurrency: u16,
    /// Log as JSON lines (for log pipelines) instead of text.
    #[arg(long, env = "GRACEFUL_LOG_JSON")]
    log_json: bool,
    #[command(flatten)]
    scope: ScopeArgs,
    #[command(flatten)]
    webhook_args: webhook::WebhookArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Before graceful is removed (helm uninstall's pre-delete hook): stop the operator, hand
    /// every GracefulRollout's Deployment back and lift the finalizers only it could lift.
    Uninstall(uninstall::Args),
}

/// How long a clean shutdown waits for the other tasks: the webhook retires its connections
/// (webhook::RETIRE_FOR, 5 s) and finishes its reviews (at most 10 s); the lease hand-back is
/// bounded at 2 s. Within the chart's 30 s grace period after its 5 s preStop.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(18);

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

    // Every request's outcome tells when the API server was last away (outage.rs).
    let outages = Arc::new(ApiOutages::default());
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
    let client = ClientBuilder::try_from(config)
        .context("building the Kubernetes client")?
        .with_layer(&OutageLayer(outages.clone()))
        .build();
    if let Some(Command::Uninstall(args)) = &args.command {
        return uninstall::run(client, args).await;
    }
    let scope = args.scope.scope();
    tracing::info!(namespaces = %scope, "watching");
    let mut registry = Registry::default();
    let metrics = Arc::new(metrics::Metrics::new(&mut registry));
    let ready = Arc::new(AtomicBool::new(false));
    // The kubelet's probes go here: a health server that failed ends the process (below)
    // rather than leave it running unprobed.
    let health = tokio::spawn(metrics::serve(
        args.metrics_addr,
        Arc::new(registry),
        ready.clone(),
    ));

    let mut tasks = tokio::task::JoinSet::new();
    if args.webhook {
        let (client, wargs, scope, metrics) = (
            client.clone(),
            args.webhook_args.clone(),
            scope.clone(),
            metrics.clone(),
        );
        tasks.spawn(async move {
            webhook::serve(client, wargs, scope, metrics, shutdown_signal())
                .await
                .context("injection webhook")
        });
    }
    if args.controller {
        check_crd(&client, &scope).await?;
        let namespace = args.webhook_args.operator_namespace.clone();
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| hostname());
        let (client, no_election, lease, concurrency) = (
            client.clone(),
            args.no_leader_election,
            args.lease_name.clone(),
            args.reconcile_concurrency,
        );
        let ready = ready.clone();
        let scope = scope.clone();
        tasks.spawn(async move {
            // Each term runs a fresh controller. Losing the Lease ends the term, not the process:
            // the webhook on this replica keeps answering the reviews in flight, and the
            // replica stands for election again.
            loop {
                let leadership = match no_election {
                    true => None,
                    // A standby told to stop stops; it holds nothing to hand back.
                    false => tokio::select! {
                        held = leader::Elector::new(client.clone(), &namespace, &lease, &identity)
                            .lead(metrics.leader.clone()) => Some(held),
                        _ = shutdown_signal() => return Ok(()),
                    },
                };
                if leadership.as_ref().is_some_and(|l| l.inherited) {
                    outages.assume_just_back();
                }
                ready.store(true, Ordering::Relaxed);
                let mut leading = leadership.as_ref().map(|l| l.leading());
                let lost = async {
                    match leading.as_mut() {
                        Some(leading) => drop(leading.wait_for(|l| !*l).await),
                        None => std::future::pending().await,
                    }
                };
                // Losing the lease drops the controller mid-reconcile: a replica that may no
                // longer lead must not make one more write.
                tokio::select! {
                    _ = rollout::run(client.clone(), metrics.clone(), concurrency, outages.clone(), &scope) => {}
                    _ = lost => {
                        tracing::warn!("lost leadership: controller stopped; standing for election again");
                        continue;
                    }
                }
                if let Some(leadership) = leadership {
                    leadership.release().await;
                }
                return Ok(());
            }
        });
    } else {
        ready.store(true, Ordering::Relaxed);
    }
    tokio::select! {
        ended = health => Err(match ended {
            Ok(Err(e)) => e,
            Ok(Ok(())) => anyhow::anyhow!("ended"),
            Err(e) => e.into(),
        }
        .context("health and metrics server")),
        result = first_to_end(tasks) => result,
    }
}

/// The first task to end (a shutdown signal, a fatal error) ends the process. On a clean end the
/// others are ending on the same signal: they get a moment, so the controller hands its lease
/// back.
async fn first_to_end(mut tasks: tokio::task::JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
    let first = match tasks.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(e.into()),
        None => Ok(()),
    };
    if first.is_ok() {
        let rest = async { while tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, rest).await;
    }
    first
}

/// Fail fast, with the fix, when the CRD is not installed or a namespace of the scope cannot be
/// read.
async fn check_crd(client: &Client, scope: &Scope) -> anyhow::Result<()> {
    for api in scope.apis::<GracefulRollout>(client) {
        let place = api.namespace().unwrap_or("any namespace").to_owned();
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => anyhow::bail!(
                "the GracefulRollout CRD (gracefulrollouts.graceful.dev) is not installed: \
                 run `kubectl apply -f crds/gracefulrollouts.yaml` or `helm install graceful charts/graceful`"
            ),
            Err(e) => return Err(e).context(format!("listing GracefulRollouts in {place}")),
        }
    }
    Ok(())
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
