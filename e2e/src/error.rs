use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the e2e kubeconfig {path}: {message} (is the cluster up? make cluster-up)")]
    Kubeconfig { path: String, message: String },
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("{tool} is missing (looked at {path}): run scripts/deps.sh or make deps")]
    MissingTool { tool: String, path: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {message}")]
    Command { command: String, message: String },
    #[error("unexpected load report: {0}")]
    Report(String),
    #[error("{0}")]
    Cluster(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
