//! The e2e harness: everything a scenario on the real cluster needs, so each test reads like the
//! behaviour it checks. A kube client from the e2e kubeconfig ([`cluster`]), a namespace per test
//! that is deleted afterwards and dumps pod logs and events when the test fails
//! ([`namespace`]), the demo app's manifests ([`demo`]), waits with timeouts ([`wait`]), steady
//! load from vegeta with failed requests counted by vegeta itself ([`load`]), and rollouts measured
//! under that load ([`rollout`]), processes killed on the node ([`node`]), where kube-proxy routes a Service ([`kube_proxy`]), and Argo CD's health rule for Deployments ([`argo`]).

pub mod admission;
pub mod argo;
pub mod audit;
pub mod chart;
pub mod cluster;
pub mod demo;
pub mod drains;
pub mod error;
pub mod graceful;
pub mod ingress;
pub mod kube_proxy;
pub mod load;
pub mod namespace;
pub mod node;
pub mod node_proxies;
pub mod prometheus;
pub mod rollout;
pub mod scale;
pub mod slow_lb;
pub mod wait;

pub use error::{Error, Result};
