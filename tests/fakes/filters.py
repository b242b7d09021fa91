"""Filters for tests: one that fails on every text, for the fail-closed paths (``FAULT``);
one that reads a word list next to its policy file (``LISTED``); one that scores the
whole text, as the toxicity filter does (``TONE``); one whose checks take turns on one
CPU (``BUSY``)."""

from __future__ import annotations

import asyncio
from typing import Literal

import msgspec

from guardrail.guard.filter import BuildContext, FilterSpec
from guardrail.guard.types import Action, FilterContext, Finding, Stage, Verdict


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


class ListedConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    words: str  # a word list, relative to the policy file's folder


class Listed:
    """Blocks the words of a list file next to its policy; verdicts depend on the text."""

    cache_scope = "text"

    def __init__(self, name: str, config: ListedConfig, env: BuildContext) -> None:
        self.name = name
        self.stages = frozenset(Stage)
        self.words = frozenset((env.base_dir / config.words).read_text().split())

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        hits = [w for w in text.split() if w in self.words]
        return Verdict.from_findings([Finding("listed", 1.0, Action.BLOCK) for _ in hits])


LISTED = FilterSpec(type="listed", config_type=ListedConfig, build=Listed)


class ToneConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    word: str = "filthy"
    action: Literal["flag", "block"] = "block"
    fail_without: str | None = None  # raise on a text without this (a model that breaks)


class Tone:
    """Scores the whole text, as the toxicity filter does (findings with no span): 0.95
    with ``word`` in it, acted on, else 0.1, reported."""

    def __init__(self, name: str, config: ToneConfig, env: BuildContext) -> None:
        self.name, self.stages, self.config = name, frozenset(Stage), config

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        config = self.config
        if config.fail_without is not None and config.fail_without not in text:
            raise RuntimeError("the filter's model crashed")
        if config.word in text.lower():
            return Verdict.from_findings([Finding("toxicity", 0.95, Action(config.action))])
        return Verdict.from_findings([Finding("toxicity", 0.1, Action.ALLOW)])


TONE = FilterSpec(type="tone", config_type=ToneConfig, build=Tone)


class BusyConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    hold_ms: int = 50  # how long one check holds the CPU


class Busy:
    """Allows every text after holding the one CPU for ``hold_ms``: checks started
    together take turns, as a model's do on a busy host, so the last waits for all."""

    def __init__(self, name: str, config: BusyConfig, env: BuildContext) -> None:
        self.name, self.stages, self.config = name, frozenset(Stage), config
        self.cpu = asyncio.Lock()

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        async with self.cpu:
            await asyncio.sleep(self.config.hold_ms / 1000)
        return Verdict.from_findings([])


BUSY = FilterSpec(type="busy", config_type=BusyConfig, build=Busy)
