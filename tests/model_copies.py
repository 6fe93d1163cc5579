"""Private copies of a loaded model, for tests that would otherwise build the same model again.

A test file builds its model once (a module-scoped fixture) and gives each service or reference
model a deep copy: the same weights as building it again with the same seed, without loading
the tokenizer and initialising the weights each time. A copy is needed because a service's
adapters change the model it serves.
"""

from __future__ import annotations

import copy
import dataclasses

from claas.models import LoadedModel


def private_copy(loaded: LoadedModel) -> LoadedModel:
    """`loaded` with weights of its own (the tokenizer, which nothing changes, is shared)."""
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
