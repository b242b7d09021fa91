"""Guardrail: a safety and moderation gateway for OpenAI-style LLM traffic.

Importing the package is cheap: heavy dependencies (torch, transformers, model
libraries) are imported only by the parts that need them, when they are built.
"""

from __future__ import annotations

__version__ = "0.1.0"
