"""The human review queue, behind the admin key (README: "Feedback and human review").

- **The queue** is every exchange in the audit log whose outcome is ``flagged``,
  ``blocked_input`` or ``blocked_output``, plus any exchange a user rated ``-1`` (a
  possible false negative), that has no verdict yet. It is read from the audit
  database, so every replica sees the same queue.
- ``GET /admin/review?status=pending|reviewed|all&limit=&before=&tenant=`` lists items,
  newest first (``before``: the ``seq`` to continue below; ``next_before`` in the
  answer). An item has ids, time, tenant, route, policy version, the stage that set the
  action, the action, the categories and rule ids that acted, every finding with its
  score, the user's rating if any, and ``text`` only when the audit log stores
  (redacted) text.
- ``POST /admin/review/{id}`` records a verdict: ``correct`` (the action was right),
  ``false_positive`` (too strict) or ``false_negative`` (too lenient), the
  ``expected_action`` (default: the action itself, ``allow``, or ``block``), the
  ``reviewer``'s name and an optional ``note``. Any exchange in the audit log may be
  judged, queued or not (a spot check of allowed traffic finds false negatives). A new
  verdict on the same exchange replaces the old one.
- ``GET /admin/review/export?format=jsonl|csv&since=`` streams every verdict with the
  decision and finding scores it judged, for threshold tuning (CSV: one row per finding).
- ``GET /admin/review/ui`` is a self-contained page (inline CSS and JS, no external
  asset, a strict Content-Security-Policy). It holds no data and so needs no key to
  load; the admin key is typed into the page, kept in its memory only, and sent as
  ``Authorization: Bearer`` with each API call.

The reviewer's name is what the reviewer types: there is one admin key, not one
account per reviewer.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
from collections.abc import AsyncIterator
from functools import cache
from importlib import resources
from typing import Annotated, Any, Final, Literal

import msgspec
import structlog
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.enums import MediaType
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import Stream

from guardrail.api.errors import APIError
from guardrail.api.oversight import now, oversight_of
from guardrail.api.routes import strictly
from guardrail.guard.types import Action
from guardrail.observability.oversight import (
    AuditedExchange,
    ExportedVerdict,
    ReviewEntry,
    ReviewStatus,
    ReviewVerdict,
    iso_time,
)

__all__ = ["ROUTES", "VerdictRequest", "expected_action", "page"]

log = structlog.get_logger("guardrail.review")

EXPORT_PAGE: Final = 500
"""Verdicts read from the database per query while exporting."""

CSV_COLUMNS: Final = (
    "id", "request_id", "exchange_time", "tenant", "route", "policy_name", "policy_version",
    "outcome", "action", "verdict", "expected_action", "reviewer", "reviewed_at", "note",
    "stage", "filter", "category", "score", "finding_action", "rule_id", "count",
)  # fmt: skip

VerdictName = Literal["correct", "false_positive", "false_negative"]
ActionName = Literal["allow", "flag", "redact", "block"]


class VerdictRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A reviewer's verdict on one exchange."""

    verdict: Annotated[
        VerdictName,
        msgspec.Meta(
            description=(
                "correct: the gateway's action was right; false_positive: it was too "
                "strict; false_negative: it was too lenient."
            )
        ),
    ]
    reviewer: Annotated[
        str, msgspec.Meta(min_length=1, max_length=100, description="Who judged it.")
    ]
    expected_action: Annotated[
        ActionName | None,
        msgspec.Meta(
            description=(
                "The action that was right (default: the gateway's for correct, allow for "
                "false_positive, block for false_negative)."
            )
        ),
    ] = None
    note: Annotated[str | None, msgspec.Meta(description="Free text, at most 2000.")] = None


NOTE_MAX_CHARS: Final = 2000


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_verdict")


def expected_action(verdict: str, action: str, expected: str | None) -> str:
    """The action the reviewer says was right, checked against the gateway's ``action``.

    Raises :class:`APIError` (400 ``invalid_verdict``) for a verdict that contradicts
    the action: a false positive must be less strict than what the gateway did, a false
    negative stricter, a correct verdict the same.
    """
    did = Action(action)
    if verdict == "correct":
        if expected is not None and expected != did.value:
            raise _bad(
                f"A 'correct' verdict keeps the gateway's action ({did.value}); "
                f"expected_action '{expected}' contradicts it.",
                "expected_action",
            )
        return did.value
    if verdict == "false_positive":
        if did is Action.ALLOW:
            raise _bad("An allowed exchange cannot be a false positive.", "verdict")
        want = Action(expected or "allow")
        if want.rank >= did.rank:
            raise _bad(
                f"A false positive needs an expected_action less strict than '{did.value}'.",
                "expected_action",
            )
        return want.value
    if did is Action.BLOCK:
        raise _bad("A blocked exchange cannot be a false negative.", "verdict")
    want = Action(expected or "block")
    if want.rank <= did.rank:
        raise _bad(
            f"A false negative needs an expected_action stricter than '{did.value}'.",
            "expected_action",
        )
    return want.value


# --- wire shapes --------------------------------------------------------------------


def _review_json(review: ReviewVerdict | None) -> dict[str, Any] | None:
    if review is None:
        return None
    return {
        "verdict": review.verdict,
        "expected_action": review.expected_action,
        "reviewer": review.reviewer,
        "note": review.note,
        "time": iso_time(review.epoch),
    }


def item_json(ex: AuditedExchange) -> dict[str, Any]:
    """One review item as the API answers it."""
    acted = [f for f in ex.findings if f.get("action") != Action.ALLOW.value]
    return {
        "id": ex.record_id,
        "seq": ex.seq,
        "request_id": ex.request_id,
        "response_id": ex.response_id,
        "time": iso_time(ex.epoch),
        "tenant": ex.tenant,
        "route": ex.route,
        "model": ex.model,
        "policy": {"name": ex.policy_name, "version": ex.policy_version},
        "outcome": ex.outcome,
        "action": ex.action,
        "stage": ex.stage,
        "input_action": ex.input_action,
        "output_action": ex.output_action,
        "queued_because": ex.queued_because,
        "categories": sorted({str(f.get("category")) for f in acted}),
        "rule_ids": sorted({str(f["rule_id"]) for f in acted if f.get("rule_id")}),
        "findings": list(ex.findings),
        "text": ex.text,
        "feedback_rating": ex.feedback_rating,
        "review": _review_json(ex.review),
    }


def _export_json(v: ExportedVerdict) -> dict[str, Any]:
    return {
        "id": v.record_id,
        "request_id": v.request_id,
        "exchange_time": iso_time(v.exchange_epoch),
        "tenant": v.tenant,
        "route": v.route,
        "policy_name": v.policy_name,
        "policy_version": v.policy_version,
        "outcome": v.outcome,
        "action": v.action,
        "input_action": v.input_action,
        "output_action": v.output_action,
        "verdict": v.review.verdict,
        "expected_action": v.review.expected_action,
        "reviewer": v.review.reviewer,
        "reviewed_at": iso_time(v.review.epoch),
        "note": v.review.note,
        "findings": list(v.findings),
    }


def _cell(value: Any) -> Any:
    """A text cell a spreadsheet will not run: one that starts like a formula gets a
    leading apostrophe. Clients (request ids), reviewers (names, notes) and policy
    authors (categories, tenants) all write text that lands in cells; numbers pass."""
    if not isinstance(value, str):
        return "" if value is None else value
    # A spreadsheet that splits on ";" (or tabs) starts a cell after each one, quoted or
    # not: a formula character there gets its apostrophe too.
    value = _FORMULA_AFTER_SEPARATOR.sub(r"\1'\2", value)
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


_FORMULA_AFTER_SEPARATOR = re.compile(r"([;,\t\r\n])([=+\-@])")


def _csv_rows(v: ExportedVerdict) -> list[list[Any]]:
    head = [
        v.record_id, v.request_id, iso_time(v.exchange_epoch), v.tenant, v.route,
        v.policy_name, v.policy_version, v.outcome, v.action, v.review.verdict,
        v.review.expected_action, v.review.reviewer, iso_time(v.review.epoch),
        v.review.note,
    ]  # fmt: skip
    if not v.findings:
        return [[*head, "", "", "", "", "", "", ""]]
    return [
        [
            *head,
            f.get("stage", ""),
            f.get("filter", ""),
            f.get("category", ""),
            f.get("score", ""),
            f.get("action", ""),
            f.get("rule_id") or "",
            f.get("count", 1),
        ]
        for f in v.findings
    ]


def _csv_line(rows: list[list[Any]]) -> bytes:
    buffer = io.StringIO()
    # Every cell neutralised and quoted: a ";" inside a note cannot start a new cell in
    # a spreadsheet that splits on semicolons.
    csv.writer(buffer, lineterminator="\r\n", quoting=csv.QUOTE_ALL).writerows(
        [[_cell(value) for value in row] for row in rows]
    )
    return buffer.getvalue().encode("utf-8")


# --- routes -------------------------------------------------------------------------


@get("/admin/review", summary="The human review queue")
async def review_list(
    state: State,
    status: FromQuery[ReviewStatus] = "pending",
    limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
    before: Annotated[int | None, QueryParameter(ge=1, le=2**63 - 1)] = None,
    tenant: Annotated[str | None, QueryParameter(min_length=1, max_length=200)] = None,
) -> dict[str, Any]:
    oversight = oversight_of(state)
    await oversight.flush_audit()  # what this replica just served is listed too
    items, more = await oversight.guarded(
        oversight.store.review_items(status, limit=limit, before=before, tenant=tenant)
    )
    return {
        "object": "list",
        "status": status,
        "data": [item_json(i) for i in items],
        "has_more": more,
        "next_before": items[-1].seq if more and items else None,
        "pending": await oversight.refresh(),
    }


@get("/admin/review/export", summary="Reviewer verdicts with their scores (JSONL or CSV)")
async def review_export(
    state: State,
    export_format: Annotated[str, QueryParameter(name="format")] = "jsonl",
    since: Annotated[float | None, QueryParameter(ge=0, le=1e12)] = None,
) -> Stream:
    # Checked here, not by the framework, whose error names the Python parameter.
    if export_format not in ("jsonl", "csv"):
        raise APIError(400, "format must be jsonl or csv.", param="format", code="invalid_format")
    oversight = oversight_of(state)
    # The first page is read before answering, so a database failure is a plain 503.
    first = await oversight.guarded(oversight.store.verdicts(since=since, limit=EXPORT_PAGE))

    async def body() -> AsyncIterator[bytes]:
        if export_format == "csv":
            yield _csv_line([list(CSV_COLUMNS)])
        page = first
        while page:
            for v in page:
                if export_format == "csv":
                    yield _csv_line(_csv_rows(v))
                else:
                    yield json.dumps(_export_json(v), separators=(",", ":")).encode() + b"\n"
            if len(page) < EXPORT_PAGE:
                return
            page = await oversight.store.verdicts(
                after=page[-1].seq, since=since, limit=EXPORT_PAGE
            )

    media = "text/csv; charset=utf-8" if export_format == "csv" else "application/x-ndjson"
    return Stream(
        body(),
        media_type=media,
        headers={
            "content-disposition": f'attachment; filename="review-verdicts.{export_format}"',
            "cache-control": "no-store",
        },
    )


@get("/admin/review/ui", summary="The review page", include_in_schema=False)
async def review_ui() -> Response[str]:
    html, policy = page()
    return Response(
        html,
        media_type=MediaType.HTML,
        headers={
            "content-security-policy": policy,
            "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer",
            "x-frame-options": "DENY",
            "cache-control": "no-store",
        },
    )


@get("/admin/review/{item_id:str}", summary="One exchange with its rating and verdict")
async def review_item(state: State, item_id: FromPath[str]) -> dict[str, Any]:
    oversight = oversight_of(state)
    found = await oversight.guarded(oversight.store.exchange(item_id))
    if found is None:
        raise _not_found()
    return item_json(found)


@post("/admin/review/{item_id:str}", status_code=200, summary="Record a reviewer's verdict")
async def review_verdict(
    state: State,
    item_id: FromPath[str],
    data: JSONBody[VerdictRequest],
    request: Request[Any, Any, Any],
) -> dict[str, Any]:
    await strictly(request, VerdictRequest)  # a key given twice is refused, as elsewhere
    oversight = oversight_of(state)
    reviewer = data.reviewer.strip()
    if not reviewer:
        raise _bad("The reviewer's name is empty.", "reviewer")
    if data.note is not None and len(data.note) > NOTE_MAX_CHARS:
        raise _bad(f"The note is longer than {NOTE_MAX_CHARS} characters.", "note")
    found = await oversight.guarded(oversight.store.exchange(item_id))
    if found is None:
        raise _not_found()
    expected = expected_action(data.verdict, found.action, data.expected_action)
    verdict = ReviewVerdict(data.verdict, expected, reviewer, data.note or None, now())
    replaced = await oversight.save_review(ReviewEntry(item_id, verdict), found.action)
    if replaced is None:  # deleted between the read and the write (retention)
        raise _not_found()
    log.info(
        "review_verdict",
        record_id=item_id,
        verdict=data.verdict,
        action=found.action,
        expected_action=expected,
        replaced=replaced,
    )
    return {
        "object": "review.verdict",
        "id": item_id,
        "action": found.action,
        **(_review_json(verdict) or {}),
        "replaced": replaced,
        "pending": oversight.depth,
    }


def _not_found() -> APIError:
    return APIError(
        404,
        "No exchange with this id in the audit log (ids are the `id` of review items).",
        param="id",
        code="review_item_not_found",
    )


# --- the page -------------------------------------------------------------------------


def _digest(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


@cache
def page() -> tuple[str, str]:
    """The review page and its Content-Security-Policy (hashes of its inline code)."""
    html = resources.files("guardrail.api").joinpath("review_page.html").read_text("utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    styles = re.findall(r"<style>(.*?)</style>", html, flags=re.DOTALL)
    policy = "; ".join(
        [
            "default-src 'none'",
            "script-src " + " ".join(_digest(s) for s in scripts),
            "style-src " + " ".join(_digest(s) for s in styles),
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return html, policy


ROUTES = [review_list, review_export, review_ui, review_item, review_verdict]
