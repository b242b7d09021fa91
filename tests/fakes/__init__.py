"""In-process stand-ins for what Guardrail talks to, so tests need no mocks.

- :mod:`tests.fakes.upstream`: a scripted OpenAI-compatible server (``FakeUpstream``),
  reachable in-process (``fake_client``) or over TCP (``serve_upstream``).
- :mod:`tests.fakes.backend`: a scripted :class:`~guardrail.backends.base.Backend`.
- :mod:`tests.fakes.filters`: a filter that crashes or hangs on every text (``FAULT``),
  one that reads a word list next to its policy (``LISTED``).
- :mod:`tests.fakes.configmap`: a Kubernetes ConfigMap volume (``ConfigMapVolume``).

Kept import-free: each test imports the module it needs.
"""
