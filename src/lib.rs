//! sluice: latency-based load shedding for LLM inference servers.
//!
//! The crate is one library with one binary (`src/main.rs`) that only parses arguments and
//! dispatches. Modules:
//! - [`limiter`]: the fading-evidence moving averages of TTFT and ITL and the shedding
//!   decision; pure code with an injected clock, no network or file I/O and no tasks (it
//!   logs through `tracing` when a threshold becomes unreachable or reachable again).
//! - [`policy`]: the `RateLimitPolicy` custom resource, its validation, and its conversion
//!   into the limiter's configuration.
//! - [`gateway`]: the OpenAI-compatible proxy that measures and sheds, and its Prometheus
//!   metrics ([`gateway::metrics`]).
//! - [`sim`]: the simulated OpenAI-compatible inference engine.
//! - [`demo`]: engine + gateway in one process.
//! - [`loadgen`]: the load generator and its goodput report.
//! - [`operator`]: the objects the operator owns per policy.
//! - [`openai`]: OpenAI API shapes shared by the servers.
//! - [`clock`] and [`random`]: the injected clock and random sources (a manual clock and
//!   seeded generators in tests), used by the limiter, the operator, the simulated engine
//!   and the load generator.

pub mod clock;
pub mod demo;
pub mod discovery;
pub mod gateway;
pub mod limiter;
pub mod loadgen;
pub mod openai;
pub mod operator;
pub mod policy;
pub mod random;
pub mod signals;
pub mod sim;

/// A listener whose accepted connections have TCP_NODELAY set: servers that stream many small
/// writes (SSE events) must not wait for the peer's delayed ACK (Nagle), which costs ~40 ms.
pub fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
