//! The admission webhooks, served over TLS on their own port: sidecar injection on Pod CREATE
//! (`/mutate`) and the pacing of managed Deployments on UPDATE (`/pace`). `serve` is the one
//! entry point main.rs calls.

pub mod admission;
pub mod annotations;
pub mod data_planes;
pub mod inject;
pub mod pace;
mod server;

use std::net::SocketAddr;

pub use server::serve;

/// How the webhook's TLS certificate is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CertSource {
    /// The operator generates a CA and serving certificate and patches the caBundle.
    Generate,
    /// Someone else (cert-manager) writes the Secret and the caBundle; the operator only reads.
    External,
}

/// Options of the injection webhook (flatten into the operator's own Args).
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Where the webhook listens (TLS only).
    #[arg(long, env = "GRACEFUL_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,
    /// The operator's namespace: the webhook Service and TLS Secret live there, and its pods are
    /// never injected.
    #[arg(
        long,
        env = "GRACEFUL_OPERATOR_NAMESPACE",
        default_value = "graceful-system"
    )]
    pub operator_namespace: String,
    /// The Service the API server reaches the webhook through (names in the certificate).
    #[arg(
        long,
        env = "GRACEFUL_WEBHOOK_SERVICE",
        default_value = "graceful-webhook"
    )]
    pub webhook_service: String,
    /// The MutatingWebhookConfiguration whose caBundle the operator keeps current.
    #[arg(
        long,
        env = "GRACEFUL_WEBHOOK_CONFIG",
        default_value = "graceful-sidecar-injector"
    )]
    pub webhook_config: String,
    /// Secret holding ca.crt, tls.crt and tls.key.
    #[arg(
        long,
        env = "GRACEFUL_WEBHOOK_SECRET",
        default_value = "graceful-webhook-tls"
    )]
    pub webhook_secret: String,
    #[arg(
        long,
        env = "GRACEFUL_WEBHOOK_CERT_SOURCE",
        value_enum,
        default_value = "generate"
    )]
    pub webhook_cert_source: CertSource,
    /// Image of the injected sidecar.
    #[arg(
        long,
        env = "GRACEFUL_SIDECAR_IMAGE",
        default_value = "localhost/graceful-sidecar:dev"
    )]
    pub sidecar_image: String,
    #[arg(
        long,
        env = "GRACEFUL_SIDECAR_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    pub sidecar_image_pull_policy: String,
    /// Grant each injected pod's ServiceAccount read access to EndpointSlices in its namespace
    /// (else the sidecar falls back to its deregister delay).
    #[arg(long, env = "GRACEFUL_GRANT_ENDPOINTSLICE_READ", default_value_t = true, action = clap::ArgAction::Set)]
    pub grant_endpointslice_read: bool,
    /// The operator's own ServiceAccount (in the operator's namespace): the Deployment webhook
    /// lets its writes through untouched.
    #[arg(
        long,
        env = "GRACEFUL_SERVICE_ACCOUNT",
        default_value = "graceful-operator"
    )]
    pub service_account: String,
    /// PEM bundle of the CAs that sign the API server's client certificate for webhooks. Set,
    /// reviews from a caller without such a certificate are refused (403); unset, any caller
    /// that reaches the port is answered.
    #[arg(long, env = "GRACEFUL_WEBHOOK_CLIENT_CA", value_name = "FILE")]
    pub client_ca: Option<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("webhook certificate: {0}")]
    Certs(#[from] crate::certs::Error),
    #[error("webhook listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests;
