"""NeFL (Kang, Cha, Shin, Lee, Kang; arXiv 2308.07761, IEEE TMC 2025): nested width x depth submodels whose
normalisation layers are kept per submodel.

A composition of the depth mechanism (:class:`~hetfl.algorithms.depthfl.MultiExitFL`: width x depth levels,
nested prefixes, per-element averaging unweighted by sample count) with two choices:

* **inconsistent parameters** (``per_level = "norm"``): every normalisation layer's tensors (BatchNorm's
  affine weights and running statistics) are one copy per level, which a client reads and writes at its own
  level and the server averages over that level's clients only; every other tensor is *consistent*: nested
  and averaged over all clients that hold it (NeFL's NeFedAvg);
* **per-submodel exits**: every level has its own output, the exit at its depth, and a client trains the CE of
  every exit up to its depth (summed, no distillation).  An exit is therefore a consistent parameter, trained
  by every client that holds it, as NeFL's one classifier is trained by every client whatever its submodel
  (on digits, training only a level's own exit left the weakest level at 0.51 against 0.79).

Each level is evaluated with its own copies through its own exit; the global model is the strongest level's.
NeFL's learnable step sizes are not implemented (hetfl's blocks carry no step scalar; the paper finds they add
<= 0.3 points); a model with such scalars names them in ``per_level`` (``"norm,*.step"``).
"""

from __future__ import annotations

from dataclasses import dataclass

from hetfl.algorithms.depthfl import MultiExitFL
from hetfl.algorithms.registry import ALGORITHMS


@ALGORITHMS.register("nefl")
@dataclass(frozen=True)
class NeFL(MultiExitFL):
    """NeFL: nested width x depth levels, per-level normalisation layers, an exit per level trained by all."""

    levels: str = "1x1,0.9x0.9,0.8x0.75,0.7x0.5"
    per_level: str = "norm"
