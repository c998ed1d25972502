"""Click options shared by several subcommands, so each is spelled and checked once."""

from __future__ import annotations

import functools

import click

network_argument = click.argument("network", metavar="NET")
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder with the torchvision dataset files (CIFAR-10, SVHN, ImageNet). MNIST needs none.",
)
data_option = click.option(
    "--data", "data_source", default=None, metavar="SPEC",
    help="Images and labels to train and score on: imagefolder:DIR (train/, val/, test/ class folders), npz:FILE "
         "(x_train, y_train, x_val, y_val, x_test, y_test) or a dataset name (mnist, cifar10, svhn, imagenet). "
         "Default: the network's own dataset; a --model has none.",
)
split_option = click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True,
                            help="The split the accuracy is reported on.")
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


def network_or_model(command):
    """NET, or the user's own model with ``--model SOURCE`` (and ``--input-shape C,H,W``).

    Replaces :data:`network_argument`: the command still receives ``network``, a registered name.
    A ``--model`` is loaded, registered under its file's (or function's) name and checked against
    the operators the integer lowering supports before the command runs (:func:`resolve_network`).
    """
    @functools.wraps(command)
    def run(*args, network=None, model_source=None, input_shape_text=None, **kwargs):
        return command(*args, network=resolve_network(network, model_source, input_shape_text), **kwargs)

    run = click.option(
        "--input-shape", "input_shape_text", default=None, metavar="C,H,W",
        help="Input shape of a --model that does not state one (an entry point; an ONNX file with free axes).",
    )(run)
    run = click.option(
        "--model", "model_source", default=None, metavar="SOURCE",
        help="Your own model instead of NET: a .onnx file, a .pt2 file (torch.export.save) or an entry point "
             "package.module:function returning an nn.Module. Its name (in reports, run folders and --checkpoint "
             "files) is the file's stem or the function's name.",
    )(run)
    return click.argument("network", metavar="[NET]", required=False)(run)


def resolve_network(network: str | None, model_source: str | None, input_shape_text: str | None) -> str:
    """The registered name a command works on: ``network``, or ``model_source`` once registered and checked.

    Every mistake (both or neither given, a bad shape, a model that cannot be read, run or compiled)
    is a one-line error before any work is done.
    """
    from releq_tvm.config_fields import check_network_or_model
    from releq_tvm.errors import ReleqError

    check_network_or_model(network, model_source, input_shape_text)
    if model_source is None:
        return network
    if network is not None:
        raise ReleqError(f"pass NET or --model, not both (got {network} and --model {model_source})")
    from releq_tvm.compile.graph import extract_graph
    from releq_tvm.networks import create_network, register_user_model

    spec = register_user_model(model_source, parse_input_shape(input_shape_text) if input_shape_text else None)
    extract_graph(create_network(spec.name), spec.input_shape, spec.name)  # an unsupported operator fails here
    return spec.name


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """``"3,32,32"`` -> ``(3, 32, 32)``: channels, height, width, each a positive integer."""
    from releq_tvm.errors import ReleqError

    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ReleqError(f"--input-shape must be C,H,W with three positive integers such as 3,32,32; got {text!r}")
    return shape
