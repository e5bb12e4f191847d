#!/usr/bin/env bash
# Builds the JS guest runner: compiles QuickJS and the runner to a wasm32-wasip2
# component, pre-initialises it (the engine started and the runner's JavaScript
# evaluated, in its memory image) and writes
#
#   dist/runner-js.wasm         the pre-initialised component, the one to deploy
#   dist/runner-js-plain.wasm   the same component not pre-initialised (it starts the
#                               engine on every run; kept for comparison)
#
# It installs nothing. It needs: Rust with the wasm32-wasip2 target, and Debian's
# clang, llvm-ar and wasi-libc for QuickJS's C code. Cargo output goes to ./target
# (its own workspace and target dir, apart from the root workspace).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
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
cargo build --locked --release --target wasm32-wasip2 -p cloudpipe-runner-js
echo "build.sh: compiling the pre-initialiser" >&2
cargo build --locked --profile preinit -p cloudpipe-runner-js-preinit

mkdir -p dist
plain="$CARGO_TARGET_DIR/wasm32-wasip2/release/runner-js.wasm"
cp "$plain" dist/runner-js-plain.wasm
# The pre-initialiser checks its output by running one job on it.
"$CARGO_TARGET_DIR/preinit/cloudpipe-runner-js-preinit" "$plain" dist/runner-js.wasm.tmp \
  --check '{"source": "async (a, b) => { await null; return [a + b, typeof Math.random()] }", "args": [3, 4]}' \
  $'[7,"number"]\n'
mv dist/runner-js.wasm.tmp dist/runner-js.wasm
echo "build.sh: wrote $here/dist/runner-js.wasm" >&2
