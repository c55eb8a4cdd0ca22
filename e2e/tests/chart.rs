//! The chart on the real cluster (issue 5): `helm lint` clean, the rendered templates accepted
//! by the API server (`kubectl apply --dry-run=server`), bad values refused by the schema, and
//! `helm install` then `helm uninstall` leaving nothing behind but the CRD.
//! Needs helm (built by make cluster-up) and, for the install, the images (make images).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use graceful_e2e::chart::{
    KUBE_VERSION, chart_dir, client_ca_value, deployed_version, helm, helm_ok, oci_chart, of_kind,
    registry_value, render, render_release,
};
use graceful_e2e::cluster::{self, kubectl};
use graceful_e2e::graceful::OPERATOR_NAMESPACE;
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::{demo, wait};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use serde_json::json;

#[test]
#[ignore = "needs helm (make cluster-up)"]
fn chart_lints_clean_with_every_values_variant() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let registry = registry_value();
    for extra in [
        vec![],
        vec!["--set", "image.tag=1.2.3,image.pullPolicy=Always"],
        vec!["--set", "webhook.certManager.enabled=true"],
        vec![
            "--set",
            "operator.replicas=1,controller.enabled=false,webhook.failurePolicy=Fail",
        ],
        vec!["--set", MONITORING],
        vec![
            "--set",
            "networkPolicy.enabled=false,rbac.aggregateToDefaultRoles=false",
        ],
        vec![
            "--set",
            "rbac.scope=namespaces,rbac.namespaces={shop,payments}",
        ],
    ] {
        let mut args = vec!["lint", chart, "--strict", "--set", &registry];
        args.extend(extra.iter().copied());
        let text = helm_ok(&args);
        assert!(
            !text.contains("[WARNING]") && !text.contains("[ERROR]"),
            "{text}"
        );
    }
}

#[test]
#[ignore = "needs helm (make cluster-up)"]
fn schema_refuses_bad_values_by_name() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    for (set, path) in [
        ("webhook.failurePolicy=Sometimes", "/webhook/failurePolicy"),
        ("operator.replicas=0", "/operator/replicas"),
        ("controller.concurrency=0", "/controller/concurrency"),
        ("image.pullPolicy=Maybe", "/image/pullPolicy"),
        ("image.registry=has space", "/image/registry"),
        ("sidecar.image.tag=1.0", "/sidecar/image"),
        (
            "webhook.excludedNamespaces[0]=Not_A_Namespace",
            "/webhook/excludedNamespaces/0",
        ),
        ("operator.typo=1", "/operator"),
        (
            "metrics.podMonitor.interval=often",
            "/metrics/podMonitor/interval",
        ),
        (
            "metrics.prometheusRule.labels.a=1",
            "/metrics/prometheusRule/labels/a",
        ),
        ("webhook.clientCA=not a certificate", "/webhook/clientCA"),
        (
            "networkPolicy.webhookFrom=everyone",
            "/networkPolicy/webhookFrom",
        ),
        (
            "rbac.aggregateToDefaultRoles=maybe",
            "/rbac/aggregateToDefaultRoles",
        ),
        ("rbac.scope=everywhere", "/rbac/scope"),
        ("rbac.namespaces[0]=Not_A_Namespace", "/rbac/namespaces/0"),
    ] {
        let registry = registry_value();
        let (ok, text) = helm(&[
            "template",
            "x",
            chart,
            KUBE_VERSION,
            "--set",
            &registry,
            "--set",
            set,
        ]);
        assert!(!ok, "{set} was accepted");
        assert!(text.contains(path), "{set}: {text}");
    }
}

/// Images come from image.registry, tagged with the chart's appVersion unless image.tag says
/// otherwise; with no registry the chart says what to set instead of starting pods that can
/// never pull.
#[test]
#[ignore = "needs helm (make cluster-up)"]
fn images_are_the_registrys_at_the_app_version_and_a_missing_registry_is_named() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let (ok, text) = helm(&["template", "x", chart, KUBE_VERSION]);
    assert!(!ok, "rendered without image.registry");
    assert!(text.contains("image.registry is empty"), "{text}");

    let meta: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    let app_version = meta["appVersion"].as_str().unwrap();
    for (set, tag) in [
        ("image.registry=registry.example:5000/team/", app_version),
        (
            "image.registry=registry.example:5000/team,image.tag=9.9.9",
            "9.9.9",
        ),
    ] {
        let docs = render(&["--set", set]);
        let deployment = of_kind(&docs, "Deployment")[0];
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            container["image"].as_str(),
            Some(format!("registry.example:5000/team/graceful-operator:{tag}").as_str()),
            "{set}"
        );
        let env = container["env"].as_sequence().unwrap();
        let sidecar = env
            .iter()
            .find(|e| e["name"] == "GRACEFUL_SIDECAR_IMAGE")
            .unwrap();
        assert_eq!(
            sidecar["value"].as_str(),
            Some(format!("registry.example:5000/team/graceful-sidecar:{tag}").as_str()),
            "{set}"
        );
    }
}

/// Every Prometheus Operator object of the chart turned on.
const MONITORING: &str = "metrics.podMonitor.enabled=true,metrics.serviceMonitor.enabled=true,\
     metrics.prometheusRule.enabled=true,metrics.dashboard.enabled=true";

#[test]
#[ignore = "needs helm (make cluster-up)"]
fn monitoring_objects_render_only_when_asked_and_select_what_serves_metrics() {
    let plain = render(&[]);
    for kind in ["PodMonitor", "ServiceMonitor", "PrometheusRule"] {
        assert!(
            of_kind(&plain, kind).is_empty(),
            "{kind} rendered by default"
        );
    }
    let docs = render(&["--set", MONITORING]);
    let pod_monitor = of_kind(&docs, "PodMonitor");
    assert_eq!(pod_monitor.len(), 1);
    let spec = &pod_monitor[0]["spec"];
    assert_eq!(
        spec["selector"]["matchLabels"]["graceful.dev/injected"],
        "true"
    );
    assert_eq!(spec["namespaceSelector"]["any"], true);
    // The port the webhook gives the sidecar's admin address.
    assert_eq!(spec["podMetricsEndpoints"][0]["port"], "graceful-admin");

    let monitor = of_kind(&docs, "ServiceMonitor");
    assert_eq!(monitor.len(), 1);
    let selector = monitor[0]["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("matchLabels");
    let port = &monitor[0]["spec"]["endpoints"][0]["port"];
    // Its series' namespace label is what they count, not the operator's own.
    assert_eq!(monitor[0]["spec"]["endpoints"][0]["honorLabels"], true);
    // Exactly one Service matches, and it has the port, aimed at the operator's metrics port.
    let services: Vec<_> = of_kind(&docs, "Service")
        .into_iter()
        .filter(|s| {
            selector
                .iter()
                .all(|(k, v)| s["metadata"]["labels"][k.as_str().unwrap()] == *v)
        })
        .collect();
    assert_eq!(services.len(), 1, "{services:?}");
    let ports = services[0]["spec"]["ports"].as_sequence().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p["name"] == *port && p["targetPort"] == "metrics"),
        "{ports:?}"
    );
    assert_eq!(of_kind(&docs, "PrometheusRule").len(), 1);

    // The dashboard: for Grafana's sidecar (its label), JSON with a query in every panel.
    let maps = of_kind(&docs, "ConfigMap");
    let dashboard = maps
        .iter()
        .find(|m| m["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("the dashboard ConfigMap");
    let json: serde_json::Value =
        serde_json::from_str(dashboard["data"]["graceful.json"].as_str().unwrap()).unwrap();
    let panels: Vec<_> = json["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .collect();
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for p in panels {
        assert!(
            p["targets"][0]["expr"]
                .as_str()
                .is_some_and(|e| !e.is_empty()),
            "panel {} has no query",
            p["title"]
        );
    }
}

/// The alert rules as shipped: promtool's checks, and e2e/monitoring/alerts_test.yaml's cases
/// (each alert fires on what it means, when it should, with the text an on-call engineer reads).
#[test]
#[ignore = "needs helm (make cluster-up) and promtool (scripts/deps.sh)"]
fn alert_rules_pass_promtool_and_fire_on_what_they_mean() {
    let dir = std::env::temp_dir().join(format!("graceful-alerts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = graceful_e2e::chart::alert_rules();
    std::fs::write(dir.join("rules.yaml"), rules).unwrap();
    let cases = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("monitoring/alerts_test.yaml");
    std::fs::copy(cases, dir.join("alerts_test.yaml")).unwrap();
    for args in [
        ["check", "rules", "rules.yaml"],
        ["test", "rules", "alerts_test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (scripts/deps.sh installs Debian's prometheus)");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs helm and the e2e cluster (make e2e)"]
fn cert_manager_variant_renders_a_certificate_and_ca_injection() {
    let chart = chart_dir();
    let rendered = helm_ok(&[
        "template",
        "graceful",
        chart.to_str().unwrap(),
        KUBE_VERSION,
        "-n",
        "graceful-system",
        "--set",
        &registry_value(),
        "--set",
        "webhook.certManager.enabled=true",
    ]);
    assert!(rendered.contains("kind: Certificate"), "{rendered}");
    assert!(rendered.contains("secretName: graceful-webhook-tls"));
    assert!(rendered.contains("cert-manager.io/inject-ca-from: graceful-system/graceful-webhook"));
    assert!(rendered.contains("value: external"));
}

/// Whether any rule of a (Cluster)Role names `resource`.
fn grants(role: &serde_yaml::Value, resource: &str) -> bool {
    role["rules"]
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|rule| {
            rule["resources"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|r| r == resource)
        })
}

/// The value of the operator container's environment variable `name` in a Deployment or Job.
fn env_of(workload: &serde_yaml::Value, name: &str) -> Option<String> {
    workload["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

/// rbac.scope=namespaces: no ClusterRole grants anything on namespaced resources (the
/// operator's keeps only its own webhook configuration), each listed namespace has the
/// operator's Role and RoleBinding, and the operator, its uninstall hook and both webhooks are
/// confined to the list. An empty list is refused by name; the default scope is unchanged.
#[test]
#[ignore = "needs helm (make cluster-up)"]
fn a_namespaced_scope_grants_in_its_namespaces_only() {
    let docs = render(&[
        "--set",
        "rbac.scope=namespaces",
        "--set",
        "rbac.namespaces={a,b}",
    ]);
    let listed = ["a", "b"];
    let cluster_roles = of_kind(&docs, "ClusterRole");
    assert!(!cluster_roles.is_empty());
    for role in &cluster_roles {
        for resource in [
            "deployments",
            "replicasets",
            "pods",
            "roles",
            "rolebindings",
            "endpointslices",
            "events",
        ] {
            assert!(
                !grants(role, resource),
                "ClusterRole {:?} grants {resource}",
                role["metadata"]["name"]
            );
        }
    }
    let operator = cluster_roles
        .iter()
        .find(|r| r["metadata"]["name"] == "graceful-operator")
        .expect("the operator's ClusterRole");
    assert_eq!(
        operator["rules"].as_sequence().map(Vec::len),
        Some(1),
        "{operator:?}"
    );
    assert!(grants(operator, "mutatingwebhookconfigurations"));
    assert_eq!(
        operator["rules"][0]["resourceNames"][0],
        "graceful-sidecar-injector"
    );

    let roles = of_kind(&docs, "Role");
    let bindings = of_kind(&docs, "RoleBinding");
    for ns in listed {
        let role = roles
            .iter()
            .find(|r| r["metadata"]["namespace"] == ns && grants(r, "deployments"))
            .unwrap_or_else(|| panic!("no operator Role in {ns}"));
        for resource in [
            "gracefulrollouts",
            "replicasets",
            "pods",
            "roles",
            "rolebindings",
        ] {
            assert!(grants(role, resource), "the Role in {ns} lacks {resource}");
        }
        let binding = bindings
            .iter()
            .find(|b| {
                b["metadata"]["namespace"] == ns && b["roleRef"]["name"] == role["metadata"]["name"]
            })
            .unwrap_or_else(|| panic!("no RoleBinding to the Role in {ns}"));
        assert_eq!(binding["subjects"][0]["name"], "graceful-operator");
        assert_eq!(binding["subjects"][0]["namespace"], OPERATOR_NAMESPACE);
    }
    // Elsewhere only the release namespace's own Role, whose Deployment rule names the
    // operator's Deployment (the uninstall hook scales it to zero).
    for role in roles
        .iter()
        .filter(|r| !listed.iter().any(|ns| r["metadata"]["namespace"] == *ns))
    {
        assert_eq!(
            role["metadata"]["namespace"], OPERATOR_NAMESPACE,
            "{role:?}"
        );
        for rule in role["rules"].as_sequence().unwrap() {
            let resources = rule["resources"].as_sequence().unwrap();
            if resources.iter().any(|r| r == "deployments") {
                assert_eq!(rule["resourceNames"][0], "graceful-operator", "{rule:?}");
            }
            assert!(
                !resources.iter().any(|r| r == "replicasets" || r == "roles"),
                "{rule:?}"
            );
        }
    }

    // Both webhooks are consulted only in the list.
    let config = of_kind(&docs, "MutatingWebhookConfiguration")[0];
    for webhook in config["webhooks"].as_sequence().unwrap() {
        let expressions = webhook["namespaceSelector"]["matchExpressions"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{:?} has no namespaceSelector", webhook["name"]));
        assert!(
            expressions
                .iter()
                .any(|e| e["key"] == "kubernetes.io/metadata.name"
                    && e["operator"] == "In"
                    && e["values"] == serde_yaml::to_value(listed).unwrap()),
            "{:?}: {expressions:?}",
            webhook["name"]
        );
    }
    let deployment = of_kind(&docs, "Deployment")[0];
    assert_eq!(
        env_of(deployment, "GRACEFUL_NAMESPACES").as_deref(),
        Some("a,b")
    );
    let uninstall = of_kind(&docs, "Job")[0];
    assert_eq!(
        env_of(uninstall, "GRACEFUL_NAMESPACES").as_deref(),
        Some("a,b")
    );

    let chart = chart_dir();
    let (ok, text) = helm(&[
        "template",
        "x",
        chart.to_str().unwrap(),
        KUBE_VERSION,
        "--set",
        &registry_value(),
        "--set",
        "rbac.scope=namespaces",
    ]);
    assert!(!ok, "rendered a namespaced scope without namespaces");
    assert!(text.contains("rbac.namespaces is empty"), "{text}");

    // The default: everything in the ClusterRole, no Role outside the release namespace, the
    // operator unconfined.
    let docs = render(&[]);
    let operator = of_kind(&docs, "ClusterRole")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "graceful-operator")
        .expect("the operator's ClusterRole");
    assert!(grants(operator, "deployments") && grants(operator, "roles"));
    assert!(
        of_kind(&docs, "Role")
            .iter()
            .all(|r| r["metadata"]["namespace"] == OPERATOR_NAMESPACE)
    );
    assert_eq!(
        env_of(of_kind(&docs, "Deployment")[0], "GRACEFUL_NAMESPACES"),
        None
    );
}

#[tokio::test]
#[ignore = "needs helm and the e2e cluster (make e2e)"]
async fn rendered_templates_are_accepted_by_the_api_server() {
    let client = cluster::client().await.unwrap();
    let ns = TestNamespace::create(&client, "chart-dry").await.unwrap();
    let chart = chart_dir();
    let rendered = helm_ok(&[
        "template",
        "graceful-dryrun",
        chart.to_str().unwrap(),
        KUBE_VERSION,
        "-n",
        &ns.name,
        "--set",
        &registry_value(),
        "--set-file",
        &client_ca_value(),
    ]);
    let out = cluster::kubectl_with_input(
        &["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"],
        &rendered,
    )
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
    for kind in [
        "serviceaccount/",
        "clusterrole.rbac.authorization.k8s.io/",
        "role.rbac.authorization.k8s.io/",
        "service/",
        "deployment.apps/",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/",
        "poddisruptionbudget.policy/",
        "lease.coordination.k8s.io/",
        "networkpolicy.networking.k8s.io/",
        "configmap/",
    ] {
        assert!(text.contains(kind), "{kind} not applied: {text}");
    }
}

const ROLLOUTS: &str = "gracefulrollouts.graceful.dev";

/// `kubectl auth can-i VERB RESOURCE` in `namespace` as ServiceAccount `sa` of `home`.
fn can_i(verb: &str, resource: &str, namespace: &str, home: &str, sa: &str) -> bool {
    let out = cluster::kubectl()
        .unwrap()
        .args(["auth", "can-i", verb, resource, "-n", namespace])
        .arg(format!("--as=system:serviceaccount:{home}:{sa}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

/// The release's aggregated ClusterRoles put GracefulRollouts in the built-in view and edit:
/// a user bound to view in a namespace reads them there and writes none, one bound to edit also
/// writes them, in that namespace only; one bound to nothing does neither.
#[tokio::test]
#[ignore = "needs the e2e cluster and the chart (make e2e)"]
async fn the_built_in_roles_cover_gracefulrollouts() {
    let client = cluster::client().await.unwrap();
    let ns = TestNamespace::create(&client, "chart-rbac").await.unwrap();
    let other = TestNamespace::create(&client, "chart-rbac-other")
        .await
        .unwrap();
    for (sa, role) in [
        ("viewer", Some("view")),
        ("editor", Some("edit")),
        ("stranger", None),
    ] {
        cluster::kubectl_output(&["create", "serviceaccount", sa, "-n", &ns.name]).unwrap();
        if let Some(role) = role {
            let subject = format!("--serviceaccount={}:{sa}", ns.name);
            let cluster_role = format!("--clusterrole={role}");
            cluster::kubectl_output(&[
                "create",
                "rolebinding",
                sa,
                &cluster_role,
                &subject,
                "-n",
                &ns.name,
            ])
            .unwrap();
        }
    }
    // The aggregation controller copies the rules into view and edit a moment after install.
    wait::until(
        "GracefulRollouts in the view ClusterRole",
        Duration::from_secs(30),
        || async { Ok(can_i("list", ROLLOUTS, &ns.name, &ns.name, "viewer").then_some(())) },
    )
    .await
    .unwrap();
    let mut table = Vec::new();
    for (sa, verb, namespace, expected) in [
        ("viewer", "get", &ns.name, true),
        ("viewer", "watch", &ns.name, true),
        ("viewer", "create", &ns.name, false),
        ("viewer", "delete", &ns.name, false),
        ("editor", "get", &ns.name, true),
        ("editor", "create", &ns.name, true),
        ("editor", "patch", &ns.name, true),
        ("editor", "delete", &ns.name, true),
        ("editor", "create", &other.name, false),
        ("stranger", "get", &ns.name, false),
    ] {
        let got = can_i(verb, ROLLOUTS, namespace, &ns.name, sa);
        table.push(format!("{sa:9} {verb:7} {namespace:28} {got}"));
        assert_eq!(
            got,
            expected,
            "{sa} {verb} in {namespace}:\n{}",
            table.join("\n")
        );
    }
    eprintln!(
        "kubectl auth can-i <verb> gracefulrollouts:\n{}",
        table.join("\n")
    );
}

/// A namespaced install (rbac.scope=namespaces) as RBAC sees it: a second release's
/// ServiceAccount, Roles, RoleBindings, ClusterRole and ClusterRoleBinding, confined to
/// `inside`, applied alone (its Deployment and webhook would meet the installed release's), and
/// its ServiceAccount asked `kubectl auth can-i`: what the operator does, it may do in `inside`,
/// and nowhere else, kube-system included. In its own namespace it holds only what the uninstall
/// hook needs there (listing pods; the operator's Deployment by name, not Deployments).
#[tokio::test]
#[ignore = "needs helm and the e2e cluster (make e2e)"]
async fn a_namespaced_install_cannot_touch_deployments_elsewhere() {
    let client = cluster::client().await.unwrap();
    let home = TestNamespace::create(&client, "scoped-home").await.unwrap();
    let inside = TestNamespace::create(&client, "scoped-in").await.unwrap();
    let outside = TestNamespace::create(&client, "scoped-out").await.unwrap();
    let release = "graceful-scoped";
    let listed = format!("rbac.namespaces={{{}}}", inside.name);
    let docs = render_release(
        release,
        &home.name,
        &[
            "--set",
            "rbac.scope=namespaces",
            "--set",
            &listed,
            "--set",
            "rbac.aggregateToDefaultRoles=false",
        ],
    );
    let rbac: Vec<&serde_yaml::Value> = [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
    ]
    .iter()
    .flat_map(|kind| of_kind(&docs, kind))
    .collect();
    // The namespaced objects go with the namespaces; the cluster-scoped ones are deleted here,
    // also when the test fails.
    let _cluster_scoped: Vec<ClusterObjectGuard> = rbac
        .iter()
        .filter(|d| d["metadata"]["namespace"].is_null())
        .map(|d| {
            ClusterObjectGuard(
                d["kind"].as_str().unwrap().to_lowercase(),
                d["metadata"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let manifest = rbac
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n");
    let (ok, text) = kubectl_apply(&manifest, &[]);
    eprintln!("{text}");
    assert!(ok, "{text}");
    let sa = of_kind(&docs, "ServiceAccount")[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    // The authorizer takes new Roles up a moment after they are written.
    wait::until(
        "the release's Role in force",
        Duration::from_secs(30),
        || async { Ok(can_i("patch", "deployments", &inside.name, &home.name, &sa).then_some(())) },
    )
    .await
    .unwrap();

    let columns = [
        (inside.name.as_str(), true),
        (outside.name.as_str(), false),
        ("kube-system", false),
    ];
    let mut table = vec![format!(
        "{:7} {:13} {:26} {:26} {:26} {} (home)",
        "verb", "resource", columns[0].0, columns[1].0, columns[2].0, home.name
    )];
    let mut wrong = Vec::new();
    // The last column: the release's own namespace, where the uninstall hook lists pods.
    for (verb, resource, at_home) in [
        ("patch", "deployments", false),
        ("patch", "replicasets", false),
        ("list", "pods", true),
        ("create", "roles", false),
        ("create", "rolebindings", false),
    ] {
        let mut row = format!("{verb:7} {resource:13}");
        for (namespace, expected) in columns
            .iter()
            .copied()
            .chain([(home.name.as_str(), at_home)])
        {
            let got = can_i(verb, resource, namespace, &home.name, &sa);
            row.push_str(&format!(" {:26}", if got { "yes" } else { "no" }));
            if got != expected {
                wrong.push(format!("{verb} {resource} in {namespace}: {got}"));
            }
        }
        table.push(row.trim_end().to_owned());
    }
    let table = table.join("\n");
    eprintln!(
        "kubectl auth can-i <verb> <resource> --as=system:serviceaccount:{}:{sa}:\n{table}",
        home.name
    );
    assert!(wrong.is_empty(), "{wrong:?}\n{table}");
}

/// Uninstalls a release when dropped, so a failed test leaves no cluster-scoped objects behind.
struct ReleaseGuard {
    release: &'static str,
    namespace: String,
}

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        // After a successful uninstall this finds nothing, which is fine.
        let _ = helm(&[
            "uninstall",
            self.release,
            "-n",
            &self.namespace,
            "--ignore-not-found",
        ]);
    }
}

/// A second release, webhook only, in its own namespace: it installs, serves, injects, and on
/// uninstall takes everything with it (also what the operator made at run time: the TLS Secret
/// and the EndpointSlice grants, through their owner reference); the CRD stays.
#[tokio::test]
#[ignore = "needs helm, the e2e cluster and the images (make e2e)"]
async fn install_then_uninstall_leaves_only_the_crd() {
    let client = cluster::client().await.unwrap();
    let home = TestNamespace::create(&client, "chart-install")
        .await
        .unwrap();
    let apps = TestNamespace::create(&client, "chart-apps").await.unwrap();
    // Only this release may inject in `apps`: the main release skips a namespace labelled
    // graceful.dev/injection=disabled, this one selects it by its own label instead.
    cluster::kubectl_output(&[
        "label",
        "namespace",
        &apps.name,
        "graceful.dev/injection=disabled",
        &format!("graceful.dev/e2e-release={}", home.name),
    ])
    .unwrap();
    let release = "a-graceful";
    // The chart as a user installs a release: from the registry, at the version deploy.sh
    // pushed, naming the images beside it (no values about images at all).
    let chart = oci_chart();
    let version = deployed_version();
    let selector =
        json!({"matchLabels": {"graceful.dev/e2e-release": home.name}, "matchExpressions": []});
    let _release = ReleaseGuard {
        release,
        namespace: home.name.clone(),
    };
    helm_ok(&[
        "install",
        release,
        &chart,
        "--version",
        &version,
        "--plain-http",
        "-n",
        &home.name,
        "--set",
        "operator.replicas=1,controller.enabled=false",
        "--set-json",
        &format!("webhook.namespaceSelector={selector}"),
        "--wait",
        "--timeout",
        "180s",
    ]);
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = format!("{release}-sidecar-injector");
    wait::until(
        "caBundle written by the operator",
        Duration::from_secs(90),
        || async {
            let c = configs.get(&config).await?;
            let bundle = c
                .webhooks
                .unwrap_or_default()
                .first()
                .and_then(|w| w.client_config.ca_bundle.clone());
            Ok(bundle.filter(|b| !b.0.is_empty()))
        },
    )
    .await
    .unwrap();

    // It injects: an annotated pod comes up with the sidecar, and its ServiceAccount got the
    // EndpointSlice grant.
    let mut pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "labels": {"app": "app"}, "annotations": {"graceful.dev/inject": "true"}},
        "spec": {"containers": [demo::container("chart")]},
    }))
    .unwrap();
    pod.spec.as_mut().unwrap().termination_grace_period_seconds = Some(40);
    // The API server takes up the new configuration (and its caBundle) asynchronously: dry runs
    // (no side effects) until the webhook injects.
    let dry_run = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    wait::until(
        "the new release's webhook in force",
        Duration::from_secs(60),
        || async {
            let answer = apps.api::<Pod>().create(&dry_run, &pod).await?;
            let inits = answer
                .spec
                .and_then(|s| s.init_containers)
                .unwrap_or_default();
            Ok(inits
                .iter()
                .any(|c| c.name == "graceful-sidecar")
                .then_some(()))
        },
    )
    .await
    .unwrap();
    apps.apply(&pod).await.unwrap();
    let created = apps.api::<Pod>().get("app").await.unwrap();
    let inits = created.spec.unwrap().init_containers.unwrap_or_default();
    assert!(
        inits.iter().any(|c| c.name == "graceful-sidecar"),
        "not injected"
    );
    // The grant follows the admitted pod, moments after it.
    let roles: Api<Role> = apps.api();
    let role = wait::until("the grant Role", Duration::from_secs(30), || async {
        Ok(roles.get_opt("graceful-endpointslice-reader").await?)
    })
    .await
    .unwrap();
    let owners = role.metadata.owner_references.unwrap_or_default();
    assert!(
        owners.iter().any(|o| o.name == config),
        "grant not owned by {config}: {owners:?}"
    );

    helm_ok(&[
        "uninstall",
        release,
        "-n",
        &home.name,
        "--wait",
        "--timeout",
        "120s",
    ]);
    let secrets: Api<Secret> = home.api();
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    let secret = format!("{release}-webhook-tls");
    let cluster_role = format!("{release}-operator");
    wait::until(
        "every object of the release gone",
        Duration::from_secs(90),
        || async {
            let left = [
                configs.get_opt(&config).await?.map(|_| config.clone()),
                cluster_roles
                    .get_opt(&cluster_role)
                    .await?
                    .map(|_| cluster_role.clone()),
                secrets.get_opt(&secret).await?.map(|_| secret.clone()),
                roles
                    .get_opt("graceful-endpointslice-reader")
                    .await?
                    .map(|_| "grant Role".to_string()),
            ];
            let left: Vec<String> = left.into_iter().flatten().collect();
            if !left.is_empty() {
                eprintln!("still there: {left:?}");
            }
            Ok(left.is_empty().then_some(()))
        },
    )
    .await
    .unwrap();
    // The operator pod takes its preStop sleep to go; then the namespace holds only defaults.
    let namespace = home.name.clone();
    wait::until(
        "the release namespace empty",
        Duration::from_secs(60),
        || {
            let namespace = namespace.clone();
            async move {
                let out = cluster::kubectl_output(&[
                    "get",
                    "all,sa,role,rolebinding,secret,lease,pdb",
                    "-n",
                    &namespace,
                    "-o",
                    "name",
                ])?;
                let left: Vec<String> = out
                    .lines()
                    .filter(|l| !l.starts_with("serviceaccount/default"))
                    .map(str::to_owned)
                    .collect();
                if !left.is_empty() {
                    eprintln!("left in {namespace}: {left:?}");
                }
                Ok(left.is_empty().then_some(()))
            }
        },
    )
    .await
    .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(
        crds.get_opt("gracefulrollouts.graceful.dev")
            .await
            .unwrap()
            .is_some(),
        "the CRD must stay"
    );
}

/// Applies helm-rendered YAML with kubectl; returns (success, output).
fn kubectl_apply(yaml: &str, extra: &[&str]) -> (bool, String) {
    let args: Vec<&str> = ["apply", "-f", "-"].iter().chain(extra).copied().collect();
    let out = cluster::kubectl_with_input(&args, yaml).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Deletes a cluster-scoped object (`kind`, `name`) when dropped, also when the test panics.
struct ClusterObjectGuard(String, String);

impl Drop for ClusterObjectGuard {
    fn drop(&mut self) {
        let _ = kubectl()
            .unwrap()
            .args(["delete", &self.0, &self.1, "--ignore-not-found"])
            .output();
    }
}

/// The API server's count of webhook calls that failed open, for our webhook.
fn fail_open_count() -> f64 {
    let metrics = cluster::kubectl_output(&["get", "--raw", "/metrics"]).unwrap();
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_admission_webhook_fail_open_count{")
                && l.contains("inject.graceful.dev")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What pod creation does while no operator replica answers: the chart's webhook configuration
/// and Service with no operator behind them, limited to one labelled test namespace. With
/// `Fail` an annotated pod is refused; with the default `Ignore` it is created (and the API
/// server counts the call as failed open).
#[tokio::test]
#[ignore = "needs helm and the e2e cluster (make e2e)"]
async fn operator_down_ignore_lets_pods_start_and_fail_blocks_them() {
    let client = cluster::client().await.unwrap();
    // The release's own namespace is never injected: the Service goes to `home`, pods to `ns`.
    let home = TestNamespace::create(&client, "webhook-down-home")
        .await
        .unwrap();
    let ns = TestNamespace::create(&client, "webhook-down")
        .await
        .unwrap();
    cluster::kubectl_output(&[
        "label",
        "namespace",
        &ns.name,
        &format!("graceful.dev/down-test={}", ns.name),
    ])
    .unwrap();
    let chart = chart_dir();
    let registry = registry_value();
    let release = "z-graceful-down";
    let _guard = ClusterObjectGuard(
        "mutatingwebhookconfiguration".into(),
        format!("{release}-sidecar-injector"),
    );
    let selector = format!(
        "webhook.namespaceSelector.matchLabels.graceful\\.dev/down-test={}",
        ns.name
    );
    let install = |policy: &str| {
        let rendered = helm_ok(&[
            "template",
            release,
            chart.to_str().unwrap(),
            KUBE_VERSION,
            "-n",
            &home.name,
            "--show-only",
            "templates/mutatingwebhookconfiguration.yaml",
            "--show-only",
            "templates/service.yaml",
            "--set",
            &registry,
            "--set",
            &format!("webhook.failurePolicy={policy}"),
            "--set",
            "webhook.timeoutSeconds=5",
            "--set",
            &selector,
        ]);
        let (ok, text) = kubectl_apply(&rendered, &["-n", &home.name]);
        assert!(ok, "{text}");
    };
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "annotated", "labels": {"app": "annotated"},
                     "annotations": {"graceful.dev/inject": "true"}},
        "spec": {"terminationGracePeriodSeconds": 40, "containers": [demo::container("down")]},
    }))
    .unwrap();
    let pods: Api<Pod> = ns.api();
    let dry_run = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };

    install("Fail");
    // The API server picks a new configuration up asynchronously: wait until it is in force.
    let refused = wait::until(
        "failurePolicy Fail in force",
        Duration::from_secs(30),
        || async {
            match pods.create(&dry_run, &pod).await {
                Err(kube::Error::Api(status)) => Ok(Some(status.message)),
                // Created, or the request never reached the API server: not in force yet.
                _ => Ok(None),
            }
        },
    )
    .await
    .unwrap();
    eprintln!("failurePolicy Fail, operator down: {refused}");
    assert!(refused.contains("inject.graceful.dev"), "{refused}");

    install("Ignore");
    wait::until(
        "failurePolicy Ignore in force",
        Duration::from_secs(30),
        || async { Ok(pods.create(&dry_run, &pod).await.ok().map(|_| ())) },
    )
    .await
    .unwrap();
    let before = fail_open_count();
    let created = pods.create(&Default::default(), &pod).await.unwrap();
    let after = fail_open_count();
    eprintln!(
        "failurePolicy Ignore, operator down: pod created; fail-open calls {before} -> {after}"
    );
    assert_eq!(created.metadata.name.as_deref(), Some("annotated"));
    assert!(
        after > before,
        "the webhook was not called (fail-open count {before} -> {after})"
    );
}

/// Puts the main release back as deploy.sh installs it, whatever happened to it (a test that
/// removes graceful must leave it installed for the tests after it).
struct Reinstall;

impl Drop for Reinstall {
    fn drop(&mut self) {
        let out = cluster::script("deploy.sh").output();
        match out {
            Ok(o) if o.status.success() => eprintln!("graceful reinstalled (deploy.sh)"),
            Ok(o) => eprintln!(
                "deploy.sh failed: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("deploy.sh did not run: {e}"),
        }
    }
}

/// Whether namespace `name` is gone within `timeout`.
async fn namespace_gone(client: &kube::Client, name: &str, timeout: Duration) -> bool {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let started = std::time::Instant::now();
    while started.elapsed() < timeout {
        if namespaces.get_opt(name).await.unwrap().is_none() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

/// `helm uninstall` leaves nothing that blocks anything: its pre-delete hook stops the operator,
/// hands every GracefulRollout's Deployment back (one in the middle of a rollout here) and lifts
/// the finalizers, so a namespace that holds a GracefulRollout is deleted at once afterwards.
/// The control, in the same run: with the operator merely stopped (no hook), such a namespace
/// stays Terminating until an operator runs again.
#[tokio::test]
#[ignore = "needs helm, the e2e cluster and the images (make e2e)"]
async fn uninstall_hands_every_rollout_back_and_leaves_no_namespace_stuck() {
    use graceful_e2e::graceful;
    let client = cluster::client().await.unwrap();
    let stuck = TestNamespace::create(&client, "uninstall-control")
        .await
        .unwrap();
    let held = TestNamespace::create(&client, "uninstall").await.unwrap();
    for ns in [&stuck, &held] {
        graceful::deploy_managed_demo(ns, "web", 2, json!({"minServingSeconds": 30}))
            .await
            .unwrap_or_else(|e| {
                ns.print_diagnostics();
                panic!("managed demo: {e}")
            });
    }
    let _reinstall = Reinstall;
    let operator = format!("deployment/{}-operator", graceful_e2e::chart::RELEASE);
    let scale = |n: &str| {
        cluster::kubectl_output(&[
            "-n",
            OPERATOR_NAMESPACE,
            "scale",
            &operator,
            "--replicas",
            n,
        ])
        .unwrap()
    };

    // Control: no operator running, no hook: the finalizer holds the namespace.
    scale("0");
    wait::until("operator pods gone", Duration::from_secs(90), || async {
        let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
        let lp = kube::api::ListParams::default().labels(graceful::OPERATOR_SELECTOR);
        Ok(pods.list(&lp).await?.items.is_empty().then_some(()))
    })
    .await
    .unwrap();
    cluster::kubectl_output(&["delete", "namespace", &stuck.name, "--wait=false"]).unwrap();
    let control_gone = namespace_gone(&client, &stuck.name, Duration::from_secs(15)).await;
    eprintln!("operator stopped, no hook: namespace gone within 15 s: {control_gone}");
    assert!(
        !control_gone,
        "the control namespace went without an operator: nothing here could have been stuck"
    );
    scale("2");
    assert!(
        namespace_gone(&client, &stuck.name, Duration::from_secs(120)).await,
        "the control namespace stayed after the operator came back"
    );

    // A rollout in the middle, then helm uninstall.
    graceful::trigger(&held, "web").await.unwrap();
    graceful::wait_first_new_pod(&held, "web", Duration::from_secs(60))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    helm_ok(&[
        "uninstall",
        graceful_e2e::chart::RELEASE,
        "-n",
        OPERATOR_NAMESPACE,
        "--wait",
        "--timeout",
        "180s",
    ]);
    eprintln!(
        "helm uninstall (pre-delete hook included): {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let gr = held
        .api::<graceful_operator::crd::GracefulRollout>()
        .get("web")
        .await
        .unwrap();
    assert!(
        gr.metadata.finalizers.unwrap_or_default().is_empty(),
        "the GracefulRollout kept a finalizer"
    );
    let deploy: k8s_openapi::api::apps::v1::Deployment = held.api().get("web").await.unwrap();
    assert!(
        deploy
            .metadata
            .labels
            .unwrap_or_default()
            .keys()
            .all(|k| !k.starts_with("graceful.dev/")),
        "the Deployment still carries graceful's labels"
    );
    // Handed back mid-rollout: the Deployment controller finishes it alone.
    wait::rollout(&held.api(), "web", Duration::from_secs(180))
        .await
        .unwrap();
    cluster::kubectl_output(&["delete", "namespace", &held.name, "--wait=false"]).unwrap();
    assert!(
        namespace_gone(&client, &held.name, Duration::from_secs(60)).await,
        "the namespace that held a GracefulRollout stayed after helm uninstall"
    );
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    assert!(
        configs
            .get_opt(&format!(
                "{}-sidecar-injector",
                graceful_e2e::chart::RELEASE
            ))
            .await
            .unwrap()
            .is_none(),
        "the webhook configuration stayed"
    );
}
