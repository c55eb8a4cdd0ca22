//! Pacing the Deployment controller through its own fields (docs/rollout.md).
//!
//! A managed Deployment stays a normal, unpaused Deployment: the Deployment controller creates
//! and scales its ReplicaSets as always. While a rollout runs, graceful holds two of its fields:
//!
//! - `minReadySeconds` = [`hold_seconds`], the longest the API server accepts
//!   (`progressDeadlineSeconds - 1`): copied by the Deployment controller onto the new
//!   ReplicaSet only, so new pods serve as soon as they are ready but count as available only
//!   after that long; old pods keep the user's value and stay available;
//! - `strategy` = RollingUpdate with the user's `maxSurge` (at least 1) and `maxUnavailable` = the
//!   number of new pods the operator has seen serving for `minServingSeconds`, less those the
//!   Deployment controller already counts as available. It keeps
//!   `available >= replicas - maxUnavailable`, so it removes an old pod exactly when a proven new
//!   pod replaces it, never sooner. Should the operator vanish, the hold ends by itself: a new
//!   pod that has been ready for `progressDeadlineSeconds - 1` counts as available, and the
//!   Deployment controller finishes the rollout on that evidence alone.
//!
//! The user's own values wait in the [`HELD_ANNOTATION`] and are put back when the rollout ends,
//! the GracefulRollout is deleted, or the rollout is rolled back. The hold starts in the
//! admission request of the template change ([`admit`]), before the Deployment controller can
//! act on it.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::names::{
    DEFAULT_PROGRESS_DEADLINE_SECONDS, HELD_ANNOTATION, MANAGED_LABEL, MANAGER, POD_TEMPLATE_HASH,
};

/// The user's values of the fields graceful holds during a rollout.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ready_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<DeploymentStrategy>,
}

impl Held {
    fn of(d: &Deployment) -> Self {
        let spec = d.spec.as_ref();
        Held {
            min_ready_seconds: spec.and_then(|s| s.min_ready_seconds).filter(|s| *s != 0),
            strategy: spec.and_then(|s| s.strategy.clone()),
        }
    }

    pub fn min_ready_seconds(&self) -> i32 {
        self.min_ready_seconds.unwrap_or(0)
    }

    /// The user's maxSurge resolved against `replicas` (the Deployment controller rounds
    /// percentages up), at least 1: graceful never removes a pod before its replacement serves.
    pub fn surge(&self, replicas: i32) -> i32 {
        let surge = self
            .strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|r| r.max_surge.as_ref());
        let n = match surge {
            Some(IntOrString::Int(n)) => *n,
            Some(IntOrString::String(p)) => {
                let pct: i64 = p.trim_end_matches('%').parse().unwrap_or(25);
                ((i64::from(replicas) * pct + 99) / 100) as i32
            }
            None => (replicas + 3) / 4,
        };
        n.max(1)
    }
}

/// The held values, if a rollout of this Deployment is paced now.
pub fn held(d: &Deployment) -> Option<Held> {
    let raw = d.annotations().get(HELD_ANNOTATION)?;
    match serde_json::from_str(raw) {
        Ok(h) => Some(h),
        Err(e) => {
            // Unreadable (hand-edited): restore what we can, which is the defaults.
            tracing::warn!(deployment = %d.name_any(), error = %e, "unreadable {HELD_ANNOTATION} annotation");
            Some(Held::default())
        }
    }
}

/// The held `minReadySeconds`: the longest the API server accepts, which must stay below
/// `progressDeadlineSeconds` (a Deployment validation rule).
pub fn hold_seconds(d: &Deployment) -> i32 {
    let deadline = d
        .spec
        .as_ref()
        .and_then(|s| s.progress_deadline_seconds)
        .unwrap_or(DEFAULT_PROGRESS_DEADLINE_SECONDS);
    (deadline - 1).max(0)
}

/// Whether a ReplicaSet's `minReadySeconds` is the hold rather than the user's value.
pub fn held_min_ready(rs_min_ready_seconds: i32, hold: i32, user_min_ready_seconds: i32) -> bool {
    rs_min_ready_seconds == hold && hold != user_min_ready_seconds
}

/// Whether the Deployment uses the Recreate strategy: it is never paced (it has no overlap of
/// old and new pods to sequence), and rolls out natively.
pub fn recreate(d: &Deployment) -> bool {
    d.spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.type_.as_deref())
        == Some("Recreate")
}

/// The `maxUnavailable` the Deployment carries now, if it is a count (it is while paced).
pub fn max_unavailable(d: &Deployment) -> Option<i32> {
    match d
        .spec
        .as_ref()?
        .strategy
        .as_ref()?
        .rolling_update
        .as_ref()?
        .max_unavailable
        .as_ref()?
    {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(_) => None,
    }
}

pub fn paced_strategy(surge: i32, max_unavailable: i32) -> DeploymentStrategy {
    DeploymentStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(surge)),
            max_unavailable: Some(IntOrString::Int(max_unavailable)),
        }),
    }
}

fn replicas(d: &Deployment) -> i32 {
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

fn template(d: &Deployment) -> Option<&PodTemplateSpec> {
    d.spec.as_ref().map(|s| &s.template)
}

/// The Deployment webhook's rule for an UPDATE of a managed Deployment: the Deployment as it
/// must be stored, or `None` to let the request through unchanged.
///
/// - The operator's own writes pass untouched (it sets `maxUnavailable` step by step, restores).
/// - At rest, a change of the pod template starts the hold: the request's own `minReadySeconds`
///   and `strategy` (the user's, including any change made in the same request) go into the
///   annotation, the held values take their place.
/// - During a paced rollout, a request that changes a held field (a GitOps re-apply, `kubectl
///   edit`) changes the user's value in the annotation, and the held value stays; the annotation
///   always comes from the stored object, never from the request (`kubectl rollout undo` copies
///   a ReplicaSet's stale annotations onto the Deployment).
pub fn admit(old: &Deployment, new: &Deployment, by_operator: bool) -> Option<Deployment> {
    if by_operator {
        return None;
    }
    let mut out = new.clone();
    match held(old) {
        Some(mut user) => {
            let (old_spec, out_spec) = (old.spec.as_ref()?, out.spec.as_mut()?);
            if out_spec.min_ready_seconds != old_spec.min_ready_seconds {
                user.min_ready_seconds = out_spec.min_ready_seconds.filter(|s| *s != 0);
            }
            if out_spec.strategy != old_spec.strategy {
                user.strategy = out_spec.strategy.clone();
                out_spec.strategy = old_spec.strategy.clone();
            }
            // Recomputed: the request may change progressDeadlineSeconds.
            let hold = hold_seconds(&out);
            if let Some(spec) = out.spec.as_mut() {
                spec.min_ready_seconds = Some(hold);
            }
            set_held(&mut out, Some(&user));
        }
        // Already held earlier in this request (a second webhook of the chain, a reinvocation):
        // the request's annotation has the user's values, the fields hold.
        None if new.spec.as_ref().and_then(|s| s.min_ready_seconds) == Some(hold_seconds(new))
            && held(new).is_some() => {}
        None if template(old) != template(new) && !recreate(new) => {
            let user = Held::of(new);
            let surge = user.surge(replicas(new));
            let hold = hold_seconds(new);
            let spec = out.spec.as_mut()?;
            spec.min_ready_seconds = Some(hold);
            spec.strategy = Some(paced_strategy(surge, 0));
            set_held(&mut out, Some(&user));
        }
        None => set_held(&mut out, None),
    }
    (&out != new).then_some(out)
}

fn set_held(d: &mut Deployment, user: Option<&Held>) {
    let annotations = d.metadata.annotations.get_or_insert_with(Default::default);
    match user {
        Some(user) => {
            let json = serde_json::to_string(user).expect("Held serializes");
            annotations.insert(HELD_ANNOTATION.into(), json);
        }
        None => {
            annotations.remove(HELD_ANNOTATION);
        }
    }
    if annotations.is_empty() {
        d.metadata.annotations = None;
    }
}

/// JSON Patch operations that apply only onto `resource_version` (a `test` first), so a write
/// made on a stale read fails instead of undoing someone else's.
pub fn guarded(resource_version: &str, mut ops: Vec<Value>) -> Value {
    ops.insert(
        0,
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": resource_version}),
    );
    Value::Array(ops)
}

/// `/` and `~` escaped for a JSON Pointer.
fn pointer_key(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn restore_ops(user: &Held) -> Vec<Value> {
    let strategy = user.strategy.clone().unwrap_or_default();
    vec![
        json!({"op": "add", "path": "/spec/minReadySeconds", "value": user.min_ready_seconds()}),
        json!({"op": "add", "path": "/spec/strategy", "value": strategy}),
        json!({"op": "remove", "path": format!("/metadata/annotations/{}", pointer_key(HELD_ANNOTATION))}),
    ]
}

/// The end of the hold: the user's values back, the annotation gone (`minReadySeconds` is
/// normally back already: see `plan::Act::MakeAvailable`).
pub fn restore_patch(resource_version: &str, user: &Held) -> Value {
    guarded(resource_version, restore_ops(user))
}

/// The GracefulRollout is gone: the user's values back if a rollout was held, our label gone.
pub fn hand_back_patch(resource_version: &str, user: Option<&Held>) -> Value {
    let mut ops = user.map(restore_ops).unwrap_or_default();
    ops.push(
        json!({"op": "remove", "path": format!("/metadata/labels/{}", pointer_key(MANAGED_LABEL))}),
    );
    guarded(resource_version, ops)
}

/// Drop the operator's own managedFields entry number `entry`. A request that changes
/// managedFields is taken as it is, so this one leaves the fields unowned by us.
pub fn disown_patch(resource_version: &str, entry: usize) -> Value {
    guarded(
        resource_version,
        vec![
            json!({"op": "test", "path": format!("/metadata/managedFields/{entry}/manager"), "value": MANAGER}),
            json!({"op": "remove", "path": format!("/metadata/managedFields/{entry}")}),
        ],
    )
}

/// One step: the Deployment controller may now remove `max_unavailable` old pods in all.
pub fn step_patch(resource_version: &str, max_unavailable: i32) -> Value {
    guarded(
        resource_version,
        vec![
            json!({"op": "add", "path": "/spec/strategy/rollingUpdate/maxUnavailable", "value": max_unavailable}),
        ],
    )
}

/// Roll back to `stable`'s pods, as `kubectl rollout undo` would (its template without the
/// hash label), keeping the hold's annotation but trusting availability again: the pods the
/// rollback brings back are the stable ones, and `maxUnavailable: 0` keeps every serving pod
/// until its replacement is available.
pub fn rollback_patch(
    resource_version: &str,
    stable: &PodTemplateSpec,
    user: &Held,
    surge: i32,
) -> Value {
    let mut template = stable.clone();
    if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(POD_TEMPLATE_HASH);
    }
    guarded(
        resource_version,
        vec![
            json!({"op": "replace", "path": "/spec/template", "value": template}),
            json!({"op": "add", "path": "/spec/minReadySeconds", "value": user.min_ready_seconds()}),
            json!({"op": "add", "path": "/spec/strategy", "value": paced_strategy(surge, 0)}),
        ],
    )
}

/// The user's `minReadySeconds` back, on the Deployment at the end of a rollout, or on a
/// ReplicaSet that stopped being the new one while held (the Deployment controller only updates
/// the new ReplicaSet's): its pods count as available again.
pub fn release_patch(resource_version: &str, min_ready_seconds: i32) -> Value {
    guarded(
        resource_version,
        vec![json!({"op": "add", "path": "/spec/minReadySeconds", "value": min_ready_seconds})],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The hold of a Deployment with the default progressDeadlineSeconds.
    const HOLD: i32 = DEFAULT_PROGRESS_DEADLINE_SECONDS - 1;

    fn deployment(image: &str, strategy: Value, min_ready: i32, held: Option<Value>) -> Deployment {
        let mut d = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"graceful.dev/rollout": "web"}},
            "spec": {
                "replicas": 4,
                "minReadySeconds": min_ready,
                "selector": {"matchLabels": {"app": "web"}},
                "strategy": strategy,
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "app", "image": image}]}},
            }
        });
        if let Some(h) = held {
            d["metadata"]["annotations"] = json!({HELD_ANNOTATION: h.to_string()});
        }
        serde_json::from_value(d).unwrap()
    }

    fn rolling(surge: Value, unavailable: Value) -> Value {
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}})
    }

    fn user_strategy() -> Value {
        rolling(json!("25%"), json!("25%"))
    }

    fn annotation(d: &Deployment) -> Option<Value> {
        d.annotations()
            .get(HELD_ANNOTATION)
            .map(|s| serde_json::from_str(s).unwrap())
    }

    #[test]
    fn a_template_change_at_rest_starts_the_hold_and_keeps_the_users_values() {
        let old = deployment("v1", user_strategy(), 3, None);
        let new = deployment("v2", user_strategy(), 3, None);
        let out = admit(&old, &new, false).expect("paced");
        let spec = out.spec.as_ref().unwrap();
        assert_eq!(spec.min_ready_seconds, Some(HOLD));
        assert_eq!(spec.strategy, Some(paced_strategy(1, 0)));
        assert_eq!(
            annotation(&out),
            Some(json!({"minReadySeconds": 3, "strategy": user_strategy()}))
        );
        // The template itself is the user's.
        assert_eq!(spec.template, new.spec.as_ref().unwrap().template);
    }

    #[test]
    fn a_strategy_changed_in_the_same_request_is_what_is_held() {
        let old = deployment("v1", user_strategy(), 0, None);
        let new = deployment("v2", rolling(json!(2), json!(0)), 0, None);
        let out = admit(&old, &new, false).unwrap();
        assert_eq!(
            annotation(&out),
            Some(json!({"strategy": rolling(json!(2), json!(0))}))
        );
        assert_eq!(out.spec.unwrap().strategy, Some(paced_strategy(2, 0)));
    }

    #[test]
    fn other_updates_at_rest_pass_untouched() {
        let old = deployment("v1", user_strategy(), 0, None);
        let mut new = old.clone();
        new.spec.as_mut().unwrap().replicas = Some(7);
        assert!(admit(&old, &new, false).is_none());
    }

    #[test]
    fn a_stale_held_annotation_brought_by_an_undo_is_dropped_at_rest() {
        let old = deployment("v2", user_strategy(), 0, None);
        // `rollout undo` to v1 while at rest, carrying v1's ReplicaSet annotations.
        let stale = json!({"strategy": rolling(json!(9), json!(9))});
        let new = deployment("v1", user_strategy(), 0, Some(stale));
        let out = admit(&old, &new, false).unwrap();
        assert_eq!(
            annotation(&out),
            Some(json!({"strategy": user_strategy()})),
            "the held values are the request's own fields, not the copied annotation"
        );
        let mut same_template = new.clone();
        same_template.spec.as_mut().unwrap().template = old.spec.as_ref().unwrap().template.clone();
        let out = admit(&old, &same_template, false).unwrap();
        assert!(out.annotations().get(HELD_ANNOTATION).is_none());
    }

    #[test]
    fn during_a_rollout_a_reapplied_strategy_updates_the_held_values_not_the_hold() {
        let held = json!({"minReadySeconds": 3, "strategy": user_strategy()});
        let old = deployment("v2", rolling(json!(1), json!(2)), HOLD, Some(held));
        // GitOps re-applies the manifest: the user's strategy and minReadySeconds, no annotation.
        let mut new = deployment("v2", rolling(json!("50%"), json!("25%")), 3, None);
        new.metadata.annotations = None;
        let out = admit(&old, &new, false).unwrap();
        let spec = out.spec.as_ref().unwrap();
        assert_eq!(spec.min_ready_seconds, Some(HOLD));
        assert_eq!(spec.strategy, old.spec.as_ref().unwrap().strategy);
        assert_eq!(
            annotation(&out),
            Some(json!({"minReadySeconds": 3, "strategy": rolling(json!("50%"), json!("25%"))}))
        );
    }

    #[test]
    fn during_a_rollout_a_template_change_keeps_the_hold() {
        let held = json!({"strategy": user_strategy()});
        let old = deployment("v2", rolling(json!(1), json!(1)), HOLD, Some(held.clone()));
        let new = deployment("v3", rolling(json!(1), json!(1)), HOLD, Some(held.clone()));
        assert!(admit(&old, &new, false).is_none(), "nothing to change");
    }

    #[test]
    fn the_hold_follows_progress_deadline_seconds_which_must_stay_above_it() {
        let held = json!({"strategy": user_strategy()});
        let old = deployment("v2", rolling(json!(1), json!(0)), HOLD, Some(held));
        let mut new = old.clone();
        new.spec.as_mut().unwrap().progress_deadline_seconds = Some(60);
        let out = admit(&old, &new, false).unwrap();
        assert_eq!(out.spec.unwrap().min_ready_seconds, Some(59));
    }

    #[test]
    fn holding_twice_in_one_request_keeps_the_users_values() {
        let old = deployment("v1", user_strategy(), 3, None);
        let new = deployment("v2", user_strategy(), 3, None);
        let once = admit(&old, &new, false).unwrap();
        assert!(
            admit(&old, &once, false).is_none(),
            "nothing more to change"
        );
    }

    #[test]
    fn the_operators_own_writes_pass() {
        let old = deployment("v1", user_strategy(), 0, None);
        let new = deployment("v2", user_strategy(), 0, None);
        assert!(admit(&old, &new, true).is_none());
    }

    #[test]
    fn recreate_deployments_roll_out_natively() {
        let recreate = json!({"type": "Recreate"});
        let old = deployment("v1", recreate.clone(), 0, None);
        let new = deployment("v2", recreate, 0, None);
        assert!(admit(&old, &new, false).is_none());
    }

    #[test]
    fn surge_resolves_like_the_deployment_controller_and_is_at_least_one() {
        let held = |s: Value| Held {
            min_ready_seconds: None,
            strategy: Some(serde_json::from_value(rolling(s, json!(0))).unwrap()),
        };
        assert_eq!(held(json!("25%")).surge(3), 1);
        assert_eq!(held(json!("50%")).surge(3), 2);
        assert_eq!(held(json!(0)).surge(3), 1);
        assert_eq!(held(json!(4)).surge(3), 4);
        assert_eq!(Held::default().surge(8), 2);
    }

    #[test]
    fn restore_puts_back_exactly_the_users_values_and_only_onto_the_version_read() {
        let user: Held =
            serde_json::from_value(json!({"minReadySeconds": 3, "strategy": user_strategy()}))
                .unwrap();
        let patch = restore_patch("42", &user);
        let held = json!({"minReadySeconds": 3, "strategy": user_strategy()});
        let d = deployment("v2", rolling(json!(1), json!(4)), HOLD, Some(held));
        let mut value = serde_json::to_value(&d).unwrap();
        value["metadata"]["resourceVersion"] = json!("42");
        let ops: json_patch::Patch = serde_json::from_value(patch.clone()).unwrap();
        json_patch::patch(&mut value, &ops).unwrap();
        let restored: Deployment = serde_json::from_value(value.clone()).unwrap();
        let expected = deployment("v2", user_strategy(), 3, None);
        assert_eq!(restored.spec, expected.spec);
        assert!(restored.annotations().get(HELD_ANNOTATION).is_none());
        // A stale read fails the test op.
        value["metadata"]["resourceVersion"] = json!("43");
        assert!(json_patch::patch(&mut value, &ops).is_err());
    }
}
