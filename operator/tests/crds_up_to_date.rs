//! `crds/` and the chart's copy are generated from the Rust types (`make crds`); this fails when
//! either was edited by hand or not regenerated after a change of the types.

use kube::CustomResourceExt;

fn expected() -> String {
    serde_yaml::to_string(&graceful_operator::crd::GracefulRollout::crd()).unwrap()
}

fn check(relative: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    let on_disk = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make crds`", path.display()));
    assert!(
        on_disk == expected(),
        "{relative} differs from the Rust types: run `make crds`"
    );
}

#[test]
fn crds_dir_matches_the_rust_types() {
    check("crds/gracefulrollouts.yaml");
}

#[test]
fn chart_crd_matches_the_rust_types() {
    check("charts/graceful/crds/gracefulrollouts.yaml");
}
