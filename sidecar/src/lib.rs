//! graceful-sidecar: a drain-aware proxy in front of an app that was never written to shut
//! down gracefully. See design.md for the drain order this implements.

pub mod admin;
pub mod app;
pub mod config;
pub mod defaults;
pub mod deregister;
pub mod drain;
pub mod metrics;
pub mod proxy;
pub mod signal;
pub mod traffic;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::info;

use crate::admin::Admin;
use crate::app::App;
use crate::config::Config;
use crate::deregister::Deregister;
use crate::drain::{Drain, Phase, Summary, Trigger};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::signal::Signals;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on --{option} {addr}: {source}")]
    Bind {
        option: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

async fn bind(option: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind {
        option,
        addr,
        source,
    })
}

/// Serves until the drain is done and it is time to exit; returns the drain's summary.
pub async fn run(cfg: Config) -> Result<Summary, Error> {
    let traffic_listener = bind("listen", cfg.listen).await?;
    let admin_listener = bind("admin", cfg.admin).await?;
    let mut signals = Signals::new().map_err(Error::Signals)?;

    let drain = Drain::new(Metrics::new());
    let proxy = Arc::new(Proxy::new(cfg.upstream, cfg.upstream_h2c, drain.clone()));
    let app = Arc::new(App::new(
        cfg.upstream,
        cfg.app_ready_path.as_deref(),
        cfg.app_drain_url.clone(),
    ));
    let deregister = Deregister::new(
        cfg.pod_ip,
        cfg.pod_namespace.clone(),
        cfg.deregister_delay,
        cfg.propagation_margin,
    );
    tokio::spawn(traffic::serve(traffic_listener, proxy, drain.clone()));
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(Admin::new(
            drain.clone(),
            cfg.prestop_token.clone(),
            app.clone(),
        )),
    ));
    tokio::spawn(app.drain_hook(drain.clone()));
    tokio::spawn(drain.clone().run(deregister, cfg.drain_timeout));
    info!(listen = %cfg.listen, admin = %cfg.admin, upstream = %cfg.upstream, "serving");

    let mut signals_seen = 0;
    let summary = loop {
        tokio::select! {
            signal = signals.recv() => {
                signals_seen += 1;
                if signals_seen == 1 {
                    if !drain.trigger(Trigger::Signal) {
                        info!(signal, "joining the drain under way; another signal forces it");
                    }
                } else if drain.phase() != Phase::Done {
                    info!(signal, "second signal: closing everything now");
                    drain.force();
                }
            }
            summary = drain.done() => break summary,
        }
    };
    if signals_seen == 0 {
        // Drained on /prestop. As a native sidecar we are signalled only after the app
        // exited: stay until then, and exit at once when it comes.
        info!("drain done; waiting for SIGTERM to exit");
        let signal = signals.recv().await;
        info!(signal, "exiting");
    }
    Ok(summary)
}
