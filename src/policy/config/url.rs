//! The upstream URL of a policy (and of `sluice gateway --upstream`).

/// An upstream base URL: http or https, with a host, and without user-info. Credentials in a
/// URL would be logged and written into the gateway Deployment's arguments, and were never
/// sent: the upstream's key belongs in `upstream.apiKeySecretRef`. (Also the parser of
/// `sluice gateway --upstream`.)
pub fn upstream_url(text: &str) -> Result<http::Uri, String> {
    let bad = || format!("{text:?} must be an http:// or https:// URL with a host");
    if text
        .parse::<http::Uri>()
        .is_ok_and(|u| u.authority().is_some_and(|a| a.as_str().contains('@')))
    {
        return Err(
            "the URL must not carry credentials (user:password@); put the upstream's key in \
             upstream.apiKeySecretRef (or --upstream-api-key-file)"
                .to_owned(),
        );
    }
    let uri: http::Uri = text.parse().map_err(|_| bad())?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad()),
    }
    match uri.host() {
        Some(h) if !h.is_empty() => Ok(uri),
        _ => Err(bad()),
    }
}
