//! The rollout in one pure function: from what was observed, the spec, the status and the time,
//! [`step`] returns the next status, the events to announce once it is written, the one action to
//! take and when to look again. No API calls here, so every rule is unit-tested on plain values;
//! `rollout.rs` is the thin shell that observes and acts.
//!
//! The Deployment controller does the scaling (docs/rollout.md). The step only decides how many
//! old pods it may remove (`maxUnavailable`): as many as new pods have been serving, ready and
//! listed ready in the EndpointSlices, for `minServingSeconds`. Old pods are available and new
//! ones are not yet (their `minReadySeconds` is held), so at every moment
//! `serving old + proven new >= replicas`.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::{GracefulRolloutSpec, GracefulRolloutStatus, Phase, RolloutRecord};
use crate::drains::{DrainTotals, seconds_text};
use crate::pacing::Held;

/// How often a rollout in progress is looked at while it waits on what no watch shows: an old
/// pod finishing its drain (a terminating pod's end changes no Deployment or ReplicaSet status),
/// a ready pod's EndpointSlices catching up.
pub const PROGRESS_RECHECK: Duration = Duration::from_secs(2);
/// How often a rollout in progress is looked at while it waits only on what its Deployment's
/// status shows (pods created, becoming ready, deleted): a safety net, since each such change
/// wakes it. At 2 s, a hundred rollouts at once cost the apiserver 200 reads a second, most of
/// them finding nothing new, and a rollout's requests grew with its length, not its pods.
pub const PROGRESS_SAFETY_NET: Duration = Duration::from_secs(10);
/// How often a rollout that waits on something no watch shows (a Deployment still missing, a
/// conflict, nothing to roll back to) is looked at.
pub const IDLE_RECHECK: Duration = Duration::from_secs(60);
/// How often a settled rollout is looked at: a safety net only, since any change of its
/// Deployment (its status too, so any pod's) wakes it. Each look is four reads; at 60 s a
/// thousand settled GracefulRollouts cost the apiserver about 70 requests a second for nothing.
pub const SETTLED_RECHECK: Duration = Duration::from_secs(600);
/// A proven pod stops standing in for an old one this long before its hold ends, so the
/// operator's next look (and a little clock skew) comes before the Deployment controller counts it.
pub const AVAILABLE_MARGIN: Duration = Duration::from_secs(5);

/// One pod as the step needs to see it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    pub name: String,
    /// Since when the pod has been Ready (its Ready condition's lastTransitionTime), if it is.
    pub ready_since: Option<Timestamp>,
    /// Whether an EndpointSlice lists it as ready; `None` when no slice mentions it.
    pub listed_ready: Option<bool>,
    /// Set once the pod is terminating (draining).
    pub terminating: bool,
}

impl PodView {
    /// Ready, not terminating, and, where Services select it, listed ready in their slices.
    pub fn serving(&self, slices_expected: bool) -> bool {
        !self.terminating
            && self.ready_since.is_some()
            && (!slices_expected || self.listed_ready == Some(true))
    }
}

/// One ReplicaSet of the Deployment.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaSetView {
    pub name: String,
    /// Its `pod-template-hash`.
    pub revision: String,
    pub replicas: i32,
    pub min_ready_seconds: i32,
    /// Its template is the Deployment's: the Deployment controller's "new ReplicaSet".
    pub current: bool,
    pub created: Timestamp,
    pub pods: Vec<PodView>,
}

/// Everything one decision depends on, as read from the cluster.
#[derive(Clone, Debug)]
pub struct Observed {
    /// The GracefulRollout's own name.
    pub rollout: String,
    /// The Deployment's `graceful.dev/rollout` label: which GracefulRollout manages it.
    pub manager: Option<String>,
    pub replicas: i32,
    /// `spec.paused` of the Deployment (`kubectl rollout pause`).
    pub deployment_paused: bool,
    pub recreate: bool,
    /// The user's held values: `Some` while the rollout is paced.
    pub held: Option<Held>,
    /// The Deployment's `maxUnavailable`, when it is a count.
    pub max_unavailable: Option<i32>,
    /// The `minReadySeconds` a hold uses for this Deployment (`pacing::hold_seconds`).
    pub hold: i32,
    /// The Deployment's `minReadySeconds` is held (not the user's).
    pub min_ready_held: bool,
    /// The Deployment's `status.availableReplicas`, as of its current generation.
    pub available: i32,
    /// The Deployment's own `minReadySeconds` (the user's, when nothing is held).
    pub user_min_ready_at_rest: i32,
    /// Index in the Deployment's managedFields of the operator's own entry for spec fields (the
    /// held ones it wrote back), if there is one.
    pub spec_fields_entry: Option<usize>,
    /// The Deployment controller reported `ProgressDeadlineExceeded` for the current generation.
    pub timed_out: bool,
    pub replica_sets: Vec<ReplicaSetView>,
    /// Some pod of the Deployment is listed in an EndpointSlice, so new pods must be too before
    /// they count as serving.
    pub slices_expected: bool,
    /// The drains seen during the rollout in progress (kept in memory by the shell).
    pub drains: DrainTotals,
    /// The API server was away lately: how long yet until every data plane's watch is surely
    /// back (`outage::ApiOutages::settling`). No old pod gets leave to go until then.
    pub api_settling: Option<Duration>,
}

/// The one write to make before the status.
#[derive(Clone, Debug, PartialEq)]
pub enum Act {
    None,
    /// Label the Deployment with [`crate::names::MANAGED_LABEL`] so its updates reach the webhook.
    Label,
    /// Let the Deployment controller remove up to this many old pods in all.
    Step {
        max_unavailable: i32,
    },
    /// Give these former new ReplicaSets the user's `minReadySeconds` back.
    Release {
        replica_sets: Vec<String>,
        min_ready_seconds: i32,
    },
    /// Every new pod serves: the user's `minReadySeconds` back first, so the new pods count as
    /// available before `maxUnavailable` drops back to the user's value (the other order would
    /// make the Deployment's Available condition flicker False).
    MakeAvailable {
        min_ready_seconds: i32,
    },
    /// The rollout is over and its pods available: the user's strategy back, the hold gone.
    Finish,
    /// Drop the operator's managedFields entry for the Deployment's spec: the fields it wrote
    /// back are the user's again, and a server-side apply of other values must not conflict
    /// with "graceful-operator".
    Disown {
        entry: usize,
    },
    /// Put this ReplicaSet's template back into the Deployment. With `report`, first say why in
    /// the Deployment's own Progressing condition (the Deployment controller has not: an abort),
    /// so a running `kubectl rollout status` fails instead of watching the rollback complete.
    RollBack {
        to: String,
        report: Option<String>,
    },
}

/// An Event to publish once the status is written.
#[derive(Clone, Debug, PartialEq)]
pub struct Announcement {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
    /// It announces the action's write (published once that succeeded), not the status's.
    pub of_act: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub status: GracefulRolloutStatus,
    pub act: Act,
    pub announce: Vec<Announcement>,
    /// The status marks a rollout's start or end: written even if it looks unchanged, and
    /// counted in the metrics once written. (Every status write goes only onto the version read,
    /// so a stale copy never records or announces a start or end twice.)
    pub guarded: bool,
    pub requeue: Duration,
}

/// Counts for the status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    /// Pods of the current revision, not terminating.
    pub updated: i32,
    pub serving: i32,
    pub draining: i32,
    /// Current-revision pods that have served for at least `minServingSeconds` and are not
    /// about to count as available to the Deployment controller: each stands in for an old pod.
    pub proven: i32,
    /// When the next pod enters or leaves `proven`.
    pub next_proof: Option<Duration>,
    /// Ready pods, not terminating, whose EndpointSlices do not list them ready yet: the
    /// slices' change wakes nothing.
    pub unlisted: i32,
}

impl Observed {
    fn current(&self) -> Option<&ReplicaSetView> {
        self.replica_sets.iter().find(|rs| rs.current)
    }

    /// Old ReplicaSets that still have pods or want some.
    fn old_active(&self) -> impl Iterator<Item = &ReplicaSetView> {
        self.replica_sets
            .iter()
            .filter(|rs| !rs.current && (rs.replicas > 0 || !rs.pods.is_empty()))
    }

    pub fn counts(&self, min_serving: Duration, now: Timestamp) -> Counts {
        let mut c = Counts::default();
        for rs in &self.replica_sets {
            for pod in &rs.pods {
                if pod.terminating {
                    c.draining += 1;
                    continue;
                }
                let serving = pod.serving(self.slices_expected);
                c.serving += i32::from(serving);
                c.unlisted += i32::from(pod.ready_since.is_some() && !serving);
                if !rs.current {
                    continue;
                }
                c.updated += 1;
                let (true, Some(since)) = (serving, pod.ready_since) else {
                    continue;
                };
                // Proven from minServing on, until shortly before the Deployment controller
                // counts it as available by itself (ready for the hold): counted by both, it
                // would release two old pods.
                let served = now.duration_since(since).unsigned_abs();
                let hold = Duration::from_secs(self.hold.max(0) as u64);
                let counted_until = hold.saturating_sub(AVAILABLE_MARGIN);
                let next = if served < min_serving {
                    Some(min_serving - served)
                } else if served < counted_until {
                    c.proven += 1;
                    Some(counted_until - served)
                } else {
                    None
                };
                if let Some(left) = next {
                    c.next_proof = Some(c.next_proof.map_or(left, |n| n.min(left)));
                }
            }
        }
        c
    }
}

/// The next status, action and events.
pub fn step(
    seen: &Observed,
    spec: &GracefulRolloutSpec,
    status: &GracefulRolloutStatus,
    now: Timestamp,
) -> Decision {
    let min_serving = Duration::from_secs(spec.strategy.min_serving_seconds.max(0) as u64);
    let counts = seen.counts(min_serving, now);
    let mut st = status.clone();
    st.replicas = seen.replicas;
    st.updated = counts.updated;
    st.serving = counts.serving;
    st.draining = counts.draining;
    st.progress = Some(format!("{}/{}", counts.updated, seen.replicas));
    let mut d = Decision {
        status: st,
        act: Act::None,
        announce: vec![],
        guarded: false,
        requeue: PROGRESS_RECHECK,
    };

    if let Some(other) = seen.manager.as_ref().filter(|m| **m != seen.rollout) {
        let msg = format!("the Deployment is already managed by GracefulRollout {other}");
        degrade(&mut d.status, "Conflict", &msg);
        d.requeue = IDLE_RECHECK;
        return d;
    }
    if seen.manager.is_none() {
        d.act = Act::Label;
        d.requeue = Duration::ZERO;
        return d;
    }
    let Some(current) = seen.current() else {
        d.status.current_step =
            Some("waiting for the Deployment controller's new ReplicaSet".into());
        d.requeue = Duration::from_millis(500);
        return d;
    };
    d.status.updated_revision = Some(current.revision.clone());

    // A ReplicaSet that stopped being the new one while held: its serving pods must count as
    // available again before anything else is decided.
    let user_min_ready = seen
        .held
        .as_ref()
        .map_or(seen.user_min_ready_at_rest, Held::min_ready_seconds);
    let held_old: Vec<String> = seen
        .replica_sets
        .iter()
        .filter(|rs| {
            !rs.current
                && crate::pacing::held_min_ready(rs.min_ready_seconds, seen.hold, user_min_ready)
        })
        .filter(|rs| rs.replicas > 0 || !rs.pods.is_empty())
        .map(|rs| rs.name.clone())
        .collect();
    if !held_old.is_empty() {
        d.act = Act::Release {
            replica_sets: held_old,
            min_ready_seconds: user_min_ready,
        };
        d.requeue = Duration::ZERO;
        return d;
    }

    match &seen.held {
        None => at_rest(seen, current, &counts, d),
        Some(_) => paced(seen, spec, current, &counts, now, d),
    }
}

/// No hold: between rollouts, just after one ended, or a rollout the webhook never saw.
fn at_rest(
    seen: &Observed,
    current: &ReplicaSetView,
    counts: &Counts,
    mut d: Decision,
) -> Decision {
    if let Some(entry) = seen.spec_fields_entry {
        d.act = Act::Disown { entry };
    }
    let st = &mut d.status;
    if let Some(started) = st.rollout_started_at.take() {
        // The hold was lifted (by us, at the end): record the rollout that just finished.
        let rolled_back = st.phase == Phase::RollingBack;
        let outcome = if rolled_back {
            "RolledBack"
        } else {
            "Succeeded"
        };
        let record = record(
            &seen.drains,
            &current.revision,
            started,
            outcome,
            seen.replicas,
        );
        st.last_progress_at = None;
        st.stable_revision = Some(current.revision.clone());
        if rolled_back {
            let failed = st.failed_revision.clone().unwrap_or_default();
            let msg = format!(
                "revision {failed} was rolled back to {}; change the template to roll out again",
                current.revision
            );
            degrade(st, "RolledBack", &msg);
        } else {
            settle(st, current, counts, seen.replicas);
        }
        no_rollout(st);
        d.announce.push(Announcement {
            warning: rolled_back,
            reason: if rolled_back {
                "RolledBack"
            } else {
                "RolloutFinished"
            },
            note: record.summary.clone(),
            of_act: false,
        });
        st.last_rollout = Some(record);
        d.guarded = true;
        d.requeue = SETTLED_RECHECK;
        return d;
    }
    if seen.old_active().next().is_some() {
        // The template changed without the hold (the webhook was unreachable, or the Deployment
        // uses Recreate): the Deployment controller rolls out on its own; sidecars still drain.
        st.phase = Phase::Progressing;
        st.current_step = Some(if seen.recreate {
            "Recreate strategy: rolling out natively".into()
        } else {
            "rolling out natively: the change was not paced (webhook unreachable when it was made)"
                .into()
        });
        set_condition(
            st,
            "Progressing",
            true,
            "Native",
            "rolled out by the Deployment controller",
        );
        return d;
    }
    let rolled_back_here = st.phase == Phase::Degraded
        && st.stable_revision.as_deref() == Some(current.revision.as_str())
        && st.failed_revision.is_some();
    if !rolled_back_here {
        st.stable_revision = Some(current.revision.clone());
        settle(st, current, counts, seen.replicas);
    }
    no_rollout(st);
    d.requeue = SETTLED_RECHECK;
    d
}

fn no_rollout(st: &mut GracefulRolloutStatus) {
    set_condition(
        st,
        "Progressing",
        false,
        "Settled",
        "no rollout in progress",
    );
}

fn settle(
    st: &mut GracefulRolloutStatus,
    current: &ReplicaSetView,
    counts: &Counts,
    replicas: i32,
) {
    st.phase = Phase::Healthy;
    st.current_step = Some(format!(
        "{}/{replicas} pods of revision {} serving",
        counts.serving, current.revision
    ));
    let available = counts.serving >= replicas;
    let reason = if available {
        "AllServing"
    } else {
        "NotAllServing"
    };
    set_condition(st, "Available", available, reason, "");
    set_condition(st, "Degraded", false, "Healthy", "");
}

/// The hold is on: a graceful rollout (or its rollback) runs.
fn paced(
    seen: &Observed,
    spec: &GracefulRolloutSpec,
    current: &ReplicaSetView,
    counts: &Counts,
    now: Timestamp,
    mut d: Decision,
) -> Decision {
    let st = &mut d.status;
    let replicas = seen.replicas;
    if st.rollout_started_at.is_none() {
        st.rollout_started_at = Some(Time(now));
        st.last_progress_at = Some(Time(now));
        st.phase = Phase::Progressing;
        let msg = format!(
            "rolling out revision {} to {replicas} pods: an old pod leaves only after a new one has served {}s",
            current.revision, spec.strategy.min_serving_seconds
        );
        st.current_step = Some(msg.clone());
        set_condition(st, "Progressing", true, "RollingOut", &msg);
        set_condition(st, "Degraded", false, "Progressing", "");
        d.announce.push(Announcement {
            warning: false,
            reason: "RolloutStarted",
            note: msg,
            of_act: false,
        });
        d.guarded = true;
        d.requeue = Duration::ZERO;
        return d;
    }

    let old_left = seen.old_active().next().is_some();
    let done = !old_left && current.replicas >= replicas && counts.serving >= replicas;
    if st.phase == Phase::RollingBack {
        if done {
            finish(seen, &mut d);
        } else {
            st.current_step = Some(format!(
                "rolling back to revision {}: {}/{replicas} pods",
                current.revision, counts.updated
            ));
        }
        return d;
    }

    let paused = spec.paused || seen.deployment_paused;
    let failing = spec.abort || (spec.strategy.auto_rollback && seen.timed_out);
    if failing && !paused {
        let why = if spec.abort {
            "aborted (spec.abort)".to_string()
        } else {
            "no progress within the Deployment's progressDeadlineSeconds".to_string()
        };
        let stable = seen
            .replica_sets
            .iter()
            .filter(|rs| !rs.current && (rs.replicas > 0 || !rs.pods.is_empty()))
            .find(|rs| st.stable_revision.as_deref() == Some(rs.revision.as_str()))
            .or_else(|| seen.old_active().max_by_key(|rs| rs.created));
        let Some(stable) = stable else {
            let msg = format!(
                "revision {} {why}, and no earlier revision has pods to return to",
                current.revision
            );
            degrade(st, "NothingToRollBackTo", &msg);
            d.requeue = IDLE_RECHECK;
            return d;
        };
        let msg = format!(
            "revision {} {why}: rolling back to revision {}; its pods were never removed",
            current.revision, stable.revision
        );
        st.failed_revision = Some(current.revision.clone());
        st.phase = Phase::RollingBack;
        st.current_step = Some(msg.clone());
        set_condition(st, "Progressing", true, "RollingBack", &msg);
        set_condition(st, "Degraded", true, "RollingBack", &msg);
        d.act = Act::RollBack {
            to: stable.name.clone(),
            report: (!seen.timed_out).then(|| format!("graceful: {msg}")),
        };
        d.announce.push(Announcement {
            warning: true,
            reason: "RollingBack",
            note: msg,
            of_act: false,
        });
        d.guarded = true;
        return d;
    }

    if done {
        finish(seen, &mut d);
        return d;
    }
    let allowed = counts.proven.clamp(0, replicas);
    let now_allowed = seen.max_unavailable.unwrap_or(0);
    st.phase = if paused {
        Phase::Paused
    } else {
        Phase::Progressing
    };
    // After an outage of the API server, data planes may still route by what they knew before
    // it: an old pod let go now might be dropped by the API and not yet by them.
    let settling = seen
        .api_settling
        .filter(|_| allowed > now_allowed && !paused);
    if allowed < now_allowed || (allowed > now_allowed && !paused && settling.is_none()) {
        d.act = Act::Step {
            max_unavailable: allowed,
        };
        if allowed > now_allowed {
            st.last_progress_at = Some(Time(now));
            d.announce.push(Announcement {
                warning: false,
                reason: "Step",
                note: format!(
                    "{allowed}/{replicas} new pods have served {}s: the Deployment controller may replace {} more old pod(s)",
                    spec.strategy.min_serving_seconds,
                    allowed - now_allowed
                ),
                of_act: true,
            });
        }
    }
    let msg = if paused {
        let by = if spec.paused {
            "the GracefulRollout's spec.paused"
        } else {
            "kubectl rollout pause (the Deployment's spec.paused)"
        };
        format!("paused by {by}: {}/{replicas} updated", counts.updated)
    } else if let Some(left) = settling {
        format!(
            "{}/{replicas} updated, {} proven serving: the API server was away; the next old pod \
             leaves in {}s, once every data plane's watch is surely back",
            counts.updated,
            counts.proven,
            left.as_secs().max(1)
        )
    } else if counts.draining > 0 && counts.proven >= replicas {
        format!(
            "waiting for {} old pod(s) to finish draining",
            counts.draining
        )
    } else {
        format!(
            "{}/{replicas} updated, {} proven serving, {} draining",
            counts.updated, counts.proven, counts.draining
        )
    };
    st.current_step = Some(msg.clone());
    let reason = if paused { "Paused" } else { "RollingOut" };
    set_condition(st, "Progressing", !paused, reason, &msg);
    d.requeue = progress_requeue(counts);
    if let Some(left) = settling {
        d.requeue = d.requeue.min(left);
    }
    d
}

/// When to look again at a rollout in progress: when the next pod's proof is due, and no later
/// than the next look for what no watch shows.
fn progress_requeue(counts: &Counts) -> Duration {
    let unwatched = counts.draining > 0 || counts.unlisted > 0;
    let net = if unwatched {
        PROGRESS_RECHECK
    } else {
        PROGRESS_SAFETY_NET
    };
    counts
        .next_proof
        .map_or(net, |left| left.clamp(Duration::from_millis(200), net))
}

/// The end of a paced rollout, in two writes: availability first, then the user's strategy.
fn finish(seen: &Observed, d: &mut Decision) {
    let user_min_ready = seen.held.as_ref().map_or(0, Held::min_ready_seconds);
    if seen.min_ready_held {
        d.act = Act::MakeAvailable {
            min_ready_seconds: user_min_ready,
        };
        d.requeue = Duration::ZERO;
    } else if seen.available >= seen.replicas {
        d.act = Act::Finish;
        d.requeue = Duration::ZERO;
    } else {
        d.status.current_step = Some(format!(
            "every new pod serves; {}/{} available to the Deployment controller",
            seen.available, seen.replicas
        ));
        d.requeue = Duration::from_millis(500);
    }
}

fn record(
    drains: &DrainTotals,
    revision: &str,
    started: Time,
    outcome: &str,
    replicas: i32,
) -> RolloutRecord {
    let finished = Time(Timestamp::now());
    let took = finished.0.duration_since(started.0).as_secs();
    // The longest drain's hold for its data planes says why it took that long.
    let why = match (
        drains.longest_data_plane_lag_seconds,
        &drains.longest_released_by,
    ) {
        (Some(lag), Some(by)) if lag > 0.0 => {
            format!(" (data-plane lag {}, released by {by})", seconds_text(lag))
        }
        _ => String::new(),
    };
    let summary = format!(
        "{outcome} in {took}s, {replicas} pods, longest drain {}s{why}, {} cut",
        drains.longest_seconds, drains.connections_cut
    );
    RolloutRecord {
        revision: revision.into(),
        started_at: started,
        finished_at: finished,
        outcome: outcome.into(),
        pods_replaced: replicas.max(drains.pods),
        longest_drain_seconds: drains.longest_seconds,
        connections_force_closed: drains.connections_cut,
        summary,
    }
}

fn degrade(st: &mut GracefulRolloutStatus, reason: &str, msg: &str) {
    st.phase = Phase::Degraded;
    st.current_step = Some(msg.into());
    set_condition(st, "Degraded", true, reason, msg);
}

/// Upsert a condition by type; lastTransitionTime moves only when the status flips.
fn set_condition(
    st: &mut GracefulRolloutStatus,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
) {
    let value = if ok { "True" } else { "False" };
    let generation = st.observed_generation;
    match st.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = Time(Timestamp::now());
            }
            c.status = value.into();
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = generation;
        }
        None => st.conditions.push(Condition {
            type_: type_.into(),
            status: value.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: Time(Timestamp::now()),
            observed_generation: generation,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Strategy;
    use k8s_openapi::jiff::SignedDuration;

    const HOLD: i32 = 599;

    fn at(t0: Timestamp, secs: i64) -> Timestamp {
        t0.checked_add(SignedDuration::from_secs(secs)).unwrap()
    }

    fn spec() -> GracefulRolloutSpec {
        serde_json::from_value(serde_json::json!({
            "targetRef": {"name": "web"},
            "strategy": {"minServingSeconds": 5}
        }))
        .unwrap()
    }

    fn pod(name: &str, ready_since: Option<Timestamp>) -> PodView {
        PodView {
            name: name.into(),
            ready_since,
            listed_ready: Some(ready_since.is_some()),
            terminating: false,
        }
    }

    fn rs(name: &str, replicas: i32, current: bool, pods: Vec<PodView>) -> ReplicaSetView {
        ReplicaSetView {
            name: name.into(),
            revision: name.into(),
            replicas,
            min_ready_seconds: if current { HOLD } else { 0 },
            current,
            created: Timestamp::UNIX_EPOCH,
            pods,
        }
    }

    fn observed(sets: Vec<ReplicaSetView>, held: bool) -> Observed {
        Observed {
            rollout: "web".into(),
            manager: Some("web".into()),
            replicas: 3,
            deployment_paused: false,
            recreate: false,
            held: held.then(Held::default),
            max_unavailable: Some(0),
            hold: HOLD,
            min_ready_held: held,
            available: 3,
            user_min_ready_at_rest: 0,
            spec_fields_entry: None,
            timed_out: false,
            replica_sets: sets,
            slices_expected: true,
            drains: DrainTotals::default(),
            api_settling: None,
        }
    }

    fn old3(now: Timestamp) -> ReplicaSetView {
        let long_ago = Some(at(now, -600));
        rs(
            "old",
            3,
            false,
            (1..=3)
                .map(|i| pod(&format!("old-{i}"), long_ago))
                .collect(),
        )
    }

    fn started(now: Timestamp) -> GracefulRolloutStatus {
        GracefulRolloutStatus {
            phase: Phase::Progressing,
            stable_revision: Some("old".into()),
            rollout_started_at: Some(Time(at(now, -30))),
            ..Default::default()
        }
    }

    #[test]
    fn an_unlabelled_deployment_is_labelled_first() {
        let now = Timestamp::now();
        let mut seen = observed(vec![rs("old", 3, true, vec![])], false);
        seen.manager = None;
        let d = step(&seen, &spec(), &Default::default(), now);
        assert_eq!(d.act, Act::Label);
    }

    #[test]
    fn a_deployment_managed_by_another_rollout_is_refused() {
        let now = Timestamp::now();
        let mut seen = observed(vec![rs("old", 3, true, vec![])], false);
        seen.manager = Some("other".into());
        let d = step(&seen, &spec(), &Default::default(), now);
        assert_eq!(d.act, Act::None);
        assert_eq!(d.status.phase, Phase::Degraded);
        assert!(d.status.current_step.unwrap().contains("other"));
    }

    #[test]
    fn a_rollouts_start_is_guarded_and_announced_once_written() {
        let now = Timestamp::now();
        let seen = observed(
            vec![old3(now), rs("new", 1, true, vec![pod("new-1", None)])],
            true,
        );
        let d = step(&seen, &spec(), &GracefulRolloutStatus::default(), now);
        assert!(d.guarded);
        assert_eq!(
            d.act,
            Act::None,
            "the start is recorded before anything else"
        );
        assert_eq!(d.announce.len(), 1);
        assert_eq!(d.announce[0].reason, "RolloutStarted");
        assert_eq!(d.status.rollout_started_at, Some(Time(now)));
        // Recorded: the next step neither restarts the clock nor announces again.
        let again = step(&seen, &spec(), &d.status, at(now, 1));
        assert!(!again.guarded);
        assert!(again.announce.is_empty());
        assert_eq!(again.status.rollout_started_at, Some(Time(now)));
    }

    #[test]
    fn a_new_pod_must_serve_min_serving_seconds_before_an_old_pod_may_go() {
        let now = Timestamp::now();
        let young = rs("new", 1, true, vec![pod("new-1", Some(at(now, -3)))]);
        let d = step(
            &observed(vec![old3(now), young], true),
            &spec(),
            &started(now),
            now,
        );
        assert_eq!(d.act, Act::None);
        assert_eq!(d.requeue, Duration::from_secs(2), "proof due in 2 s");
        let proven = rs("new", 1, true, vec![pod("new-1", Some(at(now, -6)))]);
        let d = step(
            &observed(vec![old3(now), proven], true),
            &spec(),
            &started(now),
            now,
        );
        assert_eq!(d.act, Act::Step { max_unavailable: 1 });
        assert_eq!(d.announce[0].reason, "Step");
    }

    #[test]
    fn after_an_api_server_outage_no_old_pod_goes_until_the_data_planes_are_back() {
        let now = Timestamp::now();
        let proven = |n| {
            let pods = (1..=n)
                .map(|i| pod(&format!("new-{i}"), Some(at(now, -60))))
                .collect();
            rs("new", n, true, pods)
        };
        let mut seen = observed(vec![old3(now), proven(2)], true);
        seen.max_unavailable = Some(1);
        seen.api_settling = Some(Duration::from_secs(42));
        let d = step(&seen, &spec(), &started(now), now);
        assert_eq!(d.act, Act::None, "the second old pod waits");
        assert!(d.announce.is_empty());
        assert_eq!(d.requeue, PROGRESS_SAFETY_NET, "still looked at as usual");
        let step_msg = d.status.current_step.unwrap();
        assert!(step_msg.contains("API server was away"), "{step_msg}");
        assert!(step_msg.contains("42s"), "{step_msg}");
        // Once settled, the step it held is taken.
        seen.api_settling = None;
        let d = step(&seen, &spec(), &started(now), now);
        assert_eq!(d.act, Act::Step { max_unavailable: 2 });
        // A pod that stopped serving takes its allowance back whatever the API did.
        let mut seen = observed(vec![old3(now), proven(1)], true);
        seen.max_unavailable = Some(2);
        seen.api_settling = Some(Duration::from_secs(42));
        let d = step(&seen, &spec(), &started(now), now);
        assert_eq!(d.act, Act::Step { max_unavailable: 1 });
        // The requeue comes no later than the end of the wait.
        let mut seen = observed(vec![old3(now), proven(2)], true);
        seen.max_unavailable = Some(1);
        seen.api_settling = Some(Duration::from_millis(700));
        let d = step(&seen, &spec(), &started(now), now);
        assert_eq!(d.requeue, Duration::from_millis(700));
    }

    #[test]
    fn a_ready_pod_not_yet_listed_ready_in_the_endpointslices_does_not_count() {
        let now = Timestamp::now();
        let mut p = pod("new-1", Some(at(now, -60)));
        p.listed_ready = Some(false);
        let d = step(
            &observed(vec![old3(now), rs("new", 1, true, vec![p])], true),
            &spec(),
            &started(now),
            now,
        );
        assert_eq!(d.act, Act::None);
    }

    #[test]
    fn a_rollout_in_progress_is_looked_at_when_something_is_due_or_unwatched() {
        let now = Timestamp::now();
        let looks = |sets: Vec<ReplicaSetView>| {
            step(&observed(sets, true), &spec(), &started(now), now).requeue
        };
        // A new pod starting: its readiness changes the Deployment's status, which wakes it.
        let starting = rs("new", 1, true, vec![pod("new-1", None)]);
        assert_eq!(looks(vec![old3(now), starting]), PROGRESS_SAFETY_NET);
        // A proof due in 4 s: then, not sooner.
        let young = rs("new", 1, true, vec![pod("new-1", Some(at(now, -1)))]);
        assert_eq!(looks(vec![old3(now), young]), Duration::from_secs(4));
        // Ready but not yet in the slices, or an old pod draining: no watch shows their end.
        let mut unlisted = pod("new-1", Some(at(now, -60)));
        unlisted.listed_ready = Some(false);
        let unlisted = rs("new", 1, true, vec![unlisted]);
        assert_eq!(looks(vec![old3(now), unlisted]), PROGRESS_RECHECK);
        let mut old = old3(now);
        old.pods[0].terminating = true;
        let starting = rs("new", 1, true, vec![pod("new-1", None)]);
        assert_eq!(looks(vec![old, starting]), PROGRESS_RECHECK);
    }

    #[test]
    fn paused_by_either_side_takes_no_step() {
        let now = Timestamp::now();
        let proven = || rs("new", 1, true, vec![pod("new-1", Some(at(now, -60)))]);
        let mut seen = observed(vec![old3(now), proven()], true);
        seen.deployment_paused = true;
        let d = step(&seen, &spec(), &started(now), now);
        assert_eq!(d.act, Act::None);
        assert_eq!(d.status.phase, Phase::Paused);
        let mut paused = spec();
        paused.paused = true;
        let d = step(
            &observed(vec![old3(now), proven()], true),
            &paused,
            &started(now),
            now,
        );
        assert_eq!(d.act, Act::None);
        assert!(d.status.current_step.unwrap().contains("spec.paused"));
    }

    #[test]
    fn a_new_pod_that_stops_serving_takes_its_allowance_back_even_when_paused() {
        let now = Timestamp::now();
        let mut seen = observed(
            vec![old3(now), rs("new", 1, true, vec![pod("new-1", None)])],
            true,
        );
        seen.max_unavailable = Some(1);
        seen.deployment_paused = true;
        let d = step(&seen, &spec(), &started(now), now);
        assert_eq!(d.act, Act::Step { max_unavailable: 0 });
        assert!(d.announce.is_empty());
    }

    #[test]
    fn the_end_waits_for_the_last_drain_then_lifts_the_hold() {
        let now = Timestamp::now();
        let new = || {
            rs(
                "new",
                3,
                true,
                (1..=3)
                    .map(|i| pod(&format!("new-{i}"), Some(at(now, -60))))
                    .collect(),
            )
        };
        let mut draining = pod("old-1", None);
        draining.terminating = true;
        let mut seen = observed(vec![rs("old", 0, false, vec![draining]), new()], true);
        seen.max_unavailable = Some(3);
        let d = step(&seen, &spec(), &started(now), now);
        assert_eq!(d.act, Act::None);
        assert!(d.status.current_step.unwrap().contains("draining"));
        let mut seen = observed(vec![rs("old", 0, false, vec![]), new()], true);
        seen.max_unavailable = Some(3);
        seen.available = 0;
        assert_eq!(
            step(&seen, &spec(), &started(now), now).act,
            Act::MakeAvailable {
                min_ready_seconds: 0
            },
            "availability first"
        );
        seen.min_ready_held = false;
        assert_eq!(step(&seen, &spec(), &started(now), now).act, Act::None);
        seen.available = 3;
        assert_eq!(step(&seen, &spec(), &started(now), now).act, Act::Finish);
    }

    #[test]
    fn once_the_hold_is_lifted_the_rollout_is_recorded_once() {
        let now = Timestamp::now();
        let new = rs(
            "new",
            3,
            true,
            (1..=3)
                .map(|i| pod(&format!("new-{i}"), Some(at(now, -60))))
                .collect(),
        );
        let seen = observed(vec![rs("old", 0, false, vec![]), new], false);
        let d = step(&seen, &spec(), &started(now), now);
        assert!(d.guarded);
        assert_eq!(d.status.phase, Phase::Healthy);
        assert_eq!(d.status.stable_revision.as_deref(), Some("new"));
        assert_eq!(d.status.last_rollout.as_ref().unwrap().outcome, "Succeeded");
        assert_eq!(d.announce[0].reason, "RolloutFinished");
        let again = step(&seen, &spec(), &d.status, now);
        assert!(!again.guarded && again.announce.is_empty());
        assert_eq!(again.status.last_rollout, d.status.last_rollout);
        // Settled: the Deployment's changes wake it, the timer is only a safety net.
        assert_eq!(
            (d.requeue, again.requeue),
            (SETTLED_RECHECK, SETTLED_RECHECK)
        );
    }

    #[test]
    fn at_rest_the_operator_gives_up_ownership_of_the_fields_it_wrote_back() {
        let now = Timestamp::now();
        let mut seen = observed(vec![rs("new", 3, true, vec![])], false);
        seen.spec_fields_entry = Some(2);
        assert_eq!(
            step(&seen, &spec(), &started(now), now).act,
            Act::Disown { entry: 2 }
        );
        let mut paced = observed(vec![rs("new", 3, true, vec![])], true);
        paced.spec_fields_entry = Some(2);
        assert_ne!(
            step(&paced, &spec(), &started(now), now).act,
            Act::Disown { entry: 2 }
        );
    }

    #[test]
    fn a_pod_replaced_between_rollouts_is_no_rollout() {
        let now = Timestamp::now();
        let mut gone = pod("new-1", None);
        gone.terminating = true;
        let pods = vec![gone, pod("new-2", Some(at(now, -60))), pod("new-3", None)];
        let seen = observed(vec![rs("new", 3, true, pods)], false);
        let healthy = GracefulRolloutStatus {
            phase: Phase::Healthy,
            ..Default::default()
        };
        let d = step(&seen, &spec(), &healthy, now);
        assert_eq!(d.act, Act::None);
        assert!(d.announce.is_empty() && !d.guarded);
        assert_eq!(d.status.phase, Phase::Healthy);
    }

    #[test]
    fn no_progress_past_the_deadline_rolls_back_to_the_stable_pods() {
        let now = Timestamp::now();
        let mut seen = observed(
            vec![old3(now), rs("new", 1, true, vec![pod("new-1", None)])],
            true,
        );
        seen.timed_out = true;
        let d = step(&seen, &spec(), &started(now), now);
        assert_eq!(
            d.act,
            Act::RollBack {
                to: "old".into(),
                report: None
            },
            "the Deployment controller has reported it already"
        );
        assert_eq!(d.status.phase, Phase::RollingBack);
        assert_eq!(d.status.failed_revision.as_deref(), Some("new"));
        assert!(d.guarded);
        assert_eq!(d.announce[0].reason, "RollingBack");
        assert!(d.announce[0].warning);
        // Without autoRollback it only waits, as the Deployment controller does.
        let mut no_auto = spec();
        no_auto.strategy = Strategy {
            auto_rollback: false,
            ..Strategy::default()
        };
        assert_eq!(step(&seen, &no_auto, &started(now), now).act, Act::None);
    }

    #[test]
    fn abort_rolls_back_at_once_and_the_rollback_ends_degraded() {
        let now = Timestamp::now();
        let seen = observed(
            vec![
                old3(now),
                rs("new", 1, true, vec![pod("new-1", Some(at(now, -60)))]),
            ],
            true,
        );
        let mut abort = spec();
        abort.abort = true;
        let d = step(&seen, &abort, &started(now), now);
        let Act::RollBack { to, report } = &d.act else {
            panic!("{:?}", d.act)
        };
        assert_eq!(to, "old");
        assert!(
            report.as_ref().is_some_and(|r| r.contains("aborted")),
            "{report:?}"
        );
        // The template is back: "old" is current; the aborted pods are gone.
        let mut back = old3(now);
        back.current = true;
        let mut seen = observed(vec![back.clone(), rs("new", 0, false, vec![])], true);
        seen.min_ready_held = false;
        let finish = step(&seen, &abort, &d.status, now);
        assert_eq!(finish.act, Act::Finish);
        let seen = observed(vec![back, rs("new", 0, false, vec![])], false);
        let end = step(&seen, &abort, &finish.status, now);
        assert_eq!(end.status.phase, Phase::Degraded);
        assert_eq!(end.status.last_rollout.unwrap().outcome, "RolledBack");
        assert_eq!(end.announce[0].reason, "RolledBack");
    }

    #[test]
    fn a_former_new_replicaset_gets_its_availability_back_first() {
        let now = Timestamp::now();
        let mut middle = rs("middle", 1, false, vec![pod("m-1", Some(at(now, -60)))]);
        middle.min_ready_seconds = HOLD;
        let seen = observed(vec![old3(now), middle, rs("new", 1, true, vec![])], true);
        let d = step(&seen, &spec(), &started(now), now);
        assert_eq!(
            d.act,
            Act::Release {
                replica_sets: vec!["middle".into()],
                min_ready_seconds: 0
            }
        );
    }

    /// The Deployment controller's rolling update (pkg/controller/deployment/rolling.go), one
    /// sync: scale the new ReplicaSet up within maxSurge, then the old one down while available
    /// pods stay >= replicas - maxUnavailable. New pods are available only once the hold is off.
    struct Cluster {
        now: Timestamp,
        replicas: i32,
        surge: i32,
        max_unavailable: i32,
        /// The held minReadySeconds of the new pods, while held.
        hold: i64,
        held: bool,
        finished: bool,
        old: Vec<(String, Option<Timestamp>, Option<Timestamp>)>,
        new: Vec<(String, Option<Timestamp>, Option<Timestamp>)>,
        old_replicas: i32,
        new_replicas: i32,
        created: i32,
        /// Old pods taken out of traffic so far.
        released: i32,
    }

    const READY_AFTER: i64 = 2;
    const DRAIN_FOR: i64 = 3;

    impl Cluster {
        fn live(pods: &[(String, Option<Timestamp>, Option<Timestamp>)]) -> i32 {
            pods.iter().filter(|p| p.2.is_none()).count() as i32
        }
        fn serving(&self) -> i32 {
            self.old
                .iter()
                .chain(&self.new)
                .filter(|p| p.2.is_none() && p.1.is_some_and(|r| r <= self.now))
                .count() as i32
        }
        fn deployment_controller(&mut self) {
            let want_new = (self.replicas + self.surge - self.old_replicas).min(self.replicas);
            self.new_replicas = self.new_replicas.max(want_new);
            let available_old = self
                .old
                .iter()
                .filter(|p| p.2.is_none() && p.1.is_some_and(|r| r <= self.now))
                .count() as i32;
            let available_new = self.available_new();
            let min_available = self.replicas - self.max_unavailable;
            let new_unavailable = self.new_replicas - available_new;
            if self.old_replicas + self.new_replicas - min_available - new_unavailable > 0 {
                let down =
                    (available_old + available_new - min_available).clamp(0, self.old_replicas);
                self.old_replicas -= down;
            }
        }
        /// New pods ready for the held minReadySeconds (all ready ones once released).
        fn available_new(&self) -> i32 {
            let min_ready = if self.held { self.hold } else { 0 };
            self.new
                .iter()
                .filter(|p| {
                    p.1.is_some_and(|r| {
                        r <= self.now && self.now.duration_since(r).as_secs() >= min_ready
                    })
                })
                .count() as i32
        }
        fn replica_set_controllers(&mut self) {
            while Cluster::live(&self.new) < self.new_replicas {
                self.created += 1;
                let ready = at(self.now, READY_AFTER);
                self.new
                    .push((format!("new-{}", self.created), Some(ready), None));
            }
            while Cluster::live(&self.old) > self.old_replicas {
                let p = self.old.iter_mut().find(|p| p.2.is_none()).unwrap();
                p.2 = Some(self.now);
                self.released += 1;
            }
            let now = self.now;
            self.old.retain(|p| {
                p.2.is_none_or(|t| now.duration_since(t).as_secs() < DRAIN_FOR)
            });
        }
        fn observed(&self) -> Observed {
            let view = |pods: &[(String, Option<Timestamp>, Option<Timestamp>)]| {
                pods.iter()
                    .map(|(n, ready, gone)| {
                        let ready_since = ready.filter(|r| *r <= self.now);
                        PodView {
                            name: n.clone(),
                            ready_since,
                            listed_ready: Some(ready_since.is_some() && gone.is_none()),
                            terminating: gone.is_some(),
                        }
                    })
                    .collect()
            };
            let mut old = rs("old", self.old_replicas, false, view(&self.old));
            old.min_ready_seconds = 0;
            let new = rs("new", self.new_replicas, true, view(&self.new));
            let available_old = old.pods.iter().filter(|p| p.serving(true)).count() as i32;
            let mut seen = observed(vec![old, new], !self.finished);
            seen.replicas = self.replicas;
            seen.max_unavailable = Some(self.max_unavailable);
            seen.min_ready_held = self.held;
            seen.hold = self.hold as i32;
            seen.available = available_old + self.available_new();
            seen
        }
    }

    /// Walk a whole rollout second by second, in the order the cluster applies things (the
    /// Deployment controller, then the ReplicaSet controllers and pod readiness, then the
    /// operator), and check after every one of them that `replicas` pods are serving.
    fn walk(replicas: i32, surge: i32, hold: i64) -> (i64, GracefulRolloutStatus) {
        let t0 = Timestamp::now();
        let long_ago = Some(at(t0, -600));
        let mut c = Cluster {
            now: t0,
            replicas,
            surge,
            max_unavailable: 0,
            hold,
            held: true,
            finished: false,
            old: (0..replicas)
                .map(|i| (format!("old-{i}"), long_ago, None))
                .collect(),
            new: vec![],
            old_replicas: replicas,
            new_replicas: 0,
            created: 0,
            released: 0,
        };
        let mut status = GracefulRolloutStatus {
            phase: Phase::Healthy,
            stable_revision: Some("old".into()),
            ..Default::default()
        };
        for second in 0..600 {
            c.now = at(t0, second);
            c.deployment_controller();
            assert!(
                c.serving() >= replicas,
                "t={second}: after the Deployment controller"
            );
            c.replica_set_controllers();
            assert!(
                c.serving() >= replicas,
                "t={second}: after the ReplicaSet controllers"
            );
            // Old pods out of traffic never outnumber the new pods that served minServing.
            let proven = c
                .new
                .iter()
                .filter(|p| p.1.is_some_and(|r| c.now.duration_since(r).as_secs() >= 5))
                .count() as i32;
            assert!(
                c.released <= proven,
                "t={second}: {} old pods out of traffic for {proven} new ones proven",
                c.released
            );
            let d = step(&c.observed(), &spec(), &status, c.now);
            match d.act {
                Act::Step { max_unavailable } => c.max_unavailable = max_unavailable,
                Act::MakeAvailable { .. } => c.held = false,
                Act::Finish => c.finished = true,
                Act::None => {}
                other => panic!("t={second}: unexpected {other:?}"),
            }
            status = d.status;
            if c.finished && status.phase == Phase::Healthy {
                assert_eq!(c.old_replicas, 0);
                assert!(c.old.is_empty(), "every old pod drained before the end");
                return (second, status);
            }
        }
        panic!("the rollout never finished: {status:?}");
    }

    fn seen_note(took: i64, status: &GracefulRolloutStatus) {
        assert_eq!(
            status.last_rollout.as_ref().map(|r| r.outcome.as_str()),
            Some("Succeeded"),
            "finished in {took}s"
        );
    }

    #[test]
    fn never_fewer_than_replicas_serving_through_a_whole_rollout() {
        let (took, status) = walk(3, 1, 599);
        assert_eq!(status.last_rollout.unwrap().outcome, "Succeeded");
        // Each new pod: ready after 2 s, proven 5 s later. The next surge overlaps the last
        // drain instead of waiting for it: faster than one pod after another, drain included.
        assert!(took < 3 * (READY_AFTER + 5 + 1 + DRAIN_FOR), "took {took}s");
        let (took_wide, _) = walk(4, 2, 599);
        assert!(
            took_wide < walk(4, 1, 599).0,
            "a wider surge is faster: {took_wide}s"
        );
        // A short progressDeadlineSeconds (the hold ends 7 s after a pod is ready, before the
        // rollout does): pods the Deployment controller counts as available are not counted twice.
        let (took_short, status) = walk(5, 1, 15);
        seen_note(took_short, &status);
    }
}
