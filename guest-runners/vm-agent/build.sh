#!/bin/sh
# Builds the guest agent statically (musl) and prints the path of the binary.
# The vm executor makes the initramfs itself from this binary and busybox
# (`cloudpipe serve --vm-agent PATH`; the binary also carries one, built by
# api/build.rs); `initramfs.sh` makes one by hand.
set -eu
cd "$(dirname "$0")"
target=x86_64-unknown-linux-musl
rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target" >&2
cargo build --quiet --release --target "$target" >&2
echo "$PWD/target/$target/release/cloudpipe-vm-agent"
