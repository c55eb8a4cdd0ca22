//! The GracefulRollout controller: observe the Deployment, its ReplicaSets, pods and
//! EndpointSlices; let `plan` decide the next step; act; report it in the status and events.
//! Everything it needs to carry on is in the cluster (ReplicaSet sizes, owners, the status), so
//! a restarted operator continues where the last one stopped.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::crd::{GracefulRollout, GracefulRolloutStatus, Phase, RolloutRecord};
use crate::drains::{self, DrainTotals, Drains};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::plan::{PodView, ReplicaSetView, Step, World};
use crate::revision::{POD_TEMPLATE_HASH, same_template, template_hash};
use crate::takeover::{self, MANAGER};
use crate::{Error, Result};

pub const FINALIZER: &str = "graceful.dev/hand-back";
/// How often a rollout in progress is looked at, besides the watch events that wake it.
const PROGRESS_RECHECK: Duration = Duration::from_secs(2);
/// How often a settled rollout is looked at.
const IDLE_RECHECK: Duration = Duration::from_secs(60);

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The old pods' drains, for each rollout's record.
    pub drains: Drains,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            drains: Drains::default(),
        }
    }
}

/// Run the controller until shutdown or until `leading` turns false.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    mut leading: tokio::sync::watch::Receiver<bool>,
) {
    let rollouts = Api::<GracefulRollout>::all(client.clone());
    let ctx = Arc::new(Context::new(client.clone(), metrics));
    let reports = {
        let (client, ctx) = (client.clone(), ctx.clone());
        tokio::spawn(async move { drains::watch_reports(client, &ctx.drains).await })
    };
    let lost = async move {
        while *leading.borrow() {
            if leading.changed().await.is_err() {
                break;
            }
        }
    };
    // A Deployment event wakes the GracefulRollout that manages it (template change, scale).
    let controller = Controller::new(rollouts, watcher::Config::default().any_semantic())
        .owns(
            Api::<ReplicaSet>::all(client.clone()),
            watcher::Config::default().any_semantic(),
        )
        .watches(
            Api::<Deployment>::all(client.clone()),
            watcher::Config::default().any_semantic(),
            |d| {
                let ns = d.namespace()?;
                d.annotations()
                    .get(takeover::MANAGED_BY)
                    .map(|gr| ObjectRef::new(gr).within(&ns))
            },
        )
        .graceful_shutdown_on(lost)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile failed");
            }
        });
    controller.await;
    reports.abort();
}

pub async fn reconcile(gr: Arc<GracefulRollout>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = gr
        .namespace()
        .ok_or_else(|| Error::Invalid("GracefulRollout without namespace".into()))?;
    let api: Api<GracefulRollout> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, gr, |event| async {
        match event {
            Finalizer::Apply(gr) => apply(gr, ctx.clone()).await,
            Finalizer::Cleanup(gr) => cleanup(gr, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

pub fn error_policy(gr: Arc<GracefulRollout>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(rollout = %gr.name_any(), %error, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabels {
            error: error.metric_label().into(),
        })
        .inc();
    Action::requeue(Duration::from_secs(5))
}

/// What one reconcile found, before acting.
struct Observed {
    deploy: Deployment,
    replica_sets: Vec<ReplicaSet>,
    pods: Vec<Pod>,
    /// pod name -> ready, as the EndpointSlices list it.
    listed: HashMap<String, bool>,
}

async fn observe(
    client: &Client,
    ns: &str,
    deploy: Deployment,
    owners: &[String],
) -> Result<Observed> {
    let selector = selector_string(deploy.spec.as_ref().map(|s| &s.selector))?;
    let lp = ListParams::default().labels(&selector);
    let replica_sets = Api::<ReplicaSet>::namespaced(client.clone(), ns)
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter(|rs| owners.iter().any(|uid| takeover::owned_by(rs, uid)))
        .collect();
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&lp)
        .await?
        .items;
    let mut listed = HashMap::new();
    for slice in Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
    {
        for ep in slice.endpoints {
            let Some(name) = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone())
            else {
                continue;
            };
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            // A pod listed ready in any slice counts as listed ready.
            *listed.entry(name).or_insert(false) |= ready;
        }
    }
    Ok(Observed {
        deploy,
        replica_sets,
        pods,
        listed,
    })
}

/// `matchLabels` and `matchExpressions` as a list selector string.
fn selector_string(selector: Option<&LabelSelector>) -> Result<String> {
    let selector = selector.ok_or_else(|| Error::Invalid("Deployment without selector".into()))?;
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            op => return Err(Error::Invalid(format!("unknown selector operator {op}"))),
        });
    }
    if parts.is_empty() {
        return Err(Error::Invalid("Deployment with an empty selector".into()));
    }
    Ok(parts.join(","))
}

fn revision_of(rs: &ReplicaSet) -> String {
    rs.labels()
        .get(POD_TEMPLATE_HASH)
        .cloned()
        .unwrap_or_else(|| rs.name_any())
}

fn replicas_of(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn pod_view(pod: &Pod, listed: &HashMap<String, bool>) -> PodView {
    let ready_since = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
        .map(|c| {
            c.last_transition_time
                .as_ref()
                .map(|t| t.0)
                .unwrap_or_else(Timestamp::now)
        });
    PodView {
        name: pod.name_any(),
        ready_since,
        listed_ready: listed.get(&pod.name_any()).copied(),
        terminating: pod.metadata.deletion_timestamp.is_some(),
    }
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

pub(crate) async fn apply(gr: Arc<GracefulRollout>, ctx: Arc<Context>) -> Result<Action> {
    let ns = gr.namespace().unwrap_or_default();
    let client = &ctx.client;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
    let status = gr.status.clone().unwrap_or_default();
    let gr_uid = takeover::uid_of(gr.as_ref());

    let Some(deploy) = deploys.get_opt(&gr.spec.target_ref.name).await? else {
        // The Deployment is gone: its ReplicaSets go with it, as they would natively.
        for rs in rs_api.list(&ListParams::default()).await?.items {
            if takeover::owned_by(&rs, &gr_uid) {
                takeover::disown(&rs_api, &rs, &gr_uid).await?;
            }
        }
        let step = format!("Deployment {} not found", gr.spec.target_ref.name);
        write_status(
            &ctx,
            &gr,
            GracefulRolloutStatus {
                phase: Phase::Missing,
                current_step: Some(step),
                ..status
            },
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let deploy = match takeover::take_over(&deploys, &deploy, &gr).await {
        Ok(Some(d)) => {
            publish(
                &ctx,
                &gr,
                EventType::Normal,
                "TakeOver",
                "Paused the Deployment; pods now roll out through this GracefulRollout",
            )
            .await;
            d
        }
        Ok(None) => deploy,
        Err(Error::Invalid(msg)) => {
            write_status(
                &ctx,
                &gr,
                degraded(status, Phase::Degraded, "Conflict", &msg),
            )
            .await?;
            return Ok(Action::requeue(IDLE_RECHECK));
        }
        Err(e) => return Err(e),
    };
    let d_uid = takeover::uid_of(&deploy);
    let seen = observe(client, &ns, deploy, &[d_uid.clone(), gr_uid.clone()]).await?;
    let replicas = seen
        .deploy
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let template = seen
        .deploy
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();

    // The Deployment's revision: the hash label of the ReplicaSet with its template, if any.
    let updated_rs = seen.replica_sets.iter().find(|rs| {
        rs.spec
            .as_ref()
            .and_then(|s| s.template.as_ref())
            .is_some_and(|t| same_template(t, &template))
    });
    let updated_revision = updated_rs
        .map(revision_of)
        .unwrap_or_else(|| template_hash(&template, 0));

    let mut status = GracefulRolloutStatus {
        observed_generation: gr.metadata.generation,
        replicas,
        updated_revision: Some(updated_revision.clone()),
        ..status
    };

    // Which revision must end up serving: the Deployment's, unless it failed or is aborted.
    if gr.spec.abort
        && status.failed_revision.as_deref() != Some(&updated_revision)
        && status.stable_revision.as_deref() != Some(&updated_revision)
    {
        status.failed_revision = Some(updated_revision.clone());
        publish(
            &ctx,
            &gr,
            EventType::Warning,
            "Aborted",
            &format!("rolling back revision {updated_revision}"),
        )
        .await;
    }
    let rolling_back = status.failed_revision.as_deref() == Some(&updated_revision);
    let target = if rolling_back {
        match status.stable_revision.clone() {
            Some(stable) => stable,
            None => updated_revision.clone(),
        }
    } else {
        updated_revision.clone()
    };

    let rs_by_owner_pods = group_pods(&seen);
    let world = World {
        replicas,
        surge: gr.spec.strategy.surge_for(replicas),
        min_serving: Duration::from_secs(gr.spec.strategy.min_serving_seconds.max(0) as u64),
        now: Timestamp::now(),
        target: target.clone(),
        replica_sets: seen
            .replica_sets
            .iter()
            .map(|rs| ReplicaSetView {
                name: rs.name_any(),
                revision: revision_of(rs),
                replicas: replicas_of(rs),
                created: rs
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0)
                    .unwrap_or_else(Timestamp::now),
                pods: rs_by_owner_pods
                    .get(&rs.name_any())
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect(),
        slices_expected: seen
            .pods
            .iter()
            .any(|p| seen.listed.contains_key(&p.name_any())),
    };
    let counts = world.counts();
    let step = world.decide();
    if let Some(started) = &status.rollout_started_at {
        ctx.drains.track(&rollout_key(&gr, started), &seen.pods);
    }

    status.updated = counts.updated;
    status.serving = counts.serving;
    status.draining = counts.draining;
    status.progress = Some(format!("{}/{}", counts.updated, replicas));

    // Settled: only the target revision has pods and none is draining. Hand the ReplicaSets
    // back (the paused Deployment then owns exactly one active ReplicaSet and keeps it at its
    // replicas) and record the rollout that just finished.
    let target_exists = world.replica_sets.iter().any(|rs| rs.revision == target);
    let others_active = world
        .replica_sets
        .iter()
        .any(|rs| rs.revision != target && rs.replicas > 0);
    // Between rollouts a pod may be deleted (kubectl delete pod, an eviction) and replaced by
    // its ReplicaSet: that is no rollout, so its drain does not hold the settled state.
    let drains_pending = counts.draining > 0 && status.rollout_started_at.is_some();
    if target_exists && !others_active && !drains_pending {
        takeover::hand_back_all(&rs_api, &seen.replica_sets, &gr_uid, &seen.deploy).await?;
        let mut finished = None;
        if let Some(started) = status.rollout_started_at.take() {
            let outcome = match (rolling_back, gr.spec.abort) {
                (false, _) => "Succeeded",
                (true, true) => "Aborted",
                (true, false) => "RolledBack",
            };
            let key = rollout_key(&gr, &started);
            let drains = ctx.drains.totals(&key);
            let record = finish_record(drains, &target, started, outcome, replicas);
            status.last_rollout = Some(record.clone());
            finished = Some((key, drains, outcome, record));
        }
        status.last_progress_at = None;
        status.stable_revision = Some(target.clone());
        let available = counts.serving >= replicas;
        set_conditions(
            &mut status,
            &[
                (
                    "Available",
                    available,
                    if available {
                        "AllServing"
                    } else {
                        "NotAllServing"
                    },
                    "",
                ),
                ("Progressing", false, "Settled", "no rollout in progress"),
            ],
        );
        if rolling_back {
            let msg = format!(
                "revision {updated_revision} failed and was rolled back; change the template to roll out again"
            );
            status = degraded(status, Phase::Degraded, "RolledBack", &msg);
        } else {
            status.phase = Phase::Healthy;
            status.current_step = Some(format!(
                "{}/{replicas} pods serving the Deployment's template",
                counts.serving
            ));
            set_conditions(&mut status, &[("Degraded", false, "Healthy", "")]);
        }
        let Some((key, drains, outcome, record)) = finished else {
            write_status(&ctx, &gr, status).await?;
            return Ok(Action::requeue(IDLE_RECHECK));
        };
        // The record is written once, and announced only once written.
        if !write_status_unless_stale(&ctx, &gr, status).await? {
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
        ctx.drains.forget(&key);
        tracing::info!(rollout = %gr.name_any(), ?drains, "drains of the finished rollout");
        publish(
            &ctx,
            &gr,
            EventType::Normal,
            "RolloutFinished",
            &record.summary,
        )
        .await;
        ctx.metrics
            .rollouts
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
        let took = Timestamp::now()
            .duration_since(record.started_at.0)
            .as_secs_f64();
        ctx.metrics.rollout_duration.observe(took.max(0.0));
        return Ok(Action::requeue(IDLE_RECHECK));
    }

    // A rollout is needed: take every ReplicaSet of the Deployment, so the paused Deployment owns
    // none it could scale.
    takeover::adopt_all(&rs_api, &seen.replica_sets, &gr, &seen.deploy).await?;
    let now = now_time();
    if status.rollout_started_at.is_none() {
        status.rollout_started_at = Some(now.clone());
        status.last_progress_at = Some(now.clone());
        // Like its end, a rollout's start is written once (a stale copy would restart the clock
        // and announce it again) and announced once written.
        if !write_status_unless_stale(&ctx, &gr, status.clone()).await? {
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
        publish(
            &ctx,
            &gr,
            EventType::Normal,
            "RolloutStarted",
            &format!("rolling out revision {target} to {replicas} pods"),
        )
        .await;
    }

    if gr.spec.paused {
        status.phase = Phase::Paused;
        status.current_step = Some("paused (spec.paused); set it to false to resume".into());
        set_conditions(
            &mut status,
            &[("Progressing", false, "Paused", "paused by spec.paused")],
        );
        write_status(&ctx, &gr, status).await?;
        return Ok(Action::requeue(IDLE_RECHECK));
    }

    // The progress deadline: no scale step and no newly proven pod for too long.
    let deadline = Duration::from_secs(gr.spec.strategy.progress_deadline_seconds.max(1) as u64);
    let last_progress = status
        .last_progress_at
        .as_ref()
        .map(|t| t.0)
        .unwrap_or_else(Timestamp::now);
    let stalled = Timestamp::now()
        .duration_since(last_progress)
        .unsigned_abs()
        > deadline;
    if stalled && !rolling_back && matches!(step, Step::Wait { .. }) {
        let msg = format!(
            "no progress for {}s: new pods of revision {target} did not become ready",
            deadline.as_secs()
        );
        if gr.spec.strategy.auto_rollback
            && status
                .stable_revision
                .as_ref()
                .is_some_and(|s| s != &target)
        {
            status.failed_revision = Some(updated_revision.clone());
            status.last_progress_at = Some(now_time());
            publish(&ctx, &gr, EventType::Warning, "RollingBack", &msg).await;
            write_status(
                &ctx,
                &gr,
                degraded(status, Phase::RollingBack, "ProgressDeadlineExceeded", &msg),
            )
            .await?;
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
        publish(
            &ctx,
            &gr,
            EventType::Warning,
            "ProgressDeadlineExceeded",
            &msg,
        )
        .await;
        write_status(
            &ctx,
            &gr,
            degraded(status, Phase::Degraded, "ProgressDeadlineExceeded", &msg),
        )
        .await?;
        return Ok(Action::requeue(PROGRESS_RECHECK));
    }

    status.phase = if rolling_back {
        Phase::RollingBack
    } else {
        Phase::Progressing
    };
    let requeue = match step {
        Step::CreateTarget => {
            create_target(&rs_api, &gr, &seen.deploy, &template).await?;
            status.current_step = Some(format!("created the ReplicaSet of revision {target}"));
            status.last_progress_at = Some(now_time());
            ctx.metrics.observe_step("create", None);
            Duration::from_millis(200)
        }
        Step::Scale(actions) => {
            let mut said = Vec::new();
            for (name, size, why) in &actions {
                scale(&rs_api, name, *size).await?;
                ctx.metrics.observe_step(
                    if why.starts_with("surge") {
                        "surge"
                    } else {
                        "drain"
                    },
                    None,
                );
                said.push(format!("{name} -> {size} ({why})"));
            }
            let line = said.join("; ");
            publish(&ctx, &gr, EventType::Normal, "Step", &line).await;
            status.current_step = Some(line);
            status.last_progress_at = Some(now_time());
            Duration::from_millis(500)
        }
        Step::Wait { reason, recheck } => {
            status.current_step = Some(reason);
            recheck.min(PROGRESS_RECHECK)
        }
        // Settled states return above; were one to slip through, look again soon.
        Step::Done => PROGRESS_RECHECK,
    };
    if !rolling_back {
        let step = status.current_step.clone().unwrap_or_default();
        set_conditions(
            &mut status,
            &[
                ("Progressing", true, "RollingOut", &step),
                ("Degraded", false, "Progressing", ""),
            ],
        );
    }
    write_status(&ctx, &gr, status).await?;
    Ok(Action::requeue(requeue))
}

/// Pods grouped by the ReplicaSet that controls them.
fn group_pods(seen: &Observed) -> BTreeMap<String, Vec<PodView>> {
    let mut by_rs: BTreeMap<String, Vec<PodView>> = BTreeMap::new();
    for pod in &seen.pods {
        if let Some(owner) = pod
            .owner_references()
            .iter()
            .find(|o| o.controller == Some(true) && o.kind == "ReplicaSet")
        {
            by_rs
                .entry(owner.name.clone())
                .or_default()
                .push(pod_view(pod, &seen.listed));
        }
    }
    by_rs
}

/// The ReplicaSet of the Deployment's template, created at size zero with the Deployment
/// controller's naming and labels, so it is the Deployment's "new ReplicaSet" once handed back.
async fn create_target(
    api: &Api<ReplicaSet>,
    gr: &GracefulRollout,
    deploy: &Deployment,
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
) -> Result<()> {
    let spec = deploy
        .spec
        .as_ref()
        .ok_or_else(|| Error::Invalid("Deployment without spec".into()))?;
    for collision in 0..5u32 {
        let hash = template_hash(template, collision);
        let mut template = template.clone();
        template
            .metadata
            .get_or_insert_with(Default::default)
            .labels
            .get_or_insert_with(Default::default)
            .insert(POD_TEMPLATE_HASH.into(), hash.clone());
        let mut selector = spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_with(Default::default)
            .insert(POD_TEMPLATE_HASH.into(), hash.clone());
        let mut labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert(POD_TEMPLATE_HASH.into(), hash.clone());
        let rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(format!("{}-{hash}", deploy.name_any())),
                labels: Some(labels),
                owner_references: Some(takeover::rollout_owners(gr, deploy)),
                ..Default::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(0),
                min_ready_seconds: spec.min_ready_seconds,
                selector,
                template: Some(template),
            }),
            status: None,
        };
        match api.create(&PostParams::default(), &rs).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Invalid(
        "five ReplicaSet name collisions in a row".into(),
    ))
}

async fn scale(api: &Api<ReplicaSet>, name: &str, replicas: i32) -> Result<()> {
    let patch = json!({"spec": {"replicas": replicas}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Names one rollout of one GracefulRollout in `Drains`.
fn rollout_key(gr: &GracefulRollout, started: &Time) -> String {
    format!(
        "{}/{}@{}",
        gr.namespace().unwrap_or_default(),
        gr.name_any(),
        started.0
    )
}

fn finish_record(
    drains: DrainTotals,
    revision: &str,
    started: Time,
    outcome: &str,
    replicas: i32,
) -> RolloutRecord {
    let DrainTotals {
        pods,
        longest_seconds,
        connections_cut,
        ..
    } = drains;
    let finished = now_time();
    let took = finished.0.duration_since(started.0).as_secs();
    let summary = format!(
        "{outcome} in {took}s, {replicas} pods, longest drain {longest_seconds}s, {connections_cut} cut"
    );
    RolloutRecord {
        revision: revision.into(),
        started_at: started,
        finished_at: finished,
        outcome: outcome.into(),
        pods_replaced: replicas.max(pods),
        longest_drain_seconds: longest_seconds,
        connections_force_closed: connections_cut,
        summary,
    }
}

fn degraded(
    mut status: GracefulRolloutStatus,
    phase: Phase,
    reason: &str,
    msg: &str,
) -> GracefulRolloutStatus {
    status.phase = phase;
    status.current_step = Some(msg.into());
    set_conditions(&mut status, &[("Degraded", true, reason, msg)]);
    status
}

/// Upsert conditions by type; lastTransitionTime moves only when the status flips.
fn set_conditions(status: &mut GracefulRolloutStatus, updates: &[(&str, bool, &str, &str)]) {
    for (type_, ok, reason, message) in updates {
        let value = if *ok { "True" } else { "False" };
        let generation = status.observed_generation;
        match status.conditions.iter_mut().find(|c| c.type_ == *type_) {
            Some(c) => {
                if c.status != value {
                    c.last_transition_time = now_time();
                }
                c.status = value.into();
                c.reason = (*reason).into();
                c.message = (*message).into();
                c.observed_generation = generation;
            }
            None => status.conditions.push(Condition {
                type_: (*type_).into(),
                status: value.into(),
                reason: (*reason).into(),
                message: (*message).into(),
                last_transition_time: now_time(),
                observed_generation: generation,
            }),
        }
    }
}

async fn write_status(
    ctx: &Context,
    gr: &GracefulRollout,
    status: GracefulRolloutStatus,
) -> Result<()> {
    if gr.status.as_ref() == Some(&status) {
        return Ok(());
    }
    apply_status(ctx, gr, status, None).await
}

/// Writes the status only if the GracefulRollout has not changed since `gr` was read, and
/// says whether it did. A reconcile can run on a cached copy that predates the last status
/// write; at a rollout's start or end that copy would record and announce it a second time.
async fn write_status_unless_stale(
    ctx: &Context,
    gr: &GracefulRollout,
    status: GracefulRolloutStatus,
) -> Result<bool> {
    match apply_status(ctx, gr, status, gr.resource_version()).await {
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => {
            tracing::debug!(rollout = %gr.name_any(), "stale copy: a rollout's start or end is written once");
            Ok(false)
        }
        other => other.map(|()| true),
    }
}

/// Server-side apply of the status; with `resource_version`, only onto that version.
async fn apply_status(
    ctx: &Context,
    gr: &GracefulRollout,
    status: GracefulRolloutStatus,
    resource_version: Option<String>,
) -> Result<()> {
    let api: Api<GracefulRollout> =
        Api::namespaced(ctx.client.clone(), &gr.namespace().unwrap_or_default());
    let mut patch = json!({
        "apiVersion": "graceful.dev/v1alpha1",
        "kind": "GracefulRollout",
        "status": status,
    });
    if let Some(rv) = resource_version {
        patch["metadata"] = json!({ "resourceVersion": rv });
    }
    api.patch_status(
        &gr.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn publish(ctx: &Context, gr: &GracefulRollout, type_: EventType, reason: &str, note: &str) {
    let reference: ObjectReference = gr.object_ref(&());
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        tracing::debug!(error = %e, "event not published");
    }
    tracing::info!(rollout = %gr.name_any(), namespace = gr.namespace().unwrap_or_default(), reason, note);
}

/// The GracefulRollout is being deleted: give the Deployment its ReplicaSets and its
/// `spec.paused` back, exactly as the native controller expects them.
pub(crate) async fn cleanup(gr: Arc<GracefulRollout>, ctx: Arc<Context>) -> Result<Action> {
    let ns = gr.namespace().unwrap_or_default();
    let deploys: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let gr_uid = takeover::uid_of(gr.as_ref());
    let deploy = deploys.get_opt(&gr.spec.target_ref.name).await?;
    let ours: Vec<ReplicaSet> = rs_api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|rs| takeover::owned_by(rs, &gr_uid))
        .collect();
    match &deploy {
        Some(d) => takeover::hand_back_all(&rs_api, &ours, &gr_uid, d).await?,
        None => {
            for rs in &ours {
                takeover::disown(&rs_api, rs, &gr_uid).await?;
            }
        }
    }
    if let Some(d) = &deploy
        && d.annotations().get(takeover::MANAGED_BY) == Some(&gr.name_any())
    {
        takeover::release(&deploys, d).await?;
        publish(
            &ctx,
            &gr,
            EventType::Normal,
            "HandedBack",
            "the Deployment controller manages the Deployment again",
        )
        .await;
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;
    use prometheus_client::registry::Registry;
    use serde_json::json;

    fn ctx(api: &FakeApi) -> Arc<Context> {
        Arc::new(Context::new(
            api.client(),
            Arc::new(Metrics::new(&mut Registry::default())),
        ))
    }

    fn gr(api: &FakeApi) -> Arc<GracefulRollout> {
        let v = api
            .get("graceful.dev/v1alpha1", "GracefulRollout", "web")
            .expect("rollout fixture");
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn status_written(api: &FakeApi) -> Value {
        let w = api.writes_to("/gracefulrollouts/web/status");
        w.last().expect("a status write").body["status"].clone()
    }

    use serde_json::Value;

    /// Three ready, listed pods of the old revision.
    fn old_pods(api: &FakeApi, hash: &str) {
        for i in 1..=3 {
            api.put(pod(&format!("old-{i}"), hash, Some(600)));
        }
    }

    #[tokio::test]
    async fn takes_over_an_unpaused_deployment_and_touches_nothing_else() {
        let api = FakeApi::default();
        api.put(rollout(json!({}), json!({})));
        api.put(deployment("v1", 3, false));
        api.put(replica_set("v1", "aaaaa", 3, false, 900));
        old_pods(&api, "aaaaa");
        api.put(slice(&[("old-1", true), ("old-2", true), ("old-3", true)]));

        apply(gr(&api), ctx(&api)).await.unwrap();

        let d = api.writes_to("/deployments/web");
        assert_eq!(d.len(), 1, "one patch of the Deployment: {d:?}");
        assert_eq!(d[0].body["spec"], json!({"paused": true}));
        assert_eq!(
            d[0].body["metadata"]["annotations"][crate::takeover::PAUSED_BEFORE],
            "false"
        );
        assert!(
            api.writes_to("/replicasets").is_empty(),
            "steady state: ReplicaSets stay the Deployment's"
        );
        let st = status_written(&api);
        assert_eq!(st["phase"], "Healthy");
        assert_eq!(st["stableRevision"], "aaaaa");
    }

    #[tokio::test]
    async fn template_change_adopts_every_replicaset_and_creates_the_new_one_at_zero() {
        let api = FakeApi::default();
        api.put(rollout(json!({}), json!({"stableRevision": "aaaaa"})));
        api.put(deployment("v2", 3, true));
        api.put(replica_set("v1", "aaaaa", 3, false, 900));
        api.put(replica_set("v0", "zzzzz", 0, false, 2000));
        old_pods(&api, "aaaaa");

        apply(gr(&api), ctx(&api)).await.unwrap();

        let adopted: Vec<String> = api
            .writes_to("/replicasets/")
            .iter()
            .filter(|w| w.body["metadata"]["ownerReferences"][0]["kind"] == "GracefulRollout")
            .map(|w| w.path.rsplit('/').next().unwrap().to_string())
            .collect();
        assert_eq!(
            adopted.len(),
            2,
            "both ReplicaSets, history included, are adopted: {adopted:?}"
        );
        let created: Vec<Write> = api
            .writes()
            .into_iter()
            .filter(|w| w.method == http::Method::POST)
            .collect();
        assert_eq!(created.len(), 1);
        let rs = &created[0].body;
        assert_eq!(rs["spec"]["replicas"], 0);
        assert_eq!(
            rs["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"],
            "v2"
        );
        let hash = rs["metadata"]["labels"][POD_TEMPLATE_HASH]
            .as_str()
            .unwrap();
        assert_eq!(
            rs["spec"]["selector"]["matchLabels"][POD_TEMPLATE_HASH],
            hash
        );
        assert_eq!(rs["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(rs["metadata"]["ownerReferences"][1]["kind"], "Deployment");
        assert_eq!(status_written(&api)["phase"], "Progressing");
        assert!(
            api.writes_to("/deployments/").is_empty(),
            "the Deployment itself is not written"
        );
    }

    /// A rollout one step in: three old pods serving, one new pod ready for 20 s, listed in
    /// the EndpointSlices or not.
    fn one_new_pod_ready(api: &FakeApi, listed: bool) {
        api.put(rollout(
            json!({}),
            json!({"stableRevision": "aaaaa", "rolloutStartedAt": ago(30), "lastProgressAt": ago(20)}),
        ));
        api.put(deployment("v2", 3, true));
        api.put(replica_set("v1", "aaaaa", 3, true, 900));
        old_pods(api, "aaaaa");
        let new_hash = template_hash(&serde_json::from_value(template("v2")).unwrap(), 0);
        api.put(replica_set("v2", &new_hash, 1, true, 30));
        api.put(pod("new-1", &new_hash, Some(20)));
        let mut listed_pods = vec![("old-1", true), ("old-2", true), ("old-3", true)];
        if listed {
            listed_pods.push(("new-1", true));
        }
        api.put(slice(&listed_pods));
    }

    #[tokio::test]
    async fn a_proven_new_pod_drains_one_old_pod() {
        let api = FakeApi::default();
        one_new_pod_ready(&api, true);

        apply(gr(&api), ctx(&api)).await.unwrap();

        let scaled: Vec<Write> = api.writes_to("/replicasets/web-aaaaa");
        assert_eq!(scaled.len(), 1);
        assert_eq!(scaled[0].body, json!({"spec": {"replicas": 2}}));
    }

    #[tokio::test]
    async fn a_ready_pod_not_yet_in_the_endpointslices_does_not_count() {
        let api = FakeApi::default();
        one_new_pod_ready(&api, false);

        apply(gr(&api), ctx(&api)).await.unwrap();

        assert!(
            api.writes_to("/replicasets/").is_empty(),
            "no step while the new pod is not listed"
        );
        assert!(
            status_written(&api)["currentStep"]
                .as_str()
                .unwrap()
                .contains("waiting for new pods")
        );
    }

    #[tokio::test]
    async fn paused_takes_no_step() {
        let api = FakeApi::default();
        api.put(rollout(
            json!({"paused": true}),
            json!({"stableRevision": "aaaaa"}),
        ));
        api.put(deployment("v2", 3, true));
        api.put(replica_set("v1", "aaaaa", 3, true, 900));
        old_pods(&api, "aaaaa");

        apply(gr(&api), ctx(&api)).await.unwrap();

        assert!(
            api.writes().iter().all(|w| w.method != http::Method::POST),
            "no ReplicaSet created while paused"
        );
        assert_eq!(status_written(&api)["phase"], "Paused");
    }

    #[tokio::test]
    async fn a_finished_rollout_hands_the_replicasets_back_and_is_recorded() {
        let api = FakeApi::default();
        api.put(rollout(json!({}), json!({"stableRevision": "aaaaa", "rolloutStartedAt": ago(60), "lastProgressAt": ago(5)})));
        api.put(deployment("v2", 3, true));
        api.put(replica_set("v1", "aaaaa", 0, true, 900));
        let new_hash = template_hash(&serde_json::from_value(template("v2")).unwrap(), 0);
        api.put(replica_set("v2", &new_hash, 3, true, 60));
        for i in 1..=3 {
            api.put(pod(&format!("new-{i}"), &new_hash, Some(30)));
        }

        apply(gr(&api), ctx(&api)).await.unwrap();

        let handed: Vec<Write> = api.writes_to("/replicasets/");
        assert_eq!(handed.len(), 2);
        assert!(
            handed[0].path.ends_with(&format!("web-{new_hash}")),
            "the active ReplicaSet goes back first"
        );
        for w in &handed {
            assert_eq!(
                w.body["metadata"]["ownerReferences"],
                json!([deploy_owner(true)])
            );
        }
        let st = status_written(&api);
        assert_eq!(st["phase"], "Healthy");
        assert_eq!(st["stableRevision"], new_hash.as_str());
        assert_eq!(st["lastRollout"]["outcome"], "Succeeded");
        assert!(st.get("rolloutStartedAt").is_none());
    }

    #[tokio::test]
    async fn a_pod_deleted_between_rollouts_starts_no_rollout() {
        let api = FakeApi::default();
        let hash = template_hash(&serde_json::from_value(template("v1")).unwrap(), 0);
        api.put(rollout(json!({}), json!({"stableRevision": hash})));
        api.put(deployment("v1", 3, true));
        api.put(replica_set("v1", &hash, 3, false, 900));
        for i in 1..=3 {
            api.put(pod(&format!("p-{i}"), &hash, Some(900)));
        }
        // Deleted by someone else; its ReplicaSet has already replaced it.
        let mut deleted = pod("p-0", &hash, Some(900));
        deleted["metadata"]["deletionTimestamp"] = json!(ago(-30));
        deleted["metadata"]["deletionGracePeriodSeconds"] = json!(40);
        api.put(deleted);

        apply(gr(&api), ctx(&api)).await.unwrap();

        assert_eq!(api.events_for("RolloutStarted"), 0, "{:?}", api.events());
        assert!(api.writes_to("/replicasets/").is_empty(), "nothing adopted");
        let st = status_written(&api);
        assert_eq!(st["phase"], "Healthy");
        assert!(st.get("rolloutStartedAt").is_none());
    }

    #[tokio::test]
    async fn a_stale_copy_does_not_start_a_rollout_twice() {
        let api = FakeApi::default();
        api.put(rollout(json!({}), json!({"stableRevision": "aaaaa"})));
        api.put(deployment("v2", 3, true));
        api.put(replica_set("v1", "aaaaa", 3, false, 900));
        old_pods(&api, "aaaaa");
        let cached = gr(&api);
        apply(cached.clone(), ctx(&api)).await.unwrap();
        let first = gr(&api).status.clone().unwrap().rollout_started_at;
        assert!(first.is_some());
        assert_eq!(api.events_for("RolloutStarted"), 1);

        apply(cached, ctx(&api)).await.unwrap();
        assert_eq!(gr(&api).status.clone().unwrap().rollout_started_at, first);
        assert_eq!(api.events_for("RolloutStarted"), 1, "announced once");
    }

    #[tokio::test]
    async fn a_stale_copy_does_not_record_a_finished_rollout_twice() {
        let api = FakeApi::default();
        api.put(rollout(json!({}), json!({"stableRevision": "aaaaa", "rolloutStartedAt": ago(60), "lastProgressAt": ago(5)})));
        api.put(deployment("v2", 3, true));
        let new_hash = template_hash(&serde_json::from_value(template("v2")).unwrap(), 0);
        api.put(replica_set("v2", &new_hash, 3, true, 60));
        for i in 1..=3 {
            api.put(pod(&format!("new-{i}"), &new_hash, Some(30)));
        }
        // A reconcile can run on a cached copy from before the last status write.
        let cached = gr(&api);
        apply(cached.clone(), ctx(&api)).await.unwrap();
        let recorded = gr(&api).status.clone().unwrap().last_rollout.unwrap();
        assert_eq!(api.events_for("RolloutFinished"), 1);

        apply(cached, ctx(&api)).await.unwrap();
        let now = gr(&api).status.clone().unwrap().last_rollout.unwrap();
        assert_eq!(now, recorded, "the record stands");
        assert_eq!(api.events_for("RolloutFinished"), 1, "announced once");
    }

    #[tokio::test]
    async fn no_progress_past_the_deadline_rolls_back() {
        let api = FakeApi::default();
        api.put(rollout(json!({}), json!({"stableRevision": "aaaaa", "rolloutStartedAt": ago(300), "lastProgressAt": ago(200)})));
        api.put(deployment("v2", 3, true));
        api.put(replica_set("v1", "aaaaa", 3, true, 900));
        old_pods(&api, "aaaaa");
        let new_hash = template_hash(&serde_json::from_value(template("v2")).unwrap(), 0);
        api.put(replica_set("v2", &new_hash, 1, true, 200));
        api.put(pod("new-1", &new_hash, None));

        apply(gr(&api), ctx(&api)).await.unwrap();
        let st = status_written(&api);
        assert_eq!(st["phase"], "RollingBack");
        assert_eq!(st["failedRevision"], new_hash.as_str());

        // The next reconcile removes the never-ready pod and leaves every old pod alone.
        let v = api
            .get("graceful.dev/v1alpha1", "GracefulRollout", "web")
            .unwrap();
        let mut next: GracefulRollout = serde_json::from_value(v).unwrap();
        next.status = Some(serde_json::from_value(st).unwrap());
        apply(Arc::new(next), ctx(&api)).await.unwrap();
        let scaled = api.writes_to(&format!("/replicasets/web-{new_hash}"));
        assert_eq!(
            scaled.last().unwrap().body,
            json!({"spec": {"replicas": 0}})
        );
        assert!(
            api.writes_to("/replicasets/web-aaaaa").is_empty(),
            "old pods untouched"
        );
    }

    #[tokio::test]
    async fn deleting_the_rollout_hands_the_deployment_back_as_it_was() {
        let api = FakeApi::default();
        api.put(rollout(json!({}), json!({})));
        api.put(deployment("v2", 3, true));
        api.put(replica_set("v1", "aaaaa", 2, true, 900));
        api.put(replica_set("v2", "bbbbb", 2, true, 30));

        cleanup(gr(&api), ctx(&api)).await.unwrap();

        let rs = api.writes_to("/replicasets/");
        assert_eq!(rs.len(), 2);
        assert!(
            rs.iter()
                .all(|w| w.body["metadata"]["ownerReferences"] == json!([deploy_owner(true)]))
        );
        let d = api.writes_to("/deployments/web");
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].body["spec"]["paused"], false);
        assert_eq!(
            d[0].body["metadata"]["annotations"][crate::takeover::MANAGED_BY],
            Value::Null
        );
    }

    #[tokio::test]
    async fn a_deployment_managed_by_another_rollout_is_refused() {
        let api = FakeApi::default();
        api.put(rollout(json!({}), json!({})));
        let mut d = deployment("v1", 3, true);
        d["metadata"]["annotations"][crate::takeover::MANAGED_BY] = json!("other");
        api.put(d);

        apply(gr(&api), ctx(&api)).await.unwrap();

        assert!(api.writes_to("/deployments/").is_empty());
        let st = status_written(&api);
        assert_eq!(st["phase"], "Degraded");
        assert!(
            st["currentStep"]
                .as_str()
                .unwrap()
                .contains("already managed by GracefulRollout other")
        );
    }
}
