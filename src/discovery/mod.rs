//! Discovery: the engine's replicas behind a Service of the cluster, each its own endpoint.
//!
//! When the URL a policy serves names a Service (`http://<service>.<namespace>.svc[.cluster.local]`,
//! or `http://<service>` in the policy's namespace)
//! and `spec.upstream.discovery` is not `None`, the gateway follows the Service's
//! EndpointSlices (label `kubernetes.io/service-name`) with a kube-runtime watcher and
//! reflector ([`watch`]), and serves the union of their ready, not terminating endpoints as a
//! fleet ([`crate::limiter::fleet`]): each pod with its own admission, labelled with its pod
//! name in metrics and logs.
//!
//! This module is the synchronous core, decided without I/O so every rule is unit-tested
//! without a cluster: which Service a URL names ([`ServiceRef::of`]), which endpoints a set
//! of slices holds ([`endpoints_of`]), and what to serve after each event of the watch
//! ([`Follower`]). Discovery is a helper signal and never fails closed:
//! - until the first list of the slices arrives, and whenever the watch fails with no known
//!   endpoint (no Kubernetes configuration, RBAC refusal, API server down), the gateway serves
//!   the Service URL itself, as without discovery;
//! - when the watch fails with endpoints known, it keeps them (ejection handles dead pods)
//!   for [`STALE_AFTER`], then falls back to the Service URL;
//! - a Service with no EndpointSlice at all (ExternalName, no selector, not created yet) is
//!   served through its URL;
//! - a Service whose slices list no ready endpoint is served as an empty fleet: requests get
//!   503 `no_endpoints` with a Retry-After, and `/readyz` stays as it is.

pub mod watch;

mod plan;
pub use plan::{Plan, plan};

#[cfg(test)]
mod tests;

use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;

/// How long endpoints known from a watch that keeps failing are still served.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// The most endpoints served from one Service (the first, by label, are kept).
pub const MAX_DISCOVERED: usize = 256;

/// The label the EndpointSlice controller puts on a Service's slices.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Service of the cluster that an upstream URL names, and the port to discover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    pub name: String,
    pub namespace: String,
    /// The URL's port (the Service port), 80 when it has none.
    pub port: u16,
    /// `spec.upstream.portName`.
    pub port_name: Option<String>,
    /// The URL; endpoints keep its scheme and path.
    pub url: http::Uri,
}

/// A DNS label as Kubernetes names use it (RFC 1123): 1 to 63 of a-z, 0-9 and `-`, not
/// starting or ending with `-` (also the form of a Service port name).
pub(crate) fn dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl ServiceRef {
    /// The Service `url` names: an `http` URL whose host is `<service>.<namespace>.svc` or
    /// `<service>.<namespace>.svc.cluster.local` (a trailing dot allowed), or a bare
    /// `<service>` in `namespace` (the policy's: what a pod there resolves the name to, its
    /// first DNS search domain). Other hosts (`<service>.<namespace>` is left alone: it may as
    /// well be a domain), and `https` (a pod's certificate names the Service, not its IP),
    /// are not discovered.
    pub fn of(
        url: &http::Uri,
        port_name: Option<&str>,
        namespace: Option<&str>,
    ) -> Option<ServiceRef> {
        if url.scheme_str() != Some("http") {
            return None;
        }
        let host = url.host()?.trim_end_matches('.');
        let (name, namespace) = match host
            .strip_suffix(".svc")
            .or_else(|| host.strip_suffix(".svc.cluster.local"))
        {
            Some(rest) => rest.split_once('.')?,
            // (`localhost` is the pod itself, from its /etc/hosts.)
            None if !host.contains('.') && host != "localhost" => (host, namespace?),
            None => return None,
        };
        (dns_label(name) && dns_label(namespace)).then(|| ServiceRef {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            port: url.port_u16().unwrap_or(80),
            port_name: port_name.map(str::to_owned),
            url: url.clone(),
        })
    }

    /// The Service an upstream configuration of a policy in `namespace` discovers: its one
    /// served URL, when it names a Service and `spec.upstream.discovery` is not `None`.
    pub fn of_upstream(
        upstream: &crate::policy::UpstreamConfig,
        namespace: Option<&str>,
    ) -> Option<ServiceRef> {
        match upstream.endpoints.as_slice() {
            [one] if upstream.discovery => {
                ServiceRef::of(one, upstream.port_name.as_deref(), namespace)
            }
            _ => None,
        }
    }

    /// `namespace/name:port`, for logs.
    pub fn describe(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port)
    }

    /// The URL of the endpoint at `ip` and `port`: the Service URL's scheme and path.
    fn endpoint_url(&self, ip: std::net::IpAddr, port: u16) -> Option<http::Uri> {
        let authority = std::net::SocketAddr::new(ip, port).to_string();
        let path = self.url.path_and_query().map_or("/", |p| p.as_str());
        http::Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path)
            .build()
            .ok()
    }

    /// The port of `slice` to use: the one named `port_name`; without a name, the one equal
    /// to the URL's port, else the slice's only port; with no ports listed (all ports), the
    /// URL's. None when no port matches.
    fn slice_port(&self, slice: &EndpointSlice) -> Option<u16> {
        let ports = match slice.ports.as_deref() {
            None | Some([]) => return Some(self.port),
            Some(p) => p,
        };
        let number = |p: &k8s_openapi::api::discovery::v1::EndpointPort| {
            p.port.and_then(|n| u16::try_from(n).ok())
        };
        let tcp = |p: &&k8s_openapi::api::discovery::v1::EndpointPort| {
            p.protocol.as_deref().is_none_or(|proto| proto == "TCP")
        };
        match &self.port_name {
            Some(name) => ports
                .iter()
                .filter(tcp)
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(number),
            None => (ports.iter().filter(tcp))
                .find(|p| number(p) == Some(self.port))
                .or_else(|| match ports {
                    [only] if tcp(&only) => Some(only),
                    _ => None,
                })
                .and_then(number),
        }
    }
}

/// One endpoint of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: http::Uri,
    /// The pod's name, or `ip:port` for an endpoint that is not a pod.
    pub label: String,
}

/// The endpoints a set of slices holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovered {
    /// Ready and not terminating, each `ip:port` once, by label.
    pub endpoints: Vec<Endpoint>,
    /// Slices with endpoints but no port to use (see [`ServiceRef`]'s port rules).
    pub unmatched_slices: usize,
    /// Endpoints left out over [`MAX_DISCOVERED`].
    pub left_out: usize,
}

/// The ready, not terminating endpoints of `slices` (IPv4 and IPv6 slices; the first address
/// of each endpoint, as kube-proxy uses), on the port of [`ServiceRef`]'s rules.
pub fn endpoints_of<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    service: &ServiceRef,
) -> Discovered {
    let mut out = Discovered::default();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let Some(port) = service.slice_port(slice) else {
            out.unmatched_slices += usize::from(!slice.endpoints.is_empty());
            continue;
        };
        for e in &slice.endpoints {
            let c = e.conditions.clone().unwrap_or_default();
            if !c.ready.unwrap_or(true) || c.terminating.unwrap_or(false) {
                continue;
            }
            let Some(ip) = e.addresses.first().and_then(|a| a.parse().ok()) else {
                continue;
            };
            let Some(url) = service.endpoint_url(ip, port) else {
                continue;
            };
            let addr = std::net::SocketAddr::new(ip, port).to_string();
            let pod = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"));
            let label = pod.and_then(|r| r.name.clone()).unwrap_or(addr);
            if !out.endpoints.iter().any(|o| o.url == url) {
                out.endpoints.push(Endpoint { url, label });
            }
        }
    }
    out.endpoints.sort_by(|a, b| a.label.cmp(&b.label));
    // Two endpoints with one label (a pod in two slices with different addresses): the
    // second is told apart by its address.
    for i in 1..out.endpoints.len() {
        if out.endpoints[i].label == out.endpoints[i - 1].label {
            let e = &mut out.endpoints[i];
            e.label = format!(
                "{}@{}",
                e.label,
                e.url.authority().map_or("", |a| a.as_str())
            );
        }
    }
    out.left_out = out.endpoints.len().saturating_sub(MAX_DISCOVERED);
    out.endpoints.truncate(MAX_DISCOVERED);
    out
}

/// What the gateway serves for a discovered Service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Served {
    /// The Service URL itself, as without discovery (nothing known, or discovery failing).
    #[default]
    ServiceUrl,
    /// The Service's endpoints (none: 503 `no_endpoints`).
    Endpoints(Vec<Endpoint>),
}

/// What an event of the watch changes, for the loop to put in force and log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Serve these endpoints now (first sync, a change, or a recovery with a new set).
    Endpoints(Discovered),
    /// The watch works again and the endpoints are the ones served.
    Recovered,
    /// The watch failed (first error of an incident); what is served stays.
    Failing(String),
    /// Serve the Service URL: the watch failed with no endpoint known, or for longer than
    /// [`STALE_AFTER`].
    FallBack(String),
    /// Serve the Service URL: the Service has no EndpointSlice at all (an ExternalName
    /// Service, one without a selector, or one not created yet; a Service with a selector
    /// always has one, empty when no pod is ready).
    NoSlices,
}

/// Follows one Service through the events of its EndpointSlice watch.
#[derive(Debug, Default)]
pub struct Follower {
    served: Served,
    failing_since: Option<Duration>,
    up: bool,
}

impl Follower {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the watch works and what is served comes from it.
    pub fn up(&self) -> bool {
        self.up
    }

    /// What is served now.
    pub fn served(&self) -> &Served {
        &self.served
    }

    /// The watch failed at `now` (it retries with backoff, reporting each failure).
    pub fn on_error(&mut self, error: &str, now: Duration) -> Option<Change> {
        self.up = false;
        let first = self.failing_since.is_none();
        let since = *self.failing_since.get_or_insert(now);
        match &self.served {
            Served::Endpoints(list) if list.is_empty() || now - since >= STALE_AFTER => {
                let why = match list.is_empty() {
                    true => error.to_owned(),
                    false => format!("{error} (failing for {} s)", (now - since).as_secs()),
                };
                self.served = Served::ServiceUrl;
                Some(Change::FallBack(why))
            }
            _ => first.then(|| Change::Failing(error.to_owned())),
        }
    }

    /// The slices as the watch lists them now (after its first complete list, and after
    /// every change), for `service`.
    pub fn on_slices<'a>(
        &mut self,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        service: &ServiceRef,
    ) -> Option<Change> {
        self.up = true;
        let recovered = self.failing_since.take().is_some();
        let mut slices = slices.into_iter().peekable();
        if slices.peek().is_none() {
            if self.served == Served::ServiceUrl {
                return recovered.then_some(Change::Recovered);
            }
            self.served = Served::ServiceUrl;
            return Some(Change::NoSlices);
        }
        let found = endpoints_of(slices, service);
        if self.served == Served::Endpoints(found.endpoints.clone()) {
            return recovered.then_some(Change::Recovered);
        }
        self.served = Served::Endpoints(found.endpoints.clone());
        Some(Change::Endpoints(found))
    }
}
