"""examples/lora_recover.py: LoRA on an exported slice, merged, written as an export that loads again exactly
(same per-layer widths, files and auto_map; no LoRA left; the same logits as the merged model in memory)."""

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

from gisp_deploy.serving.summary import slice_summary
from gisp_deploy.slicing.export import REMOTE_CODE_FILE, export_slice
from tests.factory import ROOT, Source, dense_model, extreme_plans, hand_plan, make_model_dir, probe_ids

SCRIPT = ROOT / "examples" / "lora_recover.py"
# a short text the tiny random model can learn in a few dozen steps (and be measured on)
TEXT = "".join(f"Miss Woodhouse walked to Highbury on day {i % 7} and met Mr. Knightley by the church.\n"
               for i in range(60))


def _script():
    spec = importlib.util.spec_from_file_location("lora_recover", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def script():
    try:
        import peft  # noqa: F401
    except ImportError:
        pytest.fail("peft is not installed: pip install -e '.[recover]' (make install does)")
    return _script()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A slice with a layer without attention and MLP (only their biases left), uneven KV groups, tied embeddings."""
    root = tmp_path_factory.mktemp("lora")
    model_dir = make_model_dir(root, "llama-gqa", tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    src = Source(model_dir, dense_model(model_dir), root, "q_head")
    plan = hand_plan(src.shape, extreme_plans(src.shape)["mixed"])
    export_slice(src.artifact, root / "slice", plan=plan)
    text = root / "text.txt"
    text.write_text(TEXT)
    return root, src, root / "slice", text


@pytest.fixture(scope="module")
def recovered(script, setup):
    root, _, slice_dir, text = setup
    said = []
    result = script.main(slice_dir, root / "recovered", train=[text], heldout=[text], steps=40, seq_len=32,
                         batch_size=4, lr=1e-2, eval_tokens=None, log=said.append)
    return result, said


def test_training_lowers_loss_and_perplexity(recovered):
    result, said = recovered
    (before,), (after,) = result["perplexity_before"].values(), result["perplexity_after"].values()
    assert after < before / 10, (before, after)
    losses = result["losses"]
    assert len(losses) == 40 and sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3, losses
    assert any(f"{before:.3f}" in s and "before" in s for s in said)
    assert any(f"{after:.3f}" in s and "after" in s for s in said)


def test_adapters_only_where_the_slice_has_weights(recovered):
    names = recovered[0]["lora_targets"]
    # layer 0: no attention, no MLP (o_proj / down_proj are bias-only); layer 1: attention only; 2, 3: both
    want = [f"model.layers.{i}.{m}" for i in (1, 2, 3)
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
            + (("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") if i > 1 else ())]
    assert sorted(names) == sorted(want)


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def test_output_is_the_same_export_with_merged_weights(setup, recovered):
    _, _, slice_dir, _ = setup
    out = slice_dir.parent / "recovered"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in slice_dir.iterdir())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", REMOTE_CODE_FILE):
        assert (out / name).read_bytes() == (slice_dir / name).read_bytes(), name
    got, want = json.loads((out / "config.json").read_text()), json.loads((slice_dir / "config.json").read_text())
    record = got["gisp_slice"].pop("lora_recovery")
    assert got == want  # per-layer widths, auto_map, model_type, provenance: as export wrote them
    assert record["steps"] == 40 and record["rank"] == 16
    new, old = _tensors(out), _tensors(slice_dir)
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in old.items()}  # no LoRA tensor
    assert not [k for k in new if "lora" in k.lower()]
    changed = [k for k in new if not torch.equal(new[k], old[k])]
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # only adapted weights moved
    assert not [k for k in changed if ".layers.0." in k or ".layers.1.mlp." in k]


def test_output_loads_with_gisp_deploy_and_matches_the_merged_model(setup, recovered):
    from transformers import AutoModelForCausalLM

    _, _, slice_dir, _ = setup
    out = slice_dir.parent / "recovered"
    merged = recovered[0]["model"]
    assert not [n for n, _ in merged.named_modules() if "lora" in n.lower()]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=False)
    assert type(model).__module__ == "gisp_deploy.modeling" and type(model) is type(merged)
    assert not [n for n, _ in model.named_modules() if "lora" in n.lower()]
    assert model.config.gisp_layers == AutoModelForCausalLM.from_pretrained(slice_dir).config.gisp_layers
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(probe_ids()).logits, merged(probe_ids()).logits, atol=1e-6, rtol=0)
    # what `gisp-deploy serve` reads of an export: the same widths and parameters as the input slice
    assert slice_summary(out) == slice_summary(slice_dir).__class__(
        **{**slice_summary(slice_dir).to_json(), "name": "recovered"})


def test_artifact_and_sparsity_from_the_command_line(script, setup, capsys):
    root, src, _, text = setup
    out = root / "from-artifact"
    rc = script.cli([str(src.artifact.path), "--sparsity", "0.4", "--train", str(text), "--heldout", str(text),
                     "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["gisp_slice"]["sparsity"] == 0.4 and cfg["gisp_slice"]["lora_recovery"]["steps"] == 2
    assert (out / REMOTE_CODE_FILE).is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".from-artifact")]  # the scratch export is gone


@pytest.mark.parametrize("args, message", [
    (["{slice}", "--sparsity", "0.4"], "drop --sparsity"),
    (["{art}"], "pass --sparsity"),
    (["{slice}", "--targets", "q_proj,attn"], "--targets"),
    (["{slice}", "--steps", "0"], "--steps"),
    (["{slice}", "--out", "{slice}", "--overwrite"], "choose another --out"),
    (["{slice}", "--out", "{text}"], "already exists"),
])
def test_bad_input_is_one_error_line(script, setup, capsys, args, message):
    root, src, slice_dir, text = setup
    fill = {"slice": str(slice_dir), "art": str(src.artifact.path), "text": str(text)}
    argv = [a.format(**fill) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(root / "never")]
    rc = script.cli([*argv, "--train", str(text), "--heldout", str(text)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (root / "never").exists()
