#!/usr/bin/env bash
# One run on a lent GPU machine yields every GPU figure of the project and runs every CUDA-only test.
#
#   bash bench/gpu_check.sh            # from the repo root on the GPU machine (about 2-3 minutes)
#   bash bench/gpu_check.sh --dry-run  # the same stages on the cpu backend with tiny sizes (~1 minute)
#
# Results go to $OUT (else runs/gpu): gpu_check.json (every stage's figures, refreshed after each
# stage) and gpu_check.log (all output); the summary is printed last. Stages are independent: each
# runs under its own time limit, and a failing one is recorded and the next one runs anyway; the
# exit status is 1 if any stage failed.
# Carried wheels in .whl/ (highspy: the engine's planner imports it) are installed to /tmp/site first.
# PYTHON picks the interpreter (default python3, the torch one on the GPU machine).
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-runs/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PARTS="$(mktemp -d)"
trap 'rm -rf "$PARTS"' EXIT
export PYTHONPATH=".:kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DRYFLAG=()
[ $DRY = 1 ] && DRYFLAG=(--dry-run)
N=0
FAILED=0

refresh() {  # gpu_check.json from the parts so far
    "$PY" bench/gpu_summary.py "$PARTS" "$OUT/gpu_check.json" "${DRYFLAG[@]}" "$@"
}

stage() {  # stage NAME LIMIT_S CMD...: run CMD under a time limit, record rc and seconds, go on
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s) ==="
    timeout -k 10 "$limit" "$@"
    rc=$?
    N=$((N + 1))
    [ $rc = 0 ] || FAILED=$((FAILED + 1))
    printf '{"stage": "%s", "rc": %d, "seconds": %d, "limit_s": %d}\n' "$name" "$rc" $((SECONDS - t0)) "$limit" \
        > "$PARTS/stage-$(printf %02d $N)-$name.json"
    echo "=== $name: rc=$rc in $((SECONDS - t0))s ==="
    refresh || echo "gpu_summary failed (rc=$?)"
}

install_wheels() {
    if [ $DRY = 1 ] || ! compgen -G ".whl/*.whl" > /dev/null; then
        echo "no wheels to install (dry run, or no .whl/ carried)"
        return 0
    fi
    timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

main() {
    echo "gpu_check $(date -u +%FT%TZ) dry_run=$DRY out=$OUT python=$PY"
    if [ $DRY = 0 ]; then
        nvidia-smi -L || echo "nvidia-smi failed"
        install_wheels || echo "wheel install failed (rc=$?): the stages that import highspy will fail"
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    stage env 30 "$PY" bench/gpu_env.py --out "$PARTS/env.json"
    # The CUDA-only tests and their CPU neighbours (a dry run takes only the tests named cuda: the
    # timing tests among the others are for an idle machine); the dry-run test would recurse.
    local select="not dry_run"
    [ $DRY = 1 ] && select="cuda and not dry_run"
    stage tests 100 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_transfer.py tests/test_gpu_check.py \
        tests/test_attention.py \
        -k "$select" --junitxml="$PARTS/tests.xml"
    # KV content through every tier move on the CUDA transfer engine, every policy (probe model).
    stage kv-integrity 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_kv_integrity.py -k cuda \
        --junitxml="$PARTS/kv-integrity.xml"
    stage transfer 45 "$PY" bench/gpu_transfer.py "${DRYFLAG[@]}" --out "$PARTS/transfer.json"
    # Host work of a decode step at 16 x 32K x 32 layers (null model: CPU only, no GPU needed).
    local ho=()
    [ $DRY = 1 ] && ho=(--requests 4 --context 2048 --steps 4)
    stage host-overhead 90 bash -c "\"$PY\" bench/host_overhead.py --json ${ho[*]} > \"$PARTS/host_overhead.json\""
    for policy in no-offload static-uniform; do
        stage "decode-$policy" 75 "$PY" bench/gpu_decode.py "${DRYFLAG[@]}" --policy $policy \
            --out "$PARTS/decode-$policy.json"
    done
    # The same no-offload decode with the old per-seq attention (gather + SDPA): the baseline
    # the summary divides by.
    stage decode-no-offload-per-seq 75 "$PY" bench/gpu_decode.py "${DRYFLAG[@]}" --policy no-offload \
        --attention per-seq --out "$PARTS/decode-no-offload-per-seq.json"
    # The placement ILP (cvxpy + HiGHS) and the fast path on this machine's quiet cores.
    [ $DRY = 0 ] && stage planner 100 "$PY" bench/planner.py --batches 32,128 --layers 32,80 \
        --solvers fast,central --instances 20 --mip-instances 4 --json "$PARTS/planner.json"
    [ $DRY = 0 ] && stage planner-gap 120 "$PY" bench/planner.py --batches 4 --layers 32 --solvers fast \
        --instances 2 --gap-instances 1000 --procs 14 --json "$PARTS/planner_gap.json"
    [ $DRY = 0 ] && { nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true; }
    echo
    refresh --print
    [ $FAILED = 0 ] || { echo "$FAILED stage(s) failed"; return 1; }
}

main 2>&1 | tee "$OUT/gpu_check.log"
