//! Serving the gateway's routes: every connection with the same limits, and the shutdown
//! a rollout needs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;

use super::Gateway;

/// How every connection is served: HTTP/1.1 with the gateway's header-read timeout.
fn http1(gw: &Gateway) -> hyper::server::conn::http1::Builder {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(gw.header_read_timeout);
    http
}

/// Accepts one connection and serves it on a task of its own.
async fn accept_one(
    listener: &tokio::net::TcpListener,
    app: &Router,
    http: &hyper::server::conn::http1::Builder,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) {
    match listener.accept().await {
        Ok((stream, _)) => {
            let _ = stream.set_nodelay(true);
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = graceful.watch(http.serve_connection(io, service));
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection closed with an error");
                }
            });
        }
        Err(e) => {
            // Out of file descriptors and the like: back off instead of spinning.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Serves `app` (the metrics port) on `listener` with the same per-connection limits as the
/// API port, until the task is dropped: a client trickling its headers or holding idle
/// connections there holds nothing longer than the header-read timeout either.
pub async fn serve_metrics(listener: tokio::net::TcpListener, app: Router, gw: Arc<Gateway>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let http = http1(&gw);
    loop {
        accept_one(&listener, &app, &http, &graceful).await;
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains for at most `drain`.
///
/// Each connection is HTTP/1.1 with TCP_NODELAY and the gateway's header-read timeout (which
/// also bounds how long an idle keep-alive connection waits for its next request), so a client
/// that trickles its headers, or opens connections and sends nothing, holds nothing for
/// longer than that.
///
/// Shutdown, in the order a rollout needs: /readyz turns 503 at once, but the gateway keeps
/// accepting and serving for the drain delay (while load balancers and Service endpoints
/// catch up with the readiness change); then the listener closes, idle connections close and
/// in-flight requests finish, for at most `drain`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    gw: Arc<Gateway>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let http = http1(&gw);
    let accept = async |listener: &tokio::net::TcpListener| {
        accept_one(listener, &app, &http, &graceful).await
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = accept(&listener) => {}
            _ = &mut shutdown => break,
        }
    }
    gw.draining.store(true, Ordering::SeqCst);
    tracing::info!(delay = ?gw.drain_delay, "shutting down: not ready; still serving during the drain delay");
    let delay = tokio::time::sleep(gw.drain_delay);
    tokio::pin!(delay);
    loop {
        tokio::select! {
            _ = accept(&listener) => {}
            _ = &mut delay => break,
        }
    }
    drop(listener);
    tracing::info!(timeout = ?drain, "no new connections; draining in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain) => {
            tracing::warn!("drain timeout reached; closing remaining connections");
        }
    }
    Ok(())
}
