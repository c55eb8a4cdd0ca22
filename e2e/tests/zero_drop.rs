//! The zero-drop claims of `make demo`, on the real cluster: slow requests in flight when their
//! pod is replaced, HTTP/2 and WebSocket clients across a rollout, and many rollouts in a row.
//! Counts come from vegeta and curl (HTTP) or from a WebSocket client that checks every echo.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use graceful_e2e::cluster;
use graceful_e2e::graceful;
use graceful_e2e::load::{Load, LoadReport};
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::{rollout, wait};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const APP: &str = "web";
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(300);

fn fail(ns: &TestNamespace, msg: String) -> ! {
    ns.print_diagnostics();
    panic!("{msg}")
}

async fn injected_demo(ns: &TestNamespace, annotations: serde_json::Value) -> String {
    let mut d = graceful::injected_deployment(APP, 3, "v1");
    let meta = d
        .spec
        .as_mut()
        .unwrap()
        .template
        .metadata
        .get_or_insert_with(Default::default);
    for (k, v) in annotations.as_object().unwrap() {
        meta.annotations
            .get_or_insert_with(Default::default)
            .insert(k.clone(), v.as_str().unwrap().into());
    }
    ns.apply(&d).await.expect("deployment");
    ns.apply(&graceful::named_port_service(APP))
        .await
        .expect("service");
    wait::rollout(&ns.api(), APP, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| fail(ns, e.to_string()));
    let ip = wait::cluster_ip(&ns.api(), APP).await.expect("cluster ip");
    wait::service_serving(&ns.api(), APP, &ip, 80, 3, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| fail(ns, e.to_string()));
    format!("http://{ip}")
}

/// One request by curl (a client nobody here wrote): its status, or what curl said went wrong.
async fn curl(url: &str, timeout: Duration) -> Result<u16, String> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time"])
        .arg(timeout.as_secs().to_string())
        .arg(url)
        .output()
        .await
        .map_err(|e| format!("curl: {e}"))?;
    if out.status.success() {
        let code = String::from_utf8_lossy(&out.stdout);
        code.trim()
            .parse()
            .map_err(|_| format!("curl wrote {code}"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn a_five_second_request_in_flight_when_its_pod_is_replaced_completes() {
    let client = cluster::client().await.expect("cluster");
    let ns = TestNamespace::create(&client, "slow")
        .await
        .expect("namespace");
    let base = injected_demo(&ns, json!({})).await;
    // Six 5-second requests spread over the three pods, then the rollout replaces every pod
    // while they are in flight (the first old pod goes about two seconds in).
    let url = format!("{base}/slow?ms=5000");
    let slow = futures::future::join_all((0..6).map(|_| curl(&url, Duration::from_secs(30))));
    let restart = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rollout::restart(&ns, APP).await.expect("restart");
        Instant::now()
    };
    let (outcomes, started) = tokio::join!(slow, restart);
    eprintln!("6 slow requests across a rollout: {outcomes:?}");
    wait::rollout(&ns.api(), APP, ROLLOUT_TIMEOUT)
        .await
        .unwrap_or_else(|e| fail(&ns, e.to_string()));
    eprintln!("rollout done in {:.1}s", started.elapsed().as_secs_f64());
    if outcomes.iter().any(|o| o != &Ok(200)) {
        fail(
            &ns,
            format!("slow requests across a pod replacement: {outcomes:?} (want 6 times 200)"),
        );
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn http2_clients_across_a_rollout_fail_nothing() {
    let client = cluster::client().await.expect("cluster");
    let ns = TestNamespace::create(&client, "h2")
        .await
        .expect("namespace");
    let url = graceful::deploy_managed_demo(&ns, APP, 3, json!({}))
        .await
        .unwrap_or_else(|e| fail(&ns, e.to_string()));
    // One h2c client (Go's, in vegeta) for the whole rollout: HTTP/2 clients keep their
    // connection and multiplex every request on it until the server sends GOAWAY. Go's client
    // then opens a new connection for new requests and sends again only what the server's last
    // GOAWAY says it never processed, as RFC 9113 allows: anything failed here, failed.
    let load = Load {
        http2: true,
        lead_in: Duration::from_secs(3),
        ..Load::default()
    };
    let (rolled, report) = load
        .during(&url, async {
            let since = graceful::trigger(&ns, APP).await?;
            graceful::wait_rollout_finished(&ns, APP, since, Duration::from_secs(65)).await
        })
        .await
        .unwrap_or_else(|e| fail(&ns, format!("load: {e}")));
    rolled.unwrap_or_else(|e| fail(&ns, format!("rollout: {e}")));
    eprintln!("HTTP/2 (h2c) across a rollout: {report}");
    // Most of the rate was really sent, so the rollout met the load.
    let expected = f64::from(load.rate) * report.duration.as_secs_f64();
    if report.failed != 0 || (report.sent as f64) < 0.8 * expected {
        fail(
            &ns,
            format!("HTTP/2 across a rollout: {report} (want 0 failed, {expected:.0} sent)"),
        );
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn ten_consecutive_rollouts_fail_nothing() {
    let client = cluster::client().await.expect("cluster");
    let ns = TestNamespace::create(&client, "ten")
        .await
        .expect("namespace");
    let url = graceful::deploy_managed_demo(&ns, APP, 3, json!({"minServingSeconds": 2}))
        .await
        .unwrap_or_else(|e| fail(&ns, e.to_string()));
    let mut total = LoadReport::default();
    let started = Instant::now();
    for i in 1..=10 {
        let (_, report, _) =
            graceful::rollout_under_load(&ns, APP, &url, &Load::default(), ROLLOUT_TIMEOUT)
                .await
                .unwrap_or_else(|e| fail(&ns, format!("rollout {i}: {e}")));
        eprintln!("rollout {i}/10: {report}");
        total.merge(&report);
    }
    eprintln!(
        "10 rollouts in {:.0}s: {total}",
        started.elapsed().as_secs_f64()
    );
    if total.failed != 0 {
        fail(
            &ns,
            format!("10 consecutive rollouts: {total} (want 0 failed)"),
        );
    }
}

/// What a WebSocket client saw: every message must come back, on the first connection or,
/// when a Close 1001 came first (the sidecar held it back: it never reached the app), resent on
/// the next one. A connection that ends without a Close is a cut: a message on its way then may
/// or may not have been processed, and is counted lost however the client goes on.
#[derive(Debug, Default)]
struct WsTally {
    sent: u64,
    echoed: u64,
    reconnects: u64,
    failed_connects: u64,
    lost: u64,
    /// Connections ended by a Close 1001 (Going Away).
    going_away: u64,
    /// Connections ended without a Close, or by another code.
    cut: u64,
}

impl WsTally {
    fn add(&mut self, t: &WsTally) {
        self.sent += t.sent;
        self.echoed += t.echoed;
        self.reconnects += t.reconnects;
        self.failed_connects += t.failed_connects;
        self.lost += t.lost;
        self.going_away += t.going_away;
        self.cut += t.cut;
    }
}

async fn websocket_client(url: String, until: tokio::sync::watch::Receiver<bool>) -> WsTally {
    let mut tally = WsTally::default();
    let mut pending: Option<String> = None;
    let mut seq = 0u64;
    'connect: while !*until.borrow() {
        let mut ws = match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                eprintln!("websocket connect failed: {e}");
                tally.failed_connects += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let msg = pending.take().unwrap_or_else(|| {
                seq += 1;
                tally.sent += 1;
                format!("msg-{seq}")
            });
            if ws.send(Message::text(msg.clone())).await.is_err() {
                // Cut before the message left: it reached no one.
                pending = Some(msg);
                tally.reconnects += 1;
                tally.cut += 1;
                continue 'connect;
            }
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.as_str() == msg => tally.echoed += 1,
                // Going Away before the echo: the message never reached the app; resend it.
                Ok(Some(Ok(Message::Close(Some(f))))) if f.code == CloseCode::Away => {
                    let _ = ws.close(None).await;
                    pending = Some(msg);
                    tally.reconnects += 1;
                    tally.going_away += 1;
                    continue 'connect;
                }
                // Cut with the message on its way: whether the app got it, nobody can say.
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                    tally.lost += 1;
                    tally.reconnects += 1;
                    tally.cut += 1;
                    continue 'connect;
                }
                Ok(Some(Ok(other))) => {
                    eprintln!("unexpected websocket frame {other:?}");
                    tally.lost += 1;
                }
                Err(_) => {
                    tally.lost += 1;
                    continue 'connect;
                }
            }
            if *until.borrow() {
                let _ = ws.close(None).await;
                break 'connect;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if pending.is_some() {
        tally.lost += 1;
    }
    tally
}

/// Four WebSocket clients across a rollout; a tally of what they saw.
async fn websocket_clients_across_a_rollout(ns: &TestNamespace, base: &str) -> WsTally {
    let url = format!("{}/ws", base.replacen("http://", "ws://", 1));
    let (stop, until) = tokio::sync::watch::channel(false);
    let clients: Vec<_> = (0..4)
        .map(|_| tokio::spawn(websocket_client(url.clone(), until.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    rollout::restart(ns, APP).await.expect("restart");
    wait::rollout(&ns.api(), APP, ROLLOUT_TIMEOUT)
        .await
        .unwrap_or_else(|e| fail(ns, e.to_string()));
    // Let the last old pods finish draining, so every client has been moved at least once.
    graceful::wait_pods_settled(ns, APP, 3, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| fail(ns, e.to_string()));
    let _ = stop.send(true);
    let mut total = WsTally::default();
    for c in clients {
        total.add(&c.await.expect("client task"));
    }
    total
}

/// Every connection a rollout moves ends with a Close 1001 before any message is lost; the
/// same clients across the same rollout of the demo without the sidecar, same run, are cut.
#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn websocket_clients_across_a_rollout_lose_no_message() {
    let client = cluster::client().await.expect("cluster");
    let bare = TestNamespace::create(&client, "ws-bare")
        .await
        .expect("namespace");
    let ip = rollout::deploy_plain(&bare, APP)
        .await
        .unwrap_or_else(|e| fail(&bare, e.to_string()));
    let without = websocket_clients_across_a_rollout(&bare, &format!("http://{ip}")).await;
    eprintln!("websocket clients across a rollout without graceful: {without:?}");
    if without.cut == 0 {
        fail(
            &bare,
            format!(
                "without graceful no connection was cut, so the run below shows nothing: {without:?}"
            ),
        );
    }
    drop(bare);

    let ns = TestNamespace::create(&client, "ws")
        .await
        .expect("namespace");
    // A tunnel is asked to leave once the data planes let go: with traffic this sparse the quiet
    // window that shows it is up to 10 s, inside the default 30 s drain timeout.
    let base = injected_demo(&ns, json!({})).await;
    let total = websocket_clients_across_a_rollout(&ns, &base).await;
    eprintln!("websocket clients across a rollout: {total:?}");
    if total.lost != 0
        || total.cut != 0
        || total.failed_connects != 0
        || total.echoed != total.sent
        || total.sent < 100
    {
        fail(&ns, format!("websocket across a rollout: {total:?}"));
    }
    assert!(
        total.going_away >= 1,
        "no client was moved by the rollout: the test proved nothing: {total:?}"
    );
}
