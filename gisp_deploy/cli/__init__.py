"""The `gisp-deploy` command line: a thin layer over the library; each subcommand owns its options.

One module per group of subcommands; each parses its options and calls the library function of the same
name with plain keyword arguments. This package is the only one that imports typer or rich, and nothing imports it.
"""

from __future__ import annotations

import typer

from . import bench, prune, quality, serve, slices
from .common import friendly

app = typer.Typer(
    name="gisp-deploy", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Prune once with GISP, then cut any sparsity out of one artifact at load time.\n\n"
         "  gisp-deploy prune MODEL --calib DATA --out ARTIFACT\n"
         "  gisp-deploy inspect ARTIFACT --sparsities 0.2,0.4\n"
         "  gisp-deploy eval ARTIFACT --sparsities 0,0.2,0.4 --text heldout.txt\n"
         "  gisp-deploy fit ARTIFACT --fit-memory 24GiB --max-model-len 8192\n"
         "  gisp-deploy export ARTIFACT --sparsity 0.4 --out model-40\n"
         "  gisp-deploy serve ARTIFACT --sparsity 0.4\n"
         "  gisp-deploy check ARTIFACT --sparsities 0.2,0.4,0.5\n"
         "  gisp-deploy bench ARTIFACT OTHER-ARTIFACT --text heldout.txt --speed")

def _version(show: bool) -> None:
    if show:
        from .. import __version__

        typer.echo(f"gisp-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")):
    pass


for name, command, epilog in (("prune", prune.prune, prune.PRUNE_EXAMPLES),  # the README tour's order
                              ("reorder", prune.reorder, prune.REORDER_EXAMPLES),
                              ("inspect", slices.inspect, slices.INSPECT_EXAMPLES),
                              ("make-task", quality.make_task, quality.MAKE_TASK_EXAMPLES),
                              ("eval", quality.eval_, quality.EVAL_EXAMPLES),
                              ("fit", slices.fit, slices.FIT_EXAMPLES),
                              ("export", slices.export, slices.EXPORT_EXAMPLES),
                              ("serve", serve.serve, serve.SERVE_EXAMPLES),
                              ("check", quality.check, quality.CHECK_EXAMPLES),
                              ("bench", bench.bench, bench.BENCH_EXAMPLES)):
    app.command(name, epilog=epilog)(friendly(command))


def plain_help(group):
    """Help as click users read it: `ARTIFACT` in the usage line rather than typer's `{artifact}`, and no `<bool>`
    after a flag."""
    for command in [group, *group.commands.values()]:
        make_help_option = command.get_help_option

        def help_option(ctx, make=make_help_option):
            option = make(ctx)
            if option is not None:
                option.metavar = ""
            return option

        command.get_help_option = help_option
        for p in command.params:
            if p.param_type_name == "argument":
                shown = p.name.upper() + ("..." if p.nargs != 1 else "")
                p.get_usage_pieces = lambda ctx, shown=shown if p.required else f"[{shown}]": [shown]
            elif getattr(p, "is_flag", False):
                p.metavar = ""
    return group


def main():
    plain_help(typer.main.get_command(app))()
