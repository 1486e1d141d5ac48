"""Activation patching: planted differences are found where planted, and nowhere else.

Tiny random Llamas (3 layers, d=32, 4 query heads over 2 kv heads) whose
"fine-tune" differs from the base in exactly one component. Every site
upstream of the planted change sees identical activations in both models, so
its patch must do exactly nothing; the planted component's own patch must
carry the whole difference. The batched engine must equal the one-forward-per-
site reference through TransformerLens bridge hooks, and path patching must
equal ``transformer_lens.patching.get_act_patch_direct_path``.
"""

from __future__ import annotations

import copy
import random

import pytest
import tiny
import torch

from interp import load_pair
from interp.analysis.circuits import cmap, faithfulness, path_patch
from interp.analysis.patching import GRIDS, PatchResult, Site, patch
from interp.errors import (
    ArchitectureMismatchError,
    InterpError,
    TaskError,
    TokenizerMismatchError,
)
from interp.tasks import Task

torch.set_num_threads(1)
TOL = 1e-5
HEAD = 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.word_tokenizer(tmp_path_factory.mktemp("tok"))


def make_task(n: int = 12, lengths=(6, 7, 9), seed: int = 0, swap: int = -3) -> Task:
    """Random word prompts; the counterfactual changes one word (``swap`` from the end)."""
    rng = random.Random(seed)
    prompts, counter, answers, counter_answers = [], [], [], []
    for _ in range(n):
        words = [f"w{rng.randrange(60)}" for _ in range(rng.choice(lengths))]
        other = list(words)
        other[swap] = f"w{rng.randrange(60)}"
        a, b = rng.sample(range(60), 2)
        prompts.append(" ".join(words))
        counter.append(" ".join(other))
        answers.append(f" w{a}")
        counter_answers.append(f" w{b}")
    return Task("toy", prompts, answers, counter, counter_answers)


def base_model(layers: int = 3, seed: int = 0, kv: int | None = None):
    """A tiny Llama with larger weights than the default init, so patches move the logits."""
    model = tiny.llama(seed=seed, layers=layers)
    if kv is not None:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**{**model.config.to_dict(), "num_key_value_heads": kv})
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "proj" in name or "lm_head" in name:
                parameter.mul_(8.0)
    return model


def planted(model, module: str, layer: int, scale: float = 0.5, seed: int = 7):
    """A copy of ``model`` with one module's weights perturbed: 'mlp' or 'q' (head HEAD only)."""
    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    block = other.model.layers[layer]
    with torch.no_grad():
        if module == "mlp":
            for linear in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
                linear.weight += scale * torch.randn_like(linear.weight)
        else:  # one query head's rows of q_proj: only that head's output changes
            d_head = block.self_attn.head_dim
            rows = block.self_attn.q_proj.weight[HEAD * d_head:(HEAD + 1) * d_head]
            rows += 4 * scale * torch.randn_like(rows)
    return other


ALL_GRIDS = list(GRIDS)


def _sites(result: PatchResult):
    return result.table.set_index("site")


# ---------------------------------------------------------------------------
# planted truth
# ---------------------------------------------------------------------------


def test_planted_mlp_in_last_block_is_the_only_site_that_recovers(tok):
    base = base_model()
    pair = load_pair(base, planted(base, "mlp", layer=2), tokenizer=tok)
    result = patch(pair, make_task(), sites=ALL_GRIDS, progress=False)
    gap = result.baseline()["source_logit_diff"] - result.baseline()["target_logit_diff"]
    assert abs(gap) > 0.05, "the planted change must move the metric for the test to mean anything"
    table = _sites(result)
    assert table.loc["L2 mlp_out", "recovered"] == pytest.approx(1.0, abs=1e-4)
    # every other site reads activations upstream of the change: identical in both models
    others = table.drop(index="L2 mlp_out")
    others = others[~((others["kind"] == "mlp_out") & (others["layer"] == 2))]  # by-position pieces
    assert others["effect"].abs().max() < TOL
    # the by-position MLP patches add up: the last position alone carries all of it
    by_pos = table[(table["kind"] == "mlp_out") & (table["layer"] == 2) & (table["pos"] >= 0)]
    assert by_pos["recovered"].iloc[-1] == pytest.approx(1.0, abs=1e-4)
    assert by_pos["recovered"].iloc[:-1].abs().max() < 1e-4


def test_planted_mlp_mid_model_upstream_zero_and_full_residual_recovers(tok):
    base = base_model()
    pair = load_pair(base, planted(base, "mlp", layer=1), tokenizer=tok)
    result = patch(pair, make_task(seed=1), sites=ALL_GRIDS, progress=False)
    table = result.table
    upstream = table[(table["layer"] == 0) | ((table["layer"] == 1) & (table["kind"] != "mlp_out"))]
    assert len(upstream) > 50 and upstream["effect"].abs().max() < TOL
    rows = _sites(result)
    assert rows.loc["L1 mlp_out", "recovered"] == pytest.approx(1.0, abs=1e-4)
    # downstream, the whole residual stream entering block 2 carries the change ...
    assert rows.loc["L2 resid_pre", "recovered"] == pytest.approx(1.0, abs=1e-4)
    # ... but not its last position alone: the MLP wrote at every position
    assert abs(rows.loc["L2 resid_pre @" + str(result.options["width"] - 1), "recovered"] - 1) > 1e-3


def test_planted_query_head_is_found_among_heads(tok):
    base = base_model()
    pair = load_pair(base, planted(base, "q", layer=2), tokenizer=tok)
    task = make_task(seed=2)
    result = patch(pair, task, sites=["z", "attn_out", "mlp_out", "resid_pre"], progress=False)
    heads = result.grid("z", "recovered")
    assert heads.loc[2, HEAD] == pytest.approx(1.0, abs=1e-4)
    assert heads.drop(columns=HEAD).abs().max().max() < 1e-4
    assert heads.loc[[0, 1]].abs().max().max() < 1e-4
    assert _sites(result).loc["L2 attn_out", "recovered"] == pytest.approx(1.0, abs=1e-4)
    # CMAP in the paper's form: the planted head alone brings the base up to the fine-tune
    table = cmap(pair, task, groups={"planted": [(2, HEAD)], "others": [(2, h) for h in range(4) if h != HEAD]},
                 metric="logit_diff", progress=False).table.set_index("group")
    assert table.loc["planted", "recovered"] == pytest.approx(1.0, abs=1e-4)
    assert table.loc["others", "recovered"] == pytest.approx(0.0, abs=1e-4)
    assert table.loc["planted", "accuracy"] == table.iloc[1]["accuracy"]  # = the fine-tune's


def test_model_patched_with_itself_changes_nothing(tok):
    model = base_model(seed=3)
    task = make_task(seed=3)
    for other in (copy.deepcopy(model), model):  # a copy, or the same object, as the source
        result = patch(model, other, task, tokenizer=tok, sites=ALL_GRIDS, progress=False)
        assert result.table["effect"].abs().max() < TOL
        target = result.baselines["target_logit_diff"]
        assert (result.per_item["logit_diff"] - target).abs().max() < TOL


# ---------------------------------------------------------------------------
# batched engine == one hooked forward per site
# ---------------------------------------------------------------------------


def test_engine_identity_patches_reproduce_the_target_run(tok):
    """Patching the target's own activations back in (every kind, layer, position) changes nothing."""
    from interp.analysis.patching_engine import LlamaRunner, Op

    runner = LlamaRunner(base_model(seed=13))
    ids = torch.tensor([tok(p)["input_ids"] for p in make_task(n=5, lengths=(7,), seed=13).prompts])
    n, length = ids.shape
    variants = [[Op(kind, layer, head, None if pos is None else torch.full((n,), pos))]
                for kind in ("resid_pre", "z", "attn_out", "mlp_out") for layer in range(3)
                for head in ([0, 3] if kind == "z" else [None]) for pos in (None, 0, 4, 6)]
    variants.append([Op("z", 2, 1), Op("mlp_out", 0), Op("resid_pre", 1, None, torch.full((n,), 5))])
    capture = LlamaRunner.target_capture(variants, 3)
    cache, logits = runner.forward(ids, capture)
    values = {("source", kind, layer): t for (kind, layer), t in cache.items()}
    out = runner.run_variants(variants, cache, values, length)
    patched = runner.to_logits(out.reshape(-1, out.shape[-1])).view(len(variants), n, -1)
    assert (patched - logits).abs().max() < TOL


def test_batched_engine_equals_bridge_reference(tok):
    source, target = base_model(layers=2, seed=4), base_model(layers=2, seed=5)
    task = make_task(n=8, lengths=(5, 8), seed=4)
    sites = ALL_GRIDS + [Site("z", 1, 3, -1), Site("resid_pre", 1, None, 0)]
    kwargs = {"tokenizer": tok, "sites": sites, "progress": False}
    for src, tgt in ((source, target), (source, None)):  # cross-model, then within-model
        fast = patch(src, tgt, task, engine="fast", batch_tokens=97, **kwargs)  # many small chunks
        slow = patch(src, tgt, task, engine="reference", **kwargs)
        assert fast.table["site"].tolist() == slow.table["site"].tolist()
        for metric in ("logit_diff", "prob"):
            assert (fast.per_item[metric] - slow.per_item[metric]).abs().max() < TOL
            assert (fast.baselines[f"target_{metric}"] - slow.baselines[f"target_{metric}"]).abs().max() < TOL
        assert torch.equal(fast.per_item["accuracy"], slow.per_item["accuracy"])


def test_logit_diff_only_reads_two_logits_and_agrees_with_the_full_unembedding(tok):
    source, target = base_model(layers=2, seed=4), base_model(layers=2, seed=5)
    task = make_task(n=8, lengths=(5, 8), seed=4)
    kwargs = {"tokenizer": tok, "sites": ALL_GRIDS, "progress": False, "batch_tokens": 97}
    full = patch(source, target, task, **kwargs)
    lean = patch(source, target, task, metrics=("logit_diff",), **kwargs)
    assert (full.per_item["logit_diff"] - lean.per_item["logit_diff"]).abs().max() < TOL
    assert lean.per_item["prob"].isnan().all() and lean.per_item["accuracy"].isnan().all()
    assert lean.table["recovered"].to_numpy() == pytest.approx(full.table["recovered"].to_numpy(), abs=1e-4)
    assert lean.baselines["target_prob"].isfinite().all()  # unpatched runs keep every metric
    with pytest.raises(InterpError, match="must be among metrics"):
        patch(source, target, task, metric="prob", metrics=("logit_diff",), **kwargs)
    with pytest.raises(InterpError, match="non-empty subset"):
        patch(source, target, task, metrics=("loss",), **kwargs)


def test_engine_mlp_in_place_gives_the_modules_own_numbers():
    from interp.analysis.patching_engine import LlamaRunner

    model = base_model(layers=2, seed=21)
    runner = LlamaRunner(model)
    assert runner._gated_silu  # Llama's MLP takes the in-place path
    h = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    block = model.model.layers[1]
    with torch.no_grad():
        assert torch.equal(runner.mlp(1, h), block.mlp(block.post_attention_layernorm(h)))


def test_float64_runs_are_float64_throughout(tok):
    from interp.analysis.patching_engine import LlamaRunner

    source, target = base_model(layers=2, seed=14), base_model(layers=2, seed=15)
    task = make_task(n=4, lengths=(6,), seed=14)
    ids = torch.tensor([tok(p)["input_ids"] for p in task.prompts])
    wide = copy.deepcopy(target).double()
    with torch.no_grad():  # the engine's plain forward equals Hugging Face's in float64
        assert (LlamaRunner(wide).forward(ids)[1] - wide(ids).logits[:, -1]).abs().max() < 1e-12
    kwargs = {"tokenizer": tok, "sites": ["resid_pre", "z"], "progress": False}
    fast = patch(source, target, task, engine="fast", dtype=torch.float64, **kwargs)
    slow = patch(source, target, task, engine="reference", dtype=torch.float64, **kwargs)
    single = patch(source, target, task, **kwargs)
    assert fast.per_item["logit_diff"].dtype == torch.float64
    # the bridge takes its softmax in float32 even for float64 models: agreement to ~1e-7 only
    assert (fast.per_item["logit_diff"] - slow.per_item["logit_diff"]).abs().max() < 1e-6
    assert 0 < (single.per_item["logit_diff"].double() - fast.per_item["logit_diff"]).abs().max() < 1e-4


def test_path_patching_equals_transformer_lens_direct_path(tok):
    from transformer_lens.patching import get_act_patch_direct_path

    from interp.pairs.hooked import bridge

    task = make_task(n=6, lengths=(7,), seed=6)
    ids = {k: torch.tensor([tok(p)["input_ids"] for p in prompts])
           for k, prompts in (("clean", task.prompts), ("corrupt", task.counterfactual_prompts))}
    answer = torch.tensor([tok(a, add_special_tokens=False)["input_ids"][0] for a in task.answers])
    counter = torch.tensor([tok(a, add_special_tokens=False)["input_ids"][0] for a in task.counterfactual_answers])

    def metric(logits):
        last = logits[:, -1]
        return (last.gather(-1, answer[:, None]) - last.gather(-1, counter[:, None])).mean()

    for kv, channel in ((2, "q"), (4, "k"), (4, "v")):
        model = base_model(seed=6, kv=kv)
        hooked = bridge(model, tok)
        with torch.no_grad():
            _, clean = hooked.run_with_cache(ids["clean"])
            _, corrupt = hooked.run_with_cache(ids["corrupt"])
            expected = get_act_patch_direct_path(hooked, ids["corrupt"], clean, corrupt, metric, 0, 1,
                                                 component=channel, verbose=False)
        for layer in (1, 2):
            for head in range(4):
                ours = path_patch(model, task, tokenizer=tok, senders=[(0, 1)], receivers=[(layer, head)],
                                  channel=channel, progress=False)
                assert ours.table["logit_diff"].iloc[0] == pytest.approx(float(expected[layer, head]), abs=TOL)
        spread = expected[1:].max() - expected[1:].min()
        assert spread > 1e-3, "receivers must differ for the comparison to mean anything"


def test_path_patching_grid_and_direct_to_logits(tok):
    model = base_model(seed=8)
    task = make_task(n=8, lengths=(7,), seed=8)
    grid = path_patch(model, task, tokenizer=tok, receivers=[(2, 0), (2, 1)], progress=False)
    assert len(grid.table) == 12
    late = grid.table[grid.table["layer"] == 2]  # senders at the receivers' layer reach nothing
    assert late["effect"].abs().max() == 0
    direct = path_patch(model, task, tokenizer=tok, progress=False)
    assert direct.table["effect"].abs().max() > 1e-3
    with pytest.raises(InterpError, match="grouped-query"):
        path_patch(model, task, tokenizer=tok, senders=[(0, 0)], receivers=[(1, 0)], channel="k",
                   progress=False)


def test_mean_ablation_equals_bridge_hooks(tok):
    from interp.pairs.hooked import bridge

    model = base_model(seed=9)
    task = make_task(n=10, lengths=(7,), seed=9)
    with torch.no_grad():  # answers = the model's own predictions, so its accuracy is 1
        predicted = model(torch.tensor([tok(p)["input_ids"] for p in task.prompts])).logits[:, -1].argmax(-1)
    task = Task("own", task.prompts, [" " + tok.convert_ids_to_tokens(int(i)) for i in predicted],
                task.counterfactual_prompts, task.counterfactual_answers)
    circuit = [(0, 1), (1, 2), (2, 0)]
    result = faithfulness(model, task, {"c": circuit, "all": [(l, h) for l in range(3) for h in range(4)]},
                          tokenizer=tok, progress=False).table.set_index("circuit")
    assert result.loc["all", "faithfulness"] == 1.0 and result.loc["all", "logit_diff_faithfulness"] == 1.0
    assert result.loc["no heads", "logit_diff_faithfulness"] == 0.0
    assert result.loc["model", "accuracy"] == 1.0 and result.loc["c", "faithfulness"] < 1.0
    hooked = bridge(model, tok)
    ids = torch.tensor([tok(p)["input_ids"] for p in task.prompts])
    with torch.no_grad():
        _, cache = hooked.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_z"))

        def ablate(layer):
            def hook(z, hook=None):
                z = z.clone()
                for head in range(4):
                    if (layer, head) not in circuit:
                        z[:, :, head] = cache[f"blocks.{layer}.attn.hook_z"][:, :, head].mean(0)
                return z
            return hook

        logits = hooked.run_with_hooks(ids, fwd_hooks=[(f"blocks.{l}.attn.hook_z", ablate(l)) for l in range(3)])
    answer = torch.tensor([tok(a, add_special_tokens=False)["input_ids"][0] for a in task.answers])
    counter = torch.tensor([tok(a, add_special_tokens=False)["input_ids"][0] for a in task.counterfactual_answers])
    last = logits[:, -1]
    expected = (last.gather(-1, answer[:, None]) - last.gather(-1, counter[:, None])).mean()
    assert result.loc["c", "logit_diff"] == pytest.approx(float(expected), abs=TOL)


def test_other_architectures_go_through_the_reference_engine(tok):
    base = tiny.gpt2(seed=0, layers=2)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.transformer.h[1].mlp.c_fc.weight += 0.5 * torch.randn_like(ft.transformer.h[1].mlp.c_fc.weight)
    result = patch(ft, base, make_task(n=6, seed=10), tokenizer=tok, sites=["mlp_out", "attn_out", "z"],
                   progress=False)
    rows = _sites(result)
    assert rows.loc["L1 mlp_out", "recovered"] == pytest.approx(1.0, abs=1e-4)
    assert rows.drop(index="L1 mlp_out")["effect"].abs().max() < TOL


# ---------------------------------------------------------------------------
# bad input, results
# ---------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(tok, tmp_path):
    model = base_model(layers=2)
    task = make_task(n=4, seed=11)
    uneven = Task("uneven", ["w1 w2 w3", "w4 w5"], [" w1", " w2"], ["w1 w2", "w4 w5"], [" w3", " w4"])
    with pytest.raises(TaskError, match="item 0.*different lengths"):
        patch(model, uneven, tokenizer=tok, progress=False)
    other_tok = tiny.word_tokenizer(tmp_path / "other", [f"v{i}" for i in range(60)])
    with pytest.raises(TokenizerMismatchError):
        patch(model, copy.deepcopy(model), task, tokenizer=tok, target_tokenizer=other_tok, progress=False)
    with pytest.raises(ArchitectureMismatchError, match="num_hidden_layers"):
        patch(model, base_model(layers=3), task, tokenizer=tok, progress=False)
    with pytest.raises(InterpError, match="unknown site 'mlp'"):
        patch(model, None, task, tokenizer=tok, sites=["mlp"], progress=False)
    with pytest.raises(InterpError, match="layer 5 does not exist"):
        patch(model, None, task, tokenizer=tok, sites=[Site("mlp_out", 5)], progress=False)
    with pytest.raises(InterpError, match="head 4 does not exist"):
        patch(model, None, task, tokenizer=tok, sites=[Site("z", 1, 4)], progress=False)
    with pytest.raises(InterpError, match="outside the 6-token window"):
        patch(model, None, task, tokenizer=tok, sites=["resid_pre"], positions=[-7], progress=False)
    with pytest.raises(TaskError, match="no counterfactual prompts"):
        patch(model, None, Task("plain", ["w1 w2"], [" w3"]), tokenizer=tok, progress=False)
    with pytest.raises(InterpError, match="needs tokenizer"):
        patch(model, None, task, progress=False)


def test_result_saves_loads_and_shows_itself(tok, tmp_path):
    model = base_model(layers=2, seed=12)
    result = patch(model, None, make_task(n=4, lengths=(6,), seed=12), tokenizer=tok,
                   sites=["resid_pre", "z"], positions=[-1, -3], progress=False)
    assert sorted(set(result.table.loc[result.table["kind"] == "resid_pre", "pos"])) == [3, 5]
    assert result.grid("resid_pre").shape == (2, 2) and result.grid("z").shape == (2, 4)
    again = PatchResult.load(result.save(tmp_path / "patch"))
    assert again.table.equals(result.table) and again.options == result.options
    assert torch.equal(again.per_item["logit_diff"], result.per_item["logit_diff"])
    assert again.tokens == result.tokens and again.source_label == result.source_label
    assert "PatchResult" in again._repr_html_() and "source run" in again._repr_html_()


def test_zoo_lora_pair_batched_equals_reference(zoo_ready):
    """On a real zoo pair (LoRA merged, word tokenizer with <bos>, prompts of several lengths)."""
    from interp import zoo

    pair = zoo.pair("tracking", "lora", 8)
    task = zoo.task("tracking", "test", n=40).subset(range(6))
    sites = ["attn_out", "mlp_out", "z", Site("resid_pre", 1, None, -3), Site("z", 1, 1, -1)]
    fast = patch(pair, task, sites=sites, engine="fast", progress=False)
    slow = patch(pair, task, sites=sites, engine="reference", progress=False)
    for metric in ("logit_diff", "prob"):
        # float32 at the scale of the logits subtracted (~20 here, so ~2e-6 per rounding), over
        # batches padded differently: measured 1.1e-5 at most; the tiny-model tests hold 1e-5.
        assert (fast.per_item[metric] - slow.per_item[metric]).abs().max() < 3 * TOL
    assert fast.baseline()["source_accuracy"] == slow.baseline()["source_accuracy"]
