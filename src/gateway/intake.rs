//! Taking a request's body in: within its size limit (413), its read timeout (408) and the
//! gateway's body-memory budget (503); and the `Connection: close` of a refusal that leaves
//! it unread.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::BodyExt;

use super::Gateway;
use super::error::GatewayError;

/// A response to a request whose body is left unread (refused before or while reading it):
/// hyper closes such a connection rather than read a body nobody wants, so the response says
/// `Connection: close`, and a client's pool does not send its next request down a connection
/// that is going away. (Requests without a body keep their connection; HTTP/2 drops the
/// header, its streams end on their own.)
pub(crate) fn unread_body(headers: &HeaderMap, mut resp: Response) -> Response {
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A share of the gateway's body-memory budget, held while a body is in the gateway.
pub type BodyPermit = tokio::sync::OwnedSemaphorePermit;

/// How much of the body-memory budget a body holds: its running size rounded up to whole KiB
/// once, never each frame on its own (a body sent one byte per chunk would otherwise hold
/// 1 KiB of budget per byte).
struct Reservation<'a> {
    gw: &'a Gateway,
    permit: Option<BodyPermit>,
    kib: u32,
}

impl<'a> Reservation<'a> {
    fn new(gw: &'a Gateway) -> Self {
        Self {
            gw,
            permit: None,
            kib: 0,
        }
    }

    /// Holds enough budget for a body of `bytes` in all, or refuses.
    fn cover(&mut self, bytes: usize) -> Result<(), GatewayError> {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        if kib <= self.kib {
            return Ok(());
        }
        let more = self
            .gw
            .body_memory
            .clone()
            .try_acquire_many_owned(kib - self.kib)
            .map_err(|_| GatewayError::BodyMemory {
                limit: self.gw.max_body_memory,
            })?;
        match &mut self.permit {
            Some(p) => p.merge(more),
            None => self.permit = Some(more),
        }
        self.kib = kib;
        Ok(())
    }
}

/// Reads the request body up to the limit (413 beyond it) within the body-read timeout (408),
/// within the gateway's body-memory budget (503): a declared length is reserved before
/// anything is read, a chunked body as it arrives. The permit holds the reservation.
pub(crate) async fn read_body(
    gw: &Gateway,
    headers: &HeaderMap,
    mut body: Body,
) -> Result<(Bytes, Option<BodyPermit>), GatewayError> {
    let too_large = GatewayError::TooLarge {
        limit: gw.max_body_bytes,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > gw.max_body_bytes) {
        return Err(too_large);
    }
    let mut reservation = Reservation::new(gw);
    reservation.cover(declared.unwrap_or(0))?;
    let read = async {
        // Copied as it arrives into one buffer of the declared size: the body is held once,
        // not as hyper's chunks and then a contiguous copy.
        let mut buf: Vec<u8> = Vec::with_capacity(declared.unwrap_or(0));
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|_| GatewayError::bad_request("the request body could not be read"))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let total = buf.len() + data.len();
            if total > gw.max_body_bytes {
                return Err(too_large.clone());
            }
            reservation.cover(total)?;
            buf.extend_from_slice(&data);
        }
        Ok(Bytes::from(buf))
    };
    let Ok(read) = tokio::time::timeout(gw.body_read_timeout, read).await else {
        return Err(GatewayError::BodyTimeout(gw.body_read_timeout));
    };
    Ok((read?, reservation.permit))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::gateway::GatewayOptions;
    use crate::limiter::ManualClock;
    use crate::policy::source::PolicyStore;

    fn gateway(max_body_memory: usize) -> Arc<Gateway> {
        Gateway::new(
            Arc::new(PolicyStore::new(vec![])),
            Arc::new(ManualClock::starting_at(Duration::from_secs(1))),
            GatewayOptions {
                max_body_memory,
                ..GatewayOptions::default()
            },
        )
        .unwrap()
    }

    /// A chunked body (no Content-Length) sent one byte per frame.
    fn trickle(len: usize) -> Body {
        let frames = (0..len).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(b"x")));
        Body::from_stream(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_body_sent_a_byte_per_chunk_holds_its_size_in_budget_not_a_kib_per_byte() {
        let gw = gateway(4096);
        let (body, permit) = read_body(&gw, &HeaderMap::new(), trickle(3000))
            .await
            .unwrap();
        assert_eq!(body.len(), 3000);
        // 3000 bytes hold 3 KiB of the 4 KiB budget (at most its size plus 1 KiB).
        assert_eq!(permit.as_ref().map(|p| p.num_permits()), Some(3));
        assert_eq!(gw.body_memory.available_permits(), 1);
        drop(permit);
        assert_eq!(gw.body_memory.available_permits(), 4);
    }

    #[tokio::test]
    async fn a_trickled_body_past_the_budget_is_still_refused_and_returns_what_it_held() {
        let gw = gateway(4096);
        let err = read_body(&gw, &HeaderMap::new(), trickle(5000))
            .await
            .unwrap_err();
        assert!(matches!(err, GatewayError::BodyMemory { .. }), "{err:?}");
        assert_eq!(gw.body_memory.available_permits(), 4);
    }
}
