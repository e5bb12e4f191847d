#!/usr/bin/env bash
# Builds the JS guest runner: compiles QuickJS and the runner to a wasm32-wasip2
# component, pre-initialises it (the engine started and the runner's JavaScript
# evaluated, in its memory image) and writes
#
#   dist/runner-js.wasm         the pre-initialised component, the one to deploy
#   dist/runner-js-plain.wasm   the same component not pre-initialised (it starts the
#                               engine on every run; kept for comparison)
#
#   build.sh                  both; builds the pre-initialiser first (preinit/, in the
#                             root workspace: `cargo build -p cloudpipe-runner-js-preinit`)
#   build.sh --preinit BIN    both, with the pre-initialiser BIN already built (what
#                             preinit's test, tests/sdk_js.rs, passes: its own binary)
#   build.sh --plain          only dist/runner-js-plain.wasm
#
# It installs nothing. It needs: Rust with the wasm32-wasip2 target, and Debian's
# clang, llvm-ar and wasi-libc for QuickJS's C code. The runner's cargo output goes to
# ./target (its own workspace and target dir, apart from the root workspace).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# Where the root workspace builds (the pre-initialiser), before ours is set below.
root_target=${CARGO_TARGET_DIR:-$root/target}

usage() {
  echo "usage: $0 [--preinit BIN | --plain]" >&2
  exit 2
}
preinit=""
plain_only=false
case "$#:${1:-}" in
  0:) ;;
  1:--plain) plain_only=true ;;
  2:--preinit) preinit=$2 ;;
  *) usage ;;
esac
if [ -n "$preinit" ]; then
  if [ ! -x "$preinit" ] || [ -d "$preinit" ]; then
    echo "build.sh: the pre-initialiser $preinit is not an executable" >&2
    exit 2
  fi
  preinit=$(cd "$(dirname "$preinit")" && pwd)/$(basename "$preinit")
fi
cd "$here"

fail() {
  {
    echo
    echo "================================================================================"
    echo "guest-runners/js/build.sh: CANNOT BUILD THE JS RUNNER"
    echo
    printf '%s\n' "$@"
    echo "================================================================================"
    echo
  } >&2
  exit 1
}

missing=()
command -v clang >/dev/null 2>&1 || missing+=("clang (C compiler for QuickJS)")
command -v llvm-ar >/dev/null 2>&1 || missing+=("llvm-ar (archiver for the wasm objects)")
if command -v clang >/dev/null 2>&1 &&
  ! printf '#include <stdlib.h>\n#include <time.h>\n' | clang --target=wasm32-wasi -E -x c - >/dev/null 2>&1; then
  missing+=("wasi-libc (C library headers for wasm32-wasi)")
fi
if [ ${#missing[@]} -gt 0 ]; then
  fail "Missing:" "${missing[@]/#/  - }" "" \
    "Install them with:" \
    "  apt-get update && apt-get install -y clang lld wasi-libc llvm"
fi
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-wasip2; then
  fail "The Rust target wasm32-wasip2 is not installed." "" \
    "Install it with:" \
    "  rustup target add wasm32-wasip2"
fi

export CARGO_TARGET_DIR="$here/target"
# rquickjs-sys would otherwise download a wasi-sdk during the build.
export RQUICKJS_SYS_NO_WASI_SDK=1
# Debian's clang knows `wasm32-wasi`, not `wasm32-wasip2`: tools/clang-wasi maps it.
export CC_wasm32_wasip2="$here/tools/clang-wasi"
export AR_wasm32_wasip2=llvm-ar

echo "build.sh: compiling the runner (wasm32-wasip2)" >&2
SECONDS=0
# Flags meant for a host build (this may run under `cargo test`) must not reach it.
env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u CARGO_BUILD_RUSTFLAGS -u CARGO_BUILD_TARGET \
  cargo build --locked --release --target wasm32-wasip2 -p cloudpipe-runner-js

mkdir -p dist
plain="$CARGO_TARGET_DIR/wasm32-wasip2/release/runner-js.wasm"
cp "$plain" dist/runner-js-plain.wasm.tmp.$$
mv dist/runner-js-plain.wasm.tmp.$$ dist/runner-js-plain.wasm
echo "build.sh: wrote $here/dist/runner-js-plain.wasm (cargo: ${SECONDS}s)" >&2
if $plain_only; then
  exit 0
fi

if [ -z "$preinit" ]; then
  echo "build.sh: compiling the pre-initialiser (root workspace)" >&2
  (cd "$root" && CARGO_TARGET_DIR="$root_target" cargo build --locked -p cloudpipe-runner-js-preinit)
  preinit="$root_target/debug/cloudpipe-runner-js-preinit"
fi
# The pre-initialiser checks its output by running one job on it.
SECONDS=0
out=dist/runner-js.wasm.tmp.$$
trap 'rm -f "$out"' EXIT
"$preinit" dist/runner-js-plain.wasm "$out" \
  --check '{"source": "async (a, b) => { await null; return [a + b, typeof Math.random()] }", "args": [3, 4]}' \
  $'[7,"number"]\n'
mv "$out" dist/runner-js.wasm
echo "build.sh: wrote $here/dist/runner-js.wasm (pre-initialised in ${SECONDS}s)" >&2
