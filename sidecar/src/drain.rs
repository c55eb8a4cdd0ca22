//! The drain, as design.md orders it: Serving -> Deregistering -> Quiescing -> Done.
//! The phase is a `watch` broadcast: the accept loops, every connection and the admin API
//! listen to it, so each one reacts to the same transition at the same time.
//!
//! Deregistering lasts until the API no longer lists the pod (the data planes have been told);
//! Quiescing until the traffic shows that they listened: no new connection and no new request
//! for the quiet window (see `arrivals` and docs/drain.md), and nothing left open.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use crate::arrivals::{Arrivals, Basis, QuietRule, QuietWindow};
use crate::data_planes::{self, DataPlane};
use crate::defaults;
use crate::deregister::Deregister;
use crate::metrics::Metrics;
use crate::siblings::{LetGo, Siblings};
use crate::sources::Sources;

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

/// What the traffic has shown since the pod left the API's endpoints; connections act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Calm {
    /// New connections still arrive (or the drain is not that far yet).
    Busy,
    /// No new connection for the quiet window: connection-level balancers (kube-proxy) have let
    /// go, so an HTTP/2 client told GOAWAY reconnects elsewhere.
    NoNewConnections,
    /// No new connection and no new request for the quiet window: every data plane has let go,
    /// so an idle keep-alive connection may be closed without crossing a request.
    Quiet,
}

/// How Quiescing decides that the data planes have let go.
#[derive(Clone, Debug)]
pub struct Following {
    pub window: WindowChoice,
    /// The least time after deregistration for a pod that had traffic: a bound on the lag of
    /// connection-level balancers (kube-proxy), which re-route only new connections, and so
    /// may send one here from a client this pod never saw (docs/drain.md).
    pub margin: Duration,
    /// The data planes in front of the pod (kube-proxy's lag is the margin).
    pub data_planes: Vec<DataPlane>,
}

#[derive(Clone, Copy, Debug)]
pub enum WindowChoice {
    /// A window derived from the traffic before the trigger, widened by the traffic that keeps
    /// coming after deregistration.
    Traffic(QuietRule),
    /// The same window every time (zero: stop following the traffic at all).
    Fixed(Duration),
}

impl Following {
    /// Silence ends no drain before this long after deregistration, unless the siblings show
    /// every source let go.
    pub fn hold(&self) -> Duration {
        data_planes::hold(&self.data_planes)
    }

    /// The rule that widens the window as traffic keeps coming (none for a fixed window).
    fn widening(&self) -> Option<QuietRule> {
        match self.window {
            WindowChoice::Traffic(rule) => Some(rule),
            WindowChoice::Fixed(_) => None,
        }
    }

    fn window(&self, arrivals: &Arrivals, trigger: Instant) -> QuietWindow {
        match self.window {
            WindowChoice::Traffic(rule) => rule.window(&arrivals.record(trigger)),
            WindowChoice::Fixed(d) => QuietWindow {
                seconds: d.as_secs_f64(),
                basis: Basis::Fixed,
                longest_gap_seconds: None,
            },
        }
    }
}

/// What lets a quiet drain end: the hold over, or the siblings showing every source let go.
struct Release {
    until: Instant,
    let_go: watch::Receiver<LetGo>,
}

impl Release {
    fn released(&self, now: Instant) -> bool {
        now >= self.until || self.let_go.borrow().all()
    }
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
    /// The silence that counted as "every data plane has let go", and how it was chosen.
    pub quiet_window: QuietWindow,
    /// The last new connection or request, in seconds after the trigger (none: no traffic
    /// came after it).
    pub last_arrival_seconds: Option<f64>,
    /// How long traffic kept arriving after the pod left the API's endpoints: the lag of the
    /// slowest data plane this drain saw.
    pub traffic_after_deregistration_seconds: f64,
    /// The data planes assumed in front of the pod, and the hold their lags gave.
    pub data_planes: Vec<DataPlane>,
    pub data_plane_lag_seconds: f64,
    /// What ended the drain: "traffic" (no hold: the quiet window), "lag" (the hold passed),
    /// "siblings" (they showed every source let go before it) or "timeout".
    pub released_by: &'static str,
    /// Sources of new connections known at the end, and how many the siblings showed let go.
    pub sources: u64,
    pub sources_let_go: u64,
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
    /// Set before the trigger when its caller already saw the EndpointSlices let the pod go.
    deregistered_at_trigger: AtomicBool,
    entered: Mutex<[Option<Instant>; 4]>,
    /// Every open connection and tunnel holds a receiver; `closed()` means none is left.
    connections: watch::Sender<()>,
    /// New connections and requests: the evidence Quiescing follows.
    pub arrivals: Arrivals,
    /// Where new connections come from: what the siblings' comparison needs.
    pub sources: Sources,
    calm: watch::Sender<Calm>,
    /// No new connection for the quiet window, and the data planes' hold over: every data
    /// plane has let go, so a long-lived stream asked to leave reconnects elsewhere.
    let_go: watch::Sender<bool>,
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
            deregistered_at_trigger: AtomicBool::new(false),
            entered: Mutex::new([Some(Instant::now()), None, None, None]),
            connections: watch::Sender::new(()),
            arrivals: Arrivals::new(),
            sources: Sources::new(),
            calm: watch::Sender::new(Calm::Busy),
            let_go: watch::Sender::new(false),
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

    /// What the traffic has shown since the pod left the API's endpoints.
    pub fn calm(&self) -> watch::Receiver<Calm> {
        self.calm.subscribe()
    }

    /// Becomes true once every data plane has let go of the pod (see `let_go`).
    pub fn let_go(&self) -> watch::Receiver<bool> {
        self.let_go.subscribe()
    }

    /// Resolves once no new connection and no new request has arrived for `window` since
    /// `since`, and no connection is left open. Meanwhile it tells the connections what the
    /// traffic has shown, so each closes as soon as that is safe; a straggler is served and
    /// starts the window over.
    /// `window` widens (`widening`) once the traffic after `since` shows longer gaps: what
    /// keeps coming then is a lagging data plane's share, sparser than the whole.
    async fn follow_traffic(
        &self,
        window: &mut QuietWindow,
        widening: Option<QuietRule>,
        since: Instant,
        not_before: Instant,
        release: Release,
    ) {
        loop {
            let last = self.arrivals.last();
            let now = Instant::now();
            if let Some(rule) = widening {
                let wider = rule.widened(*window, &self.arrivals.record_since(since, now));
                if wider != *window {
                    debug!(quiet_window = ?wider.duration(), "traffic after deregistration: window widened");
                    self.metrics.quiet_window_seconds.set(wider.seconds);
                    *window = wider;
                }
            }
            let window = window.duration();
            let quiet_at = last.map_or(since, |l| l.max(since)) + window;
            let connections_quiet_at = self
                .arrivals
                .last_connection()
                .map_or(since, |l| l.max(since))
                + window;
            let calm = if now >= quiet_at {
                Calm::Quiet
            } else if now >= connections_quiet_at {
                Calm::NoNewConnections
            } else {
                Calm::Busy
            };
            self.calm
                .send_if_modified(|c| std::mem::replace(c, calm) != calm);
            if calm >= Calm::NoNewConnections && release.released(now) {
                self.let_go
                    .send_if_modified(|g| !std::mem::replace(g, true));
            }
            // A request that started after `last` was read is caught here; a connection counts
            // as open from its accept on.
            if calm == Calm::Quiet
                && now >= not_before
                && release.released(now)
                && self.connections.receiver_count() == 0
                && self.arrivals.last() == last
            {
                return;
            }
            let next = match calm {
                Calm::Busy => connections_quiet_at.min(quiet_at),
                Calm::NoNewConnections => quiet_at,
                // Open connections are closing; look again when they are gone, something
                // arrives or the margin is over (never `now`: each turn would then wait only for
                // the timer's next millisecond).
                Calm::Quiet if not_before > now => (now + crate::arrivals::BUCKET).min(not_before),
                Calm::Quiet => now + crate::arrivals::BUCKET,
            };
            // closed() is ready at once when no connection is open: waiting on it then (quiet,
            // but held for the data planes' lag) would spin.
            let open = self.connections.receiver_count() > 0;
            tokio::select! {
                _ = sleep_until(next) => {}
                _ = self.connections.closed(), if calm == Calm::Quiet && open => {}
            }
        }
    }

    pub fn connection(&self) -> ConnectionGuard {
        ConnectionGuard(self.connections.subscribe())
    }

    /// Keeps the sources' gauges on what the siblings show, until the comparison ends.
    async fn show_let_go(&self, mut let_go: watch::Receiver<LetGo>) {
        while let_go.changed().await.is_ok() {
            let shown = *let_go.borrow_and_update();
            self.metrics.sources.set(shown.sources as i64);
            self.metrics.sources_let_go.set(shown.let_go as i64);
        }
    }

    /// Starts the drain; returns false when one is already under way (the caller joins it).
    /// `deregistered`: the caller saw the pod out of the API's endpoints already.
    pub fn trigger(&self, trigger: Trigger, deregistered: bool) -> bool {
        let started = self.trigger.set((trigger, Instant::now())).is_ok();
        if started {
            self.deregistered_at_trigger
                .store(deregistered, Ordering::Relaxed);
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

    /// Seconds spent in each phase up to now, and the last arrival after the trigger, for
    /// /metrics.
    pub fn refresh_phase_seconds(&self) {
        let entered = *self.entered.lock().expect("not poisoned");
        let now = Instant::now();
        if let (Some(t0), Some(last)) =
            (entered[Phase::Deregistering as usize], self.arrivals.last())
            && last >= t0
        {
            self.metrics
                .last_arrival_seconds
                .set(last.duration_since(t0).as_secs_f64());
        }
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
    pub async fn run(
        self: Arc<Self>,
        deregister: Deregister,
        following: Following,
        siblings: Siblings,
        drain_timeout: Duration,
    ) {
        let mut phase = self.subscribe();
        reached(&mut phase, Phase::Deregistering).await;
        let (trigger, t0) = *self.trigger.get().expect("phase left Serving on a trigger");
        let deadline = t0 + drain_timeout;
        let mut force = self.force_requested.subscribe();
        // Read before anything of the drain itself could count as traffic.
        let mut window = following.window(&self.arrivals, t0);
        self.metrics.quiet_window_seconds.set(window.seconds);

        // Deregister: everything that still arrives is served meanwhile.
        let deregistration = if self.deregistered_at_trigger.load(Ordering::Relaxed) {
            "endpointslices"
        } else {
            tokio::select! {
                path = deregister.wait(t0) => path,
                _ = sleep_until(deadline) => "forced",
                _ = forced(&mut force) => "forced",
            }
        };
        let t1 = Instant::now();
        // An idle pod has no client that a lagging connection balancer could still send.
        let margin = if window.basis == Basis::Idle {
            Duration::ZERO
        } else {
            following.margin
        };
        // Silence ends nothing before the slowest data plane's lag, unless the siblings show
        // every source of this pod's connections going elsewhere (`siblings`).
        let hold = following.hold();
        let (let_go_tx, let_go) = watch::channel(LetGo::default());
        let release = Release {
            until: t1 + hold,
            let_go: let_go.clone(),
        };
        self.metrics.data_plane_lag_seconds.set(hold.as_secs_f64());
        let compare = async {
            if !hold.is_zero() {
                let compare = siblings.compare(&self.sources, let_go_tx);
                let shown = self.show_let_go(let_go.clone());
                let _ = tokio::time::timeout_at(t1 + hold, async { tokio::join!(compare, shown) })
                    .await;
            }
            std::future::pending::<()>().await
        };
        info!(
            deregistration,
            quiet_window = ?window.duration(),
            basis = ?window.basis,
            ?margin,
            ?hold,
            "out of the API's endpoints: quiescing until the traffic stops"
        );
        self.enter(Phase::Quiescing);

        // Quiesce: connections are asked to close as the traffic allows; everything that still
        // arrives is served, until nothing has come for the quiet window.
        let quiet = tokio::select! {
            // A forced close wins over connections that are closing because of it.
            biased;
            _ = forced(&mut force) => false,
            _ = self.follow_traffic(&mut window, following.widening(), t1, t1 + margin, release) => true,
            _ = sleep_until(deadline) => false,
            () = compare => unreachable!("the comparison never ends"),
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
        let released_by = match () {
            _ if !quiet => "timeout",
            _ if hold.is_zero() => "traffic",
            _ if t2 < t1 + hold => "siblings",
            _ => "lag",
        };
        let sources = self.sources.recent(t2).map_or(0, |s| s.len() as u64);
        let last = self.arrivals.last().filter(|l| *l >= t0);
        let summary = Summary {
            trigger,
            deregistration,
            deregistering_seconds: t1.duration_since(t0).as_secs_f64(),
            quiescing_seconds: t2.duration_since(t1).as_secs_f64(),
            total_seconds: t2.duration_since(t0).as_secs_f64(),
            requests_after_trigger: self.metrics.requests_after_trigger.get(),
            quiet_window: window,
            last_arrival_seconds: last.map(|l| l.duration_since(t0).as_secs_f64()),
            traffic_after_deregistration_seconds: last
                .map_or(0.0, |l| l.saturating_duration_since(t1).as_secs_f64()),
            data_planes: following.data_planes.clone(),
            data_plane_lag_seconds: hold.as_secs_f64(),
            released_by,
            sources,
            sources_let_go: let_go.borrow().let_go,
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
