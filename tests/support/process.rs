//! Child processes of the `sluice` binary for tests and benchmarks: killed by PID and reaped
//! when dropped (also when a test fails), their log copied to the test's output and watched
//! for the addresses they listen on, so every server binds 127.0.0.1:0 and no port is guessed.
#![allow(dead_code)] // each test crate and bench uses a different part

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process that is killed (by PID) and reaped when dropped, also on test failure.
pub struct ChildProcess {
    pub child: Child,
    pub name: String,
    /// The `<what> listening addr=...` lines of its log, as they appear.
    listening: Option<std::sync::mpsc::Receiver<(String, std::net::SocketAddr)>>,
    /// The WARN lines of its log so far.
    warnings: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ChildProcess {
    /// Starts the `sluice` binary with `args`; its log (stderr) is copied to the test's
    /// output and watched for the addresses it listens on (see [`ChildProcess::listen_addr`]).
    pub fn sluice(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.args(args).stdin(Stdio::null()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", env!("CARGO_BIN_EXE_sluice")));
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let warnings: std::sync::Arc<std::sync::Mutex<Vec<String>>> = std::sync::Arc::default();
        let keep = std::sync::Arc::clone(&warnings);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                if let Some(found) = listening_line(&line) {
                    let _ = tx.send(found);
                }
                if line.contains(" WARN ") || line.contains(" ERROR ") {
                    keep.lock().unwrap().push(line);
                }
            }
        });
        let mut p = ChildProcess::new(child, format!("sluice {}", args.join(" ")), Some(rx));
        p.warnings = warnings;
        p
    }

    /// The WARN and ERROR lines the process has logged so far (for `sluice` processes).
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().unwrap().clone()
    }

    /// Wraps a process started some other way (no log watching).
    pub fn new(
        child: Child,
        name: String,
        listening: Option<std::sync::mpsc::Receiver<(String, std::net::SocketAddr)>>,
    ) -> Self {
        ChildProcess {
            child,
            name,
            listening,
            warnings: std::sync::Arc::default(),
        }
    }

    /// The address the process logged for `<what> listening addr=...` (processes listen on
    /// 127.0.0.1:0 and report the port the kernel gave them); fails after `secs`.
    pub fn listen_addr(&mut self, what: &str, secs: u64) -> std::net::SocketAddr {
        let rx = self
            .listening
            .as_ref()
            .expect("a process started by sluice()");
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok((w, addr)) if w == what => return addr,
                Ok(_) => {}
                Err(_) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!("{} exited with {status} before listening", self.name);
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{} did not log `{what} listening` within {secs}s",
                        self.name
                    );
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Waits up to `secs` for the process to exit.
    pub fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {secs}s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `"<what> listening addr=<socket address> ..."` in a log line (ANSI colours off).
fn listening_line(line: &str) -> Option<(String, std::net::SocketAddr)> {
    let (head, rest) = line.split_once(" listening ")?;
    let what = head.rsplit(": ").next()?.trim().to_owned();
    let addr = rest.split_once("addr=")?.1.split_whitespace().next()?;
    Some((what, addr.parse().ok()?))
}
