"""The pipeline: run a policy's filters on one text, concurrently, and combine their verdicts.

Like structlog's processor chain, the whole pipeline is one loop over small parts:
pick the filters for the stage, run each under its time limit, turn a failure into
the policy's ``on_error`` verdict (fail closed by default), and combine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace

from guardrail.guard.filter import BuildContext, Filter, FilterSpec, HoldsBack
from guardrail.guard.types import (
    Action,
    Decision,
    FilterContext,
    FilterOutcome,
    FilterStatus,
    Finding,
    Redaction,
    Stage,
    Verdict,
    apply_redactions,
)
from guardrail.plugins import PluginRegistry
from guardrail.policy.model import FilterConfig, Policy

# Category of the finding a failed filter leaves behind; dashboards count it like any other.
FILTER_ERROR_CATEGORY = "filter_error"


class Guard:
    """Runs one policy. Immutable: a reload builds a new Guard and swaps it in whole."""

    def __init__(self, policy: Policy, filters: Sequence[tuple[FilterConfig, Filter]]) -> None:
        self.policy = policy
        self._by_stage: dict[Stage, tuple[tuple[FilterConfig, Filter], ...]] = {
            stage: tuple((c, f) for c, f in filters if stage in c.stages) for stage in Stage
        }

    @classmethod
    def build(
        cls, policy: Policy, registry: PluginRegistry[FilterSpec], env: BuildContext
    ) -> Guard:
        """Instantiate every filter of ``policy`` (may load models: call off the event loop)."""
        built = [(c, registry.get(c.type).build(c.id, c.config, env)) for c in policy.filters]
        return cls(policy, built)

    def filters_at(self, stage: Stage) -> list[str]:
        return [c.id for c, _ in self._by_stage[stage]]

    def holdback(self, stage: Stage, text: str) -> int:
        """Trailing characters of ``text`` that some filter needs held back (streams)."""
        return max(
            (f.holdback(text) for _, f in self._by_stage[stage] if isinstance(f, HoldsBack)),
            default=0,
        )

    async def check(self, stage: Stage, text: str, ctx: FilterContext) -> Decision:
        """Decide on ``text`` at ``stage``. Never raises for a filter's failure."""
        filters = self._by_stage[stage]
        ctx = ctx if ctx.stage is stage else ctx.at(stage, ctx.message_index)
        if len(filters) == 1:
            outcomes: Sequence[FilterOutcome] = [await _run(*filters[0], text, ctx)]
        else:
            outcomes = await asyncio.gather(*(_run(c, f, text, ctx) for c, f in filters))
        return self._combine(stage, text, outcomes)

    def _combine(self, stage: Stage, text: str, outcomes: Sequence[FilterOutcome]) -> Decision:
        findings = tuple(f for o in outcomes for f in o.verdict.findings)
        action = Action.strictest(o.verdict.action for o in outcomes)
        redactions: tuple[Redaction, ...] = ()
        if action is Action.REDACT:
            redactions = tuple(r for o in outcomes for r in o.verdict.redactions)
        return Decision(
            stage=stage,
            action=action,
            text=apply_redactions(text, redactions) if redactions else text,
            findings=findings,
            outcomes=tuple(outcomes),
            policy_name=self.policy.name,
            policy_version=self.policy.version,
            redactions=redactions,
        )


async def _run(config: FilterConfig, filt: Filter, text: str, ctx: FilterContext) -> FilterOutcome:
    started = time.perf_counter()
    status: FilterStatus = "ok"
    error: str | None = None
    try:
        verdict = _stamp(
            await asyncio.wait_for(filt.check(text, ctx), config.timeout_s), config.id, len(text)
        )
    except TimeoutError:
        status, verdict = "timeout", _failed(config)
    except Exception as e:  # a broken filter must not take the request down with it
        status, error, verdict = "error", type(e).__name__, _failed(config)
    return FilterOutcome(
        filter_id=config.id,
        filter_type=config.type,
        verdict=verdict,
        duration_s=time.perf_counter() - started,
        status=status,
        error=error,
    )


def _failed(config: FilterConfig) -> Verdict:
    """The policy's verdict for a filter that errored or timed out (block by default)."""
    finding = Finding(
        category=FILTER_ERROR_CATEGORY,
        score=1.0,
        action=config.on_error,
        filter_id=config.id,
    )
    return Verdict(config.on_error, (finding,))


def _stamp(verdict: object, filter_id: str, length: int) -> Verdict:
    """Key findings by the policy's filter id; reject malformed verdicts as filter errors."""
    if not isinstance(verdict, Verdict):
        raise TypeError(f"filter returned {type(verdict).__name__}, not a Verdict")
    findings = tuple(replace(f, filter_id=filter_id) for f in verdict.findings)
    redactions = tuple(r for r in verdict.redactions if 0 <= r.start < r.end <= length)
    if len(redactions) != len(verdict.redactions):
        raise ValueError("filter returned a redaction outside the text")
    return Verdict(verdict.action, findings, redactions)
