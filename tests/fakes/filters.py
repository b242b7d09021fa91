"""A filter that fails on every text, for the fail-closed paths (``FAULT``)."""

from __future__ import annotations

import asyncio

import msgspec

from guardrail.guard.filter import BuildContext, FilterSpec
from guardrail.guard.types import FilterContext, Stage, Verdict


class FaultConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    behaviour: str = "raise"  # raise | hang


class FaultFilter:
    """A filter whose model crashes (or hangs) on every text: a pii filter that lost its
    model, a classifier stuck on a lock."""

    def __init__(self, name: str, config: FaultConfig, env: BuildContext) -> None:
        self.name, self.stages, self.config = name, frozenset(Stage), config

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        if self.config.behaviour == "hang":
            await asyncio.sleep(3600)
        raise RuntimeError("the filter's model crashed")


FAULT = FilterSpec(type="fault", config_type=FaultConfig, build=FaultFilter)
