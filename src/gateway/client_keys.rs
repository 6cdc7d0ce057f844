//! Client API keys: who a request comes from, for a policy with `spec.clientAuth`.
//!
//! The keys are a directory with one file per client (`--client-keys-dir`; the operator
//! mounts the policy's Secret there, so each data entry is a file): the file's name is the
//! client's name (as in `spec.priority.clients`), its content (trimmed) the client's key.
//! Names starting with `.` are skipped (the `..data` links of a Secret volume). The directory
//! is re-read while the gateway runs, so a rotated, added or removed key applies without a
//! restart. Removals always apply: an entry that cannot be used (an empty key, or a key two
//! clients share: every copy of it) is left out of the set and the rest is put in force,
//! counted in `sluice_client_keys_invalid` and logged once per distinct problem; a bad entry
//! never keeps an old set alive. Only a directory that cannot be read at all keeps the last
//! set (it says nothing about what was removed).
//!
//! Only the SHA-256 digest of each key is kept. A presented key's digest is compared with
//! every known digest in constant time (fixed 32 bytes, no early exit on the first differing
//! byte or the first match), so response timing tells nothing about how close a guess was,
//! nor about how long the keys are. Keys are never logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::http::{HeaderMap, header};

/// One client: its name and the digest of its key.
#[derive(Clone, PartialEq, Eq)]
struct Client {
    name: Arc<str>,
    digest: Digest,
}

type Digest = [u8; 32];

fn digest(key: &[u8]) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
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
    #[error("cannot read the key of client {name:?}: {error}")]
    File { name: String, error: String },
}

/// The clients in force; swapped when their directory changes.
#[derive(Debug, Default)]
pub struct ClientKeys {
    clients: ArcSwap<Vec<Client>>,
    /// Entries of the last read left out of the set.
    invalid: std::sync::atomic::AtomicUsize,
}

/// What one read of a key directory gives: the clients that can be used, and what was wrong
/// with the entries left out.
#[derive(Debug, Default, PartialEq, Eq)]
struct KeySet {
    clients: Vec<Client>,
    problems: Vec<KeysError>,
    /// Entries left out (a duplicate pair leaves out both).
    left_out: usize,
}

/// Equal in a time that never depends on where the digests differ.
fn constant_time_eq(a: &Digest, b: &Digest) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
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
    /// The clients read from `dir` (entries that cannot be used are left out and logged).
    pub fn load(dir: &Path) -> Result<Self, KeysError> {
        let set = read_dir(dir)?;
        for e in &set.problems {
            tracing::error!(error = %e, "client API key left out");
        }
        Ok(ClientKeys {
            clients: ArcSwap::from_pointee(set.clients),
            invalid: set.left_out.into(),
        })
    }

    /// Entries of the key directory left out of the set in force.
    pub fn invalid(&self) -> usize {
        self.invalid.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The name of the client whose key `headers` carry, if any. Every known key is
    /// compared, whatever matches.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<Arc<str>> {
        let presented = digest(bearer_token(headers)?);
        let clients = self.clients.load();
        let mut found = None;
        for c in clients.iter() {
            if constant_time_eq(&presented, &c.digest) {
                found = Some(c.name.clone());
            }
        }
        found
    }

    /// Number of clients in force.
    pub fn len(&self) -> usize {
        self.clients.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads a key directory: every visible regular file (links followed) is a client. Entries
/// with an empty key, and every client whose key another shares, are left out.
fn read_dir(dir: &Path) -> Result<KeySet, KeysError> {
    let read_err = |e: std::io::Error| KeysError::Read {
        path: dir.to_owned(),
        error: e.to_string(),
    };
    let mut set = KeySet::default();
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
        let key = match super::api_key::read_key_bytes(&path) {
            Ok(key) => key,
            Err(e) => {
                set.problems.push(KeysError::File {
                    name,
                    error: e.to_string(),
                });
                set.left_out += 1;
                continue;
            }
        };
        let key = key.trim_ascii();
        if key.is_empty() {
            set.problems.push(KeysError::Empty(name));
            set.left_out += 1;
            continue;
        }
        set.clients.push(Client {
            name: name.into(),
            digest: digest(key),
        });
    }
    set.clients.sort_by(|a, b| a.name.cmp(&b.name));
    // Every client whose key another shares is left out; each such key is reported once, by
    // the first two names that share it.
    let mut shared = vec![false; set.clients.len()];
    for i in 0..set.clients.len() {
        if shared[i] {
            continue;
        }
        let key = &set.clients[i].digest;
        let same: Vec<usize> = (i + 1..set.clients.len())
            .filter(|&j| set.clients[j].digest == *key)
            .collect();
        if let Some(&j) = same.first() {
            let names = (&set.clients[i].name, &set.clients[j].name);
            set.problems.push(KeysError::Duplicate(
                names.0.to_string(),
                names.1.to_string(),
            ));
            shared[i] = true;
            same.iter().for_each(|&j| shared[j] = true);
        }
    }
    set.left_out += shared.iter().filter(|s| **s).count();
    let mut keep = shared.iter().map(|s| !s);
    set.clients.retain(|_| keep.next().unwrap_or(true));
    set.problems.sort_by_key(|e| e.to_string());
    Ok(set)
}

impl ClientKeys {
    /// Puts what one read of `dir` found in force: the usable clients, always (a removed key
    /// stops working whatever else is wrong), or the last set when the directory could not
    /// be read at all. Logs each new problem once (`reported` holds the last read's).
    fn apply_read(
        &self,
        dir: &Path,
        read: Result<KeySet, KeysError>,
        reported: &mut Vec<KeysError>,
    ) {
        match read {
            Ok(set) => {
                self.invalid
                    .store(set.left_out, std::sync::atomic::Ordering::Relaxed);
                if **self.clients.load() != set.clients {
                    let n = set.clients.len();
                    self.clients.store(Arc::new(set.clients));
                    tracing::info!(dir = %dir.display(), clients = n, "client API keys reloaded");
                }
                for e in set.problems.iter().filter(|e| !reported.contains(e)) {
                    tracing::error!(error = %e, "client API key left out");
                }
                *reported = set.problems;
            }
            Err(e) => {
                if *reported != [e.clone()] {
                    tracing::error!(error = %e, "keeping the last client API keys: the directory cannot be read");
                }
                *reported = vec![e];
            }
        }
    }
}

/// Re-reads `dir` every `interval` and puts each changed set in force (removals always);
/// runs until the task is dropped.
pub async fn follow_keys_dir(dir: PathBuf, keys: Arc<ClientKeys>, interval: Duration) {
    let mut reported = Vec::new();
    let d = dir.clone();
    crate::policy::follow::poll(
        interval,
        move || read_dir(&d),
        |read| {
            keys.apply_read(&dir, read, &mut reported);
        },
    )
    .await;
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
    fn unusable_entries_are_left_out_and_the_rest_is_in_force() {
        let d = dir("bad");
        std::fs::write(d.join("a"), "\n").unwrap();
        std::fs::write(d.join("b"), "same").unwrap();
        std::fs::write(d.join("c"), "same\n").unwrap();
        std::fs::write(d.join("d"), "sk-d").unwrap();
        let cap = super::super::api_key::MAX_KEY_FILE_BYTES as usize;
        std::fs::write(d.join("e"), "k".repeat(cap + 1)).unwrap();
        let set = read_dir(&d).unwrap();
        let names: Vec<_> = set.clients.iter().map(|c| &*c.name).collect();
        assert_eq!(names, ["d"]);
        assert_eq!(set.left_out, 4, "a, b and c (both copies), e");
        assert!(set.problems.contains(&KeysError::Empty("a".into())));
        assert!(
            set.problems
                .contains(&KeysError::Duplicate("b".into(), "c".into()))
        );
        let too_long = |e: &KeysError| matches!(e, KeysError::File { name, error } if name == "e" && error.contains("not a key"));
        assert!(set.problems.iter().any(too_long), "{:?}", set.problems);
        let keys = ClientKeys::load(&d).unwrap();
        assert_eq!((keys.len(), keys.invalid()), (1, 4));
        assert_eq!(keys.authenticate(&auth("Bearer same")), None);
        assert_eq!(
            keys.authenticate(&auth("Bearer sk-d")).as_deref(),
            Some("d")
        );
        std::fs::remove_dir_all(&d).unwrap();
        assert!(matches!(
            ClientKeys::load(&d).unwrap_err(),
            KeysError::Read { .. }
        ));
    }

    #[test]
    fn a_removed_key_stops_working_even_while_another_entry_is_bad() {
        // The revocation that failed open: remove batch's key and add a client with an empty
        // key; batch's old key used to stay in force with the whole previous set.
        let d = dir("revoke");
        std::fs::write(d.join("batch"), "sk-batch").unwrap();
        std::fs::write(d.join("web"), "sk-web").unwrap();
        let keys = ClientKeys::load(&d).unwrap();
        assert_eq!(keys.len(), 2);
        std::fs::remove_file(d.join("batch")).unwrap();
        std::fs::write(d.join("new"), "").unwrap();
        let mut reported = Vec::new();
        keys.apply_read(&d, read_dir(&d), &mut reported);
        assert_eq!(keys.authenticate(&auth("Bearer sk-batch")), None);
        assert_eq!(
            keys.authenticate(&auth("Bearer sk-web")).as_deref(),
            Some("web")
        );
        assert_eq!(keys.invalid(), 1, "the empty entry is counted");
        assert_eq!(reported, [KeysError::Empty("new".into())]);
        // A directory that cannot be read says nothing about removals: the set stays.
        std::fs::remove_dir_all(&d).unwrap();
        keys.apply_read(&d, read_dir(&d), &mut reported);
        assert_eq!(
            keys.authenticate(&auth("Bearer sk-web")).as_deref(),
            Some("web")
        );
        assert!(matches!(reported.as_slice(), [KeysError::Read { .. }]));
    }

    #[test]
    fn keys_are_kept_and_compared_as_digests_of_one_length() {
        assert!(constant_time_eq(&digest(b"abc"), &digest(b"abc")));
        assert!(!constant_time_eq(&digest(b"abc"), &digest(b"abd")));
        // A prefix of a key, or a key one byte longer, is compared as 32 bytes like any other.
        assert!(!constant_time_eq(&digest(b"abc"), &digest(b"ab")));
        assert!(!constant_time_eq(&digest(b"abc"), &digest(b"abcd")));
        let d = dir("digest");
        std::fs::write(d.join("a"), "sk-a\n").unwrap();
        let set = read_dir(&d).unwrap();
        assert_eq!(
            set.clients[0].digest,
            digest(b"sk-a"),
            "the trimmed key's digest"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
