"""Export: a slice as a Hugging Face model directory that AutoModelForCausalLM loads, with gisp-deploy installed
(registered classes) and without it (trust_remote_code), computing exactly what the loader and the oracle do."""

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import gisp_deploy
from gisp_deploy.artifact import MANIFEST, RANKING, ArtifactError
from gisp_deploy.cli import app
from gisp_deploy.modeling import padding_params
from gisp_deploy.plan import plan_slice
from gisp_deploy.slicing import export as export_mod
from gisp_deploy.slicing.export import REMOTE_CODE_FILE, export_slice
from gisp_deploy.slicing.loader import load
from tests.factory import make_model_dir
from tests.factory import (ATOL, Source, decoder_linear_params, dense_model, extreme_plans, hand_plan,
                           probe_ids)

ROOT = Path(gisp_deploy.__file__).resolve().parents[1]
PY_TIMEOUT = 300


def _mask():
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    return mask


# name -> (config overrides, how the slice is chosen)
CASES = {
    # uneven KV groups, a layer without attention or MLP (their biases left), tied embeddings
    "llama-gqa": (dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True), "mixed"),
    "qwen2-gqa": ({}, "mixed"),  # q/k/v biases; attention-less layer without any bias
    "qwen3-gqa": ({}, 0.4),  # q/k norms; a sparsity, rounded for tensor parallelism 2
}


class Exported:
    def __init__(self, root, name):
        overrides, how = CASES[name]
        model_dir = make_model_dir(root, name, **overrides)
        self.src = Source(model_dir, dense_model(model_dir), root, "q_head")
        art = self.src.artifact
        self.out = root / f"{name}-slice"
        if how == "mixed":
            self.plan = hand_plan(self.src.shape, extreme_plans(self.src.shape)["mixed"])
            self.summary = export_slice(art, self.out, plan=self.plan)
        else:
            self.plan = plan_slice(art.ranking, how, tp_size=2)
            self.summary = export_slice(art, self.out, how, tp_size=2)
        self.loaded = load(art, plan=self.plan)
        with torch.no_grad():
            self.logits = self.loaded(probe_ids(), attention_mask=_mask()).logits
            self.tokens = self.loaded.generate(probe_ids(), attention_mask=_mask(), max_new_tokens=8, do_sample=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return {name: Exported(tmp_path_factory.mktemp(name), name) for name in CASES}


def _clean_python(code: str, tmp: Path, verbosity: str = "error") -> subprocess.Popen:
    """A Python that sees the venv's packages but not gisp-deploy: -I drops the working directory and
    PYTHONPATH, -S skips site (so the editable install's .pth finder never runs); the site-packages
    folders are put back on sys.path by hand, without their .pth files. Its stdin is closed: a prompt fails."""
    prologue = f"import sys; sys.path.extend({site.getsitepackages()!r})\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY=verbosity)
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", prologue + textwrap.dedent(code)], cwd=tmp, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _python(code: str, tmp: Path) -> subprocess.Popen:
    """The project's Python (gisp-deploy installed), in a fresh process."""
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=PY_TIMEOUT)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def background(exported, tmp_path_factory):
    """The fresh-process checks, started together (each is mostly imports) and awaited by the tests."""
    tmp = tmp_path_factory.mktemp("procs")
    dirs = {name: str(e.out) for name, e in exported.items()}
    results = tmp / "remote.pt"
    remote = _clean_python(f"""
        import importlib.util
        assert importlib.util.find_spec("gisp_deploy") is None, "gisp_deploy must not be importable here"
        import torch
        from transformers import AutoModelForCausalLM
        dirs = {dirs!r}
        try:
            AutoModelForCausalLM.from_pretrained(dirs["qwen2-gqa"])
        except ValueError as e:
            assert "trust_remote_code" in str(e), e
        else:
            raise AssertionError("loaded custom code without trust_remote_code")
        ids = torch.randint(3, 8000, (2, 10), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, :3] = 0
        out = {{}}
        for name, d in dirs.items():
            model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            with torch.no_grad():
                logits = model(ids, attention_mask=mask).logits
            out[name] = (type(model).__name__, logits,
                         model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False))
        torch.save(out, {str(results)!r})
    """, tmp)
    # registration through `import gisp_deploy`: before transformers, reaching the auto classes through a model
    # class (whose import imports them: registering there would be circular) ...
    lazy = _python(f"""
        import sys
        import gisp_deploy
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "import gisp_deploy must stay cheap"
        from transformers import LlamaForCausalLM
        assert "gisp_deploy.modeling" in sys.modules
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({dirs["llama-gqa"]!r})
        assert type(model).__module__ == "gisp_deploy.modeling", type(model)
        AutoTokenizer.from_pretrained({dirs["llama-gqa"]!r})
        print(type(model).__name__)
    """, tmp)
    # ... and after transformers' auto classes are already imported
    late = _python(f"""
        from transformers import AutoModelForCausalLM
        import gisp_deploy
        model = AutoModelForCausalLM.from_pretrained({dirs["qwen3-gqa"]!r})
        print(type(model).__name__)
    """, tmp)
    # the README's recipe for loading an export without gisp-deploy, after what happens without its flags
    recipe = _readme_recipe()
    readme = recipe and _clean_python(f"""
        import importlib.util, sys, warnings
        assert importlib.util.find_spec("gisp_deploy") is None, "gisp_deploy must not be importable here"
        warnings.simplefilter("always")
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained({dirs["llama-gqa"]!r})  # no flag: a prompt (fails: no stdin), a warning
        print(MARK, flush=True)
        print(MARK, file=sys.stderr, flush=True)
    """.replace("MARK", repr(MARK)) + recipe.replace('"llama3-s40"', repr(dirs["llama-gqa"])) + """
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        print(type(model).__name__, tokenizer("It is a truth universally acknowledged").input_ids)
    """, tmp, verbosity="warning")
    return {"remote": (remote, results), "lazy": lazy, "late": late, "readme": readme}


MARK = "---- the README's recipe ----"
README_RECIPE = "# loading an export where gisp-deploy is not installed"


def _readme_recipe() -> str | None:
    """The README's one python block that starts with README_RECIPE, indented as the test's code around it."""
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    found = [b for b in blocks if b.startswith(README_RECIPE)]
    return textwrap.indent(found[0], " " * 8) if len(found) == 1 else None


# ---- (a) gisp-deploy installed and imported: the registered classes
@pytest.mark.parametrize("name", list(CASES))
def test_registered_classes_match_loader_and_oracle(exported, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    e = exported[name]
    model = AutoModelForCausalLM.from_pretrained(e.out, dtype=torch.float32)
    family = {"llama-gqa": "Llama", "qwen2-gqa": "Qwen2", "qwen3-gqa": "Qwen3"}[name]
    assert type(model).__name__ == f"Gisp{family}ForCausalLM" and type(model) is type(e.loaded)
    assert model.config.gisp_layers == e.loaded.config.gisp_layers
    assert not model.training
    with torch.no_grad():
        logits = model(probe_ids(), attention_mask=_mask()).logits
        want = e.src.oracle(e.plan)(probe_ids(), attention_mask=_mask()).logits
    sel = _mask().bool()
    torch.testing.assert_close(logits, e.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits[sel], want[sel], atol=ATOL, rtol=0)
    tokens = model.generate(probe_ids(), attention_mask=_mask(), max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens, e.tokens)
    assert decoder_linear_params(model) == e.plan.kept_params + padding_params(e.plan)
    AutoTokenizer.from_pretrained(e.out)
    if name == "llama-gqa":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert type(model.model.layers[0].self_attn).__name__ == "EmptyAttention"
        assert model.model.layers[0].self_attn.o_proj.bias.abs().sum() > 0  # the kept bias was loaded


@pytest.mark.parametrize("name", list(CASES))
def test_directory_layout_and_config(exported, name):
    e = exported[name]
    art = e.src.artifact
    names = {p.name for p in e.out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", REMOTE_CODE_FILE} <= names
    assert MANIFEST not in names and RANKING not in names
    assert not [p for p in e.out.parent.iterdir() if p.name.startswith(f".{e.out.name}")]  # no temporary left
    assert (e.out / REMOTE_CODE_FILE).read_bytes() == Path(export_mod.modeling.__file__).read_bytes()
    cfg = json.loads((e.out / "config.json").read_text())
    family = cfg["architectures"][0][len("Gisp"):-len("ForCausalLM")]
    assert cfg["model_type"] == f"gisp_{family.lower()}"
    assert cfg["auto_map"] == {"AutoConfig": f"modeling_gisp.Gisp{family}Config",
                               "AutoModelForCausalLM": f"modeling_gisp.Gisp{family}ForCausalLM"}
    assert cfg["gisp_layers"] == e.loaded.config.gisp_layers and len(cfg["gisp_layers"]) == 4
    sl = cfg["gisp_slice"]
    assert sl["source"] == str(art.path.resolve()) and sl["method"] == "random" and sl["unit"] == "q_head"
    assert sl["ranking_sha256"] == art.manifest["ranking_sha256"]
    assert sl["sparsity"] == e.plan.sparsity and sl["achieved_sparsity"] == round(e.plan.achieved_sparsity, 6)
    assert sl["tp_size"] == (2 if name == "qwen3-gqa" else 1)
    # only the compact tensors are stored (a tied lm_head is not)
    with safe_open(str(e.out / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_slice(k).get_shape() for k in f.keys()}
    want = {k: list(v.shape) for k, v in e.loaded.state_dict().items()}
    if name == "llama-gqa":
        want.pop("lm_head.weight")
    assert stored == want
    assert e.summary["weight_bytes"] == (e.out / "model.safetensors").stat().st_size


def test_rounded_export_widths_split_over_tp(exported):
    for spec in exported["qwen3-gqa"].loaded.config.gisp_layers:
        assert spec["q_heads"] % 2 == 0 and spec["intermediate"] % 2 == 0


# ---- (b) fresh processes: without gisp-deploy (remote code), and the lazy registration of `import gisp_deploy`
def test_remote_code_without_gisp_deploy(exported, background):
    proc, results = background["remote"]
    _finish(proc)
    got = torch.load(results)
    for name, e in exported.items():
        cls_name, logits, tokens = got[name]
        assert cls_name == type(e.loaded).__name__
        torch.testing.assert_close(logits, e.logits, atol=1e-6, rtol=0)
        assert torch.equal(tokens, e.tokens)


def test_readme_recipe_loads_tokenizer_and_model_without_prompt_or_warning(exported, background):
    """Without gisp-deploy, AutoTokenizer reads config.json (whose class is in modeling_gisp.py) before anything
    else: without trust_remote_code it asks to run that code and, declined, warns about a model type ``. The
    README says so and gives the recipe that needs neither a prompt nor shows a warning."""
    from transformers import AutoTokenizer

    proc = background["readme"]
    assert proc, f"README.md has no (or several) python block starting with {README_RECIPE!r}"
    out, err = proc.communicate(timeout=PY_TIMEOUT)
    assert proc.returncode == 0, err[-3000:]
    out_before, out_after = out.split(MARK + "\n")
    err_before, err_after = err.split(MARK + "\n")
    assert "Do you wish to run the custom code?" in out_before  # what the README warns about, still so
    assert "to instantiate a model of type ``" in err_before
    assert "Do you wish" not in out_after and "custom code" not in out_after + err_after, out_after + err_after
    assert "model of type" not in err_after and "Warning" not in err_after, err_after
    name, ids = out_after.strip().split(" ", 1)
    tokenizer = AutoTokenizer.from_pretrained(exported["llama-gqa"].out)
    assert name == "GispLlamaForCausalLM"
    assert ids == str(tokenizer("It is a truth universally acknowledged").input_ids)


def test_import_gisp_deploy_registers_lazily(background):
    assert _finish(background["lazy"]).split() == ["GispLlamaForCausalLM"]
    assert _finish(background["late"]).split() == ["GispQwen3ForCausalLM"]


# ---- (c) the command line, overwrite and atomicity
def test_cli_export_end_to_end(exported, tmp_path):
    from transformers import AutoModelForCausalLM

    art = exported["qwen2-gqa"].src.artifact
    out = tmp_path / "cli-slice"
    res = subprocess.run([sys.executable, "-m", "gisp_deploy.cli", "export", str(art.path), "--sparsity", "0.4",
                          "--out", str(out)], capture_output=True, text=True, timeout=PY_TIMEOUT, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stderr and "GispQwen2ForCausalLM" in res.stderr
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.gisp_slice["sparsity"] == 0.4
    want = load(art, 0.4)
    with torch.no_grad():
        torch.testing.assert_close(model(probe_ids()).logits, want(probe_ids()).logits, atol=1e-6, rtol=0)

    runner = CliRunner()
    refused = {
        "exists": (["--sparsity", "0.4", "--out", str(out)], "already exists"),
        "beyond coverage": (["--sparsity", "0.95", "--out", str(tmp_path / "x")], "beyond what this artifact covers"),
        "negative": (["--sparsity", "-0.1", "--out", str(tmp_path / "x")], "sparsit"),
        "not a number": (["--sparsity", "abc", "--out", str(tmp_path / "x")], "abc"),
        "two values": (["--sparsity", "0.2,0.4", "--out", str(tmp_path / "x")], "one value"),
        "bad tp": (["--sparsity", "0.4", "--tp-size", "3", "--out", str(tmp_path / "x")], "tensor-parallel"),
        "bad dtype": (["--sparsity", "0.4", "--dtype", "int8", "--out", str(tmp_path / "x")], "--dtype"),
        "onto the artifact": (["--sparsity", "0.4", "--out", str(art.path), "--overwrite"], "which this command reads"),
    }
    for what, (args, message) in refused.items():
        r = runner.invoke(app, ["export", str(art.path), *args])
        assert r.exit_code == 2, (what, r.output)
        assert message in r.output.replace("\n", " "), (what, r.output)
    assert not (tmp_path / "x").exists() and (art.path / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli-slice"]


def test_overwrite_replaces_and_failure_leaves_nothing(exported, tmp_path, monkeypatch):
    art = exported["qwen3-gqa"].src.artifact
    out = tmp_path / "slice"
    export_slice(art, out, 0.2)
    with pytest.raises(ArtifactError, match="already exists"):
        export_slice(art, out, 0.5)
    export_slice(art, out, 0.5, overwrite=True, dtype="bfloat16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["gisp_slice"]["sparsity"] == 0.5 and cfg["dtype"] == "bfloat16"

    def crash(self, *args, **kwargs):
        (Path(args[0]) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(exported["qwen3-gqa"].loaded), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        export_slice(art, out, 0.3, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        export_slice(art, tmp_path / "new", 0.3)
    assert json.loads((out / "config.json").read_text())["gisp_slice"]["sparsity"] == 0.5  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slice"]  # no partial directory, no temporary


def test_sharded_export_loads(exported, tmp_path):
    from transformers import AutoModelForCausalLM

    art = exported["qwen3-gqa"].src.artifact
    out = tmp_path / "sharded"
    summary = export_slice(art, out, 0.2, max_shard_size=400_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(summary["weight_files"]) > 2 and set(index["weight_map"].values()) == set(summary["weight_files"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(probe_ids()).logits, load(art, 0.2)(probe_ids()).logits, atol=1e-6, rtol=0)
