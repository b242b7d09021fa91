"""OpenAI's moderation categories, and the built-in table mapping policy categories onto them.

``/v1/moderations`` answers every result with all of OpenAI's keys (``hate``,
``violence``, ...) beside the policy's own categories, so clients written for OpenAI's
moderation API read something meaningful. A policy's ``openai_categories`` replaces or
adds rows of :data:`DEFAULT_OPENAI_MAPPING` (README, HTTP surface).

Example::

    >>> DEFAULT_OPENAI_MAPPING["weapons"]
    ('illicit', 'illicit/violent')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

OpenAICategory = Literal[
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
]
OPENAI_CATEGORIES: tuple[OpenAICategory, ...] = get_args(OpenAICategory)
"""The keys of OpenAI's moderation ``categories`` (openai SDK ``types/moderation.py``)."""

# The default policy's categories (Llama 2 AUP), the toxicity filter's, and common names.
# A subcategory's content is its parent's by OpenAI's definitions ("harassment content
# that also includes violence"), so a row naming a subcategory names the parent too.
# Categories with no OpenAI counterpart (privacy_violation, unlicensed_practice,
# disinformation_defamation, impersonation, undisclosed_ai, jailbreak, prompt_injection,
# obscene, PII, groundedness, filter_error) map to none and stay under their own key.
DEFAULT_OPENAI_MAPPING: Mapping[str, tuple[OpenAICategory, ...]] = {
    # Llama 2 AUP (policies/default.yaml)
    "violence_terrorism": ("violence",),
    "child_exploitation": ("sexual", "sexual/minors"),
    "sexual_minors": ("sexual", "sexual/minors"),
    "human_trafficking": ("illicit", "illicit/violent"),
    "illegal_activity": ("illicit",),
    "harassment": ("harassment",),
    "discrimination": ("hate",),
    "malware_intrusion": ("illicit",),
    "weapons": ("illicit", "illicit/violent"),
    "drugs": ("illicit",),
    "self_harm": ("self-harm",),
    "fraud_scams": ("illicit",),
    # The toxicity filter
    "toxicity": ("harassment",),
    "severe_toxicity": ("harassment",),
    "insult": ("harassment",),
    "threat": ("harassment", "harassment/threatening"),
    "identity_attack": ("hate",),
    # Common names a policy's rules may use
    "hate": ("hate",),
    "violence": ("violence",),
    "terrorism": ("violence",),
    "sexual": ("sexual",),
    "fraud": ("illicit",),
    "malware": ("illicit",),
}
