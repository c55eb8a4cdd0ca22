//! Monitoring on the real cluster (issue 14): a real Prometheus (Debian's package) scrapes the
//! injected sidecars, the operator and the API server, and evaluates the chart's alert rules. After a managed rollout under load, a drain
//! cut at its deadline and a revision that never gets ready, every dashboard panel shows data,
//! the forced drain fires GracefulDrainForced and the rollback GracefulRolloutDegraded.

use std::time::{Duration, Instant};

use graceful_e2e::chart::{self, chart_dir};
use graceful_e2e::graceful::{self, injected_deployment, named_port_service};
use graceful_e2e::load::Load;
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::prometheus::Prometheus;
use graceful_e2e::{cluster, wait};
use graceful_operator::crd::{GracefulRollout, Phase};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(180);
/// Degraded must hold a minute before its alert fires (`for: 1m`), after the 20 s deadline and
/// the rollback.
const ALERT_TIMEOUT: Duration = Duration::from_secs(180);

fn fail(ns: &TestNamespace, prometheus: &Prometheus, msg: String) -> ! {
    ns.print_diagnostics();
    eprintln!("--- prometheus log\n{}", prometheus.log());
    panic!("{msg}")
}

#[tokio::test]
#[ignore = "needs the e2e cluster, the chart and Debian's prometheus (make e2e)"]
async fn prometheus_sees_rollouts_and_drains_and_the_alerts_fire_on_what_they_mean() {
    let client = cluster::client().await.unwrap();
    let ns = TestNamespace::create(&client, "monitoring").await.unwrap();
    let started = Instant::now();
    let prometheus = Prometheus::start(client.clone(), &chart::alert_rules())
        .await
        .expect("prometheus");
    let check = |r: graceful_e2e::Result<()>, what: &str| {
        r.unwrap_or_else(|e| fail(&ns, &prometheus, format!("{what}: {e}")))
    };

    // A managed rollout under load: rollouts, steps, drains, webhook reviews.
    let url = graceful::deploy_managed_demo(&ns, "web", 3, json!({"minServingSeconds": 2}))
        .await
        .unwrap_or_else(|e| fail(&ns, &prometheus, e.to_string()));
    let (rolled, report) = Load::default()
        .during(&url, async {
            let since = graceful::trigger(&ns, "web").await?;
            graceful::wait_rollout_finished(&ns, "web", since, ROLLOUT_TIMEOUT).await
        })
        .await
        .expect("load run");
    check(rolled.map(drop), "the managed rollout");
    eprintln!("managed rollout under load: {report}");
    assert_eq!(report.failed, 0, "{report}");

    // A revision that never gets ready: the Deployment's 20 s deadline, then the rollback.
    let deployments = ns.api::<Deployment>();
    let never_ready = json!({"spec": {"progressDeadlineSeconds": 20, "template": {"spec": {
        "containers": [{"name": "demo", "readinessProbe": {"httpGet": {"path": "/never-ready", "port": 8080}}}]
    }}}});
    check(
        deployments
            .patch(
                "web",
                &PatchParams::default(),
                &Patch::Strategic(&never_ready),
            )
            .await
            .map(drop)
            .map_err(Into::into),
        "the never-ready revision",
    );

    // Meanwhile, a drain cut at its deadline: a 2 s drain timeout (the deregister delay, a
    // fallback here, must not be longer), a 15 s request in flight.
    let mut slow = injected_deployment("slow", 1, "v1");
    let annotations = slow
        .spec
        .as_mut()
        .unwrap()
        .template
        .metadata
        .as_mut()
        .unwrap();
    let annotations = annotations.annotations.get_or_insert_with(Default::default);
    annotations.insert("graceful.dev/drain-timeout".into(), "2s".into());
    annotations.insert("graceful.dev/deregister-delay".into(), "1s".into());
    ns.apply(&slow).await.unwrap();
    ns.apply(&named_port_service("slow")).await.unwrap();
    check(
        wait::rollout(&deployments, "slow", ROLLOUT_TIMEOUT)
            .await
            .map(drop),
        "slow ready",
    );
    let pods = ns.api::<Pod>();
    let pod = pods
        .list(&ListParams::default().labels("app=slow"))
        .await
        .unwrap()
        .items
        .remove(0);
    let ip = pod.status.and_then(|s| s.pod_ip).expect("pod IP");
    let name = pod.metadata.name.expect("name");
    let in_flight = tokio::spawn(async move {
        // Cut by the drain's deadline: the answer is an error, whatever it says.
        wait::http_get(&format!("{ip}:9080"), "/slow?ms=15000").await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    pods.delete(&name, &DeleteParams::default()).await.unwrap();
    let cut = in_flight.await.expect("request task");
    assert!(
        cut.as_ref()
            .map_or(true, |(status, _)| !status.contains(" 200 ")),
        "the 15 s request was not cut: {cut:?}"
    );

    let gr = wait::until("web Degraded", ALERT_TIMEOUT, || async {
        let gr = ns.api::<GracefulRollout>().get("web").await?;
        Ok(gr.status.filter(|s| s.phase == Phase::Degraded).map(|_| ()))
    })
    .await;
    check(gr, "the rollback");

    // The two alerts, for this namespace.
    let firing = wait::until_seen("both alerts firing", ALERT_TIMEOUT, || async {
        let firing = prometheus.firing().await?;
        let ours = |name: &str| {
            firing
                .iter()
                .any(|(alert, labels)| alert == name && labels["namespace"] == ns.name.as_str())
        };
        let seen = format!("{firing:?}");
        Ok(
            if ours("GracefulDrainForced") && ours("GracefulRolloutDegraded") {
                Ok(firing)
            } else {
                Err(seen)
            },
        )
    })
    .await
    .unwrap_or_else(|e| fail(&ns, &prometheus, e.to_string()));
    eprintln!(
        "firing after {:.0}s: {:?}",
        started.elapsed().as_secs_f64(),
        firing.iter().map(|(a, _)| a).collect::<Vec<_>>()
    );

    // What was scraped, and every panel's query over the test's time.
    let window = started.elapsed() + Duration::from_secs(30);
    for (job, least) in [
        ("graceful-sidecars", 3),
        ("graceful-operator", 2),
        ("apiserver", 1),
    ] {
        let up = prometheus.targets_up(job).await.unwrap();
        assert!(up >= least, "{job}: {up} targets up, want {least}");
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("dashboards/graceful.json")).unwrap(),
    )
    .unwrap();
    let mut empty = Vec::new();
    let mut panels = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        let Some(targets) = panel["targets"].as_array() else {
            continue;
        };
        panels += 1;
        let mut series = 0;
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m");
            series += prometheus.series_over(&expr, window).await.unwrap();
        }
        eprintln!("panel {}: {series} series", panel["title"]);
        if series == 0 {
            empty.push(panel["title"].to_string());
        }
    }
    assert!(panels >= 10);
    // Every alert expression evaluates, and what it reads is scraped.
    for expr in [
        "graceful_operator_drains_total",
        "graceful_operator_rollout_phase",
        "graceful_operator_leader",
        "apiserver_admission_webhook_admission_duration_seconds_count{name=\"inject.graceful.dev\"}",
    ] {
        if prometheus.series_over(expr, window).await.unwrap() == 0 {
            empty.push(expr.to_owned());
        }
    }
    if !empty.is_empty() {
        fail(&ns, &prometheus, format!("no data for: {empty:?}"));
    }
}
