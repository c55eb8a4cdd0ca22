//! graceful-demo: a naive HTTP app for graceful's demos, tests and benchmarks. It serves
//! HTTP/1.1 and HTTP/2 cleartext on one port and, like most apps, dies the instant it gets
//! SIGTERM: whatever is in flight is lost unless something drains it first.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures::{SinkExt, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

#[derive(Parser, Debug)]
#[command(name = "graceful-demo", disable_version_flag = true)]
struct Args {
    /// Address to serve on.
    #[arg(long, env = "DEMO_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Text `GET /` answers, so two rollouts can differ.
    #[arg(long, env = "DEMO_VERSION", default_value = "v1")]
    version: String,
    /// Runtime worker threads; 0 means one per core.
    #[arg(long, env = "DEMO_WORKERS", default_value_t = 0)]
    workers: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.workers > 0 {
        rt.worker_threads(args.workers);
    }
    rt.enable_all().build()?.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!(
        "graceful-demo {} listening on {}",
        args.version,
        listener.local_addr()?
    );
    // The naive part: no drain, no waiting for in-flight requests.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        term.recv().await;
        std::process::exit(0);
    });
    let version: &'static str = Box::leak(format!("{}\n", args.version).into_boxed_str());
    let health: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(true)));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    let builder: &'static _ = Box::leak(Box::new(builder));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(move |req| route(req, version, health));
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn route(
    req: Request<Incoming>,
    version: &'static str,
    health: &'static AtomicBool,
) -> Result<Response<Body>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        // A POST too: the e2e load's POSTs, which no client sends twice, need an answer here.
        (&Method::GET | &Method::POST, "/") => text(StatusCode::OK, version),
        (&Method::GET, "/healthz") if health.load(Ordering::Relaxed) => {
            text(StatusCode::OK, "ok\n")
        }
        (&Method::GET, "/healthz") => text(StatusCode::INTERNAL_SERVER_ERROR, "unhealthy\n"),
        // Fails every later health check, so a liveness probe restarts the app (a process that
        // starts again is healthy).
        (&Method::POST, "/healthz/fail") => {
            health.store(false, Ordering::Relaxed);
            text(StatusCode::OK, "unhealthy from now on\n")
        }
        (&Method::GET | &Method::POST, "/slow") => {
            let ms = query_ms(req.uri().query()).unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(StatusCode::OK, format!("slept {ms} ms\n"))
        }
        // What the app received, one field a line: shows what a proxy in front changed.
        (&Method::GET, "/headers") => {
            let mut out = String::new();
            for (name, value) in req.headers() {
                out.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
            }
            text(StatusCode::OK, out)
        }
        // Streams the request body back as it arrives.
        (&Method::POST, "/echo") => Response::new(req.into_body().boxed_unsync()),
        (&Method::GET, "/ws") => websocket(req),
        (&Method::GET, "/events") => events(&req),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

fn query_ms(query: Option<&str>) -> Option<u64> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(body.into())
            .map_err(|n| match n {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp
}

/// Server-sent events: `id: N` and `data: N`, one every `ms` (default 100), from the one after
/// `Last-Event-ID` (or 0) on, for ever: what an `EventSource` resumes from after a reconnect.
fn events(req: &Request<Incoming>) -> Response<Body> {
    let ms = query_ms(req.uri().query()).unwrap_or(100);
    let from = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(0, |last| last + 1);
    let ticks = futures::stream::unfold(from, move |n| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let event = format!("id: {n}\ndata: {n}\n\n");
        Some((Ok(hyper::body::Frame::data(Bytes::from(event))), n + 1))
    });
    let mut resp = Response::new(http_body_util::StreamBody::new(ticks).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// WebSocket echo: answers the handshake, then sends every message back.
fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return text(StatusCode::BAD_REQUEST, "not a websocket handshake\n");
    };
    let accept = derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        // After a Close, the next poll sends the library's answer and ends the stream.
        while let Some(Ok(msg)) = ws.next().await {
            if !msg.is_close() && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = text(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64"),
    );
    resp
}
