//! nginx (Debian's package, unpacked by `scripts/nginx.sh`) as a reverse proxy on 127.0.0.1
//! in front of engines: keep-alive upstream connections, no buffering (streams pass through
//! as they come); stopped by PID when dropped.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How nginx spreads requests over its upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// nginx's default: the next upstream for each request.
    RoundRobin,
    /// `least_conn`: the upstream with the fewest active connections.
    LeastConn,
}

pub struct Nginx {
    child: std::process::Child,
    pub url: String,
    dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, so the master stops its workers (SIGKILL would orphan them); SIGKILL only
        // if it does not exit.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Nginx {
    /// nginx on a free port of 127.0.0.1 in front of the engines on `upstream_ports`.
    /// `SLUICE_NGINX` names the binary (`SLUICE_NGINX=$(scripts/nginx.sh) cargo bench ...`).
    pub fn start(upstream_ports: &[u16], balance: Balance) -> Nginx {
        let bin = std::env::var("SLUICE_NGINX").unwrap_or_else(|_| {
            panic!("SLUICE_NGINX is not set: run the bench as `SLUICE_NGINX=$(scripts/nginx.sh) cargo bench ...`")
        });
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("sluice-bench-nginx-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.display();
        let mut servers = String::new();
        if balance == Balance::LeastConn {
            servers.push_str("least_conn; ");
        }
        for p in upstream_ports {
            servers.push_str(&format!("server 127.0.0.1:{p} max_fails=0; "));
        }
        let conf = format!(
            "daemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log stderr warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  upstream engine {{ {servers}keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://engine;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n      proxy_read_timeout 600s;\n    }}\n  }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = std::process::Command::new(&bin)
            .args(["-e", "stderr", "-p"])
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        }
    }
}
