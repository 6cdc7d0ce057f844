//! Files of the repository and temporary ones the tests make.

use std::path::PathBuf;

use super::REPO;

/// The shell scripts users and CI run: `scripts/*.sh` and `.ci/run`.
pub fn shell_scripts() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(format!("{REPO}/scripts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    files.push(format!("{REPO}/.ci/run"));
    files
}

/// A file removed when dropped.
pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A directory removed with everything in it when dropped.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl TempDir {
    /// A directory of client API keys as the operator mounts a `clientAuth` Secret: one file
    /// per client, named after it, holding its key (with a trailing newline, as `echo` writes).
    pub fn client_keys(name: &str, clients: &[(&str, &str)]) -> TempDir {
        let dir = std::env::temp_dir().join(format!("sluice-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (client, key) in clients {
            std::fs::write(dir.join(client), format!("{key}\n")).unwrap();
        }
        TempDir(dir)
    }

    /// The path as a command-line argument.
    pub fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

/// A policy file in the temp dir, removed when dropped.
pub struct PolicyFile(pub std::path::PathBuf);

impl PolicyFile {
    pub fn new(text: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "sluice-test-policy-{}-{n}.yaml",
            std::process::id()
        ));
        std::fs::write(&p, text).unwrap();
        PolicyFile(p)
    }

    pub fn write(&self, text: &str) {
        std::fs::write(&self.0, text).unwrap();
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A policy YAML document for tests: the given upstream, thresholds and extras. Unless the
/// extras list models, the policy names the sim engine's `sim-llm` (with the default
/// thresholds), as a user would, so its metrics carry that label.
pub fn policy_yaml(upstream: &str, spec_extra: &str) -> String {
    let mut doc = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: test}}\nspec:\n  upstream: {{url: '{upstream}'}}\n"
    );
    if !spec_extra.contains("models:") && !spec_extra.contains("scope: Global") {
        doc.push_str("  models: [{name: sim-llm}]\n");
    }
    for line in spec_extra.lines() {
        doc.push_str("  ");
        doc.push_str(line);
        doc.push('\n');
    }
    doc
}
