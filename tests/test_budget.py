"""Deploy by budget: sizes in every unit, the cost of a slice against a real export and a loaded model, and the
largest slice that fits a budget, checked by brute force over every prefix of the ranking."""

import pytest
import torch

from gisp_deploy.arguments import check_kv_cache_dtype, parse_bytes, parse_count, parse_reserve
from gisp_deploy.arguments import parse_speedup
from gisp_deploy.budget import Reserve, fit, ideal_speedup, prefix_sparsity, slice_cost
from gisp_deploy.plan import plan_slice
from gisp_deploy.safetensors_file import ShardFile
from gisp_deploy.speed_table import read_speed_table
from tests.factory import Source, dense_model, make_model_dir, speed_results

# (name, unit, config overrides, tp_size, channel_multiple): plain slices; kv_group slices rounded for 2 GPUs, of a
# model with biases, a tied embedding and a vocabulary vLLM pads (8100 rows -> 8128)
CASES = {"q_head": ("llama-gqa", "q_head", {}, 1, 1),
         "kv_group-tp2": ("qwen2-gqa", "kv_group", {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 4,
                                                    "intermediate_size": 80, "vocab_size": 8100,
                                                    "tie_word_embeddings": True}, 2, 16)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(artifact, tp_size, channel_multiple, every prefix's cost at bf16 and 64 x 2 tokens of KV cache)."""
    name, unit, overrides, tp, cm = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model_dir = make_model_dir(root, name, **overrides)
    art = Source(model_dir, dense_model(model_dir), root, unit).artifact
    costs = [slice_cost(art.config, plan_slice(art.ranking, prefix_sparsity(art.ranking, p), tp_size=tp,
                                               channel_multiple=cm), dtype="bfloat16", tokens=128)
             for p in range(art.ranking.num_covered + 1)]
    return art, tp, cm, costs


FIT = dict(max_model_len=64, max_num_seqs=2, dtype="bfloat16", reserve="0")


@pytest.mark.parametrize("text,value", [("24GiB", 24 * 2**30), ("24GB", 24 * 10**9), ("512MiB", 512 * 2**20),
                                        ("1.5e9", 1_500_000_000), ("4096", 4096), ("2 gib", 2 * 2**30),
                                        ("64KiB", 65536), ("1.5TB", 1_500_000_000_000)])
def test_sizes_in_every_unit(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text,value", [("5B", 5 * 10**9), ("500M", 500 * 10**6), ("1.2e9", 1_200_000_000),
                                        ("7000000", 7_000_000), ("19.5m", 19_500_000)])
def test_parameter_counts_in_every_unit(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("parse,text", [(parse_bytes, "24gigs"), (parse_bytes, "-1GiB"), (parse_bytes, "GiB"),
                                        (parse_bytes, "0"), (parse_bytes, "inf"), (parse_bytes, "1.5e"),
                                        (parse_count, "5 billion"), (parse_count, "0.5"), (parse_count, "5GiB")])
def test_bad_budgets_are_refused_in_one_line_that_shows_the_form(parse, text):
    with pytest.raises(ValueError) as e:
        parse(text)
    msg = str(e.value)
    assert "\n" not in msg and repr(text) in msg and ("24GiB" in msg or "5B" in msg)


def test_reserve_and_kv_cache_dtype():
    assert parse_reserve("5%+512MiB") == (0.05, 512 * 2**20) and parse_reserve("0") == (0.0, 0)
    assert parse_reserve("1GiB") == (0.0, 2**30) and parse_reserve("10%") == (0.1, 0)
    assert Reserve.parse("10%+1GiB").of(10 * 2**30) == 2 * 2**30
    for bad in ("150%", "5%+lots", ""):
        with pytest.raises(ValueError, match="--reserve"):
            parse_reserve(bad)
    assert check_kv_cache_dtype("fp8") == "fp8"
    with pytest.raises(ValueError, match="--kv-cache-dtype 'int4': choose auto"):
        check_kv_cache_dtype("int4")


def test_every_prefix_has_a_decimal_sparsity_and_costs_never_grow_with_it(case):
    art, tp, cm, costs = case
    for p in range(art.ranking.num_covered + 1):
        assert art.ranking.prefix_length(prefix_sparsity(art.ranking, p)) == p
    for key in ("parameters", "weight_bytes", "kv_bytes_per_token"):
        values = [getattr(c, key) for c in costs]
        assert all(a >= b for a, b in zip(values, values[1:])), key
    assert costs[0].parameters > costs[-1].parameters


def test_the_chosen_slice_fits_and_every_larger_one_does_not(case):
    """A grid of memory and parameter budgets between the most pruned slice and the dense model: brute force over
    every prefix says the first prefix that fits is the one fit chose."""
    art, tp, cm, costs = case
    memories = sorted({c.memory for c in costs})
    params = sorted({c.parameters for c in costs})
    grid = [("memory", m) for m in [memories[0], *memories[:: max(1, len(memories) // 6)], memories[-1] + 1]]
    grid += [("params", n) for n in [params[0], *params[:: max(1, len(params) // 4)], params[-1] - 1]]
    for kind, budget in grid:
        got = fit(art, **{kind: budget}, tp_size=tp, channel_multiple=cm, **FIT)
        ok = [(c.memory if kind == "memory" else c.parameters) <= budget for c in costs]
        first = ok.index(True)  # every larger covered slice (a shorter prefix) breaks the budget
        assert art.ranking.prefix_length(got.cost.sparsity) == first, (kind, budget)
        assert got.cost == costs[first] and got.plan == plan_slice(art.ranking, got.cost.sparsity, tp_size=tp,
                                                                   channel_multiple=cm)
        assert got.binding == ("none" if first == 0 else "memory" if kind == "memory" else "parameters")
        left = budget - (got.cost.memory if kind == "memory" else got.cost.parameters)
        assert got.headroom == {"memory" if kind == "memory" else "parameters": left} and left >= 0
        roles = {c.role: c for c in got.candidates}
        assert roles["chosen"].cost == got.cost and roles["chosen"].fits
        assert got.candidates[0].cost == costs[0]  # the dense model leads, whatever its role
        assert first == 0 or (roles["next larger"].cost == costs[first - 1] and not roles["next larger"].fits)


def test_weight_bytes_are_an_exports_and_kv_bytes_the_loaded_models(case, tmp_path):
    from gisp_deploy.slicing.export import export_slice
    from gisp_deploy.slicing.loader import load

    art, tp, cm, costs = case
    got = fit(art, memory=costs[len(costs) // 2].memory, tp_size=tp, channel_multiple=cm, **FIT)
    out = export_slice(art, tmp_path / "export", got.cost.sparsity, tp_size=tp, channel_multiple=cm,
                       dtype="bfloat16")["out"]
    on_disk = per_rank = 0
    for f in sorted(tmp_path.joinpath("export").glob("*.safetensors")):
        with ShardFile(f) as shard:
            for name, e in shard.entries.items():
                n = e["data_offsets"][1] - e["data_offsets"][0]
                on_disk += n
                per_rank += vllm_rank_bytes(name, e["shape"], n, tp, art.shape.head_dim)
    assert got.cost.parameters * 2 == on_disk, out
    assert got.cost.weight_bytes == per_rank  # one GPU, a vocabulary of 64s: what export writes; else more than 1/tp
    assert got.cost.weight_bytes == on_disk if tp == 1 else got.cost.weight_bytes * tp > on_disk
    model = load(art, got.cost.sparsity, tp_size=tp, channel_multiple=cm, dtype=torch.bfloat16)
    head_dim = art.shape.head_dim
    kv_heads = [layer.self_attn.k_proj.out_features // head_dim for layer in model.model.layers
                if hasattr(layer.self_attn, "k_proj")]
    per_rank = [k // tp if k >= tp else 1 for k in kv_heads]  # fewer KV heads than GPUs: each holds a copy
    assert got.cost.kv_bytes_per_token == sum(per_rank) * head_dim * 2 * 2
    assert got.cost.kv_bytes == got.cost.kv_bytes_per_token * 64 * 2


def vllm_rank_bytes(name: str, shape, nbytes: int, tp: int, head_dim: int) -> int:
    """What one of `tp` ranks holds of an exported tensor in vLLM (vllm/model_executor/layers): norms and
    RowParallelLinear biases whole; QKV / MergedColumnParallel rows split (KV heads replicated when fewer than
    ranks); RowParallelLinear weights' columns split; VocabParallelEmbedding / ParallelLMHead rows padded to 64
    (pad_vocab_size), then split."""
    module, kind = name.split(".")[-2:]
    if module in ("embed_tokens", "lm_head"):
        return -(-shape[0] // 64) * 64 // tp * (nbytes // shape[0])
    if module in ("k_proj", "v_proj"):
        kv = shape[0] // head_dim
        return nbytes // kv * (kv // tp if kv >= tp else 1)
    if module in ("q_proj", "gate_proj", "up_proj") or (module in ("o_proj", "down_proj") and kind == "weight"):
        return nbytes // tp
    return nbytes


def test_padding_and_replicas_under_tensor_parallelism(case):
    """Per rank: a padded vocabulary and replicated norms make the rank's bytes more than a tp-th of the whole."""
    art, tp, cm, costs = case
    text = art.config
    padded = -(-text.vocab_size // 64) * 64 * text.hidden_size
    if tp == 1:
        assert costs[0].weight_bytes == (costs[0].parameters + (padded - text.vocab_size * text.hidden_size) * 2) * 2
    else:
        assert costs[0].weight_bytes > costs[0].parameters * 2 // tp
        assert text.tie_word_embeddings and costs[0].weight_read_bytes == costs[0].weight_bytes


def test_kv_cache_shrinks_only_when_a_whole_kv_group_leaves(case):
    art, tp, cm, costs = case
    dense_kv = costs[0].kv_bytes_per_token
    if art.ranking.unit == "kv_group":
        assert costs[-1].kv_bytes_per_token < dense_kv
    for p in (0, len(costs) // 2, len(costs) - 1):
        plan = plan_slice(art.ranking, prefix_sparsity(art.ranking, p), tp_size=tp, channel_multiple=cm)
        groups = sum(min(len(lp.kv_heads), max(1, len(lp.kv_heads) // tp)) for lp in plan.layers)
        assert costs[p].kv_bytes_per_token == groups * art.shape.head_dim * 2 * 2


def test_an_impossible_budget_says_how_much_is_missing_and_what_to_relax(case):
    art, tp, cm, costs = case
    budget = costs[-1].memory - 1000
    with pytest.raises(ValueError) as e:
        fit(art, memory=budget, tp_size=tp, channel_multiple=cm, **FIT)
    msg = str(e.value)
    assert "\n" not in msg and "even the most pruned slice" in msg and "1000 B more than --fit-memory" in msg
    assert "--max-model-len" in msg and "--max-sparsity" in msg
    with pytest.raises(ValueError, match=r"more than --fit-params .*raise --fit-params"):
        fit(art, params=costs[-1].parameters - 1, tp_size=tp, channel_multiple=cm, **FIT)
    with pytest.raises(ValueError, match="no budget given: pass --fit-memory"):
        fit(art, **FIT)


def test_the_reserve_comes_off_the_budget(case):
    art, tp, cm, costs = case
    memory = costs[len(costs) // 3].memory + 2**20
    got = fit(art, memory=memory, tp_size=tp, channel_multiple=cm, **{**FIT, "reserve": "1MiB"})
    assert got.cost.memory + 2**20 <= memory and got.settings["reserve_bytes"] == 2**20
    assert got.cost == fit(art, memory=memory - 2**20, tp_size=tp, channel_multiple=cm, **FIT).cost


def test_serving_counts_the_same_kv_cache(case):
    from gisp_deploy.serving.summary import slice_summary

    art, tp, cm, costs = case
    s = prefix_sparsity(art.ranking, len(costs) // 2)
    if tp == 1:
        summary = slice_summary(art.path, s, dtype="bfloat16")
        assert summary.kv_bytes_per_token == costs[len(costs) // 2].kv_bytes_per_token
        assert summary.parameters == costs[len(costs) // 2].parameters


def test_load_by_budget_and_never_with_a_sparsity_too(case):
    from gisp_deploy.slicing.loader import load

    art, tp, cm, costs = case
    memory = costs[len(costs) // 2].memory
    options = dict(max_model_len=64, max_num_seqs=2, reserve="0")
    want = fit(art, memory=memory, dtype="bfloat16", tp_size=tp, channel_multiple=cm, **options)
    model = load(art, fit_memory=memory, fit_options=options, dtype=torch.bfloat16, tp_size=tp, channel_multiple=cm)
    assert model.config.gisp_slice["sparsity"] == want.cost.sparsity
    assert sum(p.numel() for p in model.parameters()) == want.cost.parameters
    with pytest.raises(ValueError, match="a sparsity and a budget together"):
        load(art, 0.3, fit_memory=memory)


def test_the_chosen_slice_reaches_the_ideal_speedup_and_every_larger_one_does_not(case):
    """Targets between dense and the most pruned slice's bytes-read speed-up: the first prefix that reaches the
    target, found by brute force, is fit's choice; a target beyond the most pruned slice is one line."""
    art, tp, cm, costs = case
    speeds = [ideal_speedup(costs[0], c, 4, FIT["max_model_len"]) for c in costs]  # 4 sequences of 64 tokens
    assert all(a <= b for a, b in zip(speeds, speeds[1:])) and speeds[-1] > 1.05
    steps = sorted(set(speeds))
    targets = [1.0, *steps[:: max(1, len(steps) // 6)], (steps[-2] + steps[-1]) / 2, steps[-1]]
    for target in targets:
        got = fit(art, speedup=target, batch_size=4, tp_size=tp, channel_multiple=cm, **FIT)
        first = [v >= target for v in speeds].index(True)
        assert got.cost == costs[first] and got.speedup == speeds[first], target
        assert got.binding == ("none" if first == 0 else "speed-up") and got.headroom["speed-up"] >= 0
        assert got.settings["speed_source"] == "ideal (bytes read)" == got.speed_source
        roles = {c.role: c for c in got.candidates}
        assert first == 0 or (roles["next larger"].cost == costs[first - 1] and not roles["next larger"].fits)
        assert all(c.measured_speedup is None and c.perplexity == {} for c in got.candidates)
    with pytest.raises(ValueError, match=r"ideal speed-up\), below --fit-speedup .*lower --fit-speedup"):
        fit(art, speedup=speeds[-1] * 1.01, batch_size=4, tp_size=tp, channel_multiple=cm, **FIT)


def measured_table(case, tmp_path, ups=(1.2, 1.15, 1.5)):
    """A results.json measuring the slices at a quarter, half and three quarters of the ranking (speed-ups `ups`:
    the middle one dips, as noise makes a curve do) and perplexity at the middle one."""
    art, tp, cm, costs = case
    n = art.ranking.num_covered
    sparsities = [prefix_sparsity(art.ranking, p) for p in (n // 4, n // 2, 3 * n // 4)]
    path = speed_results(tmp_path / "results.json", art, dict(zip(sparsities, ups)), perplexity={sparsities[1]: 80.5},
                         tp_size=tp, channel_multiple=cm)
    return path, sparsities


def test_measured_speedups_choose_the_first_slice_that_reaches_them(case, tmp_path):
    """Brute force over every prefix on the interpolated measured curve (with a dip), never past its last point."""
    art, tp, cm, costs = case
    path, sparsities = measured_table(case, tmp_path)
    table = read_speed_table(path, 1, art.path)
    assert table.source == f"measured: {path}, batch 1, 4 points" and table.context == 32
    assert [round(p.speedup, 6) for p in table.points] == [1.0, 1.2, 1.15, 1.5] and "fall from" in table.warnings[0]
    speeds = [table.at(c.achieved_sparsity) for c in costs]
    for target in (1.0, 1.1, 1.17, 1.2, 1.3, 1.45, 1.5):
        got = fit(art, speedup=target, speed_table=path, tp_size=tp, channel_multiple=cm, **FIT)
        first = [v is not None and v >= target - 1e-12 for v in speeds].index(True)
        assert got.cost == costs[first] and got.speedup >= target - 1e-12, target
        assert got.speed_source == table.source and got.binding == ("none" if first == 0 else "speed-up")
        chosen = next(c for c in got.candidates if c.role == "chosen")
        assert chosen.measured_speedup == speeds[first]
        for c in got.candidates:  # perplexity only where it was measured, never interpolated
            measured = abs(c.cost.achieved_sparsity - table.points[2].achieved_sparsity) < 5e-7
            assert c.perplexity == ({"persuasion.txt.gz@128": 80.5} if measured else {})
    beyond = fit(art, params=costs[-1].parameters, speed_table=path, tp_size=tp, channel_multiple=cm, **FIT)
    assert beyond.cost.achieved_sparsity == costs[-1].achieved_sparsity and beyond.speedup is None  # not guessed
    with pytest.raises(ValueError, match="read at batch 1, not --batch-size 16"):
        fit(art, speedup=1.1, speed_table=table, batch_size=16, tp_size=tp, channel_multiple=cm, **FIT)
    with pytest.raises(ValueError) as e:
        fit(art, speedup=1.6, speed_table=path, tp_size=tp, channel_multiple=cm, **FIT)
    msg = str(e.value)
    assert "\n" not in msg and "never extrapolated" in msg and "reach 1.500 at most" in msg
    assert "gisp-deploy bench ARTIFACT --speed --batch-sizes 1 --sparsities" in msg


def test_a_memory_budget_and_a_speedup_together_take_the_more_pruned_slice(case, tmp_path):
    art, tp, cm, costs = case
    memory = costs[len(costs) // 3].memory
    by_memory = fit(art, memory=memory, tp_size=tp, channel_multiple=cm, **FIT)
    path, _ = measured_table(case, tmp_path)
    both = fit(art, memory=memory, speedup=1.45, speed_table=path, tp_size=tp, channel_multiple=cm, **FIT)
    alone = fit(art, speedup=1.45, speed_table=path, tp_size=tp, channel_multiple=cm, **FIT)
    assert both.cost == max(by_memory.cost, alone.cost, key=lambda c: c.achieved_sparsity)
    assert set(both.headroom) == {"memory", "speed-up"} and min(both.headroom.values()) >= 0


@pytest.mark.parametrize("spoil,said", [
    (lambda d: "not json", "cannot be read as JSON"),
    (lambda d: {"results": 3}, "no 'results' list"),
    (lambda d: {"results": [r for r in d["results"] if r["measure"] != "speed"]}, "no speed records"),
    (lambda d: {"results": [{**r, "batch_size": 16} for r in d["results"]]}, "measured at batch sizes 16, not "
                                                                             "--batch-size 1"),
    (lambda d: {"results": [{**r, "speedup": "fast"} for r in d["results"]]}, "'speedup' is 'fast', not a finite"),
    (lambda d: {"results": [{**r, "speedup": -1.0} for r in d["results"]]}, "out of range"),
    (lambda d: {"results": [{**r, "decoder_params": r.get("decoder_params", 0) + 1} for r in d["results"]]},
     "it measured another artifact"),
])
def test_a_bad_speed_table_is_refused_in_one_line(case, tmp_path, spoil, said):
    import json

    art, tp, cm, costs = case
    path, _ = measured_table(case, tmp_path)
    spoilt = spoil(json.loads(path.read_text()))
    path.write_text(spoilt if isinstance(spoilt, str) else json.dumps({**spoilt, "speed": {"tp_size": tp,
                                                                                          "channel_multiple": cm}}))
    with pytest.raises(ValueError) as e:
        fit(art, speedup=1.1, speed_table=path, tp_size=tp, channel_multiple=cm, **FIT)
    msg = str(e.value)
    assert "\n" not in msg and f"--speed-table {path}" in msg and said in msg, msg


def test_a_table_of_the_same_slices_at_another_path_is_used_with_a_warning(case, tmp_path):
    import json

    art, tp, cm, costs = case
    path, _ = measured_table(case, tmp_path)
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "results": [{**r, "artifact": "/elsewhere/art"} for r in doc["results"]]}))
    got = fit(art, speedup=1.1, speed_table=path, tp_size=tp, channel_multiple=cm, **FIT)
    assert any("measured /elsewhere/art" in w and "no digest" in w for w in got.warnings)


@pytest.mark.parametrize("text,value", [("1.5", 1.5), ("1.5x", 1.5), ("2X", 2.0), ("1", 1.0)])
def test_speedups_are_numbers_and_bad_ones_are_refused(text, value):
    assert parse_speedup(text) == value
    for bad in ("fast", "0", "-1.5", "nan", "inf"):
        with pytest.raises(ValueError, match=f"--fit-speedup {bad!r}: give a speed-up"):
            parse_speedup(bad)


def test_the_measured_curve_is_at_or_above_a_target_exactly_on_the_intervals_it_reports():
    """Rising, falling and flat segments: every point of a fine grid is inside an interval iff its interpolated
    speed-up reaches the target."""
    from gisp_deploy.speed_table import SpeedPoint, SpeedTable

    ups = [1.0, 1.3, 1.5, 1.4, 1.2, 1.2, 1.6]
    xs = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    table = SpeedTable(path="t.json", batch_size=1, points=tuple(SpeedPoint(x, x, u, u, u) for x, u in zip(xs, ups)),
                       context=32, artifact="a", perplexity=(), warnings=(), decoder_params=(), rounding=(1, 1))
    for target in (1.1, 1.25, 1.3, 1.45, 1.55, 1.6):
        spans = table.reaching(target)
        for i in range(601):
            x = i / 1000
            inside = any(lo <= x <= hi for lo, hi in spans)
            assert inside == (table.at(x) >= target - 1e-9) or min(abs(x - e) for s in spans for e in s) < 1e-6, \
                (target, x, spans)
    assert table.at(0.65) is None and table.at(0.15) == pytest.approx(1.4)


def test_a_recorded_digest_identifies_the_artifact(case, tmp_path):
    """bench records each artifact's manifest sha256: a matching one needs no warning at another path, another
    one is refused."""
    import json

    art, tp, cm, costs = case
    path, _ = measured_table(case, tmp_path)
    doc = json.loads(path.read_text())
    moved = [{**r, "artifact": "/elsewhere/art"} for r in doc["results"]]
    path.write_text(json.dumps({**doc, "results": moved, "artifact_digests": {"/elsewhere/art": art.digest}}))
    got = fit(art, speedup=1.1, speed_table=path, tp_size=tp, channel_multiple=cm, **FIT)
    assert not any("no digest" in w for w in got.warnings)
    path.write_text(json.dumps({**doc, "results": moved, "artifact_digests": {"/elsewhere/art": "0" * 64}}))
    with pytest.raises(ValueError, match="it measured the artifact with manifest sha256 0000000000000000…"):
        fit(art, speedup=1.1, speed_table=path, tp_size=tp, channel_multiple=cm, **FIT)
