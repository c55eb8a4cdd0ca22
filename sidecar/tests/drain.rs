//! The drain as users rely on it, shown with the built binaries on real sockets.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_second_request_in_flight_at_sigterm_completes_then_exit_0() {
    let (_demo, app) = start_demo().await;
    let mut sc = start_sidecar(app, &["--deregister-delay", "1s", "--drain-timeout", "10s"]).await;
    let listen = sc.listen;
    let slow = tokio::spawn(async move { get(listen, "/slow?ms=5000").await });
    tokio::time::sleep(secs(0.5)).await;
    sc.proc.signal("TERM");
    tokio::time::sleep(secs(0.2)).await;
    assert_eq!(
        get(sc.admin, "/readyz").await.status,
        503,
        "readiness must turn off at once"
    );

    let resp = slow.await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, "slept 5000 ms\n");
    let status = sc.proc.exit_within(secs(3.0)).await;
    assert!(status.success(), "exit {status}: {}", sc.proc.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_through_deregistration_has_zero_failures_and_prestop_waits_for_the_last() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(
        app,
        &[
            "--deregister-delay",
            "3s",
            "--drain-timeout",
            "20s",
            "--prestop-token",
            TOKEN,
        ],
    )
    .await;
    let t0 = Instant::now();
    // 16 keep-alive connections of 50 ms requests, stopping before deregistration ends.
    let load = hey(&format!("http://{}/slow?ms=50", sc.listen), 16, secs(3.0));
    tokio::time::sleep(secs(1.0)).await;
    let prestop = sc.prestop(Some(TOKEN));
    let report = load.await.unwrap();
    let load_done = t0.elapsed();
    let resp = prestop.await.unwrap();
    let prestop_done = t0.elapsed();

    assert_eq!(report.failed(), 0, "hey saw failures:\n{}", report.raw);
    assert!(
        report.ok() > 200,
        "too little load to show anything:\n{}",
        report.raw
    );
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert!(
        prestop_done >= load_done,
        "prestop returned before the last request was answered"
    );
    let summary: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(summary["forced"], false, "{summary}");
    assert_eq!(summary["deregistration"], "delay");
    let after = summary["requests_after_trigger"].as_u64().unwrap();
    assert!(
        after > 100,
        "requests after the trigger must be served, got {after}: {summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http1_response_during_quiesce_says_connection_close_and_the_connection_closes() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(app, &["--deregister-delay", "300ms"]).await;
    let mut c = H1::connect(sc.listen).await;
    let first = c.get("/").await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.header("connection"), None, "keep-alive while serving");

    c.send("/slow?ms=1500", "").await;
    tokio::time::sleep(secs(0.2)).await;
    let prestop = sc.prestop(None);
    let resp = c.read_response().await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"), "{resp:?}");
    assert!(
        c.closed_within(secs(1.0)).await,
        "server kept the connection open"
    );
    assert_eq!(prestop.await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_keepalive_connection_is_closed_at_quiesce() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(app, &["--deregister-delay", "500ms"]).await;
    let mut c = H1::connect(sc.listen).await;
    assert_eq!(c.get("/").await.unwrap().status, 200);
    let t0 = Instant::now();
    let prestop = sc.prestop(None);
    assert!(
        c.closed_within(secs(3.0)).await,
        "idle keep-alive connection left open"
    );
    let waited = t0.elapsed();
    assert!(
        waited >= secs(0.45),
        "closed during deregistration ({waited:?}): stragglers need it"
    );
    assert_eq!(prestop.await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keepalive_request_sent_just_after_quiesce_begins_is_served_with_connection_close() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(app, &["--deregister-delay", "300ms"]).await;
    let mut c = H1::connect(sc.listen).await;
    assert_eq!(c.get("/").await.unwrap().status, 200);
    let prestop = sc.prestop(None);
    // Quiesce begins 300 ms after the trigger. A client that reuses its idle connection just
    // after that must not see it torn down under its request.
    tokio::time::sleep(secs(0.45)).await;
    let resp = c
        .get("/")
        .await
        .expect("request on a connection idle when quiesce began");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    assert_eq!(prestop.await.unwrap().status, 200);
}

/// A new connection (one request each, as from a load balancer that reconnects) every `every`
/// until `until` after `t0`; every one must be answered 200.
async fn new_connection_every(
    listen: std::net::SocketAddr,
    every: Duration,
    t0: Instant,
    until: Duration,
) {
    while t0.elapsed() < until {
        let resp = get(listen, "/").await;
        assert_eq!(resp.status, 200, "a straggler is served, never refused");
        tokio::time::sleep(every).await;
    }
}

fn summary_of(resp: &Response) -> serde_json::Value {
    assert_eq!(resp.status, 200, "{}", resp.body);
    serde_json::from_str(&resp.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_plane_that_keeps_sending_for_seconds_after_deregistration_is_served_to_the_end() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(app, &["--deregister-delay", "300ms"]).await;
    // The balancer's cadence before the trigger sets the quiet window: gaps of ~200 ms.
    let t0 = Instant::now();
    new_connection_every(sc.listen, secs(0.2), t0, secs(2.0)).await;
    let prestop = sc.prestop(None);
    let trigger = Instant::now();
    // It lags: 3 s more of new connections after the trigger, 2.7 s after deregistration.
    let lag = secs(3.0);
    new_connection_every(sc.listen, secs(0.2), trigger, lag).await;
    assert!(
        !prestop.is_finished(),
        "drain ended while new connections still arrived"
    );
    let summary = summary_of(&prestop.await.unwrap());
    let window = summary["quiet_window"]["seconds"].as_f64().unwrap();
    let last = summary["last_arrival_seconds"].as_f64().unwrap();
    let total = summary["total_seconds"].as_f64().unwrap();
    // Read before the trigger as 3 x gaps of 200-300 ms, widened by the same gaps after
    // deregistration to 6 x.
    assert_eq!(summary["quiet_window"]["basis"], "lagging", "{summary}");
    assert!(
        (1.2..=2.0).contains(&window),
        "6 x gaps of 200-300 ms: {summary}"
    );
    assert!(last >= 2.7, "the last straggler came at {last}s: {summary}");
    // The drain lasted as long as the data plane lagged, plus the window: not a fixed time.
    assert!(
        total >= last + window && total < last + window + 0.5,
        "{summary}"
    );
    assert!(
        summary["traffic_after_deregistration_seconds"]
            .as_f64()
            .unwrap()
            >= 2.4,
        "{summary}"
    );
    assert_eq!(summary["forced"], false);
    assert_eq!(
        sc.metric("graceful_drain_quiet_window_seconds").await,
        window
    );
    assert!(sc.metric("graceful_drain_last_arrival_seconds").await >= 2.7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_data_planes_sparser_share_after_deregistration_is_served_to_the_end() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(
        app,
        &["--deregister-delay", "300ms", "--propagation-margin", "2s"],
    )
    .await;
    // Busy before the trigger (every data plane sending): the window read then is the minimum.
    let report = hey(&format!("http://{}/", sc.listen), 4, secs(2.0))
        .await
        .unwrap();
    assert_eq!(report.failed(), 0, "{}", report.raw);
    let prestop = sc.prestop(None);
    let trigger = Instant::now();
    // One lagging data plane's share goes on after deregistration, a new connection every
    // 400 ms: gaps longer than the window read before, for 4 s (past the margin).
    let lag = secs(4.0);
    new_connection_every(sc.listen, secs(0.4), trigger, lag).await;
    assert!(
        !prestop.is_finished(),
        "drain ended while the lagging data plane still sent"
    );
    let summary = summary_of(&prestop.await.unwrap());
    let window = summary["quiet_window"]["seconds"].as_f64().unwrap();
    let last = summary["last_arrival_seconds"].as_f64().unwrap();
    assert_eq!(summary["quiet_window"]["basis"], "lagging", "{summary}");
    // 6 x gaps of 400-500 ms (the bucket's resolution and the request's own time).
    assert!((2.4..=3.6).contains(&window), "{summary}");
    assert!(last >= 3.6, "the last straggler came at {last}s: {summary}");
    assert_eq!(summary["forced"], false);
    assert_eq!(
        sc.metric("graceful_drain_quiet_window_seconds").await,
        window
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_pod_whose_traffic_stops_at_once_finishes_at_once() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(app, &["--deregister-delay", "300ms"]).await;
    // Busy keep-alive traffic that stops right at the trigger (all its data planes let go with
    // the deregistration itself).
    let report = hey(&format!("http://{}/", sc.listen), 4, secs(2.0))
        .await
        .unwrap();
    assert_eq!(report.failed(), 0, "{}", report.raw);
    let started = Instant::now();
    let summary = summary_of(&sc.prestop(None).await.unwrap());
    let window = summary["quiet_window"]["seconds"].as_f64().unwrap();
    assert!(
        window < 0.5,
        "a busy pod knows within a fraction of a second: {summary}"
    );
    assert_eq!(summary["last_arrival_seconds"], serde_json::Value::Null);
    // Deregistration (300 ms), then the window; hey's connections closed when it stopped.
    assert!(started.elapsed() < secs(0.3 + window + 0.5), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_pod_finishes_one_second_after_deregistration() {
    let (_demo, app) = start_demo().await;
    // Fronted by kube-proxy alone, as the injector writes it: nothing to hold for.
    let args = [
        "--deregister-delay",
        "300ms",
        "--data-planes",
        "kube-proxy=5s",
    ];
    let sc = start_sidecar(app, &args).await;
    let started = Instant::now();
    let summary = summary_of(&sc.prestop(None).await.unwrap());
    assert_eq!(summary["quiet_window"]["basis"], "idle", "{summary}");
    assert_eq!(summary["released_by"], "traffic", "{summary}");
    let took = started.elapsed();
    assert!(took >= secs(1.3) && took < secs(1.8), "{took:?}: {summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_propagation_margin_holds_a_pod_that_had_traffic_and_not_an_idle_one() {
    let (_demo, app) = start_demo().await;
    let args = [
        "--deregister-delay",
        "300ms",
        "--propagation-margin",
        "1500ms",
    ];
    let busy = start_sidecar(app, &args).await;
    let idle = start_sidecar(app, &args).await;
    let report = hey(&format!("http://{}/", busy.listen), 2, secs(1.0))
        .await
        .unwrap();
    assert_eq!(report.failed(), 0, "{}", report.raw);
    let started = Instant::now();
    let (busy_done, idle_done) = (busy.prestop(None), idle.prestop(None));
    let idle_summary = summary_of(&idle_done.await.unwrap());
    let idle_took = started.elapsed();
    summary_of(&busy_done.await.unwrap());
    let busy_took = started.elapsed();
    assert!(busy_took >= secs(1.8), "margin not held: {busy_took:?}");
    assert!(
        idle_took < secs(1.5),
        "idle pod waited the margin: {idle_took:?} {idle_summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fixed_quiet_window_of_zero_stops_as_soon_as_nothing_is_open() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(
        app,
        &["--deregister-delay", "300ms", "--quiet-window", "0s"],
    )
    .await;
    let t0 = Instant::now();
    new_connection_every(sc.listen, secs(0.2), t0, secs(1.0)).await;
    let started = Instant::now();
    let summary = summary_of(&sc.prestop(None).await.unwrap());
    assert_eq!(summary["quiet_window"]["basis"], "fixed", "{summary}");
    assert!(started.elapsed() < secs(0.6), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_gets_goaway_and_its_open_stream_finishes() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(app, &["--deregister-delay", "300ms"]).await;
    let tcp = tokio::net::TcpStream::connect(sc.listen).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("http://{}/slow?ms=1500", sc.listen))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    tokio::time::sleep(secs(0.2)).await;
    let prestop = sc.prestop(None);

    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(bytes, b"slept 1500 ms\n");
    // The server said GOAWAY (NO_ERROR) and closed: the client connection ends cleanly.
    let ended = tokio::time::timeout(secs(3.0), conn)
        .await
        .expect("h2 connection still open");
    ended
        .unwrap()
        .expect("h2 connection must end with GOAWAY, not an error");
    let err = client
        .ready()
        .await
        .expect_err("no new streams after GOAWAY");
    assert!(
        err.is_go_away() || err.is_io() || err.to_string().contains("closed"),
        "{err}"
    );
    assert_eq!(prestop.await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_connections_are_served_all_through_the_drain() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(app, &["--deregister-delay", "1s"]).await;
    let listen = sc.listen;
    // Keeps quiesce open for a while.
    let slow = tokio::spawn(async move { get(listen, "/slow?ms=2500").await });
    tokio::time::sleep(secs(0.2)).await;
    let prestop = sc.prestop(None);
    sc.wait_phase("deregistering").await;
    let r = get(sc.listen, "/").await;
    assert_eq!((r.status, r.body.as_str()), (200, "v1\n"));
    sc.wait_phase("quiescing").await;
    let mut c = H1::connect(sc.listen).await;
    let r = c.get("/").await.unwrap();
    assert_eq!(r.status, 200, "a straggler is served, never refused");
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(slow.await.unwrap().status, 200);
    let summary = prestop.await.unwrap();
    assert!(
        summary.body.contains("\"forced\":false"),
        "{}",
        summary.body
    );
    assert!(sc.metric("graceful_requests_after_trigger_total").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn naive_app_alone_drops_requests_on_sigterm() {
    // The problem graceful solves: the demo dies with requests in flight.
    let (mut demo, app) = start_demo().await;
    let load = hey(&format!("http://{app}/slow?ms=100"), 8, secs(1.5));
    tokio::time::sleep(secs(0.7)).await;
    demo.signal("TERM");
    demo.exit_within(secs(0.5)).await;
    let report = load.await.unwrap();
    assert!(
        report.failed() > 0,
        "expected failures without the sidecar:\n{}",
        report.raw
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn naive_app_behind_sidecar_in_prestop_order_drops_nothing() {
    let (mut demo, app) = start_demo().await;
    let mut sc = start_sidecar(app, &["--deregister-delay", "2s", "--prestop-token", TOKEN]).await;
    let load = hey(&format!("http://{}/slow?ms=100", sc.listen), 8, secs(2.0));
    tokio::time::sleep(secs(0.7)).await;
    // The kubelet's order: the app's preStop hook (our /prestop) first ...
    let resp = sc.prestop(Some(TOKEN)).await.unwrap();
    assert_eq!(resp.status, 200, "{}", resp.body);
    let report = load.await.unwrap();
    // ... then SIGTERM to the app, which dies at once ...
    demo.signal("TERM");
    demo.exit_within(secs(0.5)).await;
    // ... and, the app gone, SIGTERM to the sidecar, which exits 0 promptly.
    let t = Instant::now();
    sc.proc.signal("TERM");
    let status = sc.proc.exit_within(secs(2.0)).await;
    assert!(status.success(), "exit {status}: {}", sc.proc.stderr());
    assert!(
        t.elapsed() < secs(1.0),
        "slow exit after a completed drain: {:?}",
        t.elapsed()
    );
    assert_eq!(report.failed(), 0, "{}", report.raw);
    assert!(report.ok() > 50, "{}", report.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_longer_than_the_drain_timeout_is_cut_counted_and_reported() {
    let (_demo, app) = start_demo().await;
    let mut sc = start_sidecar(
        app,
        &["--deregister-delay", "500ms", "--drain-timeout", "2s"],
    )
    .await;
    let listen = sc.listen;
    let slow = tokio::spawn(async move {
        let mut c = H1::connect(listen).await;
        c.send("/slow?ms=10000", "").await;
        c.read_response().await
    });
    tokio::time::sleep(secs(0.2)).await;
    let t0 = Instant::now();
    let resp = sc.prestop(None).await.unwrap();
    let took = t0.elapsed();
    assert!(
        took >= secs(1.9) && took < secs(4.0),
        "drain took {took:?}, deadline is 2s"
    );
    let summary: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(summary["forced"], true, "{summary}");
    assert_eq!(summary["requests_cut"], 1, "{summary}");
    assert_eq!(summary["connections_cut"], 1, "{summary}");
    assert!(
        slow.await.unwrap().is_err(),
        "the cut request cannot have a response"
    );
    assert_eq!(sc.metric("graceful_requests_force_closed_total").await, 1.0);
    assert_eq!(
        sc.metric("graceful_connections_force_closed_total").await,
        1.0
    );

    sc.proc.signal("TERM");
    let status = sc.proc.exit_within(secs(2.0)).await;
    assert!(!status.success(), "a forced drain must not exit 0");
    let log = sc.proc.stderr();
    assert!(
        log.contains("drain forced: cut 1 requests and 1 connections"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_sigterm_forces_the_close_at_once() {
    let (_demo, app) = start_demo().await;
    let mut sc = start_sidecar(
        app,
        &["--deregister-delay", "300ms", "--drain-timeout", "30s"],
    )
    .await;
    let listen = sc.listen;
    let slow = tokio::spawn(async move {
        let mut c = H1::connect(listen).await;
        c.send("/slow?ms=20000", "").await;
        c.read_response().await
    });
    tokio::time::sleep(secs(0.2)).await;
    sc.proc.signal("TERM");
    sc.wait_phase("quiescing").await;
    let t = Instant::now();
    sc.proc.signal("TERM");
    let status = sc.proc.exit_within(secs(3.0)).await;
    assert!(
        t.elapsed() < secs(2.0),
        "second SIGTERM took {:?}",
        t.elapsed()
    );
    assert!(!status.success());
    assert!(slow.await.unwrap().is_err());
    assert!(
        sc.proc.stderr().contains("cut 1 requests"),
        "{}",
        sc.proc.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prestop_needs_the_token_when_one_is_set() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(
        app,
        &["--deregister-delay", "100ms", "--prestop-token", TOKEN],
    )
    .await;
    assert_eq!(get(sc.admin, "/prestop").await.status, 401);
    assert_eq!(
        get_with(sc.admin, "/prestop", "Authorization: Bearer nope\r\n")
            .await
            .status,
        401
    );
    assert_eq!(
        get(sc.admin, "/readyz").await.status,
        200,
        "a refused /prestop must not drain"
    );
    let ok = sc.prestop(Some(TOKEN)).await.unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(get(sc.admin, "/readyz").await.status, 503);
    // Joining a finished drain answers the same summary at once.
    assert_eq!(sc.prestop(Some(TOKEN)).await.unwrap().body, ok.body);
}

/// A raw HTTP/1.1 exchange on a new connection; the whole answer, or an error (refused, reset).
async fn exchange(addr: std::net::SocketAddr, request: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// One request on a new connection, as a load balancer that resends nothing sends it: answered
/// 200, or not.
async fn served(addr: std::net::SocketAddr) -> bool {
    let request = "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    matches!(
        tokio::time::timeout(secs(2.0), exchange(addr, request)).await,
        Ok(Ok(a)) if a.starts_with("HTTP/1.1 200")
    )
}

/// A burst of `n` new connections, one every 100 ms; how many were served.
async fn burst(addr: std::net::SocketAddr, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        ok += usize::from(served(addr).await);
        tokio::time::sleep(secs(0.1)).await;
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_clients_behind_a_late_data_plane_are_served_to_the_end() {
    let (_demo, app) = start_demo().await;
    let base = ["--deregister-delay", "300ms", "--drain-timeout", "20s"];
    // The same pod twice: knowing its balancer lags 4 s, and following the traffic alone.
    let late = [
        &base[..],
        &["--data-planes", "kube-proxy=0s,load-balancer/web=4s"],
    ]
    .concat();
    let held = start_sidecar(app, &late).await;
    let quiet_only = start_sidecar(app, &base).await;
    let (a, b) = tokio::join!(burst(held.listen, 10), burst(quiet_only.listen, 10));
    assert_eq!((a, b), (10, 10));
    let trigger = Instant::now();
    let (held_done, quiet_done) = (held.prestop(None), quiet_only.prestop(None));
    // The clients pause longer than any quiet window the traffic could give (1 s bursts, 10
    // per second: a window under 1 s), then come back while the balancer still sends here.
    tokio::time::sleep(secs(2.8)).await;
    let (held_ok, quiet_ok) = tokio::join!(burst(held.listen, 5), burst(quiet_only.listen, 5));
    assert_eq!(held_ok, 5, "every straggler within the lag is served");
    assert!(
        quiet_ok < 5,
        "control: following the traffic alone, the pause ended the drain and the balancer's next connections failed ({quiet_ok} of 5 served)"
    );
    let summary = summary_of(&held_done.await.unwrap());
    let took = trigger.elapsed();
    assert_eq!(summary["released_by"], "lag", "{summary}");
    assert_eq!(summary["data_plane_lag_seconds"], 4.0, "{summary}");
    assert_eq!(summary["data_planes"][1]["name"], "load-balancer/web");
    assert!(
        took >= secs(4.3) && took < secs(6.5),
        "held for the lag after deregistration, then the window: {took:?} {summary}"
    );
    assert_eq!(
        summary_of(&quiet_done.await.unwrap())["released_by"],
        "traffic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn siblings_getting_this_pods_sources_end_the_drain_before_the_lag() {
    let (_demo, app) = start_demo().await;
    let sibling = start_sidecar(app, &[]).await;
    let siblings = sibling.admin.to_string();
    let args = [
        "--deregister-delay",
        "300ms",
        "--drain-timeout",
        "45s",
        "--data-planes",
        "load-balancer/web=30s",
        "--siblings",
        &siblings,
    ];
    let drained = start_sidecar(app, &args).await;
    // One balancer (127.0.0.1) spread over both pods.
    for _ in 0..5 {
        assert!(served(drained.listen).await && served(sibling.listen).await);
    }
    let trigger = Instant::now();
    let done = drained.prestop(None);
    // The balancer has let the pod go: its connections all go to the sibling now, in bursts
    // with pauses (silence alone would prove nothing for 30 s).
    for _ in 0..3 {
        assert_eq!(burst(sibling.listen, 8).await, 8);
        tokio::time::sleep(secs(1.5)).await;
        if done.is_finished() {
            break;
        }
    }
    let summary = summary_of(&done.await.unwrap());
    let took = trigger.elapsed();
    assert_eq!(summary["released_by"], "siblings", "{summary}");
    assert_eq!(summary["sources"], 1, "{summary}");
    assert_eq!(summary["sources_let_go"], 1, "{summary}");
    assert!(took < secs(8.0), "{took:?}: {summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sibling_answers_counts_only_for_the_sources_it_is_asked_about() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(app, &[]).await;
    assert!(served(sc.listen).await && served(sc.listen).await);
    let ask = |body: &str| {
        format!(
            "POST /connections HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let answer = exchange(sc.admin, &ask(r#"["127.0.0.1","10.9.9.9"]"#))
        .await
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("[2,0]"),
        "{answer}"
    );
    let answer = exchange(sc.admin, &ask("{}")).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Not on the traffic port: that is the app's, which knows nothing of counts.
    let answer = exchange(sc.listen, &ask(r#"["127.0.0.1"]"#)).await.unwrap();
    assert!(!answer.trim_end().ends_with(']'), "{answer}");
}
