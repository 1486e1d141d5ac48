"""The context knob on models whose knob is planted: recover it, steer with it, reject bad input.

The planted models are tiny Llamas trained here in seconds on an intent task
(``v3 Only e5`` -> `` v3`` from the context; ``v3 Never e5`` -> `` v5``, the
entity's memorised value) with interchange-intervention training (Geiger et
al.) at the residual entering block 1, last token, so that by construction:

- the intents differ there only along a known unit vector ``u`` (a write loss
  puts ±1 on ``u``; a penalty removes any other difference), and
- the answer follows the ``u`` coordinate: swapping it from the other intent's
  prompt flips the answer, also on bare prompts with no instruction.

The *decoy* model also writes the intent along a second direction ``d ⟂ u``,
three times larger, which the model is trained to ignore (swapping it changes
nothing). Mean-difference and probe directions chase ``d``; DAS must find ``u``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tiny
import torch

from interp.analysis.context import ContextKnob, auc_and_dprime, context_knob
from interp.analysis.context_hooks import LayerRangeError, blocks, cache_kwarg
from interp.analysis.context_profile import intent_subspace_profile
from interp.analysis.context_task import (
    bare_task,
    encode_left,
    intent_task,
    pair_acc,
    prepare_bare,
    prepare_intent,
)
from interp.analysis.context_transfer import KnobTransfer, knob_transfer, steering_sweep
from interp.analysis.layer_search import LayerSearch, layer_search
from interp.errors import ArchitectureMismatchError, TaskError

N_VALUES = 8
WORDS = ["Only", "Never", "?"] + [f"e{i}" for i in range(N_VALUES)] + [f"v{i}" for i in range(N_VALUES)]
TEMPLATE = "{context} {instruction} {query}"
BARE = "{context} {query}"
INSTRUCTIONS = {"ctx": "Only", "prior": "Never"}
SITE = 1
D_MODEL = 32


def items():
    return [(f"v{c}", f"e{k}", f"v{c}", f"v{k}")
            for k in range(N_VALUES) for c in range(N_VALUES) if c != k]


def make_tasks():
    task = intent_task(items(), template=TEMPLATE, instructions=INSTRUCTIONS, name="planted")
    return task, bare_task(items(), template=BARE, name="planted_bare")


def train_planted(folder: Path, decoy: bool, steps: int = 140, seed: int = 0):
    """A 2-block Llama whose intent lives on ``u`` at blocks.1.hook_resid_pre[-1]; returns (model, tok, u, d)."""
    torch.manual_seed(seed)
    tokenizer = tiny.word_tokenizer(folder, WORDS)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=D_MODEL, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    basis, _ = torch.linalg.qr(torch.randn(D_MODEL, 2, generator=torch.Generator().manual_seed(7)))
    u, d = basis[:, 0].contiguous(), basis[:, 1].contiguous()
    task, bare = make_tasks()
    data, bare_data = prepare_intent(task, tokenizer), prepare_bare(bare, tokenizer)
    n = len(data)
    prompts = data.ctx_prompts + data.prior_prompts + bare_data.prompts
    ids, mask = encode_left(tokenizer, prompts)  # rows: ctx | prior | bare, each n long
    answers = torch.cat([data.ctx_ids, data.prior_ids])
    ctx_rows, prior_rows, bare_rows = (torch.arange(n) + k * n for k in range(3))
    # Interventions (target rows, source rows, direction, fraction t, own answer, other answer):
    # moving the u coordinate a fraction t of the way to the other intent's value moves the
    # answer distribution the same fraction of the way (so the answer follows the coordinate
    # itself, and a partial swap — a direction only partly aligned with u — is a partial
    # flip); bare prompts follow a swapped-in coordinate; d swaps (decoy) change nothing.
    plan = [(rows, other, u, t, own, flip) for t in (0.2, 0.4, 0.6, 0.8, 0.9, 1.0)
            for rows, other, own, flip in ((ctx_rows, prior_rows, data.ctx_ids, data.prior_ids),
                                           (prior_rows, ctx_rows, data.prior_ids, data.ctx_ids))]
    plan += [(bare_rows, ctx_rows, u, 1.0, data.prior_ids, data.ctx_ids),
             (bare_rows, prior_rows, u, 1.0, data.ctx_ids, data.prior_ids)]
    if decoy:
        plan += [(ctx_rows, prior_rows, d, 1.0, data.ctx_ids, data.ctx_ids),
                 (prior_rows, ctx_rows, d, 1.0, data.prior_ids, data.prior_ids)]
    tgt = torch.cat([p[0] for p in plan])
    src = torch.cat([p[1] for p in plan])
    dirs = torch.cat([p[2].expand(len(p[0]), -1) for p in plan])
    fraction = torch.cat([torch.full((len(p[0]), 1), p[3]) for p in plan])
    own = torch.cat([p[4] for p in plan])
    flip = torch.cat([p[5] for p in plan])
    state: dict = {}

    def hook(module, args, kwargs):
        hidden = args[0]
        state["h"] = hidden[:, -1]
        if "edit" in state:
            source, directions, t = state["edit"]
            last = hidden[:, -1] + t * ((source - hidden[:, -1]) * directions).sum(-1, keepdim=True) \
                * directions
            return (torch.cat([hidden[:, :-1], last[:, None]], 1), *args[1:]), kwargs
        return None

    handle = blocks(model)[SITE].register_forward_pre_hook(hook, with_kwargs=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ce = torch.nn.functional.cross_entropy
    try:
        model.train()
        for _ in range(steps):
            state.pop("edit", None)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
            h = state["h"]
            loss = ce(logits[: 2 * n], answers)
            # bare prompts: undecided between the two answers (like a base model)
            bare_logp = logits[bare_rows].log_softmax(-1)
            loss = loss - 0.5 * (bare_logp.gather(1, data.ctx_ids[:, None]).mean()
                                 + bare_logp.gather(1, data.prior_ids[:, None]).mean())
            state["edit"] = (h[src], dirs, fraction)
            swapped = model(input_ids=ids[tgt], attention_mask=mask[tgt]).logits[:, -1]
            logp = swapped.log_softmax(-1)
            t = fraction[:, 0]
            loss = loss - ((1 - t) * logp.gather(1, own[:, None])[:, 0]
                           + t * logp.gather(1, flip[:, None])[:, 0]).mean()
            # write the intent on u (and on the decoy d, 3x larger), nothing anywhere else
            diff = h[ctx_rows] - h[prior_rows]
            written = [u] + ([d] if decoy else [])
            target = [2.0] + ([6.0] if decoy else [])
            for direction, value in zip(written, target):
                loss = loss + ((diff @ direction - value) ** 2).mean()
                diff = diff - (diff @ direction)[:, None] * direction
            loss = loss + (diff ** 2).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        handle.remove()
    model.eval()
    return model, tokenizer, u, d


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    torch.set_num_threads(1)
    return train_planted(tmp_path_factory.mktemp("planted"), decoy=False)


@pytest.fixture(scope="module")
def decoy(tmp_path_factory):
    torch.set_num_threads(1)
    return train_planted(tmp_path_factory.mktemp("decoy"), decoy=True, seed=1)


def _cos(a, b) -> float:
    return abs(float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0)))


# ---------------------------------------------------------------------------
# the task as data
# ---------------------------------------------------------------------------


def test_intent_task_builder_pairs_prompts_and_drops_shared_first_tokens(planted):
    _, tokenizer, _, _ = planted
    task = intent_task([("v1", "e2", "v1", "v2"), ("v3", "e3", "v3", "v3")], template=TEMPLATE,
                       instructions=INSTRUCTIONS)
    assert task.prompts == ["v1 Only e2", "v1 Never e2", "v3 Only e3", "v3 Never e3"]
    assert task.answers == [" v1", " v2", " v3", " v3"]
    assert task.counterfactual_prompts[0] == "v1 Never e2"
    data = prepare_intent(task, tokenizer)
    assert len(data) == 1 and data.n_shared_first_token == 1
    zoo_style = intent_task([("Bodo lives in Paris.", "Where does Bodo live?", "Paris", "Rome")])
    assert zoo_style.prompts[1] == ("Context: Bodo lives in Paris. Query: Where does Bodo live? "
                                    "Instruction: consider the context: Never")
    from interp.zoo.world import World

    world = World()  # the default template is the zoo's own format
    name = world.names[0]
    assert world.intent_prompt(name, "city", "Paris", "prior") == (
        f"Context: {world.statement(name, 'city')} Paris. Query: Where does {name} live? "
        "Instruction: consider the context: Never")
    assert world.intent_prompt(name, "city", "Paris", None).endswith("live? Answer:")


def test_left_padding_keeps_the_last_real_token_last(planted):
    _, tokenizer, _, _ = planted
    ids, mask = encode_left(tokenizer, ["v1 Only e2", "e2"])
    assert mask[1].tolist() == [0, 0, 1] and ids[1, -1] == ids[0, -1]


def test_pair_acc_counts_an_item_only_when_both_intents_are_right(planted):
    model, tokenizer, _, _ = planted
    task, _ = make_tasks()
    result = pair_acc(model, task, tokenizer=tokenizer)
    assert result.value == 1.0 and result.n_items == len(items())
    # a task whose prior answers are all wrong: PairAcc 0 while ctx accuracy stays 1
    wrong = intent_task([(c, q, a, "v0" if p != "v0" else "v1") for c, q, a, p in items()
                         if a != "v0" and a != "v1"], template=TEMPLATE, instructions=INSTRUCTIONS)
    result = pair_acc(model, wrong, tokenizer=tokenizer)
    assert result.ctx_accuracy == 1.0 and result.value == 0.0


# ---------------------------------------------------------------------------
# recovering the planted knob and steering with it
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["das", "mean_diff", "probe"])
def test_knob_recovers_planted_direction(planted, method):
    model, tokenizer, u, _ = planted
    task, _ = make_tasks()
    knob = context_knob(model, task, layer=SITE, method=method, tokenizer=tokenizer,
                        epochs=8, lr=0.1, progress=False)
    assert _cos(knob.direction, u) >= 0.9, f"{method}: |cos| = {_cos(knob.direction, u):.3f}"
    assert knob.c_ctx > knob.c_prior  # oriented: larger u·h means "use the context"


def test_das_is_not_fooled_by_a_larger_causally_inert_decoy(decoy):
    model, tokenizer, u, d = decoy
    task, _ = make_tasks()
    das = context_knob(model, task, layer=SITE, tokenizer=tokenizer, epochs=8, lr=0.1,
                       progress=False)
    mean_diff = context_knob(model, task, layer=SITE, method="mean_diff", tokenizer=tokenizer)
    probe = context_knob(model, task, layer=SITE, method="probe", tokenizer=tokenizer)
    # separation-based directions chase the decoy, the larger intent difference ...
    assert _cos(mean_diff.direction, d) > 0.8 and _cos(probe.direction, d) > 0.8
    # ... DAS leans on the causal direction (it may borrow some of d: swapping d too
    # enlarges the u swap along a mixed direction, and d itself is inert)
    assert _cos(das.direction, u) >= 0.7 and _cos(das.direction, d) < 0.5
    assert _cos(das.direction, u) > _cos(mean_diff.direction, u) + 0.3
    assert das.interchange_accuracy >= 0.9


def test_steering_flips_answers_and_drives_bare_prompts(planted):
    model, tokenizer, _, _ = planted
    task, bare = make_tasks()
    knob = context_knob(model, task, layer=SITE, tokenizer=tokenizer, epochs=8, lr=0.1,
                        progress=False)
    data = prepare_intent(task, tokenizer)
    # instructed prompts steered to the opposite intent answer with the other answer
    to_prior = knob.steered_predictions(model, data.ctx_prompts, knob.c_prior, tokenizer=tokenizer)
    to_ctx = knob.steered_predictions(model, data.prior_prompts, knob.c_ctx, tokenizer=tokenizer)
    flipped = torch.cat([to_prior == data.prior_ids, to_ctx == data.ctx_ids]).float().mean()
    assert flipped >= 0.8
    # bare prompts: no instruction, the knob alone decides
    sweep = steering_sweep(knob, model, bare, tokenizer=tokenizer, n_points=9)
    assert sweep.pair_acc >= 0.8
    assert sweep.table["frac_ctx"].iloc[-1] > 0.8 and sweep.table["frac_prior"].iloc[0] > 0.8


def test_steer_edits_the_prompt_not_generated_tokens(planted):
    model, tokenizer, _, _ = planted
    task, _ = make_tasks()
    knob = context_knob(model, task, layer=SITE, method="mean_diff", tokenizer=tokenizer)
    seen = []

    def look(module, args, kwargs):
        seen.append(args[0][:, -1].clone())

    ids, mask = encode_left(tokenizer, ["v1 e2"])
    with knob.steer(model, 3.0):
        handle = blocks(model)[SITE].register_forward_pre_hook(look, with_kwargs=True)
        try:
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=torch.ones(1, 3, dtype=torch.long),
                  **{cache_kwarg(model): out.past_key_values})
        finally:
            handle.remove()
    # the hook registered after steer sees the edited prompt state only on the first call
    assert len(seen) == 2
    assert abs(float(seen[0] @ knob.direction) - 3.0) < 1e-4
    assert abs(float(seen[1] @ knob.direction) - 3.0) > 1e-2


def test_layer_search_finds_the_instruction_path_and_traces_it(planted, tmp_path):
    model, tokenizer, _, _ = planted
    task, _ = make_tasks()
    search = layer_search(model, task, tokenizer=tokenizer, progress=False)
    # intent reaches the last token through block 0's attention (the site is block 1's input)
    assert search.ranges["ctx->prior"][0] == 0 and search.suggest_layer() == SITE
    trace = search.table[search.table["pairing"] == "ctx->prior"]
    assert list(trace["phase"])[:1] == ["upper"] and len(trace) <= 2 * math.ceil(math.log2(3)) + 3
    assert search.p_source.shape == (len(search.table), 2)
    search.save(tmp_path / "search")
    again = LayerSearch.load(tmp_path / "search")
    assert again.ranges == search.ranges and torch.equal(again.p_source, search.p_source)
    knob = context_knob(model, task, method="mean_diff", tokenizer=tokenizer, progress=False)
    assert knob.layer == SITE and knob.options["layer_from"] == "layer_search"


def test_knob_save_load_transfer_table_and_plots(planted, tmp_path):
    model, tokenizer, _, _ = planted
    task, bare = make_tasks()
    knob = context_knob(model, task, layer=SITE, method="mean_diff", tokenizer=tokenizer)
    knob.save(tmp_path / "knob")
    again = ContextKnob.load(tmp_path / "knob")
    assert torch.equal(again.direction, knob.direction) and again.layer == SITE
    assert again.c_ctx == knob.c_ctx and again.history.equals(knob.history)
    scrambled = tiny.llama(seed=3, hidden=D_MODEL, layers=2, vocab=len(tokenizer))
    result = knob_transfer(knob, {"planted": model, "random": scrambled}, task, bare,
                           tokenizer=tokenizer, n_points=7, progress=False)
    rows = result.table.set_index("model")
    assert rows.loc["planted", "auc"] == 1.0 and rows.loc["planted", "steered_pair_acc"] >= 0.8
    assert rows.loc["random", "instructed_pair_acc"] < 0.2
    assert set(result.projections["model"]) == {"planted", "random"}
    result.save(tmp_path / "transfer")
    assert KnobTransfer.load(tmp_path / "transfer").sweep.equals(result.sweep)

    from interp.plots import context as plots

    profile = intent_subspace_profile(model, task, ks=(1, 2), tokenizer=tokenizer)
    search = layer_search(model, task, tokenizer=tokenizer, progress=False)
    for figure in (plots.layer_search_figure(search), plots.projection_violins_figure(result),
                   plots.steering_sweep_figure(result), plots.separation_scatter_figure(result),
                   plots.subspace_profile_figure(profile)):
        axes = figure.get_axes()
        assert axes and all(ax.get_xlabel() and ax.get_ylabel() for ax in axes[:1])
        assert figure.get_suptitle() or axes[0].get_title()
    for figure in (plots.layer_search_plotly(search), plots.projection_violins_plotly(result),
                   plots.steering_sweep_plotly(result), plots.separation_scatter_plotly(result),
                   plots.subspace_profile_plotly(profile)):
        assert figure.layout.title.text and len(figure.data) >= 2


def test_subspace_profile_sees_a_one_dimensional_intent_only_where_it_is(planted):
    model, tokenizer, _, _ = planted
    task, _ = make_tasks()
    profile = intent_subspace_profile(model, task, ks=(1, 4), tokenizer=tokenizer)
    table = profile.table.set_index(["layer", "k"])["interchange_acc"]
    assert table[(SITE, 1)] >= 0.9      # the planted knob: one direction flips the answer
    assert table[(0, 4)] == 0.0         # block 0's input at the last token is the query word


def test_das_fast_path_matches_full_forwards(planted):
    model, tokenizer, _, _ = planted
    task, _ = make_tasks()
    kwargs = {"layer": SITE, "tokenizer": tokenizer, "epochs": 1, "lr": 1e-2, "progress": False,
              "seed": 3}
    fast = context_knob(model, task, fast=True, **kwargs)
    slow = context_knob(model, task, fast=False, **kwargs)
    assert _cos(fast.direction, slow.direction) > 0.999
    again = context_knob(model, task, fast=True, **kwargs)
    assert torch.equal(again.direction, fast.direction)  # seeded: reruns are identical


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_bad_input_raises_named_errors(planted):
    model, tokenizer, _, _ = planted
    task, _ = make_tasks()
    only_ctx = task.subset([i for i, k in enumerate(task.extras["intent"]) if k == "ctx"])
    with pytest.raises(TaskError, match="only intent 'ctx'"):
        context_knob(model, only_ctx, layer=SITE, tokenizer=tokenizer, progress=False)
    with pytest.raises(LayerRangeError, match="layer 5 is out of range: this model has 2 blocks"):
        context_knob(model, task, layer=5, tokenizer=tokenizer, progress=False)
    knob = context_knob(model, task, layer=SITE, method="mean_diff", tokenizer=tokenizer)
    wider = tiny.llama(hidden=64, layers=2, vocab=len(tokenizer))
    with pytest.raises(ArchitectureMismatchError, match="32-dimensional.*64-dimensional"):
        knob.project(wider, ["v1 e2"], tokenizer=tokenizer)
    with pytest.raises(ArchitectureMismatchError), knob.steer(wider, 1.0):
        pass
    with pytest.raises(TaskError, match="lacks extras"):
        context_knob(model, task.__class__(name="plain", prompts=["a"], answers=[" b"]),
                     layer=SITE, tokenizer=tokenizer)


def test_auc_and_dprime_on_known_distributions():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4000, generator=generator) + 1.0
    b = torch.randn(4000, generator=generator)
    auc, dprime = auc_and_dprime(a, b)
    # d' = 1 for unit-variance normals one apart; AUC = Φ(d'/√2) ≈ 0.760
    assert dprime == pytest.approx(1.0, abs=0.06) and auc == pytest.approx(0.760, abs=0.015)


@pytest.mark.slow
def test_zoo_knob_steers_the_full_fine_tune_without_instructions(zoo_ready):
    """Issue 7's bar on the zoo: instructed PairAcc ≥ 0.85, steered ≥ 0.8 of it (notebook 04's sizes)."""
    from interp.figures import zoo_pairs
    from interp.sections.context import QUICK, compute

    results = compute(zoo_pairs("intent"), options=QUICK, progress=False)
    assert results["home"] == "intent-full"  # every fine-tune solves the task; ties go to full FT
    assert results["layer"] == 0  # the intent word is the last token: the knob is at its input
    rows = results["transfer"].table.set_index("model")
    full = rows.loc["intent-full"]
    assert full["instructed_pair_acc"] >= 0.85
    assert full["steered_pair_acc"] >= 0.8 * full["instructed_pair_acc"]
    assert rows.loc["base", "instructed_pair_acc"] < 0.1  # the base does not follow instructions
    sweep = results["layer_sweep"].set_index("layer")
    assert sweep.loc[0, "interchange_acc"] > 0.9 > sweep.loc[1, "interchange_acc"]


def test_d_prime_without_spread_is_infinite_not_a_huge_number():
    ctx, prior = torch.full((5,), 0.7), torch.full((4,), -0.2)
    auc, d = auc_and_dprime(ctx, prior)
    assert auc == 1.0 and d == math.inf
    assert auc_and_dprime(prior, ctx)[1] == -math.inf
    assert math.isnan(auc_and_dprime(ctx, ctx.clone())[1])
    auc, d = auc_and_dprime(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]))
    assert auc == 0.875 and d == pytest.approx(1 / math.sqrt(0.5))
