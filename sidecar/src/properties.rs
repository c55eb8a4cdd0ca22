//! The sidecar's parsers of outside input, fed anything: flags and their environment (what
//! the injector or a user writes into the pod), `--data-planes` items, and the metrics
//! rewriter's input. Each ends in a value or an error naming what was wrong, never a panic.
//! `make test` runs a fixed seed (PROPTEST_RNG_SEED); `make fuzz` many more cases.

use clap::Parser;
use proptest::prelude::*;

use crate::config::Config;
use crate::{data_planes, exposition};

/// Every option that takes a value, with the values it is fed.
const OPTIONS: [&str; 20] = [
    "--listen",
    "--upstream",
    "--admin",
    "--deregister-delay",
    "--drain-timeout",
    "--propagation-margin",
    "--quiet-window",
    "--min-quiet-window",
    "--upstream-restart-wait",
    "--upstream-max-held",
    "--services",
    "--data-planes",
    "--siblings",
    "--app-drain-url",
    "--app-ready-path",
    "--pod-ip",
    "--workers",
    "--max-connections",
    "--header-read-timeout",
    "--idle-timeout",
];

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_filter("no NUL (not an argv string)", |s| !s.contains('\0')),
        "[ 0-9]{0,22}(ns|ms|s|m|h|)",
        "[0-9.:\\[\\]a-f]{0,40}",
        "([a-z/-]{0,12}=[0-9]{0,12}s?,?){0,4}",
        "(http://|/)[ -~]{0,30}",
    ]
}

proptest! {
    #[test]
    fn any_option_values_give_a_config_or_an_error_naming_an_option(
        given in prop::collection::vec((prop::sample::select(OPTIONS.to_vec()), value()), 0..6),
    ) {
        let mut args = vec!["graceful-sidecar".to_owned()];
        for (option, v) in &given {
            args.push(format!("{option}={v}"));
        }
        let parsed = Config::try_parse_from(&args).map_err(|e| e.to_string());
        if let Err(e) = parsed.and_then(|c| c.validate().map_err(|e| e.to_string())) {
            prop_assert!(e.contains("--"), "an error naming no option: {e}");
        }
    }

    #[test]
    fn any_data_plane_item_parses_or_says_why(item in "[ -~]{0,200}") {
        if let Ok(plane) = data_planes::parse(&item) {
            prop_assert!(!plane.name.is_empty() && plane.name.len() <= data_planes::MAX_NAME_LEN);
        }
    }

    #[test]
    fn the_metrics_rewriter_takes_any_text(text in "(# (HELP|TYPE|UNIT|EOF) ?[a-z_ ]{0,20}\n|[a-z_]{1,10}(\\{[a-z]=\"[ -~]{0,6}\"\\})? [0-9.e+-]{1,8}\n|[ -~]{0,30}\n){0,20}") {
        let classic = exposition::to_classic(&text);
        prop_assert!(!classic.lines().any(|l| l == "# EOF"));
        let header = http::HeaderValue::from_str(&text.replace('\n', " ")).ok();
        let _ = exposition::negotiate(header.as_ref(), text);
    }
}
