#!/usr/bin/env bash
# Runs every cargo-fuzz target for a short while (25 s each by default) and exits non-zero on the
# first crash, leak, timeout or out-of-memory, naming the reproducer that libFuzzer saved.
#
#   fuzz/run-smoke.sh                     # all targets, 25 s each
#   FUZZ_SECONDS=300 fuzz/run-smoke.sh checkpoint open_corrupted
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`) and a C++ compiler (libfuzzer-sys builds
# libFuzzer). cargo-fuzz passes nightly-only flags (-Zsanitizer=address, sancov); RUSTC_BOOTSTRAP=1
# lets the stable toolchain accept them, and is harmless on nightly. Corpora accumulate in
# fuzz/corpus/<target>, crashes land in fuzz/artifacts/<target> (both ignored by git).
# Replay a crash: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <artifact file>
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-25}"
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=(record_header checkpoint superblock open_corrupted nbd_handshake nbd_request repl_frame)
fi
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run-smoke: cargo-fuzz is not installed; install it with: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

# One build for all targets, so that the runs below do not rebuild.
cargo fuzz build

failed=()
for target in "${targets[@]}"; do
    extra=()
    case "$target" in
        # Record headers span up to 8 blocks; let inputs reach past the first.
        record_header) extra=(-max_len=36864) ;;
    esac
    mkdir -p "corpus/$target"
    echo "run-smoke: fuzzing $target for ${seconds}s"
    # -timeout: an input that takes 20 s means the engine hangs; that is a failure too.
    if ! cargo fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 "${extra[@]}"; then
        echo "run-smoke: $target FAILED; reproducer(s) in fuzz/artifacts/$target:" >&2
        ls -1 "artifacts/$target" >&2 || true
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "run-smoke: failing targets: ${failed[*]}" >&2
    exit 1
fi
echo "run-smoke: all ${#targets[@]} targets ran ${seconds}s each without a crash"
