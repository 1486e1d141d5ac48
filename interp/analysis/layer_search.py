"""The linear-time layer search of methods.md §4: where does intent reach the last token?

Attention outputs at the last token are patched from a *source* prompt into a
*target* prompt for a set of layers, and each layer's residual is decoded at the
last token. Following the paper's code (``auto_search``):

1. **upper** — binary-search the smallest ``U`` such that patching layers
   ``[0, U)`` lifts the source answer's probability above ``threshold`` (0.85) at
   some layer (max over layers of the decoded probability);
2. **lower** — binary-search the largest ``L`` such that ``[L, U)`` still does;
3. **refine** — while the final-layer probability of the source answer does not
   beat the target answer's by ``eps`` (0.3), add the first later layer where the
   decoded source probability drops by more than ``phi`` (0.05) (else the next
   layer), and re-measure.

Each step is one patched forward pass over ``n`` examples, so the whole search
costs O(log n_layers) + refinements, not O(n_layers²) as a full range scan would.

Differences from the paper's code, stated: layers are decoded with the logit
lens (final norm + unembedding) instead of a Patchscope identity prompt — the
zoo's word-level tokenizer has no ``cat -> cat`` prompt — and the last layer's
decoding is the model's own output either way; the refine step never re-adds a
layer already in the set (the original can loop forever when no layer drops).

Pairings (source intent -> target intent): ``"ctx->prior"`` and
``"prior->ctx"`` patch from the same item with the other intent (source answer
= the other intent's answer: where does the *intent* travel?);
``"ctx->ctx"`` and ``"prior->prior"`` patch from another item with the same
intent and a different answer (where does the *answer* travel?).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp.analysis.context_hooks import (
    blocks,
    logit_lens,
    patch_attention,
    record_attention,
    record_block_outputs,
)
from interp.analysis.context_task import IntentData, encode_left, prepare_intent, resolve_model
from interp.errors import TaskError
from interp.results import Result
from interp.tasks import Task

PAIRINGS = ("ctx->prior", "prior->ctx", "ctx->ctx", "prior->prior")
FLIP_PAIRINGS = ("ctx->prior", "prior->ctx")


@dataclasses.dataclass(frozen=True)
class LayerSearch(Result):
    """The trace of the layer search: one row per patched forward pass, per pairing.

    ``ranges[pairing]`` is the layer set found; ``p_source`` / ``p_target`` are
    ``[n_steps, n_layers]`` mean decoded probabilities of the source / target
    answer at each layer's output (rows align with ``table``).
    """

    ranges: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    p_source: Tensor | None = None  # [n_steps, n_layers]
    p_target: Tensor | None = None  # [n_steps, n_layers]
    n_layers: int = 0

    summary_columns = ("pairing", "phase", "layers", "p_source_max", "p_source_final",
                       "p_target_final", "accepted")

    def summary(self) -> pd.DataFrame:
        rows = []
        for pairing, layers in self.ranges.items():
            last = self.table[self.table["pairing"] == pairing].iloc[-1]
            rows.append({"pairing": pairing, "layers": _fmt(layers),
                         "steps": int((self.table["pairing"] == pairing).sum()),
                         "p_source_final": last["p_source_final"],
                         "p_target_final": last["p_target_final"]})
        return pd.DataFrame(rows)

    def suggest_layer(self) -> int:
        """Where to put the knob: the residual entering the block right after the intent ranges.

        The flip pairings locate the attention layers that carry the intent to
        the last token; the residual stream *after* the last of them (``max+1``,
        capped at the last block) holds the intent. Uses whichever flip pairings
        were searched.
        """
        flips = [self.ranges[p] for p in FLIP_PAIRINGS if self.ranges.get(p)]
        if not flips:
            raise TaskError("suggest_layer needs a 'ctx->prior' or 'prior->ctx' search")
        return min(max(max(r) for r in flips) + 1, self.n_layers - 1)


def _fmt(layers: Sequence[int]) -> str:
    layers = list(layers)
    if not layers:
        return "[]"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


def pairing_examples(data: IntentData, pairing: str) -> tuple[list[str], list[str], Tensor, Tensor]:
    """(source prompts, target prompts, source answer ids, target answer ids) for one pairing."""
    if pairing not in PAIRINGS:
        raise TaskError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    source, target = pairing.split("->")
    if source != target:
        return (data.prompts(source), data.prompts(target), data.answer_ids(source),
                data.answer_ids(target))
    prompts, answers = data.prompts(source), data.answer_ids(source)
    n = len(prompts)
    partner = []
    for i in range(n):
        for step in range(1, n):
            j = (i + step) % n
            if answers[j] != answers[i] and prompts[j] != prompts[i]:
                partner.append(j)
                break
        else:
            raise TaskError(f"pairing {pairing!r}: every item has the same {source} answer")
    return ([prompts[j] for j in partner], list(prompts), answers[partner], answers.clone())


class _Patcher:
    """Source attention outputs cached once; each call patches a layer set into the targets."""

    def __init__(self, model, tokenizer, sources, targets, src_ids, tgt_ids, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.n_layers = len(blocks(model))
        self.targets = [encode_left(tokenizer, targets[s:s + batch_size])
                        for s in range(0, len(targets), batch_size)]
        self.src_ids, self.tgt_ids = src_ids, tgt_ids
        self.source_attn: list[dict[int, Tensor]] = []
        with torch.no_grad():
            for start in range(0, len(sources), batch_size):
                ids, mask = encode_left(tokenizer, sources[start:start + batch_size])
                store: dict[int, Tensor] = {}
                with record_attention(model, store):
                    model(input_ids=ids, attention_mask=mask)
                self.source_attn.append(store)

    @torch.no_grad()
    def __call__(self, layers: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Mean decoded p(source answer), p(target answer) per layer: two ``[n_layers]`` tensors."""
        p_src = torch.zeros(self.n_layers, dtype=torch.float64)
        p_tgt = torch.zeros(self.n_layers, dtype=torch.float64)
        offset = 0
        for (ids, mask), attn in zip(self.targets, self.source_attn):
            batch = ids.shape[0]
            rows = torch.arange(batch)
            outputs: list[Tensor | None] = [None] * self.n_layers
            with patch_attention(self.model, {l: attn[l] for l in layers}), \
                    record_block_outputs(self.model, outputs):
                self.model(input_ids=ids, attention_mask=mask)
            probs = logit_lens(self.model, torch.stack(outputs)).softmax(-1)  # [layers, batch, vocab]
            src = self.src_ids[offset:offset + batch]
            tgt = self.tgt_ids[offset:offset + batch]
            p_src += probs[:, rows, src].double().sum(-1)
            p_tgt += probs[:, rows, tgt].double().sum(-1)
            offset += batch
        return p_src / offset, p_tgt / offset


def _search_one(patch: _Patcher, pairing: str, threshold: float, eps: float, phi: float,
                bar) -> tuple[list[int], list[dict[str, Any]], list[Tensor], list[Tensor]]:
    n = patch.n_layers
    rows, p_srcs, p_tgts = [], [], []

    seen: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}

    def measure(phase: str, layers: list[int]) -> tuple[Tensor, Tensor]:
        key = tuple(layers)
        if key not in seen:  # a set already measured (e.g. [0, U) again in step 2) costs nothing
            seen[key] = patch(layers)
        p_src, p_tgt = seen[key]
        rows.append({"pairing": pairing, "phase": phase, "layers": _fmt(layers),
                     "n_patched": len(layers), "p_source_max": float(p_src.max()),
                     "p_source_final": float(p_src[-1]), "p_target_final": float(p_tgt[-1]),
                     "accepted": False})
        p_srcs.append(p_src.float())
        p_tgts.append(p_tgt.float())
        bar.update(1)
        return p_src, p_tgt

    # 1. smallest U with [0, U) sufficient (monotone: more layers, more source signal)
    left, right, upper = 1, n, n
    while left <= right:
        mid = (left + right) // 2
        p_src, _ = measure("upper", list(range(mid)))
        if float(p_src.max()) > threshold:
            rows[-1]["accepted"] = True
            upper, right = mid, mid - 1
        else:
            left = mid + 1
    # 2. largest L with [L, U) still sufficient
    left, right, lower = 0, upper - 1, 0
    while left <= right:
        mid = (left + right) // 2
        p_src, _ = measure("lower", list(range(mid, upper)))
        if float(p_src.max()) > threshold:
            rows[-1]["accepted"] = True
            lower, left = mid, mid + 1
        else:
            right = mid - 1
    # 3. refine: grow the set until the final output prefers the source answer by eps
    chosen = list(range(lower, upper))
    p_src, p_tgt = measure("range", chosen)
    rows[-1]["accepted"] = True
    while float(p_src[-1]) <= float(p_tgt[-1]) + eps:
        start = max(chosen) + 1 if chosen else 0
        candidates = [c for c in range(max(start, 1), n) if c not in chosen]
        if not candidates:
            break
        drops = [c for c in candidates if float(p_src[c - 1] - p_src[c]) > phi]
        chosen = sorted({*chosen, (drops or candidates)[0]})
        p_src, p_tgt = measure("refine", chosen)
        rows[-1]["accepted"] = True
    return chosen, rows, p_srcs, p_tgts


def layer_search(
    model,
    task: Task,
    pairings: str | Sequence[str] = FLIP_PAIRINGS,
    *,
    tokenizer=None,
    side: str = "finetuned",
    threshold: float = 0.85,
    eps: float = 0.3,
    phi: float = 0.05,
    n: int | None = 64,
    batch_size: int = 64,
    progress: bool = True,
) -> LayerSearch:
    """Find, per pairing, the attention layers whose last-token output carries the source's intent.

    ``model``: an HF model (+ ``tokenizer``) or a ModelPair (``side``). ``task``:
    an intent task. ``n`` caps the number of items used (the first ``n``).
    Returns a :class:`LayerSearch` whose table is the trace the search followed.
    """
    model, tokenizer = resolve_model(model, tokenizer, side)
    data = prepare_intent(task, tokenizer)
    if n is not None:
        data = data.subset(range(min(n, len(data))))
    pairings = [pairings] if isinstance(pairings, str) else list(pairings)
    ranges, rows, p_srcs, p_tgts = {}, [], [], []
    with tqdm(desc="layer search", disable=not progress, unit="pass") as bar:
        for pairing in pairings:
            sources, targets, src_ids, tgt_ids = pairing_examples(data, pairing)
            patch = _Patcher(model, tokenizer, sources, targets, src_ids, tgt_ids, batch_size)
            chosen, r, ps, pt = _search_one(patch, pairing, threshold, eps, phi, bar)
            ranges[pairing] = chosen
            rows += r
            p_srcs += ps
            p_tgts += pt
    table = pd.DataFrame(rows)
    table.insert(0, "step", range(len(table)))
    options = {"task": task.name, "pairings": pairings, "threshold": threshold, "eps": eps,
               "phi": phi, "n_items": len(data), "decoder": "logit_lens",
               "site": "blocks.{l}.hook_attn_out at the last token",
               "n_shared_first_token": data.n_shared_first_token}
    return LayerSearch(table=table, options=options, ranges=ranges,
                       p_source=torch.stack(p_srcs), p_target=torch.stack(p_tgts),
                       n_layers=len(blocks(model)))
