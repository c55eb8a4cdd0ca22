//! graceful-operator: the GracefulRollout controller and the sidecar-injection webhook.

pub mod backoff;
pub mod cert_rotation;
pub mod certs;
pub mod crd;
pub mod drains;
pub mod endpoint_reader;
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod outage;
pub mod pacing;
pub mod plan;
pub mod revision;
pub mod rollout;
pub mod scope;
pub mod uninstall;
pub mod webhook;

pub use error::{Error, Result};
