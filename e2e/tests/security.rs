//! The security review's findings, shown on the cluster (issue 27):
//! - a review forged from a pod in another namespace is refused, writes nothing and learns
//!   nothing, while the same review with the API server's client certificate is answered (the
//!   control);
//! - the sidecar's admin port is not reachable through the app's Service: `/prestop` with the
//!   pod's own token, sent to the Service, reaches the app and drains nothing;
//! - that token, read with the built-in `view` role and sent from a pod in another namespace,
//!   fails no request and moves no traffic, while the same call from the node's address does;
//! - thousands of idle and slow connections at the sidecar (traffic and admin ports) and at the
//!   operator (webhook and metrics ports) hold no server up: real requests, pod admissions and
//!   scrapes are served beside them, memory stays under the limits, and the server closes them
//!   after its timeouts, not before.
//!
//! Needs the cluster, the images and the chart (`make e2e` does all three).

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::future::join_all;
use graceful_e2e::admission::AdmissionProbe;
use graceful_e2e::graceful::{self, OPERATOR_NAMESPACE, OPERATOR_SELECTOR};
use graceful_e2e::load::{self, Load};
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::{cluster, node, wait};
use graceful_sidecar::accept::HEADER_READ_TIMEOUT;
use graceful_sidecar::defaults::{ADMIN_PORT, TRAFFIC_PORT};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const APP: &str = "shop";
/// The chart's webhook and metrics ports.
const WEBHOOK_PORT: u16 = 9443;
const METRICS_PORT: u16 = 8080;
/// The webhook's TLS handshake timeout (operator/src/webhook/server.rs).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The injected sidecar's and the chart's operator memory limits.
const SIDECAR_LIMIT_MIB: f64 = 128.0;
const OPERATOR_LIMIT_MIB: f64 = 256.0;

async fn injected_app(ns: &TestNamespace) -> (String, Pod) {
    ns.apply(&graceful::named_port_service(APP)).await.unwrap();
    ns.apply(&graceful::injected_deployment(APP, 1, "v1"))
        .await
        .unwrap();
    wait::rollout(&ns.api::<Deployment>(), APP, Duration::from_secs(120))
        .await
        .unwrap();
    let ip = wait::cluster_ip(&ns.api(), APP).await.unwrap();
    wait::service_serving(&ns.api(), APP, &ip, 80, 1, Duration::from_secs(60))
        .await
        .unwrap();
    let pods = ns
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await
        .unwrap();
    (ip, pods.items.into_iter().next().expect("the app's pod"))
}

fn pod_ip(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP")
}

async fn operator_pods(client: &kube::Client) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .list(&ListParams::default().labels(OPERATOR_SELECTOR))
        .await
        .expect("operator pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && wait::is_ready(p))
        .collect()
}

/// The review the API server would send for creating an injected pod of `namespace` that runs
/// as ServiceAccount `victim`.
fn forged_review(namespace: &str) -> serde_json::Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-0000-0000-000000000027",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:elsewhere:forger"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "forged", "namespace": namespace, "labels": {"app": APP},
                             "annotations": {"graceful.dev/inject": "true"}},
                "spec": {"serviceAccountName": "victim",
                         "containers": [{"name": "app", "image": "x",
                                         "ports": [{"name": "http", "containerPort": 8080}]}]}
            },
            "dryRun": false
        }
    })
}

/// POSTs `review` to the webhook at `addr` with curl, from the network namespace of process
/// `from` (a pod's), presenting `identity` (certificate, key) when given: (HTTP status, body).
async fn post_review(
    from: u32,
    addr: &str,
    review: &serde_json::Value,
    identity: Option<(&str, &str)>,
) -> (u16, String) {
    let mut cmd = tokio::process::Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{from}/ns/net")).arg("curl");
    cmd.args([
        "-sS",
        "-k",
        "--max-time",
        "10",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ])
    .args([
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        "@-",
    ]);
    if let Some((cert, key)) = identity {
        cmd.args(["--cert", cert, "--key", key]);
    }
    cmd.arg(format!("https://{addr}/mutate"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("curl");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(review.to_string().as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl to the webhook: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, body.to_owned())
}

async fn rbac_names(ns: &TestNamespace) -> Vec<String> {
    let roles = ns.api::<Role>().list(&ListParams::default()).await.unwrap();
    let bindings = ns
        .api::<RoleBinding>()
        .list(&ListParams::default())
        .await
        .unwrap();
    let mut names: Vec<String> = roles
        .items
        .iter()
        .map(|r| format!("Role/{}", r.name_any()))
        .chain(
            bindings
                .items
                .iter()
                .map(|b| format!("RoleBinding/{}", b.name_any())),
        )
        .collect();
    names.sort();
    names
}

/// The sidecar's drain phase, from its admin port.
async fn drain_phase(pod: &Pod) -> String {
    let (_, body) = wait::http_get(&format!("{}:{ADMIN_PORT}", pod_ip(pod)), "/metrics")
        .await
        .unwrap();
    body.lines()
        .find(|l| l.starts_with("graceful_drain_phase{") && l.ends_with(" 1"))
        .unwrap_or("no phase")
        .to_owned()
}

#[tokio::test]
#[ignore = "needs the e2e cluster, the images and the chart (make e2e)"]
async fn forged_reviews_learn_nothing_and_the_admin_port_is_not_behind_the_service() {
    let client = cluster::client().await.expect("e2e cluster");
    let ns = TestNamespace::create(&client, "security").await.unwrap();
    let (service_ip, pod) = injected_app(&ns).await;

    // Forged reviews, sent to the webhook's Service from a pod in another namespace.
    let outsiders = TestNamespace::create(&client, "security-outsider")
        .await
        .unwrap();
    let from = pod_in(&outsiders).await;
    let webhook: Api<Service> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let webhook_ip = wait::cluster_ip(&webhook, "graceful-webhook")
        .await
        .unwrap();
    let addr = format!("{webhook_ip}:443");
    let review = forged_review(&ns.name);
    let before = rbac_names(&ns).await;
    let (code, body) = post_review(from, &addr, &review, None).await;
    eprintln!("forged review without a client certificate: {code} {body}");
    assert_eq!(code, 403, "a forged review was answered: {body}");
    assert!(
        !body.contains("patch") && !body.contains(APP),
        "the refusal tells something: {body}"
    );
    // The control: the same review with the API server's client certificate is answered, so
    // what the forger did not get is real.
    let pki = cluster::state_dir().join("pki");
    let (cert, key) = (
        pki.join("webhook-client.crt"),
        pki.join("webhook-client.key"),
    );
    let identity = (cert.to_str().unwrap(), key.to_str().unwrap());
    let (code, body) = post_review(from, &addr, &review, Some(identity)).await;
    assert_eq!(
        code, 200,
        "the API server's review was not answered: {body}"
    );
    assert!(
        body.contains("\"patch\""),
        "no patch for the API server: {body}"
    );
    // Neither review wrote anything: grants come from admitted pods only.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rbac_names(&ns).await;
    assert_eq!(before, after, "reviews created RBAC objects");
    assert!(
        !after.iter().any(|n| n.contains("victim")),
        "a grant for the forged ServiceAccount: {after:?}"
    );

    // The admin port behind the Service: /prestop with the pod's own token, sent to the
    // Service, is a request for the app.
    let token = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == "graceful-sidecar"))
        .and_then(|c| c.env.as_ref())
        .and_then(|e| e.iter().find(|e| e.name == "GRACEFUL_PRESTOP_TOKEN"))
        .and_then(|e| e.value.clone())
        .expect("the sidecar's preStop token in the pod spec");
    let mut stream = TcpStream::connect(format!("{service_ip}:80"))
        .await
        .unwrap();
    let request = format!(
        "GET /prestop HTTP/1.1\r\nHost: {APP}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("answered")
        .unwrap();
    eprintln!(
        "/prestop through the Service: {}",
        response.lines().next().unwrap_or_default()
    );
    assert!(
        !response.contains("\"trigger\""),
        "the Service reached the admin port: {response}"
    );
    let ports: Vec<i32> = ns
        .api::<Service>()
        .get(APP)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, [80], "the Service exposes more than the app's port");
    assert!(
        tokio::time::timeout(
            Duration::from_secs(3),
            TcpStream::connect(format!("{service_ip}:{ADMIN_PORT}"))
        )
        .await
        .map_or(true, |c| c.is_err()),
        "the admin port answers on the Service's address"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let phase = drain_phase(&pod).await;
    assert!(
        phase.contains("phase=\"serving\""),
        "the sidecar drains: {phase}"
    );
    let now = ns.api::<Pod>().get(&pod.name_any()).await.unwrap();
    assert!(wait::is_ready(&now), "the pod left Ready");
}

/// The largest resident memory among the operator's replicas, in MiB.
fn max_rss(operators: &[Pod]) -> f64 {
    operators
        .iter()
        .map(|op| node::container_rss_mib(op, "operator").unwrap())
        .fold(0.0, f64::max)
}

/// A group of connections opened at one server, which must close them `deadline` after they
/// opened (its timeout): none closed 5 s before, all closed 4 s after.
struct Flood {
    what: String,
    streams: Vec<TcpStream>,
    /// When the first and the last connection opened.
    first: Instant,
    last: Instant,
    /// A slow client: one more byte every second.
    trickled: bool,
    deadline: Duration,
    closed_before: Option<usize>,
    closed_after: Option<usize>,
}

impl Flood {
    async fn open(
        what: &str,
        addr: &str,
        n: usize,
        first_bytes: &[u8],
        deadline: Duration,
    ) -> Flood {
        let mut streams = Vec::with_capacity(n);
        let first = Instant::now();
        for i in 0..n {
            let mut s = TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("{what}: connection {i} to {addr}: {e}"));
            if !first_bytes.is_empty() {
                s.write_all(first_bytes).await.unwrap();
            }
            streams.push(s);
        }
        Flood {
            what: format!("{n} {what} ({addr})"),
            streams,
            first,
            last: Instant::now(),
            trickled: !first_bytes.is_empty(),
            deadline,
            closed_before: None,
            closed_after: None,
        }
    }

    /// One more byte on every connection still open (a slow client's next byte).
    async fn trickle(&mut self) {
        for s in &mut self.streams {
            let _ = s.write_all(b"X").await;
        }
    }

    /// How many the server has closed (EOF or reset seen within a short read).
    async fn closed(&mut self) -> usize {
        let reads = self.streams.iter_mut().map(|s| async move {
            let mut b = [0u8; 512];
            loop {
                match tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    Ok(Ok(_)) => continue,
                    Err(_) => return false,
                }
            }
        });
        join_all(reads).await.into_iter().filter(|c| *c).count()
    }

    /// Counts the closed ones once 5 s before the first connection's deadline and once 4 s
    /// after the last one's.
    async fn check(&mut self) {
        if self.closed_before.is_none()
            && self.first.elapsed() >= self.deadline - Duration::from_secs(5)
        {
            self.closed_before = Some(self.closed().await);
        }
        if self.closed_after.is_none()
            && self.last.elapsed() >= self.deadline + Duration::from_secs(4)
        {
            self.closed_after = Some(self.closed().await);
        }
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster, the images and the chart (make e2e)"]
async fn idle_and_slow_connections_are_bounded_and_closed_while_traffic_is_served() {
    // About 4,000 sockets in this process.
    rlimit::increase_nofile_limit(16_384).expect("open-file limit");
    let client = cluster::client().await.expect("e2e cluster");
    let ns = TestNamespace::create(&client, "flood").await.unwrap();
    let (service_ip, pod) = injected_app(&ns).await;
    let sidecar = pod_ip(&pod);
    let operators = operator_pods(&client).await;
    assert!(!operators.is_empty(), "no ready operator pod");

    let rss_before = (
        node::container_rss_mib(&pod, "graceful-sidecar").unwrap(),
        max_rss(&operators),
    );
    let opened = Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: x\r\n".as_slice();
    // A TLS record header announcing 512 bytes of ClientHello, which then come a byte a second.
    let hello = b"\x16\x03\x01\x02\x00".as_slice();
    let (traffic_port, admin_port) = (
        format!("{sidecar}:{TRAFFIC_PORT}"),
        format!("{sidecar}:{ADMIN_PORT}"),
    );
    let mut floods = vec![
        Flood::open(
            "silent at the sidecar",
            &traffic_port,
            2000,
            b"",
            HEADER_READ_TIMEOUT,
        )
        .await,
        Flood::open(
            "slow heads at the sidecar",
            &traffic_port,
            200,
            head,
            HEADER_READ_TIMEOUT,
        )
        .await,
        Flood::open(
            "silent at the sidecar's admin port",
            &admin_port,
            200,
            b"",
            HEADER_READ_TIMEOUT,
        )
        .await,
    ];
    for op in &operators {
        let ip = pod_ip(op);
        let (metrics, webhook) = (
            format!("{ip}:{METRICS_PORT}"),
            format!("{ip}:{WEBHOOK_PORT}"),
        );
        floods.push(
            Flood::open(
                "silent at the operator's metrics port",
                &metrics,
                200,
                b"",
                HEADER_READ_TIMEOUT,
            )
            .await,
        );
        floods.push(
            Flood::open(
                "silent at the webhook",
                &webhook,
                300,
                b"",
                TLS_HANDSHAKE_TIMEOUT,
            )
            .await,
        );
        floods.push(
            Flood::open(
                "slow handshakes at the webhook",
                &webhook,
                100,
                hello,
                TLS_HANDSHAKE_TIMEOUT,
            )
            .await,
        );
    }
    let held = opened.elapsed();
    let total: usize = floods.iter().map(|f| f.streams.len()).sum();
    eprintln!("{total} connections open in {held:.1?}");

    // Real traffic, admissions and scrapes beside them, while the slow ones trickle.
    let traffic = Load {
        rate: 100,
        ..Load::default()
    };
    let probe = AdmissionProbe::start(&ns);
    let metrics_of = operators
        .iter()
        .map(|p| format!("{}:{METRICS_PORT}", pod_ip(p)))
        .collect::<Vec<_>>();
    // Every flood is checked 4 s after its deadline; the load runs until the last one is.
    let give_up = HEADER_READ_TIMEOUT + Duration::from_secs(15);
    let (observed, report) = traffic
        .during(&format!("http://{service_ip}/"), async {
            let (mut scrapes, mut scrape_failures) = (0, Vec::new());
            let (mut peak_sidecar, mut peak_operator) = (0f64, 0f64);
            while floods.iter().any(|f| f.closed_after.is_none()) && opened.elapsed() < give_up {
                for f in floods.iter_mut().filter(|f| f.trickled) {
                    f.trickle().await;
                }
                for addr in &metrics_of {
                    scrapes += 1;
                    if let Err(e) = wait::http_get(addr, "/metrics").await {
                        scrape_failures.push(e.to_string());
                    }
                }
                let rss = node::container_rss_mib(&pod, "graceful-sidecar").unwrap();
                peak_sidecar = peak_sidecar.max(rss);
                peak_operator = peak_operator.max(max_rss(&operators));
                for f in &mut floods {
                    f.check().await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            (scrapes, scrape_failures, peak_sidecar, peak_operator)
        })
        .await
        .expect("vegeta");
    let (answered, not_injected, missed) = probe.stop().await;
    let (scrapes, scrape_failures, peak_sidecar, peak_operator) = observed;

    eprintln!("traffic through the Service beside them: {report}");
    eprintln!("admissions: {answered} answered, {not_injected} without the sidecar; {missed:?}");
    eprintln!(
        "operator scrapes: {scrapes}, failed {}: {scrape_failures:?}",
        scrape_failures.len()
    );
    let at_sidecar: usize = floods[..3].iter().map(|f| f.streams.len()).sum();
    eprintln!(
        "resident memory: sidecar {:.1} MiB before, {peak_sidecar:.1} MiB at most with {at_sidecar} connections ({:.1} KiB each; limit {SIDECAR_LIMIT_MIB} MiB); operator {:.1} MiB before, {peak_operator:.1} MiB at most (limit {OPERATOR_LIMIT_MIB} MiB)",
        rss_before.0,
        (peak_sidecar - rss_before.0) * 1024.0 / at_sidecar as f64,
        rss_before.1,
    );
    for f in &floods {
        eprintln!(
            "{} (opened in {:.1?}): closed {:?} {:?} after the first opened, {:?} {:?} after the last",
            f.what,
            f.last - f.first,
            f.closed_before,
            f.deadline - Duration::from_secs(5),
            f.closed_after,
            f.deadline + Duration::from_secs(4)
        );
    }
    for f in &floods {
        // Still held shortly before the timeout: what closes them is the timeout, not a refusal.
        assert_eq!(
            f.closed_before,
            Some(0),
            "{}: closed before the timeout",
            f.what
        );
        assert_eq!(
            f.closed_after,
            Some(f.streams.len()),
            "{}: left open after the timeout",
            f.what
        );
    }
    load::check_sent("traffic beside the flood", &traffic, &report);
    assert_eq!(
        report.failed, 0,
        "requests failed beside the flood: {report}"
    );
    assert!(answered > 50, "too few admissions probed: {answered}");
    assert_eq!(
        not_injected, 0,
        "pods admitted without the sidecar: {missed:?}"
    );
    assert!(missed.is_empty(), "admissions failed: {missed:?}");
    assert!(
        scrape_failures.is_empty(),
        "scrapes failed: {scrape_failures:?}"
    );
    assert!(
        peak_sidecar < SIDECAR_LIMIT_MIB,
        "sidecar memory {peak_sidecar:.1} MiB"
    );
    assert!(
        peak_operator < OPERATOR_LIMIT_MIB,
        "operator memory {peak_operator:.1} MiB"
    );
}

/// A plain pod (the demo, not injected) in `ns`: the PID of its process, whose network
/// namespace is the pod's (`nsenter --net`), so what the test sends from it comes from a pod.
async fn pod_in(ns: &TestNamespace) -> u32 {
    ns.apply(&graceful_e2e::demo::pod(
        "outsider",
        &graceful_e2e::demo::image("graceful-demo"),
        &[],
    ))
    .await
    .unwrap();
    let pod = wait::pod_ready(&ns.api(), "outsider", Duration::from_secs(60))
        .await
        .unwrap();
    let id = node::container_id(&pod, "main").expect("the pod's container");
    *node::container_pids(&id)
        .unwrap()
        .first()
        .expect("its process")
}

/// `GET /prestop` with `token` to `pod`'s admin port, sent from inside the network namespace of
/// the process `pid` (another pod's), as that pod would send it; the answer's body.
fn prestop_from(pid: u32, pod: &Pod, token: &str) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["curl", "-sS", "-m", "30", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("http://{}:{ADMIN_PORT}/prestop", pod_ip(pod)))
        .output()
        .expect("nsenter and curl");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The sidecar's longest hold so far, from its metrics.
async fn longest_hold(pod: &Pod) -> f64 {
    let (_, body) = wait::http_get(&format!("{}:{ADMIN_PORT}", pod_ip(pod)), "/metrics")
        .await
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix("graceful_longest_hold_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Finding 4: anyone who may `get` a pod (the built-in `view` role) reads its preStop token. From
/// a pod in another namespace, that token's /prestop on a pod that is not being deleted is let
/// through, and under load it fails nothing, moves no traffic and restarts nothing: requests wait
/// at most a few seconds. The control, in the same run: the same call from the node's address,
/// where only the kubelet (or root on the node) calls from, takes the pod out of its Service.
#[tokio::test]
#[ignore = "needs the e2e cluster, the images and the chart (make e2e)"]
async fn a_stolen_prestop_token_from_another_pod_moves_no_traffic() {
    let client = cluster::client().await.expect("e2e cluster");
    let ns = TestNamespace::create(&client, "token").await.unwrap();
    let attacker = TestNamespace::create(&client, "token-thief").await.unwrap();
    let (service_ip, pod) = injected_app(&ns).await;

    // The thief's ServiceAccount may only view the app's namespace, and reads the token so.
    let binding: RoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "thief-views"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": attacker.name}],
    }))
    .unwrap();
    ns.apply(&binding).await.unwrap();
    let thief = format!("system:serviceaccount:{}:default", attacker.name);
    let path = "jsonpath={.spec.initContainers[?(@.name==\"graceful-sidecar\")].env[?(@.name==\"GRACEFUL_PRESTOP_TOKEN\")].value}";
    let token = wait::until(
        "the token, read with view",
        Duration::from_secs(30),
        || async {
            let read = cluster::kubectl_output(&[
                "get",
                "pod",
                &pod.name_any(),
                "-n",
                &ns.name,
                "-o",
                path,
                "--as",
                &thief,
            ]);
            Ok(read.ok().filter(|t| t.len() >= 32))
        },
    )
    .await
    .unwrap();

    let pid = pod_in(&attacker).await;

    // Three calls under load, a few seconds apart, each let through as a restart's preStop.
    let load = Load {
        rate: 200,
        lead_in: Duration::from_secs(2),
        ..Load::default()
    };
    let serving = graceful::ServingSampler::start(&ns, APP);
    let url = format!("http://{service_ip}/");
    let (answers, report) = load
        .during(&url, async {
            let mut answers = Vec::new();
            for _ in 0..3 {
                let (pid, pod, token) = (pid, pod.clone(), token.clone());
                let answer = tokio::task::spawn_blocking(move || prestop_from(pid, &pod, &token))
                    .await
                    .unwrap();
                eprintln!("/prestop from the thief's pod: {answer}");
                answers.push(answer);
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            answers
        })
        .await
        .unwrap();
    let fewest_ready = serving.stop().await;
    load::check_sent("load during the stolen token's calls", &load, &report);
    for answer in &answers {
        assert!(
            answer.contains("\"restart\":true") && answer.contains("\"by_kubelet\":false"),
            "the stolen token was not let through as a peer's restart: {answer}"
        );
    }
    assert_eq!(report.failed, 0, "requests failed: {report}");
    assert_eq!(
        fewest_ready, 1,
        "the pod left its Service's ready endpoints"
    );
    let hold = longest_hold(&pod).await;
    eprintln!("longest hold after the thief's calls: {hold:.2} s");
    assert!(hold < 4.0, "requests were held {hold} s");
    let now = ns.api::<Pod>().get(&pod.name_any()).await.unwrap();
    assert_eq!(node::restart_count(&now, "demo"), 0, "the app restarted");
    assert!(
        drain_phase(&now).await.contains("phase=\"serving\""),
        "the sidecar drains"
    );

    // The control: the same call from the node's address is the kubelet's as far as the sidecar
    // can tell, and takes the pod out of its Service until the app is found still there.
    let serving = graceful::ServingSampler::start(&ns, APP);
    let host_pid = std::process::id();
    let (p, t) = (pod.clone(), token.clone());
    let answer = tokio::task::spawn_blocking(move || prestop_from(host_pid, &p, &t))
        .await
        .unwrap();
    eprintln!("/prestop from the node: {answer}");
    assert!(answer.contains("\"by_kubelet\":true"), "{answer}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        serving.stop().await,
        0,
        "the node's call did not take the pod out: the peer's result above shows nothing"
    );
    wait::pod_ready(&ns.api(), &pod.name_any(), Duration::from_secs(30))
        .await
        .unwrap();
}
