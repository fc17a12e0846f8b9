"""Where a private round's randomness comes from: the Poisson draw, the noise on the sum, the count noise.

By default every draw is seeded with fresh bits of the operating system's entropy pool (:mod:`secrets`),
once per round and draw, and the bits live only in the call that uses them: nothing written to disk (config,
checkpoint, summary) and nothing derived from the run seed can replay them.  Under
``privacy.reproducible_noise`` (tests and studies only) each draw is a pure function of (run seed, round,
stream) instead.  docs/privacy.md ("Noise and sampling source", "Resume") says why both the noise and the
Poisson draw must be private, and why a released round is never re-run.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

#: Third word of the seeds of a round's Poisson draw ("pois") and of its noise ("nois"), under reproducible_noise.
POISSON_STREAM = 0x706F6973
NOISE_STREAM = 0x6E6F6973


def noise_generator(seed: int | None, rnd: int) -> torch.Generator:
    """The generator of round ``rnd``'s noise, on the CPU.

    ``seed=None`` (the default for private runs): seeded with 64 fresh bits from the operating system's
    entropy pool (:mod:`secrets`) for this round alone; the seed lives only in this call and is never
    stored, so no config, checkpoint or summary can replay the noise.  A run seed (only under
    ``privacy.reproducible_noise``, for tests and studies): a pure function of (seed, round).
    """
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(64))
    state = np.random.SeedSequence([seed, rnd, NOISE_STREAM]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def round_generator(seed: int | None, rnd: int, stream: int) -> np.random.Generator:
    """A numpy generator for one of a round's private draws (the Poisson cohort, the count noise): 128 fresh
    bits of OS entropy (``seed=None``), or a pure function of (seed, round, stream) under reproducible_noise."""
    if seed is None:
        return np.random.default_rng(secrets.randbits(128))
    return np.random.default_rng([seed, rnd, *np.atleast_1d(stream).tolist()])


__all__ = ["NOISE_STREAM", "POISSON_STREAM", "noise_generator", "round_generator"]
