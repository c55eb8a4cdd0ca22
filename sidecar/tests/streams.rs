//! Long-lived streams through a drain, with the built binaries (issue 26): a WebSocket client
//! sending all along is asked to leave with a Close 1001, and a server-sent event stream ends
//! after a whole event with the chunked terminator, once the data planes have let go; next to
//! the same drains with the ask put off past their deadline, which cut them.

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// A quick drain: streams are asked to leave once the data planes let go.
const ASKED: &[&str] = &[
    "--deregister-delay",
    "100ms",
    "--quiet-window",
    "300ms",
    "--drain-timeout",
    "10s",
];
/// The same drain with the ask put off past its deadline: what was open is cut.
const NEVER_ASKED: &[&str] = &[
    "--deregister-delay",
    "100ms",
    "--quiet-window",
    "300ms",
    "--drain-timeout",
    "3s",
    "--stream-leave-after",
    "1h",
];

/// What the client saw.
#[derive(Debug)]
struct Seen {
    sent: u32,
    /// Echoes, in the order they came.
    echoes: Vec<u32>,
    /// The Close frame's code, if a Close came.
    close: Option<CloseCode>,
    /// The connection ended without a Close (a cut).
    cut: bool,
}

/// Sends a numbered message every 10 ms through the sidecar's WebSocket echo, from before the
/// drain starts until the connection ends, answering a Close as a client library does.
async fn client_through_a_drain(args: &[&str]) -> (Seen, serde_json::Value, Sidecar) {
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(app, args).await;
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", sc.listen))
        .await
        .expect("websocket handshake through the sidecar");
    let (mut tx, mut rx) = ws.split();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let sender = tokio::spawn(async move {
        let mut sent = 0u32;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => break,
                _ = tick.tick() => {}
            }
            if tx.send(Message::text(sent.to_string())).await.is_err() {
                break;
            }
            sent += 1;
        }
        // The client's answer to a Close goes out with the next write or flush.
        let _ = tx.close().await;
        sent
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let prestop = sc.prestop(None);
    let started = Instant::now();
    let (mut echoes, mut close, mut cut) = (Vec::new(), None, false);
    while started.elapsed() < Duration::from_secs(20) {
        match tokio::time::timeout(Duration::from_secs(20), rx.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => echoes.push(t.parse::<u32>().unwrap()),
            Ok(Some(Ok(Message::Close(frame)))) => {
                close = Some(frame.map_or(CloseCode::Status, |f| f.code));
                break;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) | Err(_) => {
                cut = true;
                break;
            }
        }
    }
    stop.send_replace(true);
    let sent = sender.await.unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&prestop.await.unwrap().body).expect("drain summary");
    let seen = Seen {
        sent,
        echoes,
        close,
        cut,
    };
    eprintln!("{seen:?}\ndrain: {summary}");
    (seen, summary, sc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_asks_websocket_clients_to_leave_with_1001_and_every_echo_comes_first() {
    let (seen, summary, sc) = client_through_a_drain(ASKED).await;
    assert_eq!(seen.close, Some(CloseCode::Away), "{seen:?}");
    assert!(!seen.cut);
    // Every echo, in order and without a gap: what the app got, it answered before the Close;
    // the messages after the last echo reached no one, and the client may send them again.
    let expected: Vec<u32> = (0..seen.echoes.len() as u32).collect();
    assert_eq!(seen.echoes, expected);
    assert!(seen.echoes.len() > 20, "too few messages to show anything");
    assert_eq!(summary["forced"], false, "{summary}");
    assert_eq!(summary["connections_cut"], 0, "{summary}");
    assert_eq!(
        sc.metric("graceful_websocket_drain_closes_total").await,
        1.0
    );
    assert_eq!(
        sc.metric("graceful_websocket_app_close_unanswered_total")
            .await,
        0.0
    );
    assert_eq!(
        sc.metric("graceful_websocket_client_close_unanswered_total")
            .await,
        0.0
    );
    let unsent = sc.metric("graceful_websocket_frames_unsent_total").await;
    assert_eq!(
        f64::from(seen.sent) - seen.echoes.len() as f64,
        unsent,
        "every message without an echo is one the sidecar held back"
    );
}

/// The control: the ask put off past the deadline, the drain cuts the tunnel as it used to.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_ask_the_drain_deadline_cuts_the_tunnel() {
    let (seen, summary, _sc) = client_through_a_drain(NEVER_ASKED).await;
    assert!(seen.cut && seen.close.is_none(), "{seen:?}");
    assert_eq!(summary["forced"], true, "{summary}");
}

/// What an event stream's client saw: the events' ids in order, and how the stream ended.
#[derive(Debug)]
struct Events {
    ids: Vec<u64>,
    /// Bytes after the last whole event (an event cut in half).
    partial: String,
    /// The body ended with its terminator (not an error).
    clean: bool,
}

/// Reads `GET /events?ms=20` through the sidecar from before the drain until the stream ends.
async fn events_through_a_drain(args: &[&str]) -> (Events, serde_json::Value, Sidecar) {
    use http_body_util::{BodyExt, Empty};
    let (_demo, app) = start_demo().await;
    let sc = start_sidecar(app, args).await;
    let stream = tokio::net::TcpStream::connect(sc.listen).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/events?ms=20")
        .header("host", "test")
        .body(Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut prestop = None;
    let started = Instant::now();
    let clean = loop {
        if prestop.is_none() && started.elapsed() >= Duration::from_millis(300) {
            prestop = Some(sc.prestop(None));
        }
        match tokio::time::timeout(Duration::from_secs(20), body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    text.push_str(std::str::from_utf8(&data).unwrap());
                }
            }
            Ok(None) => break true,
            Ok(Some(Err(_))) | Err(_) => break false,
        }
    };
    let summary: serde_json::Value =
        serde_json::from_str(&prestop.expect("drain started").await.unwrap().body).unwrap();
    let whole = text.rfind("\n\n").map_or(0, |i| i + 2);
    let ids = text[..whole]
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|n| n.parse().unwrap())
        .collect();
    let events = Events {
        ids,
        partial: text[whole..].to_owned(),
        clean,
    };
    eprintln!("{events:?}\ndrain: {summary}");
    (events, summary, sc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_ends_event_streams_after_a_whole_event() {
    let (events, summary, sc) = events_through_a_drain(ASKED).await;
    assert!(events.clean, "{events:?}");
    assert_eq!(events.partial, "", "an event was cut in half");
    let expected: Vec<u64> = (0..events.ids.len() as u64).collect();
    assert_eq!(events.ids, expected);
    assert!(events.ids.len() > 10, "too few events to show anything");
    assert_eq!(summary["forced"], false, "{summary}");
    assert_eq!(sc.metric("graceful_event_streams_ended_total").await, 1.0);
}

/// The control: the ask put off past the deadline, the drain cuts the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_ask_the_drain_deadline_cuts_the_event_stream() {
    let (events, summary, _sc) = events_through_a_drain(NEVER_ASKED).await;
    assert!(!events.clean, "{events:?}");
    assert_eq!(summary["forced"], true, "{summary}");
}
