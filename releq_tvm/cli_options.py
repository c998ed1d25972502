"""Click options shared by several subcommands, so each is spelled and checked once."""

from __future__ import annotations

import click

network_argument = click.argument("network", metavar="NET")
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder with the torchvision dataset files (CIFAR-10, SVHN, ImageNet). MNIST needs none.",
)
checkpoint_option = click.option(
    "--checkpoint", type=click.Path(dir_okay=False), default=None,
    help="Model file: a float state_dict (`releq-tvm train`) or a fine-tuned model (`releq-tvm finetune -o`, a search "
         "run's finetuned.pt) with its bits and learned clipping levels (default: the shipped model).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def bits_option(required: bool = False, help: str = "Weight bits per layer, e.g. 8,2,2,3,2 (one value = all layers)."):
    return click.option("--bits", "bits_text", required=required, default=None, help=help)


def act_bits_option(
    help: str = "Activation bits per layer: the bits of each weight layer's input, the first layer's being the "
    "image (one value = all layers; default 8).",
):
    """``--act-bits``, checked by :func:`releq_tvm.bits.parse_bits` with ``what="--act-bits"`` where it is used."""
    return click.option("--act-bits", "act_bits_text", default=None, help=help)
