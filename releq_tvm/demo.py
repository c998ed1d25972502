"""`releq-tvm demo`: the main job on the embedded default, LeNet-5 on MNIST, end to end.

Each step is an ordinary subcommand, run in-process and printed with the command line a user
would type, so the demo doubles as a tour of the tool.
"""

from __future__ import annotations

import shlex
import time

import click

DEMO_BITS = "8,2,2,3,2"


def demo_steps(out: str) -> list[tuple[str, list[str]]]:
    """(title, argv) of each demo step; ``out`` is the folder the demo writes into."""
    return [
        ("full-precision accuracy of the shipped checkpoint", ["eval", "lenet"]),
        (
            f"quantize to {DEMO_BITS}, short fine-tune, accuracy",
            ["finetune", "lenet", "--bits", DEMO_BITS, "--steps", "300"],
        ),
        (
            "TVM: the deployable build at these bits (auto: each layer bit-serial or int8, whichever is faster), "
            "measured against the bit-serial builds at these bits and at 8 bits, int8 and fp32",
            ["compile", "--bits", DEMO_BITS, "lenet", "-o", f"{out}/lenet-compiled"],
        ),
        ("Stripes: cycles and energy against 8 bits", ["simulate", "lenet", "--bits", DEMO_BITS]),
        (
            "a short ReLeQ search (RecurrentPPO, Stripes cost, MNIST val accuracy)",
            [
                "search", "lenet", "--measure", "stripes", "--episodes", "24", "--final-episodes", "2",
                "--long-steps", "300", "--run-dir", f"{out}/search", "--overwrite",
            ],
        ),
        (
            "the LeNet report: Stripes and CPU speedups, bitwidths, convergence",
            [
                "report", "--networks", "lenet", "--bits-from", f"{out}/search", "--bits-from", "published",
                "--pareto-networks", "lenet", "--finetune-steps", "300", "--threads", "1", "--out", f"{out}/report",
            ],
        ),
    ]


@click.command("demo")
@click.option("--out", default="runs/demo", show_default=True, help="Folder for the demo's builds, runs and report.")
@click.pass_context
def demo_cmd(ctx: click.Context, out: str) -> None:
    """Run the main job on LeNet-5 / MNIST: accuracy, quantize + fine-tune, compile, simulate, search, report."""
    from releq_tvm.cli import main

    start = time.time()
    steps = demo_steps(out)
    for i, (title, argv) in enumerate(steps, 1):
        click.secho(f"\n[{i}/{len(steps)}] {title}\n$ releq-tvm {shlex.join(argv)}", bold=True)
        cmd = main.get_command(ctx, argv[0])
        with cmd.make_context(argv[0], argv[1:], parent=ctx.parent) as sub:
            cmd.invoke(sub)
    click.secho(f"\ndemo finished in {time.time() - start:.0f} s; outputs under {out}/", bold=True)
