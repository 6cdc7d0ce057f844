//! A request held open at the stub upstream ([`super::InProc::hold`]).

use http_body_util::BodyExt;

use super::Arrival;

/// A request held open by [`super::InProc::hold`]: the test sends its events and reads them.
pub struct Held {
    pub(super) arrival: Arrival,
    pub(super) body: hyper::body::Incoming,
}

impl Held {
    /// The stub upstream the request reached.
    pub fn upstream(&self) -> usize {
        self.arrival.upstream
    }

    /// The upstream sends `data: <data>` and a blank line.
    pub fn send(&self, data: &str) {
        self.arrival.send(data);
    }

    /// Reads `n` bytes of the relayed body (panics if it ends first).
    pub async fn read(&mut self, n: usize) {
        let mut got = 0;
        while got < n {
            let frame = self
                .body
                .frame()
                .await
                .expect("more body")
                .expect("no error");
            got += frame.into_data().map(|d| d.len()).unwrap_or(0);
        }
    }

    /// Ends the upstream's response and reads the rest of the body.
    pub async fn finish(self) {
        let Held { arrival, mut body } = self;
        drop(arrival);
        while let Some(f) = body.frame().await {
            f.expect("the stream ends cleanly");
        }
    }
}
