//! `kubectl graceful`: follow a GracefulRollout live and steer it from a terminal.
//!
//! - [`snapshot`]: what `status` reads from the API (the rollout, its Deployment, its pods).
//! - [`drain`]: a draining pod's figures, from its sidecar's `/metrics` through the pod proxy.
//! - [`render`]: a snapshot as text, coloured on a terminal, plain when piped.
//! - [`verbs`]: restart, pause, resume, abort, retry.

pub mod drain;
pub mod render;
pub mod snapshot;
pub mod verbs;
