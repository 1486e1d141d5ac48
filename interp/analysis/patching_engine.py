"""The batched forward machinery behind :func:`interp.patch` (Llama-family models).

Why not hooks on a TransformerLens bridge? A hook can replace an activation
but cannot skip the work around it: every patched run would recompute the
layers below the patch, the positions before it and the unembedding at every
position. This engine drives the Hugging Face modules (``q_proj``, ``mlp``,
the RMS norms, the rotary embedding) block by block itself, so that

* many **variants** (one patch site, or a set of sites, each) share one batch:
  rows are ``variant × item``, variant-major;
* a variant **joins the batch where its first patch is** (a "staircase"):
  before that point its rows equal the target run, so they start from the
  target's cached residual / head outputs at that layer and stage;
* a row holds only the positions from its first patched position on
  (**packed** rows: every position-wise module runs on all rows' tokens as one
  matrix, nothing is padded); earlier positions' keys and values come from
  the target's cache, since a causal model cannot see a later patch there;
* at the last layer only the last position is pushed through the query,
  output projection, MLP, final norm and unembedding — the metric reads
  nothing else.

Attention (RoPE, grouped-query attention, causal softmax) is written out here,
eagerly and in the same order as the TransformerLens bridge; everything with
weights is the model's own module, so LoRA-merged or biased projections need
nothing special. Patched runs equal a bridge reference
(:mod:`interp.analysis.patching_reference`) to float32 rounding (~1e-6).

Shapes: ``N`` items of one token length ``T``; ``R`` rows; ``P`` packed
tokens; ``d`` model width; ``H``/``KV`` query/key-value heads of width ``dh``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from interp.errors import InterpError, UnsupportedArchitectureError

#: Where a patch acts inside block ``l``, in forward order.
STAGES = {"resid_pre": 0, "q_in": 0, "k_in": 0, "v_in": 0, "z": 1, "attn_out": 2, "mlp_out": 3}
#: Kinds that replace an activation with a stored value; the ``*_in`` kinds add a delta instead.
REPLACE_KINDS = ("resid_pre", "z", "attn_out", "mlp_out")
INPUT_KINDS = ("q_in", "k_in", "v_in")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class Op:
    """One intervention in a variant.

    ``kind``: a :data:`STAGES` key. ``head``: the query head (``z`` and ``*_in``
    kinds), else None. ``pos``: absolute position per item, ``[N]`` long
    tensor, or None for every position. ``value``: name of the value source;
    replace kinds read ``values[(value, kind, layer)]`` (``[N, T, d]``, or
    ``[N, T, H, dh]`` for ``z``); ``*_in`` kinds add ``values[(value, "delta",
    layer)]`` (``[N, T, d]``) to the residual that head reads, before its norm.
    """

    kind: str
    layer: int
    head: int | None = None
    pos: Tensor | None = None
    value: str = "source"

    def join_point(self) -> tuple[int, int]:
        return (self.layer, STAGES[self.kind])


def _join(variant: Sequence[Op]) -> tuple[int, int]:
    return min(op.join_point() for op in variant)


def start_position(variant: Sequence[Op], values: Mapping | None = None) -> int:
    """Earliest absolute position any op of ``variant`` touches (0 if one touches every position).

    For ``*_in`` ops the delta's first non-zero position counts (a delta that is
    zero early on leaves those positions alone).
    """
    start = None
    for op in variant:
        if op.kind in INPUT_KINDS and op.pos is None and values is not None:
            delta = values[(op.value, "delta", op.layer)]
            nonzero = delta.abs().amax(dim=(0, 2)).nonzero()
            first = int(nonzero[0]) if len(nonzero) else delta.shape[1] - 1
        elif op.pos is None:
            first = 0
        else:
            first = int(op.pos.min())
        start = first if start is None else min(start, first)
    return 0 if start is None else start


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x`` ``[R, heads, S, dh]`` with ``cos``/``sin`` ``[S, dh]``."""
    return x * cos + _rotate_half(x) * sin


def hf_model_of(model):
    """The Hugging Face model inside ``model`` (itself, or a bridge's ``original_model``)."""
    inner = getattr(model, "original_model", None)
    return inner if inner is not None and hasattr(inner, "config") else model


def supports(model) -> str | None:
    """None if :class:`LlamaRunner` can drive ``model``, else the reason it cannot."""
    model = hf_model_of(model)
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        return f"model_type {kind!r} is not one of {SUPPORTED_MODEL_TYPES}"
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model, "lm_head"):
        return "no model.model.layers / lm_head"
    attn = layers[0].self_attn
    if any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
        return "attention with q/k norms"
    if getattr(config, "use_sliding_window", False) or (
        kind == "mistral" and getattr(config, "sliding_window", None)
    ):
        return "sliding-window attention"
    return None


class LlamaRunner:
    """Block-by-block forward of a Llama-family causal LM, with capture and batched patching."""

    def __init__(self, model):
        model = hf_model_of(model)
        reason = supports(model)
        if reason is not None:
            raise UnsupportedArchitectureError(
                f"the batched patching engine drives Llama-family models only ({reason}); "
                "pass engine='reference' to patch through TransformerLens hooks instead"
            )
        self.model = model.eval()
        config = model.config
        self.layers = list(model.model.layers[: config.num_hidden_layers])
        self.n_layers = len(self.layers)
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.d_model = config.hidden_size
        self.d_head = getattr(config, "head_dim", None) or self.d_model // self.n_heads
        self.scale = self.layers[0].self_attn.scaling
        self.dtype = next(model.parameters()).dtype
        self._rope: dict[int, tuple[Tensor, Tensor]] = {}
        self._gated_silu = _is_gated_silu(self.layers[0].mlp, config)

    # ------------------------------------------------------------------ pieces
    def rope(self, length: int) -> tuple[Tensor, Tensor]:
        """``cos``, ``sin`` ``[length, dh]`` from the model's own rotary module."""
        if length not in self._rope:
            probe = torch.zeros(1, length, self.d_model, dtype=self.dtype)
            positions = torch.arange(length).unsqueeze(0)
            cos, sin = self.model.model.rotary_emb(probe, position_ids=positions)
            self._rope[length] = (cos[0], sin[0])
        return self._rope[length]

    def _heads(self, x: Tensor, n: int) -> Tensor:
        """``[R, S, n·dh]`` -> ``[R, n, S, dh]``."""
        return x.view(x.shape[0], x.shape[1], n, self.d_head).transpose(1, 2)

    def qkv(self, layer: int, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated q ``[R, H, S, dh]``, k and v ``[R, KV, S, dh]`` from normed input ``x`` ``[R, S, d]``."""
        attn = self.layers[layer].self_attn
        q = _rope(self._heads(attn.q_proj(x), self.n_heads), cos, sin)
        k = _rope(self._heads(attn.k_proj(x), self.n_kv), cos, sin)
        v = self._heads(attn.v_proj(x), self.n_kv)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, first_query: int) -> Tensor:
        """Causal attention of queries at ``first_query…`` over keys ``0…``; returns z ``[R, Sq, H, dh]``.

        Eager, in the TransformerLens bridge's order (scores · scale, mask with
        the dtype's minimum, softmax in float32 — float64 for float64 runs —,
        weights @ V), so patched runs match a bridge reference to float rounding.
        """
        rows, n_q, n_k = q.shape[0], q.shape[2], k.shape[2]
        group = self.n_heads // self.n_kv  # grouped-query attention: a kv head's queries side by side
        q = q.reshape(rows, self.n_kv, group * n_q, self.d_head)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale  # [R, KV, G·Sq, T]
        query_pos = torch.arange(first_query, first_query + n_q).unsqueeze(1)
        hidden = torch.arange(n_k).unsqueeze(0) > query_pos
        scores = scores.view(rows, self.n_kv, group, n_q, n_k).masked_fill(hidden, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
        z = torch.matmul(weights.to(q.dtype).view(rows, self.n_kv, group * n_q, n_k), v)
        return z.view(rows, self.n_heads, n_q, self.d_head).transpose(1, 2)

    def o_proj(self, layer: int, z: Tensor) -> Tensor:
        return self.layers[layer].self_attn.o_proj(z.reshape(z.shape[0], z.shape[1], self.n_heads * self.d_head))

    def mlp(self, layer: int, h: Tensor) -> Tensor:
        """MLP output of block ``layer`` for the residual ``h`` (its norm applied first)."""
        block = self.layers[layer]
        x = block.post_attention_layernorm(h)
        mlp = block.mlp
        if not self._gated_silu:
            return mlp(x)
        # The model's own gated-SiLU MLP, with the activation and gating in place: the same
        # numbers as mlp(x) without two [tokens, d_mlp] temporaries (~10% of a large batch).
        gate = mlp.gate_proj(x)
        torch.nn.functional.silu(gate, inplace=True)
        return mlp.down_proj(gate.mul_(mlp.up_proj(x)))

    def to_logits(self, h_last: Tensor) -> Tensor:
        """Logits ``[R, vocab]`` from what :meth:`run_variants` returns (last-position residuals)."""
        return self.unembed(h_last)

    def unembed(self, h_last: Tensor) -> Tensor:
        """Logits ``[R, vocab]`` from last-position residuals ``[R, d]``."""
        return self.model.lm_head(self.model.model.norm(h_last))

    def token_logits(self, h_last: Tensor, tokens: Tensor) -> Tensor:
        """Logits of chosen tokens only, ``[R, t]``, from residuals ``[R, d]`` and ids ``[R, t]``.

        The unembedding restricted to the rows a metric reads (a logit
        difference reads two of SmolLM2's 49,152): the same numbers as
        :meth:`unembed` followed by a gather, to float rounding.
        """
        head = self.model.lm_head
        normed = self.model.model.norm(h_last)  # [R, d]
        logits = torch.einsum("rd,rtd->rt", normed, head.weight[tokens].to(normed.dtype))
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[tokens]
        return logits

    # ------------------------------------------------------------------ plain forward
    @torch.no_grad()
    def forward(self, ids: Tensor, capture: set[tuple[str, int]] = frozenset()) -> tuple[dict, Tensor]:
        """Run ``ids`` ``[N, T]``; return captured activations and last-position logits ``[N, vocab]``.

        ``capture`` names ``(kind, layer)`` with kind in ``resid_pre``, ``z``,
        ``attn_out``, ``resid_mid``, ``mlp_out``, ``k``, ``v`` (rotated keys,
        ``[N, KV, T, dh]``), ``final`` (residual at the last position before
        the final norm, ``[N, d]``; layer -1).
        """
        cos, sin = self.rope(ids.shape[1])
        h = self.model.model.embed_tokens(ids)
        out: dict[tuple[str, int], Tensor] = {}
        for layer in range(self.n_layers):
            block = self.layers[layer]
            if ("resid_pre", layer) in capture:
                out[("resid_pre", layer)] = h
            q, k, v = self.qkv(layer, block.input_layernorm(h), cos, sin)
            if ("k", layer) in capture:
                out[("k", layer)] = k
                out[("v", layer)] = v
            z = self.attend(q, k, v, 0)
            if ("z", layer) in capture:
                out[("z", layer)] = z
            attn = self.o_proj(layer, z)
            if ("attn_out", layer) in capture:
                out[("attn_out", layer)] = attn
            h = h + attn
            if ("resid_mid", layer) in capture:
                out[("resid_mid", layer)] = h
            m = self.mlp(layer, h)
            if ("mlp_out", layer) in capture:
                out[("mlp_out", layer)] = m
            h = h + m
        out[("final", -1)] = h[:, -1]
        return out, self.unembed(h[:, -1])

    # ------------------------------------------------------------------ patched forward
    @staticmethod
    def target_capture(variants: Sequence[Sequence[Op]], n_layers: int) -> set[tuple[str, int]]:
        """What the target run must cache for these variants to join and skip work."""
        first = min(_join(v)[0] for v in variants)
        need = set()
        for layer in range(first, n_layers):
            need |= {("resid_pre", layer), ("k", layer), ("v", layer), ("z", layer),
                     ("attn_out", layer), ("resid_mid", layer), ("mlp_out", layer)}
        return need

    @torch.no_grad()
    def run_variants(
        self,
        variants: Sequence[Sequence[Op]],
        target: Mapping[tuple[str, int], Tensor],
        values: Mapping[tuple[str, str, int], Tensor],
        length: int,
    ) -> Tensor:
        """Last-position residuals ``[V, N, d]`` (before the final norm) of the target run with each
        variant's ops applied; :meth:`to_logits` turns them into logits.

        ``target``: the target run's cache (:meth:`target_capture` keys) for
        ``N`` items of token length ``length``. ``values``: what replace ops
        copy in and ``*_in`` ops add (see :class:`Op`).

        Rows (variant × item) are *packed*: a row holds only the positions from
        its variant's start on, and every position-wise module (norms,
        projections, MLP) runs on all rows' tokens at once as one ``[P, d]``
        matrix; only attention regroups them per row, with the positions before
        a row's start taken from the target's cached keys and values.
        """
        n_items = next(iter(target.values())).shape[0]
        order = sorted(range(len(variants)), key=lambda i: _join(variants[i]))
        ordered = [variants[i] for i in order]
        joins = [_join(v) for v in ordered]
        pack = _Packing(n_items, length, [start_position(v, values) for v in ordered])
        ops = _ops_by_point(ordered)
        h = torch.empty(0, self.d_model, dtype=self.dtype)
        for layer in range(joins[0][0], self.n_layers):
            block = self.layers[layer]
            is_last = layer == self.n_layers - 1
            # residual stream entering the block: join, patch, attention for every row so far
            take = pack.add([k for k, j in enumerate(joins) if j == (layer, 0)])
            h = torch.cat([h, _gather(target[("resid_pre", layer)], take)])
            pack.apply(h, ops.get(("resid_pre", layer), ()), values)
            if pack.n_rows:
                z = self._attention(layer, block, h, pack, ops, values, target, is_last)
            else:
                z = torch.empty(0, self.n_heads, self.d_head, dtype=self.dtype)
            if is_last:  # nothing but the last position matters from here on
                h = h[pack.last_tokens()]
                pack.keep_last()
            # head outputs, attention output, MLP output: join, patch, go on
            take = pack.add([k for k, j in enumerate(joins) if j == (layer, 1)])
            z = torch.cat([z, _gather(target[("z", layer)], take)])
            h = torch.cat([h, _gather(target[("resid_pre", layer)], take)])
            pack.apply(z, ops.get(("z", layer), ()), values)
            attn = block.self_attn.o_proj(z.reshape(len(z), self.n_heads * self.d_head))
            take = pack.add([k for k, j in enumerate(joins) if j == (layer, 2)])
            attn = torch.cat([attn, _gather(target[("attn_out", layer)], take)])
            h = torch.cat([h, _gather(target[("resid_pre", layer)], take)])
            pack.apply(attn, ops.get(("attn_out", layer), ()), values)
            h = h + attn
            m = self.mlp(layer, h)
            take = pack.add([k for k, j in enumerate(joins) if j == (layer, 3)])
            m = torch.cat([m, _gather(target[("mlp_out", layer)], take)])
            h = torch.cat([h, _gather(target[("resid_mid", layer)], take)])
            pack.apply(m, ops.get(("mlp_out", layer), ()), values)
            h = h + m
        out = torch.empty(len(variants), n_items, self.d_model, dtype=self.dtype)
        out[order] = h.reshape(len(variants), n_items, self.d_model)
        return out

    def _attention(self, layer, block, h, pack: _Packing, ops, values, target, is_last) -> Tensor:
        """Head outputs ``[P, H, dh]`` (``[R, H, dh]`` at the last layer) for packed residuals ``h``."""
        attn = block.self_attn
        x = block.input_layernorm(h)
        cos_all, sin_all = self.rope(pack.length)
        cos, sin = cos_all[pack.tok_pos][:, None], sin_all[pack.tok_pos][:, None]
        k = _rope(attn.k_proj(x).view(len(x), self.n_kv, self.d_head), cos, sin)
        v = attn.v_proj(x).view(len(x), self.n_kv, self.d_head)
        queries = pack.last_tokens() if is_last else slice(None)
        q = _rope(attn.q_proj(x[queries]).view(-1, self.n_heads, self.d_head), cos[queries], sin[queries])
        receivers = [(k_, op) for k_, op in ops.get(("inputs", layer), ()) if k_ < pack.n_variants]
        if receivers:
            self._patch_inputs(layer, block, h, q, k, v, pack, receivers, values, cos, sin, is_last)
        rows = pack.n_rows
        keys = target[("k", layer)][pack.row_item].clone()  # [R, KV, T, dh]: target's, then ours
        vals = target[("v", layer)][pack.row_item].clone()
        keys[pack.tok_row, :, pack.tok_pos] = k
        vals[pack.tok_row, :, pack.tok_pos] = v
        if is_last:
            return self.attend(q.view(rows, self.n_heads, 1, self.d_head), keys, vals, pack.length - 1)[:, 0]
        first = int(pack.row_start.min())
        grid = torch.zeros(rows, self.n_heads, pack.length - first, self.d_head, dtype=q.dtype)
        grid[pack.tok_row, :, pack.tok_pos - first] = q
        z = self.attend(grid, keys, vals, first)  # [R, Sq, H, dh]; rows' early slots unused
        return z[pack.tok_row, pack.tok_pos - first]

    def _patch_inputs(self, layer, block, h, q, k, v, pack, receivers, values, cos, sin, is_last) -> None:
        """Path-patching receivers: a head's q/k/v recomputed from its residual plus a sender's delta."""
        if any(op.kind != "q_in" for _, op in receivers) and self.n_kv != self.n_heads:
            raise InterpError(
                "k/v receivers need one key-value head per query head; this model uses grouped-"
                f"query attention ({self.n_heads} query heads share {self.n_kv} kv heads), so "
                "patch receivers' queries (channel='q') instead"
            )
        attn = block.self_attn
        for k_ in sorted({k_ for k_, _ in receivers}):
            mine = [op for kk, op in receivers if kk == k_]
            names = {op.value for op in mine}
            if len(names) != 1:
                raise InterpError(f"a variant adds {len(names)} different deltas at layer {layer}; "
                                  "give its receivers one summed delta")
            tokens = pack.tokens_of(k_)
            delta = values[(names.pop(), "delta", layer)][pack.tok_item[tokens], pack.tok_pos[tokens]]
            x = block.input_layernorm(h[tokens] + delta.to(h.dtype))
            c, s_ = cos[tokens], sin[tokens]
            for op in mine:
                if op.kind == "q_in" and is_last:  # queries exist for the last position only
                    last = pack.last_of(tokens)
                    q2 = _rope(attn.q_proj(x[last]).view(-1, self.n_heads, self.d_head), c[last], s_[last])
                    q[pack.rows_of(k_), op.head] = q2[:, op.head]
                elif op.kind == "q_in":
                    q2 = _rope(attn.q_proj(x).view(-1, self.n_heads, self.d_head), c, s_)
                    q[tokens, op.head] = q2[:, op.head]
                elif op.kind == "k_in":
                    k2 = _rope(attn.k_proj(x).view(-1, self.n_kv, self.d_head), c, s_)
                    k[tokens, op.head] = k2[:, op.head]
                else:
                    v2 = attn.v_proj(x).view(-1, self.n_kv, self.d_head)
                    v[tokens, op.head] = v2[:, op.head]


def _is_gated_silu(mlp, config) -> bool:
    """Whether ``mlp`` computes ``down(silu(gate(x)) * up(x))`` as Llama's does (then
    :meth:`LlamaRunner.mlp` may run it in place); anything else runs as the module itself."""
    plain = type(mlp).forward in _gated_silu_forwards()
    linear = all(isinstance(getattr(mlp, n, None), torch.nn.Linear)
                 for n in ("gate_proj", "up_proj", "down_proj"))
    return plain and linear and getattr(config, "hidden_act", None) in ("silu", "swish")


def _gated_silu_forwards() -> tuple:
    """``forward`` of the transformers MLP classes known to be the plain gated-SiLU form."""
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.mistral.modeling_mistral import MistralMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    return tuple({cls.forward for cls in (LlamaMLP, MistralMLP, Qwen2MLP)})


def _gather(cache: Tensor, take: tuple[Tensor, Tensor] | None) -> Tensor:
    """``cache[item, pos]`` for the tokens of newly joined rows (``[0, ...]`` when none join)."""
    if take is None:
        return cache.new_empty(0, *cache.shape[2:])
    items, positions = take
    return cache[items, positions]


def _ops_by_point(ordered: Sequence[Sequence[Op]]) -> dict:
    """``(kind, layer)`` -> [(variant index, op)]; receivers' inputs under ``("inputs", layer)``."""
    points: dict = {}
    for k, variant in enumerate(ordered):
        for op in variant:
            key = ("inputs", op.layer) if op.kind in INPUT_KINDS else (op.kind, op.layer)
            points.setdefault(key, []).append((k, op))
    return points


class _Packing:
    """Bookkeeping of packed rows: variant k's items are rows ``k·N … k·N+N−1``, each holding
    positions ``start_k … T−1`` as consecutive tokens (only ``T−1`` once past the last attention)."""

    def __init__(self, n_items: int, length: int, starts: Sequence[int]):
        self.n_items, self.length, self.starts = n_items, length, list(starts)
        self.n_variants = 0
        self.last_only = False
        empty = torch.zeros(0, dtype=torch.long)
        self.row_start, self.row_offset, self.row_item = empty, empty, empty
        self.tok_row, self.tok_pos, self.tok_item = empty, empty, empty

    @property
    def n_rows(self) -> int:
        return len(self.row_start)

    def add(self, ks: list[int]) -> tuple[Tensor, Tensor] | None:
        """Append variants ``ks`` (the next ones in order); return their tokens' (item, position)."""
        if not ks:
            return None
        assert ks == list(range(self.n_variants, self.n_variants + len(ks)))
        items = torch.arange(self.n_items)
        new_items, new_pos = [], []
        for k in ks:
            start = self.length - 1 if self.last_only else self.starts[k]
            span = self.length - start
            rows = k * self.n_items + items
            self.row_start = torch.cat([self.row_start, torch.full((self.n_items,), start)])
            self.row_offset = torch.cat([self.row_offset, len(self.tok_row) + items * span])
            self.row_item = torch.cat([self.row_item, items])
            new_items.append(items.repeat_interleave(span))
            new_pos.append(torch.arange(start, self.length).repeat(self.n_items))
            self.tok_row = torch.cat([self.tok_row, rows.repeat_interleave(span)])
            self.tok_item = torch.cat([self.tok_item, new_items[-1]])
            self.tok_pos = torch.cat([self.tok_pos, new_pos[-1]])
        self.n_variants += len(ks)
        return torch.cat(new_items), torch.cat(new_pos)

    def last_tokens(self) -> Tensor:
        """Index of each row's last-position token, in row order."""
        return self.row_offset + (self.length - 1 - self.row_start)

    def keep_last(self) -> None:
        """Drop every token but each row's last position (after the final attention)."""
        rows = torch.arange(self.n_rows)
        self.row_start = torch.full((self.n_rows,), self.length - 1)
        self.row_offset = rows
        self.tok_row, self.tok_item = rows, self.row_item.clone()
        self.tok_pos = torch.full((self.n_rows,), self.length - 1)
        self.last_only = True

    def rows_of(self, k: int) -> Tensor:
        return k * self.n_items + torch.arange(self.n_items)

    def tokens_of(self, k: int) -> Tensor:
        """Token indices of variant ``k``'s rows (consecutive blocks)."""
        rows = self.rows_of(k)
        first = int(self.row_offset[rows[0]])
        span = self.length - int(self.row_start[rows[0]])
        return torch.arange(first, first + span * self.n_items)

    def last_of(self, tokens: Tensor) -> Tensor:
        """Within ``tokens`` (one variant's), the positions of each row's last token."""
        return torch.nonzero(self.tok_pos[tokens] == self.length - 1)[:, 0]

    def apply(self, t: Tensor, ops: Sequence[tuple[int, Op]], values) -> None:
        """Overwrite packed ``t`` where replace ops (variant k, op) say, from ``values``."""
        groups: dict[str, list[tuple[Tensor, Tensor, Tensor, Tensor | None]]] = {}
        for k, op in ops:
            if k >= self.n_variants:
                continue
            rows = self.rows_of(k)
            if op.pos is None:
                index = self.tokens_of(k)
            else:
                keep = op.pos >= self.row_start[rows]
                rows = rows[keep]
                index = self.row_offset[rows] + (op.pos[keep] - self.row_start[rows])
            heads = None if op.head is None else torch.full_like(index, op.head)
            groups.setdefault(op.value, []).append((index, heads, op.kind, op.layer))
        for value, parts in groups.items():
            index = torch.cat([p[0] for p in parts])
            kind, layer = parts[0][2], parts[0][3]
            source = values[(value, kind, layer)]
            items, positions = self.tok_item[index], self.tok_pos[index]
            if parts[0][1] is None:
                t[index] = source[items, positions].to(t.dtype)
            else:
                heads = torch.cat([p[1] for p in parts])
                t[index, heads] = source[items, positions, heads].to(t.dtype)


def plan_chunks(starts: Sequence[int], n_items: int, length: int, budget: int) -> list[list[int]]:
    """Group variant indices into batches of at most ``budget`` packed tokens (rows × own positions).

    Packing wastes nothing on rows that start late, so the only aim is batches
    large enough to keep the matrix products busy; variants are taken
    latest-start first so a batch's attention grid stays short.
    """
    order = sorted(range(len(starts)), key=lambda i: -starts[i])
    chunks: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        own = n_items * (length - starts[i])
        if current and used + own > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(i)
        used += own
    if current:
        chunks.append(current)
    return chunks
