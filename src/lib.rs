//! sluice: latency-based load shedding for LLM inference servers.
//!
//! The crate is one library with one binary (`src/main.rs`) that only parses arguments and
//! dispatches. Modules:
//! - [`limiter`]: the fading-evidence moving averages of TTFT and ITL and the shedding
//!   decision; pure code with an injected clock and no I/O.
//! - [`policy`]: the `RateLimitPolicy` custom resource, its validation, and its conversion
//!   into the limiter's configuration.

pub mod limiter;
pub mod policy;
