"""What the README and examples tell users to run exists: no install line for a package index gisp-deploy is not
on, and every option a documented `gisp-deploy` command passes is one its command accepts."""

import re
import shlex

import pytest

from tests.factory import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "examples").rglob("*.yml")), ROOT / "Makefile"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_install_from_an_index_gisp_deploy_is_not_on(doc):
    text = doc.read_text()
    assert not re.search(r"pip install[^\n`]*\bgisp-deploy\b(?!/)", text), \
        f"{doc.name} installs gisp-deploy from a package index; it is installed from a checkout (pip install -e .)"


def _documented_commands():
    """Every `gisp-deploy SUBCOMMAND ...` line of the README's code blocks and the Makefile (continuations joined)."""
    fenced = re.findall(r"^```(\w*)\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    blocks = [body for lang, body in fenced if lang in ("", "bash", "yaml")]  # text blocks show output
    text = "\n".join(blocks) + "\n" + (ROOT / "Makefile").read_text()
    for line in text.replace("\\\n", " ").splitlines():
        m = re.search(r"gisp-deploy ([a-z-]+) (.*)", line)
        if m and not line.lstrip().startswith("#"):
            yield m.group(1), m.group(2).split("#")[0]


def test_documented_options_exist():
    import typer

    from gisp_deploy.cli import app

    commands = typer.main.get_command(app).commands
    wrong = []
    for name, rest in _documented_commands():
        if name not in commands:
            wrong.append(f"gisp-deploy {name}: no such command")
            continue
        known = {opt for p in commands[name].params for opt in (*p.opts, *p.secondary_opts)}
        for word in shlex.split(rest.replace("$(", "(")):
            if word == "--":
                break
            if word.startswith("--") and word.split("=")[0] not in known:
                wrong.append(f"gisp-deploy {name}: {word} is not an option of {name}")
    assert not wrong, "\n".join(wrong)
