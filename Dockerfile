# syntax=docker/dockerfile:1
# Multi-stage build of the single `sluice` binary (operator, gateway, sim-engine, ...).
FROM rust:1.95-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
# Dependencies first, so source edits do not rebuild them: every target Cargo.toml declares
# ([[bench]], [[test]]) gets a stub, then the real sources replace them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches tests && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && awk '/^\[\[bench\]\]/ {d = "benches"} /^\[\[test\]\]/ {d = "tests"} \
            /^name = / && d != "" {gsub(/"/, "", $3); print d "/" $3 ".rs"; d = ""}' Cargo.toml \
       | while read -r f; do echo 'fn main() {}' > "$f"; done \
    && cargo build --release --locked && rm -rf src benches
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="sluice" \
      org.opencontainers.image.description="Latency-based load shedding for LLM inference servers on Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /src/target/release/sluice /sluice
USER 65532:65532
ENTRYPOINT ["/sluice"]
