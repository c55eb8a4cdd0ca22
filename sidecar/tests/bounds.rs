//! What the traffic port allows a client: silent and slow connections are closed after the
//! header read timeout while real requests are served beside them, a connection that made a
//! request only after the (longer) idle timeout, and past the connection limit new connections
//! wait instead of failing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(2);
const IDLE: Duration = Duration::from_secs(5);

/// True once the peer closed `stream` (EOF or reset), read within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut b = [0u8; 256];
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn silent_and_slow_connections_are_closed_while_requests_are_served() {
    let (_demo, app) = start_demo().await;
    let sidecar = start_sidecar(
        app,
        &["--header-read-timeout", "2s", "--idle-timeout", "5s"],
    )
    .await;
    let opened = Instant::now();
    // Silent: connect and send nothing (protocol detection would wait for ever).
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(TcpStream::connect(sidecar.listen).await.unwrap());
    }
    // Slow: a request head at a byte every 300 ms, never finished within 2 s.
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(sidecar.listen).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        slow.push(s);
    }
    let trickle = tokio::spawn(async move {
        for _ in 0..20 {
            for s in &mut slow {
                let _ = s.write_all(b"X").await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        slow
    });
    // Real requests beside them, each on a new connection, all answered.
    for _ in 0..100 {
        assert_eq!(get(sidecar.listen, "/").await.status, 200);
    }
    // A keep-alive client that made a request is left alone until the idle timeout.
    let mut used = H1::connect(sidecar.listen).await;
    assert_eq!(used.get("/").await.unwrap().status, 200);
    let idle_since = Instant::now();

    for (i, s) in silent.iter_mut().enumerate() {
        let left =
            (opened + TIMEOUT + Duration::from_secs(1)).saturating_duration_since(Instant::now());
        assert!(
            closed_within(s, left).await,
            "silent connection {i} still open {:?} after it opened",
            opened.elapsed()
        );
    }
    let left =
        (idle_since + IDLE - Duration::from_millis(500)).saturating_duration_since(Instant::now());
    assert!(
        !used.closed_within(left).await,
        "a used connection closed before the idle timeout"
    );
    assert!(
        used.closed_within(Duration::from_millis(1500)).await,
        "a used connection still open {:?} after its request",
        idle_since.elapsed()
    );
    let mut slow = trickle.await.unwrap();
    for (i, s) in slow.iter_mut().enumerate() {
        assert!(
            closed_within(s, Duration::from_millis(500)).await,
            "slow connection {i} still open {:?} after it opened",
            opened.elapsed()
        );
    }
    assert!(
        opened.elapsed() >= TIMEOUT,
        "closed before the timeout: {:?}",
        opened.elapsed()
    );
}

#[tokio::test]
async fn past_the_connection_limit_new_connections_wait_and_are_then_served() {
    let (_demo, app) = start_demo().await;
    let sidecar = start_sidecar(app, &["--max-connections", "20"]).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut c = H1::connect(sidecar.listen).await;
        assert_eq!(c.get("/").await.unwrap().status, 200);
        held.push(c);
    }
    // The 21st connects (the kernel's backlog takes it) but is not served while all 20 are held.
    let waiting = tokio::spawn(get(sidecar.listen, "/"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    if waiting.is_finished() {
        panic!(
            "served past the connection limit: {:?}\n{}",
            waiting.await,
            sidecar.proc.stderr()
        );
    }
    held.pop();
    let response = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert_eq!(response.status, 200);
}
