//! Which peers are the node: the kubelet's hooks and probes reach the pod from the node's own
//! network namespace, so they come from the node's address (`status.hostIP`) or, with a bridge or
//! a Cilium-style CNI, from the address of the pod's default gateway on the node. Another pod
//! cannot open a TCP connection from either (it never sees the answers to a forged source).
//!
//! The preStop token is readable by anyone who may `get` the pod (docs/security.md), so the
//! token alone says only "someone who read the spec". What only the kubelet may do on a token's
//! strength is hold requests for as long as a real restart takes: see `Admin::prestop`.
//!
//! The default gateways are read from `/proc/net/route` and `/proc/net/ipv6_route` once, at
//! start: thirty lines of parsing, where a crate for it would bring a netlink stack.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePeers {
    addrs: Vec<IpAddr>,
}

impl NodePeers {
    /// The node's address (from the downward API, if the injector gave it) and the pod's
    /// default gateways.
    pub fn discover(host_ip: Option<IpAddr>) -> Self {
        let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
        let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
        Self::new(
            host_ip
                .into_iter()
                .chain(ipv4_gateways(&v4))
                .chain(ipv6_gateways(&v6)),
        )
    }

    pub fn new(addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut addrs: Vec<IpAddr> = addrs.into_iter().map(|a| a.to_canonical()).collect();
        addrs.sort();
        addrs.dedup();
        Self { addrs }
    }

    pub fn contains(&self, peer: IpAddr) -> bool {
        self.addrs.contains(&peer.to_canonical())
    }

    pub fn addrs(&self) -> &[IpAddr] {
        &self.addrs
    }
}

/// `/proc/net/route`: `Iface Destination Gateway Flags ...`, addresses in hex. A
/// default route has destination 0 and a gateway.
fn ipv4_gateways(table: &str) -> impl Iterator<Item = IpAddr> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let mut fields = line.split_whitespace().skip(1);
        let destination = u32::from_str_radix(fields.next()?, 16).ok()?;
        let gateway = u32::from_str_radix(fields.next()?, 16).ok()?;
        (destination == 0 && gateway != 0)
            // The kernel prints the address's bytes as a native-endian u32.
            .then(|| IpAddr::V4(Ipv4Addr::from(gateway.to_ne_bytes())))
    })
}

/// `/proc/net/ipv6_route`: `dest dest_len src src_len next_hop metric refcnt use flags iface`,
/// addresses as 32 hex digits in network order.
fn ipv6_gateways(table: &str) -> impl Iterator<Item = IpAddr> + '_ {
    table.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [dest, dest_len, _, _, next_hop, ..] = fields[..] else {
            return None;
        };
        let next_hop = u128::from_str_radix(next_hop, 16).ok()?;
        (u128::from_str_radix(dest, 16).ok()? == 0 && dest_len == "00" && next_hop != 0)
            .then(|| IpAddr::V6(Ipv6Addr::from(next_hop)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100F40A\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0000F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";
    const IPV6_ROUTE: &str = "\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003 eth0
";

    #[test]
    fn default_gateways_are_read_from_the_route_tables() {
        let v4: Vec<IpAddr> = ipv4_gateways(ROUTE).collect();
        assert_eq!(v4, ["10.244.0.1".parse::<IpAddr>().unwrap()]);
        let v6: Vec<IpAddr> = ipv6_gateways(IPV6_ROUTE).collect();
        assert_eq!(v6, ["fd00::1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn garbage_tables_give_nothing() {
        assert_eq!(ipv4_gateways("Iface\nnonsense here\n\n").count(), 0);
        assert_eq!(ipv6_gateways("zz 00 zz\n").count(), 0);
    }

    #[test]
    fn the_node_is_its_address_and_gateways_only() {
        let node = NodePeers::new(["10.0.0.5".parse().unwrap(), "10.244.0.1".parse().unwrap()]);
        assert!(node.contains("10.244.0.1".parse().unwrap()));
        assert!(node.contains("::ffff:10.0.0.5".parse().unwrap()));
        assert!(!node.contains("10.244.0.7".parse().unwrap()));
        assert!(!node.contains("127.0.0.1".parse().unwrap()));
        assert!(!NodePeers::default().contains("10.244.0.1".parse().unwrap()));
    }
}
