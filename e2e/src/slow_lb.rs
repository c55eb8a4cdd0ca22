//! A slow L4 load balancer in front of a `type: LoadBalancer` Service, driven the way a cloud
//! load balancer controller drives one (an AWS NLB with IP targets, say): a real HAProxy process
//! in TCP mode that resends nothing (`retries 0`, no redispatch, no health checks), whose
//! targets are the Service's ready pod IPs, registered [`SlowLbConfig::register_delay`] after a
//! pod turns ready in the EndpointSlices and deregistered [`SlowLbConfig::deregister_delay`]
//! after it stops being ready: until then the balancer keeps opening new connections to it,
//! as an NLB does for 30-40 s after a target is deregistered.
//!
//! The balancer listens on a loopback address of its own (`127.25.0.N`, the Service's port),
//! which it writes into the Service's `status.loadBalancer.ingress` with `ipMode: Proxy`, as a
//! cloud controller does for a balancer that proxies (kube-proxy then leaves the address alone
//! instead of short-cutting it to the pods). Its connections to the pods leave from
//! `10.245.0.N`, a /32 of its own on the pod bridge, so the pods see the balancer's address as a
//! real balancer's IP targets do, and answer it through their default route (the node). Nothing
//! leaves the machine: clients on loopback, targets on the pod bridge.
//!
//! Every change it makes is recorded with its time (pod IP -> events), so a test can lay each
//! drain beside the moment the balancer let the pod go.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use crate::namespace::TestNamespace;
use crate::{Error, Result, wait};

/// The pod bridge (e2e/scripts/common.sh's `BRIDGE`): the balancer's source addresses live there.
const BRIDGE: &str = "graceful0";
/// The balancer's own addresses: `LISTEN_NET.N` on loopback for clients, `SOURCE_NET.N` on the
/// pod bridge for its connections to the pods. Apart from the pod, service and fake-node CIDRs.
const LISTEN_NET: [u8; 3] = [127, 25, 0];
const SOURCE_NET: [u8; 3] = [10, 245, 0];
/// HAProxy's backend and the prefix of its server slots (`be/s1` ...).
const BACKEND: &str = "be";

/// Which balancer of this process gets which N (one test runs at a time).
static NEXT: AtomicU8 = AtomicU8::new(1);

/// How slowly the balancer follows the EndpointSlices.
#[derive(Clone, Debug)]
pub struct SlowLbConfig {
    /// From a pod IP listed ready to its registration (a cloud controller's reconcile plus the
    /// balancer's initial health checks).
    pub register_delay: Duration,
    /// From a pod IP no longer listed ready to its deregistration: until then it keeps getting
    /// new connections.
    pub deregister_delay: Duration,
    /// Server slots (targets registered at once, old and new pods together).
    pub slots: usize,
    /// A connection to a target that does not answer fails after this (HAProxy `timeout connect`).
    pub connect_timeout: Duration,
}

impl Default for SlowLbConfig {
    fn default() -> Self {
        Self {
            register_delay: Duration::from_secs(3),
            deregister_delay: Duration::from_secs(30),
            slots: 48,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// What happened to one target, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbEventKind {
    /// The EndpointSlices listed the IP as ready.
    SeenReady,
    /// The balancer started sending it new connections.
    Registered,
    /// The EndpointSlices stopped listing the IP as ready (or dropped it).
    SeenNotReady,
    /// The balancer stopped sending it new connections (HAProxy's slot in maintenance).
    Deregistered,
}

#[derive(Clone, Debug)]
pub struct LbEvent {
    pub at: Timestamp,
    pub kind: LbEventKind,
}

/// One IP's state in the balancer's controller.
#[derive(Default)]
struct Target {
    /// Listed ready now, on this port.
    ready: Option<u16>,
    /// Registered in this HAProxy slot (0-based), on this port.
    slot: Option<(usize, u16)>,
    /// Bumped on every readiness change: a timer of an older generation does nothing.
    generation: u64,
}

#[derive(Default)]
struct State {
    targets: BTreeMap<String, Target>,
    slots: Vec<bool>,
    events: BTreeMap<String, Vec<LbEvent>>,
    errors: Vec<String>,
}

impl State {
    fn record(&mut self, ip: &str, kind: LbEventKind) {
        self.events.entry(ip.to_owned()).or_default().push(LbEvent {
            at: Timestamp::now(),
            kind,
        });
    }
}

/// A running slow balancer. Dropping it stops its controller, kills HAProxy and removes its
/// address and files.
pub struct SlowLb {
    pub service: String,
    /// Where clients connect: `127.25.0.N:<service port>`.
    pub listen: String,
    /// The address its connections to the pods come from.
    pub source: Ipv4Addr,
    dir: PathBuf,
    socket: PathBuf,
    haproxy: std::process::Child,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

/// `service` turned into a `type: LoadBalancer` Service without node ports (the balancer sends
/// to pod IPs, as an NLB with IP targets does).
pub fn load_balancer_service(mut service: Service) -> Service {
    let spec = service.spec.get_or_insert_with(Default::default);
    spec.type_ = Some("LoadBalancer".into());
    spec.allocate_load_balancer_node_ports = Some(false);
    service
}

impl SlowLb {
    /// Starts HAProxy for Service `service` of `ns` (a `type: LoadBalancer` Service, already
    /// created), its controller, and publishes its address in the Service's status.
    pub async fn start(ns: &TestNamespace, service: &str, config: SlowLbConfig) -> Result<Self> {
        let svc = ns.api::<Service>().get(service).await?;
        let port = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|p| p.first())
            .map(|p| p.port)
            .ok_or_else(|| Error::Cluster(format!("Service {service} has no port")))?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        if n == 0 || n > 250 {
            return Err(Error::Cluster("out of slow balancer addresses".into()));
        }
        let [a, b, c] = LISTEN_NET;
        let listen_ip = Ipv4Addr::new(a, b, c, n);
        let [a, b, c] = SOURCE_NET;
        let source = Ipv4Addr::new(a, b, c, n);
        let listen = format!("{listen_ip}:{port}");
        let dir = std::env::temp_dir().join(format!(
            "graceful-slow-lb-{}-{}-{service}",
            std::process::id(),
            n
        ));
        std::fs::create_dir_all(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let socket = dir.join("admin.sock");
        let cfg = haproxy_config(&config, &socket, &listen, source);
        let cfg_path = dir.join("haproxy.cfg");
        std::fs::write(&cfg_path, cfg).map_err(Error::io("writing haproxy.cfg"))?;

        ip(&["addr", "replace", &format!("{source}/32"), "dev", BRIDGE])?;
        let log = std::fs::File::create(dir.join("haproxy.log"))
            .map_err(Error::io("creating haproxy.log"))?;
        let haproxy = std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(Error::io("haproxy.log"))?)
            .stderr(log)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::MissingTool {
                    tool: "haproxy".into(),
                    path: "$PATH".into(),
                },
                _ => Error::Io {
                    what: "starting haproxy".into(),
                    source: e,
                },
            })?;
        let state = Arc::new(Mutex::new(State {
            slots: vec![false; config.slots],
            ..Default::default()
        }));
        let mut lb = SlowLb {
            service: service.to_owned(),
            listen,
            source,
            dir,
            socket: socket.clone(),
            haproxy,
            state: state.clone(),
            task: tokio::spawn(async {}),
        };
        // HAProxy answers its runtime API once it listens.
        let mut tries = 0;
        while let Err(e) = runtime(&socket, "show info").await {
            if let Ok(Some(status)) = lb.haproxy.try_wait() {
                return Err(Error::Cluster(format!(
                    "haproxy of {service} exited with {status}: {}",
                    lb.log()
                )));
            }
            tries += 1;
            if tries == 100 {
                return Err(Error::Cluster(format!("haproxy of {service}: {e}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        lb.task = tokio::spawn(control(
            ns.api::<EndpointSlice>(),
            service.to_owned(),
            socket,
            config,
            state,
        ));
        // As a cloud controller does once the balancer exists. ipMode Proxy: kube-proxy must not
        // route the address to the pods itself.
        let status = json!({"status": {"loadBalancer": {"ingress": [
            {"ip": listen_ip.to_string(), "ipMode": "Proxy"}
        ]}}});
        ns.api::<Service>()
            .patch_status(service, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(lb)
    }

    /// `http://<listen>/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.listen)
    }

    /// Pod IP -> what the balancer saw and did, in order.
    pub async fn events(&self) -> BTreeMap<String, Vec<LbEvent>> {
        self.state.lock().await.events.clone()
    }

    /// Runtime commands HAProxy refused, and watch errors.
    pub async fn errors(&self) -> Vec<String> {
        self.state.lock().await.errors.clone()
    }

    /// IPs registered now, and IPs listed ready now.
    pub async fn targets(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let state = self.state.lock().await;
        let registered = state
            .targets
            .iter()
            .filter(|(_, t)| t.slot.is_some())
            .map(|(ip, _)| ip.clone())
            .collect();
        let ready = state
            .targets
            .iter()
            .filter(|(_, t)| t.ready.is_some())
            .map(|(ip, _)| ip.clone())
            .collect();
        (registered, ready)
    }

    /// Waits until the balancer sends to exactly the `n` IPs the EndpointSlices list ready:
    /// every registration and deregistration it owed is done.
    pub async fn wait_settled(&self, n: usize, timeout: Duration) -> Result<()> {
        wait::until_seen(
            &format!("the balancer of {} settled on {n} targets", self.service),
            timeout,
            || async {
                let (registered, ready) = self.targets().await;
                if registered == ready && registered.len() == n {
                    Ok(Ok(()))
                } else {
                    Ok(Err(format!("registered {registered:?}, ready {ready:?}")))
                }
            },
        )
        .await
    }

    /// HAProxy's own view of its servers (`show servers state`), for a failure's diagnostics.
    pub async fn servers(&self) -> String {
        runtime(&self.socket, &format!("show servers state {BACKEND}"))
            .await
            .unwrap_or_else(|e| e)
    }

    /// HAProxy's log so far (its warnings and one `option tcplog` line per connection).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }

    /// Connections HAProxy could not open to a target (`SC` in its log): what the clients saw
    /// as a connection closed without an answer.
    pub fn connect_failures(&self) -> usize {
        self.log().lines().filter(|l| l.contains(" SC ")).count()
    }
}

impl Drop for SlowLb {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.haproxy.kill();
        let _ = self.haproxy.wait();
        if let Err(e) = ip(&["addr", "del", &format!("{}/32", self.source), "dev", BRIDGE]) {
            eprintln!("slow balancer of {}: {e}", self.service);
        }
        if std::env::var_os("GRACEFUL_E2E_KEEP").is_some() {
            eprintln!("slow balancer files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn haproxy_config(
    config: &SlowLbConfig,
    socket: &std::path::Path,
    listen: &str,
    source: Ipv4Addr,
) -> String {
    format!(
        "# graceful-e2e slow load balancer (e2e/src/slow_lb.rs)\n\
         global\n\
         \x20   maxconn 4096\n\
         \x20   stats socket {socket} level admin mode 600\n\
         \x20   log stderr format raw local0 info\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   log global\n\
         \x20   option tcplog\n\
         \x20   timeout connect {connect}ms\n\
         \x20   timeout client 60s\n\
         \x20   timeout server 60s\n\
         \x20   # An NLB resends nothing: a failed connection to a target fails the client's.\n\
         \x20   retries 0\n\
         frontend fe\n\
         \x20   bind {listen}\n\
         \x20   default_backend {BACKEND}\n\
         backend {BACKEND}\n\
         \x20   balance roundrobin\n\
         \x20   source {source}\n\
         \x20   # No health checks: targets come and go by the controller alone; all start in maint.\n\
         \x20   server-template s 1-{slots} 127.0.0.1:1 disabled\n",
        socket = socket.display(),
        connect = config.connect_timeout.as_millis(),
        slots = config.slots,
    )
}

/// `ip ARGS...` (iproute2).
fn ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(Error::io("running ip"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: format!("ip {}", args.join(" ")),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// One command on HAProxy's runtime API; its answer (the socket closes after it).
async fn runtime(socket: &std::path::Path, command: &str) -> Result<String, String> {
    let exchange = async {
        let mut stream = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
        stream
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(|e| format!("writing {command:?}: {e}"))?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .await
            .map_err(|e| format!("reading the answer to {command:?}: {e}"))?;
        Ok(answer)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| format!("{command:?}: no answer in 5 s"))?
}

/// A command whose success is an empty answer (`set server ... state`).
async fn runtime_quiet(socket: &std::path::Path, command: &str) -> Result<(), String> {
    let answer = runtime(socket, command).await?;
    match answer.trim() {
        "" => Ok(()),
        other => Err(format!("{command:?}: {other}")),
    }
}

/// Ready pod IP -> port of every slice of the Service.
fn ready_targets(slices: &BTreeMap<String, EndpointSlice>) -> BTreeMap<String, u16> {
    let mut ready = BTreeMap::new();
    for slice in slices.values() {
        if slice.address_type != "IPv4" {
            continue;
        }
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find_map(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // A nil ready means ready (the EndpointSlice API's rule).
            if endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true)
            {
                for addr in &endpoint.addresses {
                    ready.insert(addr.clone(), port);
                }
            }
        }
    }
    ready
}

/// The balancer's controller: watches the Service's EndpointSlices and registers and
/// deregisters targets late, each change on a timer of its own.
async fn control(
    api: kube::Api<EndpointSlice>,
    service: String,
    socket: PathBuf,
    config: SlowLbConfig,
    state: Arc<Mutex<State>>,
) {
    let selector = format!("kubernetes.io/service-name={service}");
    let events = watcher::watcher(api, watcher::Config::default().labels(&selector));
    futures::pin_mut!(events);
    let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, EndpointSlice>> = None;
    let mut timers = JoinSet::new();
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            Some(_) = timers.join_next(), if !timers.is_empty() => continue,
        };
        let Some(event) = event else { return };
        let name = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
        match event {
            Ok(watcher::Event::Apply(s)) => {
                slices.insert(name(&s), s);
            }
            Ok(watcher::Event::Delete(s)) => {
                slices.remove(&name(&s));
            }
            Ok(watcher::Event::Init) => {
                listing = Some(BTreeMap::new());
                continue;
            }
            Ok(watcher::Event::InitApply(s)) => {
                listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name(&s), s);
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                slices = listing.take().unwrap_or_default();
            }
            Err(e) => {
                state
                    .lock()
                    .await
                    .errors
                    .push(format!("watching the slices of {service}: {e}"));
                continue;
            }
        }
        let ready = ready_targets(&slices);
        let mut st = state.lock().await;
        let known: BTreeSet<String> = st.targets.keys().cloned().collect();
        for ip in known.iter().chain(ready.keys()) {
            let now = ready.get(ip).copied();
            let target = st.targets.entry(ip.clone()).or_default();
            if target.ready == now {
                continue;
            }
            let was_ready = target.ready.is_some();
            target.ready = now;
            target.generation += 1;
            let generation = target.generation;
            let (kind, delay) = match (was_ready, now.is_some()) {
                (false, true) => (LbEventKind::SeenReady, config.register_delay),
                (true, false) => (LbEventKind::SeenNotReady, config.deregister_delay),
                // Ready on another port: deregister at once, register again late.
                _ => (LbEventKind::SeenReady, config.register_delay),
            };
            st.record(ip, kind);
            let (ip, socket, state) = (ip.clone(), socket.clone(), state.clone());
            timers.spawn(async move {
                tokio::time::sleep(delay).await;
                apply(&socket, &state, &ip, generation).await;
            });
        }
    }
}

/// What a timer does when it fires: brings the balancer in line with the IP's readiness, unless
/// that changed since the timer was set.
async fn apply(socket: &std::path::Path, state: &Mutex<State>, ip: &str, generation: u64) {
    let mut st = state.lock().await;
    let Some(target) = st.targets.get(ip) else {
        return;
    };
    if target.generation != generation {
        return;
    }
    let (want, have) = (target.ready, target.slot);
    let mut failed = Vec::new();
    // Out first: not ready, or ready on another port.
    if let Some((slot, port)) = have
        && want != Some(port)
    {
        let command = format!("set server {BACKEND}/s{} state maint", slot + 1);
        match runtime_quiet(socket, &command).await {
            Ok(()) => {
                st.slots[slot] = false;
                if let Some(t) = st.targets.get_mut(ip) {
                    t.slot = None;
                }
                st.record(ip, LbEventKind::Deregistered);
            }
            Err(e) => failed.push(e),
        }
    }
    let registered = st.targets.get(ip).and_then(|t| t.slot).is_some();
    if let (Some(port), false) = (want, registered) {
        match st.slots.iter().position(|used| !used) {
            None => failed.push(format!("no free slot for {ip}")),
            Some(slot) => {
                let server = format!("{BACKEND}/s{}", slot + 1);
                let set_addr = format!("set server {server} addr {ip} port {port}");
                let added = match runtime(socket, &set_addr).await {
                    Ok(answer) if answer.contains("changed") || answer.contains("no need") => {
                        runtime_quiet(socket, &format!("set server {server} state ready")).await
                    }
                    Ok(answer) => Err(format!("{set_addr:?}: {}", answer.trim())),
                    Err(e) => Err(e),
                };
                match added {
                    Ok(()) => {
                        st.slots[slot] = true;
                        if let Some(t) = st.targets.get_mut(ip) {
                            t.slot = Some((slot, port));
                        }
                        st.record(ip, LbEventKind::Registered);
                    }
                    Err(e) => failed.push(e),
                }
            }
        }
    }
    for e in failed {
        eprintln!("slow balancer: {e}");
        st.errors.push(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, port: i32, endpoints: &[(&str, Option<bool>)]) -> (String, EndpointSlice) {
        let endpoints: Vec<_> = endpoints
            .iter()
            .map(|(ip, ready)| json!({"addresses": [ip], "conditions": {"ready": ready}}))
            .collect();
        let s = serde_json::from_value(json!({
            "metadata": {"name": name},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port}],
            "endpoints": endpoints,
        }))
        .unwrap();
        (name.to_owned(), s)
    }

    #[test]
    fn targets_are_the_ready_addresses_of_every_slice_with_their_port() {
        let slices = BTreeMap::from([
            slice(
                "a",
                8080,
                &[("10.0.0.1", Some(true)), ("10.0.0.2", Some(false))],
            ),
            slice("b", 9080, &[("10.0.0.3", None)]),
        ]);
        let got: Vec<_> = ready_targets(&slices).into_iter().collect();
        assert_eq!(
            got,
            [("10.0.0.1".to_owned(), 8080), ("10.0.0.3".to_owned(), 9080)]
        );
    }

    #[test]
    fn the_config_resends_nothing_and_starts_every_slot_in_maintenance() {
        let cfg = haproxy_config(
            &SlowLbConfig::default(),
            std::path::Path::new("/tmp/x/admin.sock"),
            "127.25.0.1:80",
            Ipv4Addr::new(10, 245, 0, 1),
        );
        for line in [
            "mode tcp",
            "retries 0",
            "balance roundrobin",
            "source 10.245.0.1",
            "bind 127.25.0.1:80",
            "stats socket /tmp/x/admin.sock level admin",
            "server-template s 1-48 127.0.0.1:1 disabled",
        ] {
            assert!(cfg.contains(line), "{line:?} missing from:\n{cfg}");
        }
        // Directives only: the comments may say what is left out.
        let directives: Vec<&str> = cfg
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        assert!(
            directives
                .iter()
                .all(|l| !l.contains("redispatch") && !l.contains(" check")),
            "{cfg}"
        );
    }
}
