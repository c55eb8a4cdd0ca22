//! Bad configuration is a startup error of one line that names the option.

mod common;

use std::process::Command;

use common::sidecar_bin;

fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(sidecar_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Arguments, environment, the option names the error must mention.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);

#[test]
fn each_bad_value_is_one_line_naming_the_option() {
    let cases: &[Case] = &[
        (&["--drain-timeout", "soon"], &[], &["--drain-timeout"]),
        (
            &["--deregister-delay", "5 parsecs"],
            &[],
            &["--deregister-delay"],
        ),
        (
            &[],
            &[("GRACEFUL_DRAIN_TIMEOUT", "-1s")],
            &["--drain-timeout"],
        ),
        (
            &["--deregister-delay", "10s", "--drain-timeout", "5s"],
            &[],
            &["--drain-timeout", "--deregister-delay"],
        ),
        (
            &["--listen", "127.0.0.1:7000", "--admin", "127.0.0.1:7000"],
            &[],
            &["--listen", "--admin"],
        ),
        (
            &["--listen", "0.0.0.0:7001", "--admin", "127.0.0.1:7001"],
            &[],
            &["--listen", "--admin"],
        ),
        (
            &["--upstream", "127.0.0.1:9080"],
            &[],
            &["--listen", "--upstream"],
        ),
        (
            &["--admin", "127.0.0.1:7002", "--upstream", "127.0.0.1:7002"],
            &[],
            &["--admin", "--upstream"],
        ),
        (&["--upstream", "127.0.0.1:0"], &[], &["--upstream"]),
        (&["--listen", "localhost"], &[], &["--listen"]),
        (
            &["--app-drain-url", "ftp://x/drain"],
            &[],
            &["--app-drain-url"],
        ),
        (&["--app-ready-path", "healthz"], &[], &["--app-ready-path"]),
    ];
    for (args, env, names) in cases {
        let (code, _, stderr) = run(args, env);
        assert_eq!(code, Some(2), "{args:?} {env:?}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?} {env:?}: not one line:\n{stderr}"
        );
        assert!(stderr.starts_with("error: "), "{stderr}");
        for name in *names {
            assert!(
                stderr.contains(name),
                "{args:?} {env:?}: {stderr} does not name {name}"
            );
        }
    }
}

#[test]
fn help_shows_every_option_with_its_default_and_env() {
    let (code, stdout, _) = run(&["--help"], &[]);
    assert_eq!(code, Some(0));
    for (opt, env, default) in [
        ("--listen", "GRACEFUL_LISTEN", Some("0.0.0.0:9080")),
        ("--upstream", "GRACEFUL_UPSTREAM", Some("127.0.0.1:8080")),
        ("--admin", "GRACEFUL_ADMIN", Some("0.0.0.0:9901")),
        (
            "--deregister-delay",
            "GRACEFUL_DEREGISTER_DELAY",
            Some("5s"),
        ),
        ("--drain-timeout", "GRACEFUL_DRAIN_TIMEOUT", Some("30s")),
        (
            "--propagation-margin",
            "GRACEFUL_PROPAGATION_MARGIN",
            Some("0s"),
        ),
        ("--quiet-window", "GRACEFUL_QUIET_WINDOW", Some("auto")),
        (
            "--min-quiet-window",
            "GRACEFUL_MIN_QUIET_WINDOW",
            Some("250ms"),
        ),
        ("--services", "GRACEFUL_SERVICES", None),
        ("--prestop-token", "GRACEFUL_PRESTOP_TOKEN", None),
        ("--app-drain-url", "GRACEFUL_APP_DRAIN_URL", None),
        ("--app-ready-path", "GRACEFUL_APP_READY_PATH", None),
        ("--upstream-h2c", "GRACEFUL_UPSTREAM_H2C", None),
        ("--pod-ip", "GRACEFUL_POD_IP", None),
        ("--pod-namespace", "GRACEFUL_POD_NAMESPACE", None),
        ("--workers", "GRACEFUL_WORKERS", Some("0")),
    ] {
        let block = stdout
            .split("\n  -")
            .find(|b| b.contains(opt))
            .unwrap_or_else(|| panic!("{opt} missing from --help:\n{stdout}"));
        assert!(block.contains(&format!("env: {env}")), "{opt}: {block}");
        if let Some(d) = default {
            assert!(block.contains(&format!("[default: {d}]")), "{opt}: {block}");
        }
    }
}
