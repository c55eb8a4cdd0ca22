//! Leader election on a coordination.k8s.io Lease, so two operator replicas never both act.
//!
//! Written here rather than taken from a crate: the lease crates for kube-rs still target kube
//! 4, and the algorithm is client-go's, in a page. Its three rules are what keep two leaders
//! from ever acting at once:
//! - **Expiry by the candidate's own clock.** A standby judges the lease expired
//!   `leaseDurationSeconds` after the moment *it* last saw the record change (its
//!   resourceVersion), never by the holder's `renewTime`: the nodes' clocks may disagree.
//! - **A renew deadline shorter than the lease.** The leader renews every `RETRY_PERIOD`, each
//!   attempt bounded, and stops acting once `RENEW_DEADLINE` has passed since it *sent* its last
//!   successful renewal. A standby saw that renewal no earlier than it was sent, so it waits at
//!   least `LEASE_DURATION` from then: a leader whose API calls hang has stopped 5 s before.
//! - **Hand back on shutdown.** A leader that stops cleanly empties the holder, so a standby
//!   takes over at its next retry instead of a lease duration later.
//!
//! Writes carry the resourceVersion they read, so two candidates cannot both win a round.

use tokio::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How long a lease holds without a renewal, as written into the Lease.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// The leader stops acting when it has not renewed for this long.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// Between two attempts, of a candidate to acquire or of the leader to renew.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);
/// Handing the lease back on shutdown must not hold the shutdown up.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// The last version of the Lease this replica saw, and when it first saw it.
struct Observed {
    version: String,
    at: Instant,
    duration: Duration,
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    observed: Option<Observed>,
    /// The holder the lease named when this replica last won a round (empty: nobody).
    won_from: String,
}

/// Leadership held: `leading()` turns false when it is lost (the holder must stop acting at
/// once); `release()` hands it back.
pub struct Leadership {
    /// The lease was taken over, not handed back: the leader before (another replica, or this
    /// pod's own container before a restart) stopped without a word, by a crash or because the
    /// API server was away. This replica cannot know what it missed.
    pub inherited: bool,
    leading: watch::Receiver<bool>,
    stop: oneshot::Sender<()>,
    renewer: JoinHandle<()>,
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            observed: None,
            won_from: String::new(),
        }
    }

    /// One round: Ok(true) when this replica holds the lease after it.
    pub async fn try_acquire_or_renew(&mut self) -> kube::Result<bool> {
        let now = MicroTime(Timestamp::now());
        let secs = LEASE_DURATION.as_secs() as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    self.won_from.clear();
                    Ok(true)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        self.observe(&lease);
        let expired = self.expired();
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if !holder.is_empty() && holder != self.identity && !expired {
            return Ok(false);
        }
        if holder != self.identity {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(secs);
        match self
            .api
            .replace(&lease.name_any(), &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observe(&written);
                self.won_from = holder;
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Notes the Lease's version; a new one restarts its expiry clock (this replica's clock).
    fn observe(&mut self, lease: &Lease) {
        let version = lease.resource_version().unwrap_or_default();
        if self.observed.as_ref().is_some_and(|o| o.version == version) {
            return;
        }
        let seconds = lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .filter(|s| *s > 0)
            .map_or(LEASE_DURATION, |s| Duration::from_secs(s as u64));
        self.observed = Some(Observed {
            version,
            at: Instant::now(),
            duration: seconds,
        });
    }

    /// Whether the lease as last observed has gone a whole duration without changing.
    fn expired(&self) -> bool {
        self.observed
            .as_ref()
            .is_none_or(|o| o.at.elapsed() >= o.duration)
    }

    /// Empties the holder if it is this replica, so a standby need not wait for expiry.
    pub async fn release(&mut self) -> kube::Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        let now = MicroTime(Timestamp::now());
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        self.api
            .replace(&lease.name_any(), &PostParams::default(), &lease)
            .await?;
        Ok(())
    }

    /// Blocks until this replica leads, then keeps renewing in the background.
    pub async fn lead(mut self, leader: Gauge) -> Leadership {
        let acquired_at = loop {
            let sent = Instant::now();
            match tokio::time::timeout(RENEW_DEADLINE, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => break sent,
                Ok(Ok(false)) => {
                    tracing::debug!(lease = %self.name, "another replica leads; waiting")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "leader election: lease not reachable"),
                Err(_) => {
                    tracing::warn!(lease = %self.name, "leader election: lease request timed out")
                }
            }
            tokio::time::sleep(RETRY_PERIOD).await;
        };
        let inherited = !self.won_from.is_empty();
        tracing::info!(lease = %self.name, identity = %self.identity, inherited, "became leader");
        leader.set(1);
        let (leading_tx, leading) = watch::channel(true);
        let (stop, stopped) = oneshot::channel();
        let renewer = tokio::spawn(async move {
            let end = self.keep(acquired_at, stopped).await;
            leader.set(0);
            match end {
                Keep::Stopped => {
                    match tokio::time::timeout(RELEASE_TIMEOUT, self.release()).await {
                        Ok(Ok(())) => tracing::info!(lease = %self.name, "lease handed back"),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "could not hand the lease back; it expires")
                        }
                        Err(_) => tracing::warn!("handing the lease back timed out; it expires"),
                    }
                }
                Keep::Lost => {
                    let _ = leading_tx.send(false);
                }
            }
        });
        Leadership {
            inherited,
            leading,
            stop,
            renewer,
        }
    }

    /// Renews until the lease is lost or `stopped` fires.
    async fn keep(&mut self, mut renewed_at: Instant, mut stopped: oneshot::Receiver<()>) -> Keep {
        loop {
            let deadline = renewed_at + RENEW_DEADLINE;
            tokio::select! {
                _ = &mut stopped => return Keep::Stopped,
                _ = tokio::time::sleep_until(deadline.min(Instant::now() + RETRY_PERIOD)) => {}
            }
            let sent = Instant::now();
            let round = tokio::select! {
                _ = &mut stopped => return Keep::Stopped,
                round = tokio::time::timeout_at(deadline, self.try_acquire_or_renew()) => round,
            };
            match round {
                Ok(Ok(true)) => renewed_at = sent,
                Ok(Ok(false)) => {
                    tracing::error!(lease = %self.name, "leadership taken by another replica");
                    return Keep::Lost;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
                Err(_) => {}
            }
            if Instant::now() >= renewed_at + RENEW_DEADLINE {
                tracing::error!(
                    lease = %self.name,
                    deadline = ?RENEW_DEADLINE,
                    "no renewal within the deadline: stopping before the lease can expire"
                );
                return Keep::Lost;
            }
        }
    }
}

enum Keep {
    /// Asked to stop (shutdown): hand the lease back.
    Stopped,
    /// Taken, or not renewed in time: stop acting at once.
    Lost,
}

impl Leadership {
    /// Turns false when leadership is lost.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Stops renewing and hands the lease back (bounded by `RELEASE_TIMEOUT`).
    pub async fn release(self) {
        let _ = self.stop.send(());
        let _ = self.renewer.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{FakeApi, NS};
    use serde_json::json;

    const NAME: &str = "graceful-operator";

    fn elector(api: &FakeApi, identity: &str) -> Elector {
        Elector::new(api.client(), NS, NAME, identity)
    }

    fn holder(api: &FakeApi) -> Option<String> {
        api.get("coordination.k8s.io/v1", "Lease", NAME)
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    }

    /// Version `version` of a lease held by `who`, renewed at `renew_time` by the holder's clock.
    fn lease_held_by(who: &str, renew_time: &str, version: &str) -> serde_json::Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": NAME, "namespace": NS, "resourceVersion": version},
            "spec": {"holderIdentity": who, "leaseDurationSeconds": 15, "renewTime": renew_time,
                     "acquireTime": renew_time, "leaseTransitions": 3}
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_free_lease_is_created_and_held() {
        let api = FakeApi::default();
        let mut a = elector(&api, "a");
        assert!(a.try_acquire_or_renew().await.unwrap());
        assert_eq!(holder(&api).as_deref(), Some("a"));
        let mut b = elector(&api, "b");
        assert!(!b.try_acquire_or_renew().await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_is_judged_by_the_candidates_clock_not_the_holders_renew_time() {
        // The holder's clock is an hour behind: by renewTime the lease expired long ago.
        let api = FakeApi::default();
        let old = (Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_hours(1)).to_string();
        api.put(lease_held_by("a", &old, "10"));
        let mut b = elector(&api, "b");
        assert!(
            !b.try_acquire_or_renew().await.unwrap(),
            "just seen: not expired"
        );
        tokio::time::advance(LEASE_DURATION - Duration::from_secs(1)).await;
        assert!(!b.try_acquire_or_renew().await.unwrap());
        // The holder renews: the record changes, and the expiry clock starts again.
        api.put(lease_held_by("a", &old, "11"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!b.try_acquire_or_renew().await.unwrap(), "renewed 2 s ago");
        tokio::time::advance(LEASE_DURATION).await;
        assert!(
            b.try_acquire_or_renew().await.unwrap(),
            "unchanged for a whole duration"
        );
        let lease = api.get("coordination.k8s.io/v1", "Lease", NAME).unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "b");
        assert_eq!(lease["spec"]["leaseTransitions"], 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_api_calls_hang_stops_before_a_standby_takes_over() {
        let api = FakeApi::default();
        let (client, hung) = api.hangable_client();
        let leadership = Elector::new(client, NS, NAME, "a")
            .lead(Gauge::default())
            .await;
        let mut leading = leadership.leading();
        let stopped = tokio::spawn(async move {
            let _ = leading.wait_for(|l| !*l).await;
            Instant::now()
        });
        // From now on the leader's calls to the apiserver hang; the standby's get through.
        let cut = Instant::now();
        hung.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut standby = elector(&api, "b");
        let took_over = loop {
            if standby.try_acquire_or_renew().await.unwrap() {
                break Instant::now();
            }
            tokio::time::sleep(RETRY_PERIOD).await;
        };
        let stopped = stopped.await.unwrap();
        assert!(
            stopped <= cut + RENEW_DEADLINE,
            "the leader acted {:?} after its last renewal",
            stopped - cut
        );
        assert!(took_over >= cut + LEASE_DURATION);
        assert!(
            took_over - stopped >= LEASE_DURATION - RENEW_DEADLINE,
            "never two leaders: stopped at +{:?}, standby took over at +{:?}",
            stopped - cut,
            took_over - cut
        );
        leadership.release().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_lease_is_taken_at_the_next_retry() {
        let api = FakeApi::default();
        let gauge = Gauge::default();
        let leadership = elector(&api, "a").lead(gauge.clone()).await;
        assert_eq!(gauge.get(), 1);
        let mut standby = elector(&api, "b");
        assert!(!standby.try_acquire_or_renew().await.unwrap());
        assert!(!leadership.inherited, "a new lease");
        leadership.release().await;
        assert_eq!(gauge.get(), 0);
        assert_eq!(holder(&api), None);
        // No waiting for the 15 s: the holder is empty.
        let standby = standby.lead(Gauge::default()).await;
        assert_eq!(holder(&api).as_deref(), Some("b"));
        assert!(!standby.inherited, "handed back, not inherited");
        standby.release().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_not_handed_back_is_inherited() {
        // Another replica's, expired.
        let api = FakeApi::default();
        api.put(lease_held_by("a", &Timestamp::now().to_string(), "10"));
        let b = elector(&api, "b").lead(Gauge::default()).await;
        assert!(b.inherited);
        b.release().await;
        // This pod's own, from before its container restarted: taken at once, but inherited.
        api.put(lease_held_by("c", &Timestamp::now().to_string(), "20"));
        let c = elector(&api, "c").lead(Gauge::default()).await;
        assert!(c.inherited);
        c.release().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_keeps_the_lease_while_renewals_succeed() {
        let api = FakeApi::default();
        let leadership = elector(&api, "a").lead(Gauge::default()).await;
        let mut standby = elector(&api, "b");
        for _ in 0..20 {
            tokio::time::advance(RETRY_PERIOD).await;
            assert!(!standby.try_acquire_or_renew().await.unwrap());
        }
        assert!(*leadership.leading().borrow());
        leadership.release().await;
    }
}
