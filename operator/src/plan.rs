//! The step decision: given what the cluster looks like now, which ReplicaSet to scale next.
//! Pure (no API calls), so every rule below is unit-tested on plain values.
//!
//! The invariant: at every moment at least `replicas` pods are ready and serving. An old pod is
//! removed only when enough pods of the target revision have been serving for
//! `min_serving` to keep that count; not-ready old pods may go at once.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

/// One pod as the plan needs to see it.
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

    fn serving_since(&self, slices_expected: bool) -> Option<Timestamp> {
        self.serving(slices_expected)
            .then_some(self.ready_since)
            .flatten()
    }
}

/// One ReplicaSet of the Deployment.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaSetView {
    pub name: String,
    pub revision: String,
    pub replicas: i32,
    pub created: Timestamp,
    pub pods: Vec<PodView>,
}

/// Everything one decision depends on.
#[derive(Clone, Debug)]
pub struct World {
    pub replicas: i32,
    pub surge: i32,
    pub min_serving: Duration,
    pub now: Timestamp,
    /// The revision that should end up serving (the Deployment's, or the stable one when
    /// rolling back).
    pub target: String,
    pub replica_sets: Vec<ReplicaSetView>,
    /// Some pod of the Deployment is listed in an EndpointSlice, so new pods must be too before
    /// they count as serving.
    pub slices_expected: bool,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Create the target ReplicaSet (with zero replicas; a later step scales it).
    CreateTarget,
    /// Set these ReplicaSets to these sizes, in order (scale-ups first).
    Scale(Vec<(String, i32, &'static str)>),
    /// Nothing to change now; look again after `recheck`.
    Wait { reason: String, recheck: Duration },
    /// Every pod runs the target revision, old pods are gone.
    Done,
}

/// Counts for the status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    pub updated: i32,
    pub serving: i32,
    pub draining: i32,
    /// Target pods that have served for at least `min_serving`.
    pub proven: i32,
}

impl World {
    fn target_rs(&self) -> Option<&ReplicaSetView> {
        self.replica_sets
            .iter()
            .find(|rs| rs.revision == self.target)
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for rs in &self.replica_sets {
            for pod in &rs.pods {
                if pod.terminating {
                    c.draining += 1;
                    continue;
                }
                if pod.serving(self.slices_expected) {
                    c.serving += 1;
                }
                if rs.revision == self.target {
                    c.updated += 1;
                    if self.proven(pod) {
                        c.proven += 1;
                    }
                }
            }
        }
        c
    }

    fn proven(&self, pod: &PodView) -> bool {
        pod.serving_since(self.slices_expected)
            .is_some_and(|since| self.now.duration_since(since).unsigned_abs() >= self.min_serving)
    }

    /// The earliest moment a not-yet-proven serving target pod becomes proven.
    fn next_proof(&self) -> Option<Duration> {
        let rs = self.target_rs()?;
        rs.pods
            .iter()
            .filter(|p| !self.proven(p))
            .filter_map(|p| p.serving_since(self.slices_expected))
            .map(|since| {
                let served = self.now.duration_since(since).unsigned_abs();
                self.min_serving.saturating_sub(served)
            })
            .min()
    }

    pub fn decide(&self) -> Step {
        let Some(target) = self.target_rs() else {
            return Step::CreateTarget;
        };
        // Oldest first: they are scaled down first.
        let mut others: Vec<&ReplicaSetView> = self
            .replica_sets
            .iter()
            .filter(|rs| rs.revision != self.target && rs.replicas > 0)
            .collect();
        others.sort_by_key(|rs| rs.created);
        let others_replicas: i32 = others.iter().map(|rs| rs.replicas).sum();

        let mut actions = Vec::new();
        // Scale up the target within the surge budget.
        let want_target = self
            .replicas
            .min(self.replicas + self.surge - others_replicas);
        if want_target > target.replicas {
            actions.push((
                target.name.clone(),
                want_target,
                "surge: add pods of the new revision",
            ));
        } else if others.is_empty() && target.replicas > self.replicas {
            actions.push((
                target.name.clone(),
                self.replicas,
                "scale to the Deployment's replicas",
            ));
        }

        // Scale down others: unready pods may go at once; ready ones only while enough proven
        // target pods keep `replicas` serving.
        let counts = self.counts();
        let proven = counts.proven;
        let serving_others: i32 = others
            .iter()
            .flat_map(|rs| rs.pods.iter())
            .filter(|p| p.serving(self.slices_expected))
            .count() as i32;
        let mut ready_budget = (proven + serving_others - self.replicas).max(0);
        for rs in &others {
            let live: Vec<&PodView> = rs.pods.iter().filter(|p| !p.terminating).collect();
            let unready = live
                .iter()
                .filter(|p| !p.serving(self.slices_expected))
                .count() as i32;
            // Pods the ReplicaSet wants but has not created yet are "unready" too.
            let missing = (rs.replicas - live.len() as i32).max(0);
            let free = (unready + missing).min(rs.replicas);
            let ready_here = rs.replicas - free;
            let take_ready = ready_budget.min(ready_here);
            ready_budget -= take_ready;
            let remove = free + take_ready;
            if remove > 0 {
                let reason = if take_ready > 0 {
                    "replacement serving: drain an old pod"
                } else {
                    "remove old pods that are not serving"
                };
                actions.push((rs.name.clone(), rs.replicas - remove, reason));
            }
        }
        if !actions.is_empty() {
            return Step::Scale(actions);
        }

        if others.is_empty() && target.replicas == self.replicas && counts.proven >= self.replicas {
            return if counts.draining > 0 {
                Step::Wait {
                    reason: format!(
                        "waiting for {} old pod(s) to finish draining",
                        counts.draining
                    ),
                    recheck: Duration::from_secs(2),
                }
            } else {
                Step::Done
            };
        }
        match self.next_proof() {
            Some(left) => Step::Wait {
                reason: format!(
                    "new pods serving; proving for {}s before an old pod is drained",
                    self.min_serving.as_secs()
                ),
                recheck: left.max(Duration::from_millis(500)),
            },
            None => Step::Wait {
                reason: format!(
                    "waiting for new pods to serve ({}/{} updated, {} proven)",
                    counts.updated, self.replicas, counts.proven
                ),
                recheck: Duration::from_secs(2),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs_ago: i64) -> Timestamp {
        Timestamp::from_second(1_000_000 - secs_ago).unwrap()
    }

    fn pod(name: &str, ready_secs_ago: Option<i64>) -> PodView {
        PodView {
            name: name.into(),
            ready_since: ready_secs_ago.map(t),
            listed_ready: Some(ready_secs_ago.is_some()),
            terminating: false,
        }
    }

    fn rs(
        name: &str,
        revision: &str,
        replicas: i32,
        age: i64,
        pods: Vec<PodView>,
    ) -> ReplicaSetView {
        ReplicaSetView {
            name: name.into(),
            revision: revision.into(),
            replicas,
            created: t(age),
            pods,
        }
    }

    fn world(sets: Vec<ReplicaSetView>) -> World {
        World {
            replicas: 3,
            surge: 1,
            min_serving: Duration::from_secs(10),
            now: t(0),
            target: "new".into(),
            replica_sets: sets,
            slices_expected: true,
        }
    }

    fn old3() -> ReplicaSetView {
        rs(
            "web-old",
            "old",
            3,
            1000,
            vec![
                pod("o1", Some(900)),
                pod("o2", Some(900)),
                pod("o3", Some(900)),
            ],
        )
    }

    #[test]
    fn creates_the_target_replicaset_first() {
        assert_eq!(world(vec![old3()]).decide(), Step::CreateTarget);
    }

    #[test]
    fn surges_one_new_pod_and_keeps_every_old_pod() {
        let w = world(vec![old3(), rs("web-new", "new", 0, 1, vec![])]);
        assert_eq!(
            w.decide(),
            Step::Scale(vec![(
                "web-new".into(),
                1,
                "surge: add pods of the new revision"
            )])
        );
    }

    #[test]
    fn waits_while_the_new_pod_is_not_ready() {
        let w = world(vec![
            old3(),
            rs("web-new", "new", 1, 1, vec![pod("n1", None)]),
        ]);
        assert!(matches!(w.decide(), Step::Wait { .. }));
    }

    #[test]
    fn ready_but_unlisted_pod_does_not_count_as_serving() {
        let mut n1 = pod("n1", Some(60));
        n1.listed_ready = None;
        let w = world(vec![old3(), rs("web-new", "new", 1, 1, vec![n1])]);
        assert!(matches!(w.decide(), Step::Wait { .. }));
    }

    #[test]
    fn new_pod_must_serve_min_serving_before_an_old_pod_goes() {
        let w = world(vec![
            old3(),
            rs("web-new", "new", 1, 1, vec![pod("n1", Some(3))]),
        ]);
        match w.decide() {
            Step::Wait { recheck, .. } => assert_eq!(recheck, Duration::from_secs(7)),
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn proven_new_pod_drains_exactly_one_old_pod() {
        let w = world(vec![
            old3(),
            rs("web-new", "new", 1, 1, vec![pod("n1", Some(30))]),
        ]);
        assert_eq!(
            w.decide(),
            Step::Scale(vec![(
                "web-old".into(),
                2,
                "replacement serving: drain an old pod"
            )])
        );
    }

    #[test]
    fn after_a_drain_starts_the_next_surge_follows() {
        let mut old = old3();
        old.replicas = 2;
        old.pods[2].terminating = true;
        let w = world(vec![
            old,
            rs("web-new", "new", 1, 1, vec![pod("n1", Some(30))]),
        ]);
        assert_eq!(
            w.decide(),
            Step::Scale(vec![(
                "web-new".into(),
                2,
                "surge: add pods of the new revision"
            )])
        );
    }

    #[test]
    fn never_fewer_than_replicas_serving() {
        // Walk a whole rollout, simulating pods that become ready and proven instantly, and check
        // the invariant after every step.
        let mut w = world(vec![old3(), rs("web-new", "new", 0, 1, vec![])]);
        for _ in 0..20 {
            let step = w.decide();
            let Step::Scale(actions) = step else {
                assert_eq!(step, Step::Done);
                return;
            };
            for (name, size, _) in actions {
                let set = w.replica_sets.iter_mut().find(|r| r.name == name).unwrap();
                while (set.pods.len() as i32) < size {
                    let n = set.pods.len();
                    set.pods.push(pod(&format!("{name}-{n}"), Some(60)));
                }
                while (set.pods.len() as i32) > size {
                    set.pods.pop();
                }
                set.replicas = size;
            }
            assert!(
                w.counts().serving >= 3,
                "serving dropped below replicas: {:?}",
                w.counts()
            );
        }
        panic!("rollout did not finish");
    }

    #[test]
    fn unready_old_pods_go_at_once() {
        let old = rs(
            "web-old",
            "old",
            3,
            1000,
            vec![pod("o1", None), pod("o2", Some(900)), pod("o3", Some(900))],
        );
        let w = world(vec![old, rs("web-new", "new", 1, 1, vec![pod("n1", None)])]);
        assert_eq!(
            w.decide(),
            Step::Scale(vec![(
                "web-old".into(),
                2,
                "remove old pods that are not serving"
            )])
        );
    }

    #[test]
    fn rollback_removes_never_ready_pods_and_keeps_stable_ones() {
        // Rolling back: the target is the stable revision; the failed pods never served.
        let mut w = world(vec![
            rs(
                "web-old",
                "old",
                3,
                1000,
                vec![
                    pod("o1", Some(900)),
                    pod("o2", Some(900)),
                    pod("o3", Some(900)),
                ],
            ),
            rs("web-bad", "bad", 1, 1, vec![pod("b1", None)]),
        ]);
        w.target = "old".into();
        assert_eq!(
            w.decide(),
            Step::Scale(vec![(
                "web-bad".into(),
                0,
                "remove old pods that are not serving"
            )])
        );
    }

    #[test]
    fn done_only_after_draining_pods_are_gone() {
        let mut old = rs("web-old", "old", 0, 1000, vec![pod("o3", Some(900))]);
        old.pods[0].terminating = true;
        let new = rs(
            "web-new",
            "new",
            3,
            1,
            vec![
                pod("n1", Some(60)),
                pod("n2", Some(60)),
                pod("n3", Some(60)),
            ],
        );
        let w = world(vec![old.clone(), new.clone()]);
        assert!(matches!(w.decide(), Step::Wait { .. }));
        old.pods.clear();
        assert_eq!(world(vec![old, new]).decide(), Step::Done);
    }

    #[test]
    fn without_services_pod_readiness_is_enough() {
        let mut n1 = pod("n1", Some(30));
        n1.listed_ready = None;
        let mut w = world(vec![old3(), rs("web-new", "new", 1, 1, vec![n1])]);
        w.slices_expected = false;
        assert!(matches!(w.decide(), Step::Scale(_)));
    }

    #[test]
    fn oldest_replicaset_is_drained_first() {
        let older = rs("web-a", "a", 1, 2000, vec![pod("a1", Some(1900))]);
        let old = rs(
            "web-b",
            "b",
            2,
            1000,
            vec![pod("b1", Some(900)), pod("b2", Some(900))],
        );
        let w = world(vec![
            old,
            older,
            rs("web-new", "new", 1, 1, vec![pod("n1", Some(30))]),
        ]);
        assert_eq!(
            w.decide(),
            Step::Scale(vec![(
                "web-a".into(),
                0,
                "replacement serving: drain an old pod"
            )])
        );
    }
}
