"""Registry-wide tests: every registered network is built, traced and checked for free."""

import pytest
import torch

from releq_tvm.networks import create_network, get_network_spec, layer_table, list_networks, total_macs

ALL = list_networks()
#: Layer counts of METHOD.md section 6 (MobileNet: 28 weight layers, 30 published entries mapped).
EXPECTED_LAYERS = {
    "lenet": 5, "lenet4": 4, "simplenet": 5, "svhn10": 10, "vgg11": 9,
    "vgg16": 16, "resnet20": 22, "mobilenet_v1": 28, "alexnet": 8,
}


def test_registry_holds_the_nine_networks():
    assert sorted(ALL) == sorted(EXPECTED_LAYERS)


@pytest.mark.parametrize("name", ALL)
def test_builds_and_forward_shape(name):
    spec = get_network_spec(name)
    model = create_network(name)
    with torch.no_grad():
        out = model(torch.rand(2, *spec.input_shape))
    assert out.shape == (2, spec.num_classes)


@pytest.mark.parametrize("name", ALL)
def test_layer_table_matches_published_list(name):
    spec = get_network_spec(name)
    table = layer_table(name)
    assert len(table) == EXPECTED_LAYERS[name]
    assert len(spec.published_bits) == len(table)
    assert [r.index for r in table] == list(range(len(table)))
    for r in table:
        assert r.kind in ("conv", "dwconv", "dense")
        assert r.macs > 0 and r.n_weights > 0


def test_mobilenet_mapping_is_documented_not_truncated():
    spec = get_network_spec("mobilenet_v1")
    assert len(spec.published_bits_raw) == 30
    assert spec.published_bits == spec.published_bits_raw[:27] + spec.published_bits_raw[29:]
    assert "dropped" in spec.published_bits_note
    kinds = [r.kind for r in layer_table("mobilenet_v1")]
    assert kinds.count("dwconv") == 13 and kinds[-1] == "dense"


def test_lenet_macs_by_hand():
    t = layer_table("lenet")
    # conv1: 28x28 output (padding 2), 6 filters, 1x5x5 each -> 28*28*6*25 = 117,600
    assert t[0].macs == 28 * 28 * 6 * 25 == 117_600
    assert t[0].out_size == (28, 28) and t[0].n_weights == 150
    # conv2: 14x14 in -> 10x10 out, 16 filters of 6x5x5 -> 100*16*150 = 240,000
    assert t[1].in_size == (14, 14) and t[1].macs == 240_000
    # fc1: 400 -> 120
    assert t[2].kind == "dense" and t[2].macs == 48_000
    assert total_macs(t) == 117_600 + 240_000 + 48_000 + 120 * 84 + 84 * 10


def test_resnet20_projection_and_depthwise_macs_by_hand():
    t = layer_table("resnet20")
    shortcuts = [r for r in t if r.kernel == (1, 1) and r.kind == "conv"]
    assert len(shortcuts) == 2
    # first projection: 16 -> 32 channels, stride 2, 16x16 output: 256 * 32 * 16 = 131,072
    assert shortcuts[0].stride == (2, 2) and shortcuts[0].macs == 16 * 16 * 32 * 16
    m = layer_table("mobilenet_v1")
    # first depthwise: 32 channels 3x3 on 112x112, one input channel per filter: 112*112*32*9
    dw = m[1]
    assert dw.kind == "dwconv" and dw.groups == 32 and dw.macs == 112 * 112 * 32 * 9
    assert m[0].out_size == (112, 112)


def test_alexnet_first_layer_is_11x11_stride_4():
    r = layer_table("alexnet")[0]
    assert r.kernel == (11, 11) and r.stride == (4, 4) and r.out_size == (55, 55)
    assert r.macs == 55 * 55 * 64 * 3 * 121


def test_create_network_is_seeded():
    a, b = create_network("lenet4", seed=3), create_network("lenet4", seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_pretrained_without_checkpoint_is_a_clear_error():
    from releq_tvm.networks import MissingCheckpointError

    with pytest.raises(MissingCheckpointError, match="releq-tvm train vgg11"):
        create_network("vgg11", pretrained=True)
