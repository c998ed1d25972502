"""``bitwidths.csv``: the bits of every network and, where data exist, what they cost in accuracy."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from releq_tvm.bits import format_bits
from releq_tvm.report.choices import BitChoice, report_rows, row_label

BITWIDTH_COLUMNS = (
    "network",
    "dataset",
    "layers",
    "bits_source",
    "variant",
    "w_bits",
    "a_bits",
    "avg_bits",
    "avg_bits_by_weights",
    "acc_fp32_test_pct",
    "acc_quant_test_pct",
    "acc_delta_pp",
    "finetune_steps",
    "acc_source_test_pct",
    "model",
    "accuracy_note",
)


def bitwidth_rows(
    choices: Mapping[str, BitChoice],
    oracle=None,
    progress: Callable[[str], None] | None = None,
    extra: Sequence[BitChoice] = (),
) -> list[dict]:
    """One row per network, each followed by the rows of its ``extra`` choices (W+A search runs);
    accuracy cells filled when ``oracle`` (an AccuracyOracle) can measure them, at the row's
    weight bits and, where it has them, activation bits."""
    from releq_tvm.networks import get_network_spec, layer_table
    from releq_tvm.report.accuracy import calibration_images

    rows = []
    for variant, choice in report_rows(choices, extra):
        net = choice.network
        spec, table = get_network_spec(net), layer_table(net)
        n_w = [layer.n_weights for layer in table]
        row = {
            "network": net,
            # a user's model has no dataset of its own: the --data it is scored on, where known
            "dataset": spec.dataset or (oracle.model_data.get(net) if oracle is not None else None),
            "layers": len(table),
            "bits_source": choice.source,
            "variant": variant,
            "w_bits": format_bits(choice.w_bits),
            "a_bits": format_bits(choice.a_bits) if choice.a_bits else "8",
            "avg_bits": choice.mean_bits,
            "avg_bits_by_weights": sum(w * b for w, b in zip(n_w, choice.w_bits)) / sum(n_w),
            "acc_source_test_pct": choice.source_accuracy,
        }
        if oracle is None:
            row["accuracy_note"] = "accuracy not measured (--no-accuracy)"
        elif (reason := oracle.missing_reason(net)) is not None:
            row["accuracy_note"] = reason
        else:
            if progress is not None:
                progress(f"accuracy: {row_label(net, variant, choice.source)}")
            fp = oracle.full_precision(net)
            q = oracle.finetuned(net, choice.w_bits, choice.a_bits)
            c = oracle.config
            row.update(
                acc_fp32_test_pct=fp,
                acc_quant_test_pct=q,
                acc_delta_pp=q - fp,
                finetune_steps=c.finetune_steps,
                model=oracle.model_origin(net),
                accuracy_note=(
                    ("test split; weights and activations quantized (clipping levels calibrated on the first "
                     f"{calibration_images()} train images, then learned)" if choice.a_bits else
                     "test split; weights quantized")
                    + f" then fine-tuned {c.finetune_steps} steps (lr {c.finetune_lr:g}, batch {c.finetune_batch}, "
                    f"seed {c.seed})"
                ),
            )
        rows.append(row)
    return rows


def bitwidths_png(rows: Sequence[Mapping], notes: Sequence[str] = ()) -> bytes:
    """Heat map: one row per table row, one cell per layer coloured by its weight bits and labelled
    by them (``w/a`` where the row's activations are not all 8-bit)."""
    import numpy as np

    from releq_tvm.report.plots import figure, png_bytes

    bits = [[int(b) for b in r["w_bits"].split(",")] for r in rows]
    width = max(len(b) for b in bits)
    grid = np.full((len(rows), width), np.nan)
    for i, b in enumerate(bits):
        grid[i, : len(b)] = b
    fig, ax = figure(max(8.0, 0.42 * width + 5.0), 0.55 * len(rows) + 1.8)
    image = ax.imshow(grid, cmap="viridis", vmin=1, vmax=8, aspect="auto")
    for i, (b, r) in enumerate(zip(bits, rows)):
        a = [int(x) for x in r["a_bits"].split(",")]  # "8", or one value per layer
        for j, v in enumerate(b):
            text = str(v) if set(a) == {8} else f"{v}/{a[j]}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if v < 5 else "black")
    labels = []
    for r in rows:
        acc = r.get("acc_quant_test_pct")
        label = f"{row_label(r['network'], r.get('variant'), r['bits_source'])} (avg {r['avg_bits']:.2f})"
        if acc is not None:
            label += f"\n{acc:.2f}% ({r['acc_delta_pp']:+.2f} pp)"
        labels.append(label)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xticks(range(width))
    ax.set_xticklabels(range(width), fontsize=7)
    ax.set_xlabel("weight layer (forward order)")
    fig.colorbar(image, ax=ax, label="weight bits", shrink=0.8)
    ax.set_title("Weight bits per layer (w/a: weight/activation bits where activations are not 8-bit);\n"
                 "test accuracy after the long fine-tune (change vs float) where data exist", fontsize=10)
    line = 0.12 / fig.get_figheight()  # one 7-point text line, in figure fractions
    for i, note in enumerate(notes):
        fig.text(0.01, 0.01 + line * i, f"note: {note}", fontsize=7, ha="left", va="bottom")
    return png_bytes(fig, rect=(0, 0.01 + line * len(notes), 1, 1))
