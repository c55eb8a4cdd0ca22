//! graceful-sidecar: a drain-aware proxy in front of an app that was never written to shut
//! down gracefully. See design.md for the drain order this implements.

pub mod accept;
pub mod admin;
pub mod app;
pub mod arrivals;
pub mod config;
pub mod data_planes;
pub mod defaults;
pub mod deregister;
pub mod drain;
pub mod event_stream;
pub mod exposition;
pub mod latency;
pub mod metrics;
pub mod node;
#[cfg(test)]
mod properties;
pub mod proxy;
pub mod resources;
pub mod restarts;
pub mod siblings;
pub mod signal;
pub mod sources;
pub mod traffic;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::admin::Admin;
use crate::app::App;
use crate::config::Config;
use crate::deregister::Deregister;
use crate::drain::{Drain, Phase, Summary, Trigger};
use crate::metrics::Metrics;
use crate::node::NodePeers;
use crate::proxy::Proxy;
use crate::restarts::Restarts;
use crate::siblings::Siblings;
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
    #[error("cannot start a traffic thread: {0}")]
    Thread(std::io::Error),
}

/// The listener, with the address it got: with port 0 only that says where to connect.
async fn bind(option: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let err = |source| Error::Bind {
        option,
        addr,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// One listening socket per traffic thread on the same address (SO_REUSEPORT): the kernel
/// spreads connections over them, and no thread ever waits on another, as with nginx's workers.
/// Returns them with the address they share (the one bound, for port 0).
fn bind_shards(
    addr: SocketAddr,
    n: usize,
) -> Result<(Vec<std::net::TcpListener>, SocketAddr), Error> {
    let err = |source| Error::Bind {
        option: "listen",
        addr,
        source,
    };
    let mut addr = addr;
    let mut listeners = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(err)?;
        socket.set_reuseaddr(true).map_err(err)?;
        socket.set_reuseport(true).map_err(err)?;
        socket.bind(addr).map_err(err)?;
        let listener = socket.listen(1024).map_err(err)?;
        // Port 0: the others join the port the first one got.
        addr = listener.local_addr().map_err(err)?;
        listeners.push(listener.into_std().map_err(err)?);
    }
    Ok((listeners, addr))
}

/// Serves until the drain is done and it is time to exit; returns the drain's summary.
pub async fn run(cfg: Config) -> Result<Summary, Error> {
    match resources::raise_open_file_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => warn!(error = %e, "cannot raise the open-file limit"),
    }
    let shards = resources::traffic_threads(cfg.workers);
    let (traffic_listeners, listen) = bind_shards(cfg.listen, shards)?;
    let bounds = accept::Bounds {
        slots: accept::Slots::new(cfg.max_connections),
        header_read_timeout: cfg.header_read_timeout,
        idle_timeout: cfg.idle_timeout,
    };
    let (admin_listener, admin) = bind("admin", cfg.admin).await?;
    let mut signals = Signals::new().map_err(Error::Signals)?;

    let drain = Drain::new(Metrics::new());
    let restarts = Restarts::new(
        cfg.upstream,
        cfg.upstream_restart_wait,
        cfg.upstream_max_held,
        drain.metrics.restarts.clone(),
    );
    tokio::spawn(restarts.clone().watch_app());
    let proxy = Arc::new(Proxy::new(
        cfg.upstream,
        cfg.upstream_h2c,
        drain.clone(),
        restarts.clone(),
        cfg.stream_leave_after,
    ));
    let app = Arc::new(App::new(
        cfg.upstream,
        cfg.app_ready_path.as_deref(),
        cfg.app_drain_url.clone(),
    ));
    let deregister = Deregister::new(cfg.pod(), cfg.deregister_delay);
    for (i, listener) in traffic_listeners.into_iter().enumerate() {
        let (bounds, proxy, drain) = (bounds.clone(), proxy.clone(), drain.clone());
        std::thread::Builder::new()
            .name(format!("traffic-{i}"))
            .spawn(move || traffic::shard(listener, bounds, proxy, drain))
            .map_err(Error::Thread)?;
    }
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(Admin::new(
            drain.clone(),
            cfg.prestop_token.clone(),
            app.clone(),
            restarts.clone(),
            cfg.pod(),
            NodePeers::discover(cfg.host_ip),
        )),
    ));
    tokio::spawn(app.drain_hook(drain.clone()));
    let siblings = Siblings::new(cfg.siblings.clone(), cfg.pod(), admin.port());
    tokio::spawn(
        drain
            .clone()
            .run(deregister, cfg.following(), siblings, cfg.drain_timeout),
    );
    info!(%listen, %admin, upstream = %cfg.upstream, "serving");

    let mut signals_seen = 0;
    let summary = loop {
        tokio::select! {
            signal = signals.recv() => {
                signals_seen += 1;
                if signals_seen == 1 {
                    if !drain.trigger(Trigger::Signal, false) {
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
        // exited: stay until then, and exit at once when it comes. If the app comes back
        // instead, the kubelet restarted it, which it never does in a pod being deleted: the
        // preStop was a container restart that could not be told apart (the API unreachable).
        // Done draining, this process can serve no more; exiting lets the kubelet start the
        // sidecar afresh, and the pod serves again instead of staying NotReady.
        info!("drain done; waiting for SIGTERM to exit");
        tokio::select! {
            signal = signals.recv() => info!(signal, "exiting"),
            () = restarts.came_back() => warn!(
                "the app was restarted after the drain: the pod stays; exiting so the kubelet starts the sidecar again"
            ),
        }
    }
    Ok(summary)
}
