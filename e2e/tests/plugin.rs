//! `kubectl graceful` (the kubectl-graceful plugin) on the real cluster, as a user runs it:
//! found by kubectl on the PATH; `status --watch` in a tmux pane (a real terminal) while
//! `kubectl graceful restart` rolls the GracefulRollout out under load. The test reads the
//! screen every 200 ms and follows each old pod from serving to draining to gone. Then pause,
//! resume, abort and retry, each checked on the field a user would have edited.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use graceful_e2e::cluster::{self, tool};
use graceful_e2e::graceful;
use graceful_e2e::load::Load;
use graceful_e2e::namespace::TestNamespace;
use graceful_operator::crd::Phase;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use serde_json::json;

const APP: &str = "web";

fn fail(ns: &TestNamespace, msg: String) -> ! {
    ns.print_diagnostics();
    panic!("{msg}")
}

/// The plugin next to this test's binary (target/debug/kubectl-graceful; e2e/run.sh builds it).
fn plugin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/debug")
        .to_path_buf();
    assert!(
        dir.join("kubectl-graceful").is_file(),
        "no kubectl-graceful in {}: cargo build -p kubectl-graceful (e2e/run.sh does)",
        dir.display()
    );
    dir
}

/// A PATH where kubectl finds the plugin, as a user's would after installing it.
fn user_path() -> String {
    let kubectl = tool("kubectl").expect("kubectl");
    format!(
        "{}:{}:{}",
        plugin_dir().display(),
        kubectl.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// `kubectl graceful ARGS` with the plugin on the PATH, its output piped.
fn kubectl_graceful(args: &[&str]) -> std::process::Output {
    Command::new(tool("kubectl").unwrap())
        .arg("graceful")
        .args(args)
        .env("PATH", user_path())
        .output()
        .expect("kubectl runs")
}

/// A detached tmux session on its own server socket, killed on drop.
struct Tmux {
    session: String,
}

const TMUX_SOCKET: &str = "graceful-e2e";

impl Tmux {
    fn start(session: &str, command: &str) -> Self {
        let kubeconfig = std::env::var("KUBECONFIG").expect("KUBECONFIG (e2e/run.sh sets it)");
        let status = Command::new("tmux")
            .args(["-L", TMUX_SOCKET, "new-session", "-d", "-s", session])
            .args(["-x", "220", "-y", "50"])
            .args(["-e", &format!("KUBECONFIG={kubeconfig}")])
            // tmux gives a new session the PATH of the client that made it, whatever -e says:
            // set it in the command.
            .arg(format!("env PATH='{}' {command}", user_path()))
            .status()
            .expect("tmux runs (scripts/deps.sh installs it)");
        assert!(status.success(), "tmux new-session: {status}");
        Tmux {
            session: session.into(),
        }
    }

    /// The pane as text; with `escapes`, the colours too.
    fn screen(&self, escapes: bool) -> String {
        let out = Command::new("tmux")
            .args(["-L", TMUX_SOCKET, "capture-pane", "-p", "-t", &self.session])
            .args(escapes.then_some("-e"))
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", TMUX_SOCKET, "kill-session", "-t", &self.session])
            .status();
    }
}

/// Pod name -> (state, drain column) from the table on the screen; None before the table shows.
fn pods_on(screen: &str) -> Option<BTreeMap<String, (String, String)>> {
    let mut lines = screen.lines().skip_while(|l| !l.starts_with("POD "));
    lines.next()?;
    Some(
        lines
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                let name = cols.next()?.to_owned();
                let (_revision, _ready, state) = (cols.next()?, cols.next()?, cols.next()?);
                let drain = cols.collect::<Vec<_>>().join(" ");
                Some((name, (state.to_owned(), drain)))
            })
            .collect(),
    )
}

/// The rollout's phase line on the screen, kept when it changed.
fn note_phase(screen: &str, phases: &mut Vec<String>) {
    if let Some(phase) = screen.lines().find_map(|l| l.strip_prefix("Phase:")) {
        let phase = phase.trim().to_owned();
        if phases.last() != Some(&phase) {
            phases.push(phase);
        }
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn status_watch_follows_each_old_pod_from_serving_to_draining_to_gone_and_the_verbs_work() {
    let client = cluster::client().await.expect("cluster");
    let ns = TestNamespace::create(&client, "plugin")
        .await
        .expect("namespace");
    let url = graceful::deploy_managed_demo(&ns, APP, 3, json!({}))
        .await
        .unwrap_or_else(|e| fail(&ns, e.to_string()));
    let old: Vec<String> = ns
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(old.len(), 3, "{old:?}");

    // Piped, no --watch: one plain frame.
    let out = kubectl_graceful(&["status", APP, "-n", &ns.name]);
    let plain = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{plain}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !plain.contains('\x1b') && plain.contains("Phase:     Healthy"),
        "{plain}"
    );

    let tmux = Tmux::start(
        &ns.name,
        &format!(
            "kubectl graceful status {APP} -n {} --watch --interval 250ms",
            ns.name
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while pods_on(&tmux.screen(false)).is_none_or(|p| old.iter().any(|o| !p.contains_key(o))) {
        if Instant::now() > deadline {
            fail(
                &ns,
                format!("the watch never showed the pods:\n{}", tmux.screen(false)),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let coloured = tmux.screen(true);
    assert!(
        coloured.contains("\x1b["),
        "no colours on a terminal:\n{coloured}"
    );

    // Each old pod's states as the screen showed them, in order, repeats dropped.
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut drain_figures = Vec::new();
    let mut phases = Vec::new();
    let (finished, report) = Load::default()
        .during(&url, async {
            let since = k8s_openapi::jiff::Timestamp::now();
            let out = kubectl_graceful(&["restart", APP, "-n", &ns.name]);
            assert!(out.status.success(), "{out:?}");
            let done = graceful::wait_rollout_finished(&ns, APP, since, Duration::from_secs(180));
            tokio::pin!(done);
            loop {
                let screen = tmux.screen(false);
                note_phase(&screen, &mut phases);
                if let Some(pods) = pods_on(&screen) {
                    for name in &old {
                        let state = pods.get(name).map_or("gone", |(s, _)| s.as_str());
                        let history = seen.entry(name.clone()).or_default();
                        if history.last().map(String::as_str) != Some(state) {
                            history.push(state.to_owned());
                        }
                    }
                    drain_figures.extend(
                        pods.values()
                            .filter(|(s, d)| s == "draining" && !d.is_empty())
                            .map(|(_, d)| d.clone()),
                    );
                }
                tokio::select! {
                    result = &mut done => break result,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        })
        .await
        .unwrap_or_else(|e| fail(&ns, e.to_string()));
    finished.unwrap_or_else(|e| fail(&ns, format!("rollout: {e}")));
    // The screen lags the rollout's end by a read, and the old pods may outlive it by a moment:
    // read until they are off screen and the phase says Healthy.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let screen = tmux.screen(false);
        note_phase(&screen, &mut phases);
        let pods = pods_on(&screen).unwrap_or_default();
        for name in &old {
            if !pods.contains_key(name) {
                let history = seen.entry(name.clone()).or_default();
                if history.last().map(String::as_str) != Some("gone") {
                    history.push("gone".into());
                }
            }
        }
        let healthy = phases.last().is_some_and(|p| p.starts_with("Healthy"));
        if (healthy && old.iter().all(|o| !pods.contains_key(o))) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("load: {report}");
    eprintln!("phases on screen: {phases:?}");
    for (pod, history) in &seen {
        eprintln!("{pod}: {}", history.join(" -> "));
    }
    eprintln!(
        "drain figures seen (first 3 of {}): {:?}",
        drain_figures.len(),
        drain_figures.iter().take(3).collect::<Vec<_>>()
    );
    eprintln!("last screen:\n{}", tmux.screen(false));

    let mut problems = Vec::new();
    for name in &old {
        let history = &seen[name];
        // Drained (the sidecar done, the pod not gone yet) may show between the two.
        let walked = history.first().map(String::as_str) == Some("serving")
            && history.iter().any(|s| s == "draining")
            && history.last().map(String::as_str) == Some("gone");
        if !walked {
            problems.push(format!("{name}: {}", history.join(" -> ")));
        }
    }
    if !problems.is_empty() {
        fail(
            &ns,
            format!("old pods not seen serving, draining, gone: {problems:?}"),
        );
    }
    if !drain_figures
        .iter()
        .any(|d| d.starts_with("deregistering") || d.starts_with("quiescing"))
    {
        fail(
            &ns,
            format!("no live drain phase from a sidecar on screen: {drain_figures:?}"),
        );
    }
    if !phases.iter().any(|p| p.starts_with("Progressing"))
        || !phases.last().is_some_and(|p| p.starts_with("Healthy"))
    {
        fail(&ns, format!("phases on screen: {phases:?}"));
    }
    assert_eq!(report.failed, 0, "{report}");
    drop(tmux);

    // The verbs, on the same rollout, at rest.
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend([APP, "-n", &ns.name]);
        let out = kubectl_graceful(&all);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("kubectl graceful {}: {}", args.join(" "), said.trim());
        (out.status.success(), said)
    };
    let deployment_paused = || async {
        ns.api::<Deployment>()
            .get(APP)
            .await
            .unwrap()
            .spec
            .and_then(|s| s.paused)
            .unwrap_or(false)
    };
    let rollout = || async {
        ns.api::<graceful_operator::crd::GracefulRollout>()
            .get(APP)
            .await
            .unwrap()
    };

    assert!(run(&["pause"]).0);
    assert!(deployment_paused().await);
    let (ok, said) = run(&["resume"]);
    assert!(ok && said.contains("resumed"), "{said}");
    assert!(!deployment_paused().await);
    // Nothing paused any more: said so, exit status 1.
    let (ok, said) = run(&["resume"]);
    assert!(!ok && said.contains("is paused"), "{said}");

    // Nothing to retry on a healthy rollout.
    let (ok, said) = run(&["retry"]);
    assert!(!ok && said.contains("nothing was aborted"), "{said}");

    // Abort in the middle of a rollout: back to the stable pods, Degraded with the aborted
    // revision as the failed one; retry rolls that revision out again, to the end.
    assert!(run(&["restart"]).0);
    let started = graceful::wait_first_new_pod(&ns, APP, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| fail(&ns, e.to_string()));
    let aborted = started.status.unwrap().updated_revision.unwrap();
    assert!(run(&["abort"]).0);
    assert!(rollout().await.spec.abort);
    let degraded = graceful::wait_phase(&ns, APP, Phase::Degraded, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| fail(&ns, e.to_string()));
    let failed = degraded.status.unwrap().failed_revision;
    assert_eq!(failed.as_deref(), Some(aborted.as_str()));
    let since = k8s_openapi::jiff::Timestamp::now();
    let (ok, said) = run(&["retry"]);
    assert!(
        ok && said.contains(&format!("rolling out revision {aborted} again")),
        "{said}"
    );
    let done = graceful::wait_rollout_finished(&ns, APP, since, Duration::from_secs(180))
        .await
        .unwrap_or_else(|e| fail(&ns, e.to_string()));
    let status = done.status.unwrap();
    assert!(!done.spec.abort);
    assert_eq!(
        status.stable_revision.as_deref(),
        Some(aborted.as_str()),
        "{status:?}"
    );

    // A name that is neither a GracefulRollout nor a managed Deployment.
    let out = kubectl_graceful(&["status", "nothing-here", "-n", &ns.name]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no GracefulRollout named nothing-here"),
        "{err}"
    );
}
