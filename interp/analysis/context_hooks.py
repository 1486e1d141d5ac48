"""Hooks on plain Hugging Face causal LMs for the context knob: read, set and patch at the last token.

The knob lives in the residual stream *entering* block ``layer`` at the last
prompt position — TransformerLens's ``blocks.{layer}.hook_resid_pre`` — so
hooks here are forward pre-hooks on the block. The layer search patches each
block's attention output (``blocks.{l}.hook_attn_out``) at the last position.
Everything works on Llama-style (``model.layers``/``self_attn``) and GPT-2-style
(``transformer.h``/``attn``) models without TransformerLens, so gradients flow
for DAS and the numerics are the model's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from interp.errors import ArchitectureMismatchError, LayerRangeError


def blocks(model) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM (Llama-style ``model.layers``, GPT-2 ``transformer.h``)."""
    inner = getattr(model, "model", None) or getattr(model, "transformer", None)
    for name in ("layers", "h", "blocks"):
        found = getattr(inner, name, None) if inner is not None else None
        if isinstance(found, torch.nn.ModuleList):
            return found
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ArchitectureMismatchError(f"cannot find the transformer blocks of {type(model).__name__}")


def attention(block) -> torch.nn.Module:
    """The attention sub-module of one block (its first output is the attention output)."""
    for name in ("self_attn", "attn", "attention"):
        if hasattr(block, name):
            return getattr(block, name)
    raise ArchitectureMismatchError(f"cannot find the attention module of {type(block).__name__}")


def final_norm(model) -> torch.nn.Module:
    """The norm applied before the unembedding (Llama ``model.norm``, GPT-2 ``transformer.ln_f``)."""
    inner = getattr(model, "model", None) or getattr(model, "transformer", None)
    for name in ("norm", "ln_f", "final_layernorm"):
        if inner is not None and hasattr(inner, name):
            return getattr(inner, name)
    raise ArchitectureMismatchError(f"cannot find the final norm of {type(model).__name__}")


def n_layers(model) -> int:
    return len(blocks(model))


def d_model(model) -> int:
    """Residual-stream width (the input embedding's width)."""
    return int(model.get_input_embeddings().weight.shape[1])


def check_layer(model, layer: int) -> None:
    """Raise :class:`LayerRangeError` unless ``0 <= layer < n_layers``."""
    n = n_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise LayerRangeError(
            f"layer {layer!r} is out of range: this model has {n} blocks, so the residual "
            f"stream entering block 0..{n - 1} (hook_resid_pre) is available"
        )


def check_width(model, width: int, what: str = "the knob") -> None:
    """Raise :class:`ArchitectureMismatchError` when the model's residual width is not ``width``."""
    have = d_model(model)
    if have != width:
        raise ArchitectureMismatchError(
            f"{what} lives in a {width}-dimensional residual stream but this model's is "
            f"{have}-dimensional ({type(model).__name__}); a direction only transfers between "
            "models of one width (the base and fine-tunes of one checkpoint)"
        )


# ---------------------------------------------------------------------------
# generic hook helpers
# ---------------------------------------------------------------------------


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _with_first(output, value: Tensor):
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _hidden_from_call(args: tuple, kwargs: dict) -> tuple[Tensor, bool]:
    """The block's input hidden states and whether they came positionally."""
    if args:
        return args[0], True
    return kwargs["hidden_states"], False


def _past_length(args: tuple, kwargs: dict, layer: int) -> int:
    """Tokens already in the KV cache this call sees (0 on a prompt's forward)."""
    for value in (*args, *kwargs.values()):
        if hasattr(value, "get_seq_length"):
            try:
                return int(value.get_seq_length(layer))
            except (TypeError, IndexError):
                return int(value.get_seq_length())
    return 0


@contextlib.contextmanager
def edit_resid_pre(model, layer: int, fn: Callable[[Tensor], Tensor],
                   prompt_only: bool = True) -> Iterator[None]:
    """Replace the last position of the residual entering block ``layer`` by ``fn(h_last)``.

    ``fn`` maps ``[batch, d_model]`` to ``[batch, d_model]``. With
    ``prompt_only`` the edit skips forward calls that extend a KV cache
    (generated tokens), so generation is steered at the prompt's last position
    only — the pitfall in methods.md §4.
    """
    block = blocks(model)[layer]

    def hook(module, args, kwargs):
        if prompt_only and _past_length(args, kwargs, layer) > 0:
            return None
        hidden, positional = _hidden_from_call(args, kwargs)
        last = fn(hidden[:, -1, :])
        hidden = torch.cat([hidden[:, :-1, :], last.unsqueeze(1).to(hidden.dtype)], dim=1)
        if positional:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def record_resid_pre(model, layers: Sequence[int], store: dict[int, list[Tensor]]) -> Iterator[None]:
    """Append the last-position residual entering each block in ``layers`` to ``store[layer]``."""
    handles = []
    for layer in layers:
        def hook(module, args, kwargs, layer=layer):
            hidden, _ = _hidden_from_call(args, kwargs)
            store.setdefault(layer, []).append(hidden[:, -1, :].detach().float().cpu())

        handles.append(blocks(model)[layer].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def record_block_outputs(model, store: list[Tensor | None]) -> Iterator[None]:
    """Write each block's last-position output (resid_post) into ``store[layer]``."""
    handles = []
    for layer, block in enumerate(blocks(model)):
        def hook(module, args, output, layer=layer):
            store[layer] = _first(output)[:, -1, :].detach()

        handles.append(block.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def record_attention(model, store: dict[int, Tensor]) -> Iterator[None]:
    """Write each block's last-position attention output into ``store[layer]`` ``[batch, d_model]``."""
    handles = []
    for layer, block in enumerate(blocks(model)):
        def hook(module, args, output, layer=layer):
            store[layer] = _first(output)[:, -1, :].detach()

        handles.append(attention(block).register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def patch_attention(model, patches: dict[int, Tensor]) -> Iterator[None]:
    """Overwrite block l's last-position attention output with ``patches[l]`` ``[batch, d_model]``."""
    handles = []
    for layer, value in patches.items():
        def hook(module, args, output, value=value):
            out = _first(output)
            last = value.to(out.dtype).unsqueeze(1)
            return _with_first(output, torch.cat([out[:, :-1, :], last], dim=1))

        handles.append(attention(blocks(model)[layer]).register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def logit_lens(model, resid: Tensor) -> Tensor:
    """Decode residuals ``[..., d_model]`` with the final norm and unembedding: ``[..., d_vocab]``."""
    return model.get_output_embeddings()(final_norm(model)(resid)).float()


def cache_kwarg(model) -> str:
    """The forward keyword that takes a KV cache (``cache`` in new transformers, else ``past_key_values``)."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
