"""The context-sensitivity knob (methods.md §4): a 1-D subspace that decides context vs prior.

``context_knob(model, task)`` finds a unit direction ``u`` in the residual stream
entering block ``layer`` (TransformerLens ``blocks.{layer}.hook_resid_pre``) at
the prompt's last token, such that the coordinate ``u·h`` carries the intent:

- ``method="das"`` (the paper's): distributed alignment search with a rank-1
  orthogonal projection. On items the model answers right under both intents,
  interchange ``h ← (I − uuᵀ)h_target + uuᵀh_source`` with the source = the same
  item under the opposite intent, and train ``u`` by cross-entropy toward the
  flipped-intent answer (Adam, batch 8, lr 1e-3, 1 epoch by default; the zoo's
  tiny models need more epochs — see :data:`ZOO_DAS`).
- ``method="mean_diff"``: ``u ∝ mean(h | ctx) − mean(h | prior)``.
- ``method="probe"``: ``u ∝`` the weight of an L2 logistic regression ctx vs prior.

Training is fast because the model is frozen and the intervention touches one
position of one layer: source activations are computed once, and each step
runs only the target's *last* token through the model against a cached KV
prefix (positions before the last never see the intervention in a causal
model). ``fast=False`` runs the full target prompt every step instead; both
give the same direction (benchmarks/bench_context.py).

The knob is oriented so that ``u·h`` is larger under the ``ctx`` intent.
``steer(model, c)`` sets the coordinate, ``h ← (I − uuᵀ)h + c·u``, at the last
prompt position only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp.analysis.context_hooks import (
    cache_kwarg,
    check_layer,
    check_width,
    d_model,
    edit_resid_pre,
    record_resid_pre,
)
from interp.analysis.context_task import (
    IntentData,
    encode_left,
    final_logits,
    prepare_intent,
    resolve_model,
)
from interp.errors import TaskError
from interp.results import Result
from interp.tasks import Task

METHODS = ("das", "mean_diff", "probe")
#: DAS settings that make the zoo's tiny models converge (the paper's 1 epoch at lr 1e-3 is
#: ~60 steps there — too few for a random start to rotate onto the knob).
ZOO_DAS = {"epochs": 4, "lr": 1e-2, "batch_size": 8}


# ---------------------------------------------------------------------------
# reading the site
# ---------------------------------------------------------------------------


@torch.no_grad()
def site_activations(model, tokenizer, prompts: Sequence[str], layer: int,
                     batch_size: int = 64) -> Tensor:
    """Residual entering block ``layer`` at each prompt's last token: ``[n_prompts, d_model]`` float32."""
    check_layer(model, layer)
    store: dict[int, list[Tensor]] = {}
    with record_resid_pre(model, [layer], store):
        for start in range(0, len(prompts), batch_size):
            ids, mask = encode_left(tokenizer, prompts[start:start + batch_size])
            model(input_ids=ids, attention_mask=mask)
    return torch.cat(store[layer])


def auc_and_dprime(ctx: Tensor, prior: Tensor) -> tuple[float, float]:
    """AUC = P(proj_ctx > proj_prior) (ties ½) and d′ = (μ_ctx − μ_prior) / √((σ²_ctx + σ²_prior)/2).

    d′ is ±inf when both intents project to a constant each (e.g. at
    ``blocks.0``, where the last token's residual is the intent word's
    embedding) and NaN when the two constants are equal or a side has < 2 values.
    """
    ctx, prior = ctx.double().flatten(), prior.double().flatten()
    greater = (ctx[:, None] > prior[None, :]).double().mean()
    ties = (ctx[:, None] == prior[None, :]).double().mean()
    auc = float(greater + 0.5 * ties)
    if len(ctx) < 2 or len(prior) < 2:
        return auc, float("nan")
    gap = float(ctx.mean() - prior.mean())
    pooled = math.sqrt((float(ctx.var()) + float(prior.var())) / 2)
    scale = 1e-6 * max(1.0, float(ctx.abs().max()), float(prior.abs().max()))
    if pooled <= scale:  # no spread within an intent: the ratio is rounding noise over zero
        return auc, math.copysign(math.inf, gap) if abs(gap) > scale else float("nan")
    return auc, gap / pooled


@dataclasses.dataclass(frozen=True)
class Separation(Result):
    """How well ``u·h`` separates the intents in one model: one table row per prompt."""

    auc: float = float("nan")
    d_prime: float = float("nan")
    mean_ctx: float = float("nan")
    mean_prior: float = float("nan")
    std_ctx: float = float("nan")
    std_prior: float = float("nan")

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame([{k: getattr(self, k) for k in
                              ("auc", "d_prime", "mean_ctx", "mean_prior", "std_ctx", "std_prior")}])


# ---------------------------------------------------------------------------
# the knob
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ContextKnob(Result):
    """A unit direction ``u`` at ``blocks.{layer}.hook_resid_pre``, last token, and how it was found.

    ``table``: one row per intent on the fitting items (mean, std of ``u·h``);
    ``history``: the training log (DAS: one row per step; others: one row);
    ``c_ctx`` / ``c_prior``: steering values for the model it was found in (its
    intent means); recalibrate for other models with :meth:`calibrate`.
    """

    direction: Tensor | None = None  # [d_model], unit norm, float32
    layer: int = 0
    method: str = "das"
    d_model: int = 0
    c_ctx: float = float("nan")
    c_prior: float = float("nan")
    interchange_accuracy: float = float("nan")
    history: pd.DataFrame | None = None

    summary_columns = ("intent", "mean", "std", "n")

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame([{"method": self.method, "layer": self.layer,
                              "site": f"blocks.{self.layer}.hook_resid_pre[-1]",
                              "c_ctx": self.c_ctx, "c_prior": self.c_prior,
                              "interchange_acc": self.interchange_accuracy,
                              **{k: self.options.get(k) for k in ("auc", "d_prime", "n_items")}}])

    # ------------------------------------------------------------------ checks
    def _check(self, model) -> None:
        check_width(model, self.d_model, f"the knob ({self.method}, layer {self.layer})")
        check_layer(model, self.layer)

    @property
    def u(self) -> Tensor:
        return self.direction

    # ------------------------------------------------------------------ reading
    def project(self, model, prompts: Sequence[str] | Task, *, tokenizer=None,
                side: str = "finetuned", batch_size: int = 64) -> Tensor:
        """``u·h`` at the site for each prompt: ``[n_prompts]`` float32."""
        model, tokenizer = resolve_model(model, tokenizer, side)
        self._check(model)
        prompts = prompts.prompts if isinstance(prompts, Task) else list(prompts)
        return site_activations(model, tokenizer, prompts, self.layer, batch_size) @ self.u

    def separation(self, model, task: Task, *, tokenizer=None, side: str = "finetuned",
                   batch_size: int = 64) -> Separation:
        """AUC and d′ of the projections by intent on an intent task (one row per prompt)."""
        model, tokenizer = resolve_model(model, tokenizer, side)
        self._check(model)
        data = prepare_intent(task, tokenizer)
        ctx = self.project(model, data.ctx_prompts, tokenizer=tokenizer, batch_size=batch_size)
        prior = self.project(model, data.prior_prompts, tokenizer=tokenizer, batch_size=batch_size)
        auc, dprime = auc_and_dprime(ctx, prior)
        table = pd.DataFrame({"item": data.items * 2,
                              "intent": ["ctx"] * len(data) + ["prior"] * len(data),
                              "projection": torch.cat([ctx, prior]).tolist()})
        return Separation(table=table, options={"task": task.name, "layer": self.layer},
                          auc=auc, d_prime=dprime, mean_ctx=float(ctx.mean()),
                          mean_prior=float(prior.mean()), std_ctx=float(ctx.std()),
                          std_prior=float(prior.std()))

    def interchange(self, model, task: Task, *, tokenizer=None, side: str = "finetuned",
                    source: str = "same_item") -> float:
        """Fraction of an intent task's prompts flipped by swapping in the opposite intent's ``u·h``."""
        model, tokenizer = resolve_model(model, tokenizer, side)
        self._check(model)
        return interchange_accuracy(model, tokenizer, prepare_intent(task, tokenizer), self.layer,
                                    self.u, source=source)

    # ------------------------------------------------------------------ steering
    @contextlib.contextmanager
    def steer(self, model, c: float | Tensor) -> Iterator[Any]:
        """Within the block, set ``u·h = c`` at the prompt's last position: ``h ← (I − uuᵀ)h + c·u``.

        ``c`` is a number or a ``[batch]`` tensor (one value per prompt in each
        forward call). Generated tokens (forward calls that extend a KV cache)
        are left alone. ``model`` must be an HF model (use ``pair.model(side)``).
        """
        self._check(model)
        u = self.u.to(next(model.parameters()).dtype)

        def fn(h: Tensor) -> Tensor:
            value = torch.as_tensor(c, dtype=h.dtype)
            value = value[:, None] if value.ndim == 1 else value
            return h - (h @ u)[:, None] * u + value * u

        with edit_resid_pre(model, self.layer, fn, prompt_only=True):
            yield model

    def calibrate(self, model, task: Task, *, tokenizer=None, side: str = "finetuned",
                  batch_size: int = 64) -> dict[str, float]:
        """Per-model steering values from that model's own intent means on an intent task."""
        sep = self.separation(model, task, tokenizer=tokenizer, side=side, batch_size=batch_size)
        return {"c_ctx": sep.mean_ctx, "c_prior": sep.mean_prior}

    @torch.no_grad()
    def steered_predictions(self, model, prompts: Sequence[str], c: float | Tensor, *,
                            tokenizer=None, batch_size: int = 64) -> Tensor:
        """Argmax next token of each prompt with the coordinate set to ``c``: ``[n_prompts]``."""
        model, tokenizer = resolve_model(model, tokenizer)
        c_all = torch.as_tensor(c, dtype=torch.float32)
        preds = []
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start:start + batch_size])
            value = c_all[start:start + len(batch)] if c_all.ndim == 1 else c_all
            with self.steer(model, value):
                preds.append(final_logits(model, tokenizer, batch, batch_size).argmax(-1))
        return torch.cat(preds)


# ---------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------


def _mean_diff(h_ctx: Tensor, h_prior: Tensor) -> Tensor:
    return (h_ctx.double().mean(0) - h_prior.double().mean(0)).float()


def _probe(h_ctx: Tensor, h_prior: Tensor, l2: float = 1e-3, seed: int = 0) -> Tensor:
    """Weight of an L2-regularised logistic regression ctx (1) vs prior (0), fit by L-BFGS in float64."""
    x = torch.cat([h_ctx, h_prior]).double()
    y = torch.cat([torch.ones(len(h_ctx)), torch.zeros(len(h_prior))]).double()
    center = x.mean(0)
    scale = x.std(0).mean().clamp_min(1e-12)
    x = (x - center) / scale  # one global scale: the direction is unchanged
    torch.manual_seed(seed)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-10,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w @ w / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach().float()


def _cache_tensors(cache) -> list[tuple[Tensor, Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]


class _Targets:
    """Prompts encoded once (one padding for all), read once, then run with an edit at the site.

    Construction runs every prompt once (in chunks) and keeps ``site``, the
    residual entering block ``layer`` at the last position ``[m, d_model]``
    (float32) — DAS's source activations are these same prompts. With ``fast``
    it also keeps the KV cache of all positions but the last, so each call
    feeds only the last token against the cached prefix; the edit at the last
    position cannot reach earlier positions in a causal model. The fast path is
    checked against a full forward on a few prompts and dropped (with a warning)
    if the two disagree, if the architecture's cache cannot be rebuilt, or if the
    cache would exceed ``max_cache_bytes``.
    """

    def __init__(self, model, tokenizer, prompts: Sequence[str], layer: int, fast: bool,
                 chunk: int = 64, max_cache_bytes: float = 2 * 2**30):
        self.model, self.layer = model, layer
        self.ids, self.mask = encode_left(tokenizer, prompts)  # [m, T]
        self.fast = fast and self.ids.shape[1] > 1
        self.kwarg = cache_kwarg(model)
        store: dict[int, list[Tensor]] = {}
        chunks: list[list[tuple[Tensor, Tensor]]] = []
        with torch.no_grad(), record_resid_pre(model, [layer], store):
            for begin in range(0, len(self.ids), chunk):
                ids, mask = self.ids[begin:begin + chunk], self.mask[begin:begin + chunk]
                if not self.fast:
                    model(input_ids=ids, attention_mask=mask)
                    continue
                out = model(input_ids=ids, attention_mask=mask, use_cache=True)
                try:
                    kv = [(k[:, :, :-1], v[:, :, :-1])
                          for k, v in _cache_tensors(out.past_key_values)]
                except Exception as error:  # noqa: BLE001 — an architecture whose cache we cannot read
                    self._give_up(f"KV-prefix caching unavailable ({error})")
                    continue
                size = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
                if size / len(ids) * len(self.ids) > max_cache_bytes:
                    self._give_up(f"the KV prefix cache would take "
                                  f"{size / len(ids) * len(self.ids) / 2**30:.1f} GiB")
                    continue
                chunks.append(kv)
        self.site = torch.cat(store[layer])  # [m, d_model]
        self.kv = [] if not self.fast else [
            (torch.cat([c[i][0] for c in chunks]), torch.cat([c[i][1] for c in chunks]))
            for i in range(len(chunks[0]))]
        if self.fast:
            identity = torch.arange(min(4, len(self.ids)))
            try:
                with torch.no_grad():
                    fast_logits = self(identity, lambda h: h)
                    self.fast = False
                    slow_logits = self(identity, lambda h: h)
                self.fast = bool(torch.allclose(fast_logits, slow_logits, atol=1e-3, rtol=1e-3))
            except Exception as error:  # noqa: BLE001 — any failure means: no fast path
                self.fast = False
                warnings.warn(f"KV-prefix caching failed ({error}); using full forwards",
                              stacklevel=3)
            if not self.fast:
                self.kv = []

    def _give_up(self, why: str) -> None:
        if self.fast:
            warnings.warn(f"{why}; using full forwards", stacklevel=4)
        self.fast = False

    def __call__(self, index: Tensor, fn) -> Tensor:
        """Next-token logits ``[batch, d_vocab]`` with ``fn`` applied at the site of ``index``."""
        with edit_resid_pre(self.model, self.layer, fn, prompt_only=False):
            if not self.fast:
                return self.model(input_ids=self.ids[index],
                                  attention_mask=self.mask[index]).logits[:, -1, :]
            from transformers import DynamicCache

            cache = DynamicCache(ddp_cache_data=[(k[index], v[index]) for k, v in self.kv],
                                 config=self.model.config)
            return self.model(input_ids=self.ids[index, -1:], attention_mask=self.mask[index],
                              **{self.kwarg: cache}).logits[:, -1, :]


def _interchange(u: Tensor, h_source: Tensor):
    """The DAS edit at the site: ``h ← (I − uuᵀ)h + uuᵀ h_source`` (rows of ``[batch, d]``)."""
    def fn(h: Tensor) -> Tensor:
        return h + ((h_source.to(h.dtype) - h) @ u)[:, None] * u
    return fn


def _partners(data: IntentData, seed: int) -> list[int]:
    """For each item, another item whose context and prior answers both differ (seeded choice)."""
    n = len(data)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    partners = []
    for i in range(n):
        for j in order[i:] + order[:i]:
            if j != i and data.ctx_ids[j] != data.ctx_ids[i] and data.prior_ids[j] != data.prior_ids[i]:
                partners.append(j)
                break
        else:
            raise TaskError("source='other_item' needs items with different answers")
    return partners


def das_examples(data: IntentData, source: str = "same_item", seed: int = 0
                 ) -> tuple[list[str], Tensor, Tensor]:
    """(targets, source index, labels) for DAS: every prompt is a target; its source is the
    opposite-intent prompt (of the same item, or of a partner item) at ``targets[source[i]]``;
    the label is the target item's answer under the opposite intent."""
    n = len(data)
    targets = data.ctx_prompts + data.prior_prompts
    labels = torch.cat([data.prior_ids, data.ctx_ids])
    if source == "same_item":
        partner = list(range(n))
    elif source == "other_item":
        partner = _partners(data, seed)
    else:
        raise ValueError(f"source must be 'same_item' or 'other_item', got {source!r}")
    index = torch.tensor([n + j for j in partner] + partner)
    return targets, index, labels


def _das(model, tokenizer, data: IntentData, layer: int, *, epochs: int, batch_size: int,
         lr: float, seed: int, fast: bool, progress: bool, source: str = "same_item",
         init: Tensor | None = None, runner: _Targets | None = None
         ) -> tuple[Tensor, pd.DataFrame]:
    """Train a rank-1 DAS direction; returns (u, per-step history)."""
    targets, source_index, labels = das_examples(data, source, seed)
    runner = runner or _Targets(model, tokenizer, targets, layer, fast)
    h_source = runner.site[source_index]  # [m, d_model]: the sources are the targets, permuted
    generator = torch.Generator().manual_seed(seed)
    start = init.clone().double() if init is not None else torch.randn(
        d_model(model), generator=generator, dtype=torch.float64)
    weight = torch.nn.Parameter(start.float())
    optimizer = torch.optim.Adam([weight], lr=lr)
    grads = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    rows = []
    m = len(targets)
    steps = epochs * math.ceil(m / batch_size)
    try:
        with torch.enable_grad(), tqdm(total=steps, desc=f"DAS layer {layer}",
                                       disable=not progress) as bar:
            for epoch in range(epochs):
                order = torch.randperm(m, generator=generator)
                for begin in range(0, m, batch_size):
                    index = order[begin:begin + batch_size]
                    u = weight / weight.norm()
                    logits = runner(index, _interchange(u, h_source[index]))
                    loss = torch.nn.functional.cross_entropy(logits.float(), labels[index])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    flipped = float((logits.argmax(-1) == labels[index]).float().mean())
                    rows.append({"epoch": epoch, "step": len(rows), "loss": float(loss.detach()),
                                 "batch_interchange_acc": flipped})
                    bar.update(1)
    finally:
        for parameter, flag in zip(model.parameters(), grads):
            parameter.requires_grad_(flag)
    return (weight / weight.norm()).detach(), pd.DataFrame(rows)


@torch.no_grad()
def interchange_accuracy(model, tokenizer, data: IntentData, layer: int, direction: Tensor, *,
                         source: str = "same_item", seed: int = 0, fast: bool = True,
                         runner: _Targets | None = None) -> float:
    """Fraction of prompts whose answer flips to the other intent's when ``u·h`` is swapped in."""
    targets, source_index, labels = das_examples(data, source, seed)
    runner = runner or _Targets(model, tokenizer, targets, layer, fast)
    h_source = runner.site[source_index]
    u = direction.to(h_source.dtype)
    hits = []
    for begin in range(0, len(targets), 64):
        index = torch.arange(begin, min(begin + 64, len(targets)))
        hits.append(runner(index, _interchange(u, h_source[index])).argmax(-1) == labels[index])
    return float(torch.cat(hits).float().mean())


def correct_both_ways(model, tokenizer, data: IntentData, batch_size: int = 64) -> Tensor:
    """Boolean ``[n_items]``: the model answers the item right under both intents."""
    ctx = final_logits(model, tokenizer, data.ctx_prompts, batch_size).argmax(-1) == data.ctx_ids
    prior = final_logits(model, tokenizer, data.prior_prompts, batch_size).argmax(-1) == data.prior_ids
    return ctx & prior


def context_knob(
    model,
    task: Task,
    layer: int | None = None,
    method: str = "das",
    *,
    tokenizer=None,
    side: str = "finetuned",
    epochs: int = 1,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    fast: bool = True,
    source: str = "same_item",
    n: int | None = None,
    search: dict[str, Any] | None = None,
    progress: bool = True,
) -> ContextKnob:
    """Find the rank-1 context-sensitivity subspace of ``model`` on an intent task.

    ``model``: an HF model (+ ``tokenizer``) or a ModelPair (``side``, default the
    fine-tuned model). ``layer``: the block whose input residual holds the knob;
    ``None`` runs :func:`~interp.analysis.layer_search.layer_search` on the flip
    pairings (``search`` passes its options) and takes ``suggest_layer()``.
    ``method``: ``"das"`` (default; ``epochs``/``batch_size``/``lr`` as in the
    paper; ``source="same_item"`` takes the interchange source from the same
    item with the opposite intent, as the paper does, ``"other_item"`` from
    another item with the opposite intent — the paper code's ``same_query=False``,
    which also pins down directions the model ignores), ``"mean_diff"`` or ``"probe"``. Fitting uses the items the model
    answers right under both intents (all items if there are none), at most ``n``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    model, tokenizer = resolve_model(model, tokenizer, side)
    data = prepare_intent(task, tokenizer)
    search_result = None
    if layer is None:
        from interp.analysis.layer_search import layer_search

        search_result = layer_search(model, task, tokenizer=tokenizer, progress=progress,
                                     **(search or {}))
        layer = search_result.suggest_layer()
    check_layer(model, layer)
    correct = correct_both_ways(model, tokenizer, data)
    fit = data.subset(torch.nonzero(correct).flatten().tolist()) if bool(correct.any()) else data
    if n is not None:
        fit = fit.subset(range(min(n, len(fit))))
    runner = _Targets(model, tokenizer, das_examples(fit)[0], layer, fast)  # ctx | prior prompts
    h_ctx, h_prior = runner.site[:len(fit)], runner.site[len(fit):]
    if method == "mean_diff":
        direction, history = _mean_diff(h_ctx, h_prior), pd.DataFrame([{"step": 0, "n": len(fit)}])
    elif method == "probe":
        direction, history = _probe(h_ctx, h_prior, seed=seed), pd.DataFrame([{"step": 0,
                                                                               "n": len(fit)}])
    else:
        direction, history = _das(
            model, tokenizer, fit, layer, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
            fast=fast, progress=progress, source=source, runner=runner)
    direction = (direction.double() / direction.double().norm()).float()
    if float((h_ctx.double() @ direction.double()).mean()) < float(
            (h_prior.double() @ direction.double()).mean()):
        direction = -direction  # orient: larger u·h means "use the context"
    p_ctx, p_prior = h_ctx @ direction, h_prior @ direction
    interchange = interchange_accuracy(model, tokenizer, fit, layer, direction, seed=seed,
                                       runner=runner)
    auc, dprime = auc_and_dprime(p_ctx, p_prior)
    table = pd.DataFrame([
        {"intent": "ctx", "mean": float(p_ctx.mean()), "std": float(p_ctx.std()), "n": len(fit)},
        {"intent": "prior", "mean": float(p_prior.mean()), "std": float(p_prior.std()),
         "n": len(fit)},
    ])
    options = {"task": task.name, "method": method, "layer": layer,
               "layer_from": "given" if search_result is None else "layer_search",
               "search_ranges": None if search_result is None else search_result.ranges,
               "site": f"blocks.{layer}.hook_resid_pre, last token", "seed": seed,
               "n_items": len(fit), "n_task_items": len(data),
               "n_correct_both": int(correct.sum()),
               "n_shared_first_token": data.n_shared_first_token, "auc": auc,
               "d_prime": dprime, "dtype": "float32 (statistics in float64)"}
    if method == "das":
        options.update({"epochs": epochs, "batch_size": batch_size, "lr": lr, "fast": fast,
                        "source": source})
    return ContextKnob(table=table, options=options, direction=direction, layer=layer,
                       method=method, d_model=d_model(model), c_ctx=float(p_ctx.mean()),
                       c_prior=float(p_prior.mean()), interchange_accuracy=interchange,
                       history=history)
