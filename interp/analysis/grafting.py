"""Skill localization by grafting (methods.md §2; Panigrahi et al., ICML 2023).

A *graft* keeps the base model θ_pre and copies over only a tiny set of the
fine-tune's parameter changes: ``θ(γ) = θ_pre + γ ⊙ Δθ`` with a binary mask γ
over the entries of every *eligible* tensor (by default every tensor inside a
transformer block, norms and biases included; embeddings, final norm and
``lm_head`` excluded). :func:`skill_mask` learns γ:

1. **base patch** γ_base: exactly ``k = round(sparsity · N)`` entries with the
   largest ``|Δθ|``, one threshold across all eligible tensors, ties broken by
   position (the paper's repository compares ``> k-th value`` strictly and so
   keeps k − 1 or fewer);
2. **relaxation** ``γ = γ_base + (1 − 2γ_base) ⊙ σ(S − b)``, ``b = 10``, S drawn
   uniform in [0, 1) (seeded, rounded to float16 so the start is stored in half
   the memory) — so the relaxed model starts at the base patch;
3. **loss** the task's answer-token cross-entropy of ``θ(γ)``, evaluated with
   ``torch.func.functional_call`` on one set of grafted tensors that is
   rewritten in place each step (never a model copy); their gradients,
   accumulated over the batches, are chain-ruled to S once per step, in place
   (``∂L/∂S = ∂L/∂θ ⊙ Δθ ⊙ (1 − 2γ_base) ⊙ σ'(S − b)``);
4. **optimiser** plain full-batch SGD on S, one step per pass over the
   training prompts, as in the repository; its "very large lr" (1e7 there) is
   model-dependent, so by default the lr is set once, at the first step, to
   move the most-affected entry of S by ``b`` (then fixed);
5. **rounding** after every step a binary candidate is read off S and scored
   by train + validation accuracy (ties: lower loss); the best is kept.

Size of the learned mask: by default (``keep_size=True``) every candidate has
exactly k entries — the k entries the task loss pushed hardest toward "on"
(the change of their logit ``logit(γ)`` since initialisation; ties, e.g.
entries the loss never touched, go to the larger ``|Δθ|``, then position). So
graft, base patch and random mask are compared at the same size.
``keep_size=False`` rounds ``γ > 0.5`` as the repository does; the mask may
then drift from k, and ``GraftMask.sparsity`` reports the actual size.

For LoRA pairs the mask is over entries of the merged ``ΔW`` (the pair's
``model("finetuned")`` has the adapter merged). Evaluation, calibration and
overlap live in :mod:`interp.analysis.grafting_eval`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp.analysis.grafting_mask import GraftMask, mask_table
from interp.analysis.grafting_space import (
    SIGMOID_BIAS,
    GraftError,
    GraftSpace,
    MaskMismatchError,
    _describe_eligible,
    base_patch,
    check_sparsity,
    check_task,
    default_eligible,
    random_mask,
    top_k_mask,
)
from interp.errors import TaskError
from interp.tasks import Task, encode

__all__ = [
    "GraftError", "GraftMask", "GraftSpace", "MaskMismatchError", "base_patch", "check_sparsity",
    "check_task", "default_eligible", "graft", "random_mask", "skill_mask", "skill_masks",
    "top_k_mask",
]


# --------------------------------------------------------------------------- the relaxation


def relaxed_gamma(S: Tensor, patch: Tensor, bias: float = SIGMOID_BIAS) -> Tensor:
    """γ = γ_base + (1 − 2γ_base) ⊙ σ(S − b), same shape as S."""
    s = torch.sigmoid(S - bias)
    return torch.where(patch, 1.0 - s, s)


def relaxed_slope(S: Tensor, patch: Tensor, bias: float = SIGMOID_BIAS) -> Tensor:
    """∂γ/∂S = (1 − 2γ_base) ⊙ σ'(S − b): the chain-rule factor from a grafted weight to S."""
    s = torch.sigmoid(S - bias)
    slope = s * (1.0 - s)
    return torch.where(patch, -slope, slope)


@dataclasses.dataclass
class _Prompts:
    """Pre-tokenised batches (left-padded like :func:`interp.tasks.last_token_logits`)."""

    batches: list[tuple[Tensor, Tensor, Tensor]]  # (input_ids [b, pos], mask [b, pos], targets [b])
    n: int

    @classmethod
    def build(cls, tokenizer, task: Task, targets: Tensor, batch_size: int) -> _Prompts:
        batches = []
        for start in range(0, len(task), batch_size):
            ids, mask = encode(tokenizer, task.prompts[start : start + batch_size])
            batches.append((ids, mask, targets[start : start + batch_size]))
        return cls(batches, len(task))


def last_logits(model, params: dict[str, Tensor] | None, ids: Tensor, mask: Tensor) -> Tensor:
    """Next-token logits ``[batch, d_vocab]`` of ``model`` with ``params`` swapped in (no copy)."""
    kwargs = {"input_ids": ids, "attention_mask": mask, "logits_to_keep": 1}
    if params is None:
        out = model(**kwargs)
    else:
        out = torch.func.functional_call(model, params, args=(), kwargs=kwargs, strict=False)
    return out.logits[:, -1, :]


@torch.no_grad()
def score(model, params: dict[str, Tensor] | None, prompts: _Prompts) -> tuple[float, float]:
    """(accuracy, mean answer cross-entropy) over ``prompts``."""
    correct, loss = 0, 0.0
    for ids, mask, targets in prompts.batches:
        logits = last_logits(model, params, ids, mask).float()
        correct += int((logits.argmax(-1) == targets).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
    return correct / prompts.n, loss / prompts.n


def _split_task(task: Task, val_fraction: float, seed: int) -> tuple[Task, Task]:
    if not 0.0 < val_fraction < 1.0:
        raise GraftError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = torch.randperm(len(task), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = len(task) - max(1, round(val_fraction * len(task)))
    if cut < 1:
        raise TaskError(f"task {task.name!r} has {len(task)} prompts; grafting needs at least 2 "
                        "(train and validation)")
    return task.subset(sorted(order[:cut])), task.subset(sorted(order[cut:]))


def skill_mask(
    pair,
    task: Task,
    sparsity: float = 1e-4,
    steps: int = 30,
    lr: float | None = None,
    eligible: Any = None,
    seed: int = 0,
    *,
    keep_size: bool = True,
    sigmoid_bias: float = SIGMOID_BIAS,
    val_fraction: float = 0.25,
    n_prompts: int | None = 512,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
    space: GraftSpace | None = None,
    progress: bool = True,
) -> GraftMask:
    """Learn the sparse mask of fine-tuning changes that carries ``task`` (methods.md §2).

    ``task``'s first ``n_prompts`` items are split (seeded) into train and
    validation parts; S follows full-batch SGD on the train part for
    ``steps`` steps; after each step the binary candidate (exactly k entries
    unless ``keep_size=False``) is scored by train + validation accuracy and
    the best kept (step 0 is the base patch itself). ``lr=None`` picks the lr
    at step 1 so the largest update to S is ``sigmoid_bias``. ``eligible``:
    None (block tensors), a regex, a list of names/regexes, or a predicate on
    parameter names. ``space`` reuses a :class:`GraftSpace` already built for
    this pair and ``eligible``/``dtype``. Computation in ``dtype`` (float32
    by default; float64 where tiny Δθ need it).
    """
    if steps < 0:
        raise GraftError(f"steps must be ≥ 0, got {steps}")
    space = space or GraftSpace(pair, eligible, dtype)
    k = check_sparsity(sparsity, space.n)
    tokenizer = pair.tokenizer
    vocab = space.model.get_output_embeddings().weight.shape[0]
    if n_prompts is not None:
        task = task.subset(slice(0, n_prompts))
    train_task, val_task = _split_task(task, val_fraction, seed)
    train = _Prompts.build(tokenizer, train_task, check_task(tokenizer, train_task, vocab), batch_size)
    val = _Prompts.build(tokenizer, val_task, check_task(tokenizer, val_task, vocab), batch_size)

    patch = top_k_mask(space.delta.abs(), k)  # [N] bool

    def magnitude(index: Tensor) -> Tensor:
        return space.delta[index].abs()

    generator = torch.Generator().manual_seed(seed)
    # S0 uniform in [0, 1), kept in half precision (S starts exactly there) to save memory
    S0 = torch.rand(space.n, generator=generator, dtype=torch.float32).to(torch.float16)  # [N]
    S = S0.to(space.dtype)  # [N], updated in place through per-tensor views
    # one set of grafted tensors, rewritten in place every step: the model is never copied
    grafted = {n: space.base_params[n].detach().clone().requires_grad_(True) for n in space.names}
    parts = {n: (space.view(S, n), space.view(space.delta, n), space.view(patch, n))
             for n in space.names}

    def candidate() -> Tensor:
        if not keep_size:
            return (S > sigmoid_bias) ^ patch  # γ > 0.5
        # logit(γ) moved toward "on" since initialisation; ties -> larger |Δθ|, then index
        moved = S.clone()
        moved.sub_(S0)
        moved[patch] *= -1
        return top_k_mask(moved, k, secondary=magnitude)

    def write(values: dict[str, Tensor] | None, mask: Tensor | None) -> None:
        """Grafted tensors <- θ_pre + γ ⊙ Δθ (relaxed γ from S, or a binary ``mask``)."""
        with torch.no_grad():
            for name, (s_part, d_part, p_part) in parts.items():
                gamma = relaxed_gamma(s_part, p_part, sigmoid_bias) if mask is None else \
                    space.view(mask, name).to(space.dtype)
                torch.addcmul(space.base_params[name], gamma, d_part, out=values[name].data)

    rows = []
    previous: tuple[Tensor, tuple[float, float, float, float]] | None = None
    best: tuple[float, float] | None = None
    best_mask = patch
    current_lr = lr
    bar = tqdm(range(steps + 1), desc=f"graft {pair.label} s={sparsity:g}", disable=not progress,
               leave=False)
    for step in bar:
        relaxed_loss = float("nan")
        if step > 0:
            write(grafted, None)
            for value in grafted.values():
                value.grad = None
            relaxed_loss = 0.0
            for ids, mask, targets in train.batches:  # gradients accumulate on the grafted tensors
                logits = last_logits(space.model, grafted, ids, mask).float()
                loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / train.n
                loss.backward()
                relaxed_loss += loss.item()
            with torch.no_grad():  # chain rule to S, in place: grad_S = ∂L/∂θ ⊙ Δθ ⊙ ∂γ/∂S
                for name, (s_part, d_part, p_part) in parts.items():
                    grafted[name].grad.mul_(d_part).mul_(relaxed_slope(s_part, p_part, sigmoid_bias))
                if current_lr is None:
                    peak = max(float(v.grad.abs().max()) for v in grafted.values())
                    if peak == 0.0:
                        bar.close()
                        break  # the task loss does not depend on any eligible change
                    current_lr = sigmoid_bias / peak
                for name, (s_part, _, _) in parts.items():
                    s_part.sub_(grafted[name].grad, alpha=current_lr)
        mask_now = patch if step == 0 else candidate()
        if previous is not None and torch.equal(mask_now, previous[0]):
            train_acc, train_loss, val_acc, val_loss = previous[1]  # same mask: same scores
        else:
            write(grafted, mask_now)
            train_acc, train_loss = score(space.model, grafted, train)
            val_acc, val_loss = score(space.model, grafted, val)
        previous = (mask_now, (train_acc, train_loss, val_acc, val_loss))
        key = (train_acc + val_acc, -(train_loss * train.n + val_loss * val.n) / (train.n + val.n))
        improved = best is None or key > best
        if improved:
            best, best_mask = key, mask_now
        n_on = int(torch.count_nonzero((S > sigmoid_bias) ^ patch))  # γ > 0.5
        rows.append({"step": step, "relaxed_loss": relaxed_loss, "train_accuracy": train_acc,
                     "val_accuracy": val_acc, "train_loss": train_loss, "val_loss": val_loss,
                     "candidate_size": int(torch.count_nonzero(mask_now)), "relaxed_on": n_on,
                     "base_patch_kept": int(torch.count_nonzero(mask_now & patch)), "best": improved,
                     "lr": float("nan") if current_lr is None else float(current_lr)})
        bar.set_postfix(train=f"{train_acc:.3f}", val=f"{val_acc:.3f}")
    history = pd.DataFrame(rows)
    # "best" marks each new best; keep only the final one flagged
    final = int(history.index[history["best"]][-1])
    history["best"] = history.index == final
    indices = space.to_indices(best_mask)
    provenance = {
        "label": pair.label, "method": pair.method, "lora_rank": pair.lora_rank,
        "lora_alpha": pair.lora_alpha, "rslora": pair.rslora, "task": pair.task,
        "model_type": pair.config.get("model_type"), "fingerprint": space.fingerprint,
    }
    options = {
        "task": task.name, "sparsity": float(sparsity), "k": k, "n_eligible": space.n,
        "actual_sparsity": int(torch.count_nonzero(best_mask)) / space.n, "steps": steps, "lr": lr,
        "lr_used": None if current_lr is None else float(current_lr), "eligible":
        _describe_eligible(eligible), "seed": seed, "keep_size": keep_size,
        "sigmoid_bias": sigmoid_bias, "val_fraction": val_fraction, "n_train": train.n,
        "n_val": val.n, "batch_size": batch_size, "dtype": str(dtype),
        "best_step": int(history.loc[final, "step"]),
        "base_patch_kept": int(torch.count_nonzero(best_mask & patch)),
        "delta_nonzero": int(torch.count_nonzero(space.delta)),
    }
    return GraftMask(table=mask_table(space.names, space.shapes, indices), options=options,
                     indices=indices, shapes=dict(space.shapes), provenance=provenance,
                     history=history)


def skill_masks(pair, task: Task, sparsities: Sequence[float], **options: Any) -> list[GraftMask]:
    """:func:`skill_mask` at each sparsity, sharing one :class:`GraftSpace` (models loaded once)."""
    space = options.pop("space", None) or GraftSpace(pair, options.get("eligible"),
                                                      options.get("dtype", torch.float32))
    return [skill_mask(pair, task, sparsity=s, space=space, **options) for s in sparsities]


def graft(pair, mask: GraftMask, *, strict: bool = True, dtype: torch.dtype = torch.float32,
          space: GraftSpace | None = None):
    """A fresh Hugging Face model: the pair's base plus the fine-tune's changes at ``mask``'s entries.

    Raises :class:`MaskMismatchError` if the mask was learned on another pair
    (names, shapes, or — with ``strict`` — the weights' fingerprint differ).
    """
    space = space or GraftSpace(pair, list(mask.shapes), dtype)
    mask.check_fits(space, strict=strict)
    return space.graft_model(space.from_indices(mask.indices))
