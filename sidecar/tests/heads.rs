//! Request heads from anyone, through the built sidecar to the demo app: whatever bytes a client
//! sends, it gets an HTTP response or a closed connection, and the sidecar goes on serving.
//! A fixed seed in `make test` (PROPTEST_RNG_SEED), many more cases in `make fuzz`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A head close to HTTP/1.1: a request line and header lines made of valid and broken parts.
fn head() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        Just("GET".to_owned()),
        Just("POST".to_owned()),
        Just("CONNECT".to_owned()),
        Just("PRI".to_owned()),
        "[A-Z]{0,8}",
        "[ -~]{0,8}",
    ];
    let target = prop_oneof![
        Just("/".to_owned()),
        Just("*".to_owned()),
        Just("http://x:1/".to_owned()),
        "/[ -~]{0,40}",
        "[^\r\n]{0,40}",
    ];
    let version = prop_oneof![
        Just("HTTP/1.1"),
        Just("HTTP/1.0"),
        Just("HTTP/2.0"),
        Just("HTTP/9"),
        Just(""),
    ];
    let header = prop_oneof![
        Just("Host: x".to_owned()),
        Just("Transfer-Encoding: chunked".to_owned()),
        Just("Content-Length: 5".to_owned()),
        Just("Content-Length: -1".to_owned()),
        Just("Connection: upgrade".to_owned()),
        Just("Upgrade: websocket".to_owned()),
        Just("Expect: 100-continue".to_owned()),
        "[!-9;-~]{1,12}: [ -~]{0,30}",
        "[ -~]{0,40}",
    ];
    let structured = (
        method,
        target,
        version,
        prop::collection::vec(header, 0..6),
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(|(m, t, v, headers, body)| {
            let mut bytes = format!("{m} {t} {v}\r\n").into_bytes();
            for h in headers {
                bytes.extend_from_slice(h.as_bytes());
                bytes.extend_from_slice(b"\r\n");
            }
            bytes.extend_from_slice(b"\r\n");
            bytes.extend_from_slice(&body);
            bytes
        });
    prop_oneof![
        3 => structured,
        1 => prop::collection::vec(any::<u8>(), 0..300),
    ]
}

/// Sends `bytes`, half-closes, and reads until the sidecar closes: what came back.
async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await {
        Ok(_) => Ok(answer),
        Err(_) => Err(format!(
            "no end within 5 s; so far {:?}",
            String::from_utf8_lossy(&answer)
        )),
    }
}

#[test]
fn any_head_gets_a_response_or_a_close_and_the_sidecar_serves_on() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_demo, sidecar) = rt.block_on(async {
        let (demo, app) = start_demo().await;
        (demo, start_sidecar(app, &[]).await)
    });
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    });
    let (answered, closed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let result = runner.run(&head(), |bytes| {
        let answer = rt
            .block_on(exchange(sidecar.listen, &bytes))
            .map_err(TestCaseError::fail)?;
        match answer.is_empty() {
            true => closed.fetch_add(1, Ordering::Relaxed),
            false => answered.fetch_add(1, Ordering::Relaxed),
        };
        prop_assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1."),
            "{:?} answered {:?}",
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&answer)
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\nsidecar log:\n{}", sidecar.proc.stderr());
    }
    eprintln!(
        "heads: {} answered, {} closed without an answer",
        answered.into_inner(),
        closed.into_inner()
    );
    let ok = rt.block_on(get(sidecar.listen, "/"));
    assert_eq!(ok.status, 200, "the sidecar stopped serving");
    assert!(
        !sidecar.proc.stderr().contains("panicked"),
        "{}",
        sidecar.proc.stderr()
    );
}
