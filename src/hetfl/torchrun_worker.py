"""Entry point of a worker process that :class:`hetfl.decentralized.torchrun.TorchrunEngine` starts
(``python -m hetfl.torchrun_worker``): it serves its rank's nodes until rank 0 says stop."""

from __future__ import annotations

import sys

from hetfl.decentralized.torchrun import serve
from hetfl.experiment import prepare

if __name__ == "__main__":
    serve(None, prepare)
    sys.exit(0)
