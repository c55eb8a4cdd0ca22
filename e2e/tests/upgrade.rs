//! graceful itself upgraded while it guards live traffic: `helm upgrade` of the release from the
//! version deploy.sh installed to a later one pushed beside it (images.sh and deploy.sh push
//! the same binaries under both versions, so the operator's pods and every new sidecar change
//! image), or, under `make upgrade-test FROM=<ref>`, from an older build of graceful to this
//! tree's, as a user upgrades from the registry, while
//! - a GracefulRollout is half way (its first new pod up): it must finish under the new operator;
//! - injected pods serve vegeta's load and are rolled out during the upgrade, so pods are
//!   created while the operator's own pods roll: the webhook must inject every one, and pods
//!   the old webhook injected must drain under the new operator;
//! - a plain Deployment (no sidecar) is rolled out the same way under the same load: the
//!   control, which must drop requests, or the zeros prove nothing.
//!
//! Needs the cluster, the images and the chart (`make e2e` does all three).

use std::sync::Arc;
use std::time::{Duration, Instant};

use graceful_e2e::admission::AdmissionProbe;
use graceful_e2e::chart::{self, client_ca_value, helm, oci_chart, registry_value};
use graceful_e2e::graceful::{self, OPERATOR_NAMESPACE, OPERATOR_SELECTOR};
use graceful_e2e::load::{self, Load};
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::{cluster, demo, rollout, wait};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde_json::json;

const MANAGED: &str = "managed";
const INJECTED: &str = "injected";
const PLAIN: &str = "plain";
const TIMEOUT: Duration = Duration::from_secs(240);

/// Moves the release to `version` from the registry, as a user would, and waits for it.
fn helm_upgrade(version: &str) -> (bool, String) {
    helm(&[
        "upgrade",
        chart::RELEASE,
        &oci_chart(),
        "--version",
        version,
        "--plain-http",
        "-n",
        OPERATOR_NAMESPACE,
        "--set",
        &registry_value(),
        "--set-file",
        &client_ca_value(),
        "--wait",
        "--timeout",
        "180s",
    ])
}

/// The images the operator's pods run, one per pod; with `terminating`, pods on their way out too.
async fn operator_images(client: &kube::Client, terminating: bool) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let list = pods
        .list(&ListParams::default().labels(OPERATOR_SELECTOR))
        .await
        .expect("operator pods");
    list.items
        .iter()
        .filter(|p| terminating || p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.spec.as_ref()?.containers.first()?.image.clone())
        .collect()
}

/// Waits until no operator pod of an older version is left. `helm upgrade --wait` returns once
/// the new pods are ready, but an old one keeps answering admission reviews through its preStop
/// and drain (the API server's endpoints lag, and refusing would admit pods without the
/// sidecar): pods created meanwhile are injected with the old sidecar, as the supported skew
/// allows.
async fn old_operator_gone(client: &kube::Client, to: &str) -> graceful_e2e::Result<()> {
    let suffix = format!(":{to}");
    wait::until_seen("old operator pods gone", TIMEOUT, || async {
        let images = operator_images(client, true).await;
        Ok(match images.iter().all(|i| i.ends_with(&suffix)) {
            true => Ok(()),
            false => Err(format!("{images:?}")),
        })
    })
    .await
}

/// The sidecar image of every pod of `app`.
async fn sidecar_images(ns: &TestNamespace, app: &str) -> Vec<String> {
    let lp = ListParams::default().labels(&format!("app={app}"));
    let pods = ns.api::<Pod>().list(&lp).await.expect("pods").items;
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let inits = p.spec.as_ref()?.init_containers.as_ref()?;
            let sidecar = inits.iter().find(|c| c.name == "graceful-sidecar")?;
            sidecar.image.clone()
        })
        .collect()
}

#[tokio::test]
#[ignore = "needs the e2e cluster, the images and the chart (make e2e)"]
async fn helm_upgrade_under_load_drops_nothing_and_a_half_way_rollout_finishes() {
    let client = cluster::client().await.expect("e2e cluster");
    let from = chart::deployed_version();
    // make upgrade-test names the version to go to (this tree's, from an older one it
    // installed). Otherwise deploy.sh installed the first of two versions of the same binaries;
    // a second run on the same cluster finds the later one and moves back (both directions
    // change every image reference).
    let to = match (
        std::env::var("GRACEFUL_UPGRADE_TO"),
        from.strip_suffix(&chart::upgrade_version("")),
    ) {
        (Ok(to), _) => to,
        (Err(_), Some(first)) => first.to_owned(),
        (Err(_), None) => chart::upgrade_version(&from),
    };
    eprintln!("upgrade {from} -> {to}");
    let ns = TestNamespace::create(&client, "upgrade").await.unwrap();

    // A GracefulRollout that steps slowly enough to be half way when the upgrade starts.
    let managed_url =
        graceful::deploy_managed_demo(&ns, MANAGED, 3, json!({"minServingSeconds": 8}))
            .await
            .unwrap_or_else(|e| {
                ns.print_diagnostics();
                panic!("managed demo: {e}")
            });
    ns.apply(&graceful::named_port_service(INJECTED))
        .await
        .unwrap();
    ns.apply(&graceful::injected_deployment(INJECTED, 3, "v1"))
        .await
        .unwrap();
    ns.apply(&demo::service(PLAIN)).await.unwrap();
    ns.apply(&demo::deployment(PLAIN, 3, "v1")).await.unwrap();
    let deployments: Api<Deployment> = ns.api();
    let mut urls = Vec::new();
    for (name, port) in [(INJECTED, 80), (PLAIN, 80)] {
        wait::rollout(&deployments, name, Duration::from_secs(120))
            .await
            .unwrap();
        let ip = wait::cluster_ip(&ns.api(), name).await.unwrap();
        wait::service_serving(&ns.api(), name, &ip, port, 3, Duration::from_secs(60))
            .await
            .unwrap();
        urls.push(format!("http://{ip}/"));
    }
    let before = sidecar_images(&ns, INJECTED).await;
    assert!(
        before.iter().all(|i| i.ends_with(&format!(":{from}"))),
        "injected before the upgrade with {before:?}, not :{from}"
    );

    let injected_load = Load {
        rate: 300,
        ..Load::default()
    };
    let side_load = Load {
        rate: 150,
        ..Load::default()
    };
    let upgraded = Arc::new(tokio::sync::Notify::new());
    let probe = AdmissionProbe::start(&ns);
    let started = Instant::now();

    // The GracefulRollout half way, then the upgrade; the rollout must end under the new operator.
    let managed = side_load.during(&managed_url, async {
        let since = graceful::trigger(&ns, MANAGED).await?;
        graceful::wait_first_new_pod(&ns, MANAGED, Duration::from_secs(60)).await?;
        eprintln!(
            "[{:5.1}s] GracefulRollout half way: helm upgrade to {to}",
            started.elapsed().as_secs_f64()
        );
        let to = to.clone();
        let (ok, out) = tokio::task::spawn_blocking(move || helm_upgrade(&to))
            .await
            .expect("helm upgrade");
        eprintln!(
            "[{:5.1}s] helm upgrade ended (ok: {ok})",
            started.elapsed().as_secs_f64()
        );
        upgraded.notify_one();
        if !ok {
            return Err(graceful_e2e::Error::Cluster(format!(
                "helm upgrade failed: {out}"
            )));
        }
        graceful::wait_rollout_finished(&ns, MANAGED, since, TIMEOUT).await
    });
    // Injected pods rolled out while the operator's pods roll (pods created across the webhook's
    // hand-over), then once more under the new operator alone (pods the old webhook injected,
    // drained by the new one's world).
    let injected = injected_load.during(&urls[0], async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        rollout::restart(&ns, INJECTED).await?;
        wait::rollout(&deployments, INJECTED, TIMEOUT).await?;
        upgraded.notified().await;
        old_operator_gone(&client, &to).await?;
        rollout::restart(&ns, INJECTED).await?;
        wait::rollout(&deployments, INJECTED, TIMEOUT).await?;
        Ok::<_, graceful_e2e::Error>(())
    });
    // The control: the same kind of rollouts of the plain demo, under the same kind of load.
    let plain = side_load.during(&urls[1], async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        for _ in 0..3 {
            rollout::restart(&ns, PLAIN).await?;
            wait::rollout(&deployments, PLAIN, TIMEOUT).await?;
        }
        Ok::<_, graceful_e2e::Error>(())
    });
    let (managed, injected, plain) = tokio::join!(managed, injected, plain);
    let (answered, not_injected, missed) = probe.stop().await;
    let (managed, managed_report) = managed.expect("load on the managed demo");
    let (injected, injected_report) = injected.expect("load on the injected demo");
    let (plain, plain_report) = plain.expect("load on the plain demo");
    for (what, result) in [
        ("GracefulRollout across the upgrade", managed.map(|_| ())),
        ("injected rollouts", injected),
        ("plain rollouts", plain),
    ] {
        if let Err(e) = result {
            ns.print_diagnostics();
            panic!("{what}: {e}");
        }
    }
    eprintln!(
        "admission during the upgrade: {answered} pod creations answered, {not_injected} without the sidecar; {missed:?}"
    );
    load::check_sent(
        "managed (GracefulRollout across the upgrade)",
        &side_load,
        &managed_report,
    );
    load::check_sent(
        "injected (rolled out during and after the upgrade)",
        &injected_load,
        &injected_report,
    );
    load::check_sent("plain (control, no sidecar)", &side_load, &plain_report);

    let operators = operator_images(&client, false).await;
    assert!(
        !operators.is_empty() && operators.iter().all(|i| i.ends_with(&format!(":{to}"))),
        "operator pods after the upgrade: {operators:?}"
    );
    let after = sidecar_images(&ns, INJECTED).await;
    assert!(
        !after.is_empty() && after.iter().all(|i| i.ends_with(&format!(":{to}"))),
        "injected after the upgrade with {after:?}, not :{to}"
    );
    assert!(answered > 50, "too few pod creations probed: {answered}");
    assert_eq!(
        not_injected, 0,
        "pods admitted without the sidecar: {missed:?}"
    );
    assert!(
        missed.is_empty(),
        "pod creations that failed during the upgrade: {missed:?}"
    );
    assert!(
        plain_report.failed > 0,
        "the control dropped nothing ({plain_report}): this run could not have shown a drop"
    );
    assert_eq!(
        managed_report.failed, 0,
        "GracefulRollout across the upgrade: {managed_report}"
    );
    assert_eq!(
        injected_report.failed, 0,
        "injected pods across the upgrade: {injected_report}"
    );
}
