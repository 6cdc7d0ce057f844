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

/// Takes `bytes` more of the body-memory budget (whole KiB) into `held`, or refuses.
fn reserve(gw: &Gateway, held: &mut Option<BodyPermit>, bytes: usize) -> Result<(), GatewayError> {
    let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
    if kib == 0 {
        return Ok(());
    }
    let more = gw
        .body_memory
        .clone()
        .try_acquire_many_owned(kib)
        .map_err(|_| GatewayError::BodyMemory {
            limit: gw.max_body_memory,
        })?;
    match held {
        Some(p) => p.merge(more),
        None => *held = Some(more),
    }
    Ok(())
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
    let mut permit = None;
    let mut reserved = declared.unwrap_or(0);
    reserve(gw, &mut permit, reserved)?;
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
            if total > reserved {
                reserve(gw, &mut permit, total - reserved)?;
                reserved = total;
            }
            buf.extend_from_slice(&data);
        }
        Ok(Bytes::from(buf))
    };
    let Ok(read) = tokio::time::timeout(gw.body_read_timeout, read).await else {
        return Err(GatewayError::BodyTimeout(gw.body_read_timeout));
    };
    Ok((read?, permit))
}
