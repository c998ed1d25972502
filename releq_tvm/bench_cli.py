"""`releq-tvm bench ...`: speed benchmarks whose results land under results/ with provenance."""

from __future__ import annotations

import click

from releq_tvm.sim.bench import bench_cli as _sim_bench


@click.group("bench")
def bench_group() -> None:
    """Benchmarks: bit-serial kernels on this CPU, the Stripes simulator's speed."""


@bench_group.command("kernels")
@click.option("--out", "out_path", default="results/kernels.csv", show_default=True)
def bench_kernels_cmd(out_path: str) -> None:
    """Latency, binary ops/s and efficiency against the measured AND+popcount peak -> results/kernels.csv."""
    from releq_tvm.kernels.bench import bench_kernels

    bench_kernels(out_path)
    click.echo(f"wrote {out_path}")


bench_group.add_command(_sim_bench.commands["speed"], "sim")
bench_group.add_command(_sim_bench.commands["published"], "stripes-published")
