//! Where the operator looks: the whole cluster (the default), or only the namespaces
//! `--namespaces` names (a namespaced install: the chart's `rbac.scope: namespaces` grants it
//! nothing elsewhere, docs/install.md). Every list and watch that crosses namespaces takes its
//! `Api`s from [`Scope::apis`] or its watch from [`Scope::watch`], so confining the operator is
//! this one choice rather than one at each call site.

use std::fmt;
use std::str::FromStr;

use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

/// The namespaces the operator lists and watches in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (`Api::all`), with the chart's ClusterRole.
    #[default]
    Cluster,
    /// These namespaces only (at least one, each once, in the order given), with a Role in each.
    Namespaces(Vec<String>),
}

/// The operator's flag (flattened into its arguments and the uninstall's).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ScopeArgs {
    /// Act only in these namespaces (comma-separated): every list and watch across namespaces
    /// is confined to them, as the chart's rbac.scope=namespaces grants. Absent or empty: the
    /// whole cluster.
    #[arg(
        long = "namespaces",
        env = "GRACEFUL_NAMESPACES",
        value_name = "NS[,NS...]"
    )]
    namespaces: Option<Scope>,
}

impl ScopeArgs {
    pub fn scope(&self) -> Scope {
        self.namespaces.clone().unwrap_or_default()
    }
}

/// A name `--namespaces` refuses, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{name:?} is not a namespace name: {why} (a DNS-1123 label: at most 63 characters, lower-case \
     letters, digits and '-', starting and ending with a letter or digit)"
)]
pub struct InvalidNamespace {
    pub name: String,
    pub why: &'static str,
}

/// Checks a namespace name as the API server does (a DNS-1123 label).
pub fn validate(name: &str) -> Result<(), InvalidNamespace> {
    let invalid = |why| {
        Err(InvalidNamespace {
            name: name.to_owned(),
            why,
        })
    };
    let bytes = name.as_bytes();
    if bytes.len() > 63 {
        return invalid("longer than 63 characters");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return invalid(if c.is_ascii_uppercase() {
            "upper-case letter"
        } else {
            "character other than a-z, 0-9 and '-'"
        });
    }
    if bytes.first() == Some(&b'-') || bytes.last() == Some(&b'-') {
        return invalid("starts or ends with '-'");
    }
    Ok(())
}

impl FromStr for Scope {
    type Err = InvalidNamespace;

    /// `a,b`: those namespaces (blanks around a name and empty items are ignored, a repeated
    /// name counts once); empty: the cluster.
    fn from_str(list: &str) -> Result<Self, Self::Err> {
        let mut names: Vec<String> = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            validate(name)?;
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
        Ok(match names.is_empty() {
            true => Scope::Cluster,
            false => Scope::Namespaces(names),
        })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Cluster => f.write_str("every namespace"),
            Scope::Namespaces(names) => f.write_str(&names.join(",")),
        }
    }
}

impl Scope {
    /// Whether `namespace` is one the operator acts in.
    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            Scope::Cluster => true,
            Scope::Namespaces(names) => names.iter().any(|n| n == namespace),
        }
    }

    /// The `Api`s that together cover the scope: one over every namespace, or one per
    /// namespace. A list across the scope lists each and chains the results.
    pub fn apis<K>(&self, client: &Client) -> Vec<Api<K>>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match self {
            Scope::Cluster => vec![Api::all(client.clone())],
            Scope::Namespaces(names) => names
                .iter()
                .map(|ns| Api::namespaced(client.clone(), ns))
                .collect(),
        }
    }

    /// A watch of `K` across the scope: one watcher per `Api` (each with kube's default
    /// backoff, so an error in one namespace does not hold the others up), merged.
    pub fn watch<K>(
        &self,
        client: &Client,
        config: watcher::Config,
    ) -> BoxStream<'static, watcher::Result<watcher::Event<K>>>
    where
        K: Resource<Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + fmt::Debug
            + Send
            + 'static,
        K::DynamicType: Default,
    {
        let watches = self
            .apis::<K>(client)
            .into_iter()
            .map(|api| watcher(api, config.clone()).default_backoff().boxed());
        stream::select_all(watches).boxed()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Pod;

    use super::*;
    use crate::crd::GracefulRollout;
    use crate::fixtures::FakeApi;

    #[test]
    fn an_absent_or_empty_list_is_the_cluster() {
        for list in ["", " ", ",", " , ,"] {
            assert_eq!(list.parse::<Scope>(), Ok(Scope::Cluster), "{list:?}");
        }
        assert_eq!(Scope::default(), Scope::Cluster);
    }

    #[test]
    fn a_list_is_its_namespaces_each_once_in_order() {
        assert_eq!(
            "shop, payments,shop,,kube-system".parse::<Scope>(),
            Ok(Scope::Namespaces(vec![
                "shop".into(),
                "payments".into(),
                "kube-system".into()
            ]))
        );
        let scope: Scope = "a1,b".parse().unwrap();
        assert_eq!(scope.to_string(), "a1,b");
        assert!(scope.contains("a1") && scope.contains("b"));
        assert!(!scope.contains("c") && !scope.contains("a"));
        assert!(Scope::Cluster.contains("anything"));
    }

    #[test]
    fn names_that_are_not_dns_labels_are_refused_by_name() {
        for (list, name, why) in [
            ("shop,Shop", "Shop", "upper-case"),
            ("a_b", "a_b", "other than"),
            ("-a", "-a", "starts or ends"),
            ("a-", "a-", "starts or ends"),
            ("a.b", "a.b", "other than"),
            ("a/b", "a/b", "other than"),
            ("é", "é", "other than"),
        ] {
            let err = list.parse::<Scope>().unwrap_err();
            assert_eq!(err.name, name, "{list}");
            let text = err.to_string();
            assert!(text.contains(why) && text.contains("DNS-1123"), "{text}");
        }
        let long = "a".repeat(64);
        assert!(
            long.parse::<Scope>()
                .unwrap_err()
                .to_string()
                .contains("63")
        );
        assert!("a".repeat(63).parse::<Scope>().is_ok());
        for ok in ["a", "0", "a-0", "x--y", "123"] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        scope: ScopeArgs,
    }

    #[test]
    fn the_flag_parses_a_list_and_refuses_a_bad_name() {
        // Only the flag is tested: the environment is the process's, shared by every test.
        let cli = Cli::try_parse_from(["op", "--namespaces", "a,b"]).unwrap();
        assert_eq!(
            cli.scope.scope(),
            Scope::Namespaces(vec!["a".into(), "b".into()])
        );
        let cli = Cli::try_parse_from(["op", "--namespaces="]).unwrap();
        assert_eq!(cli.scope.scope(), Scope::Cluster);
        let err = Cli::try_parse_from(["op", "--namespaces", "a,B"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"B\" is not a namespace name"), "{err}");
    }

    // The fake client's buffer spawns on a runtime: tokio tests, though nothing is awaited.
    #[tokio::test]
    async fn the_cluster_is_one_api_over_every_namespace() {
        let client = FakeApi::default().client();
        let apis = Scope::Cluster.apis::<GracefulRollout>(&client);
        assert_eq!(apis.len(), 1);
        assert_eq!(apis[0].namespace(), None);
        assert_eq!(
            apis[0].resource_url(),
            "/apis/graceful.dev/v1alpha1/gracefulrollouts"
        );
    }

    #[tokio::test]
    async fn namespaces_are_one_api_each() {
        let client = FakeApi::default().client();
        let scope: Scope = "a,b".parse().unwrap();
        let deploys = scope.apis::<Deployment>(&client);
        let urls: Vec<_> = deploys.iter().map(|a| a.resource_url()).collect();
        assert_eq!(
            urls,
            [
                "/apis/apps/v1/namespaces/a/deployments",
                "/apis/apps/v1/namespaces/b/deployments"
            ]
        );
        let pods = scope.apis::<Pod>(&client);
        let namespaces: Vec<_> = pods.iter().map(|a| a.namespace()).collect();
        assert_eq!(namespaces, [Some("a"), Some("b")]);
    }
}
