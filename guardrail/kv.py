"""A transformers model's key-value cache, under whichever name the installed version uses.

transformers 5.24 renamed a causal model's ``past_key_values`` argument and output field to
``cache``; the old argument warns until 5.40, which drops it. The project supports
``transformers>=5.23``, so the engine and the probe pass and read the cache through these
two functions: each version gets the name it reads, and neither warns.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def _takes_cache(forward: Any) -> bool:
    # The signature follows the deprecation decorator's wrapper to the real forward.
    return "cache" in inspect.signature(forward).parameters


def cache_argument(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands ``cache`` to ``model``'s forward pass."""
    return {"cache" if _takes_cache(type(model).forward) else "past_key_values": cache}


def returned_cache(output: Any) -> Any:
    """The cache a forward pass returned (``output.cache``, or ``output.past_key_values``
    before 5.24)."""
    if "cache" in getattr(type(output), "__dataclass_fields__", ()):
        return output.cache
    return output.past_key_values
