//! sluice's image as `scripts/image.sh` builds it here (buildah from scratch, Debian packages):
//! the same binary path, user, entrypoint and labels as the Dockerfile users build; no shell;
//! the binary runs from the image's root filesystem alone as user 65532; two builds of one
//! commit give the same layer.
//!
//! Needs `SLUICE_IMAGE_ARCHIVE` (the docker-archive `scripts/image.sh build` printed; the test
//! script sets it) and buildah.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::{REPO, TempDir};

fn archive() -> PathBuf {
    let path = std::env::var_os("SLUICE_IMAGE_ARCHIVE").unwrap_or_else(|| {
        panic!(
            "SLUICE_IMAGE_ARCHIVE is not set: run the suite with scripts/test.sh, or \
             `export SLUICE_IMAGE_ARCHIVE=$(scripts/image.sh build)` first"
        )
    });
    let path = PathBuf::from(path);
    assert!(path.is_file(), "no image archive at {}", path.display());
    path
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The docker-archive unpacked: its manifest, image config and the root filesystem of its
/// (single) layer.
struct Unpacked {
    _dir: TempDir,
    config: Value,
    layer: PathBuf,
    rootfs: PathBuf,
}

fn unpack(archive: &Path, name: &str) -> Unpacked {
    let dir =
        TempDir(std::env::temp_dir().join(format!("sluice-image-{name}-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(dir.0.join("rootfs")).unwrap();
    ok(Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(&dir.0));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.0.join("manifest.json")).unwrap()).unwrap();
    let entry = &manifest[0];
    let config: Value = serde_json::from_slice(
        &std::fs::read(dir.0.join(entry["Config"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let layers = entry["Layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "one layer expected: {layers:?}");
    let layer = dir.0.join(layers[0].as_str().unwrap());
    let rootfs = dir.0.join("rootfs");
    ok(Command::new("tar")
        .arg("-xf")
        .arg(&layer)
        .arg("-C")
        .arg(&rootfs));
    Unpacked {
        _dir: dir,
        config,
        layer,
        rootfs,
    }
}

/// What the Dockerfile's final stage declares: binary path, user, entrypoint, labels.
fn dockerfile_final_stage() -> (String, String, Vec<String>, Vec<(String, String)>) {
    let text = std::fs::read_to_string(format!("{REPO}/Dockerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let stage = joined.rsplit("\nFROM ").next().unwrap();
    let line = |word: &str| {
        stage
            .lines()
            .find_map(|l| l.trim().strip_prefix(word))
            .unwrap_or_else(|| panic!("no {word} in the Dockerfile's final stage"))
            .trim()
            .to_owned()
    };
    let copy = line("COPY --from=build ");
    let binary = copy.split_whitespace().last().unwrap().to_owned();
    let user = line("USER ");
    let entrypoint: Vec<String> = serde_json::from_str(&line("ENTRYPOINT ")).unwrap();
    let labels = line("LABEL ");
    let mut parsed = Vec::new();
    let mut rest = labels.as_str();
    while let Some((key, after)) = rest.split_once("=\"") {
        let (value, tail) = after.split_once('"').unwrap();
        parsed.push((key.trim().to_owned(), value.to_owned()));
        rest = tail;
    }
    (binary, user, entrypoint, parsed)
}

#[test]
fn the_image_matches_the_dockerfile_and_runs_as_non_root_without_a_shell() {
    let image = unpack(&archive(), "dev");
    let config = &image.config["config"];
    let (binary, user, entrypoint, labels) = dockerfile_final_stage();
    assert_eq!(binary, "/sluice");
    assert_eq!(
        config["User"],
        user.as_str(),
        "user differs from the Dockerfile"
    );
    assert_eq!(
        config["Entrypoint"],
        serde_json::to_value(&entrypoint).unwrap(),
        "entrypoint differs from the Dockerfile"
    );
    assert!(
        config["Cmd"].is_null() || config["Cmd"] == serde_json::json!([]),
        "the image sets a default command: {}",
        config["Cmd"]
    );
    assert!(!labels.is_empty());
    for (key, value) in &labels {
        assert_eq!(config["Labels"][key], value.as_str(), "label {key}");
    }

    let root = &image.rootfs;
    let bin = root.join(binary.trim_start_matches('/'));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(bin.metadata().unwrap().permissions().mode() & 0o777, 0o755);
    for shell in [
        "bin/sh",
        "bin/bash",
        "usr/bin/sh",
        "usr/bin/bash",
        "bin/busybox",
    ] {
        assert!(
            !root.join(shell).exists(),
            "the image has a shell: /{shell}"
        );
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(passwd.contains(":65532:65532:"), "{passwd}");
    let bundle = std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(
        bundle.matches("BEGIN CERTIFICATE").count() > 100,
        "CA bundle too small"
    );

    // The binary runs from the image's files alone (its own glibc and libgcc), as the image's
    // user: chroot with no host library in sight.
    let out = ok(Command::new("chroot")
        .arg(format!("--userspec={user}"))
        .arg(root)
        .arg(&binary)
        .arg("--version"));
    assert!(out.starts_with("sluice "), "{out}");
}

#[test]
fn two_builds_of_one_commit_give_the_same_layer() {
    let first = unpack(&archive(), "first");
    let again = PathBuf::from(
        ok(Command::new(format!("{REPO}/scripts/image.sh")).args(["build", "repro"]))
            .trim()
            .to_owned(),
    );
    let second = unpack(&again, "second");
    let _ = std::fs::remove_file(&again);
    let _ = Command::new("buildah")
        .args(["rmi", "ghcr.io/sluice-dev/sluice:repro"])
        .output();
    let digest = |p: &Path| ok(Command::new("sha256sum").arg(p));
    assert_eq!(
        digest(&first.layer).split_whitespace().next(),
        digest(&second.layer).split_whitespace().next(),
        "the layer differs between two builds of the same commit"
    );
    assert_eq!(first.config["created"], second.config["created"]);
    assert_eq!(first.config["config"], second.config["config"]);
}

/// The Dockerfile's build stage, run here as far as cargo loading the manifest: its RUN
/// commands (with `cargo build` replaced by a probe that stops once the manifest and every
/// declared target are found) over exactly the files its COPY lines bring. A target added to
/// Cargo.toml without a stub or a COPY fails here, not in a user's `docker build`.
#[test]
fn the_dockerfile_build_stage_finds_every_target_cargo_declares() {
    let text = std::fs::read_to_string(format!("{REPO}/Dockerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let stage = joined.split("\nFROM ").nth(1).expect("a build stage");
    let dir =
        TempDir(std::env::temp_dir().join(format!("sluice-dockerfile-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let probe = "probe() { out=$(cargo build --release --locked --offline --bin dockerfile-probe 2>&1); \
                 case $out in *'no bin target named'*) return 0 ;; *) echo \"$out\" >&2; return 1 ;; esac; }";
    let mut runs = 0;
    for line in stage.lines().map(str::trim) {
        if let Some(copy) = line.strip_prefix("COPY ") {
            let parts: Vec<&str> = copy.split_whitespace().collect();
            for src in &parts[..parts.len() - 1] {
                ok(Command::new("cp")
                    .arg("-r")
                    .arg(format!("{REPO}/{src}"))
                    .arg(&dir.0));
            }
        } else if let Some(run) = line.strip_prefix("RUN ") {
            assert!(run.contains("cargo build --release --locked"), "{run}");
            let script = format!(
                "{probe}\n{}",
                run.replace("cargo build --release --locked", "probe")
            );
            ok(Command::new("bash")
                .args(["-o", "pipefail", "-c", &script])
                .current_dir(&dir.0)
                .env("CARGO_TARGET_DIR", dir.0.join("target")));
            runs += 1;
        }
    }
    assert_eq!(
        runs, 2,
        "the build stage has two RUN steps (dependencies, then sources)"
    );
}
