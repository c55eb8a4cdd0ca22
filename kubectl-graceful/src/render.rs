//! A snapshot as text. On a terminal: colours, and `--watch` redraws the screen in place; piped:
//! no escape codes, and `--watch` prints one line per change, as `kubectl get --watch` does.

use std::collections::BTreeMap;

use graceful_operator::crd::Phase;

use crate::snapshot::{PodState, Snapshot};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    pub color: bool,
}

const RESET: &str = "\x1b[0m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const BLUE: &str = "\x1b[34m";
const CYAN: &str = "\x1b[36m";

impl Style {
    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("{code}{text}{RESET}")
        } else {
            text.to_owned()
        }
    }
}

fn phase_color(phase: Phase) -> &'static str {
    match phase {
        Phase::Healthy => GREEN,
        Phase::Progressing | Phase::RollingBack => YELLOW,
        Phase::Paused => BLUE,
        Phase::Degraded | Phase::Missing => RED,
        Phase::Initializing => DIM,
    }
}

fn state_color(state: PodState) -> &'static str {
    match state {
        PodState::Starting => CYAN,
        PodState::Serving => GREEN,
        PodState::Draining => YELLOW,
        PodState::Drained => DIM,
    }
}

fn short(revision: &str) -> &str {
    if revision.is_empty() { "-" } else { revision }
}

/// The whole status: the rollout's header, then one row per pod.
pub fn frame(s: &Snapshot, style: Style) -> String {
    let gr = &s.rollout;
    let st = gr.status.clone().unwrap_or_default();
    let ns = gr.metadata.namespace.as_deref().unwrap_or("default");
    let name = gr.metadata.name.as_deref().unwrap_or("?");
    let mut out = String::new();
    out.push_str(&format!(
        "{} {ns}/{name} -> Deployment {}\n",
        style.paint(BOLD, "GracefulRollout"),
        gr.spec.target_ref.name
    ));
    let mut phase = style.paint(phase_color(st.phase), &format!("{:?}", st.phase));
    if gr.spec.paused {
        phase.push_str(" (spec.paused)");
    }
    if gr.spec.abort {
        phase.push_str(" (spec.abort)");
    }
    if s.deployment
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|d| d.paused)
        .unwrap_or(false)
    {
        phase.push_str(" (Deployment paused)");
    }
    out.push_str(&format!("Phase:     {phase}\n"));
    if let Some(step) = &st.current_step {
        out.push_str(&format!("Step:      {step}\n"));
    }
    out.push_str(&format!(
        "Pods:      {} updated of {}, {} serving, {} draining\n",
        st.updated, st.replicas, st.serving, st.draining
    ));
    let mut revisions = format!(
        "stable {}",
        short(st.stable_revision.as_deref().unwrap_or(""))
    );
    if let Some(updated) = &st.updated_revision
        && Some(updated) != st.stable_revision.as_ref()
    {
        revisions.push_str(&format!(", rolling out {updated}"));
    }
    if let Some(failed) = &st.failed_revision {
        revisions.push_str(&format!(", {} {failed}", style.paint(RED, "failed")));
    }
    out.push_str(&format!("Revisions: {revisions}\n"));
    if let Some(planes) = &s.data_planes {
        out.push_str(&format!("Fronted:   {planes}\n"));
    }
    if let Some(last) = &st.last_rollout {
        out.push_str(&format!("Last:      {}\n", last.summary));
    }
    out.push('\n');
    let width = s
        .pods
        .iter()
        .map(|p| p.name.len())
        .max()
        .unwrap_or(3)
        .max(3);
    out.push_str(&format!(
        "{:width$}  {:12} {:5}  {:9} DRAIN\n",
        "POD", "REVISION", "READY", "STATE"
    ));
    if s.pods.is_empty() {
        out.push_str("(no pods)\n");
    }
    for pod in &s.pods {
        let state = format!("{:9}", pod.state.as_str());
        let drain = pod.drain.as_ref().map(|d| d.describe()).unwrap_or_default();
        out.push_str(
            format!(
                "{:width$}  {:12} {:5}  {} {drain}",
                pod.name,
                short(&pod.revision),
                pod.ready,
                style.paint(state_color(pod.state), &state),
            )
            .trim_end(),
        );
        out.push('\n');
    }
    out
}

/// What `--watch` compares between two reads when it prints lines: the rollout's phase and
/// step, and each pod's state (figures that move every second are left out).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outline {
    pub phase: String,
    pub step: Option<String>,
    pub pods: BTreeMap<String, PodState>,
}

impl Outline {
    pub fn of(s: &Snapshot) -> Self {
        let st = s.rollout.status.clone().unwrap_or_default();
        Outline {
            phase: format!("{:?}", st.phase),
            step: st.current_step,
            pods: s.pods.iter().map(|p| (p.name.clone(), p.state)).collect(),
        }
    }

    /// One line per change from `before` to `self`.
    pub fn changes(&self, before: &Outline) -> Vec<String> {
        let mut lines = Vec::new();
        if self.phase != before.phase || self.step != before.step {
            lines.push(format!(
                "rollout {}{}",
                self.phase,
                self.step
                    .as_deref()
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default()
            ));
        }
        for (pod, state) in &self.pods {
            match before.pods.get(pod) {
                None => lines.push(format!("pod {pod} {}", state.as_str())),
                Some(was) if was != state => {
                    lines.push(format!("pod {pod} {} -> {}", was.as_str(), state.as_str()))
                }
                Some(_) => {}
            }
        }
        for (pod, was) in &before.pods {
            if !self.pods.contains_key(pod) {
                lines.push(format!("pod {pod} {} -> gone", was.as_str()));
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::DrainFigures;
    use crate::snapshot::PodRow;
    use graceful_operator::crd::{GracefulRolloutSpec, GracefulRolloutStatus, TargetRef};

    fn snapshot() -> Snapshot {
        let mut gr = graceful_operator::crd::GracefulRollout::new(
            "web",
            GracefulRolloutSpec {
                target_ref: TargetRef {
                    api_version: "apps/v1".into(),
                    kind: "Deployment".into(),
                    name: "web".into(),
                },
                strategy: Default::default(),
                paused: false,
                abort: false,
            },
        );
        gr.metadata.namespace = Some("shop".into());
        gr.status = Some(GracefulRolloutStatus {
            phase: Phase::Progressing,
            stable_revision: Some("5f7b9c96cd".into()),
            updated_revision: Some("6d94bfd987".into()),
            replicas: 3,
            updated: 1,
            serving: 3,
            draining: 1,
            current_step: Some("waiting for web-5f7b9c96cd-qj7sm to drain".into()),
            ..Default::default()
        });
        Snapshot {
            rollout: gr,
            deployment: None,
            pods: vec![
                PodRow {
                    name: "web-6d94bfd987-h45mm".into(),
                    revision: "6d94bfd987".into(),
                    ready: "2/2".into(),
                    state: PodState::Serving,
                    drain: None,
                },
                PodRow {
                    name: "web-5f7b9c96cd-qj7sm".into(),
                    revision: "5f7b9c96cd".into(),
                    ready: "1/2".into(),
                    state: PodState::Draining,
                    drain: Some(DrainFigures {
                        phase: "quiescing".into(),
                        phase_seconds: 3.2,
                        requests_after_trigger: 40,
                        ..Default::default()
                    }),
                },
            ],
            data_planes: Some("kube-proxy 5s, load-balancer/web 120s".into()),
        }
    }

    #[test]
    fn a_plain_frame_has_the_phase_step_and_a_row_per_pod() {
        let text = frame(&snapshot(), Style { color: false });
        assert!(!text.contains('\x1b'), "{text}");
        assert!(
            text.contains("GracefulRollout shop/web -> Deployment web"),
            "{text}"
        );
        assert!(text.contains("Phase:     Progressing\n"), "{text}");
        assert!(
            text.contains("Step:      waiting for web-5f7b9c96cd-qj7sm to drain"),
            "{text}"
        );
        assert!(
            text.contains("stable 5f7b9c96cd, rolling out 6d94bfd987"),
            "{text}"
        );
        assert!(
            text.contains("Fronted:   kube-proxy 5s, load-balancer/web 120s\n"),
            "{text}"
        );
        let rows: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("POD")).collect();
        assert_eq!(rows.len(), 3, "{text}");
        assert!(rows[1].starts_with("web-6d94bfd987-h45mm  6d94bfd987   2/2    serving"));
        assert!(
            rows[2].contains("draining  quiescing 3.2s, 40 requests since the trigger"),
            "{text}"
        );
    }

    #[test]
    fn a_terminal_frame_is_coloured() {
        let text = frame(&snapshot(), Style { color: true });
        assert!(
            text.contains(&format!("{YELLOW}Progressing{RESET}")),
            "{text}"
        );
        assert!(text.contains(&format!("{GREEN}serving  {RESET}")), "{text}");
    }

    #[test]
    fn watch_lines_name_each_change_once() {
        let s = snapshot();
        let before = Outline::of(&s);
        assert!(before.changes(&before).is_empty());
        let mut after = before.clone();
        after.pods.remove("web-5f7b9c96cd-qj7sm");
        after
            .pods
            .insert("web-6d94bfd987-zz".into(), PodState::Starting);
        after.phase = "Healthy".into();
        after.step = None;
        assert_eq!(
            after.changes(&before),
            vec![
                "rollout Healthy",
                "pod web-6d94bfd987-zz starting",
                "pod web-5f7b9c96cd-qj7sm draining -> gone",
            ]
        );
    }
}
