//! A connection-level balancer on 127.0.0.1, as a Kubernetes Service spreads connections
//! (kube-proxy picks a backend at random for each new connection and never looks at load):
//! each accepted connection is spliced to a backend drawn at random. Runs on the bench's
//! runtime until dropped.

use std::net::SocketAddr;

pub struct Balancer {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Balancer {
    /// A balancer over `backends` (ports on 127.0.0.1), seeded.
    pub async fn start(backends: &[u16], seed: u64) -> Balancer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let backends: Vec<SocketAddr> = backends
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect();
        let mut rng = fastrand::Rng::with_seed(seed);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let to = backends[rng.usize(..backends.len())];
                tokio::spawn(async move {
                    if let Ok(mut backend) = tokio::net::TcpStream::connect(to).await {
                        let _ = client.set_nodelay(true);
                        let _ = backend.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                    }
                });
            }
        });
        Balancer { url, task }
    }
}
