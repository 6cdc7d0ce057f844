//! Reading the gateway's request counter in tests.

use super::http::metric;

/// `sluice_requests_total` of chat completions for `model` (streamed or not) with `outcome`,
/// from a scrape `text`; None when absent.
pub fn chat_requests(text: &str, model: &str, stream: bool, outcome: &str) -> Option<f64> {
    let stream = if stream { "true" } else { "false" };
    metric(
        text,
        "sluice_requests_total",
        &[
            ("model", model),
            ("endpoint", "chat_completions"),
            ("stream", stream),
            ("outcome", outcome),
        ],
    )
}
