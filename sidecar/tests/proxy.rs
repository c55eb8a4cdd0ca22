//! The proxy path with the built binaries: protocols, streaming, headers, app down.

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_echoes_through_the_proxy() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(app, &[]).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", sc.listen))
        .await
        .expect("websocket handshake through the sidecar");
    assert_eq!(resp.status(), 101);
    for text in ["hello", "through the sidecar"] {
        ws.send(Message::text(text)).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(3), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echo, Message::text(text));
    }
    assert_eq!(
        sc.metric("graceful_open_connections{protocol=\"upgraded\"}")
            .await,
        1.0
    );
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hop_by_hop_fields_stay_and_forwarding_fields_are_added() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(app, &[]).await;
    let r = get_with(
        sc.listen,
        "/headers",
        "X-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 203.0.113.9\r\nX-End: kept\r\nConnection: X-Hop, keep-alive\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    let got = r.body.to_ascii_lowercase();
    assert!(!got.contains("x-hop"), "{got}");
    assert!(!got.contains("keep-alive"), "{got}");
    assert!(got.contains("x-end: kept"), "{got}");
    assert!(got.contains("te: trailers"), "{got}");
    assert!(
        got.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1"),
        "{got}"
    );
    assert!(got.contains("x-forwarded-proto: http"), "{got}");
    assert!(
        got.contains("host: test"),
        "the client's Host reaches the app: {got}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_stream_both_ways_without_buffering() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(app, &[]).await;
    let mut c = H1::connect(sc.listen).await;
    c.stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
        )
        .await
        .unwrap();
    // The first chunk comes back while the request body is still open: nothing waits for
    // the whole body on either side.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !String::from_utf8_lossy(&seen).contains("first") {
        let mut b = [0u8; 1024];
        let n = tokio::time::timeout_at(
            deadline,
            tokio::io::AsyncReadExt::read(&mut c.stream, &mut b),
        )
        .await
        .expect("first chunk not echoed before the body ended: buffered")
        .unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&b[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    c.stream.write_all(b"4\r\nlast\r\n0\r\n\r\n").await.unwrap();

    // And a large body arrives intact.
    let big: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    let client = hyper_client();
    let resp = client
        .request(
            http::Request::post(format!("http://{}/echo", sc.listen))
                .body(http_body_util::Full::new(bytes::Bytes::from(big.clone())))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(body == big, "echoed body differs ({} bytes)", body.len());
}

fn hyper_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_prior_knowledge_to_the_sidecar_and_h2c_to_the_app() {
    let (_demo, app) = start_demo().await;
    for args in [&[][..], &["--upstream-h2c"][..]] {
        let sc = start_sidecar(app, args).await;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let resp = client
            .get(format!("http://{}/headers", sc.listen).parse().unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains(&format!("host: {}", sc.listen)),
            "{args:?}: {body}"
        );
        assert_eq!(sc.metric("graceful_requests_total").await, 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn app_down_answers_502_and_logs_once_per_burst() {
    let down = free_addr();
    // Without waiting for the app (tests/restarts.rs waits).
    let sc = start_sidecar(down, &["--upstream-restart-wait", "0s"]).await;
    for _ in 0..5 {
        let r = get(sc.listen, "/").await;
        assert_eq!(r.status, 502);
        assert!(
            r.body.len() < 100 && r.body.contains("unreachable"),
            "{}",
            r.body
        );
    }
    assert_eq!(sc.metric("graceful_upstream_errors_total").await, 5.0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = sc.proc.stderr();
    assert_eq!(log.matches("app unreachable").count(), 1, "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_endpoints_are_not_served_on_the_traffic_port() {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(app, &["--app-ready-path", "/healthz"]).await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(get(sc.admin, path).await.status, 200, "{path}");
    }
    // On the traffic port they are the app's paths: the demo has no /metrics or /prestop.
    assert_eq!(get(sc.listen, "/metrics").await.status, 404);
    assert_eq!(get(sc.listen, "/prestop").await.status, 404);
    assert_eq!(
        get(sc.admin, "/readyz").await.status,
        200,
        "no drain started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_follows_the_apps_readiness_path() {
    let (mut demo, app) = start_demo().await;
    let sc = start_sidecar(app, &["--app-ready-path", "/healthz"]).await;
    assert_eq!(get(sc.admin, "/readyz").await.status, 200);
    demo.signal("KILL");
    demo.exit_within(Duration::from_secs(2)).await;
    assert_eq!(get(sc.admin, "/readyz").await.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn app_drain_hook_is_called_once_and_its_failure_does_not_stop_the_drain() {
    // A tiny listener standing in for the app's hook, to see the call arrive.
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = hook.local_addr().unwrap();
    let seen = tokio::spawn(async move {
        let (mut s, _) = hook.accept().await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf)
            .await
            .unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    });
    let (_demo, app) = start_demo().await;
    let url = format!("http://{hook_addr}/drain");
    let sc = start_sidecar(
        app,
        &["--deregister-delay", "200ms", "--app-drain-url", &url],
    )
    .await;
    assert_eq!(sc.prestop(None).await.unwrap().status, 200);
    let req = tokio::time::timeout(Duration::from_secs(2), seen)
        .await
        .unwrap()
        .unwrap();
    assert!(req.starts_with("POST /drain HTTP/1.1"), "{req}");

    // A hook that refuses connections: logged, drain completes anyway.
    let url = format!("http://{}/drain", free_addr());
    let sc = start_sidecar(
        app,
        &["--deregister-delay", "200ms", "--app-drain-url", &url],
    )
    .await;
    let r = sc.prestop(None).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.contains("\"forced\":false"));
    assert!(
        sc.proc.stderr().contains("app drain hook failed"),
        "{}",
        sc.proc.stderr()
    );
}
