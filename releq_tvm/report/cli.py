"""``releq-tvm report``: rebuild the files under results/ from published bits or search runs.

Its options are generated from :class:`~releq_tvm.report.build.ReportOptions` (and the
:class:`~releq_tvm.report.accuracy.AccuracyConfig` inside it), so each is spelled once, in its field.
"""

from __future__ import annotations

import click

from releq_tvm.cli_options import data_dir_option
from releq_tvm.config_cli import settings_from, settings_options
from releq_tvm.report.build import ReportOptions


@click.command("report")
@settings_options(ReportOptions)
@data_dir_option
def report_cmd(**settings):
    """Rebuild the figures and tables under --out (CSV + PNG + README.md), all or nothing."""
    from releq_tvm.report.build import build_report

    opts = settings_from(ReportOptions, settings)
    # build_report checks every name (after registering --model and the runs' models) before any work
    written = build_report(opts, progress=lambda msg: click.echo(msg, err=True))
    for path in written:
        click.echo(f"wrote {path}")
