//! The API key the gateway sends upstream (`Authorization: Bearer <key>`, replacing the
//! client's header): from `SLUICE_UPSTREAM_API_KEY` / `--upstream-api-key`, or from a file
//! (`--upstream-api-key-file`, what the operator mounts from the policy's Secret) that is
//! re-read while the gateway runs, so a rotated Secret reaches running pods without a restart.
//!
//! Keys are trimmed (a Secret written with `echo` ends in a newline, which must not stop the
//! pod) and must be non-empty and valid in a header. A file that becomes unreadable or invalid
//! keeps the last good key, reported once per distinct problem.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use axum::http::HeaderValue;

/// A key given on the command line or in the environment: `Debug` never prints it, so a
/// logged or panicking `GatewayArgs` or `GatewayOptions` does not leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(pub String);

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for SecretString {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretString(s.to_owned()))
    }
}

/// Why a key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the upstream API key is empty")]
    Empty,
    #[error("the upstream API key contains characters not allowed in an HTTP header")]
    NotAHeader,
    #[error("cannot read the upstream API key file {path}: {error}")]
    Read { path: PathBuf, error: String },
}

/// Largest key file read (upstream or client key): far above any real key (JWTs included), and
/// a file pointed at something endless (`/dev/zero`, a growing log) is refused after this many
/// bytes instead of being read whole every reload interval.
pub const MAX_KEY_FILE_BYTES: u64 = 16 << 10;

/// Reads at most [`MAX_KEY_FILE_BYTES`] of a key file; a longer one is an error.
pub fn read_key_bytes(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut out)?;
    if out.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("longer than {MAX_KEY_FILE_BYTES} bytes: not a key"),
        ));
    }
    Ok(out)
}

/// `Bearer <key>` for a key as written (surrounding whitespace removed), marked sensitive so
/// it is never logged.
pub fn bearer(key: &str) -> Result<HeaderValue, KeyError> {
    let key = key.trim();
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    let mut v =
        HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| KeyError::NotAHeader)?;
    v.set_sensitive(true);
    Ok(v)
}

/// Reads and checks a key file.
pub fn read_key_file(path: &Path) -> Result<HeaderValue, KeyError> {
    let bytes = read_key_bytes(path).map_err(|e| KeyError::Read {
        path: path.to_owned(),
        error: e.to_string(),
    })?;
    bearer(std::str::from_utf8(&bytes).map_err(|_| KeyError::NotAHeader)?)
}

/// The key in force; swapped when its file changes.
#[derive(Debug, Default)]
pub struct UpstreamKey(ArcSwapOption<HeaderValue>);

impl UpstreamKey {
    pub fn new(key: Option<HeaderValue>) -> Self {
        UpstreamKey(ArcSwapOption::new(key.map(Arc::new)))
    }

    /// The key to send now, if any.
    pub fn current(&self) -> Option<Arc<HeaderValue>> {
        self.0.load_full()
    }

    fn set(&self, key: HeaderValue) {
        self.0.store(Some(Arc::new(key)));
    }
}

/// What one read of the key file changes: a new key to use, or nothing (same key, or a
/// problem already reported: the last good key stays).
#[derive(Debug, Default)]
pub struct KeyFileFollower {
    reported: Option<KeyError>,
}

impl KeyFileFollower {
    /// Handles one read; returns the key to put in force, and logs a new problem once.
    pub fn on_read(
        &mut self,
        read: Result<HeaderValue, KeyError>,
        current: Option<&HeaderValue>,
    ) -> Option<HeaderValue> {
        match read {
            Ok(v) => {
                self.reported = None;
                (current != Some(&v)).then_some(v)
            }
            Err(e) => {
                if self.reported.as_ref() != Some(&e) {
                    tracing::error!(error = %e, "keeping the last good upstream API key");
                    self.reported = Some(e);
                }
                None
            }
        }
    }

    /// The problem reported last, if the last read failed.
    pub fn problem(&self) -> Option<&KeyError> {
        self.reported.as_ref()
    }
}

/// Re-reads `path` every `interval` and puts each changed, valid key in force; runs until the
/// task is dropped.
pub async fn follow_key_file(path: PathBuf, key: Arc<UpstreamKey>, interval: Duration) {
    let mut follower = KeyFileFollower::default();
    let p = path.clone();
    crate::policy::follow::poll(
        interval,
        move || read_key_file(&p),
        |read| {
            if let Some(v) = follower.on_read(read, key.current().as_deref()) {
                key.set(v);
                tracing::info!(path = %path.display(), "upstream API key reloaded");
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_string_never_shows_in_debug() {
        let k: SecretString = "sk-live-123".parse().unwrap();
        assert_eq!(format!("{k:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(k.clone())), "Some(<redacted>)");
        assert_eq!(k.0, "sk-live-123");
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            args: crate::gateway::GatewayArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "sluice-gateway",
            "--policy-file=p.yaml",
            "--upstream-api-key=sk-live-123",
        ])
        .unwrap();
        assert_eq!(cli.args.upstream_api_key, Some(k));
        let shown = format!("{cli:?}");
        assert!(!shown.contains("sk-live-123"), "{shown}");
    }

    #[test]
    fn keys_are_trimmed_and_checked() {
        assert_eq!(bearer("sk-1\n").unwrap(), "Bearer sk-1");
        assert_eq!(bearer("  sk-2 \r\n").unwrap(), "Bearer sk-2");
        assert!(bearer("sk-3").unwrap().is_sensitive());
        assert_eq!(bearer(" \n"), Err(KeyError::Empty));
        assert_eq!(bearer("a\u{1}b"), Err(KeyError::NotAHeader));
        assert_eq!(bearer("a\nb"), Err(KeyError::NotAHeader));
    }

    #[test]
    fn a_rotated_file_is_used_and_a_broken_one_keeps_the_last_key() {
        let path = std::env::temp_dir().join(format!("sluice-key-test-{}", std::process::id()));
        let mut f = KeyFileFollower::default();
        let mut current = None;
        let mut read = |text: Option<&str>, current: &mut Option<HeaderValue>| {
            match text {
                Some(t) => std::fs::write(&path, t).unwrap(),
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
            if let Some(v) = f.on_read(read_key_file(&path), current.as_ref()) {
                *current = Some(v);
                return true;
            }
            false
        };
        assert!(read(Some("one\n"), &mut current));
        assert!(!read(Some("one"), &mut current), "same key: no change");
        assert!(read(Some("two\n"), &mut current));
        assert!(!read(Some("\n"), &mut current), "an empty file is refused");
        assert!(!read(None, &mut current), "a missing file too");
        assert_eq!(current.as_ref().unwrap(), "Bearer two");
        assert!(read(Some("three"), &mut current));
        assert_eq!(current.unwrap(), "Bearer three");
        assert_eq!(f.problem(), None);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_key_file_past_the_cap_is_refused_without_reading_it_whole() {
        // /dev/zero never ends: without the cap the read would never return.
        match read_key_file(Path::new("/dev/zero")) {
            Err(KeyError::Read { error, .. }) => assert!(error.contains("not a key"), "{error}"),
            other => panic!("{other:?}"),
        }
        let path = std::env::temp_dir().join(format!("sluice-key-cap-{}", std::process::id()));
        let at_cap = "k".repeat(MAX_KEY_FILE_BYTES as usize);
        std::fs::write(&path, &at_cap).unwrap();
        assert_eq!(
            read_key_file(&path).unwrap(),
            format!("Bearer {at_cap}").as_str()
        );
        std::fs::write(&path, format!("{at_cap}k")).unwrap();
        assert!(matches!(read_key_file(&path), Err(KeyError::Read { .. })));
        let _ = std::fs::remove_file(&path);
    }
}
