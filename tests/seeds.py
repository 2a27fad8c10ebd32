"""Fresh seeds for the randomized tests.

Every run draws new random inputs from ``fresh_seed()``, and every assertion message names the seed.
To replay a failure, set ``MTP_TEST_SEED`` to that seed: every ``fresh_seed()`` call then returns it.
"""

from __future__ import annotations

import os
import random


def fresh_seed() -> int:
    """A new seed in [0, 2**31), or ``MTP_TEST_SEED`` when it is set."""
    fixed = os.environ.get("MTP_TEST_SEED")
    if fixed is not None:
        return int(fixed)
    return random.SystemRandom().randrange(2**31)
