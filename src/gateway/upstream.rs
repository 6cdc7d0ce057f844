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

/// How many pools are kept: the policy in force and the one before it, so requests admitted
/// under either (a reload does not wait for them) keep their pooled connections instead of
/// switching one shared pool back and forth.
const POOLS: usize = 2;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Pooled upstream clients by pool idle timeout (`spec.upstream.poolIdleTimeout`). The TLS
/// roots are read once, when the gateway starts; a client for a new timeout is built from
/// them without I/O and put in place atomically, and one for an unchanged timeout is reused.
pub struct Pools {
    connector: Connector,
    pools: arc_swap::ArcSwap<Vec<(Duration, HttpClient)>>,
}

impl Pools {
    /// Reads the TLS roots (once) and builds the client for `pool_idle_timeout`.
    pub fn new(pool_idle_timeout: Duration) -> std::io::Result<Self> {
        let connector = connector()?;
        let first = build(connector.clone(), pool_idle_timeout);
        Ok(Pools {
            connector,
            pools: arc_swap::ArcSwap::from_pointee(vec![(pool_idle_timeout, first)]),
        })
    }

    /// The client whose pool keeps idle connections for `pool_idle_timeout`.
    pub fn get(&self, pool_idle_timeout: Duration) -> HttpClient {
        if let Some((_, c)) = self
            .pools
            .load()
            .iter()
            .find(|(t, _)| *t == pool_idle_timeout)
        {
            return c.clone();
        }
        let mut built = None;
        self.pools.rcu(|pools| {
            let mut next = pools.as_ref().clone();
            if !next.iter().any(|(t, _)| *t == pool_idle_timeout) {
                let c = built
                    .get_or_insert_with(|| build(self.connector.clone(), pool_idle_timeout))
                    .clone();
                next.insert(0, (pool_idle_timeout, c));
                next.truncate(POOLS);
            }
            next
        });
        // In place now, unless two more timeouts pushed it out meanwhile: then this request
        // gets a pool of its own.
        self.pools
            .load()
            .iter()
            .find(|(t, _)| *t == pool_idle_timeout)
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| build(self.connector.clone(), pool_idle_timeout))
    }
}

impl Pools {
    /// A client for engine metrics pages: at most one idle connection per endpoint (scrapes
    /// of an endpoint never overlap), kept 30 s.
    pub fn scraper(&self) -> HttpClient {
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_max_idle_per_host(1)
            .build(self.connector.clone())
    }
}

/// An http and https connector: no Nagle delay, a 10 s connect timeout, the system's TLS
/// roots (read here).
fn connector() -> std::io::Result<Connector> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

/// A keep-alive pool over `connector`: idle connections closed after `pool_idle_timeout`,
/// before the server's own keep-alive timeout closes them under a request.
fn build(connector: Connector, pool_idle_timeout: Duration) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(pool_idle_timeout)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_max_idle_per_host(1024)
        .build(connector)
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

#[cfg(test)]
mod pool_tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A keep-alive HTTP/1.1 server on 127.0.0.1:0 that counts the connections it accepts.
    async fn counting_server() -> (Uri, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
                );
            }
        });
        (uri, accepted)
    }

    async fn get(c: &HttpClient, uri: &Uri) {
        let req = axum::http::Request::get(uri.clone())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn requests_under_an_old_and_a_new_policy_keep_their_pools() {
        let (uri, accepted) = counting_server().await;
        let pools = Pools::new(Duration::from_secs(4)).unwrap();
        let (old, new) = (Duration::from_secs(4), Duration::from_secs(30));
        get(&pools.get(old), &uri).await;
        get(&pools.get(old), &uri).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "an unchanged timeout reuses its pool"
        );
        // A reload changes the timeout while requests of the old policy are still coming in:
        // each policy's requests reuse their own pool (the shared pool used to be rebuilt at
        // every switch, dropping its connections).
        for _ in 0..3 {
            get(&pools.get(new), &uri).await;
            get(&pools.get(old), &uri).await;
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "one connection per pool"
        );
        // A third timeout pushes out the oldest.
        get(&pools.get(Duration::from_secs(60)), &uri).await;
        get(&pools.get(new), &uri).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }
}
