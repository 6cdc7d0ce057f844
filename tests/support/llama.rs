//! A real inference engine for tests and benchmarks: llama.cpp's `llama-server` serving Gemma 3
//! 270M (Q4_K_M) on 127.0.0.1, as `scripts/llama.sh` installs it (`SLUICE_LLAMA_SERVER`,
//! `SLUICE_LLAMA_LIB`, `SLUICE_GGUF`). Stopped (by PID) when dropped.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::process::ChildProcess;

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: the real-engine tests need llama-server and the Gemma 3 270M \
             model; run them with scripts/test.sh, or `source \"$(scripts/llama.sh)\"` first"
        )
    })
}

/// `GET /health` answered 200 (a blocking HTTP/1.0 request).
fn health_ok(url: &str) -> bool {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b" 200")
}

/// A running `llama-server`.
pub struct LlamaServer {
    pub process: ChildProcess,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
}

impl LlamaServer {
    /// Starts llama-server with `slots` parallel slots (continuous batching), a context of
    /// 1024 tokens per slot and its Prometheus metrics on (`--metrics`); waits until /health
    /// answers 200.
    pub fn start(slots: u32) -> LlamaServer {
        let (server, lib, model) = (
            var("SLUICE_LLAMA_SERVER"),
            var("SLUICE_LLAMA_LIB"),
            var("SLUICE_GGUF"),
        );
        let ctx = (1024 * slots).to_string();
        let mut child = Command::new(&server)
            .args(["-m", &model, "--host", "127.0.0.1", "--port", "0"])
            .args(["-np", &slots.to_string(), "-c", &ctx, "--threads", "2"])
            .args(["--no-webui", "--log-prefix", "--metrics"])
            .env("LD_LIBRARY_PATH", &lib)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {server}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.split("listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_owned());
                }
                if line.contains(" E ") || line.contains("error") {
                    eprintln!("llama-server: {line}");
                }
            }
        });
        let mut process = ChildProcess::new(child, "llama-server".into(), None);
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = loop {
            if let Ok(url) = rx.recv_timeout(Duration::from_millis(100)) {
                break url;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("llama-server exited with {status} before listening");
            }
            assert!(
                Instant::now() < deadline,
                "llama-server did not listen within 60 s"
            );
        };
        // The model loads after the socket opens: /health is 503 until then.
        loop {
            if health_ok(&url) {
                break;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("llama-server exited with {status} while loading the model");
            }
            assert!(
                Instant::now() < deadline,
                "llama-server not healthy within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        LlamaServer { process, url }
    }
}
