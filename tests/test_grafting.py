"""Skill localization by grafting, against a planted truth.

The planted pair: a tiny Llama whose residual dimensions 24..31 are dead
(zero embeddings, zero o_proj/down_proj rows), so any change to the input
columns 24..31 of q/k/v/gate/up has exactly no effect. The fine-tune differs
from the base on (a) a known set P of down_proj entries, trained so each one
helps on its own and is needed by the fine-tune (a last-token lookup skill),
and (b) many *larger* changes in the dead columns, irrelevant to the skill.
The base patch (top-|Δθ|) is therefore all irrelevant entries; the learned
mask has to find P.
"""

from __future__ import annotations

import copy
import io
import random

import pytest
import tiny
import torch

from interp import Task, load_pair
from interp.analysis.grafting import (
    GraftError,
    GraftMask,
    GraftSpace,
    MaskMismatchError,
    base_patch,
    graft,
    mask_table,
    random_mask,
    relaxed_gamma,
    relaxed_slope,
    skill_mask,
    top_k_mask,
)
from interp.analysis.grafting_eval import calibration, graft_evaluation, mask_overlap
from interp.analysis.grafting_space import entry_modules, module_of
from interp.errors import InterpError, TaskError
from interp.tasks import accuracy, encode, first_token_ids

LIVE = 24  # residual dims 24..31 are dead
ANSWERS = {t: 40 + (3 * t) % 8 for t in range(8)}  # trigger w{t} -> answer w{40 + 3t mod 8}


def lookup_task(n: int, seed: int) -> Task:
    """``w{a} w{b} w{t}`` -> `` w{ANSWERS[t]}``: the answer depends on the last token only."""
    rng = random.Random(seed)
    prompts, answers = [], []
    for _ in range(n):
        a, b, t = rng.randrange(8, 40), rng.randrange(8, 40), rng.randrange(8)
        prompts.append(f"w{a} w{b} w{t}")
        answers.append(f" w{ANSWERS[t]}")
    return Task("lookup", prompts, answers)


def dead_dim_base() -> torch.nn.Module:
    model = tiny.llama(seed=0, hidden=32, layers=2, vocab=64)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, LIVE:] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[LIVE:, :] = 0
            layer.mlp.down_proj.weight[LIVE:, :] = 0
        model.lm_head.weight *= 25  # readable logits from a random model
    return model


def _loss(model, ids, mask, targets) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        return float(torch.nn.functional.cross_entropy(logits, targets))


def _train_entries(base, entries, ids, mask, targets, steps=200):
    """A copy of ``base`` trained (Adam) on ``entries`` only, every other weight frozen."""
    model = copy.deepcopy(base).requires_grad_(False)
    params = dict(model.named_parameters())
    names = sorted({n for n, _ in entries})
    allowed = {n: torch.zeros_like(params[n], dtype=torch.bool) for n in names}
    for name, index in entries:
        allowed[name].view(-1)[index] = True
    for name in names:
        params[name].requires_grad_(True)
    optimizer = torch.optim.Adam([params[n] for n in names], lr=0.1)
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        torch.nn.functional.cross_entropy(logits, targets).backward()
        for name in names:
            params[name].grad *= allowed[name]
        optimizer.step()
        optimizer.zero_grad()
    return model.requires_grad_(False).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, one_thread):
    torch.manual_seed(0)
    tokenizer = tiny.word_tokenizer(tmp_path_factory.mktemp("tok"))
    base = dead_dim_base()
    train, test = lookup_task(128, seed=0), lookup_task(128, seed=1)
    ids, mask = encode(tokenizer, train.prompts)
    targets = first_token_ids(tokenizer, train.answers)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    pool = [(n, row * 64 + col) for n in names for row in range(LIVE) for col in range(64)]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:160].tolist()
    first = _train_entries(base, [pool[i] for i in order], ids, mask, targets)
    # keep the entries that help on their own and that the fine-tune needs; retrain on those
    base_p, first_p = dict(base.named_parameters()), dict(first.named_parameters())
    loss_base, loss_first = _loss(base, ids, mask, targets), _loss(first, ids, mask, targets)
    kept = []
    for name, index in (pool[i] for i in order):
        with torch.no_grad():
            step = float(first_p[name].view(-1)[index] - base_p[name].view(-1)[index])
            base_p[name].view(-1)[index] += step
            alone = _loss(base, ids, mask, targets) - loss_base
            base_p[name].view(-1)[index] -= step
            first_p[name].view(-1)[index] -= step
            needed = _loss(first, ids, mask, targets) - loss_first
            first_p[name].view(-1)[index] += step
        if alone < 0 and needed > 0.005:
            kept.append((name, index))
    finetuned = _train_entries(base, kept, ids, mask, targets)
    ft_p = dict(finetuned.named_parameters())
    with torch.no_grad():
        largest = max(abs(float(ft_p[n].view(-1)[i] - base_p[n].view(-1)[i])) for n, i in kept)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # big, skill-irrelevant changes in the dead input columns
        for layer in finetuned.model.layers:
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.mlp.gate_proj, layer.mlp.up_proj):
                cols = linear.weight[:, LIVE:]
                hit = torch.rand(cols.shape, generator=generator) < 0.15
                cols += hit * 2 * largest * (1 + torch.rand(cols.shape, generator=generator))
    pair = load_pair(base, finetuned, tokenizer=tokenizer)
    return {"pair": pair, "train": train, "test": test, "planted": set(kept),
            "tokenizer": tokenizer, "base": base, "finetuned": finetuned}


@pytest.fixture(scope="module")
def learned(planted):
    space = GraftSpace(planted["pair"])
    sparsity = len(planted["planted"]) / space.n
    mask = skill_mask(planted["pair"], planted["train"], sparsity=sparsity, steps=12, space=space,
                      progress=False)
    return space, mask


def _entries(mask: GraftMask) -> set[tuple[str, int]]:
    return {(name, int(i)) for name, flat in mask.indices.items() for i in flat}


def test_planted_set_is_recovered_and_carries_the_skill(planted, learned):
    space, mask = learned
    truth = planted["planted"]
    assert len(truth) >= 15, "the planted construction kept too few entries to test anything"
    k = len(truth)
    # the base patch is the large irrelevant changes, not the skill: learning has to do the work
    patch = space.to_indices(base_patch(space, k))
    patch_entries = {(n, int(i)) for n, flat in patch.items() for i in flat}
    assert len(patch_entries & truth) <= 0.1 * k
    assert mask.k == k and mask.options["actual_sparsity"] == pytest.approx(k / space.n)
    recovered = len(_entries(mask) & truth) / k
    assert recovered >= 0.9, f"learned mask recovers only {recovered:.0%} of the planted set"

    result = graft_evaluation(planted["pair"], planted["test"], mask, progress=False)
    acc = result.table.set_index("variant")["accuracy"]
    assert acc["finetuned"] > 0.6 and acc["base"] < 0.2
    assert acc["graft"] >= 0.95 * acc["finetuned"]
    assert acc["random"] <= acc["base"] + 0.1
    assert acc["base patch"] <= acc["base"] + 0.1
    # graft() builds the same model the evaluation scored
    model = graft(planted["pair"], mask)
    assert accuracy(model, planted["tokenizer"], planted["test"]) == pytest.approx(acc["graft"])
    assert set(result.reliability["variant"]) == {"graft", "base patch", "random", "finetuned", "base"}


def test_rerun_is_identical_and_history_is_consistent(planted, learned):
    space, mask = learned
    runs = [skill_mask(planted["pair"], planted["train"], sparsity=mask.options["sparsity"],
                       steps=3, space=space if i else None, progress=False) for i in range(2)]
    assert _entries(runs[0]) == _entries(runs[1])
    assert runs[0].history.equals(runs[1].history)
    wide = skill_mask(planted["pair"], planted["train"], sparsity=mask.options["sparsity"], steps=3,
                      dtype=torch.float64, progress=False)
    assert wide.options["dtype"] == "torch.float64" and _entries(wide) == _entries(runs[0])
    history = mask.history
    assert history["best"].sum() == 1 and history.loc[0, "base_patch_kept"] == mask.k
    best = history[history["best"]].iloc[0]
    score = history["train_accuracy"] + history["val_accuracy"]
    assert best["train_accuracy"] + best["val_accuracy"] == score.max()


def test_round_mode_may_drift_and_reports_actual_size(planted, learned):
    space, mask = learned
    rounded = skill_mask(planted["pair"], planted["train"], sparsity=mask.options["sparsity"],
                         steps=6, space=space, keep_size=False, progress=False)
    assert rounded.options["actual_sparsity"] == pytest.approx(rounded.k / space.n)
    assert rounded.sparsity == pytest.approx(rounded.k / space.n)
    # rounding γ > 0.5 keeps the irrelevant base patch (zero gradient) and adds skill entries on top
    assert rounded.options["base_patch_kept"] == mask.k
    assert rounded.k > mask.k
    assert len(_entries(rounded) & planted["planted"]) == rounded.k - mask.k


def test_save_load_and_a_mask_for_another_pair_is_refused(planted, learned, tmp_path):
    _, mask = learned
    mask.save(tmp_path / "mask")
    loaded = GraftMask.load(tmp_path / "mask")
    assert _entries(loaded) == _entries(mask)
    assert loaded.provenance == mask.provenance and loaded.options == mask.options
    assert loaded.history.equals(mask.history)
    assert "GraftMask" in loaded._repr_html_()
    a = graft(planted["pair"], loaded).state_dict()
    b = graft(planted["pair"], mask).state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)

    # same architecture, another fine-tune: the fingerprint differs
    other = load_pair(planted["base"], tiny.perturbed(planted["base"], scale=0.01),
                      tokenizer=planted["tokenizer"])
    with pytest.raises(MaskMismatchError, match="fingerprint"):
        graft(other, loaded)
    graft(other, loaded, strict=False)  # a deliberate transfer is allowed
    # another architecture: names/shapes differ
    wider = tiny.llama(seed=0, hidden=16, layers=2, vocab=64)
    foreign = load_pair(wider, tiny.perturbed(wider), tokenizer=planted["tokenizer"])
    with pytest.raises(MaskMismatchError, match="is \\[.*\\] in the mask"):
        graft(foreign, loaded)


@pytest.mark.parametrize("sparsity", [0, 1, -0.1, 1.5, 1e-9])
def test_bad_sparsity(planted, learned, sparsity):
    space, _ = learned
    with pytest.raises(GraftError, match="sparsity"):
        skill_mask(planted["pair"], planted["train"], sparsity=sparsity, steps=1, space=space,
                   progress=False)


def test_task_the_tokenizer_cannot_write(planted, learned):
    space, _ = learned
    bad_answers = Task("unknown", ["w1 w2 w3"] * 4, [" w1", " zebra", " w2", " w3"])
    with pytest.raises(TaskError, match="unknown token"):
        skill_mask(planted["pair"], bad_answers, sparsity=0.01, steps=1, space=space, progress=False)
    bad_prompt = Task("unknown", ["w1 giraffe w3"] * 4, [" w1"] * 4)
    with pytest.raises(TaskError, match="giraffe"):
        skill_mask(planted["pair"], bad_prompt, sparsity=0.01, steps=1, space=space, progress=False)
    with pytest.raises(InterpError, match="no parameter"):
        GraftSpace(planted["pair"], eligible="nothing_matches_this")


def test_top_k_is_exact_with_ties():
    scores = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0, 3.0])
    mask = top_k_mask(scores, 3)
    assert mask.tolist() == [True, True, True, False, False, False]  # ties -> lower index
    # the repository's strict '>' against the k-th value would have kept only one entry here
    assert int((scores > torch.topk(scores, 3).values[-1]).sum()) == 1
    secondary = torch.tensor([0.0, 1.0, 2.0, 9.0, 0.0, 9.0])
    assert top_k_mask(scores, 3, secondary).tolist() == [True, False, False, True, False, True]
    big = torch.randn(10_000, generator=torch.Generator().manual_seed(0)).round(decimals=1)
    for k in (1, 17, 999, 10_000):
        assert int(top_k_mask(big, k).sum()) == k


def test_relaxation_chain_rule_matches_autograd():
    generator = torch.Generator().manual_seed(0)
    S = torch.rand(50, generator=generator, dtype=torch.float64) * 20
    patch = torch.rand(50, generator=generator) < 0.3
    S1 = S.clone().requires_grad_(True)
    gamma = patch.double() + (1 - 2 * patch.double()) * torch.sigmoid(S1 - 10.0)  # methods.md §2
    torch.testing.assert_close(relaxed_gamma(S, patch), gamma.detach())
    gamma.sum().backward()
    torch.testing.assert_close(relaxed_slope(S, patch), S1.grad)
    assert torch.allclose(relaxed_gamma(torch.rand(50, dtype=torch.float64), patch),
                          patch.double(), atol=2e-4)  # starts at the base patch


def test_lora_pair_mask_is_over_the_merged_delta(tmp_path):
    folder = tiny.save(tiny.llama(seed=0), tmp_path / "base")
    adapter = tiny.lora_adapter(folder, tmp_path / "lora", r=2, alpha=4)
    pair = load_pair(folder, adapter=adapter)
    space = GraftSpace(pair)
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(space.view(space.delta, name), pair.delta("blocks.1.attn.q"))
    # a mask of every changed entry reproduces the merged fine-tune exactly
    full = space.graft_model(space.delta != 0)
    reference = pair.model("finetuned")
    ids = torch.tensor([[4, 5, 6, 7]])
    torch.testing.assert_close(full(input_ids=ids).logits, reference(input_ids=ids).logits)
    # norms are eligible but untouched by LoRA; embeddings and lm_head are never eligible
    assert any("layernorm" in n for n in space.names)
    assert not any("embed" in n or "lm_head" in n for n in space.names)


def test_gpt2_fused_qkv_is_located_per_entry():
    model = tiny.gpt2(seed=0)
    pair = load_pair(model, tiny.perturbed(model), tokenizer=None)
    space = GraftSpace(pair)
    assert "transformer.h.0.attn.c_attn.weight" in space.names  # [d_in, 3 d] Conv1D layout
    assert not any(n.startswith(("transformer.wte", "transformer.wpe", "transformer.ln_f"))
                   for n in space.names)
    name = "transformer.h.1.attn.c_attn.weight"
    assert module_of(name) == (1, "qkv", "weight")
    assert entry_modules(name, [32, 96], torch.tensor([0, 40, 95, 96 + 33])) == ["q", "k", "v", "k"]
    indices = {name: torch.tensor([0, 40, 95]), "transformer.h.0.ln_1.bias": torch.tensor([3])}
    table = mask_table(space.names, space.shapes, indices)
    fused = table[table["tensor"] == name].set_index("module")["selected"]
    assert fused.to_dict() == {"q": 1, "k": 1, "v": 1}
    assert table.loc[table["tensor"] == "transformer.h.0.ln_1.bias", "module"].item() == "norm"


def test_calibration_on_known_confidences():
    # 10 predictions at confidence 0.85 (8 right) and 10 at 0.35 (all wrong), 5-token vocabulary
    logits, targets = [], []
    for i in range(20):
        p = 0.85 if i < 10 else 0.35
        logits.append(torch.log(torch.tensor([p] + [(1 - p) / 4] * 4)))
        targets.append(0 if i < 8 else 1)
    logits, targets = torch.stack(logits), torch.tensor(targets)
    ece, bins = calibration(logits, targets, n_bins=10)
    # bin [0.8, 0.9): accuracy 0.8 vs confidence 0.85; bin [0.3, 0.4): accuracy 0 vs 0.35
    assert ece == pytest.approx(0.5 * 0.05 + 0.5 * 0.35, abs=1e-6)
    assert bins["count"].sum() == 20 and bins.loc[8, "count"] == 10 and bins.loc[3, "count"] == 10
    assert bins.loc[8, "accuracy"] == pytest.approx(0.8) and bins.loc[3, "accuracy"] == 0.0
    assert calibration(logits[:10], targets[:10], n_bins=1)[0] == pytest.approx(0.05, abs=1e-6)


def test_overlap_of_known_masks():
    shapes = {"a.0.w": [10, 10], "a.1.w": [100]}

    def make(indices: dict[str, list[int]]) -> GraftMask:
        tensors = {n: torch.tensor(v, dtype=torch.long) for n, v in indices.items()}
        return GraftMask(table=mask_table(shapes, shapes, tensors), indices=tensors, shapes=shapes,
                         options={"task": "t"})

    one = make({"a.0.w": [0, 1, 2, 3], "a.1.w": [5, 6]})  # 6 entries
    two = make({"a.0.w": [2, 3], "a.1.w": [6, 7, 8, 9]})  # 6 entries, 3 shared
    result = mask_overlap({"one": one, "two": two})
    row = result.table[(result.table["a"] == "one") & (result.table["b"] == "two")].iloc[0]
    assert row["intersection"] == 3 and row["union"] == 9
    assert row["jaccard"] == pytest.approx(3 / 9) and row["overlap_min"] == pytest.approx(0.5)
    assert row["expected_intersection"] == pytest.approx(36 / 200)
    assert result.matrix("jaccard").loc["one", "one"] == 1.0
    other = GraftMask(table=one.table, indices=one.indices, shapes={"a.0.w": [10, 10]})
    with pytest.raises(MaskMismatchError):
        mask_overlap([one, other])
    location = one.location()
    assert location["selected"].sum() == 6 and location["share"].sum() == pytest.approx(1.0)


def test_random_mask_is_seeded_and_uniform(learned):
    space, _ = learned
    a, b = random_mask(space, 500, seed=3), random_mask(space, 500, seed=3)
    assert torch.equal(a, b) and int(a.sum()) == 500
    assert not torch.equal(a, random_mask(space, 500, seed=4))
    positions = torch.nonzero(a).reshape(-1).double() / space.n
    assert 0.4 < float(positions.mean()) < 0.6  # not biased toward low indices


def test_plots_render(planted, learned, tmp_path):
    from interp.plots.grafting import (
        graft_accuracy_figure,
        graft_accuracy_plotly,
        mask_location_figure,
        mask_location_plotly,
        mask_overlap_figure,
        mask_overlap_plotly,
        reliability_figure,
        reliability_plotly,
    )
    from interp.plots.style import save_matplotlib, save_plotly

    space, mask = learned
    result = graft_evaluation(planted["pair"], planted["test"], [mask], progress=False)
    overlap = mask_overlap({"planted": mask, "patch": GraftMask(
        table=mask.table, indices=space.to_indices(base_patch(space, mask.k)), shapes=mask.shapes)})
    for make, arg in ((graft_accuracy_figure, result), (mask_location_figure, [mask]),
                      (mask_overlap_figure, overlap), (reliability_figure, result)):
        figure = make(arg)
        assert figure.axes[0].get_xlabel() and figure.axes[0].get_ylabel()
        assert figure.axes[0].get_title() and figure.get_suptitle()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=50)
        assert buffer.tell() > 1000
    assert save_matplotlib(graft_accuracy_figure(result), tmp_path / "acc")[0].stat().st_size > 1000
    for make, arg in ((graft_accuracy_plotly, result), (mask_location_plotly, [mask]),
                      (mask_overlap_plotly, overlap), (reliability_plotly, result)):
        figure = make(arg)
        assert figure.layout.title.text and figure.layout.xaxis.title.text
        assert len(figure.data) >= 1
    assert save_plotly(mask_overlap_plotly(overlap), tmp_path / "overlap").stat().st_size > 1000
