//! The GracefulRollout controller's I/O shell: observe the Deployment, its ReplicaSets, pods and
//! EndpointSlices; let [`plan::step`] decide; make its one write; write the status; announce.
//!
//! One rule for every write: it carries the resourceVersion it was decided on (a JSON Patch
//! `test`, or the status's `metadata.resourceVersion` at a rollout's start and end), and an Event
//! is published only after the write it announces succeeded. Everything the controller needs to
//! carry on is in the cluster (the Deployment's held fields, the status), so a restarted operator
//! continues where the last one stopped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use graceful_sidecar::defaults::ENV_SERVICES;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::Selector;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::backoff::Backoffs;
use crate::crd::{GracefulRollout, GracefulRolloutStatus, Phase};
use crate::drains::{self, Drains};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::names::{
    FINALIZER, MANAGED_LABEL, MANAGER, POD_TEMPLATE_HASH, PROGRESS_DEADLINE_EXCEEDED,
};
use crate::outage::ApiOutages;
use crate::pacing;
use crate::plan::{self, Act, Decision, Observed, PodView, ReplicaSetView};
use crate::revision::same_template;
use crate::scope::Scope;
use crate::{Error, Result};

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The old pods' drains, for each rollout's record.
    pub drains: Drains,
    /// Retry delays of the GracefulRollouts whose reconciles fail.
    pub backoffs: Backoffs,
    /// The API server's recent outages, as the client's requests met them.
    pub outages: Arc<ApiOutages>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, outages: Arc<ApiOutages>) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            drains: Drains::default(),
            backoffs: Backoffs::default(),
            outages,
        }
    }
}

/// Reconciles in flight at once, unless `--reconcile-concurrency` says otherwise. Unbounded (kube's
/// default), 1,000 GracefulRollouts appearing at once (an operator taking over, a fleet
/// applied) started 1,000 reconciles: each read queued behind the others in the apiserver's
/// priority level, a reconcile took 10 s on average, and their lists in memory took the
/// leader to 225 MiB (`make scale`, 11,000 pods). A bound keeps each reconcile's reads fresh
/// and its memory flat; requests for a GracefulRollout that waits are merged, not queued twice.
pub const DEFAULT_CONCURRENCY: u16 = 16;

/// Runs the controller until a shutdown signal, when in-flight reconciles finish first. A lost
/// leadership must stop it at once instead: the caller drops this future.
///
/// One kube-runtime `Controller` per `Api` of the scope (one for the whole cluster, else one per
/// namespace), run together: a `Controller` is built on one `Api`, and feeding one from merged
/// per-namespace watches takes kube-runtime's unstable stream features (`for_stream`,
/// `watches_stream`). Each GracefulRollout lives in one namespace, so each is reconciled by
/// exactly one of them; they share the context, and one pool of `concurrency` permits bounds
/// their reconciles together as it bounds a single controller's.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    concurrency: u16,
    outages: Arc<ApiOutages>,
    scope: &Scope,
) {
    let ctx = Arc::new(Context::new(client.clone(), metrics, outages));
    let reports = {
        let (client, ctx, scope) = (client.clone(), ctx.clone(), scope.clone());
        tokio::spawn(async move {
            drains::watch_reports(client, &scope, &ctx.drains, &ctx.metrics).await
        })
    };
    let permits = Arc::new(Semaphore::new(usize::from(concurrency)));
    let controllers = scope
        .apis::<GracefulRollout>(&client)
        .into_iter()
        .zip(scope.apis::<Deployment>(&client))
        .map(|(rollouts, deploys)| {
            controller(rollouts, deploys, concurrency, permits.clone(), ctx.clone())
        });
    futures::future::join_all(controllers).await;
    reports.abort();
}

/// The controller of the GracefulRollouts `rollouts` lists, woken by the managed Deployments
/// `deploys` lists; each reconcile holds one of `permits`.
async fn controller(
    rollouts: Api<GracefulRollout>,
    deploys: Api<Deployment>,
    concurrency: u16,
    permits: Arc<Semaphore>,
    ctx: Arc<Context>,
) {
    // Only managed Deployments are watched. Their status changes with every ReplicaSet and pod
    // readiness change, so a Deployment event is what wakes its GracefulRollout.
    let managed = watcher::Config::default()
        .labels(MANAGED_LABEL)
        .any_semantic();
    // The permit is taken before `reconcile` starts its clock: waiting is not reconciling.
    let bounded = move |gr, ctx| {
        let permits = permits.clone();
        async move {
            let _permit = permits.acquire_owned().await;
            reconcile(gr, ctx).await
        }
    };
    Controller::new(rollouts, watcher::Config::default().any_semantic())
        .watches(deploys, managed, |d| {
            let ns = d.namespace()?;
            d.labels()
                .get(MANAGED_LABEL)
                .map(|gr| ObjectRef::new(gr).within(&ns))
        })
        .with_config(controller::Config::default().concurrency(concurrency))
        .shutdown_on_signal()
        .run(bounded, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile failed");
            }
        })
        .await;
}

pub async fn reconcile(gr: Arc<GracefulRollout>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = gr
        .namespace()
        .ok_or_else(|| Error::Invalid("GracefulRollout without namespace".into()))?;
    let api: Api<GracefulRollout> = Api::namespaced(ctx.client.clone(), &ns);
    let key = backoff_key(&gr);
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
    if result.is_ok() {
        ctx.backoffs.succeeded(&key);
    }
    result
}

fn backoff_key(gr: &GracefulRollout) -> String {
    format!("{}/{}", gr.namespace().unwrap_or_default(), gr.name_any())
}

pub fn error_policy(gr: Arc<GracefulRollout>, error: &Error, ctx: Arc<Context>) -> Action {
    // A conflict is a stale read, not a failure: look again at once.
    if error.is_conflict() {
        return Action::requeue(Duration::from_millis(200));
    }
    tracing::warn!(rollout = %gr.name_any(), %error, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabels {
            error: error.metric_label().into(),
        })
        .inc();
    Action::requeue(ctx.backoffs.failed(&backoff_key(&gr)))
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

pub(crate) async fn apply(gr: Arc<GracefulRollout>, ctx: Arc<Context>) -> Result<Action> {
    let ns = gr.namespace().unwrap_or_default();
    let deploys: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let status = gr.status.clone().unwrap_or_default();
    let Some(deploy) = deploys.get_opt(&gr.spec.target_ref.name).await? else {
        let status = GracefulRolloutStatus {
            phase: Phase::Missing,
            current_step: Some(format!("Deployment {} not found", gr.spec.target_ref.name)),
            ..status
        };
        if gr.status.as_ref() != Some(&status) {
            write_status(&ctx, &gr, status).await?;
        }
        return Ok(Action::requeue(plan::IDLE_RECHECK));
    };
    let seen = observe(&ctx, &gr, &deploy, &status).await?;
    let mut status = status;
    status.observed_generation = gr.metadata.generation;
    let decision = plan::step(&seen.observed, &gr.spec, &status, Timestamp::now());
    act(&ctx, &gr, &deploy, &seen, &decision).await?;
    // The action's own events stand for its write, whatever becomes of the status write.
    for a in decision.announce.iter().filter(|a| a.of_act) {
        publish(&ctx, &gr, event_type(a.warning), a.reason, &a.note).await;
    }
    if gr.status.as_ref() != Some(&decision.status) || decision.guarded {
        match write_status(&ctx, &gr, decision.status.clone()).await {
            Err(e) if e.is_conflict() => {
                tracing::debug!(rollout = %gr.name_any(), "stale copy: the status is written onto the version read only");
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            other => other?,
        }
    }
    announce(&ctx, &gr, &status, &decision).await;
    Ok(Action::requeue(decision.requeue))
}

/// What one reconcile read, and the decision's input made of it.
struct Seen {
    observed: Observed,
    replica_sets: Vec<ReplicaSet>,
}

async fn observe(
    ctx: &Context,
    gr: &GracefulRollout,
    deploy: &Deployment,
    status: &GracefulRolloutStatus,
) -> Result<Seen> {
    let ns = gr.namespace().unwrap_or_default();
    let spec = deploy
        .spec
        .as_ref()
        .ok_or_else(|| Error::Invalid("Deployment without spec".into()))?;
    let selector = Selector::try_from(spec.selector.clone())
        .map_err(|e| Error::Invalid(format!("the Deployment's selector: {e}")))?;
    if selector.selects_all() {
        return Err(Error::Invalid("the Deployment's selector is empty".into()));
    }
    let lp = ListParams::default().labels_from(&selector);
    let d_uid = deploy.uid().unwrap_or_default();
    // Both by the Deployment's selector, at once: under load each read waits its turn in the
    // apiserver, and a reconcile's time is what its slot is held for.
    let rs_api = Api::<ReplicaSet>::namespaced(ctx.client.clone(), &ns);
    let pod_api = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
    let (replica_sets, pods) = futures::try_join!(rs_api.list(&lp), pod_api.list(&lp))?;
    let replica_sets: Vec<ReplicaSet> = replica_sets
        .items
        .into_iter()
        .filter(|rs| rs.owner_references().iter().any(|o| o.uid == d_uid))
        .collect();
    let pods = pods.items;
    let listed = listed_ready(ctx, &ns, pods_services(&pods).as_ref()).await?;
    if let Some(started) = &status.rollout_started_at {
        ctx.drains.track(&rollout_key(gr, started), &pods);
    }
    let drains = status
        .rollout_started_at
        .as_ref()
        .map(|s| ctx.drains.totals(&rollout_key(gr, s)))
        .unwrap_or_default();

    let mut by_rs: BTreeMap<String, Vec<PodView>> = BTreeMap::new();
    for pod in &pods {
        if let Some(owner) = pod
            .owner_references()
            .iter()
            .find(|o| o.controller == Some(true))
        {
            by_rs
                .entry(owner.name.clone())
                .or_default()
                .push(pod_view(pod, &listed));
        }
    }
    let views = replica_sets
        .iter()
        .map(|rs| {
            let rs_spec = rs.spec.as_ref();
            ReplicaSetView {
                name: rs.name_any(),
                revision: rs
                    .labels()
                    .get(POD_TEMPLATE_HASH)
                    .cloned()
                    .unwrap_or_else(|| rs.name_any()),
                replicas: rs_spec.and_then(|s| s.replicas).unwrap_or(0),
                min_ready_seconds: rs_spec.and_then(|s| s.min_ready_seconds).unwrap_or(0),
                current: rs_spec
                    .and_then(|s| s.template.as_ref())
                    .is_some_and(|t| same_template(t, &spec.template)),
                created: rs
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or_else(Timestamp::now, |t| t.0),
                pods: by_rs.remove(&rs.name_any()).unwrap_or_default(),
            }
        })
        .collect();
    let timed_out = deploy.status.as_ref().is_some_and(|s| {
        s.observed_generation >= deploy.metadata.generation
            && s.conditions.iter().flatten().any(|c| {
                c.type_ == "Progressing" && c.reason.as_deref() == Some(PROGRESS_DEADLINE_EXCEEDED)
            })
    });
    let held = pacing::held(deploy);
    let observed = Observed {
        rollout: gr.name_any(),
        manager: deploy.labels().get(MANAGED_LABEL).cloned(),
        replicas: spec.replicas.unwrap_or(1),
        deployment_paused: spec.paused.unwrap_or(false),
        recreate: pacing::recreate(deploy),
        held: held.clone(),
        max_unavailable: pacing::max_unavailable(deploy),
        hold: pacing::hold_seconds(deploy),
        min_ready_held: held
            .as_ref()
            .is_some_and(|h| spec.min_ready_seconds.unwrap_or(0) != h.min_ready_seconds()),
        user_min_ready_at_rest: spec.min_ready_seconds.unwrap_or(0),
        spec_fields_entry: own_spec_fields(deploy),
        available: deploy
            .status
            .as_ref()
            .filter(|s| s.observed_generation >= deploy.metadata.generation)
            .and_then(|s| s.available_replicas)
            .unwrap_or(0),
        timed_out,
        replica_sets: views,
        slices_expected: pods.iter().any(|p| listed.contains_key(&p.name_any())),
        drains,
        api_settling: ctx.outages.settling(),
    };
    Ok(Seen {
        observed,
        replica_sets,
    })
}

/// Index of the operator's managedFields entry that owns fields of the Deployment's spec.
fn own_spec_fields(deploy: &Deployment) -> Option<usize> {
    deploy
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .position(|m| {
            m.manager.as_deref() == Some(MANAGER)
                && m.subresource.as_deref().unwrap_or("").is_empty()
                && m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.get("f:spec").is_some())
        })
}

/// The Services whose EndpointSlices can list these pods, as the injector wrote them into each
/// pod's sidecar; None when a pod has no sidecar to say.
fn pods_services(pods: &[Pod]) -> Option<BTreeSet<String>> {
    let mut services = BTreeSet::new();
    for pod in pods {
        let spec = pod.spec.as_ref()?;
        let named = spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .flat_map(|c| c.env.iter().flatten())
            .find(|e| e.name == ENV_SERVICES)?;
        let names = named.value.as_deref().unwrap_or_default().split(',');
        services.extend(names.filter(|n| !n.is_empty()).map(str::to_owned));
    }
    Some(services)
}

/// pod name -> listed ready in some EndpointSlice: of the given Services (one LIST, the size of
/// the rollout's own Services; none when no Service selects the pods), or of the whole namespace
/// when the pods do not name theirs.
async fn listed_ready(
    ctx: &Context,
    ns: &str,
    services: Option<&BTreeSet<String>>,
) -> Result<HashMap<String, bool>> {
    let mut listed = HashMap::new();
    let lp = match services {
        Some(names) if names.is_empty() => return Ok(listed),
        Some(names) => ListParams::default().labels(&format!(
            "kubernetes.io/service-name in ({})",
            names.iter().cloned().collect::<Vec<_>>().join(",")
        )),
        None => ListParams::default(),
    };
    for slice in Api::<EndpointSlice>::namespaced(ctx.client.clone(), ns)
        .list(&lp)
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
            *listed.entry(name).or_insert(false) |= ready;
        }
    }
    Ok(listed)
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
                .map_or_else(Timestamp::now, |t| t.0)
        });
    PodView {
        name: pod.name_any(),
        ready_since,
        listed_ready: listed.get(&pod.name_any()).copied(),
        terminating: pod.metadata.deletion_timestamp.is_some(),
    }
}

/// The decision's one write, onto the resourceVersion it was decided on.
async fn act(
    ctx: &Context,
    gr: &GracefulRollout,
    deploy: &Deployment,
    seen: &Seen,
    decision: &Decision,
) -> Result<()> {
    let ns = gr.namespace().unwrap_or_default();
    let deploys: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let rv = deploy.resource_version().unwrap_or_default();
    let name = deploy.name_any();
    let held = seen.observed.held.clone().unwrap_or_default();
    match &decision.act {
        Act::None => {}
        Act::Label => {
            let patch = json!({"metadata": {"labels": {MANAGED_LABEL: gr.name_any()}, "resourceVersion": rv}});
            deploys
                .patch(&name, &params(), &Patch::Merge(&patch))
                .await?;
        }
        Act::Step { max_unavailable } => {
            json_patch(&deploys, &name, pacing::step_patch(&rv, *max_unavailable)).await?;
            let since = gr
                .status
                .as_ref()
                .and_then(|s| s.last_progress_at.as_ref())
                .map(|t| Timestamp::now().duration_since(t.0).unsigned_abs());
            ctx.metrics.observe_step("release_old_pods", since);
        }
        Act::Release {
            replica_sets,
            min_ready_seconds,
        } => {
            for rs in seen
                .replica_sets
                .iter()
                .filter(|rs| replica_sets.contains(&rs.name_any()))
            {
                let rs_rv = rs.resource_version().unwrap_or_default();
                json_patch(
                    &rs_api,
                    &rs.name_any(),
                    pacing::release_patch(&rs_rv, *min_ready_seconds),
                )
                .await?;
            }
        }
        Act::Disown { entry } => {
            json_patch(&deploys, &name, pacing::disown_patch(&rv, *entry)).await?;
        }
        Act::MakeAvailable { min_ready_seconds } => {
            json_patch(
                &deploys,
                &name,
                pacing::release_patch(&rv, *min_ready_seconds),
            )
            .await?;
        }
        Act::Finish => {
            json_patch(&deploys, &name, pacing::restore_patch(&rv, &held)).await?;
            ctx.metrics.observe_step("finish", None);
        }
        Act::RollBack { to, report } => {
            let mut rv = rv;
            if let Some(message) = report {
                rv = report_failure(&deploys, deploy, message).await?;
            }
            let stable = seen
                .replica_sets
                .iter()
                .find(|rs| rs.name_any() == *to)
                .and_then(|rs| rs.spec.as_ref()?.template.clone())
                .ok_or_else(|| Error::Invalid(format!("ReplicaSet {to} has no template")))?;
            let surge = held.surge(seen.observed.replicas);
            json_patch(
                &deploys,
                &name,
                pacing::rollback_patch(&rv, &stable, &held, surge),
            )
            .await?;
            ctx.metrics.observe_step("roll_back", None);
        }
    }
    Ok(())
}

/// The Deployment's Progressing condition set to ProgressDeadlineExceeded with `message`, onto
/// the version read: the one reason `kubectl rollout status` and Argo CD take as failure.
/// Returns the Deployment's new resourceVersion.
async fn report_failure(
    api: &Api<Deployment>,
    deploy: &Deployment,
    message: &str,
) -> Result<String> {
    let now = Time(Timestamp::now());
    let mut conditions: Vec<Value> = deploy
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ != "Progressing")
        .map(|c| serde_json::to_value(c).unwrap_or_default())
        .collect();
    conditions.push(json!({
        "type": "Progressing", "status": "False", "reason": PROGRESS_DEADLINE_EXCEEDED,
        "message": message, "lastUpdateTime": now, "lastTransitionTime": now,
    }));
    let rv = deploy.resource_version().unwrap_or_default();
    let ops = pacing::guarded(
        &rv,
        vec![json!({"op": "add", "path": "/status/conditions", "value": conditions})],
    );
    let d = api
        .patch_status(
            &deploy.name_any(),
            &params(),
            &Patch::<()>::Json(parse(ops)?),
        )
        .await?;
    Ok(d.resource_version().unwrap_or_default())
}

async fn json_patch<K>(api: &Api<K>, name: &str, ops: Value) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &params(), &Patch::<()>::Json(parse(ops)?))
        .await?;
    Ok(())
}

fn parse(ops: Value) -> Result<json_patch::Patch> {
    serde_json::from_value(ops).map_err(|e| Error::Invalid(format!("patch: {e}")))
}

/// Every write of the operator names it as the field manager.
fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    }
}

/// Server-side apply of the status, only onto the resourceVersion it was decided on: a
/// decision made on a stale copy (the cache can lag our own last write) is never written.
async fn write_status(
    ctx: &Context,
    gr: &GracefulRollout,
    status: GracefulRolloutStatus,
) -> Result<()> {
    let api: Api<GracefulRollout> =
        Api::namespaced(ctx.client.clone(), &gr.namespace().unwrap_or_default());
    let mut patch = json!({
        "apiVersion": "graceful.dev/v1alpha1",
        "kind": "GracefulRollout",
        "status": status,
    });
    if let Some(rv) = gr.resource_version() {
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

/// The decision's events and metrics, now that its writes succeeded.
async fn announce(
    ctx: &Context,
    gr: &GracefulRollout,
    before: &GracefulRolloutStatus,
    decision: &Decision,
) {
    for a in decision.announce.iter().filter(|a| !a.of_act) {
        publish(ctx, gr, event_type(a.warning), a.reason, &a.note).await;
    }
    ctx.metrics.set_phase(
        &gr.namespace().unwrap_or_default(),
        &gr.name_any(),
        &format!("{:?}", decision.status.phase),
    );
    let finished = decision.status.last_rollout.as_ref();
    if decision.guarded
        && finished != before.last_rollout.as_ref()
        && let Some(record) = finished
    {
        if let Some(started) = &before.rollout_started_at {
            ctx.drains.forget(&rollout_key(gr, started));
        }
        ctx.metrics
            .rollouts
            .get_or_create(&OutcomeLabels {
                outcome: record.outcome.clone(),
            })
            .inc();
        let took = record
            .finished_at
            .0
            .duration_since(record.started_at.0)
            .as_secs_f64();
        ctx.metrics.rollout_duration.observe(took.max(0.0));
    }
}

fn event_type(warning: bool) -> EventType {
    if warning {
        EventType::Warning
    } else {
        EventType::Normal
    }
}

async fn publish(ctx: &Context, gr: &GracefulRollout, type_: EventType, reason: &str, note: &str) {
    // The Recorder counts an Event again (a series of the first, with the first one's note)
    // when its reason and object repeat within 6 min, as client-go does: a rollout's three
    // Steps would read "Step (x3)" with the first step's note. The version the decision was
    // made on is part of the object's reference, so only a decision made again on the same
    // version (a retry) counts as a repeat.
    let mut reference: ObjectReference = gr.object_ref(&());
    reference.resource_version = gr.resource_version();
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

/// The GracefulRollout is being deleted: the Deployment gets the user's values back and loses
/// our label; a rollout in the middle is finished by the Deployment controller with the user's
/// own strategy (the injected sidecars still drain every pod it removes).
pub(crate) async fn cleanup(gr: Arc<GracefulRollout>, ctx: Arc<Context>) -> Result<Action> {
    let ns = gr.namespace().unwrap_or_default();
    ctx.metrics.forget_phase(&ns, &gr.name_any());
    let deploys: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(deploy) = deploys.get_opt(&gr.spec.target_ref.name).await? else {
        return Ok(Action::await_change());
    };
    let label = deploy.labels().get(MANAGED_LABEL).cloned();
    if label.as_ref().is_some_and(|l| *l != gr.name_any()) {
        return Ok(Action::await_change());
    }
    let held = pacing::held(&deploy);
    let mut deploy = deploy;
    if label.is_some() {
        if let Some(held) = &held {
            // Former new ReplicaSets whose minReadySeconds is still held count as available again.
            let hold = pacing::hold_seconds(&deploy);
            let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
            let d_uid = deploy.uid().unwrap_or_default();
            for rs in rs_api.list(&ListParams::default()).await?.items {
                let rs_min_ready = rs.spec.as_ref().and_then(|s| s.min_ready_seconds);
                let held_here = pacing::held_min_ready(
                    rs_min_ready.unwrap_or(0),
                    hold,
                    held.min_ready_seconds(),
                );
                if held_here && rs.owner_references().iter().any(|o| o.uid == d_uid) {
                    let rs_rv = rs.resource_version().unwrap_or_default();
                    let patch = pacing::release_patch(&rs_rv, held.min_ready_seconds());
                    json_patch(&rs_api, &rs.name_any(), patch).await?;
                }
            }
        }
        let rv = deploy.resource_version().unwrap_or_default();
        let patch = pacing::hand_back_patch(&rv, held.as_ref());
        json_patch(&deploys, &deploy.name_any(), patch).await?;
        deploy = deploys.get(&deploy.name_any()).await?;
    }
    // The fields just written back are the user's: no ownership of ours may linger on them.
    // The Deployment controller writes the Deployment right after the hand-back, so this can
    // meet a newer version: the finalizer then runs again, finds the label gone, and retries
    // only this.
    if let Some(entry) = own_spec_fields(&deploy) {
        let rv = deploy.resource_version().unwrap_or_default();
        json_patch(
            &deploys,
            &deploy.name_any(),
            pacing::disown_patch(&rv, entry),
        )
        .await?;
    }
    if label.is_none() {
        return Ok(Action::await_change());
    }
    let note = if held.is_some() {
        "the rollout in progress continues with the Deployment's own strategy; the Deployment is as its user wrote it"
    } else {
        "the Deployment is as its user wrote it"
    };
    publish(&ctx, &gr, EventType::Normal, "HandedBack", note).await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;

    /// The hold of the fixture Deployment (default progressDeadlineSeconds).
    const HOLD: i32 = crate::names::DEFAULT_PROGRESS_DEADLINE_SECONDS - 1;
    use prometheus_client::registry::Registry;
    use serde_json::Value;

    fn ctx(api: &FakeApi) -> Arc<Context> {
        Arc::new(Context::new(
            api.client(),
            Arc::new(Metrics::new(&mut Registry::default())),
            Arc::default(),
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

    fn deployment_now(api: &FakeApi) -> Deployment {
        serde_json::from_value(api.get("apps/v1", "Deployment", "web").unwrap()).unwrap()
    }

    /// Three ready, listed pods of `hash`, and one new pod ready for `new_ready` seconds.
    fn rollout_in_progress(api: &FakeApi, new_ready: Option<i64>) {
        let started =
            json!({"phase": "Progressing", "stableRevision": "aaaaa", "rolloutStartedAt": ago(30)});
        api.put(rollout(json!({}), started));
        api.put(deployment("v2", 3, true, Some(user_held())));
        api.put(replica_set("v1", "aaaaa", 3, 0, 900));
        api.put(replica_set("v2", "bbbbb", 1, HOLD, 30));
        for i in 1..=3 {
            api.put(pod(&format!("old-{i}"), "aaaaa", Some(600)));
        }
        api.put(pod("new-1", "bbbbb", new_ready));
        let ready = new_ready.is_some();
        api.put(slice(&[
            ("old-1", true),
            ("old-2", true),
            ("old-3", true),
            ("new-1", ready),
        ]));
    }

    /// Whether `observe` finds pod `name` listed ready.
    async fn listed_ready_seen(api: &FakeApi, name: &str) -> Option<bool> {
        let gr = gr(api);
        let deploy = deployment_now(api);
        let seen = observe(
            &ctx(api),
            &gr,
            &deploy,
            &gr.status.clone().unwrap_or_default(),
        )
        .await
        .unwrap();
        let pods = seen.observed.replica_sets.iter().flat_map(|rs| &rs.pods);
        pods.into_iter()
            .find(|p| p.name == name)
            .unwrap()
            .listed_ready
    }

    #[tokio::test]
    async fn only_the_slices_of_the_services_the_sidecars_name_are_read() {
        let api = FakeApi::default();
        rollout_in_progress(&api, Some(60));
        api.delete("discovery.k8s.io/v1", "EndpointSlice", "web-abcde");
        api.put(slice_of("web", &[("new-1", false)]));
        // Another Service's slice of the namespace says new-1 is ready: not this rollout's.
        api.put(slice_of("other", &[("new-1", true)]));
        assert_eq!(
            listed_ready_seen(&api, "new-1").await,
            Some(true),
            "unnamed: all"
        );
        for name in ["old-1", "old-2", "old-3"] {
            api.put(injected(pod(name, "aaaaa", Some(600)), "web"));
        }
        api.put(injected(pod("new-1", "bbbbb", Some(60)), "web"));
        assert_eq!(listed_ready_seen(&api, "new-1").await, Some(false));
        // No Service selects the pods: no slice is read, and none is expected.
        for name in ["old-1", "old-2", "old-3"] {
            api.put(injected(pod(name, "aaaaa", Some(600)), ""));
        }
        api.put(injected(pod("new-1", "bbbbb", Some(60)), ""));
        assert_eq!(listed_ready_seen(&api, "new-1").await, None);
    }

    #[tokio::test]
    async fn a_new_rollout_labels_its_deployment_and_touches_nothing_else() {
        let api = FakeApi::default();
        api.put(rollout(json!({}), json!({})));
        api.put(deployment("v1", 3, false, None));
        api.put(replica_set("v1", "aaaaa", 3, 0, 900));
        apply(gr(&api), ctx(&api)).await.unwrap();
        let writes = api.writes_to("/deployments/web");
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert_eq!(
            writes[0].body,
            json!({"metadata": {"labels": {crate::names::MANAGED_LABEL: "web"}, "resourceVersion": "7"}})
        );
        let d = deployment_now(&api);
        assert_eq!(d.spec.as_ref().unwrap().paused, None, "never paused");
        assert!(api.writes_to("/replicasets").is_empty());
    }

    #[tokio::test]
    async fn at_rest_the_rollout_is_healthy_and_writes_nothing_to_the_deployment() {
        let api = FakeApi::default();
        api.put(rollout(json!({}), json!({})));
        api.put(deployment("v1", 3, true, None));
        api.put(replica_set("v1", "aaaaa", 3, 0, 900));
        // Another Deployment's ReplicaSet in the namespace: the label selector keeps it out.
        let mut other = replica_set("v9", "zzzzz", 2, 0, 900);
        other["metadata"]["labels"]["app"] = json!("other");
        other["metadata"]["ownerReferences"][0]["uid"] = json!("uid-other");
        api.put(other);
        for i in 1..=3 {
            api.put(pod(&format!("old-{i}"), "aaaaa", Some(600)));
        }
        apply(gr(&api), ctx(&api)).await.unwrap();
        assert!(api.writes_to("/deployments").is_empty());
        let st = status_written(&api);
        assert_eq!(st["phase"], "Healthy");
        assert_eq!(st["stableRevision"], "aaaaa");
        assert_eq!(st["progress"], "3/3");
    }

    #[tokio::test]
    async fn a_proven_new_pod_lets_one_old_pod_go_and_the_step_is_announced_after_the_write() {
        let api = FakeApi::default();
        rollout_in_progress(&api, Some(60));
        apply(gr(&api), ctx(&api)).await.unwrap();
        let d = deployment_now(&api);
        assert_eq!(crate::pacing::max_unavailable(&d), Some(1));
        let patch = &api.writes_to("/deployments/web")[0].body;
        assert_eq!(
            patch[0],
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": "7"})
        );
        assert_eq!(api.events_for("Step"), 1);
    }

    #[tokio::test]
    async fn a_step_made_is_announced_even_when_the_status_write_meets_a_newer_version() {
        let api = FakeApi::default();
        rollout_in_progress(&api, Some(60));
        let mut stale = (*gr(&api)).clone();
        stale.metadata.resource_version = Some("4".into());
        apply(Arc::new(stale), ctx(&api)).await.unwrap();
        assert_eq!(
            crate::pacing::max_unavailable(&deployment_now(&api)),
            Some(1)
        );
        assert!(
            api.get("graceful.dev/v1alpha1", "GracefulRollout", "web")
                .unwrap()["status"]["lastProgressAt"]
                .is_null()
        );
        assert_eq!(api.events_for("Step"), 1);
    }

    #[tokio::test]
    async fn a_step_on_a_stale_read_is_neither_made_nor_announced() {
        let api = FakeApi::default();
        rollout_in_progress(&api, Some(60));
        let gr = gr(&api);
        let ctx = ctx(&api);
        let deploy = deployment_now(&api);
        // Someone writes the Deployment between our read and our step.
        let mut newer = api.get("apps/v1", "Deployment", "web").unwrap();
        newer["metadata"]["resourceVersion"] = json!("8");
        api.put(newer);
        let seen = observe(&ctx, &gr, &deploy, gr.status.as_ref().unwrap())
            .await
            .unwrap();
        let decision = plan::step(
            &seen.observed,
            &gr.spec,
            gr.status.as_ref().unwrap(),
            Timestamp::now(),
        );
        let err = act(&ctx, &gr, &deploy, &seen, &decision).await.unwrap_err();
        assert!(err.is_conflict(), "{err}");
        assert_eq!(
            crate::pacing::max_unavailable(&deployment_now(&api)),
            Some(0)
        );
        assert_eq!(api.events_for("Step"), 0);
    }

    #[tokio::test]
    async fn a_ready_pod_not_listed_in_the_endpointslices_takes_no_step() {
        let api = FakeApi::default();
        rollout_in_progress(&api, Some(60));
        api.put(slice(&[
            ("old-1", true),
            ("old-2", true),
            ("old-3", true),
            ("new-1", false),
        ]));
        apply(gr(&api), ctx(&api)).await.unwrap();
        assert!(api.writes_to("/deployments").is_empty());
    }

    #[tokio::test]
    async fn the_end_restores_the_users_values_then_records_the_rollout_once() {
        let api = FakeApi::default();
        rollout_in_progress(&api, Some(60));
        api.put(replica_set("v1", "aaaaa", 0, 0, 900));
        api.put(replica_set("v2", "bbbbb", 3, HOLD, 30));
        for name in ["old-1", "old-2", "old-3"] {
            api.delete("v1", "Pod", name);
        }
        for i in 2..=3 {
            api.put(pod(&format!("new-{i}"), "bbbbb", Some(60)));
        }
        api.put(slice(&[("new-1", true), ("new-2", true), ("new-3", true)]));
        apply(gr(&api), ctx(&api)).await.unwrap();
        let d = deployment_now(&api);
        assert_eq!(
            d.spec.as_ref().unwrap().min_ready_seconds,
            Some(0),
            "availability first"
        );
        assert_eq!(
            crate::pacing::max_unavailable(&d),
            Some(0),
            "the strategy still held"
        );
        // The Deployment controller counts the new pods as available.
        let mut d = api.get("apps/v1", "Deployment", "web").unwrap();
        d["status"]["availableReplicas"] = json!(3);
        api.put(d);
        apply(gr(&api), ctx(&api)).await.unwrap();
        let d = deployment_now(&api);
        let expected: Deployment = serde_json::from_value(deployment("v2", 3, true, None)).unwrap();
        assert_eq!(
            d.spec, expected.spec,
            "the user's strategy and minReadySeconds are back"
        );
        assert!(d.annotations().get(crate::names::HELD_ANNOTATION).is_none());
        assert_eq!(
            api.events_for("RolloutFinished"),
            0,
            "not before the record is written"
        );

        apply(gr(&api), ctx(&api)).await.unwrap();
        assert_eq!(status_written(&api)["lastRollout"]["outcome"], "Succeeded");
        assert_eq!(api.events_for("RolloutFinished"), 1);
        // A reconcile on the stale cached copy (it still says Progressing) records nothing.
        let stale = gr(&api);
        let mut stale_copy = (*stale).clone();
        stale_copy.status = Some(serde_json::from_value(json!({"phase": "Progressing", "stableRevision": "aaaaa", "rolloutStartedAt": ago(30)})).unwrap());
        stale_copy.metadata.resource_version = Some("5".into());
        apply(Arc::new(stale_copy), ctx(&api)).await.unwrap();
        assert_eq!(api.events_for("RolloutFinished"), 1);
    }

    #[tokio::test]
    async fn a_timed_out_revision_is_rolled_back_to_the_stable_template() {
        let api = FakeApi::default();
        rollout_in_progress(&api, None);
        let mut d = api.get("apps/v1", "Deployment", "web").unwrap();
        d["status"]["conditions"] = json!([{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]);
        api.put(d);
        apply(gr(&api), ctx(&api)).await.unwrap();
        let d = deployment_now(&api);
        let stable: Deployment = serde_json::from_value(deployment("v1", 3, true, None)).unwrap();
        assert_eq!(
            d.spec.as_ref().unwrap().template,
            stable.spec.as_ref().unwrap().template,
            "the stable template, without its hash label"
        );
        assert_eq!(d.spec.as_ref().unwrap().min_ready_seconds, Some(0));
        assert_eq!(crate::pacing::max_unavailable(&d), Some(0));
        assert!(
            crate::pacing::held(&d).is_some(),
            "the hold's record stays until the rollback ends"
        );
        let st = status_written(&api);
        assert_eq!(st["phase"], "RollingBack");
        assert_eq!(st["failedRevision"], "bbbbb");
        assert_eq!(api.events_for("RollingBack"), 1);
    }

    #[tokio::test]
    async fn a_finalizer_retried_after_the_hand_back_still_drops_our_field_ownership() {
        let api = FakeApi::default();
        api.put(rollout(json!({}), json!({})));
        let mut d = deployment("v2", 3, false, None);
        d["metadata"]["managedFields"] = json!([
            {"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}},
            {"manager": MANAGER, "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:minReadySeconds": {}}}},
        ]);
        api.put(d);
        cleanup(gr(&api), ctx(&api)).await.unwrap();
        let d = deployment_now(&api);
        assert_eq!(own_spec_fields(&d), None);
        assert_eq!(d.metadata.managed_fields.map(|m| m.len()), Some(1));
        assert_eq!(
            api.events_for("HandedBack"),
            0,
            "announced on the first run only"
        );
    }

    #[tokio::test]
    async fn deleting_the_rollout_mid_way_gives_the_deployment_back_as_its_user_wrote_it() {
        let api = FakeApi::default();
        rollout_in_progress(&api, Some(60));
        // A former new ReplicaSet still held.
        api.put(replica_set("v15", "ccccc", 1, HOLD, 60));
        cleanup(gr(&api), ctx(&api)).await.unwrap();
        let d = deployment_now(&api);
        let mut expected: Deployment =
            serde_json::from_value(deployment("v2", 3, false, None)).unwrap();
        expected.metadata.labels = None;
        assert_eq!(d.spec, expected.spec);
        assert!(d.labels().get(crate::names::MANAGED_LABEL).is_none());
        assert!(d.annotations().get(crate::names::HELD_ANNOTATION).is_none());
        for hash in ["bbbbb", "ccccc"] {
            let rs = api
                .get("apps/v1", "ReplicaSet", &format!("web-{hash}"))
                .unwrap();
            assert_eq!(
                rs["spec"]["minReadySeconds"], 0,
                "{hash} counts as available again"
            );
        }
        assert_eq!(api.events_for("HandedBack"), 1);
    }
}
