//! Real processes on real sockets: the built sidecar and demo binaries, a raw HTTP/1.1 client
//! (so tests see the exact bytes a client gets) and a third-party load generator (hey).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const TOKEN: &str = "test-token-123";

pub fn sidecar_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_graceful-sidecar"))
}

/// The demo binary sits next to the sidecar in the target dir (`make unit` builds all bins).
pub fn demo_bin() -> PathBuf {
    let p = sidecar_bin().with_file_name("graceful-demo");
    assert!(
        p.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (make unit does)",
        p.display()
    );
    p
}

/// The load generator installed by scripts/deps.sh; a missing one fails the test.
pub fn hey_bin() -> PathBuf {
    let cache = std::env::var("GRACEFUL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/graceful")
        });
    let p = cache.join("bin/hey");
    if p.exists() {
        return p;
    }
    if let Ok(out) = Command::new("sh").args(["-c", "command -v hey"]).output() {
        let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !s.is_empty() {
            return PathBuf::from(s);
        }
    }
    panic!(
        "hey not found in {} or PATH: run `scripts/deps.sh --host` (make test does)",
        p.display()
    );
}

/// A fixed address nothing listens on yet, for an app that must listen where it did after a
/// restart (or for one that never listens). Its port is below the kernel's ephemeral range,
/// where `bind(0)` and outgoing connections take theirs, and no two calls in a test process
/// share one: so nothing else can take it between this check and the app's own bind. It is
/// below Kubernetes' NodePort range too: with the e2e cluster up, kube-proxy (iptables mode)
/// can redirect a connection to 127.0.0.1 on a NodePort to a Service. Processes that may
/// listen anywhere take port 0 instead and say which port they got.
pub fn free_addr() -> SocketAddr {
    const FIRST: u16 = 20000;
    const NODE_PORTS: u16 = 30000;
    static NEXT: AtomicU16 = AtomicU16::new(FIRST);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let end = NODE_PORTS.min(ephemeral);
    loop {
        let port = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(port < end, "no free port left in {FIRST}..{end}");
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap();
        }
    }
}

/// A child process killed when the test ends, with its stderr collected.
pub struct Proc {
    pub child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Proc { child, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} {} failed", self.pid());
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the exit, failing the test past `limit`.
    pub async fn exit_within(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "process did not exit within {limit:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for the line a process logs once it listens, and returns the address it names after
/// `key` (`listen=` in the sidecar's log, `listening on ` in the demo's).
async fn logged_addr(proc: &mut Proc, what: &str, key: &str) -> SocketAddr {
    let start = Instant::now();
    loop {
        let found = proc.stderr().split(key).nth(1).and_then(|rest| {
            rest.split(|c: char| c.is_whitespace())
                .next()?
                .parse::<SocketAddr>()
                .ok()
        });
        if let Some(addr) = found {
            return addr;
        }
        if let Some(status) = proc.child.try_wait().unwrap() {
            panic!("{what} exited early ({status}): {}", proc.stderr());
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what} never logged `{key}`: {}",
            proc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_listening(addr: SocketAddr, what: &str, proc: &mut Proc) {
    let start = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        if let Some(status) = proc.child.try_wait().unwrap() {
            panic!("{what} exited early ({status}): {}", proc.stderr());
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what} not listening on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The demo on a port the kernel picks.
pub async fn start_demo() -> (Proc, SocketAddr) {
    let mut p = spawn_demo("127.0.0.1:0".parse().unwrap());
    let addr = logged_addr(&mut p, "graceful-demo", "listening on ").await;
    wait_listening(addr, "graceful-demo", &mut p).await;
    (p, addr)
}

/// The demo on a given address: a restarted app listens where it did before.
pub async fn start_demo_at(addr: SocketAddr) -> Proc {
    let mut p = spawn_demo(addr);
    wait_listening(addr, "graceful-demo", &mut p).await;
    p
}

fn spawn_demo(addr: SocketAddr) -> Proc {
    Proc::spawn(Command::new(demo_bin()).args(["--listen", &addr.to_string(), "--workers", "2"]))
}

pub struct Sidecar {
    pub proc: Proc,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

/// The sidecar on two ports the kernel picks, read back from its `serving` log line.
pub async fn start_sidecar(upstream: SocketAddr, args: &[&str]) -> Sidecar {
    let mut p = Proc::spawn(
        Command::new(sidecar_bin())
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--upstream", &upstream.to_string(), "--workers", "2"])
            .args(args)
            .env_remove("GRACEFUL_POD_IP")
            .env_remove("GRACEFUL_PRESTOP_TOKEN")
            .env_remove("GRACEFUL_LOG"),
    );
    let listen = logged_addr(&mut p, "graceful-sidecar", " listen=").await;
    let admin = logged_addr(&mut p, "graceful-sidecar", " admin=").await;
    wait_listening(admin, "graceful-sidecar admin", &mut p).await;
    wait_listening(listen, "graceful-sidecar traffic", &mut p).await;
    Sidecar {
        proc: p,
        listen,
        admin,
    }
}

impl Sidecar {
    /// Calls /prestop in the background; resolves to its response when the drain is done.
    pub fn prestop(&self, token: Option<&str>) -> tokio::task::JoinHandle<Response> {
        let admin = self.admin;
        let header = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        tokio::spawn(async move { get_with(admin, "/prestop", &header).await })
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let body = get(self.admin, "/metrics").await.body;
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{body}"))
            .trim()
            .parse()
            .unwrap()
    }

    pub async fn wait_phase(&self, phase: &str) {
        let start = Instant::now();
        let needle = format!("graceful_drain_phase{{phase=\"{phase}\"}} 1");
        while !get(self.admin, "/metrics").await.body.contains(&needle) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "never reached phase {phase}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A raw HTTP/1.1 connection: requests go out byte for byte, responses are read by
/// Content-Length, so a test sees exactly what a client would.
pub struct H1 {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> H1 {
        H1 {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, path: &str, extra_headers: &str) {
        self.send_method("GET", path, extra_headers).await;
    }

    pub async fn send_method(&mut self, method: &str, path: &str, extra_headers: &str) {
        let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n{extra_headers}\r\n");
        self.stream.write_all(req.as_bytes()).await.unwrap();
    }

    pub async fn read_response(&mut self) -> std::io::Result<Response> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_string();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        while self.buf.len() < len {
            self.fill().await?;
        }
        let body = String::from_utf8_lossy(&self.buf[..len]).to_string();
        self.buf.drain(..len);
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    pub async fn get(&mut self, path: &str) -> std::io::Result<Response> {
        self.send(path, "").await;
        self.read_response().await
    }

    /// True when the server closed the connection (EOF or reset) within `limit`.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut b = [0u8; 64];
        matches!(
            tokio::time::timeout(limit, self.stream.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut b = [0u8; 16384];
        let n = self.stream.read(&mut b).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&b[..n]);
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One request on its own connection.
pub async fn get(addr: SocketAddr, path: &str) -> Response {
    get_with(addr, path, "").await
}

pub async fn get_with(addr: SocketAddr, path: &str, headers: &str) -> Response {
    let mut c = H1::connect(addr).await;
    c.send(path, &format!("{headers}Connection: close\r\n"))
        .await;
    c.read_response().await.unwrap()
}

/// What hey reports: responses by status code and transport errors.
#[derive(Debug, Default)]
pub struct HeyReport {
    pub codes: BTreeMap<u16, u64>,
    pub errors: Vec<String>,
    pub raw: String,
}

impl HeyReport {
    pub fn ok(&self) -> u64 {
        self.codes.get(&200).copied().unwrap_or(0)
    }
    pub fn failed(&self) -> u64 {
        let non_200: u64 = self
            .codes
            .iter()
            .filter(|(c, _)| **c != 200)
            .map(|(_, n)| n)
            .sum();
        let errors: u64 = self
            .errors
            .iter()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix('[')?
                    .split(']')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        non_200 + errors
    }
}

/// Runs hey for `duration` with `conns` keep-alive connections against `url`.
pub fn hey(url: &str, conns: u32, duration: Duration) -> tokio::task::JoinHandle<HeyReport> {
    hey_with(url, conns, duration, &[])
}

/// hey with more arguments (`-m POST -d body`, `-q rate`...).
pub fn hey_with(
    url: &str,
    conns: u32,
    duration: Duration,
    extra: &[&str],
) -> tokio::task::JoinHandle<HeyReport> {
    let bin = hey_bin();
    let url = url.to_owned();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(bin)
            .args([
                "-z",
                &format!("{}ms", duration.as_millis()),
                "-c",
                &conns.to_string(),
                "-t",
                "20",
            ])
            .args(&extra)
            .arg(&url)
            .output()
            .expect("run hey");
        let raw = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "hey failed: {raw}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_hey(&raw)
    })
}

pub fn parse_hey(raw: &str) -> HeyReport {
    let mut r = HeyReport {
        raw: raw.to_owned(),
        ..Default::default()
    };
    let mut section = "";
    for line in raw.lines() {
        let t = line.trim();
        if t.ends_with("distribution:") {
            section = if t.starts_with("Status code") {
                "codes"
            } else if t.starts_with("Error") {
                "errors"
            } else {
                ""
            };
            continue;
        }
        if t.is_empty() {
            continue;
        }
        match section {
            "codes" => {
                if let Some((code, rest)) = t.strip_prefix('[').and_then(|s| s.split_once(']')) {
                    let n = rest.split_whitespace().next().unwrap().parse().unwrap();
                    r.codes.insert(code.parse().unwrap(), n);
                }
            }
            "errors" if t.starts_with('[') => r.errors.push(t.to_owned()),
            _ => {}
        }
    }
    r
}
