//! Which Secrets a policy may use, and for what: the opt-in annotations a Secret's owner puts
//! on it. Each names one use, so opening a Secret for one policy's client keys does not also
//! let that policy (or any other) send one of its values upstream.
//!
//! | annotation | value | lets |
//! |---|---|---|
//! | `sluice.dev/upstream-key-for` | `<policy>/<key>[, ...]` | that policy send that key of the Secret upstream, as its `Bearer` token |
//! | `sluice.dev/upstream-hosts` | `<host>[:<port>][, ...]` | ...and only to these hosts (required with the above) |
//! | `sluice.dev/client-keys-for` | `<policy>[, ...]` | that policy's gateway accept the Secret's entries as client keys |
//!
//! There is no wildcard: a Secret is opened to policies by name. The former
//! `sluice.dev/allowed-policies` (every use and every key, `*` for every policy) is no longer
//! honoured; a Secret that still carries it is told so in the refusal.

use std::collections::BTreeMap;

/// Lets `<policy>/<key>` pairs send the Secret's `<key>` upstream.
pub const UPSTREAM_KEY_ANNOTATION: &str = "sluice.dev/upstream-key-for";
/// The hosts (`host` for any port, `host:port` for one) an upstream key may be sent to.
pub const UPSTREAM_HOSTS_ANNOTATION: &str = "sluice.dev/upstream-hosts";
/// Lets the named policies use the Secret as their client keys.
pub const CLIENT_KEYS_ANNOTATION: &str = "sluice.dev/client-keys-for";
/// The annotation of sluice before 2026-12, which opened a Secret for every use and key.
pub const RETIRED_ANNOTATION: &str = "sluice.dev/allowed-policies";

/// What a policy wants a Secret for.
#[derive(Debug, Clone, Copy)]
pub enum SecretUse<'a> {
    /// Its entry `key`, sent as the Bearer token to `upstream`.
    UpstreamKey {
        key: &'a str,
        upstream: &'a http::Uri,
    },
    /// Every entry, as the keys of the gateway's clients.
    ClientKeys,
}

fn entries(annotations: &BTreeMap<String, String>, name: &str) -> Vec<String> {
    annotations
        .get(name)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The host (lower case, IPv6 in brackets) and port a request to `uri` goes to.
fn destination(uri: &http::Uri) -> (String, u16) {
    let host = uri.host().unwrap_or_default().to_ascii_lowercase();
    let default = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    (host, uri.port_u16().unwrap_or(default))
}

/// Whether an entry of `sluice.dev/upstream-hosts` covers this host and port.
fn host_matches(entry: &str, host: &str, port: u16) -> bool {
    let entry = entry.to_ascii_lowercase();
    let (h, p) = match entry.rsplit_once(':') {
        // `[::1]:8000`, `name:8000`; a bare IPv6 address without brackets has more colons
        // and no numeric tail after `]`, so it stays a host.
        Some((h, p)) if p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')) => {
            (h, p.parse::<u16>().ok())
        }
        _ => (entry.as_str(), None),
    };
    h.trim_end_matches('.') == host.trim_end_matches('.') && p.is_none_or(|p| p == port)
}

/// `Ok(())` when a Secret with these annotations lets `policy` use it as `use_`, otherwise
/// why not, with the annotation that would allow it.
pub fn allows(
    annotations: &BTreeMap<String, String>,
    policy: &str,
    use_: SecretUse<'_>,
) -> Result<(), String> {
    let retired = if annotations.contains_key(RETIRED_ANNOTATION) {
        format!(
            " ({RETIRED_ANNOTATION} is no longer honoured: it opened the Secret for every use \
             and every key)"
        )
    } else {
        String::new()
    };
    match use_ {
        SecretUse::ClientKeys => {
            if entries(annotations, CLIENT_KEYS_ANNOTATION)
                .iter()
                .any(|p| p == policy)
            {
                return Ok(());
            }
            Err(format!(
                "it does not allow this policy's client keys (annotate it with \
                 {CLIENT_KEYS_ANNOTATION}: {policy}){retired}"
            ))
        }
        SecretUse::UpstreamKey { key, upstream } => {
            let pair = format!("{policy}/{key}");
            if !entries(annotations, UPSTREAM_KEY_ANNOTATION).contains(&pair) {
                return Err(format!(
                    "it does not allow this policy to send its key {key:?} upstream (annotate \
                     it with {UPSTREAM_KEY_ANNOTATION}: {pair}){retired}"
                ));
            }
            let (host, port) = destination(upstream);
            if entries(annotations, UPSTREAM_HOSTS_ANNOTATION)
                .iter()
                .any(|e| host_matches(e, &host, port))
            {
                return Ok(());
            }
            Err(format!(
                "it does not allow its key to be sent to {host}:{port} (add {host} or \
                 {host}:{port} to its annotation {UPSTREAM_HOSTS_ANNOTATION})"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn upstream_key<'a>(key: &'a str, url: &'a http::Uri) -> SecretUse<'a> {
        SecretUse::UpstreamKey { key, upstream: url }
    }

    #[test]
    fn an_upstream_key_needs_its_policy_its_key_and_its_host() {
        let url: http::Uri = "http://vllm.inference.svc:8000".parse().unwrap();
        let a = ann(&[
            (UPSTREAM_KEY_ANNOTATION, "llama/token, other/token"),
            (UPSTREAM_HOSTS_ANNOTATION, "vllm.inference.svc:8000"),
        ]);
        assert_eq!(allows(&a, "llama", upstream_key("token", &url)), Ok(()));
        // Another key of the same Secret, or another policy: refused, naming the fix.
        let e = allows(&a, "llama", upstream_key("admin", &url)).unwrap_err();
        assert!(
            e.contains("sluice.dev/upstream-key-for: llama/admin"),
            "{e}"
        );
        let e = allows(&a, "mistral", upstream_key("token", &url)).unwrap_err();
        assert!(e.contains("mistral/token"), "{e}");
        // The right pair, sent elsewhere: refused.
        let elsewhere: http::Uri = "https://collector.example".parse().unwrap();
        let e = allows(&a, "llama", upstream_key("token", &elsewhere)).unwrap_err();
        assert!(e.contains("collector.example:443"), "{e}");
        assert!(e.contains(UPSTREAM_HOSTS_ANNOTATION), "{e}");
        // Same host, another port: refused when the entry names a port.
        let other_port: http::Uri = "http://vllm.inference.svc:9000".parse().unwrap();
        assert!(allows(&a, "llama", upstream_key("token", &other_port)).is_err());
        // Without the hosts annotation nothing is allowed.
        let no_hosts = ann(&[(UPSTREAM_KEY_ANNOTATION, "llama/token")]);
        assert!(allows(&no_hosts, "llama", upstream_key("token", &url)).is_err());
    }

    #[test]
    fn host_entries_match_by_name_any_port_or_one_port_including_ipv6() {
        for (entry, url, ok) in [
            ("vllm.svc", "http://vllm.svc:8000", true),
            ("VLLM.svc.", "https://vllm.svc", true),
            ("vllm.svc:443", "https://vllm.svc", true),
            ("vllm.svc:80", "https://vllm.svc", false),
            ("vllm.svc", "http://vllm.svc.evil.example", false),
            ("[::1]:8000", "http://[::1]:8000", true),
            ("[::1]", "http://[::1]:9", true),
            ("[::1]:8000", "http://[::1]:8001", false),
            ("127.0.0.1", "http://127.0.0.1:8000", true),
        ] {
            let url: http::Uri = url.parse().unwrap();
            let (h, p) = destination(&url);
            assert_eq!(host_matches(entry, &h, p), ok, "{entry} vs {url}");
        }
    }

    #[test]
    fn client_keys_and_upstream_keys_are_separate_opt_ins_without_wildcards() {
        let url: http::Uri = "http://vllm.svc".parse().unwrap();
        let clients = ann(&[(CLIENT_KEYS_ANNOTATION, "chat")]);
        assert_eq!(allows(&clients, "chat", SecretUse::ClientKeys), Ok(()));
        // Opened for client keys, not for sending any entry upstream.
        let e = allows(&clients, "chat", upstream_key("checkout", &url)).unwrap_err();
        assert!(e.contains(UPSTREAM_KEY_ANNOTATION), "{e}");
        // And the upstream opt-in does not open the client keys.
        let up = ann(&[
            (UPSTREAM_KEY_ANNOTATION, "chat/token"),
            (UPSTREAM_HOSTS_ANNOTATION, "vllm.svc"),
        ]);
        assert!(allows(&up, "chat", SecretUse::ClientKeys).is_err());
        // `*` is a name like any other, not every policy.
        let star = ann(&[
            (CLIENT_KEYS_ANNOTATION, "*"),
            (UPSTREAM_KEY_ANNOTATION, "*/token"),
            (UPSTREAM_HOSTS_ANNOTATION, "*"),
        ]);
        assert!(allows(&star, "chat", SecretUse::ClientKeys).is_err());
        assert!(allows(&star, "chat", upstream_key("token", &url)).is_err());
    }

    #[test]
    fn the_retired_annotation_opens_nothing_and_says_so() {
        let url: http::Uri = "http://vllm.svc".parse().unwrap();
        let old = ann(&[(RETIRED_ANNOTATION, "*")]);
        for use_ in [SecretUse::ClientKeys, upstream_key("token", &url)] {
            let e = allows(&old, "chat", use_).unwrap_err();
            assert!(e.contains("no longer honoured"), "{e}");
        }
    }
}
