"""The index space of a graft: eligible tensors, Δθ flattened, and masks over it.

:class:`GraftSpace` holds a pair's base model and ``Δθ = θ_ft − θ_pre`` over
the *eligible* tensors (default: every tensor inside a numbered transformer
block, norms and biases included; embeddings, final norm and ``lm_head``
excluded) as one flat vector of N entries. Masks are bool ``[N]`` vectors;
:func:`top_k_mask` selects exactly k entries with deterministic tie-breaking.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from interp.errors import GraftError, MaskMismatchError, TaskError
from interp.tasks import Task, first_token_ids

SIGMOID_BIAS = 10.0
_BLOCK_RE = re.compile(r"\.(\d+)\.")


# --------------------------------------------------------------------------- eligible tensors


def default_eligible(name: str) -> bool:
    """Every parameter inside a numbered transformer block (``model.layers.3.…``, ``transformer.h.3.…``)."""
    return _BLOCK_RE.search(name) is not None


def _eligible_predicate(eligible: Any) -> Callable[[str], bool]:
    """None -> block tensors; a callable; a regex (searched); or a list of names/regexes."""
    if eligible is None:
        return default_eligible
    if callable(eligible):
        return eligible
    if isinstance(eligible, str):
        pattern = re.compile(eligible)
        return lambda name: pattern.search(name) is not None
    names = list(eligible)
    exact = set(names)
    patterns = [re.compile(p) for p in names]
    return lambda name: name in exact or any(p.fullmatch(name) for p in patterns)


def _describe_eligible(eligible: Any) -> Any:
    if eligible is None:
        return "transformer-block tensors (default)"
    if callable(eligible):
        return getattr(eligible, "__name__", "callable")
    return eligible if isinstance(eligible, str) else list(eligible)


def module_of(name: str) -> tuple[int, str, str]:
    """``(layer, module, kind)`` of a parameter name; module is q/k/v/o/gate/up/down/norm/qkv/other.

    ``qkv`` is GPT-2's fused ``c_attn``; :func:`entry_modules` splits it per entry.
    """
    match = _BLOCK_RE.search(name)
    layer = int(match.group(1)) if match else -1
    kind = "bias" if name.endswith(".bias") else "weight"
    for pattern, module in (
        (r"(q|k|v|o)_proj\.", None), (r"(gate|up|down)_proj\.", None),
        (r"attn\.c_attn\.", "qkv"), (r"attn\.c_proj\.", "o"), (r"mlp\.c_fc\.", "up"),
        (r"mlp\.c_proj\.", "down"), (r"(norm|ln_\d|layernorm)", "norm"),
    ):
        found = re.search(pattern, name)
        if found:
            return layer, module or found.group(1), kind
    return layer, "other", kind


def entry_modules(name: str, shape: Sequence[int], flat: Tensor) -> list[str]:
    """Module of each selected entry ``flat`` (flat indices) of tensor ``name``."""
    _, module, _ = module_of(name)
    if module != "qkv":
        return [module] * len(flat)
    width = shape[-1] // 3  # Conv1D weight [d_in, 3d] or bias [3d]
    parts = (flat % shape[-1]) // width
    return [("q", "k", "v")[int(p)] for p in parts]


# --------------------------------------------------------------------------- the flattened space


class GraftSpace:
    """The eligible tensors of a pair, flattened into one index space of N entries.

    Holds a fresh base model (θ_pre lives in its parameters), ``delta`` =
    ``θ_ft − θ_pre`` as one flat vector ``[N]`` in ``dtype``, and each
    tensor's name, shape and offset. The fine-tuned model is loaded once to
    take the difference and dropped.
    """

    def __init__(self, pair, eligible: Any = None, dtype: torch.dtype = torch.float32):
        self.pair = pair
        self.dtype = dtype
        self.model = pair.model("base", dtype=dtype)
        self.model.requires_grad_(False)
        predicate = _eligible_predicate(eligible)
        base = dict(self.model.named_parameters())
        self.names: list[str] = [n for n in base if predicate(n)]
        if not self.names:
            raise GraftError(
                f"no parameter of {pair.label!r} is eligible under {_describe_eligible(eligible)!r}; "
                f"parameter names look like {list(base)[:3]}"
            )
        self.shapes: dict[str, list[int]] = {n: list(base[n].shape) for n in self.names}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name in self.names:
            self.offsets[name] = offset
            offset += base[name].numel()
        self.n = offset
        self.delta: Tensor = torch.empty(self.n, dtype=dtype)  # [N], filled tensor by tensor
        finetuned = dict(pair.model("finetuned", dtype=dtype).named_parameters())
        for name in self.names:
            if name not in finetuned or finetuned[name].shape != base[name].shape:
                raise MaskMismatchError(f"the fine-tuned side of {pair.label!r} has no tensor {name!r} "
                                        f"of shape {self.shapes[name]}")
            torch.sub(finetuned[name].detach(), base[name].detach(), out=self.view(self.delta, name))
        del finetuned
        self.base_params = {n: base[n] for n in self.names}
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        """sha256 over names, shapes, θ_pre and Δθ (float32 bytes): which pair a mask belongs to."""
        digest = hashlib.sha256()
        for name in self.names:
            digest.update(f"{name}:{self.shapes[name]};".encode())
            digest.update(self.base_params[name].detach().float().numpy().tobytes())
            digest.update(self.view(self.delta, name).float().numpy().tobytes())
        return digest.hexdigest()[:24]

    def view(self, flat: Tensor, name: str) -> Tensor:
        """The slice of a flat ``[N]`` vector belonging to tensor ``name``, in its shape."""
        start = self.offsets[name]
        size = int(np.prod(self.shapes[name])) if self.shapes[name] else 1
        return flat[start : start + size].view(self.shapes[name])

    def grafted(self, mask: Tensor) -> dict[str, Tensor]:
        """``θ_pre + mask ⊙ Δθ`` per eligible tensor, for a 0/1 (or fractional) mask ``[N]``."""
        mask = mask.to(self.dtype)
        return {n: self.base_params[n] + self.view(mask, n) * self.view(self.delta, n)
                for n in self.names}

    def graft_model(self, mask: Tensor):
        """A fresh copy of the base model with ``mask ⊙ Δθ`` added (eval mode)."""
        model = self.pair.model("base", dtype=self.dtype)
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.grafted(mask).items():
                parameters[name].copy_(value)
        return model.eval()

    def to_indices(self, mask: Tensor) -> dict[str, Tensor]:
        """Bool ``[N]`` -> {tensor name: sorted flat int64 indices} for tensors with a selected entry."""
        out = {}
        for name in self.names:
            selected = torch.nonzero(self.view(mask, name).reshape(-1)).reshape(-1)
            if len(selected):
                out[name] = selected.to(torch.int64)
        return out

    def from_indices(self, indices: dict[str, Tensor]) -> Tensor:
        """Inverse of :meth:`to_indices`: bool ``[N]``."""
        mask = torch.zeros(self.n, dtype=torch.bool)
        for name, flat in indices.items():
            mask[self.offsets[name] + flat.long()] = True
        return mask


# --------------------------------------------------------------------------- masks


def kth_largest(scores: Tensor, k: int, chunk: int = 1 << 20) -> Tensor:
    """The k-th largest value of a flat tensor, in chunks.

    ``torch.topk`` on CPU builds a (value, index) array of the whole input —
    16 bytes per entry, 2 GB for a 135M-entry model — so the top k are kept
    chunk by chunk instead (memory O(k + chunk)); the result is exact.
    """
    kept = scores.new_empty(0)
    for start in range(0, scores.numel(), chunk):
        piece = scores[start : start + chunk]
        kept = torch.cat([kept, torch.topk(piece, min(k, piece.numel()), sorted=False).values])
        if kept.numel() > k:
            kept = torch.topk(kept, k, sorted=False).values
    return kept.min()


def top_k_mask(scores: Tensor, k: int,
               secondary: Tensor | Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Bool ``[N]`` with exactly ``k`` True at the largest ``scores``.

    Ties at the threshold go to larger ``secondary`` (a tensor ``[N]``, or a
    function of the tied indices, so it need not exist for all N), then to
    lower index — deterministic, and never k − 1 (the strict-``>`` bug).
    """
    n = scores.numel()
    if not 0 <= k <= n:
        raise GraftError(f"cannot select {k} of {n} entries")
    mask = torch.zeros(n, dtype=torch.bool)
    if k == 0:
        return mask
    threshold = kth_largest(scores, k)
    above = scores > threshold
    mask |= above
    need = k - int(torch.count_nonzero(above))
    tied = torch.nonzero(scores == threshold).reshape(-1)  # ascending index
    if secondary is not None and need < len(tied):
        values = secondary(tied) if callable(secondary) else secondary[tied]
        order = torch.sort(values, descending=True, stable=True).indices
        tied = tied[order]
    mask[tied[:need]] = True
    return mask


def base_patch(space: GraftSpace, k: int) -> Tensor:
    """The k entries with the largest ``|Δθ|`` (global threshold): bool ``[N]``."""
    return top_k_mask(space.delta.abs(), k)


def random_mask(space: GraftSpace, k: int, seed: int = 0) -> Tensor:
    """k entries drawn uniformly without replacement from all N eligible entries: bool ``[N]``."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    seen: set[int] = set()
    while len(chosen) < k:
        for value in rng.integers(0, space.n, size=2 * (k - len(chosen)) + 8).tolist():
            if value not in seen:
                seen.add(value)
                chosen.append(value)
                if len(chosen) == k:
                    break
    mask = torch.zeros(space.n, dtype=torch.bool)
    mask[torch.tensor(chosen, dtype=torch.long)] = True
    return mask


def check_sparsity(sparsity: float, n: int) -> int:
    """k = round(sparsity · n), after checking 0 < sparsity < 1 and 1 ≤ k < n."""
    if not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise GraftError(f"sparsity must be a fraction in (0, 1), got {sparsity!r} "
                         "(1e-4 keeps 0.01% of the eligible entries)")
    k = round(float(sparsity) * n)
    if k < 1:
        raise GraftError(f"sparsity {sparsity:g} of {n} eligible entries selects no entry; "
                         f"use at least {1 / n:.2g}")
    if k >= n:
        raise GraftError(f"sparsity {sparsity:g} selects all {n} eligible entries")
    return k


def check_task(tokenizer, task: Task, vocab_size: int | None = None) -> Tensor:
    """Answer-token ids ``[n]``, after checking the tokenizer can write every prompt and answer."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = first_token_ids(tokenizer, task.answers)
    if unk is not None:
        bad = [a for a, i in zip(task.answers, ids.tolist()) if i == unk]
        if bad:
            raise TaskError(
                f"task {task.name!r}: {len(bad)} of {len(task)} answers map to the unknown token "
                f"{tokenizer.unk_token!r} (e.g. {bad[:3]}); the model cannot produce them. "
                "Is the task written for this tokenizer?"
            )
        for prompt in task.prompts:
            if unk in tokenizer(prompt)["input_ids"]:
                raise TaskError(f"task {task.name!r}: prompt {prompt!r} contains words the tokenizer "
                                f"maps to {tokenizer.unk_token!r}; the model cannot read it")
    if vocab_size is not None and int(ids.max()) >= vocab_size:
        raise TaskError(f"task {task.name!r}: answer token id {int(ids.max())} is outside the "
                        f"model's vocabulary of {vocab_size}")
    return ids
