"""The `releq-tvm` command line: one group, each stage a subcommand loaded on first use.

Subcommands live beside the stage they drive (``releq_tvm/<stage>/cli.py``) and are imported
lazily, so `releq-tvm networks` does not pay for importing TVM. Every error a user can fix
(:class:`ReleqError`, an unknown network, a missing checkpoint, an option value outside its
choices or range) is printed as one line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from releq_tvm.errors import ReleqError

#: name -> "module:attribute" of a click command.
_COMMANDS = {
    "networks": "releq_tvm.train_cli:networks_cmd",
    "train": "releq_tvm.train_cli:train_cmd",
    "finetune": "releq_tvm.train_cli:finetune_cmd",
    "eval": "releq_tvm.train_cli:eval_cmd",
    "compile": "releq_tvm.compile.cli:compile_cmd",
    "simulate": "releq_tvm.sim.cli:simulate_cmd",
    "search": "releq_tvm.search.cli:search_cmd",
    "search-efficiency": "releq_tvm.search.cli:search_efficiency_cmd",
    "search-seeds": "releq_tvm.search.cli:search_seeds_cmd",
    "compare-runs": "releq_tvm.search.cli:compare_runs_cmd",
    "report": "releq_tvm.report.cli:report_cmd",
    "bench": "releq_tvm.bench_cli:bench_group",
    "demo": "releq_tvm.demo:demo_cmd",
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from releq_tvm.networks import MissingCheckpointError, ModelSourceError, UnknownNetworkError

    return (ReleqError, UnknownNetworkError, MissingCheckpointError, ModelSourceError)


class ReleqGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(_COMMANDS)

    def get_command(self, ctx, name):
        target = _COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise click.ClickException(f"command {name!r} is not available in this install ({exc})") from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _user_errors() as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except click.BadParameter as exc:  # a value outside an option's choices or range: one line too
            click.echo(f"error: {exc.format_message()}", err=True)
            ctx.exit(2)


@click.group(cls=ReleqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="releq-tvm")
def main() -> None:
    """ReLeQ per-layer bitwidth search grounded in measured TVM bit-serial latency and Stripes."""


def run() -> None:  # pragma: no cover - console entry for `python -m releq_tvm`
    sys.exit(main())
