"""What the inference layer needs from a model runtime: one call on a batch of named arrays."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runner(Protocol):
    """A loaded model. ``OnnxRunner`` is one; a TensorRT runner or a test's fake would be others.

    ``run`` must be safe to call from any thread; the dynamic batcher calls it from its own.
    """

    provider: str
    """The execution provider actually in use (reported in each result's ModelIdentity)."""

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Run one batch.

        Args:
            feeds: input name -> array with a leading batch axis.
            output_names: the outputs wanted.

        Returns:
            output name -> array with the same leading batch axis.
        """
        ...
