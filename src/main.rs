//! The `sluice` binary: parses the command line and dispatches to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Latency-based load shedding for LLM inference servers on Kubernetes.
#[derive(Parser)]
#[command(name = "sluice", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the RateLimitPolicy CustomResourceDefinition as YAML (for `kubectl apply -f -`).
    Crd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", sluice::policy::crd_yaml());
            ExitCode::SUCCESS
        }
    }
}
