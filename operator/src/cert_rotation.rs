//! Renewing the generated webhook CA and certificate without a failed review. The API server
//! trusts what the configuration's caBundle holds, and caches the configuration; the replicas
//! each reload the shared Secret every minute. A certificate served before every API server
//! trusts its CA fails the handshake, and with failurePolicy Ignore the pod starts without its
//! sidecar. So a renewal goes in two steps, each a write of the Secret guarded by its
//! resourceVersion (two replicas racing: one wins, the other reads the result next time):
//!
//! 1. 90 days before the served certificate ends, a new CA and certificate are made and kept
//!    beside it as `next`; the caBundle gets the new CA too. Nothing new is served yet.
//! 2. `SETTLE` later, with the caBundle read back holding the new CA, `next` becomes the
//!    served pair; the old CA stays in the caBundle (`previous`) for replicas that have not
//!    reloaded yet, until the next renewal replaces it.
//!
//! A Secret from before renewals (no end date recorded; those certificates were made for ten
//! years) is given one a week past the renewal's lead, so it is renewed a week after the
//! upgrade: not while replicas of the older version, which write only the served CA into the
//! caBundle, may still run.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::certs::{self, CA_CRT, Error, TLS_CRT, TLS_KEY, TlsMaterial};

/// Renew this long before the served certificate ends.
pub const RENEW_BEFORE: SignedDuration = SignedDuration::from_hours(90 * 24);
/// How long a new CA is in the caBundle before certificates it signed are served: API servers
/// see a configuration change within seconds.
pub const SETTLE: SignedDuration = SignedDuration::from_secs(60);
/// A Secret from before renewals is renewed this long after the upgrade.
pub const LEGACY_GRACE: SignedDuration = SignedDuration::from_hours(7 * 24);

const NOT_AFTER: &str = "graceful.dev/webhook-cert-not-after";
const NEXT_SINCE: &str = "graceful.dev/webhook-next-since";
const NEXT_NOT_AFTER: &str = "graceful.dev/webhook-next-not-after";
const NEXT_CA: &str = "next-ca.crt";
const NEXT_CRT: &str = "next-tls.crt";
const NEXT_KEY: &str = "next-tls.key";
const PREVIOUS_CA: &str = "previous-ca.crt";

/// The pair waiting to be served, since when, and until when it is valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Next {
    pub material: TlsMaterial,
    pub since: Timestamp,
    pub not_after: Timestamp,
}

/// What a generated Secret holds: the pair served and what a renewal keeps beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    pub serving: TlsMaterial,
    /// When the served pair ends; None on a Secret from before renewals.
    pub not_after: Option<Timestamp>,
    pub next: Option<Next>,
    pub previous_ca: Option<String>,
}

impl Rotation {
    /// A newly generated Secret's: nothing beside the served pair.
    pub fn fresh(secret: &Secret, name: &str, not_after: Timestamp) -> Result<Self, Error> {
        Ok(Self {
            serving: certs::from_secret(secret, name)?,
            not_after: Some(not_after),
            next: None,
            previous_ca: None,
        })
    }

    pub fn read(secret: &Secret, name: &str) -> Result<Self, Error> {
        let data = secret.data.as_ref();
        let field = |key: &str| {
            data.and_then(|d| d.get(key))
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
                .filter(|s| !s.is_empty())
        };
        let annotations = secret.metadata.annotations.as_ref();
        let time = |key: &str| {
            annotations
                .and_then(|a| a.get(key))
                .and_then(|t| t.parse::<Timestamp>().ok())
        };
        let next = match (
            field(NEXT_CA),
            field(NEXT_CRT),
            field(NEXT_KEY),
            time(NEXT_SINCE),
            time(NEXT_NOT_AFTER),
        ) {
            (Some(ca_pem), Some(cert_pem), Some(key_pem), Some(since), Some(not_after)) => {
                Some(Next {
                    material: TlsMaterial {
                        ca_pem,
                        cert_pem,
                        key_pem,
                    },
                    since,
                    not_after,
                })
            }
            // Half a renewal (written by hand?) is no renewal: the next step starts one anew.
            _ => None,
        };
        Ok(Self {
            serving: certs::from_secret(secret, name)?,
            not_after: time(NOT_AFTER),
            next,
            previous_ca: field(PREVIOUS_CA),
        })
    }

    /// Writes itself into `secret`, keeping its metadata (the resourceVersion guards the write).
    pub fn write(&self, secret: &mut Secret) {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        let annotations = secret
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new);
        let mut put = |key: &str, value: Option<&str>| match value {
            Some(v) => {
                data.insert(key.to_owned(), ByteString(v.as_bytes().to_vec()));
            }
            None => {
                data.remove(key);
            }
        };
        put(CA_CRT, Some(&self.serving.ca_pem));
        put(TLS_CRT, Some(&self.serving.cert_pem));
        put(TLS_KEY, Some(&self.serving.key_pem));
        let next = self.next.as_ref();
        put(NEXT_CA, next.map(|n| n.material.ca_pem.as_str()));
        put(NEXT_CRT, next.map(|n| n.material.cert_pem.as_str()));
        put(NEXT_KEY, next.map(|n| n.material.key_pem.as_str()));
        put(PREVIOUS_CA, self.previous_ca.as_deref());
        let mut note = |key: &str, value: Option<Timestamp>| match value {
            Some(t) => {
                annotations.insert(key.to_owned(), t.to_string());
            }
            None => {
                annotations.remove(key);
            }
        };
        note(NOT_AFTER, self.not_after);
        note(NEXT_SINCE, next.map(|n| n.since));
        note(NEXT_NOT_AFTER, next.map(|n| n.not_after));
    }

    /// Every CA a replica may be serving a certificate of: the served one, the next, the
    /// previous.
    pub fn ca_bundle(&self) -> String {
        [
            Some(self.serving.ca_pem.as_str()),
            self.next.as_ref().map(|n| n.material.ca_pem.as_str()),
            self.previous_ca.as_deref(),
        ]
        .into_iter()
        .flatten()
        .map(|pem| pem.trim_end().to_owned() + "\n")
        .collect()
    }

    /// The renewal's next step at `now`, if one is due. Call it only once the caBundle holds
    /// `self.ca_bundle()`.
    pub fn step(&self, now: Timestamp, dns_names: &[String]) -> Result<Option<Self>, Error> {
        if let Some(next) = &self.next {
            if now < next.since + SETTLE {
                return Ok(None);
            }
            return Ok(Some(Self {
                serving: next.material.clone(),
                not_after: Some(next.not_after),
                next: None,
                previous_ca: Some(self.serving.ca_pem.clone()),
            }));
        }
        let Some(end) = self.not_after else {
            return Ok(Some(Self {
                not_after: Some(now + RENEW_BEFORE + LEGACY_GRACE),
                ..self.clone()
            }));
        };
        if now < end - RENEW_BEFORE {
            return Ok(None);
        }
        Ok(Some(Self {
            next: Some(Next {
                material: certs::generate(dns_names, now)?,
                since: now,
                not_after: certs::valid_until(now),
            }),
            ..self.clone()
        }))
    }

    /// For the log: what `step` did.
    pub fn describe_step(&self, to: &Self) -> &'static str {
        match (&self.next, &to.next) {
            (None, Some(_)) => {
                "new webhook CA and certificate made; their CA is trusted from now on and they are served in a minute"
            }
            (None, None) => "webhook certificate from before renewals: renewing it in a week",
            _ => {
                "serving the renewed webhook certificate; the previous CA stays trusted until the next renewal"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        certs::dns_names("graceful-webhook", "graceful-system")
    }

    fn secret_at(now: Timestamp) -> Secret {
        let material = certs::generate(&names(), now).unwrap();
        let mut secret = Secret::default();
        Rotation {
            serving: material,
            not_after: Some(certs::valid_until(now)),
            next: None,
            previous_ca: None,
        }
        .write(&mut secret);
        secret
    }

    fn days(n: i64) -> SignedDuration {
        SignedDuration::from_hours(24 * n)
    }

    #[test]
    fn a_fresh_certificate_is_not_renewed() {
        let now = Timestamp::now();
        let r = Rotation::read(&secret_at(now), "s").unwrap();
        assert_eq!(r.step(now + days(200), &names()).unwrap(), None);
        assert_eq!(r.ca_bundle(), r.serving.ca_pem.trim_end().to_owned() + "\n");
    }

    /// Made 90 days before the end, served a minute later; every CA any replica may still serve
    /// stays in the caBundle throughout.
    #[test]
    fn a_renewal_trusts_the_new_ca_first_and_serves_it_a_minute_later() {
        let born = Timestamp::now();
        let old = Rotation::read(&secret_at(born), "s").unwrap();
        let due = certs::valid_until(born) - RENEW_BEFORE;

        let staged = old.step(due, &names()).unwrap().expect("renewal due");
        assert_eq!(staged.serving, old.serving, "served before it is trusted");
        let next = staged.next.clone().expect("next pair");
        assert!(staged.ca_bundle().contains(next.material.ca_pem.trim_end()));
        assert!(staged.ca_bundle().contains(old.serving.ca_pem.trim_end()));

        // Through the Secret and back, as the other replica reads it.
        let mut secret = secret_at(born);
        staged.write(&mut secret);
        let read = Rotation::read(&secret, "s").unwrap();
        assert_eq!(read, staged);
        assert_eq!(read.step(due + SETTLE / 2, &names()).unwrap(), None);

        let promoted = read
            .step(due + SETTLE, &names())
            .unwrap()
            .expect("promotion");
        assert_eq!(promoted.serving, next.material);
        assert_eq!(promoted.not_after, Some(next.not_after));
        assert_eq!(
            promoted.previous_ca.as_deref(),
            Some(old.serving.ca_pem.as_str())
        );
        assert!(promoted.ca_bundle().contains(old.serving.ca_pem.trim_end()));
        certs::server_config(&promoted.serving, None).unwrap();
        promoted.write(&mut secret);
        let keys: Vec<&String> = secret.data.as_ref().unwrap().keys().collect();
        assert!(!keys.iter().any(|k| k.starts_with("next-")), "{keys:?}");
        assert_eq!(Rotation::read(&secret, "s").unwrap(), promoted);
    }

    /// Not while replicas of the version before may still write the caBundle.
    #[test]
    fn a_secret_from_before_renewals_is_renewed_a_week_later() {
        let mut secret = secret_at(Timestamp::now());
        secret.metadata.annotations = None;
        let r = Rotation::read(&secret, "s").unwrap();
        assert_eq!(r.not_after, None);
        let now = Timestamp::now();
        let dated = r.step(now, &names()).unwrap().expect("an end recorded");
        assert_eq!((dated.next.clone(), &dated.serving), (None, &r.serving));
        assert_eq!(dated.step(now + days(6), &names()).unwrap(), None);
        let due = dated.step(now + days(7), &names()).unwrap().expect("due");
        assert!(due.next.is_some());
    }
}
