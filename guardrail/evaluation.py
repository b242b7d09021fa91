"""``guardrail eval``: measure a policy on labeled data, as a policy author would.

Each JSONL line is ``{"text": str, "label": "allow" | "block", "category": str?,
"context": str | [str]?, "prompt": str?}``. A decision other than ``allow`` counts as
positive (the policy acted on the text); ``label: block`` marks a true positive case.
``acted_by_category`` says which finding categories acted, on block- and on
allow-labelled texts: where the false positives come from.
``context`` is the request's sources and ``prompt`` the question the text answers (for
groundedness at the output stage).

Scores are measured too, not only decisions: for every finding category that scored
every example (``groundedness``, a toxicity category, ...), ``auroc`` says how well the
score separates ``block`` from ``allow`` examples (1.0: perfectly, 0.5: not at all).
For ``groundedness``, where a higher score means better supported, the ranking is
reversed, so 1.0 still means "the unsupported answers score lower".

An example during which a filter failed or timed out is counted in ``errors`` (and
``errors_by_filter``) and left out of every other number: its action came from the
policy's ``on_error``, not from its judgement of the text, as ``policy test`` reads it.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from guardrail.chat import Message
from guardrail.errors import ConfigError
from guardrail.guard.guard import Guard
from guardrail.guard.types import Action, FilterContext, Stage


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    positive: bool
    category: str | None = None
    context: tuple[str, ...] = ()
    prompt: str | None = None


def read_dataset(path: Path) -> list[Example]:
    """Read labeled JSONL; a malformed line is an error naming file and line."""
    examples: list[Example] = []
    try:
        # JSON Lines ends a record at "\n" only: str.splitlines() would also split at
        # U+2028, U+0085 and others, which JSON allows unescaped inside a string.
        # utf-8-sig: a byte order mark (Windows editors, PowerShell) is not part of line 1.
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
        ) from e
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON: {e.msg}") from e
        except RecursionError:
            raise ConfigError(f"{where}: not valid JSON: nested too deeply") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ConfigError(f'{where}: each line needs a string "text"')
        label = row.get("label")
        if label not in ("allow", "block"):
            raise ConfigError(f'{where}: "label" must be "allow" or "block", got {label!r}')
        context = row.get("context")
        if context is None:
            context = ()
        elif isinstance(context, str):
            context = (context,) if context else ()
        if not isinstance(context, list | tuple) or not all(isinstance(c, str) for c in context):
            raise ConfigError(f'{where}: "context" must be a string or a list of strings')
        category = row.get("category")
        if category is not None and not isinstance(category, str):
            raise ConfigError(f'{where}: "category" must be a string, got {category!r}')
        prompt = row.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ConfigError(f'{where}: "prompt" must be a string')
        examples.append(
            Example(
                row["text"],
                label == "block",
                category or None,
                tuple(context),
                prompt,
            )
        )
    if not examples:
        raise ConfigError(f"{path}: no examples")
    return examples


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, math.ceil(q * len(ordered)) - 1)
    return ordered[k]


# Categories whose score is higher for the *better* text: reversed for AUROC.
HIGHER_IS_SAFER = frozenset({"groundedness"})


def auroc(positives: list[float], negatives: list[float]) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney U)."""
    if not positives or not negatives:
        return float("nan")
    if not all(math.isfinite(s) for s in (*positives, *negatives)):
        # A NaN ranks against nothing (and equals nothing: the tie loop never ended).
        return float("nan")
    ranked = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    rank_sum = 0.0
    i = 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mid = (i + j + 1) / 2  # 1-based average rank of the tie group
        rank_sum += mid * sum(label for _, label in ranked[i:j])
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _measured(a: float, b: float) -> float | None:
    """``a / b`` rounded, or None where ``b`` is 0: a metric the data cannot measure
    (precision with nothing acted on, recall with no ``block`` label) is unknown, and a
    0.0 there would read as a measured failure."""
    return round(a / b, 4) if b else None


@dataclass(frozen=True, slots=True)
class Scope:
    """The request every example is checked as, for rules scoped by tenant, route or
    model; the defaults are a policy test's."""

    tenant: str = "default"
    route: str = "chat"
    model: str | None = None


async def evaluate(
    guard: Guard,
    examples: list[Example],
    stage: Stage,
    progress: TextIO | None = None,
    scope: Scope = Scope(),
) -> dict[str, Any]:
    """Run every example through the guard, one at a time (latency is per text)."""
    tp = fp = tn = fn = 0
    errors_by_filter: dict[str, int] = {}
    latencies: list[float] = []
    by_category: dict[str, list[int]] = {}  # category -> [caught, total] over positives
    by_action: dict[str, int] = {a.value: 0 for a in Action}
    # category -> [on positive examples, on negative examples]: what acted, and where
    acted_by: dict[str, list[int]] = {}
    bar = _Progress(len(examples), progress)
    scores: dict[str, list[tuple[bool, float]]] = {}
    for i, ex in enumerate(examples):
        messages = (Message("user", ex.prompt),) if ex.prompt else ()
        ctx = FilterContext(
            f"eval-{i}",
            stage=stage,
            tenant=scope.tenant,
            route=scope.route,
            model=scope.model,
            messages=messages,
            context_documents=ex.context,
        )
        started = time.perf_counter()
        decision = await guard.check(stage, ex.text, ctx)
        latencies.append(time.perf_counter() - started)
        failed = {o.filter_id for o in decision.outcomes if o.status != "ok"}
        if failed:
            for filter_id in failed:
                errors_by_filter[filter_id] = errors_by_filter.get(filter_id, 0) + 1
            bar.step()
            continue
        predicted = decision.action is not Action.ALLOW
        by_action[decision.action.value] += 1
        best: dict[str, float] = {}
        for f in decision.findings:
            best[f.category] = max(best.get(f.category, -math.inf), f.score)
        for category, score in best.items():
            scores.setdefault(category, []).append((ex.positive, score))
        for category in {f.category for f in decision.findings if f.action is not Action.ALLOW}:
            acted_by.setdefault(category, [0, 0])[0 if ex.positive else 1] += 1
        if ex.positive:
            tp, fn = tp + predicted, fn + (not predicted)
            if ex.category:
                stats = by_category.setdefault(ex.category, [0, 0])
                stats[0] += predicted
                stats[1] += 1
        else:
            fp, tn = fp + predicted, tn + (not predicted)
        bar.step()
    bar.done()
    precision, recall = _measured(tp, tp + fp), _measured(tp, tp + fn)
    # F1 from the counts (not the rounded ratios); undefined where either part is.
    f1 = None if precision is None or recall is None else _measured(2 * tp, 2 * tp + fp + fn)
    scored = tp + fp + tn + fn
    return {
        "policy": {"name": guard.policy.name, "version": guard.policy.version},
        "stage": stage.value,
        "n": len(examples),
        "errors": len(examples) - scored,
        "errors_by_filter": dict(sorted(errors_by_filter.items())),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "fpr": _measured(fp, fp + tn),
        "accuracy": _measured(tp + tn, scored),
        "actions": by_action,
        "acted_by_category": {
            c: {"positive": n[0], "negative": n[1]} for c, n in sorted(acted_by.items())
        },
        "recall_by_category": {
            c: {"recall": round(_ratio(s[0], s[1]), 4), "n": s[1]}
            for c, s in sorted(by_category.items())
        },
        "auroc": {
            c: round(_auroc_of(c, pairs), 4)
            for c, pairs in sorted(scores.items())
            if len(pairs) == scored and 0 < tp + fn < scored
        },
        "latency_ms": {
            "p50": round(statistics.median(latencies) * 1000, 3),
            "p95": round(_percentile(latencies, 0.95) * 1000, 3),
        },
    }


def _auroc_of(category: str, pairs: list[tuple[bool, float]]) -> float:
    sign = -1.0 if category in HIGHER_IS_SAFER else 1.0
    return auroc([sign * s for p, s in pairs if p], [sign * s for p, s in pairs if not p])


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"policy {report['policy']['name']} {report['policy']['version']}, "
        f"stage {report['stage']}, n={report['n']}",
        f"  tp={report['tp']} fp={report['fp']} tn={report['tn']} fn={report['fn']}",
        *(
            [
                f"  errors={report['errors']}: left out of every number here (a filter failed "
                "or timed out on them: "
                + ", ".join(f"{k} {n}" for k, n in report["errors_by_filter"].items())
                + ")"
            ]
            if report["errors"]
            else []
        ),
        "  "
        + " ".join(f"{key}={_fixed(report[key])}" for key in ("precision", "recall", "f1", "fpr")),
        f"  latency per text: p50={report['latency_ms']['p50']:.3f} ms "
        f"p95={report['latency_ms']['p95']:.3f} ms",
    ]
    for category, value in report["auroc"].items():
        lines.append(f"  auroc of the {category} score: {value:.4f}")
    if report["acted_by_category"]:
        lines.append("  texts acted on (block, redact or flag), by finding category:")
        for category, n in report["acted_by_category"].items():
            lines.append(
                f"    {category:<32} {n['positive']} labelled block, {n['negative']} labelled allow"
            )
    if report["recall_by_category"]:
        lines.append("  recall by category:")
        for category, stats in report["recall_by_category"].items():
            lines.append(f"    {category:<32} {stats['recall']:.4f}  (n={stats['n']})")
    return "\n".join(lines)


def _fixed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class _Progress:
    """A one-line progress bar on a stream (stderr), redrawn at most every 0.1 s."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total, self.stream, self.count, self._last = total, stream, 0, 0.0

    def step(self) -> None:
        self.count += 1
        now = time.monotonic()
        if self.stream is not None and (now - self._last > 0.1 or self.count == self.total):
            self._last = now
            filled = int(30 * self.count / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.count}/{self.total}")
            self.stream.flush()

    def done(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()
