//! The app restarting behind the sidecar, with the built binaries: the demo app is killed and
//! started again on the same port while a third-party load generator (hey) sends through the
//! sidecar.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

/// /readyz until it answers `want`, failing past `limit`.
async fn readyz_becomes(sc: &Sidecar, want: u16, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if get(sc.admin, "/readyz").await.status == want {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "/readyz never answered {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn kill(demo: &mut Proc) {
    demo.signal("KILL");
    demo.exit_within(Duration::from_secs(3)).await;
}

/// A request sent on its own connection, answered later.
async fn send(sc: &Sidecar, method: &str, path: &str, headers: &str) -> H1 {
    let mut c = H1::connect(sc.listen).await;
    c.send_method(method, path, headers).await;
    c
}

fn restart_failed(reason: &str) -> String {
    format!("graceful_restart_failed_requests_total{{reason=\"{reason}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_killed_and_started_again_fails_no_get_and_holds_posts() {
    let app = free_addr();
    let mut demo = start_demo_at(app).await;
    let sc = start_sidecar(app, &[]).await;
    readyz_becomes(&sc, 200, Duration::from_secs(5)).await;

    let load = Duration::from_secs(8);
    let gets = hey_with(&format!("http://{}/", sc.listen), 4, load, &["-q", "100"]);
    // POSTs with a body: safe to hold before they reach the app, never to send twice.
    let posts = hey_with(
        &format!("http://{}/slow?ms=5", sc.listen),
        2,
        load,
        &["-m", "POST", "-d", "order=42", "-q", "50"],
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // At the app when it dies: a GET and a keyed POST (sent again once it is back), and a POST
    // without a key (answered 502: its handler may have run).
    let slow = "/slow?ms=3000";
    let mut get_in_flight = send(&sc, "GET", slow, "").await;
    let keyed = "Content-Length: 0\r\nIdempotency-Key: k-1\r\n";
    let mut keyed_in_flight = send(&sc, "POST", slow, keyed).await;
    let mut post_in_flight = send(&sc, "POST", slow, "Content-Length: 0\r\n").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let killed = Instant::now();
    kill(&mut demo).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _demo = start_demo_at(app).await;
    let down_for = killed.elapsed();

    let (gets, posts) = (gets.await.unwrap(), posts.await.unwrap());
    let get_in_flight = get_in_flight.read_response().await.unwrap();
    let keyed_in_flight = keyed_in_flight.read_response().await.unwrap();
    let post_in_flight = post_in_flight.read_response().await.unwrap();
    eprintln!(
        "app down {down_for:?}\nGET load: {:?}\nPOST load: {:?}",
        gets.codes, posts.codes
    );

    assert_eq!(
        gets.failed(),
        0,
        "GETs failed across the restart:\n{}",
        gets.raw
    );
    assert!(
        gets.ok() > 1000,
        "too little load to show anything:\n{}",
        gets.raw
    );
    assert_eq!(
        get_in_flight.status, 200,
        "a GET cut in flight is sent again"
    );
    assert_eq!(
        keyed_in_flight.status, 200,
        "a keyed POST cut in flight is sent again"
    );
    assert_eq!(
        post_in_flight.status, 502,
        "a POST cut in flight is not replayed"
    );
    assert!(posts.errors.is_empty(), "{}", posts.raw);
    let posts_502 = posts.codes.get(&502).copied().unwrap_or(0);
    assert_eq!(
        posts.failed(),
        posts_502,
        "held POSTs succeed; only those cut in flight fail:\n{}",
        posts.raw
    );

    let cut = sc.metric(&restart_failed("cut_in_flight")).await;
    assert_eq!(
        cut,
        (posts_502 + 1) as f64,
        "every request cut in flight is counted, and only those"
    );
    assert_eq!(sc.metric(&restart_failed("wait_expired")).await, 0.0);
    assert_eq!(sc.metric(&restart_failed("too_many_held")).await, 0.0);
    assert_eq!(sc.metric("graceful_app_restarts_total").await, 1.0);
    assert_eq!(sc.metric("graceful_app_up").await, 1.0);
    // hey's workers each wait for their request (6 of them met the outage), and so do the two
    // requests sent again.
    let held = sc.metric("graceful_requests_held_total").await;
    assert!(held >= 8.0, "{held} requests held");
    assert!(sc.metric("graceful_requests_retried_total").await >= 2.0);
    let longest = sc.metric("graceful_longest_hold_seconds").await;
    assert!(
        longest > 1.5 && longest < down_for.as_secs_f64() + 0.5,
        "longest hold {longest}s for an app down {down_for:?}"
    );
    let log = sc.proc.stderr();
    assert!(log.contains("app stopped accepting connections"), "{log}");
    assert!(log.contains("app accepting connections again"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_longer_than_the_wait_answers_503_with_retry_after() {
    let app = free_addr();
    let mut demo = start_demo_at(app).await;
    let sc = start_sidecar(app, &["--upstream-restart-wait", "1s"]).await;
    readyz_becomes(&sc, 200, Duration::from_secs(5)).await;
    kill(&mut demo).await;

    let started = Instant::now();
    let waits: Vec<_> = (0..5)
        .map(|_| {
            let listen = sc.listen;
            tokio::spawn(async move {
                let t = Instant::now();
                (get(listen, "/").await, t.elapsed())
            })
        })
        .collect();
    for w in waits {
        let (r, took) = w.await.unwrap();
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
            "a request waits the wait, then gets its answer: {took:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no request hangs"
    );
    assert_eq!(sc.metric(&restart_failed("wait_expired")).await, 5.0);
    assert_eq!(sc.metric("graceful_app_up").await, 0.0);
    readyz_becomes(&sc, 503, Duration::from_secs(3)).await;

    let _demo = start_demo_at(app).await;
    readyz_becomes(&sc, 200, Duration::from_secs(2)).await;
    assert_eq!(get(sc.listen, "/").await.status, 200);
    assert_eq!(sc.metric(&restart_failed("wait_expired")).await, 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_follows_the_app_without_traffic() {
    let app: SocketAddr = free_addr();
    let sc = start_sidecar(app, &[]).await;
    let r = get(sc.admin, "/readyz").await;
    assert_eq!(r.status, 503, "not ready before the app listens");
    assert!(
        r.body.contains("not accepting connections yet"),
        "{}",
        r.body
    );

    let mut demo = start_demo_at(app).await;
    readyz_becomes(&sc, 200, Duration::from_secs(1)).await;
    kill(&mut demo).await;
    // A blip does not move the traffic; an app gone over a second does.
    let took = readyz_becomes(&sc, 503, Duration::from_secs(3)).await;
    assert!(took >= Duration::from_millis(900), "{took:?}");
    let r = get(sc.admin, "/readyz").await;
    assert!(r.body.contains("app restarting"), "{}", r.body);
    let _demo = start_demo_at(app).await;
    readyz_becomes(&sc, 200, Duration::from_secs(1)).await;
    assert_eq!(sc.metric("graceful_app_restarts_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_requests_are_bounded() {
    let app = free_addr();
    let mut demo = start_demo_at(app).await;
    let args = ["--upstream-max-held", "2", "--upstream-restart-wait", "5s"];
    let sc = start_sidecar(app, &args).await;
    readyz_becomes(&sc, 200, Duration::from_secs(5)).await;
    kill(&mut demo).await;

    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(send(&sc, "GET", "/", "").await);
    }
    let start = Instant::now();
    while sc.metric("graceful_requests_waiting_for_app").await < 2.0 {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "requests never held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..3 {
        let t = Instant::now();
        let r = get(sc.listen, "/").await;
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(r.body.contains("too many"), "{}", r.body);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "past the bound: at once"
        );
    }
    assert_eq!(sc.metric(&restart_failed("too_many_held")).await, 3.0);

    let _demo = start_demo_at(app).await;
    for mut c in held {
        assert_eq!(c.read_response().await.unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_while_the_app_is_down_ends_within_the_drain_timeout() {
    let app = free_addr();
    let mut demo = start_demo_at(app).await;
    let args = [
        "--drain-timeout",
        "2s",
        "--deregister-delay",
        "0s",
        "--upstream-restart-wait",
        "10s",
    ];
    let sc = start_sidecar(app, &args).await;
    readyz_becomes(&sc, 200, Duration::from_secs(5)).await;
    kill(&mut demo).await;
    let mut held = send(&sc, "GET", "/", "").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let t = Instant::now();
    let summary = sc.prestop(None).await.unwrap();
    let took = t.elapsed();
    assert_eq!(summary.status, 200);
    assert!(took < Duration::from_millis(3000), "drain took {took:?}");
    // The held request ends with the drain: a 503, or its connection closed at the deadline.
    match tokio::time::timeout(Duration::from_secs(1), held.read_response()).await {
        Ok(Ok(r)) => assert_eq!(r.status, 503),
        Ok(Err(_)) => {}
        Err(_) => panic!("the held request outlived the drain"),
    }
}

/// A drain the kubelet's preStop started for what was in fact a container restart (the API
/// could not tell): once the app is back, the drained sidecar exits, so that the kubelet starts
/// it afresh and the pod serves again; while the app stays away (a pod being deleted), it waits
/// for its SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_for_a_restart_ends_in_the_sidecars_exit_once_the_app_is_back() {
    let app = free_addr();
    let args = ["--drain-timeout", "2s", "--deregister-delay", "0s"];
    // Deleted: the app goes and stays away; the sidecar waits for its signal.
    let mut demo = start_demo_at(app).await;
    let mut deleted = start_sidecar(app, &args).await;
    readyz_becomes(&deleted, 200, Duration::from_secs(5)).await;
    assert_eq!(deleted.prestop(None).await.unwrap().status, 200);
    kill(&mut demo).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        deleted.proc.child.try_wait().unwrap().is_none(),
        "exited without a signal while the app stayed away:\n{}",
        deleted.proc.stderr()
    );
    deleted.proc.signal("TERM");
    deleted.proc.exit_within(Duration::from_secs(3)).await;

    // Restarted: the app comes back on its port; the sidecar exits without a signal.
    let mut demo = start_demo_at(app).await;
    let mut restarted = start_sidecar(app, &args).await;
    readyz_becomes(&restarted, 200, Duration::from_secs(5)).await;
    assert_eq!(restarted.prestop(None).await.unwrap().status, 200);
    kill(&mut demo).await;
    // The kubelet starts a new container in a few hundred milliseconds at the least.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _demo = start_demo_at(app).await;
    let status = restarted.proc.exit_within(Duration::from_secs(3)).await;
    assert!(status.success(), "{status}");
    assert!(
        restarted
            .proc
            .stderr()
            .contains("the app was restarted after the drain"),
        "{}",
        restarted.proc.stderr()
    );
}
