//! Client API keys: who a request comes from, for a policy with `spec.clientAuth`.
//!
//! The keys are a directory with one file per client (`--client-keys-dir`; the operator
//! mounts the policy's Secret there, so each data entry is a file): the file's name is the
//! client's name (as in `spec.priority.clients`), its content (trimmed) the client's key.
//! Names starting with `.` are skipped (the `..data` links of a Secret volume). The directory
//! is re-read while the gateway runs, so a rotated, added or removed key applies without a
//! restart; a directory that becomes unreadable, or a set with an empty or duplicate key,
//! keeps the last good set, reported once per distinct problem.
//!
//! A presented key is compared with every known key in constant time (no early exit on the
//! first differing byte or the first match), so response timing tells nothing about how
//! close a guess was. Keys are never logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::http::{HeaderMap, header};

/// One client: its name and key.
#[derive(Clone, PartialEq, Eq)]
struct Client {
    name: Arc<str>,
    key: Box<[u8]>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("name", &self.name).finish()
    }
}

/// Why a key directory cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read the client keys directory {path}: {error}")]
    Read { path: PathBuf, error: String },
    #[error("the key of client {0:?} is empty")]
    Empty(String),
    #[error("clients {0:?} and {1:?} have the same key")]
    Duplicate(String, String),
}

/// The clients in force; swapped when their directory changes.
#[derive(Debug, Default)]
pub struct ClientKeys(ArcSwap<Vec<Client>>);

/// Equal in time that depends only on the lengths, never on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The token of `Authorization: Bearer <token>`.
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

impl ClientKeys {
    /// The clients read from `dir`.
    pub fn load(dir: &Path) -> Result<Self, KeysError> {
        Ok(ClientKeys(ArcSwap::from_pointee(read_dir(dir)?)))
    }

    /// The name of the client whose key `headers` carry, if any. Every known key is
    /// compared, whatever matches.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<Arc<str>> {
        let token = bearer_token(headers)?;
        let clients = self.0.load();
        let mut found = None;
        for c in clients.iter() {
            if constant_time_eq(token, &c.key) {
                found = Some(c.name.clone());
            }
        }
        found
    }

    /// Number of clients in force.
    pub fn len(&self) -> usize {
        self.0.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads a key directory: every visible regular file (links followed) is a client.
fn read_dir(dir: &Path) -> Result<Vec<Client>, KeysError> {
    let read_err = |e: std::io::Error| KeysError::Read {
        path: dir.to_owned(),
        error: e.to_string(),
    };
    let mut clients = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        if !std::fs::metadata(&path).map_err(read_err)?.is_file() {
            continue;
        }
        let key = super::api_key::read_key_bytes(&path).map_err(read_err)?;
        let key = key.trim_ascii();
        if key.is_empty() {
            return Err(KeysError::Empty(name));
        }
        clients.push(Client {
            name: name.into(),
            key: key.into(),
        });
    }
    clients.sort_by(|a, b| a.name.cmp(&b.name));
    for (i, a) in clients.iter().enumerate() {
        if let Some(b) = clients[i + 1..].iter().find(|b| b.key == a.key) {
            return Err(KeysError::Duplicate(a.name.to_string(), b.name.to_string()));
        }
    }
    Ok(clients)
}

/// Re-reads `dir` every `interval` and puts each changed, valid set in force; runs until the
/// task is dropped.
pub async fn follow_keys_dir(dir: PathBuf, keys: Arc<ClientKeys>, interval: Duration) {
    let mut reported: Option<KeysError> = None;
    loop {
        tokio::time::sleep(interval).await;
        let d = dir.clone();
        let Ok(read) = tokio::task::spawn_blocking(move || read_dir(&d)).await else {
            continue;
        };
        match read {
            Ok(clients) => {
                reported = None;
                if **keys.0.load() != clients {
                    let n = clients.len();
                    keys.0.store(Arc::new(clients));
                    tracing::info!(dir = %dir.display(), clients = n, "client API keys reloaded");
                }
            }
            Err(e) => {
                if reported.as_ref() != Some(&e) {
                    tracing::error!(error = %e, "keeping the last good client API keys");
                    reported = Some(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-clients-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn a_known_bearer_key_names_its_client() {
        let d = dir("known");
        std::fs::write(d.join("checkout"), "sk-checkout\n").unwrap();
        std::fs::write(d.join("batch"), "sk-batch").unwrap();
        std::fs::write(d.join(".hidden"), "sk-hidden").unwrap();
        std::fs::create_dir(d.join("..data")).unwrap();
        let keys = ClientKeys::load(&d).unwrap();
        assert_eq!(keys.len(), 2);
        let who = |v: &str| keys.authenticate(&auth(v)).map(|n| n.to_string());
        assert_eq!(who("Bearer sk-checkout").as_deref(), Some("checkout"));
        assert_eq!(who("bearer  sk-batch ").as_deref(), Some("batch"));
        for wrong in [
            "Bearer sk-hidden",
            "Bearer sk-batc",
            "Bearer sk-batch2",
            "Basic sk-batch",
            "sk-batch",
            "Bearer ",
        ] {
            assert_eq!(who(wrong), None, "{wrong}");
        }
        assert_eq!(keys.authenticate(&HeaderMap::new()), None);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn empty_or_duplicate_keys_and_a_missing_directory_are_refused() {
        let d = dir("bad");
        std::fs::write(d.join("a"), "\n").unwrap();
        assert_eq!(
            ClientKeys::load(&d).unwrap_err(),
            KeysError::Empty("a".into())
        );
        std::fs::write(d.join("a"), "same").unwrap();
        std::fs::write(d.join("b"), "same\n").unwrap();
        assert_eq!(
            ClientKeys::load(&d).unwrap_err(),
            KeysError::Duplicate("a".into(), "b".into())
        );
        std::fs::remove_dir_all(&d).unwrap();
        assert!(matches!(
            ClientKeys::load(&d).unwrap_err(),
            KeysError::Read { .. }
        ));
    }

    #[test]
    fn a_client_key_file_past_the_cap_refuses_the_set() {
        let d = dir("cap");
        let cap = super::super::api_key::MAX_KEY_FILE_BYTES as usize;
        std::fs::write(d.join("a"), "k".repeat(cap + 1)).unwrap();
        match ClientKeys::load(&d).unwrap_err() {
            KeysError::Read { error, .. } => assert!(error.contains("not a key"), "{error}"),
            other => panic!("{other:?}"),
        }
        std::fs::write(d.join("a"), "k".repeat(cap)).unwrap();
        assert_eq!(ClientKeys::load(&d).unwrap().len(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }
}
