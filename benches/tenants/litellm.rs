//! The peer: LiteLLM's proxy with per-key rpm/tpm limits, in front of the same engine.
//!
//! LiteLLM keeps per-key limits on its virtual keys, which live in its Postgres database; a
//! `custom_auth` hook returning the limits per key gives the same enforcement without one
//! (its in-memory limiter, as a single proxy uses). Set `SLUICE_TENANTS_LITELLM` to the
//! `litellm` executable of an environment with `pip install 'litellm[proxy]'` (measured with
//! 1.108.7); unset, the peer is not run and the bench says so.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::process::ChildProcess;

/// Returns the custom-auth hook: each key's limits come from `LIMITS="key:rpm:tpm,..."`.
const CUSTOM_AUTH: &str = r#"import os
from fastapi import Request
from litellm.proxy._types import UserAPIKeyAuth

LIMITS = {}
for item in os.environ.get("LIMITS", "").split(","):
    if item:
        key, rpm, tpm = item.split(":")
        LIMITS[key] = (int(rpm) if rpm else None, int(tpm) if tpm else None)


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    if api_key in LIMITS:
        rpm, tpm = LIMITS[api_key]
        return UserAPIKeyAuth(api_key=api_key, token=api_key, rpm_limit=rpm, tpm_limit=tpm)
    raise Exception("invalid api key")
"#;

/// A LiteLLM proxy at a free port of 127.0.0.1 in front of `engine`, with `limits` (`key`,
/// rpm, tpm) per key; its URL once it is live.
pub async fn start(
    litellm: &str,
    engine: &str,
    limits: &[(&str, Option<u64>, Option<u64>)],
    dir: &Path,
) -> (ChildProcess, String) {
    let dir = dir.join("litellm");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("custom_auth.py"), CUSTOM_AUTH).unwrap();
    let config = format!(
        "model_list:\n  - model_name: sim-llm\n    litellm_params:\n      model: openai/sim-llm\n      api_base: {engine}/v1\n      api_key: none\ngeneral_settings:\n  custom_auth: custom_auth.user_api_key_auth\n  master_key: sk-bench-master-0123456789abcdef0123456789ab\n"
    );
    std::fs::write(dir.join("config.yaml"), config).unwrap();
    let limits: Vec<String> = (limits.iter())
        .map(|(k, rpm, tpm)| {
            let n = |v: &Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
            format!("{k}:{}:{}", n(rpm), n(tpm))
        })
        .collect();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(litellm)
        .args(["--config", "config.yaml", "--host", "127.0.0.1"])
        .args(["--port", &port.to_string()])
        .current_dir(&dir)
        .env("LIMITS", limits.join(","))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("litellm.log")).unwrap(),
        ))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {litellm}: {e}"));
    let mut p = ChildProcess::new(child, "litellm".into(), None);
    let url = format!("http://127.0.0.1:{port}");
    crate::common::ready(&mut p, &url, "/health/liveliness", 120).await;
    (p, url)
}
