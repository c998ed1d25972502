"""`releq-tvm bench ...`: speed benchmarks whose results land under results/ with provenance."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

from releq_tvm.cli_options import act_bits_option, checkpoint_option
from releq_tvm.peers import DEFAULT_NETWORKS, DEFAULT_THREADS, PEERS_TIMING, PeersConfig
from releq_tvm.sim.bench import bench_cli as _sim_bench

if TYPE_CHECKING:  # importing the kernels imports TVM: the CLI imports it only when a command runs
    from releq_tvm.kernels.bench import KernelBench


@click.group("bench")
def bench_group() -> None:
    """Benchmarks: bit-serial kernels on this CPU, the Stripes simulator's speed, our builds against peers."""


def kernels_command(out_path: str) -> str:
    """The command that remakes a kernels CSV, with the thread count when it was set by hand."""
    threads = os.environ.get("TVM_NUM_THREADS")
    return f"{f'TVM_NUM_THREADS={threads} ' if threads else ''}releq-tvm bench kernels --out {out_path}"


def write_kernels_csv(bench: KernelBench, path, command: str) -> None:
    """``bench``'s rows under the project's provenance header (its facts as notes), written atomically.

    Read it with ``pandas.read_csv(path, comment="#")`` or :func:`releq_tvm.report.tables.read_csv`.
    """
    from releq_tvm.io import atomic_write_text
    from releq_tvm.kernels.bench import CSV_COLUMNS
    from releq_tvm.report.provenance import Provenance
    from releq_tvm.report.tables import csv_text

    header = Provenance(command=command, seed=str(bench.seed)).header_lines(bench.notes())
    atomic_write_text(path, csv_text(CSV_COLUMNS, bench.rows, header))


@bench_group.command("kernels")
@click.option("--out", "out_path", default="results/kernels.csv", show_default=True)
def bench_kernels_cmd(out_path: str) -> None:
    """Latency (warm or cold weights), throughput, efficiency against the measured peaks and the memory
    bound of bit-serial, lut and int8 kernels -> results/kernels.csv."""
    from releq_tvm.compile.layers import KernelTiming
    from releq_tvm.kernels.bench import bench_kernels

    bench = bench_kernels(time_kernels=KernelTiming(),
                          progress=lambda message: click.echo(f"  .. {message}", err=True))
    write_kernels_csv(bench, out_path, kernels_command(out_path))
    click.echo(f"wrote {out_path}")


@bench_group.command("peers")
@click.argument("networks", metavar="[NET...]", nargs=-1)
@click.option("--bits", "bits_texts", multiple=True,
              help="Weight bits per layer for every NET (one value = all layers; 'published': each one's published "
                   "bits, the default). Repeat to time several configurations, e.g. --bits published --bits 4.")
@act_bits_option(help="Activation bits per layer for every NET (one value = all layers; default 8).")
@click.option("--threads", "threads_text", default=",".join(map(str, DEFAULT_THREADS)), show_default=True,
              help="Thread counts, comma-separated.")
@click.option("--rounds", type=click.IntRange(1), default=PEERS_TIMING.repeats, show_default=True,
              help="Interleaved timing rounds.")
@click.option("--accuracy-images", type=click.IntRange(0), default=PeersConfig.accuracy_images, show_default=True,
              help="MNIST test images for each engine's accuracy (MNIST networks with trained weights; 0 skips).")
@click.option("--out", "out_path", default="results/peers.csv", show_default=True, help="CSV; the PNG goes beside it.")
@checkpoint_option
@click.option("--target", "target_text", default=None, help="Target of our builds (default: this machine's CPU).")
@click.option("--child-json", default=None, hidden=True, help="Internal: time one thread count, write JSON timings here.")
def bench_peers_cmd(networks, bits_texts, act_bits_text, threads_text, rounds, accuracy_images, out_path, checkpoint,
                    target_text, child_json) -> None:
    """Our builds beside torch, onnxruntime and OpenVINO (fp32, int8), same weights -> results/peers.csv + .png.

    Batch 1, one process, interleaved rounds, median and IQR per engine and thread count; NET
    defaults to lenet resnet20. Needs the peers extra: `pip install 'releq-tvm[peers]'`.
    """
    import dataclasses
    from pathlib import Path

    from releq_tvm import peers

    peers.import_peer_engines()  # one line on what to install, before any build
    networks = networks or DEFAULT_NETWORKS
    threads = peers.parse_threads(threads_text)
    config = peers.PeersConfig(timing=dataclasses.replace(PEERS_TIMING, repeats=rounds), accuracy_images=accuracy_images)

    def say(message: str) -> None:
        click.echo(f"  .. {message}", err=True)

    if child_json:
        bits = bits_texts[0] if bits_texts else None  # the parent passes one configuration
        builds = peers.build_peers(networks[0], bits, act_bits_text, config, checkpoint, target_text)
        rows = peers.measure_peers(builds, threads, config, allow_child=False)
        peers.write_child_timings(rows, child_json)
        return
    command = peers.peers_command(networks, bits_texts or (None,), act_bits_text, threads, rounds, out_path,
                                  checkpoint)
    rows = peers.run_peers(networks, bits_texts or (None,), act_bits_text, threads, config, out_path, checkpoint, target_text,
                           command, progress=say)
    click.echo(peers.format_peers_table(rows))
    click.echo(f"wrote {out_path} and {Path(out_path).with_suffix('.png')}")


bench_group.add_command(_sim_bench.commands["speed"], "sim")
bench_group.add_command(_sim_bench.commands["published"], "stripes-published")


@bench_group.command("search")
@click.argument("network", default="lenet")
@click.option("--measure", type=click.Choice(["none", "cpu", "stripes"]), default="stripes", show_default=True,
              help="The search's cost backend.")
@click.option("--workers", "workers_text", default="1,2", show_default=True,
              help="Ray worker counts to compare, comma-separated (the first is the reference).")
@click.option("--episodes", type=click.IntRange(1), default=80, show_default=True, help="Training episodes per search.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--root", default="runs/bench-search", show_default=True, help="Folder of the benchmark's runs.")
@click.option("--out", "out_path", default="results/search_workers.csv", show_default=True)
def bench_search_cmd(network, measure, workers_text, episodes, seed, root, out_path) -> None:
    """New configurations a search evaluates per wall-clock minute at each --workers N (each from an
    empty cache, --envs N) -> results/search_workers.csv. Needs the distributed extra for N > 1."""
    from pathlib import Path

    from releq_tvm.config_fields import parse_counts
    from releq_tvm.io import atomic_write_text
    from releq_tvm.report.provenance import Provenance
    from releq_tvm.report.tables import csv_text
    from releq_tvm.search.config import SearchConfig
    from releq_tvm.search.parallel import check_ray_installed
    from releq_tvm.search.workers_bench import COLUMNS, bench_workers

    workers = parse_counts(workers_text, "--workers")
    check_ray_installed(max(workers), None)
    base = SearchConfig(network=network, measure=measure, episodes=episodes, seed=seed)
    rows = bench_workers(base, workers, Path(root), echo=lambda line: click.echo(f"  .. {line}", err=True))
    command = (f"releq-tvm bench search {network} --measure {measure} --workers {workers_text} --episodes {episodes} "
               f"--seed {seed} --root {root} --out {out_path}")
    notes = [
        "new_configurations: lookups less cache hits over the training episodes, each search from an empty cache "
        "of its own; train_minutes: the training episodes' wall time (Ray start and set-up excluded, in wall_minutes)",
        "speedup: new_per_minute over the first row's; the searches ran one after another on this machine",
    ]
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, csv_text(COLUMNS, rows, Provenance(command=command, seed=str(seed)).header_lines(notes)))
    for row in rows:
        click.echo(f"workers {row['workers']}: {row['new_per_minute']} new configurations per minute "
                   f"(speedup {row['speedup']}x)")
    click.echo(f"wrote {out_path}")
