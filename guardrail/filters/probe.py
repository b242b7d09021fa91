"""A linear probe on a causal LM's hidden states, for the acceptable-use ``unsafe`` score
and for groundedness.

Opt-in, as ``probe`` of an ``embedding-heads`` engine (and of a hallucination filter's
``groundedness``: see :mod:`guardrail.filters.grounding`). The text runs through the first
layers of a decoder (by default the embedded SmolLM2-135M-Instruct, which the gateway
already prepares for ``--backend local``); the hidden states of a few layers, averaged
over the text's tokens, go through a logistic head. A language model's middle layers
carry more of a request's intent than a sentence encoder's embedding: on the dev split of
``data/aup`` the probe blended with the heads finds more forbidden requests at the same
false positives than the heads alone (README, acceptable use).

The head is trained by ``scripts/train_aup_probe.py`` on ``data/aup``'s train split, for
one model: the file keeps a corner of that model's input embeddings, and a model that does
not match it is a :class:`ConfigError` (a probe read off another model's hidden states
scores noise). The same script trains a probe for any other Llama-family checkpoint
(``--model``), such as the one a deployment serves.

Scores are blended in log-odds (:func:`mix_scores`), then calibrated so that the policy's
thresholds keep their meaning: ``mix`` is the probe's weight, and ``knee`` the blend's
value that the training script chose on dev (at most 1% of ordinary and 5% of look-alike
dev prompts above it); the knee maps to 0.9, the default policy's threshold, linearly on
each side. The map is monotone, so it changes no ranking. A groundedness probe maps its
knee to the groundedness threshold (0.4) instead: its file says so (``target``).

A probe may read only part of a text: given a *prefix* (a groundedness probe's
``Source: ... Question: ... Answer:``), the prefix's tokens are run but only the tokens
after it are averaged.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardrail.errors import ConfigError
from guardrail.filters.batching import MicroBatcher
from guardrail.kv import cache_argument, returned_cache

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from guardrail.filters.classifiers import ProbeSettings
    from guardrail.guard.filter import BuildContext

DEFAULT_AUP_PROBE = Path(__file__).parent / "data" / "aup_probe.npz"
DEFAULT_GROUNDING_PROBE = Path(__file__).parent / "data" / "grounding_probe.npz"
TRAINERS = "scripts/train_aup_probe.py or scripts/train_grounding_probe.py, --model"
PROBE_VERSION = 1
# The blend's dev threshold becomes this score: the default policy's threshold.
CALIBRATED_KNEE = 0.9
# Tokens of one text the probe reads; the rules filter's windows are shorter.
MAX_TOKENS = 256
# Tokens of a prefix and its text together (callers cap the prefix's characters); a
# longer prefix loses its middle down to PREFIX_TOKENS.
MAX_PAIR_TOKENS = 1024
PREFIX_TOKENS = MAX_PAIR_TOKENS - MAX_TOKENS
# Texts read at once after one shared prefix (each holds its own copy of the prefix's
# keys and values: 8 of 768 tokens through 18 SmolLM2 layers are about 170 MB).
SHARED_PREFIX_BATCH = 8
# The corner of the input embedding matrix a probe file keeps to recognise its model.
SIGNATURE_ROWS, SIGNATURE_COLUMNS = 8, 16
# One probe forward pass at a time: each pass hangs its hooks on the shared layers, and
# hooks fire for every pass through them, so two at once would read each other's states
# (a shadow policy's executor, or two batches, can call at the same moment).
_FORWARD = threading.Lock()


@dataclass(frozen=True, eq=False)
class Probe:
    """A logistic head over the mean hidden states of ``layers`` (1-based: layer 12 is the
    output of the twelfth decoder layer), standardised by ``mean`` and ``scale``."""

    layers: tuple[int, ...]
    mean: npt.NDArray[np.float32]
    scale: npt.NDArray[np.float32]
    coef: npt.NDArray[np.float32]
    intercept: float
    mix: float
    knee: float
    signature: npt.NDArray[np.float32]
    target: float = CALIBRATED_KNEE

    def save(self, path: Path) -> None:
        import numpy as np

        np.savez_compressed(
            path,
            layers=np.array(self.layers),
            mean=self.mean,
            scale=self.scale,
            coef=self.coef,
            intercept=np.array(self.intercept),
            mix=np.array(self.mix),
            knee=np.array(self.knee),
            signature=self.signature,
            target=np.array(self.target),
            feature_version=np.array(PROBE_VERSION),
        )

    @classmethod
    def load(cls, path: Path) -> Probe:
        """Read plain arrays (no pickle); a file that does not hold a consistent probe is
        a :class:`ConfigError`."""
        import numpy as np

        from guardrail.filters.weights import all_finite, read_arrays

        data = read_arrays(path, "probe weights", PROBE_VERSION)
        try:
            probe = cls(
                layers=tuple(int(n) for n in data["layers"]),
                mean=data["mean"].astype(np.float32),
                scale=data["scale"].astype(np.float32),
                coef=data["coef"].astype(np.float32),
                intercept=float(data["intercept"]),
                mix=float(data["mix"]),
                knee=float(data["knee"]),
                signature=data["signature"].astype(np.float32),
                # Files from before groundedness probes calibrate to the AUP threshold.
                target=float(data["target"]) if "target" in data else CALIBRATED_KNEE,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"cannot read probe weights {path}: {e}") from e
        width = probe.coef.shape[0] if probe.coef.ndim == 1 else -1
        if (
            not probe.layers
            or min(probe.layers) < 1
            or width < 1
            or width % len(probe.layers)
            or probe.mean.shape != (width,)
            or probe.scale.shape != (width,)
            or not np.all(probe.scale > 0)
        ):
            raise ConfigError(
                f"probe weights {path}: layers, mean, scale and coef do not fit together"
            )
        # Else the rules filter lets every text through and the metrics sum NaN.
        if not all_finite(probe.intercept, probe.coef, probe.mean, probe.scale):
            raise ConfigError(
                f"probe weights {path}: intercept, coef, mean and scale must be finite"
            )
        if not (0.0 <= probe.mix <= 1.0 and 0.0 < probe.knee < 1.0 and 0.0 < probe.target < 1.0):
            raise ConfigError(
                f"probe weights {path}: mix must be in [0, 1], knee and target in (0, 1)"
            )
        if probe.signature.shape != (SIGNATURE_ROWS, SIGNATURE_COLUMNS):
            raise ConfigError(f"probe weights {path}: signature is not {SIGNATURE_ROWS}x16")
        return probe

    @property
    def hidden_size(self) -> int:
        return int(self.coef.shape[0]) // len(self.layers)

    def check_model(self, decoder: Any, where: str) -> None:
        """Refuse a decoder other than the one the probe was trained on."""
        import numpy as np

        hidden = int(decoder.config.hidden_size)
        count = len(decoder.layers)
        if hidden != self.hidden_size or max(self.layers) > count:
            raise ConfigError(
                f"the probe reads {self.hidden_size}-wide hidden states of layers "
                f"{list(self.layers)}; {where} has {count} layers of width {hidden}: "
                f"train a probe for it ({TRAINERS})"
            )
        if not np.allclose(signature(decoder), self.signature, atol=2e-2):
            raise ConfigError(
                f"the probe was trained on another model than {where} (their input "
                f"embeddings differ): train a probe for it ({TRAINERS})"
            )

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The probe's probability (a forbidden request, a supported claim), one per row."""
        import numpy as np

        z = ((features - self.mean) / self.scale) @ self.coef + self.intercept
        out: npt.NDArray[np.float32] = (1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))).astype(
            np.float32
        )
        return out

    def blend(
        self, heads: npt.NDArray[np.floating[Any]], probe: npt.NDArray[np.floating[Any]]
    ) -> npt.NDArray[np.float32]:
        """The calibrated blend of the heads' and the probe's scores."""
        return calibrate(mix_scores(heads, probe, self.mix), self.knee, self.target)


def mix_scores(
    heads: npt.NDArray[np.floating[Any]], probe: npt.NDArray[np.floating[Any]], mix: float
) -> npt.NDArray[np.float32]:
    """The probability whose log-odds are the weighted mean of the two scores' log-odds
    (``mix`` the probe's weight). In log-odds a sure score outweighs a doubtful one: the
    heads' 0.997 for "how do i c00k m3th at home" still blocks next to the probe's 0.24,
    where a plain average (0.49) let it through; on the dev split it also finds a little
    more at the same false positives."""
    import numpy as np

    def log_odds(p: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
        q = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1.0 - 1e-6)
        out: npt.NDArray[np.float64] = np.log(q / (1.0 - q))
        return out

    z = (1.0 - mix) * log_odds(heads) + mix * log_odds(probe)
    result: npt.NDArray[np.float32] = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    return result


def calibrate(
    scores: npt.NDArray[np.floating[Any]], knee: float, target: float = CALIBRATED_KNEE
) -> npt.NDArray[np.float32]:
    """``knee`` to ``target``, 0 to 0 and 1 to 1, linear in between."""
    import numpy as np

    k = target
    out = np.where(
        scores <= knee,
        scores * (k / knee),
        k + (scores - knee) * ((1.0 - k) / (1.0 - knee)),
    )
    result: npt.NDArray[np.float32] = np.clip(out, 0.0, 1.0).astype(np.float32)
    return result


def signature(decoder: Any) -> npt.NDArray[np.float32]:
    """The corner of ``decoder``'s input embedding matrix that identifies it."""
    import numpy as np

    weight = decoder.get_input_embeddings().weight
    corner = weight[:SIGNATURE_ROWS, :SIGNATURE_COLUMNS].detach().float().cpu().numpy()
    result: npt.NDArray[np.float32] = np.asarray(corner, dtype=np.float32)
    return result


def decoder_of(model: Any, layers: Sequence[int]) -> Any:
    """The decoder stack of a causal LM, cut after the deepest of ``layers`` (changed in
    place: give it a copy of its own, never a model that generates)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    stack = getattr(base, "layers", None)
    if base is None or stack is None or not hasattr(base, "get_input_embeddings"):
        raise ConfigError(
            f"the probe needs a decoder with a list of layers; {type(model).__name__} has none"
        )
    if max(layers) > len(stack):
        raise ConfigError(f"the probe reads layer {max(layers)}; the model has {len(stack)} layers")
    base.layers = stack[: max(layers)]
    base.eval()
    return base


def hidden_features(
    decoder: Any,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    prefixes: Sequence[str] | None = None,
) -> npt.NDArray[np.float32]:
    """Per text, the hidden states of ``layers`` averaged over its tokens, side by side
    (blocking). With ``prefixes``, each text is read after its prefix and only its own
    tokens are averaged. The outputs are taken from the layers themselves, not from the
    model's ``hidden_states``, whose last entry some versions pass through the final norm."""
    import numpy as np

    if not texts:
        width = int(decoder.config.hidden_size) * len(layers)
        return np.zeros((0, width), dtype=np.float32)
    if prefixes is not None and len(prefixes) != len(texts):
        raise ValueError("one prefix per text")
    rows = [token_row(tokenizer, t, prefixes[i] if prefixes else "") for i, t in enumerate(texts)]
    with _FORWARD:
        return _pooled(decoder, tokenizer, rows, layers)


def features_in_batches(
    decoder: Any,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    prefixes: Sequence[str] | None = None,
    batch: int = 32,
) -> npt.NDArray[np.float64]:
    """:func:`hidden_features` of many texts (training), in batches of similar length so
    little of each is padding; rows in the order of ``texts``."""
    import numpy as np

    sizes = [len(t) + (len(prefixes[i]) if prefixes else 0) for i, t in enumerate(texts)]
    order = np.argsort(sizes, kind="stable")
    width = int(decoder.config.hidden_size) * len(layers)
    out = np.empty((len(texts), width), dtype=np.float64)
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        chosen = [prefixes[j] for j in rows] if prefixes else None
        out[rows] = hidden_features(decoder, tokenizer, [texts[j] for j in rows], layers, chosen)
    return out


def token_row(tokenizer: Any, text: str, prefix: str) -> tuple[list[int], int]:
    """The token ids of ``prefix + text`` and where ``text``'s tokens start."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if not prefix:
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=MAX_TOKENS)
        return ids["input_ids"] or [pad], 0
    # The prefix alone tokenizes as it does in front of the text when it ends at a word
    # boundary ("Answer:" then " ..."), as the groundedness probe's does.
    full = tokenizer(prefix + text, add_special_tokens=True)["input_ids"]
    start = min(len(tokenizer(prefix, add_special_tokens=True)["input_ids"]), len(full))
    own = full[start:][:MAX_TOKENS] or [pad]
    before = full[:start]
    if len(before) > PREFIX_TOKENS:  # too long: the middle of the prefix goes, never the
        # text, and the prefix keeps its start and its end (the question and "Answer:")
        half = PREFIX_TOKENS // 2
        before = before[:half] + before[len(before) - (PREFIX_TOKENS - half) :]
    return before + own, len(before)


class KeptPrefixes:
    """The keys and values of recent prefixes, least recently used out first.

    A stream's windows are scored one after another against the same sources and
    question, and so are a moderation request's inputs against one ``context``: each
    would run the whole prefix (up to 768 tokens) again for a sentence of twenty. Kept,
    a later window runs only its own tokens. Bounded by bytes (``max_bytes``; a prefix
    larger than that alone is not kept). Each entry belongs to a scope (the tenant): a
    text reuses only its own scope's, so no tenant can time whether another sent the
    same sources. Used only under the forward lock.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str | None, tuple[int, ...]], tuple[Any, int]] = (
            OrderedDict()
        )
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, scope: str | None, head: Sequence[int]) -> Any:
        """The kept keys and values of ``head`` in ``scope`` (never to be extended: copy
        them), or None."""
        key = (scope, tuple(head))
        found = self._items.get(key)
        if found is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return found[0]

    def put(self, scope: str | None, head: Sequence[int], past: Any) -> None:
        from guardrail.backends.engine import cache_bytes

        size = cache_bytes(past)
        key = (scope, tuple(head))
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = (past, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped


def features_after(
    decoder: Any,
    tokenizer: Any,
    prefix: str,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    kept: KeptPrefixes | None = None,
    scope: str | None = None,
) -> npt.NDArray[np.float32]:
    """What ``hidden_features(decoder, tokenizer, texts, layers, [prefix] * len(texts))``
    computes, with the prefix run once: its keys and values are kept and each text runs
    after them (the claims of one answer share their sources). With ``kept``, the
    prefix's keys and values are looked up there first and left there for the next
    call (in ``scope``). Without it, a single text has nothing to share and goes the plain
    way in one pass; so do texts whose tokens do not all start at the prefix's end."""
    import numpy as np

    if len(texts) < (1 if kept is not None else 2):
        return hidden_features(decoder, tokenizer, texts, layers, [prefix] * len(texts))
    rows = [token_row(tokenizer, t, prefix) for t in texts]
    head = rows[0][0][: rows[0][1]]
    if not head or any(row[:start] != head for row, start in rows):
        return hidden_features(decoder, tokenizer, texts, layers, [prefix] * len(texts))
    import copy

    import torch

    tails = [row[start:] for row, start in rows]
    device = decoder.get_input_embeddings().weight.device
    parts = []
    with _FORWARD, torch.inference_mode():
        done = kept.get(scope, head) if kept is not None else None
        if done is None and kept is not None and len(tails) == 1:
            # One text, prefix not kept: one pass over both, as the plain way, and the
            # prefix's part of its keys and values kept (causal: the text changed none).
            features, done = _pooled_keeping(decoder, rows[0], layers)
            done.crop(len(head) - len(rows[0][0]))  # transformers 5: tokens to drop
            kept.put(scope, head, done)
            return features
        if done is None:
            run = decoder(input_ids=torch.tensor([head], device=device), use_cache=True)
            done = returned_cache(run)
            if kept is not None:
                kept.put(scope, head, done)
        for i in range(0, len(tails), SHARED_PREFIX_BATCH):
            chunk = tails[i : i + SHARED_PREFIX_BATCH]
            past = copy.deepcopy(done)  # each chunk extends its own copy
            past.batch_repeat_interleave(len(chunk))
            parts.append(
                _pooled_after(decoder, tokenizer, len(head), past=past, tails=chunk, layers=layers)
            )
    return np.concatenate(parts)


class _Catch:
    """Forward hooks keeping each of ``layers``' output while the block runs."""

    def __init__(self, decoder: Any, layers: Sequence[int]) -> None:
        self.decoder, self.layers = decoder, layers
        self.caught: dict[int, Any] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> dict[int, Any]:
        def keep(index: int) -> Any:
            def hook(_module: Any, _inputs: Any, output: Any) -> None:
                self.caught[index] = output[0] if isinstance(output, tuple) else output

            return hook

        self._handles = [
            self.decoder.layers[n - 1].register_forward_hook(keep(n)) for n in self.layers
        ]
        return self.caught

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


def _mean_of(caught: dict[int, Any], weights: Any, layers: Sequence[int]) -> Any:
    import torch

    pooled = [(caught[n].float() * weights).sum(1) / weights.sum(1).clamp(min=1.0) for n in layers]
    return torch.cat(pooled, dim=1).cpu().numpy().astype("float32")


def _pooled_after(
    decoder: Any,
    tokenizer: Any,
    done: int,
    *,
    past: Any,
    tails: list[list[int]],
    layers: Sequence[int],
) -> npt.NDArray[np.float32]:
    """The texts ``tails`` run after ``done`` tokens whose keys and values are ``past``
    (one row per text); their own tokens' states averaged."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = decoder.get_input_embeddings().weight.device
    width = max(map(len, tails))
    ids = torch.full((len(tails), width), pad, dtype=torch.long)
    mask = torch.zeros((len(tails), done + width), dtype=torch.long)
    mask[:, :done] = 1
    for i, tail in enumerate(tails):  # right padding: causal tokens never see it
        ids[i, : len(tail)] = torch.tensor(tail)
        mask[i, done : done + len(tail)] = 1
    positions = torch.arange(done, done + width).expand(len(tails), -1)
    with _Catch(decoder, layers) as caught:
        decoder(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **cache_argument(decoder, past),
        )
    weights = mask[:, done:].to(device).unsqueeze(-1).float()
    out: npt.NDArray[np.float32] = _mean_of(caught, weights, layers)
    return out


def _pooled_keeping(
    decoder: Any, row: tuple[list[int], int], layers: Sequence[int]
) -> tuple[npt.NDArray[np.float32], Any]:
    """One ``(ids, start)`` row's pooled states, and its keys and values."""
    import torch

    ids, start = row
    device = decoder.get_input_embeddings().weight.device
    with _Catch(decoder, layers) as caught:
        run = decoder(input_ids=torch.tensor([ids], device=device), use_cache=True)
    weights = torch.zeros((1, len(ids), 1), device=device)
    weights[0, start:] = 1.0
    out: npt.NDArray[np.float32] = _mean_of(caught, weights, layers)
    return out, returned_cache(run)


def _pooled(
    decoder: Any, tokenizer: Any, rows: Sequence[tuple[list[int], int]], layers: Sequence[int]
) -> npt.NDArray[np.float32]:
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(row) for row, _ in rows)
    device = decoder.get_input_embeddings().weight.device
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pooled_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, start) in enumerate(rows):  # right padding: causal tokens never see it
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        pooled_mask[i, start : len(row)] = 1
    with torch.inference_mode(), _Catch(decoder, layers) as caught:
        decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        weights = pooled_mask.to(device).unsqueeze(-1).float()
        out: npt.NDArray[np.float32] = _mean_of(caught, weights, layers)
    return out


class ProbeScorer:
    """A probe on its own copy of its model, scoring texts in micro-batches on the
    executor (concurrent requests share a forward pass)."""

    def __init__(self, probe: Probe, decoder: Any, tokenizer: Any, executor: Executor) -> None:
        self.probe = probe
        self._decoder = decoder
        self._tokenizer = tokenizer
        self._executor = executor
        self._batcher: MicroBatcher[tuple[str, str], float] = MicroBatcher(
            lambda pairs: [float(s) for s in self.scores_sync(list(pairs))],
            executor,
            max_batch=16,
            max_wait_s=0.002,
        )

    def scores_sync(self, pairs: list[tuple[str, str]]) -> npt.NDArray[np.float32]:
        """The probe's probability per ``(prefix, text)`` (blocking); "" is no prefix."""
        features = hidden_features(
            self._decoder,
            self._tokenizer,
            [text for _, text in pairs],
            self.probe.layers,
            [prefix for prefix, _ in pairs],
        )
        return self.probe.predict(features)

    def scores_after_sync(
        self,
        prefix: str,
        texts: list[str],
        kept: KeptPrefixes | None = None,
        scope: str | None = None,
    ) -> npt.NDArray[np.float32]:
        """The probe's probability per text, all read after ``prefix`` (blocking); the
        prefix's keys and values looked up in and left in ``kept``."""
        features = features_after(
            self._decoder,
            self._tokenizer,
            prefix,
            texts,
            self.probe.layers,
            kept=kept,
            scope=scope,
        )
        return self.probe.predict(features)

    async def scores_after(
        self,
        prefix: str,
        texts: list[str],
        kept: KeptPrefixes | None = None,
        scope: str | None = None,
    ) -> npt.NDArray[np.float32]:
        """:meth:`scores_after_sync` on the executor: one request's texts are a batch of
        their own, their prefix run once (or not at all, when ``kept`` has it). Without
        ``kept``, a single text has nothing to share, so it joins other requests'
        micro-batches instead."""
        import asyncio

        if len(texts) == 1 and kept is None:
            return await self.scores([(prefix, texts[0])])
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self.scores_after_sync, prefix, texts, kept, scope
        )

    async def scores(self, pairs: list[tuple[str, str]]) -> npt.NDArray[np.float32]:
        import asyncio

        import numpy as np

        found = await asyncio.gather(*(self._batcher.submit(p) for p in pairs))
        return np.asarray(found, dtype=np.float32)

    async def unsafe(self, texts: list[str]) -> npt.NDArray[np.float32]:
        return await self.scores([("", t) for t in texts])


def probe_model_source(settings: ProbeSettings, env: BuildContext) -> str:
    """The model folder or file of ``settings.model``; 'embedded' must be prepared."""
    if settings.model != "embedded":
        path = Path(settings.model).expanduser()
        return str(path if path.is_absolute() else env.base_dir / path)
    from guardrail.backends.embedded import embedded_model_path

    folder = embedded_model_path(env.cache_dir)
    if folder is None:
        raise ConfigError(
            "the probe reads the embedded model, which is not prepared: run "
            "'guardrail model prepare' (or give the probe a model folder)"
        )
    return str(folder)


def shared_probe(
    settings: ProbeSettings,
    env: BuildContext,
    default: Path = DEFAULT_AUP_PROBE,
) -> ProbeScorer:
    """The probe of ``settings`` (``weights: default`` is ``default``) on its own truncated
    copy of its model: one per process, weights file version and executor."""
    from guardrail.backends.local import load_local_model
    from guardrail.filters.weights import file_key, file_stamp

    path = default if settings.weights == "default" else Path(settings.weights)
    if not path.is_absolute():
        path = env.base_dir / path
    stamp = file_stamp(path)
    probe = env.resources.get(
        ("aup-probe", file_key(path)), lambda: Probe.load(path), version=stamp
    )
    source = probe_model_source(settings, env)

    def load() -> tuple[Any, Any]:
        model, tokenizer = load_local_model(
            source,
            dtype=settings.dtype,
            device=settings.device,
            allow_downloads=env.allow_downloads,
            cache_dir=env.cache_dir,
        )
        decoder = decoder_of(model, probe.layers)
        probe.check_model(decoder, source)
        return decoder, tokenizer

    decoder, tokenizer = env.resources.get(
        ("aup-probe-model", file_key(path), source, settings.device, settings.dtype),
        load,
        version=stamp,
    )
    # Keyed like the model it runs: without the dtype, a second filter asking for bf16
    # got the scorer built on the first one's fp32 model.
    return env.resources.get(
        (
            "aup-probe-scorer",
            file_key(path),
            source,
            settings.device,
            settings.dtype,
            env.executor,
        ),
        lambda: ProbeScorer(probe, decoder, tokenizer, env.executor),
        version=stamp,
    )
