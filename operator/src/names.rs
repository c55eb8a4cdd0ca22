//! Every name and key the operator writes into the cluster, in one place (docs/rollout.md says
//! who writes which, and when).

/// Field manager of every write of the operator, and the Event reporter.
pub const MANAGER: &str = "graceful-operator";
/// On a GracefulRollout: the finalizer that hands the Deployment back exactly as it was.
pub const FINALIZER: &str = "graceful.dev/hand-back";
/// Label on a managed Deployment: the GracefulRollout that manages it. It stays at rest; the
/// Deployment webhook selects on it, so unmanaged Deployments never reach the operator.
pub const MANAGED_LABEL: &str = "graceful.dev/rollout";
/// Annotation on a managed Deployment, present only while a rollout is paced: the user's own
/// values of the fields graceful holds (`minReadySeconds`, `strategy`), restored at the end.
pub const HELD_ANNOTATION: &str = "graceful.dev/held";
/// What the API server defaults a Deployment's `progressDeadlineSeconds` to.
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: i32 = 600;
/// The `pod-template-hash` label the Deployment controller puts on its ReplicaSets and pods.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// The Deployment condition reason the Deployment controller sets when progress stalled.
pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";

/// The injected sidecar's admin port (`/metrics`, `/prestop`), by name, as the webhook declares it.
pub const ADMIN_PORT_NAME: &str = "graceful-admin";
