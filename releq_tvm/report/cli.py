"""``releq-tvm report``: rebuild the files under results/ from published bits or search runs."""

from __future__ import annotations

import click

from releq_tvm.cli_options import data_dir_option
from releq_tvm.config import DEFAULTS
from releq_tvm.errors import ReleqError


def _split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return None if items == ["all"] else items


def _parse_checkpoints(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        net, sep, path = pair.partition("=")
        if not sep or not net.strip() or not path.strip():
            raise ReleqError(f"--checkpoint needs NET=FILE such as simplenet=runs/simplenet/model.pt; got {pair!r}")
        out[net.strip()] = path.strip()
    return out


@click.command("report")
@click.option("--bits-from", "bits_from", multiple=True, default=("published",), show_default=True, metavar="published|RUN_DIR",
              help="Where the bits come from: 'published' (METHOD.md section 6) and/or search run directories "
                   "(or folders of runs); repeat the option. Networks with a run use its choice.")
@click.option("--networks", default=None, metavar="NET,NET|all",
              help="Networks to report (default: all registered, or those of the runs).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="results", show_default=True)
@click.option("--skip-cpu", is_flag=True, help="Do not build and time TVM networks: fig8 is not rewritten, CPU columns stay empty.")
@click.option("--fresh-cpu", is_flag=True, help="Re-measure CPU latencies instead of reusing the cached ones of this machine.")
@click.option("--cpu-repeats", type=click.IntRange(1), default=7, show_default=True, help="Timed samples per CPU measurement.")
@click.option("--no-accuracy", "no_accuracy", is_flag=True, help="Skip every accuracy (bitwidths.csv costs only, Pareto cost-only).")
@click.option("--no-train", is_flag=True, help="Do not train MNIST networks that ship no checkpoint (lenet4): leave their accuracy empty.")
@click.option("--finetune-steps", type=click.IntRange(0), default=DEFAULTS.finetune.long_steps, show_default=True,
              help="Fine-tune steps before the quantized accuracy of bitwidths.csv.")
@click.option("--val-images", type=click.IntRange(1), default=2000, show_default=True,
              help="Val images each Pareto point is scored on (the first N of the val split).")
@click.option("--pareto-finetune-steps", type=click.IntRange(0), default=0, show_default=True,
              help="Fine-tune steps before each Pareto point's accuracy (0: none; ~0.1 s per step and point).")
@click.option("--pareto-bits", default="2,4,8", show_default=True, help="Bit set enumerated for the Pareto files.")
@click.option("--pareto-networks", default=None, metavar="NET,NET|none",
              help="Networks that get a Pareto file (default: lenet,lenet4,simplenet,svhn10,vgg11).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch threads for training and evaluation (default: torch's choice; 1 is fastest on a busy machine).")
@click.option("--checkpoint", "checkpoints", multiple=True, metavar="NET=FILE", help="Trained float model of NET (repeatable).")
@data_dir_option
def report_cmd(bits_from, networks, out_dir, skip_cpu, fresh_cpu, cpu_repeats, no_accuracy, no_train, finetune_steps, val_images,
               pareto_finetune_steps, pareto_bits, pareto_networks, threads, checkpoints, data_dir):
    """Rebuild the figures and tables under --out (CSV + PNG + README.md), all or nothing."""
    from releq_tvm.bits import parse_action_set
    from releq_tvm.networks import get_network_spec
    from releq_tvm.report.accuracy import AccuracyConfig
    from releq_tvm.report.build import ReportOptions, build_report
    from releq_tvm.report.pareto import PARETO_NETWORKS

    nets = _split_list(networks)
    pareto_nets = PARETO_NETWORKS if pareto_networks is None else tuple(
        [] if pareto_networks.strip() == "none" else (_split_list(pareto_networks) or PARETO_NETWORKS)
    )
    for net in list(nets or []) + list(pareto_nets):
        get_network_spec(net)
    ckpts = _parse_checkpoints(checkpoints)
    for net in ckpts:
        get_network_spec(net)
    opts = ReportOptions(
        networks=nets,
        bits_from=bits_from,
        out_dir=out_dir,
        skip_cpu=skip_cpu,
        fresh_cpu=fresh_cpu,
        cpu_repeats=cpu_repeats,
        accuracy=not no_accuracy,
        accuracy_config=AccuracyConfig(data_dir=data_dir, checkpoints=ckpts, train_missing=not no_train,
                                       finetune_steps=finetune_steps, val_images=val_images,
                                       pareto_finetune_steps=pareto_finetune_steps),
        pareto_bits=parse_action_set(pareto_bits),
        pareto_networks=pareto_nets,
        threads=threads,
    )
    written = build_report(opts, progress=lambda msg: click.echo(msg, err=True))
    for path in written:
        click.echo(f"wrote {path}")
