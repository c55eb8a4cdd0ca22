//! The network rule, shown on the cluster: a pod's packets for anywhere but the bridge, the host
//! and service addresses are dropped on the host. "Anywhere" is a network namespace this test
//! makes, reached through a veth, so that a broken guard would still keep every packet on this
//! machine.

use std::process::Command;
use std::time::Duration;

use graceful_e2e::cluster::{self, kubectl_output};
use graceful_e2e::demo;
use graceful_e2e::namespace::TestNamespace;
use graceful_e2e::wait;

/// The stand-in for "outside": a namespace behind a veth, TEST-NET-2 addresses (RFC 5737).
const PROBE_NS: &str = "graceful-egress-probe";
const HOST_END: &str = "gprobe-host";
const PROBE_END: &str = "gprobe-ns";
const HOST_ADDR: &str = "198.51.100.1/30";
const PROBE_ADDR: &str = "198.51.100.2";

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Probe;

impl Probe {
    fn create() -> Self {
        Self::remove();
        run(&["ip", "netns", "add", PROBE_NS]);
        run(&[
            "ip", "link", "add", HOST_END, "type", "veth", "peer", "name", PROBE_END,
        ]);
        run(&["ip", "link", "set", PROBE_END, "netns", PROBE_NS]);
        run(&["ip", "addr", "add", HOST_ADDR, "dev", HOST_END]);
        run(&["ip", "link", "set", HOST_END, "up"]);
        let in_ns = |cmd: &[&str]| {
            let mut args = vec!["ip", "netns", "exec", PROBE_NS];
            args.extend_from_slice(cmd);
            run(&args)
        };
        in_ns(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        in_ns(&[
            "ip",
            "addr",
            "add",
            &format!("{PROBE_ADDR}/30"),
            "dev",
            PROBE_END,
        ]);
        in_ns(&["ip", "link", "set", PROBE_END, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        Probe
    }

    /// TCP SYNs the probe namespace received for port 80 (an iptables counter inside it).
    fn syns(&self) -> u64 {
        let out = run(&[
            "ip", "netns", "exec", PROBE_NS, "iptables", "-w", "-L", "INPUT", "-v", "-x", "-n",
        ]);
        out.lines()
            .find(|l| l.contains("dpt:80"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter in {out}"))
    }

    fn remove() {
        let _ = Command::new("ip").args(["link", "del", HOST_END]).output();
        let _ = Command::new("ip").args(["netns", "del", PROBE_NS]).output();
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        Self::remove();
    }
}

#[tokio::test]
#[ignore = "needs the e2e cluster (make e2e)"]
async fn pod_packets_for_outside_the_cluster_are_dropped_on_the_host() {
    let client = cluster::client().await.unwrap();
    let ns = TestNamespace::create(&client, "egress").await.unwrap();
    let probe = Probe::create();
    run(&[
        "ip", "netns", "exec", PROBE_NS, "iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport",
        "80", "--syn",
    ]);

    // The route works: from the host itself, SYNs reach the probe (nothing listens: refused).
    let before = probe.syns();
    let _ = Command::new("curl")
        .args(["-s", "--max-time", "2", &format!("http://{PROBE_ADDR}/")])
        .output();
    assert!(
        probe.syns() > before,
        "the host's own SYN did not reach the probe"
    );

    // From a pod the same address is one hop further, and the guard drops it on the host.
    let before = probe.syns();
    let url = format!("http://{PROBE_ADDR}/");
    ns.apply(&demo::pod(
        "hey",
        &demo::image("hey"),
        &["-n", "3", "-c", "1", "-t", "2", &url],
    ))
    .await
    .unwrap();
    let phase = wait::pod_finished(&ns.api(), "hey", Duration::from_secs(60))
        .await
        .unwrap();
    let logs = kubectl_output(&["logs", "hey", "-n", &ns.name]).unwrap();
    eprintln!("hey in a pod to {url} ({phase}):\n{logs}");
    assert!(!logs.contains("[200]"), "a pod reached outside: {logs}");
    assert!(
        logs.contains("Error distribution"),
        "hey saw no error: {logs}"
    );
    assert_eq!(
        probe.syns(),
        before,
        "a pod's SYN arrived outside the cluster"
    );
}
