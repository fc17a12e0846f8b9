#!/usr/bin/env bash
# Every engine and algorithm family on a GPU, fp32 and bf16, the batched path, the figures of issue 42
# and the demos end to end -- one script, so the first GPU lent gives figures at once (well under 10 min
# on one H100-class card).  CI dry-runs it on the CPU with tiny settings (digits, 2 rounds):
#
#   bash benchmarks/gpu_check.sh                         # on cuda
#   bash benchmarks/gpu_check.sh --device cpu            # the dry run (tests/test_gpu_check.py)
#   bash benchmarks/gpu_check.sh --demo-rounds 150       # the demos at their configs' full 150 rounds
#   bash benchmarks/gpu_check.sh --json out.json         # also write every check's numbers
#
# The demos need their data sets where hetfl finds them (MNIST in hetfl's cache, Fashion-MNIST from
# Debian's package or data.data_dir; docs/datasets.md): a machine without them reports those runs failed
# and goes on.  Exit status: 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
DEMO_ROUNDS=30
JSON=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --demo-rounds) DEMO_ROUNDS="$2"; shift 2 ;;
    --json) JSON="$2"; shift 2 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--device cuda|cpu] [--demo-rounds N] [--json FILE]" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
START=$(date +%s)
failed=0
"$PY" benchmarks/gpu_check.py --device "$DEVICE" ${JSON:+--json "$JSON"} || failed=1

OUT=$(mktemp -d -t hetfl-gpu-demo-XXXXXX)
trap 'rm -rf "$OUT"' EXIT
demo() {  # demo CONFIG PRECISION ROUNDS: one end-to-end run, its wall time and accuracy
  local cfg="$1" prec="$2" rounds="$3" name
  name="$(basename "$cfg" .toml)-$prec"
  if "$PY" -m hetfl.cli run "$cfg" --device "$DEVICE" --set rounds="$rounds" --set train.precision="$prec" \
      --out "$OUT/$name" --quiet > "$OUT/$name.log" 2>&1; then
    "$PY" - "$OUT/$name/summary.json" "$name" "$rounds" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"[ok  ] demo {sys.argv[2]} ({sys.argv[3]} rounds): {s['wall_time_s']:.1f} s end to end, "
      f"{s['wall_time_s'] / s['rounds_completed']:.2f} s/round, accuracy {s['test_accuracy']:.4f}, "
      f"trained {s['precision']} / {s['memory_format']}")
PYEOF
  else
    echo "[FAIL] demo $name: $(tail -n 3 "$OUT/$name.log" | tr '\n' ' ')"
    failed=1
  fi
}
if [ "$DEVICE" = "cpu" ]; then
  demo configs/digits_fedavg.toml bf16 2
else
  for cfg in configs/mnist_fedavg.toml configs/fmnist_fedavg.toml; do
    for prec in fp32 bf16; do demo "$cfg" "$prec" "$DEMO_ROUNDS"; done
  done
fi
echo "gpu_check.sh: $(( $(date +%s) - START )) s on $DEVICE, $([ $failed = 0 ] && echo 'all passed' || echo 'FAILURES above')"
exit $failed
