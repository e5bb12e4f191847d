#!/usr/bin/env bash
# The vm executor: a fresh TCG boot vs a clone to first output, and 1 → 16 clones
# ready behind the fan-out barrier, in one run (runtime/examples/vm_bench.rs, with a
# fresh template snapshot). Prints Markdown tables.
#
#   bash api/benches/vm.sh
#   VM_BENCH_RUNS=20 VM_BENCH_BOOTS=5 bash api/benches/vm.sh
#
# Needs: apt-get install -y qemu-system-x86 linux-image-amd64 busybox-static, and
# rustup's x86_64-unknown-linux-musl target (added by the agent's build.sh).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init vm
cd "$ROOT"
command -v qemu-system-x86_64 >/dev/null || die "apt-get install -y qemu-system-x86"
ls /boot/vmlinuz-* >/dev/null 2>&1 || die "apt-get install -y linux-image-amd64"
[ -x /bin/busybox ] || die "apt-get install -y busybox-static"
AGENT="$(guest-runners/vm-agent/build.sh)"
echo "$(nproc) cores, $(qemu-system-x86_64 --version | head -1), kernel $(ls /boot/vmlinuz-* | tail -1), accel tcg"
echo
cargo run -q --release -p cloudpipe-runtime --example vm_bench -- "$AGENT"
