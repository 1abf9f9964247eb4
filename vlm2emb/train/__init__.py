"""Training: typed recipes and the accelerate loop (imported only when training).

``vlm2emb.train`` is both this package and the training function: ``vlm2emb.train(recipe,
**overrides)`` runs :func:`vlm2emb.train.api.train`. A package cannot also be a function, and
``import vlm2emb.train.config`` puts the package on ``vlm2emb`` as ``train``, so the package
module itself is made callable; nothing heavy is imported until it is called.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        from vlm2emb.train.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
