//! kubectl-graceful: found by kubectl on the PATH, run as `kubectl graceful ...`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use kubectl_graceful::render::{self, Outline, Style};
use kubectl_graceful::{snapshot, verbs};

/// Follow and steer GracefulRollouts. NAME is a GracefulRollout, or the Deployment one manages.
#[derive(Parser)]
#[command(name = "kubectl graceful", version)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The rollout's phase and step, each pod with its revision, serving or draining, and each
    /// draining pod's live drain figures from its sidecar.
    Status {
        name: String,
        /// Keep following: a live redraw on a terminal, one line per change when piped.
        #[arg(short, long)]
        watch: bool,
        /// How often --watch reads again.
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// No colours even on a terminal (NO_COLOR in the environment does the same).
        #[arg(long)]
        no_color: bool,
    },
    /// Start a new rollout of the same template (as `kubectl rollout restart`).
    Restart { name: String },
    /// Hold the rollout at its next step (the Deployment's spec.paused, as `kubectl rollout pause`).
    Pause { name: String },
    /// Let a paused rollout go on (the Deployment's and the GracefulRollout's spec.paused).
    Resume { name: String },
    /// Roll the rollout in progress back to the stable pods now (spec.abort).
    Abort { name: String },
    /// Roll out again what was aborted or rolled back.
    Retry { name: String },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options).await
        }
        None => Config::from_kubeconfig(&options).await,
    }
    .context("loading the kubeconfig")?;
    let client = Client::try_from(config).context("building the API client")?;
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let client = &client;
    match cli.command {
        Command::Status {
            name,
            watch,
            interval,
            no_color,
        } => {
            let terminal = std::io::stdout().is_terminal();
            let style = Style {
                color: terminal && !no_color && std::env::var_os("NO_COLOR").is_none(),
            };
            if watch {
                follow(client, &ns, &name, interval, terminal, style).await
            } else {
                let s = snapshot::take(client, &ns, &name).await?;
                print!("{}", render::frame(&s, style));
                Ok(())
            }
        }
        Command::Restart { name } => act(client, &ns, &name, Verb::Restart).await,
        Command::Pause { name } => act(client, &ns, &name, Verb::Pause).await,
        Command::Resume { name } => act(client, &ns, &name, Verb::Resume).await,
        Command::Abort { name } => act(client, &ns, &name, Verb::Abort).await,
        Command::Retry { name } => act(client, &ns, &name, Verb::Retry).await,
    }
}

enum Verb {
    Restart,
    Pause,
    Resume,
    Abort,
    Retry,
}

async fn act(client: &Client, ns: &str, name: &str, verb: Verb) -> Result<()> {
    let gr = snapshot::find_rollout(client, ns, name).await?;
    let said = match verb {
        Verb::Restart => verbs::restart(client, &gr).await?,
        Verb::Pause => verbs::pause(client, &gr).await?,
        Verb::Resume => verbs::resume(client, &gr).await?,
        Verb::Abort => verbs::abort(client, &gr).await?,
        Verb::Retry => verbs::retry(client, &gr).await?,
    };
    println!("{said}");
    Ok(())
}

/// `status --watch` until Ctrl-C. A read that fails is shown and retried at the next tick: a
/// watch outlives an apiserver restart.
async fn follow(
    client: &Client,
    ns: &str,
    name: &str,
    interval: Duration,
    terminal: bool,
    style: Style,
) -> Result<()> {
    let mut before: Option<Outline> = None;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = ticks.tick() => {}
        }
        let read = snapshot::take(client, ns, name).await;
        let mut out = std::io::stdout().lock();
        let now = chrono::Local::now().format("%H:%M:%S");
        match (read, terminal) {
            (Ok(s), true) => {
                // Home and clear, then the frame: a redraw in place, like `watch`.
                write!(out, "\x1b[H\x1b[2J{}", render::frame(&s, style))?;
                writeln!(out, "\n{now}  every {interval:?}; Ctrl-C to stop")?;
            }
            (Ok(s), false) => {
                let outline = Outline::of(&s);
                match &before {
                    None => write!(out, "{}", render::frame(&s, style))?,
                    Some(b) => {
                        for line in outline.changes(b) {
                            writeln!(out, "{now} {line}")?;
                        }
                    }
                }
                before = Some(outline);
            }
            (Err(e), true) => writeln!(out, "\x1b[H\x1b[2J{now}  error: {e:#} (retrying)")?,
            (Err(e), false) => writeln!(out, "{now} error: {e:#} (retrying)")?,
        }
        out.flush()?;
    }
}
