"""``releq-tvm simulate``: the Stripes per-layer table and totals for one registered network."""

from __future__ import annotations

import json

import click

from releq_tvm.cli_options import act_bits_option, checkpoint_option, network_or_model
from releq_tvm.errors import ReleqError
from releq_tvm.io import atomic_write_text
from releq_tvm.sim.config import MODES
from releq_tvm.sim.export import format_result_table, provenance_lines, result_to_dict, results_csv_text
from releq_tvm.sim.run import command_line, simulate_network


def _parse_overrides(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ReleqError(f"--set needs NAME=VALUE such as nbin_width_bits=256; got {pair!r}")
        out[key.strip()] = value.strip()
    return out


@click.command("simulate")
@network_or_model
@click.option("--bits", default=None, help="Weight bits per layer, e.g. 8,2,2,3,2; one value for all. Default: the published bits.")
@act_bits_option()
@checkpoint_option
@click.option("--mode", type=click.Choice(MODES), default="weights", show_default=True, help="Serial operand: weights (ReLeQ) or activations (Stripes as published).")
@click.option("--fc-serial/--no-fc-serial", default=True, show_default=True, help="Weights mode: fully connected layers weights-serial, or at the bit-parallel DaDN rate. Both are reported.")
@click.option("--set", "overrides", multiple=True, metavar="NAME=VALUE", help="Override a Stripes constant, e.g. --set nbin_width_bits=256 (see releq_tvm.sim.config).")
@click.option("--method", type=click.Choice(["stepped", "closed"]), default="stepped", show_default=True, help="Step the schedule (counts stalls) or use the closed form.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, help="Also write per-layer rows (both fc settings) to this CSV.")
def simulate_cmd(network, bits, act_bits_text, checkpoint, mode, fc_serial, overrides, method, as_json, csv_path):
    """Simulate NET (or your own --model) on the Stripes bit-serial accelerator against the same accelerator at 8 bits.

    A --model has no published bits: pass --bits, or --checkpoint of a fine-tuned model file (a
    search run's finetuned.pt), whose weight and activation bits are then simulated. Only its bits
    are read: Stripes cycles do not depend on the weight values.
    """
    override_map = _parse_overrides(overrides)
    run = simulate_network(network, bits, act_bits_text, mode, fc_serial, override_map, method, checkpoint)
    r = run.result
    if csv_path is not None:
        cmd = command_line(network, r.w_bits, r.a_bits, mode, fc_serial, override_map, method, csv_path)
        results = [r] if run.alternative is None else [r, run.alternative]
        atomic_write_text(csv_path, results_csv_text(results, provenance_lines(cmd, run.notes)))
    if as_json:
        click.echo(json.dumps(result_to_dict(r, run.alternative, run.notes), indent=2))
    else:
        click.echo(format_result_table(r, run.alternative, run.notes))
        if csv_path is not None:
            click.echo(f"wrote {csv_path}")
