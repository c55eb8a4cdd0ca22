//! A TCP relay that hands on what the upstream sends `--lag-ms` late, and what the client sends
//! at once: put between a kube-proxy and the apiserver (e2e/scripts/node-proxies.sh), every
//! watch event reaches that kube-proxy exactly that late, so it applies every change that much
//! behind the others, however many changes come (kube-proxy's own `minSyncPeriod` only spaces
//! its syncs: a change after a quiet spell still applies at once).
//!
//! The first `--grace-ms` of each connection pass undelayed: client-go gives a TLS handshake
//! 10 s, and the first lists come with it. Bytes keep their order. No traffic leaves the host:
//! the upstream is the apiserver's address on the pod bridge.

use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Parser)]
#[command(about = "Relays TCP to an upstream, delivering the upstream's bytes late")]
struct Args {
    /// Where to listen (ip:port).
    #[arg(long)]
    listen: String,
    /// Where to connect (ip:port).
    #[arg(long)]
    upstream: String,
    /// How late the upstream's bytes reach the client.
    #[arg(long)]
    lag_ms: u64,
    /// The start of each connection that is not delayed.
    #[arg(long, default_value_t = 3000)]
    grace_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let lag = Duration::from_millis(args.lag_ms);
    let grace = Duration::from_millis(args.grace_ms);
    let listener = TcpListener::bind(&args.listen).await?;
    eprintln!(
        "lag_relay: {} -> {}, upstream's bytes {lag:?} late after the first {grace:?}",
        args.listen, args.upstream
    );
    loop {
        let (client, peer) = listener.accept().await?;
        let upstream = args.upstream.clone();
        tokio::spawn(async move {
            match TcpStream::connect(&upstream).await {
                Ok(server) => {
                    if let Err(e) = relay(client, server, lag, grace).await {
                        eprintln!("lag_relay: {peer}: {e}");
                    }
                }
                Err(e) => eprintln!("lag_relay: {peer}: connecting to {upstream}: {e}"),
            }
        });
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    lag: Duration,
    grace: Duration,
) -> std::io::Result<()> {
    let opened = Instant::now();
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let up = async {
        tokio::io::copy(&mut client_rx, &mut server_tx).await?;
        server_tx.shutdown().await
    };
    // What the server sent, each chunk with the moment it may reach the client (None: its end).
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut last = opened;
        loop {
            let n = server_rx.read(&mut buf).await?;
            let now = Instant::now();
            let due = if now.duration_since(opened) < grace {
                now
            } else {
                now + lag
            };
            // Never before an earlier chunk: the stream keeps its order.
            last = last.max(due);
            let chunk = (n > 0).then(|| buf[..n].to_vec());
            if tx.send((last, chunk)).is_err() || n == 0 {
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            match chunk {
                Some(bytes) => client_tx.write_all(&bytes).await?,
                None => break,
            }
        }
        client_tx.shutdown().await
    };
    let down = async {
        let (r, w) = tokio::join!(read, write);
        r.and(w)
    };
    // Each side's end is passed on (shutdown); an error in either ends the connection.
    tokio::try_join!(up, down).map(|_| ())
}
