//! `sluice loadgen` as a child process.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// `loadgen` against `url` with extra arguments: its JSON report, and its stdout and stderr
/// together.
pub fn loadgen(url: &str, extra: &[&str]) -> (Value, String) {
    loadgen_env(url, extra, &[])
}

/// `loadgen` with environment variables; its stdout and stderr together.
pub fn loadgen_env(url: &str, extra: &[&str], env: &[(&str, &str)]) -> (Value, String) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let json = std::env::temp_dir().join(format!("sluice-loadgen-{}-{n}.json", std::process::id()));
    let svg: PathBuf = json.with_extension("svg");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "loadgen",
            "--url",
            url,
            "--quiet",
            "--json",
            json.to_str().unwrap(),
            "--svg",
            svg.to_str().unwrap(),
        ])
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.starts_with("<svg") && svg_text.contains("polyline"));
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&svg);
    let mut text = String::from_utf8(out.stdout).unwrap();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (report, text)
}
