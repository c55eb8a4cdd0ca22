//! The drain, as design.md orders it: Serving -> Deregistering -> Quiescing -> Done.
//! The phase is a `watch` broadcast: the accept loops, every connection and the admin API
//! listen to it, so each one reacts to the same transition at the same time.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{info, warn};

use crate::defaults;
use crate::deregister::Deregister;
use crate::metrics::Metrics;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Serving = 0,
    Deregistering = 1,
    Quiescing = 2,
    Done = 3,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Serving,
        Phase::Deregistering,
        Phase::Quiescing,
        Phase::Done,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Deregistering => "deregistering",
            Phase::Quiescing => "quiescing",
            Phase::Done => "done",
        }
    }
}

impl EncodeLabelValue for Phase {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// What started the drain; the other source joins it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Prestop,
    Signal,
}

/// The drain's result: the /prestop answer, the termination log and the last log line.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub trigger: Trigger,
    /// How the pod left the load-balancing path: "endpointslices", "delay" or "forced".
    pub deregistration: &'static str,
    pub deregistering_seconds: f64,
    pub quiescing_seconds: f64,
    pub total_seconds: f64,
    pub requests_after_trigger: u64,
    pub requests_cut: u64,
    pub connections_cut: u64,
    pub forced: bool,
}

pub struct Drain {
    phase: watch::Sender<Phase>,
    /// Mirror of `phase` for the request path: one atomic load, no lock.
    phase_now: AtomicU8,
    /// Broadcast to connections and tunnels: drop now. Only `run` sends it, after counting.
    force: watch::Sender<bool>,
    /// A second SIGTERM asks `run` to force; connections must not see it before the count.
    force_requested: watch::Sender<bool>,
    trigger: OnceLock<(Trigger, Instant)>,
    entered: Mutex<[Option<Instant>; 4]>,
    /// Every open connection and tunnel holds a receiver; `closed()` means none is left.
    connections: watch::Sender<()>,
    /// When the last traffic connection was accepted, in ms since `born`.
    last_accept_ms: AtomicU64,
    born: Instant,
    summary: OnceLock<Summary>,
    pub metrics: Metrics,
}

/// Held by a connection (or upgraded tunnel) for as long as it is open.
pub struct ConnectionGuard(#[allow(dead_code)] watch::Receiver<()>);

impl Drain {
    pub fn new(metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            phase: watch::Sender::new(Phase::Serving),
            phase_now: AtomicU8::new(Phase::Serving as u8),
            force: watch::Sender::new(false),
            force_requested: watch::Sender::new(false),
            trigger: OnceLock::new(),
            entered: Mutex::new([Some(Instant::now()), None, None, None]),
            connections: watch::Sender::new(()),
            last_accept_ms: AtomicU64::new(0),
            born: Instant::now(),
            summary: OnceLock::new(),
            metrics,
        })
    }

    pub fn phase(&self) -> Phase {
        Phase::ALL[self.phase_now.load(Ordering::Relaxed) as usize]
    }

    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Becomes true when whatever is still open must be closed now.
    pub fn forced(&self) -> watch::Receiver<bool> {
        self.force.subscribe()
    }

    /// Called for every accepted traffic connection: the drain's quiet period counts from it.
    pub fn note_accept(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last_accept_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Resolves when no connection is open and none arrived for `QUIET_PERIOD`: whoever still
    /// routes new connections here (a lagging kube-proxy) keeps being served until it stops.
    async fn settled(&self) {
        loop {
            self.connections.closed().await;
            let last =
                self.born + Duration::from_millis(self.last_accept_ms.load(Ordering::Relaxed));
            let quiet_until = last + defaults::QUIET_PERIOD;
            if Instant::now() >= quiet_until && self.connections.receiver_count() == 0 {
                return;
            }
            sleep_until(quiet_until).await;
        }
    }

    pub fn connection(&self) -> ConnectionGuard {
        ConnectionGuard(self.connections.subscribe())
    }

    /// Starts the drain; returns false when one is already under way (the caller joins it).
    pub fn trigger(&self, trigger: Trigger) -> bool {
        let started = self.trigger.set((trigger, Instant::now())).is_ok();
        if started {
            info!(?trigger, "drain triggered: readiness off, still serving");
            self.enter(Phase::Deregistering);
        }
        started
    }

    pub fn triggered_by(&self) -> Option<Trigger> {
        self.trigger.get().map(|(t, _)| *t)
    }

    /// Closes everything at once (second SIGTERM).
    pub fn force(&self) {
        if !self.force_requested.send_replace(true) {
            warn!("forced close requested");
        }
    }

    pub fn summary(&self) -> Option<Summary> {
        self.summary.get().cloned()
    }

    /// Waits for the end of the drain (which the caller may have to trigger first).
    pub async fn done(&self) -> Summary {
        let mut rx = self.subscribe();
        // The sender lives as long as self, so this cannot fail.
        let _ = rx.wait_for(|p| *p == Phase::Done).await;
        self.summary().expect("summary is set before Done")
    }

    /// Seconds spent in each phase up to now, for /metrics.
    pub fn refresh_phase_seconds(&self) {
        let entered = *self.entered.lock().expect("not poisoned");
        let now = Instant::now();
        for (i, phase) in Phase::ALL.into_iter().enumerate().take(3) {
            if let Some(start) = entered[i] {
                let end = entered[i + 1..]
                    .iter()
                    .flatten()
                    .next()
                    .copied()
                    .unwrap_or(now);
                self.metrics
                    .set_phase_seconds(phase, end.duration_since(start).as_secs_f64());
            }
        }
    }

    fn enter(&self, to: Phase) {
        let from = self.phase();
        self.entered.lock().expect("not poisoned")[to as usize] = Some(Instant::now());
        self.metrics.enter_phase(from, to);
        self.phase_now.store(to as u8, Ordering::Relaxed);
        self.phase.send_replace(to);
    }

    /// The drain itself: waits for a trigger, then runs each phase in order. At `timeout`
    /// after the trigger (or on `force()`), whatever is still open is closed and counted.
    pub async fn run(self: Arc<Self>, deregister: Deregister, drain_timeout: Duration) {
        let mut phase = self.subscribe();
        reached(&mut phase, Phase::Deregistering).await;
        let (trigger, t0) = *self.trigger.get().expect("phase left Serving on a trigger");
        let deadline = t0 + drain_timeout;
        let mut force = self.force_requested.subscribe();

        // Deregister: everything that still arrives is served meanwhile.
        let deregistration = tokio::select! {
            path = deregister.wait(t0) => path,
            _ = sleep_until(deadline) => "forced",
            _ = forced(&mut force) => "forced",
        };
        let t1 = Instant::now();
        info!(deregistration, "out of the load-balancing path: quiescing");
        self.enter(Phase::Quiescing);

        // Quiesce: connections close themselves once their last response is out; new ones are
        // served until none has come for a quiet period.
        let quiet = tokio::select! {
            // A forced close wins over connections that are closing because of it.
            biased;
            _ = forced(&mut force) => false,
            _ = self.settled() => true,
            _ = sleep_until(deadline) => false,
        };
        let (requests_cut, connections_cut) = if quiet {
            (0, 0)
        } else {
            let requests = self.metrics.in_flight.get().max(0) as u64;
            let connections = self.metrics.open_total().max(0) as u64;
            self.metrics.requests_force_closed.inc_by(requests);
            self.metrics.connections_force_closed.inc_by(connections);
            self.force.send_replace(true);
            // Connections drop their sockets as soon as they see the flag.
            let _ = timeout(Duration::from_secs(1), self.connections.closed()).await;
            warn!(
                requests_cut = requests,
                connections_cut = connections,
                "drain forced: cut {requests} requests and {connections} connections"
            );
            (requests, connections)
        };
        let t2 = Instant::now();
        let summary = Summary {
            trigger,
            deregistration,
            deregistering_seconds: t1.duration_since(t0).as_secs_f64(),
            quiescing_seconds: t2.duration_since(t1).as_secs_f64(),
            total_seconds: t2.duration_since(t0).as_secs_f64(),
            requests_after_trigger: self.metrics.requests_after_trigger.get(),
            requests_cut,
            connections_cut,
            forced: !quiet,
        };
        let json = serde_json::to_string(&summary).expect("summary serializes");
        info!(summary = %json, "drain done");
        write_termination_log(&json);
        let _ = self.summary.set(summary);
        self.enter(Phase::Done);
        self.refresh_phase_seconds();
    }
}

/// Kubernetes copies this file into the container's status: the operator reads the summary
/// there after the pod is gone. Absent outside a pod, so errors are ignored.
fn write_termination_log(json: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(defaults::TERMINATION_LOG_PATH)
    {
        let _ = f.write_all(json.as_bytes());
    }
}

/// Resolves once the phase is `at_least` (the borrow is dropped here, so callers stay Send).
pub async fn reached(rx: &mut watch::Receiver<Phase>, at_least: Phase) {
    let _ = rx.wait_for(|p| *p >= at_least).await;
}

/// Resolves once the drain says: close everything now.
pub async fn forced(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|f| *f).await;
}
