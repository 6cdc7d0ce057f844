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
    /// Run a simulated OpenAI-compatible inference server (continuous batching, no GPU).
    SimEngine(sluice::sim::SimConfig),
    /// Run the OpenAI-compatible gateway that sheds load by latency.
    Gateway(sluice::gateway::GatewayArgs),
    /// Try sluice locally: a simulated engine and a gateway with the example policy.
    Demo(sluice::demo::DemoArgs),
    /// Run the operator that turns RateLimitPolicies into gateway Deployments.
    Operator(sluice::operator::OperatorArgs),
    /// Drive an OpenAI-compatible endpoint and report goodput under the latency SLOs.
    Loadgen(sluice::loadgen::LoadgenArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // kube's client logs every failed reconnect at ERROR; sluice logs each watch incident
        // once itself, so kube's own lines are off unless RUST_LOG asks for them.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,kube_client=off,kube_runtime=off")
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => {
            print!("{}", sluice::policy::crd_yaml());
            Ok(())
        }
        Command::SimEngine(config) => {
            init_tracing();
            runtime().block_on(sluice::sim::run(config))
        }
        Command::Gateway(args) => {
            init_tracing();
            runtime().block_on(sluice::gateway::run(args))
        }
        Command::Demo(args) => {
            init_tracing();
            runtime().block_on(sluice::demo::run(args))
        }
        Command::Operator(args) => {
            init_tracing();
            runtime().block_on(sluice::operator::run(args))
        }
        Command::Loadgen(args) => {
            init_tracing();
            runtime().block_on(sluice::loadgen::run(args))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
