"""The shared shape of this project's Presidio recognizers: a function from text to spans.

:mod:`guardrail.filters.address`, :mod:`~guardrail.filters.digits` and
:mod:`~guardrail.filters.names` each find spans with plain Python (regular expressions,
checksums) and wrap that function with :func:`span_recognizer`. Presidio is imported
only when a recognizer is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Span:
    """One match: ``text[start:end]`` and its score."""

    start: int
    end: int
    score: float


def span_recognizer(
    entity: str,
    name: str,
    find: Callable[..., list[Span]],
    language: str = "en",
    *,
    context: list[str] | None = None,
    with_artifacts: bool = False,
) -> Any:
    """A Presidio ``EntityRecognizer`` reporting ``find(text)`` as ``entity``.

    With ``with_artifacts``, ``find(text, nlp_artifacts)``: the NLP engine's entities and
    tokens for the text (or None).
    """
    from presidio_analyzer import EntityRecognizer, RecognizerResult
    from presidio_analyzer.analysis_explanation import AnalysisExplanation

    class SpanRecognizer(EntityRecognizer):
        def load(self) -> None:
            """Nothing to load: plain Python."""

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[Any]:
            if entity not in entities:
                return []
            return [
                RecognizerResult(
                    entity,
                    s.start,
                    s.end,
                    s.score,
                    AnalysisExplanation(name, s.score),
                    recognition_metadata={
                        RecognizerResult.RECOGNIZER_NAME_KEY: name,
                        RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
                    },
                )
                for s in (find(text, nlp_artifacts) if with_artifacts else find(text))
            ]

    return SpanRecognizer(
        supported_entities=[entity], name=name, supported_language=language, context=context
    )
