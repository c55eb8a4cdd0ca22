use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use graceful_sidecar::config::Config;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cfg = match Config::try_parse() {
        Ok(cfg) => cfg,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        // One line that names the option, not clap's usage block.
        Err(e) => {
            let msg = e.to_string();
            eprintln!("{}", msg.lines().next().unwrap_or("error: bad arguments"));
            return ExitCode::from(2);
        }
    };
    if let Err(e) = cfg.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let filter = match EnvFilter::try_new(&cfg.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: invalid value '{}' for '--log': {e}", cfg.log);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();

    // Admin, signals and the drain; traffic runs on threads of its own (see `run`).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(graceful_sidecar::run(cfg));
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(summary) if !summary.forced => ExitCode::SUCCESS,
        // The drain already logged how many requests and connections were cut.
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
