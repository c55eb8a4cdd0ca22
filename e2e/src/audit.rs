//! What a process asked of the apiserver, request by request: the apiserver's audit log
//! (cluster-up.sh logs every service account outside kube-system at level Metadata), counted by
//! verb and resource for one user over a window of time.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

use crate::{Error, Result, cluster};

pub fn log_path() -> PathBuf {
    cluster::state_dir().join("logs/audit.log")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditEvent {
    #[serde(rename = "auditID")]
    audit_id: String,
    verb: String,
    #[serde(default, rename = "requestURI")]
    request_uri: String,
    user: User,
    #[serde(default)]
    object_ref: Option<ObjectRef>,
    request_received_timestamp: Timestamp,
}

#[derive(Deserialize)]
struct User {
    username: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectRef {
    #[serde(default)]
    resource: String,
    #[serde(default)]
    subresource: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

/// One request as counted: verb and resource (`pods`, `deployments/status`), and whether a
/// LIST or WATCH named a label or field selector or a single object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Request {
    pub verb: String,
    pub resource: String,
    /// A list or watch that asked for a whole namespace (or the cluster) without a selector.
    pub unselected: bool,
    pub cluster_wide: bool,
}

/// Requests of one user in `[from, to)`, counted.
#[derive(Debug, Default)]
pub struct Requests {
    pub counts: BTreeMap<Request, u64>,
}

impl Requests {
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// By verb and resource only.
    pub fn by_verb_and_resource(&self) -> BTreeMap<(String, String), u64> {
        let mut by = BTreeMap::new();
        for (r, n) in &self.counts {
            *by.entry((r.verb.clone(), r.resource.clone())).or_default() += n;
        }
        by
    }

    /// Lists and watches without a selector, e.g. `list endpointslices` of a whole namespace.
    pub fn unselected(&self) -> BTreeMap<(String, String), u64> {
        let mut by = BTreeMap::new();
        for (r, n) in self.counts.iter().filter(|(r, _)| r.unselected) {
            *by.entry((r.verb.clone(), r.resource.clone())).or_default() += n;
        }
        by
    }
}

/// Reads the audit log (and the one rotated before it) for `username`'s requests received in
/// `[from, to)`. Each request counts once, whatever stages it was logged at.
pub fn requests_of(username: &str, from: Timestamp, to: Timestamp) -> Result<Requests> {
    let path = log_path();
    if !path.exists() {
        return Err(Error::Cluster(format!(
            "{} is missing: the cluster predates its audit log; make cluster-down cluster-up",
            path.display()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    let mut requests = Requests::default();
    let rotated = rotated_logs(&path);
    for file in rotated.iter().chain(std::iter::once(&path)) {
        let f = std::fs::File::open(file).map_err(Error::io("reading the audit log"))?;
        for line in BufReader::new(f).lines() {
            let line = line.map_err(Error::io("reading the audit log"))?;
            // Cheap filter first: most lines are other users'.
            if !line.contains(username) {
                continue;
            }
            let Ok(e) = serde_json::from_str::<AuditEvent>(&line) else {
                continue;
            };
            let received = e.request_received_timestamp;
            if e.user.username != username || received < from || received >= to {
                continue;
            }
            if !seen.insert(e.audit_id.clone()) {
                continue;
            }
            *requests.counts.entry(request(&e)).or_default() += 1;
        }
    }
    Ok(requests)
}

fn request(e: &AuditEvent) -> Request {
    let (resource, namespaced) = match &e.object_ref {
        Some(o) => (
            match &o.subresource {
                Some(sub) => format!("{}/{sub}", o.resource),
                None => o.resource.clone(),
            },
            o.namespace.is_some(),
        ),
        None => (e.request_uri.clone(), false),
    };
    let collection = matches!(e.verb.as_str(), "list" | "watch");
    let selected = ["labelSelector=", "fieldSelector="]
        .iter()
        .any(|s| e.request_uri.contains(s));
    Request {
        verb: e.verb.clone(),
        resource,
        unselected: collection && !selected,
        cluster_wide: collection && !namespaced,
    }
}

/// `audit-2026-12-02T06-00-00.000.log`-style files the apiserver rotated out, oldest first.
fn rotated_logs(path: &std::path::Path) -> Vec<PathBuf> {
    let (Some(dir), Some(stem)) = (path.parent(), path.file_stem()) else {
        return Vec::new();
    };
    let prefix = format!("{}-", stem.to_string_lossy());
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .collect();
    rotated.sort();
    rotated
}
