//! The pooled HTTP client to the inference server and request/response header rules.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, header};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Pooled HTTP/1.1 keep-alive client for http and https upstreams.
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The client of the pool idle timeout in force: rebuilt (a new pool) when a policy changes
/// `spec.upstream.poolIdleTimeout`, shared otherwise.
pub struct Clients(arc_swap::ArcSwap<(Duration, HttpClient)>);

impl Clients {
    pub fn new(pool_idle_timeout: Duration) -> std::io::Result<Self> {
        let c = client(pool_idle_timeout)?;
        Ok(Clients(arc_swap::ArcSwap::from_pointee((
            pool_idle_timeout,
            c,
        ))))
    }

    /// The client whose pool keeps idle connections for `pool_idle_timeout`.
    pub fn get(&self, pool_idle_timeout: Duration) -> HttpClient {
        let current = self.0.load();
        if current.0 == pool_idle_timeout {
            return current.1.clone();
        }
        match client(pool_idle_timeout) {
            Ok(c) => {
                self.0
                    .store(std::sync::Arc::new((pool_idle_timeout, c.clone())));
                c
            }
            // The TLS roots could not be read again: keep the pool there is.
            Err(_) => current.1.clone(),
        }
    }
}

/// Builds a client: keep-alive pool (idle connections closed after `pool_idle_timeout`, before
/// the server's own keep-alive timeout closes them under a request), no Nagle delay, native
/// TLS roots for https.
pub fn client(pool_idle_timeout: Duration) -> std::io::Result<HttpClient> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(pool_idle_timeout)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_max_idle_per_host(1024)
        .build(https))
}

/// `base` + the client's path and query: `http://h:8000` + `/v1/models` (a base path prefix
/// such as `http://h/openai` is kept: `http://h/openai/v1/models`).
pub fn target(base: &Uri, path_and_query: &str) -> Result<Uri, axum::http::Error> {
    let prefix = base.path().trim_end_matches('/');
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(format!("{prefix}{path_and_query}").parse()?);
    Ok(Uri::from_parts(parts)?)
}

/// The headers a message's `Connection` header names (RFC 9110 §7.6.1): they are hop-by-hop
/// for that message alone and must not be forwarded. Tokens that are not header names are
/// ignored; case does not matter.
fn connection_options(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect()
}

/// The end-to-end headers of `from`: without the hop-by-hop ones, the ones its `Connection`
/// header names, and the ones the proxy sets itself.
fn end_to_end(from: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    let named = connection_options(from);
    from.iter()
        .filter(move |(name, _)| !skip(name) && !named.contains(name))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and ones the proxy sets itself.
fn skip(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "accept-encoding"
    ) || name.as_str() == crate::limiter::Priority::HEADER
}

/// The upstream request: method, URL, the client's end-to-end headers (with `Authorization`
/// replaced when an upstream key is configured, and never the client's when `client_auth`:
/// a key the gateway authenticated is the gateway's business, not the engine's), JSON body.
pub fn request(
    method: Method,
    uri: Uri,
    client_headers: &HeaderMap,
    api_key: Option<&HeaderValue>,
    client_auth: bool,
    body: Bytes,
) -> Result<axum::http::Request<Full<Bytes>>, axum::http::Error> {
    let mut b = axum::http::Request::builder().method(method).uri(uri);
    let headers = b.headers_mut().expect("fresh builder");
    for (name, value) in end_to_end(client_headers) {
        let clients_key = client_auth && name == header::AUTHORIZATION;
        if !clients_key {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(key) = api_key {
        headers.insert(header::AUTHORIZATION, key.clone());
    }
    b.body(Full::new(body))
}

/// Upstream response headers worth relaying (end-to-end ones, without framing).
pub fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in end_to_end(upstream) {
        out.append(name.clone(), value.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The upstream request for a POST with the client's headers `h`.
    fn upstream_request(
        h: &HeaderMap,
        api_key: Option<&HeaderValue>,
        client_auth: bool,
    ) -> axum::http::Request<Full<Bytes>> {
        let uri = "http://u/v1".parse().unwrap();
        request(Method::POST, uri, h, api_key, client_auth, Bytes::new()).unwrap()
    }

    #[test]
    fn target_joins_base_and_path() {
        let base: Uri = "http://127.0.0.1:8000".parse().unwrap();
        assert_eq!(
            target(&base, "/v1/models").unwrap(),
            "http://127.0.0.1:8000/v1/models"
        );
        let base: Uri = "https://h.example/openai/".parse().unwrap();
        assert_eq!(
            target(&base, "/v1/chat/completions?x=1").unwrap(),
            "https://h.example/openai/v1/chat/completions?x=1"
        );
    }

    #[test]
    fn hop_by_hop_and_priority_headers_are_not_forwarded_and_auth_is_replaced() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close"));
        h.insert("x-sluice-priority", HeaderValue::from_static("critical"));
        h.insert("authorization", HeaderValue::from_static("Bearer client"));
        h.insert("x-request-id", HeaderValue::from_static("r1"));
        let key = HeaderValue::from_static("Bearer upstream");
        let r = upstream_request(&h, Some(&key), false);
        assert!(r.headers().get("connection").is_none());
        assert!(r.headers().get("x-sluice-priority").is_none());
        assert_eq!(r.headers()["authorization"], "Bearer upstream");
        assert_eq!(r.headers()["x-request-id"], "r1");
        let r = upstream_request(&h, None, false);
        assert_eq!(r.headers()["authorization"], "Bearer client");
        // With client authentication the client's key never goes upstream.
        for key in [None, Some(&key)] {
            let r = upstream_request(&h, key, true);
            let sent: Vec<_> = r.headers().get_all("authorization").iter().collect();
            assert_eq!(sent, key.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn headers_the_connection_header_names_are_not_forwarded_either_way() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("keep-alive, X-Hop"));
        h.append(
            "connection",
            HeaderValue::from_static(" x-other-hop ,, not a name"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-other-hop", HeaderValue::from_static("2"));
        h.insert("x-request-id", HeaderValue::from_static("r1"));
        let r = upstream_request(&h, None, false);
        let sent: Vec<_> = r.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(sent, ["x-request-id"]);
        let relayed = response_headers(&h);
        let relayed: Vec<_> = relayed.keys().map(|k| k.as_str()).collect();
        assert_eq!(relayed, ["x-request-id"]);
    }
}
