#![forbid(unsafe_code)]
//! `switchboard-loadtest`: skeleton. The real harness (open/closed loop, channel mixes,
//! HdrHistogram reports, end-to-end loss verification) lands with the load-test issue.

use clap::Parser;

/// Load-test harness for Switchboard.
///
/// SKELETON ONLY: this build generates no load yet. The harness (open- and closed-loop load,
/// channel mixes, latency histograms, Kafka loss verification) comes with the load-test issue.
#[derive(Parser)]
#[command(name = "switchboard-loadtest", version)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("switchboard-loadtest: skeleton only; no load is generated yet (see --help)");
    std::process::exit(2);
}
