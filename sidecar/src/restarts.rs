//! The app's restarts, as the sidecar sees them: the app's port stops accepting connections,
//! then accepts again. The sidecar keeps the pod's port, so a restart need refuse nothing:
//! requests that arrive meanwhile wait here for the app (up to `--upstream-restart-wait`), and
//! /readyz turns 503 once the app has been gone a moment so Services move new traffic away.
//! See docs/restarts.md.
//!
//! The state is learnt from connection attempts: the proxy's own (a refused connect), and a
//! prober that, while the app is away, knocks on its port every 50 ms and wakes the waiting
//! requests the moment it answers. An app that is up costs nothing but one atomic load per
//! request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tracing::{info, warn};

use crate::defaults;
use crate::metrics::{RestartFailure, RestartMetrics};
use crate::proxy::GaugeGuard;

/// The app's port, as the last connection attempt found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppState {
    /// Not seen accepting yet: the sidecar starts before the app.
    Starting {
        since: Instant,
    },
    Up,
    /// Refusing connections since `since`: crashed, killed, or starting again.
    Down {
        since: Instant,
    },
    /// About to be restarted by the kubelet (its preStop came, the pod is not terminating):
    /// new requests wait from now on while the old process finishes the ones it has. Up again
    /// only once the port has refused at least once, so the old process is never taken for
    /// the new one, or, if it still accepts at `until`, that process is served again.
    /// `by_kubelet`: the preStop came from the node; only then does the pod turn unready.
    Stopping {
        since: Instant,
        until: Instant,
        by_kubelet: bool,
    },
}

impl AppState {
    fn away_since(self) -> Option<Instant> {
        match self {
            AppState::Up => None,
            AppState::Starting { since }
            | AppState::Down { since }
            | AppState::Stopping { since, .. } => Some(since),
        }
    }
}

/// Why a request was not held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldRefused {
    /// Holding is off (`--upstream-restart-wait 0s`).
    Off,
    /// The app was not back within the wait.
    Expired,
    /// As many requests as allowed are already waiting.
    Full,
}

/// One restart's figures, for its log line.
#[derive(Default)]
struct Episode {
    held: u64,
    longest_hold: Duration,
    retried: u64,
    failed: u64,
}

pub struct Restarts {
    upstream: SocketAddr,
    wait: Duration,
    max_held: usize,
    state: watch::Sender<AppState>,
    /// Mirror of `state != Up` for the request path: one atomic load, no lock.
    away: AtomicBool,
    held: AtomicUsize,
    /// Requests sent to the app whose response has not finished.
    at_app: AtomicUsize,
    /// The longest hold so far, in microseconds (the gauge is a float; this keeps `max` exact).
    longest_hold_us: AtomicU64,
    episode: Mutex<Episode>,
    metrics: RestartMetrics,
}

/// Counts a request at the app for as long as it lives (until its response body ends).
pub struct AtApp(Arc<Restarts>);

impl AtApp {
    /// The response was cut after it started: the client gets a truncated one.
    pub fn cut(&self) {
        self.0.failed(RestartFailure::cut_in_flight);
    }
}

impl Drop for AtApp {
    fn drop(&mut self) {
        self.0.at_app.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Restarts {
    pub fn new(
        upstream: SocketAddr,
        wait: Duration,
        max_held: usize,
        metrics: RestartMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            upstream,
            wait,
            max_held,
            state: watch::Sender::new(AppState::Starting {
                since: Instant::now(),
            }),
            away: AtomicBool::new(true),
            held: AtomicUsize::new(0),
            at_app: AtomicUsize::new(0),
            longest_hold_us: AtomicU64::new(0),
            episode: Mutex::new(Episode::default()),
            metrics,
        })
    }

    pub fn state(&self) -> AppState {
        *self.state.borrow()
    }

    /// Whether a request should wait for the app before it is sent.
    pub fn holding(&self) -> bool {
        !self.wait.is_zero() && self.away.load(Ordering::Relaxed)
    }

    /// How long a request may wait for the app, in all.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    pub fn at_app(self: &Arc<Self>) -> AtApp {
        self.at_app.fetch_add(1, Ordering::Relaxed);
        AtApp(self.clone())
    }

    /// A connection to the app was refused (or could not be made).
    pub fn refused(&self) {
        let became_down = self.leave_up(|since| AppState::Down { since });
        if !became_down {
            // The old process is gone: the next accept is the new one.
            self.state.send_if_modified(|s| match *s {
                AppState::Stopping { since, .. } => {
                    *s = AppState::Down { since };
                    true
                }
                _ => false,
            });
        }
        if became_down {
            if self.wait.is_zero() {
                warn!(upstream = %self.upstream, "app stopped accepting connections: answering 502 until it is back");
            } else {
                warn!(upstream = %self.upstream, wait = ?self.wait, "app stopped accepting connections: holding requests until it is back");
            }
        }
    }

    /// The app accepted a connection (or answered a request).
    pub fn accepted(&self) {
        if !self.away.load(Ordering::Relaxed) {
            return;
        }
        let mut was = None;
        self.state.send_if_modified(|s| match *s {
            // Still the old process, finishing its requests.
            AppState::Stopping { .. } | AppState::Up => false,
            AppState::Starting { .. } | AppState::Down { .. } => {
                was = Some(*s);
                *s = AppState::Up;
                true
            }
        });
        match was {
            Some(AppState::Down { since }) => {
                self.back();
                let e = std::mem::take(&mut *self.episode.lock().expect("not poisoned"));
                info!(
                    down_seconds = since.elapsed().as_secs_f64(),
                    held = e.held,
                    longest_hold_seconds = e.longest_hold.as_secs_f64(),
                    retried = e.retried,
                    failed = e.failed,
                    "app accepting connections again"
                );
            }
            Some(AppState::Starting { since }) => {
                self.back();
                info!(
                    after_seconds = since.elapsed().as_secs_f64(),
                    "app accepting connections"
                );
            }
            _ => {}
        }
    }

    /// Up -> `to`: a restart begins. False when the app was not up.
    fn leave_up(&self, to: impl FnOnce(Instant) -> AppState) -> bool {
        let left = self.state.send_if_modified(|s| {
            let up = *s == AppState::Up;
            if up {
                *s = to(Instant::now());
            }
            up
        });
        if left {
            self.away.store(true, Ordering::Relaxed);
            self.metrics.app_up.set(0);
            self.metrics.app_restarts.inc();
            *self.episode.lock().expect("not poisoned") = Episode::default();
        }
        left
    }

    fn back(&self) {
        self.away.store(false, Ordering::Relaxed);
        self.metrics.app_up.set(1);
    }

    /// The kubelet is about to restart the app (see `Admin::prestop`): new requests wait from
    /// now on. Resolves when the app has finished the requests it has, or after the wait. Not
    /// `by_kubelet`: the app must then stop within `UNCONFIRMED_STOP_WAIT`, or is served again.
    pub async fn stop_for_restart(&self, by_kubelet: bool) -> usize {
        let now = Instant::now();
        let deadline = now + self.wait;
        let stopping = AppState::Stopping {
            since: now,
            until: deadline,
            by_kubelet,
        };
        if !self.leave_up(|_| stopping) && by_kubelet {
            // The kubelet's own preStop after a peer's: the stop is the kubelet's now.
            self.state.send_if_modified(|s| match s {
                AppState::Stopping {
                    by_kubelet: false, ..
                } => {
                    *s = stopping;
                    true
                }
                _ => false,
            });
        }
        let left = loop {
            let n = self.at_app.load(Ordering::Relaxed);
            if n == 0 || Instant::now() >= deadline {
                break n;
            }
            sleep(Duration::from_millis(10)).await;
        };
        if !by_kubelet {
            let until = deadline.min(Instant::now() + defaults::UNCONFIRMED_STOP_WAIT);
            self.state.send_if_modified(|s| match s {
                AppState::Stopping {
                    until: u,
                    by_kubelet: false,
                    ..
                } => {
                    *u = until;
                    true
                }
                _ => false,
            });
        }
        left
    }

    /// Waits for the app to accept again, until `deadline`.
    pub async fn hold(&self, deadline: Instant) -> Result<(), HoldRefused> {
        if self.wait.is_zero() {
            return Err(HoldRefused::Off);
        }
        let held = self.held.fetch_add(1, Ordering::Relaxed);
        let _release = Release(self);
        if held >= self.max_held {
            self.failed(RestartFailure::too_many_held);
            return Err(HoldRefused::Full);
        }
        self.metrics.requests_held.inc();
        let waiting = GaugeGuard::new(&self.metrics.requests_waiting);
        let started = Instant::now();
        let mut rx = self.state.subscribe();
        let back = tokio::select! {
            r = rx.wait_for(|s| *s == AppState::Up) => r.is_ok(),
            _ = sleep_until(deadline) => false,
        };
        drop(waiting);
        let waited = started.elapsed();
        let us = waited.as_micros() as u64;
        if self.longest_hold_us.fetch_max(us, Ordering::Relaxed) < us {
            self.metrics.longest_hold_seconds.set(waited.as_secs_f64());
        }
        {
            let mut e = self.episode.lock().expect("not poisoned");
            e.held += 1;
            e.longest_hold = e.longest_hold.max(waited);
        }
        if back {
            Ok(())
        } else {
            self.failed(RestartFailure::wait_expired);
            Err(HoldRefused::Expired)
        }
    }

    /// A request cut in flight will be sent again once the app is back.
    pub fn retried(&self) {
        self.metrics.requests_retried.inc();
        self.episode.lock().expect("not poisoned").retried += 1;
    }

    /// A request failed because the app restarted (answered 502 or 503).
    pub fn failed(&self, why: RestartFailure) {
        self.metrics.failed(why).inc();
        self.episode.lock().expect("not poisoned").failed += 1;
    }

    /// Why /readyz should say 503, if it should: the app has been away a moment (at once while
    /// it has never been seen). Knocks on the app's port when it is thought up, so an idle pod
    /// notices too.
    pub async fn unready(&self) -> Option<&'static str> {
        if self.state() == AppState::Up && !self.knock().await {
            self.refused();
        }
        match self.state() {
            // Not known to stop: a peer with a token read from the spec must not move traffic.
            AppState::Up
            | AppState::Stopping {
                by_kubelet: false, ..
            } => None,
            AppState::Starting { .. } => Some("app not accepting connections yet"),
            s => s
                .away_since()
                .filter(|t| t.elapsed() >= defaults::APP_AWAY_UNREADY_AFTER)
                .map(|_| "app restarting: not accepting connections"),
        }
    }

    /// After a request was cut in flight: is the app going away? Not at once, as a dying
    /// process closes its sockets one by one, and a connect made between its first reset and
    /// its listener's close lands in a backlog that is about to be reset too.
    pub async fn look_again(&self) {
        sleep(defaults::APP_KNOCK_INTERVAL).await;
        if !self.knock().await {
            self.refused();
        }
    }

    async fn knock(&self) -> bool {
        matches!(
            timeout(
                defaults::APP_KNOCK_TIMEOUT,
                TcpStream::connect(self.upstream)
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// Resolves once the app's port, knocked on every 50 ms, has refused and then accepted
    /// again: a new process of the app. Whoever sees this after a drain knows the pod stays.
    pub async fn came_back(&self) {
        let mut refused = false;
        loop {
            match self.knock().await {
                false => refused = true,
                true if refused => return,
                true => {}
            }
            sleep(defaults::APP_KNOCK_INTERVAL).await;
        }
    }

    /// While the app is away, knocks on its port every 50 ms; its first accept wakes every
    /// waiting request. Runs for the life of the process.
    pub async fn watch_app(self: Arc<Self>) {
        let mut rx = self.state.subscribe();
        loop {
            let _ = rx.wait_for(|s| *s != AppState::Up).await;
            loop {
                let state = self.state();
                if state == AppState::Up {
                    break;
                }
                if self.knock().await {
                    if let AppState::Stopping { since, until, .. } = state
                        && Instant::now() >= until
                    {
                        // The kubelet never stopped it (or the preStop was not for a restart
                        // after all): serve from the process that is there.
                        warn!(waited = ?since.elapsed(), "app was to be restarted but still accepts: sending requests to it again");
                        self.state.send_replace(AppState::Down { since });
                    }
                    self.accepted();
                } else {
                    self.refused();
                }
                sleep(defaults::APP_KNOCK_INTERVAL).await;
            }
        }
    }
}

/// Gives back a waiting request's place.
struct Release<'a>(&'a Restarts);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn app_and_restarts() -> (tokio::net::TcpListener, Arc<Restarts>) {
        let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let restarts = Restarts::new(
            app.local_addr().unwrap(),
            Duration::from_secs(10),
            16,
            crate::metrics::Metrics::new().restarts.clone(),
        );
        restarts.accepted();
        tokio::spawn(restarts.clone().watch_app());
        (app, restarts)
    }

    /// A stop asked by a peer that is not the node, for an app that never stops: requests wait
    /// only briefly, readiness is untouched, and the same process is served again.
    #[tokio::test]
    async fn an_unconfirmed_stop_is_served_again_soon_and_keeps_readiness() {
        let (_app, restarts) = app_and_restarts().await;
        let asked = Instant::now();
        restarts.stop_for_restart(false).await;
        assert!(restarts.holding());
        assert_eq!(restarts.unready().await, None);
        restarts
            .hold(asked + Duration::from_secs(10))
            .await
            .unwrap();
        let held = asked.elapsed();
        assert!(
            held >= defaults::UNCONFIRMED_STOP_WAIT && held < Duration::from_secs(5),
            "held {held:?}"
        );
        assert_eq!(restarts.state(), AppState::Up);
    }

    /// The kubelet's stop: the pod turns unready, and an app that still accepts is waited for
    /// the whole restart wait; a later preStop from a peer does not shorten it.
    #[tokio::test]
    async fn the_kubelets_stop_holds_for_the_wait_and_turns_the_pod_unready() {
        let (_app, restarts) = app_and_restarts().await;
        restarts.stop_for_restart(true).await;
        restarts.stop_for_restart(false).await;
        tokio::time::sleep(defaults::APP_AWAY_UNREADY_AFTER + Duration::from_millis(100)).await;
        assert!(restarts.unready().await.is_some());
        let held = restarts
            .hold(Instant::now() + defaults::UNCONFIRMED_STOP_WAIT * 2)
            .await;
        assert_eq!(held, Err(HoldRefused::Expired));
    }

    /// A peer's stop that the kubelet's own preStop follows becomes the kubelet's.
    #[tokio::test]
    async fn the_kubelets_stop_after_a_peers_takes_over() {
        let (_app, restarts) = app_and_restarts().await;
        restarts.stop_for_restart(false).await;
        restarts.stop_for_restart(true).await;
        assert!(matches!(
            restarts.state(),
            AppState::Stopping {
                by_kubelet: true,
                ..
            }
        ));
    }
}
