"""`releq-tvm compile NET --bits ...`: build the bit-serial library, write it to DIR, measure it."""

from __future__ import annotations

import json
import sys

import click

from releq_tvm.cli_options import act_bits_option, bits_option, checkpoint_option, json_option, network_or_model


@click.command("compile")
@network_or_model
@bits_option(help="Weight bits per layer, e.g. 8,2,2,3,2 (one value = all layers; default: the bits a fine-tuned "
                  "--checkpoint was trained at, else the published bits).")
@act_bits_option(help="Activation bits per layer: the bits of each weight layer's input, the first layer's being the "
                      "image (one value = all layers; default: a fine-tuned --checkpoint's, with its learned levels, "
                      "else 8).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for net.so and manifest.json (default runs/compile/<net>-<bits>).")
@checkpoint_option
@click.option("--target", "target_text", default=None,
              help='Target: host (default), an x86 CPU name, llvm/MCPU, or JSON {"kind": "llvm", "mcpu": ...}.')
@click.option("--rpc", default=None, metavar="HOST:PORT", help="Time on a TVM RPC server instead of this process.")
@click.option("--rpc-tracker", default=None, metavar="HOST:PORT",
              help="Time on a device that this TVM RPC tracker hands out (with --rpc-key).")
@click.option("--rpc-key", default=None, metavar="KEY", help="The device key to ask --rpc-tracker for.")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True, help="Images per call of the library.")
@click.option("--repeats", type=click.IntRange(1), default=7, show_default=True, help="Timing samples per measurement.")
@click.option("--measure/--no-measure", default=True, show_default=True, help="Time the layers and the network.")
@click.option("--baselines/--no-baselines", default=True, show_default=True, help="Also time the int8 and fp32 builds.")
@click.option("--fidelity-csv", type=click.Path(dir_okay=False), default=None,
              help="Add (or replace) this network's row of layer-sum vs whole-network latency in a CSV.")
@click.option("--kernels", type=click.Choice(["auto", "bitserial", "int8"]), default="auto", show_default=True,
              help="Per layer: the fastest of bit-serial at its bits, int8 and lut (dense, 1-4 weight bits) (auto), "
                   "or one family everywhere.")
@json_option
def compile_cmd(network, bits_text, act_bits_text, out_dir, checkpoint, target_text, rpc, rpc_tracker, rpc_key, batch,
                repeats, measure, baselines, fidelity_csv, kernels, as_json) -> None:
    """Compile NET (or your own --model) at per-layer bits into a deployable folder and time it.

    A --model (ONNX, .pt2 or package.module:function) has no published bits: pass --bits. Its
    activation ranges are calibrated on seeded uniform [0, 1] images.

    --kernels auto (default) gives each layer the fastest of the bit-serial kernel at its bits, the
    lut kernel (dense layers at 1-4 weight bits) and the int8 kernel (from this machine's latency
    table). Prints a per-layer table (bits, latency,
    speedup over the all-8-bit bit-serial build, the int8 and fp32 builds, the kernel auto chose)
    and whole-network totals; --json prints the same as JSON.

    --checkpoint takes a float state_dict (`releq-tvm train`) or a fine-tuned model
    (`releq-tvm finetune ... -o FILE`, or a search run's finetuned.pt): the build then uses its learned
    activation clipping levels and its bits, and computes what the fine-tuned torch model computes.

    --rpc HOST:PORT times on one TVM RPC server; --rpc-tracker HOST:PORT --rpc-key KEY on a device of
    that key which a TVM RPC tracker hands out. Either way the build targets the remote CPU unless
    --target says otherwise, and the latency table is that CPU's.
    """
    from releq_tvm.api import compile as compile_model
    from releq_tvm.bits import format_bits
    from releq_tvm.errors import ReleqError

    if fidelity_csv and not measure:
        raise ReleqError("--fidelity-csv needs the measurement; drop --no-measure")

    def say(message: str) -> None:
        if not as_json:
            click.echo(f"  .. {message}", err=True)

    built = compile_model(network, bits_text, act_bits_text, out_dir=out_dir, checkpoint=checkpoint, kernels=kernels,
                          target=target_text, rpc=rpc, rpc_tracker=rpc_tracker, rpc_key=rpc_key, batch=batch,
                          repeats=repeats, measure=measure, baselines=baselines, progress=say)
    if fidelity_csv:
        from releq_tvm.report.fidelity import write_fidelity_csv

        write_fidelity_csv([built.measurement], fidelity_csv, update=True)
    result = {
        "network": built.network,
        "out_dir": str(built.out_dir),
        "files": [path.name for path in built.files],
        "w_bits": format_bits(built.w_bits),
        "a_bits": format_bits(built.a_bits),
        "weights": built.weights,
        "frac_bits": built.frac_bits,
        "compile_s": built.compile_seconds,
        "target": built.target,
        "kernels": built.kernels,
        "layer_kernels": list(built.layer_kernels),
    }
    if built.measurement is not None:
        result["measure"] = built.measurement.to_dict() if as_json else built.measurement
    result["seconds"] = built.seconds
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        _print_report(result)


def _short(row) -> str:
    """``conv 6->16 5x5/1 14x14`` from a measured layer (its shape label)."""
    tokens = row.shape.split()[1:]
    size = next((t[2:] for t in tokens if t.startswith("in")), "")
    parts = {t[0]: t[1:] for t in tokens if not t.startswith("in")}
    if row.kind == "dense":
        return f"dense {parts['i']}->{parts['o']}"
    return f"{row.kind} {parts['i']}->{parts['o']} {parts['k']}/{parts['s'].split('x')[0]} {size}"


def _print_report(result: dict) -> None:
    echo = click.echo
    echo(f"{result['network']}: wrote {result['out_dir']}/ (net.so, manifest.json, kernels {result['kernels']}) "
         f"in {result['compile_s']:.1f} s; weights: {result['weights']}")
    m = result.get("measure")
    if not m:
        return
    has_base = "int8" in m.layers[0].ms
    head = f"{'#':>3} {'layer':<34} {'w':>2} {'a':>2} {'bits ms':>9} {'8-bit ms':>9} {'speedup':>7}"
    if has_base:
        head += f" {'int8 ms':>9} {'fp32 ms':>9} {'auto':>9}"
    echo(head)
    for row in m.layers:
        line = (f"{row.index:>3} {_short(row)[:34]:<34} {row.w_bits:>2} {row.a_bits:>2} "
                f"{row.ms['bits']:>9.4f} {row.ms['bitserial8']:>9.4f} {row.speedup_vs_8bit:>6.2f}x")
        if has_base:
            line += f" {row.ms['int8']:>9.4f} {row.ms['fp32']:>9.4f} {row.auto_kernel:>9}"
        echo(line)
    sums = m.sum_of_layers_ms
    line = (f"{'':>3} {'sum of layers':<34} {'':>2} {'':>2} {sums['bits']:>9.4f} {sums['bitserial8']:>9.4f} "
            f"{sums['bitserial8'] / sums['bits']:>6.2f}x")
    if has_base:
        line += f" {sums['int8']:>9.4f} {sums['fp32']:>9.4f}"
    echo(line)
    echo("whole network (median ms, iqr):")
    for label, name in (("bits", "bit-serial at the bits"), ("auto", "auto at the bits"), ("bitserial8", "bit-serial all 8-bit"),
                        ("int8", "int8"), ("fp32", "fp32 (TVM untuned)")):
        if label in m.network_ms:
            echo(f"  {name:<28} {m.network_ms[label]:>9.4f} ms  (iqr {m.network_iqr_ms[label]:.4f}, "
                 f"{m.timing.repeats} repeats)")
    line = f"speedup over 8-bit bit-serial {m.speedup('bitserial8'):.2f}x"
    if "int8" in m.network_ms:
        line += f"; over int8 {m.speedup('int8'):.2f}x; over fp32 (TVM untuned) {m.speedup('fp32'):.2f}x"
    echo(line)
    if "auto" in m.network_ms:
        echo(f"auto build over int8 {m.speedup('int8', 'auto'):.2f}x")
    echo(f"cost ratio: predicted from layers {m.cost_ratio_predicted:.3f}, measured {m.cost_ratio_measured:.3f} "
         f"({m.cost_ratio_error_pct:+.1f} %); sum of layers / network: bits {m.sum_over_network('bits'):.2f}, "
         f"8-bit {m.sum_over_network('bitserial8'):.2f}")
    mach = m.machine
    echo(f"machine: {mach['cpu_model']} {json.dumps(mach['target'])} TVM {mach['tvm']}; timing {m.where}")
    sys.stdout.flush()
