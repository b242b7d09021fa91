"""``POST /v1/feedback``: a user's rating of a response (user satisfaction and trust).

The scale is a thumbs up or down: ``rating`` is ``1`` (good) or ``-1`` (bad), what chat
interfaces ask for. An application with a finer scale maps it onto these two.

- The rated response is named by the ``id`` the gateway answered with (``chatcmpl-…``,
  ``cmpl-…``, ``modr-…``), or, for a request that was refused before any response body
  existed (a blocked prompt: HTTP 400), by its request id (``guardrail.request_id``,
  also the ``x-request-id`` header). Rating refusals is the point: negative feedback on
  blocked requests estimates over-blocking.
- A tenant rates only its own responses: an id of another tenant's response is 404,
  the same answer as an id that never existed. So is a request refused before the
  filters checked it (a bad body, a 429): there is no decision to rate.
- The rating is stored with the exchange's decision (action, per-stage actions,
  outcome, policy version) in ``audit_feedback``; a second rating of the same response
  replaces the first (a user changing their mind), and says so (``replaced``).
- ``comment`` is optional and at most ``feedback_comment_max_chars`` characters. It is
  never logged and never a label. It is stored only with ``feedback_comments:
  redacted``, and then only after the tenant policy's input filters (redactions
  applied; a comment they block, or one a filter failed on, is not stored).
- The body is read as strictly as on the other JSON routes: a key given twice or a
  value of the wrong JSON type (``"rating": "1"``) is a 400, not resolved.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
import structlog
from litestar import Request, post
from litestar.datastructures import State
from litestar.params import JSONBody

from guardrail.api.auth import Principal, principal_of
from guardrail.api.errors import APIError
from guardrail.api.oversight import now, oversight_of
from guardrail.api.ratelimit import estimate_tokens
from guardrail.api.routes import request_id_of, strictly
from guardrail.api.serving import Gateway
from guardrail.guard.types import FilterContext, Stage
from guardrail.observability.oversight import FeedbackEntry

__all__ = ["ROUTES", "FeedbackRequest"]

log = structlog.get_logger("guardrail.feedback")


class FeedbackRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A user's rating of one response."""

    response_id: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=256,
            description=(
                "The response's `id` (chatcmpl-..., cmpl-..., modr-...), or the request id "
                "(`guardrail.request_id`) of a refused request."
            ),
        ),
    ]
    rating: Annotated[
        Literal[1, -1], msgspec.Meta(description="1: good (thumbs up); -1: bad (thumbs down).")
    ]
    comment: str | None = None


async def _storable_comment(
    gateway: Gateway, principal: Principal, comment: str | None, request_id: str
) -> str | None:
    """What of the comment may be stored: nothing unless the settings keep redacted
    comments, and then the text after the tenant policy's input filters."""
    if not comment or gateway.settings.feedback_comments != "redacted":
        return None
    rules = gateway.rules(principal)
    # The comment runs the tenant's input filters (models among them): it is charged
    # like a prompt, one request and its tokens, or feedback were a way around the key's
    # rate limits to as much filter work as a client cares to send.
    await gateway.admit(principal, rules, estimate_tokens(len(comment), 0))
    guard = gateway.guard_for(rules)
    ctx = FilterContext(request_id, stage=Stage.INPUT, tenant=principal.tenant, route="feedback")
    decision = await guard.check(Stage.INPUT, comment, ctx)
    # A filter that failed under on_error flag or allow left the comment as the user
    # wrote it, personal data and all: as in the audit log, such a text is not stored.
    return None if decision.blocked or decision.failed else decision.text


@post("/v1/feedback", status_code=200, summary="Rate a response (user satisfaction)")
async def feedback(
    data: JSONBody[FeedbackRequest], request: Request[Any, Any, Any], state: State
) -> dict[str, Any]:
    await strictly(request, FeedbackRequest)
    oversight = oversight_of(state)
    gateway: Gateway = state.gateway
    limit = gateway.settings.feedback_comment_max_chars
    if data.comment is not None and len(data.comment) > limit:
        raise APIError(
            400,
            f"The comment is {len(data.comment)} characters long; the limit is {limit}.",
            param="comment",
            code="comment_too_long",
        )
    principal = principal_of(request.scope)
    exchange = await oversight.find_response(principal.tenant, data.response_id)
    if exchange is None:
        raise APIError(
            404,
            "No response with this id for this API key's tenant (the id is the response's "
            "`id`, or the request id of a refused request).",
            param="response_id",
            code="response_not_found",
        )
    request_id = request_id_of(request)
    comment = await _storable_comment(gateway, principal, data.comment, request_id)
    replaced = await oversight.save_feedback(
        FeedbackEntry(
            exchange,
            rating=data.rating,
            comment=comment,
            epoch=now(),
            response_id=data.response_id,
        )
    )
    log.info(
        "feedback",
        rated_request_id=exchange.request_id,
        rating=data.rating,
        action=exchange.action,
        comment_chars=len(data.comment or ""),
        comment_stored=comment is not None,
        replaced=replaced,
    )
    return {
        "object": "feedback",
        "response_id": exchange.response_id or data.response_id,
        "request_id": exchange.request_id,
        "rating": data.rating,
        "replaced": replaced,
        "comment_stored": comment is not None,
        "decision": {
            "action": exchange.action,
            "input_action": exchange.input_action,
            "output_action": exchange.output_action,
            "outcome": exchange.outcome,
            "policy": {"name": exchange.policy_name, "version": exchange.policy_version},
        },
    }


ROUTES = [feedback]
