"""Client-level differential privacy for the algorithms whose aggregate is a mean of client weights.

Only :class:`PrivacyConfig` (the ``[privacy]`` section) is imported here, so that :mod:`hetfl.config`
can import it without pulling in torch or the accountant.  The parts:

* :mod:`hetfl.privacy.config`: the ``[privacy]`` section and its own range checks;
* :mod:`hetfl.privacy.accountant`: epsilon of a run from Google's ``dp-accounting`` (the optional extra
  ``hetfl[privacy]``), and the noise multiplier that reaches a target epsilon;
* :mod:`hetfl.privacy.plan`: which algorithms can honour it, the checks that need the federation
  (delta against the number of clients, an unreachable target), resolved once before round 1;
* :mod:`hetfl.privacy.mechanism`: the round step: Poisson client sampling, per-client clipping of the
  update over the client's own slice, Gaussian noise on the sum, fixed per-element denominators;
* :mod:`hetfl.privacy.noise`: where the round's private draws come from (OS entropy; the seed only under
  ``reproducible_noise``);
* :mod:`hetfl.privacy.audit`: canary clients through the round step, an epsilon lower bound and estimate.

See docs/privacy.md for what is protected, what is not, and the derivations.
"""

from __future__ import annotations

from hetfl.privacy.config import PrivacyConfig

__all__ = ["PrivacyConfig"]
