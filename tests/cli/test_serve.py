"""`gisp-deploy serve` with a budget, before vLLM starts: bad options refused in one line at once, and the plan
printed with fit's own lines and table."""

import subprocess
import sys

import pytest

from gisp_deploy.budget import fit
from tests.factory import Source, dense_model, make_model_dir


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-fit")
    model_dir = make_model_dir(root, "llama-gqa")
    return Source(model_dir, dense_model(model_dir), root, "q_head").artifact


@pytest.mark.parametrize("args, said", [
    (["--sparsity", "0.4", "--fit-memory", "1GiB"], "a sparsity and a budget together: drop --sparsity"),
    (["--fit-memory", "24gigs"], "--fit-memory '24gigs': unknown unit 'gigs'; write e.g. 24GiB"),
    (["--fit-memory", "1GiB", "--kv-cache-dtype", "int3"], "--kv-cache-dtype 'int3': choose auto"),
    (["--fit-memory", "1GiB", "--reserve", "200%"], "--reserve '200%': a share is a percentage"),
    (["--sparsity", "0.4", "--reserve", "0"], "--reserve is held back from a memory budget: pass --fit-memory"),
])
def test_bad_budget_options_are_one_line_before_the_artifact_is_read(tmp_path, args, said):
    res = subprocess.run([sys.executable, "-m", "gisp_deploy.cli", "serve", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("error:") == 1 and said in " ".join(res.stderr.split())
    assert "Traceback" not in res.stderr


def test_the_plan_is_shown_with_fits_lines_and_table(artifact, capsys):
    from gisp_deploy.cli.serve import show_plan

    result = fit(artifact, memory="700MiB", max_model_len=64, max_num_seqs=2, dtype="bfloat16")
    show_plan(artifact.path)(result)
    err = " ".join(capsys.readouterr().err.split())
    assert f"chosen: sparsity {result.cost.sparsity:g}" in err and "(2 x 64 tokens)" in err
    assert "candidates (per GPU" in err and "chosen" in err.split("candidates")[1]
    assert f"serve it: gisp-deploy serve {artifact.path} --sparsity {result.cost.sparsity:g}" in err
