//! Webhook TLS. By default the operator is its own CA (as linkerd does): it generates a CA and a
//! serving certificate for the webhook Service, keeps them in a Secret that every replica shares,
//! and writes the CA into the MutatingWebhookConfiguration's caBundle. With cert-manager, the
//! Secret is cert-manager's and the operator only reads it.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::cert_rotation::Rotation;
use k8s_openapi::jiff::tz::TimeZone;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use tracing::info;

/// Secret keys, as cert-manager writes them too.
pub const CA_CRT: &str = "ca.crt";
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
/// On a self-generated Secret: the DNS names the serving certificate was made for, so a
/// renamed Service gets a new one.
const DNS_ANNOTATION: &str = "graceful.dev/webhook-dns-names";
/// How long a generated CA and certificate are valid; `cert_rotation` replaces them well before.
pub const VALID_FOR: SignedDuration = SignedDuration::from_hours(365 * 24);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generating the webhook certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("secret {0} lacks {1}")]
    Incomplete(String, &'static str),
    #[error("webhook TLS material: {0}")]
    Tls(String),
}

/// PEM text of the CA and the serving pair.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The names the API server may use to reach `service` in `namespace`.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// A fresh CA and a serving certificate it signed for `dns_names`, valid from a day before
/// `now` (clocks differ) until `valid_until(now)`.
pub fn generate(dns_names: &[String], now: Timestamp) -> Result<TlsMaterial, Error> {
    let day = |t: Timestamp| {
        let d = t.to_zoned(TimeZone::UTC).date();
        rcgen::date_time_ymd(i32::from(d.year()), d.month() as u8, d.day() as u8)
    };
    let validity = |params: &mut CertificateParams| {
        params.not_before = day(now - SignedDuration::from_hours(24));
        params.not_after = day(valid_until(now));
    };

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "graceful webhook CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(dns_names.to_vec())?;
    serving
        .distinguished_name
        .push(DnType::CommonName, dns_names[0].as_str());
    serving.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    serving.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut serving);
    let cert = serving.signed_by(&key, &issuer)?;
    Ok(TlsMaterial {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// When material generated at `now` stops being valid.
pub fn valid_until(now: Timestamp) -> Timestamp {
    now + VALID_FOR
}

/// The CAs whose client certificates authenticate the API server to the webhook: what the
/// cluster's AdmissionConfiguration gives it (`kubeConfigFile` of WebhookAdmissionConfiguration).
#[derive(Clone)]
pub struct ClientCa(Arc<rustls::RootCertStore>);

impl ClientCa {
    /// Reads a PEM bundle; an unreadable file or one without a usable certificate is an error,
    /// never a webhook that silently accepts anyone.
    pub fn read(path: &std::path::Path) -> Result<Self, Error> {
        let bad =
            |e: &dyn std::fmt::Display| Error::Tls(format!("client CA {}: {e}", path.display()));
        let pem = std::fs::read(path).map_err(|e| bad(&e))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
        if roots.is_empty() {
            return Err(bad(&"no certificate in the file"));
        }
        Ok(Self(Arc::new(roots)))
    }
}

/// rustls configuration serving `material` (HTTP/1.1 only: what the API server speaks to webhooks
/// by default). With `clients`, a client certificate is asked for and, when presented, must chain
/// to one of them; a connection without one still completes (the kubelet's probes have none), and
/// the server refuses its reviews (see `webhook::server`).
pub fn server_config(
    material: &TlsMaterial,
    clients: Option<&ClientCa>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let bad = |e: &dyn std::fmt::Display| Error::Tls(e.to_string());
    let chain = CertificateDer::pem_slice_iter(material.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_slice(material.key_pem.as_bytes()).map_err(|e| bad(&e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?;
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(ClientCa(roots)) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| bad(&e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| bad(&e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The shared Secret, created when missing or made for other names. Two replicas racing to
/// create it both end up with the winner's. `owner` (the webhook configuration) makes the
/// Secret go away with the chart.
pub async fn ensure_generated(
    secrets: &Api<Secret>,
    name: &str,
    dns_names: &[String],
    owner: Option<OwnerReference>,
) -> Result<Secret, Error> {
    let wanted = dns_names.join(",");
    let fresh = |owner| -> Result<Secret, Error> {
        let now = Timestamp::now();
        let mut secret = to_secret(name, &wanted, &generate(dns_names, now)?, owner);
        Rotation::fresh(&secret, name, valid_until(now))?.write(&mut secret);
        Ok(secret)
    };
    if let Some(secret) = secrets.get_opt(name).await? {
        let made_for = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DNS_ANNOTATION));
        if made_for == Some(&wanted) && from_secret(&secret, name).is_ok() {
            return Ok(secret);
        }
        info!(
            secret = name,
            "webhook certificate made for other names; replacing it"
        );
        let mut replacement = fresh(owner)?;
        replacement.metadata.resource_version = secret.metadata.resource_version.clone();
        return Ok(secrets
            .replace(name, &PostParams::default(), &replacement)
            .await?);
    }
    match secrets.create(&PostParams::default(), &fresh(owner)?).await {
        Ok(created) => {
            info!(
                secret = name,
                "generated the webhook CA and serving certificate"
            );
            Ok(created)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(secrets.get(name).await?),
        Err(e) => Err(e.into()),
    }
}

/// Material from a Secret someone else manages (cert-manager).
pub async fn read_external(secrets: &Api<Secret>, name: &str) -> Result<TlsMaterial, Error> {
    from_secret(&secrets.get(name).await?, name)
}

/// Writes `ca_pem` into every webhook of the configuration; no write when already there.
pub async fn patch_ca_bundle(
    configs: &Api<MutatingWebhookConfiguration>,
    name: &str,
    ca_pem: &str,
) -> Result<bool, Error> {
    let mut config = configs.get(name).await?;
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    let mut changed = false;
    for webhook in config.webhooks.iter_mut().flatten() {
        if webhook.client_config.ca_bundle.as_ref() != Some(&bundle) {
            webhook.client_config.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    if changed {
        // Replace with the resourceVersion we read: a concurrent writer makes this fail and the
        // caller retries, rather than one of us silently losing.
        configs
            .replace(name, &PostParams::default(), &config)
            .await?;
        info!(config = name, "caBundle updated");
    }
    Ok(changed)
}

fn to_secret(name: &str, dns: &str, m: &TlsMaterial, owner: Option<OwnerReference>) -> Secret {
    let data = BTreeMap::from([
        (CA_CRT.to_owned(), ByteString(m.ca_pem.clone().into_bytes())),
        (
            TLS_CRT.to_owned(),
            ByteString(m.cert_pem.clone().into_bytes()),
        ),
        (
            TLS_KEY.to_owned(),
            ByteString(m.key_pem.clone().into_bytes()),
        ),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some(BTreeMap::from([(
                DNS_ANNOTATION.to_owned(),
                dns.to_owned(),
            )])),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "graceful-operator".to_owned(),
            )])),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data),
        ..Default::default()
    }
}

pub fn from_secret(secret: &Secret, name: &str) -> Result<TlsMaterial, Error> {
    let data = secret.data.as_ref();
    let field = |key: &'static str| {
        data.and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::Incomplete(name.to_owned(), key))
    };
    Ok(TlsMaterial {
        ca_pem: field(CA_CRT)?,
        cert_pem: field(TLS_CRT)?,
        key_pem: field(TLS_KEY)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_material_loads_into_rustls() {
        let names = dns_names("graceful-webhook", "graceful-system");
        let m = generate(&names, Timestamp::now()).unwrap();
        assert!(m.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_ne!(m.ca_pem, m.cert_pem);
        server_config(&m, None).unwrap();
        let again = from_secret(&to_secret("s", "x", &m, None), "s").unwrap();
        assert!(again == m);
    }

    /// A CA and a client certificate it signed, as the API server's webhook client holds.
    fn client_identity() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver-webhook-client");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
        (ca_cert.pem(), cert.der().clone(), key)
    }

    /// The client certificate the server saw after a handshake (`Ok(None)`: none presented).
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        server_ca: &str,
        identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    ) -> Result<Option<usize>, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(server_ca.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let client = match identity {
            Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
            None => builder.with_no_client_auth(),
        };
        let (a, b) = tokio::io::duplex(1 << 16);
        let name = rustls::pki_types::ServerName::try_from("graceful-webhook").unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let (client, server) = tokio::join!(
            async {
                use tokio::io::AsyncWriteExt;
                let mut tls = connector.connect(name, a).await?;
                // TLS 1.3: the server checks the client's certificate after the client's side
                // of the handshake ends; a write makes the client wait for its verdict.
                tls.write_all(b"x").await?;
                tls.flush().await?;
                // Kept open until the server is done writing (its session tickets).
                Ok::<_, std::io::Error>(tls)
            },
            acceptor.accept(b)
        );
        client.map_err(|e| format!("client: {e}"))?;
        let server = server.map_err(|e| format!("server: {e}"))?;
        Ok(server.get_ref().1.peer_certificates().map(<[_]>::len))
    }

    #[tokio::test]
    async fn with_a_client_ca_only_its_certificates_authenticate_and_others_fail_the_handshake() {
        let m = generate(
            &dns_names("graceful-webhook", "graceful-system"),
            Timestamp::now(),
        )
        .unwrap();
        let (ca_pem, cert, key) = client_identity();
        let file =
            std::env::temp_dir().join(format!("graceful-client-ca-{}.pem", std::process::id()));
        std::fs::write(&file, &ca_pem).unwrap();
        let clients = ClientCa::read(&file).unwrap();
        let server = server_config(&m, Some(&clients)).unwrap();

        let with = handshake(server.clone(), &m.ca_pem, Some((cert, key))).await;
        assert_eq!(with, Ok(Some(1)));
        // Probes have no certificate: the handshake completes, unauthenticated.
        assert_eq!(handshake(server.clone(), &m.ca_pem, None).await, Ok(None));
        let (_, stranger, stranger_key) = client_identity();
        let refused = handshake(server, &m.ca_pem, Some((stranger, stranger_key))).await;
        assert!(
            refused.is_err(),
            "a certificate from another CA: {refused:?}"
        );
        // Without a client CA nothing is asked for.
        let open = server_config(&m, None).unwrap();
        assert_eq!(handshake(open, &m.ca_pem, None).await, Ok(None));

        std::fs::write(&file, "not a certificate").unwrap();
        let e = ClientCa::read(&file).err().expect("refused");
        assert!(e.to_string().contains("no certificate"), "{e}");
        std::fs::remove_file(&file).unwrap();
        let e = ClientCa::read(&file).err().expect("refused");
        assert!(e.to_string().contains("client CA"), "{e}");
    }

    #[test]
    fn an_incomplete_secret_names_the_missing_key() {
        let m = generate(&dns_names("a", "b"), Timestamp::now()).unwrap();
        let mut s = to_secret("s", "x", &m, None);
        s.data.as_mut().unwrap().remove(TLS_KEY);
        assert!(matches!(
            from_secret(&s, "s"),
            Err(Error::Incomplete(_, TLS_KEY))
        ));
    }
}
