//! One error type for the controller.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A write made on a stale read: 409, or a JSON Patch `test` on the resourceVersion that
    /// failed (the API server's 422 for a patch that does not apply, as opposed to the 422 of a
    /// validation error, which names the object).
    pub fn is_conflict(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(e)) => {
                e.code == 409
                    || (e.code == 422 && e.message.starts_with("the server rejected our request"))
            }
            Error::Finalizer(e) => matches!(
                e.as_ref(),
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                    | kube::runtime::finalizer::Error::CleanupFailed(inner) if inner.is_conflict()
            ),
            _ => false,
        }
    }

    /// A short label for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Invalid(_) => "invalid",
        }
    }
}
