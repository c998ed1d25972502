"""The lookup-table dense kernels (``releq_tvm.kernels.lut``): bit-exact against numpy on every
instruction path this host runs, codegen checks for the other paths on any host.

Each path is built for a CPU that has just its instructions (the host's own path, ``skylake-avx512``
for the vpshufb AVX-512 path under a VBMI host, ``haswell`` for AVX2, generic ``x86-64`` for the
scalar path), so the code that older hosts would run is the code tested here.
"""

from __future__ import annotations

import functools
import re
import zlib

import numpy as np
import pytest

import releq_tvm.kernels as K
from releq_tvm.kernels import lut as L
from releq_tvm.kernels.encoding import bit_planes

SEED = 20260119
HOST_LUT = K.vector_isa().lut
PATHS = L.LUT_PATHS
#: a CPU with each path (and none of the paths before it), for packing and codegen checks that need no execution
PATH_CODEGEN_CPU = {"avx512vbmi": "znver4", "avx512bw": "skylake-avx512", "avx2": "haswell", "scalar": "x86-64"}
#: the CPU each path is built for, and whether this host can run it (a host runs its path and every later one)
PATH_CPU = {path: "host" if path == HOST_LUT else cpu for path, cpu in PATH_CODEGEN_CPU.items()}
RUNNABLE = {path: PATHS.index(path) >= PATHS.index(HOST_LUT) for path in PATHS}
#: (path, method) pairs the bit-exact tests run: the avx512vbmi path's default unpack method and its lookups
KINDS = [("avx512vbmi", "unpack"), ("avx512vbmi", "lookup"), ("avx512bw", "lookup"), ("avx2", "lookup"),
         ("scalar", "lookup")]
KIND_IDS = [f"{path}-{method}" for path, method in KINDS]


def rng_for(*key) -> np.random.Generator:
    # zlib.crc32, not hash(): str hashes are salted per process
    return np.random.default_rng([SEED, zlib.crc32(repr(key).encode())])


def random_weights(rng, shape, w_bits: int) -> np.ndarray:
    """Levels of ``w_bits`` with both extremes present."""
    lo, hi = K.weight_level_range(w_bits)
    q = rng.choice(np.array([-1, 1]), size=shape) if w_bits == 1 else rng.integers(lo, hi + 1, size=shape)
    q.reshape(-1)[0], q.reshape(-1)[-1] = lo, hi
    return q


def random_activations(rng, shape) -> np.ndarray:
    x = rng.integers(0, 256, size=shape).astype(np.uint8)
    x.reshape(-1)[0] = 255
    return x


def _require(path: str) -> None:
    if not RUNNABLE[path]:
        pytest.skip(f"this host ({HOST_LUT}) cannot run the {path} path; its codegen is checked below")


@functools.lru_cache(maxsize=None)
def _build(shape: K.DenseShape, w_bits: int, path: str, parallel: bool | None = None, epilogue=K.PLAIN,
           method: str | None = None, cpu: str | None = None):
    import tvm

    target = K.make_target(cpu or PATH_CPU[path])
    isa = K.vector_isa(target)
    func = K.lut_dense_primfunc(shape, w_bits, parallel, isa, epilogue, path, method)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    return lib, isa


def _run(shape, w_bits, path, x, q, parallel=None, epilogue=K.PLAIN, extra=(), method=None, cpu=None):
    import tvm

    lib, isa = _build(shape, w_bits, path, parallel, epilogue, method, cpu)
    out = np.zeros(shape.output_shape(), dtype=epilogue.out_dtype)
    tensors = [tvm.runtime.tensor(a) for a in (x, K.pack_lut_weights(q, w_bits, isa, path, method), *extra, out)]
    lib["main"](*tensors)
    return tensors[-1].numpy()


# ------------------------------------------------------------------------------------------
# the arithmetic and the packing, in numpy


@pytest.mark.parametrize("w_bits", [1, 2, 3, 4])
def test_nibble_tables_give_the_signed_dot_product(w_bits):
    """The kernel's identity: s * sum_p 2^p sum_groups (T_lo[e] + 16 T_hi[e]) - M * sum x == q . x."""
    rng = rng_for("identity", w_bits)
    k = 4 * 25
    x = random_activations(rng, (k,)).astype(np.int64)
    q = random_weights(rng, (k,), w_bits)
    s, m = K.weight_scale_offset(w_bits)
    planes = bit_planes(K.encode_weights(q, w_bits), w_bits).reshape(-1, 4, w_bits)  # (groups, i, p)
    entries = np.arange(16)[:, None] >> np.arange(4) & 1  # (e, i): bit i of pattern e
    xg = x.reshape(-1, 4)
    t_lo, t_hi = (xg & 15) @ entries.T, (xg >> 4) @ entries.T  # (groups, 16), entries <= 60
    assert t_lo.max() <= 60 and t_hi.max() <= 60
    index = (planes * (1 << np.arange(4))[None, :, None]).sum(axis=1)  # (groups, p): the 4-bit patterns
    groups = np.arange(len(xg))[:, None]
    looked_up = (t_lo[groups, index] + 16 * t_hi[groups, index]) @ (1 << np.arange(w_bits))
    assert s * int(looked_up.sum()) - m * int(x.sum()) == int(q @ x)


def test_flush_counts_keep_uint16_lanes_exact():
    assert [L.max_code(w) for w in (1, 2, 3, 4)] == [1, 2, 6, 14]
    assert [L.flush_blocks(w) for w in (1, 2, 3, 4)] == [16, 8, 2, 1]
    for w in (1, 2, 3, 4):
        worst = L.BLOCK_PLANE_MAX * L.max_code(w)
        assert L.flush_blocks(w) * worst < 2**16 <= (L.flush_blocks(w) + 1) * worst


def _unpack(packed: np.ndarray, plan: L.LutPlan) -> np.ndarray:
    """Unsigned codes (O, K) read back from the packed array by the module docstring's rule, loop by loop."""
    tiles, blocks, w_bits, _, vec_tile, lanes = packed.shape
    u = np.zeros((plan.out_pad, blocks * L.BLOCK), dtype=np.int64)
    for b in range(tiles):
        for r in range(vec_tile):
            for xb in range(lanes):
                o = b * plan.tile + r * lanes + (lanes // 4) * (0, 2, 1, 3)[xb % 4] + xb // 4
                for k in range(blocks):
                    for p in range(w_bits):
                        for h in range(2):
                            byte = int(packed[b, k, p, h, r, xb])
                            for half, nibble in enumerate((byte & 15, byte >> 4)):
                                group = 4 * k + 2 * h + half
                                for i in range(4):
                                    u[o, 4 * group + i] += ((nibble >> i) & 1) << p
    return u


def _unpack_vpermb(packed: np.ndarray, plan: L.LutPlan) -> np.ndarray:
    """The same for the avx512vbmi layout: byte ``[b, k, p, r, 4s + g]``, channels ``s`` (low) and ``16 + s`` (high)."""
    tiles, blocks, w_bits, vec_tile, width = packed.shape
    u = np.zeros((plan.out_pad, blocks * L.BLOCK), dtype=np.int64)
    for b, k, p, r, xb in np.ndindex(packed.shape):
        s, g = divmod(xb, 4)
        byte = int(packed[b, k, p, r, xb])
        for half, nibble in enumerate((byte & 15, byte >> 4)):
            o = b * plan.tile + r * 32 + 16 * half + s
            for i in range(4):
                u[o, 4 * (4 * k + g) + i] += ((nibble >> i) & 1) << p
    return u


def _unpack_fields(packed: np.ndarray, plan: L.LutPlan) -> np.ndarray:
    """The same for the unpack method: byte ``[b, g, v, 4s + j]`` with bit 7 flipped, its fields
    ``(first bit, bits, slot, code bit)`` holding code bits of channel ``128 b + 16 slot + s``, input ``4g + j``."""
    u = np.zeros((plan.out_pad, plan.blocks * L.BLOCK), dtype=np.int64)
    for b, g, v, xb in np.ndindex(packed.shape):
        s, j = divmod(xb, 4)
        raw = int(packed[b, g, v, xb]) ^ 0x80
        for first, bits, slot, code_bit in L.UNPACK_FIELDS[plan.w_bits][v]:
            u[128 * b + 16 * slot + s, 4 * g + j] += ((raw >> first) & ((1 << bits) - 1)) << code_bit
    return u


@pytest.mark.parametrize("path, method", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("w_bits", [1, 3])
def test_pack_lut_weights_puts_each_bit_where_the_docstring_says(path, method, w_bits):
    shape = K.DenseShape(37, 70)
    isa = K.vector_isa(PATH_CODEGEN_CPU[path])
    q = random_weights(rng_for("pack", path, w_bits), shape.weight_shape(), w_bits)
    packed = K.pack_lut_weights(q, w_bits, isa, path, method)
    plan = K.plan_lut_dense(shape, w_bits, isa=isa, path=path, method=method)
    assert plan.method == method
    assert packed.dtype == np.uint8 and packed.shape == plan.weight_shape and packed.flags.c_contiguous
    unpack = _unpack_fields if method == "unpack" else _unpack_vpermb if path == "avx512vbmi" else _unpack
    u = unpack(packed, plan)
    np.testing.assert_array_equal(u[:70, :37], K.encode_weights(q, w_bits))
    assert not u[70:].any() and not u[:, 37:].any()  # padding is code 0: it looks up T[0] = 0


@pytest.mark.parametrize("w_bits", [1, 2, 3, 4])
def test_packed_weights_take_w_bits_per_weight(w_bits):
    """fc6-like proportions: w * K * O / 8 bytes when K fills whole blocks and O whole tiles, by either method."""
    shape = K.DenseShape(9216 // 8, 4096 // 8)
    for path, method in KINDS:
        plan = K.plan_lut_dense(shape, w_bits, isa=K.vector_isa(PATH_CODEGEN_CPU[path]), path=path, method=method)
        assert plan.weight_bytes == w_bits * shape.in_features * shape.out_features // 8


# ------------------------------------------------------------------------------------------
# bit-exact kernels on every path this host runs

SHAPES = [
    K.DenseShape(64, 128),  # whole blocks, whole avx512 tiles (2 registers)
    K.DenseShape(70, 37, batch=3),  # K not a multiple of 4, O below one register
    K.DenseShape(100, 200),  # K a multiple of 4 but not of a block, O not a multiple of a register
    K.DenseShape(300, 96, batch=3),  # several uint16 flushes plus a partial one
    K.DenseShape(333, 4 * 128 + 32),  # K odd; several 128-channel avx512vbmi tiles, the last one padded
]


@pytest.mark.parametrize("path, method", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("w_bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label())
def test_lut_dense_is_exact(shape, w_bits, path, method):
    _require(path)
    rng = rng_for("exact", shape, w_bits, path)
    x = random_activations(rng, shape.input_shape())
    q = random_weights(rng, shape.weight_shape(), w_bits)
    np.testing.assert_array_equal(_run(shape, w_bits, path, x, q, method=method), K.dense_reference(x, q))


@pytest.mark.parametrize("path, method", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("w_bits", [1, 2, 3, 4])
def test_lut_extremes_reach_the_uint16_bounds_exactly(w_bits, path, method):
    """Activations 255 against the largest code (every lookup at its maximum, each flush at its bound;
    every unpacked field at its largest value) and the smallest; one row of random activations beside them."""
    _require(path)
    shape = K.DenseShape(1040, 70, batch=2)  # 65 blocks: several flushes and a partial one at every width
    lo, hi = K.weight_level_range(w_bits)
    q = np.where(np.arange(70)[:, None] < 35, hi, lo) * np.ones((1, 1040), dtype=np.int64)
    x = np.full(shape.input_shape(), 255, dtype=np.uint8)
    x[1] = random_activations(rng_for("extremes", w_bits), (1040,))
    np.testing.assert_array_equal(_run(shape, w_bits, path, x, q, method=method), K.dense_reference(x, q))


@pytest.mark.parametrize("w_bits", [1, 2, 3, 4])
def test_unpack_is_exact_at_its_longest_reduction(w_bits):
    """65,792 inputs (the longest the unpack's int32 sums take) of 255 against the smallest code on channels
    0..63 and the largest on 64..127: at 2 and 4 bits the first half of the weight vectors is all zero
    bytes, -128 after the flip, so their accumulators reach -128 * 255 * K = -2^31 + 32,768; one input
    longer falls back to the lookups."""
    _require("avx512vbmi")
    k = 65_792
    shape = K.DenseShape(k, 128, batch=1)
    assert L.unpack_fits(shape) and not L.unpack_fits(K.DenseShape(k + 1, 128))
    assert K.plan_lut_dense(K.DenseShape(k + 1, 128), w_bits, isa=K.vector_isa("znver4")).method == "lookup"
    lo, hi = K.weight_level_range(w_bits)
    q = np.where(np.arange(128)[:, None] < 64, lo, hi) * np.ones((1, k), dtype=np.int64)
    x = np.full(shape.input_shape(), 255, dtype=np.uint8)
    np.testing.assert_array_equal(_run(shape, w_bits, "avx512vbmi", x, q, method="unpack"), K.dense_reference(x, q))


@pytest.mark.parametrize("method", ["unpack", "lookup"])
@pytest.mark.parametrize("w_bits", [1, 2, 3, 4])
def test_parallel_tiles_are_exact(w_bits, method):
    if method == "unpack":
        _require("avx512vbmi")
    shape = K.DenseShape(200, 300, batch=3)
    rng = rng_for("parallel", w_bits)
    x = random_activations(rng, shape.input_shape())
    q = random_weights(rng, shape.weight_shape(), w_bits)
    path = "avx512vbmi" if method == "unpack" else HOST_LUT
    assert K.plan_lut_dense(shape, w_bits, parallel=True, isa=K.vector_isa(PATH_CODEGEN_CPU[path]), path=path,
                            method=method).tiles > 1
    np.testing.assert_array_equal(_run(shape, w_bits, path, x, q, parallel=True, method=method),
                                  K.dense_reference(x, q))


@pytest.mark.parametrize("w_bits", [1, 4])
def test_unpack_method_runs_on_avx512_vnni_without_vbmi(w_bits):
    """``method="unpack"`` on the avx512bw path of a VNNI target (cascadelake code, run on this host)."""
    _require("avx512vbmi")  # a host with VBMI and VNNI runs cascadelake's instructions
    shape = K.DenseShape(333, 150, batch=3)
    assert K.plan_lut_dense(shape, w_bits, isa=K.vector_isa("cascadelake")).method == "lookup"
    rng = rng_for("cascadelake", w_bits)
    x = random_activations(rng, shape.input_shape())
    q = random_weights(rng, shape.weight_shape(), w_bits)
    got = _run(shape, w_bits, "avx512bw", x, q, method="unpack", cpu="cascadelake")
    np.testing.assert_array_equal(got, K.dense_reference(x, q))


EPILOGUES = [
    K.Epilogue(requantize=True),
    K.Epilogue(requantize=True, relu=True, quantize_bits=3),
    K.Epilogue(requantize=True, residual=True, relu=True),
]


@pytest.mark.parametrize("method", ["unpack", "lookup"])
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: e.label)
def test_fused_epilogue_equals_the_numpy_steps(epilogue, method):
    path = "avx512vbmi" if method == "unpack" else HOST_LUT
    _require(path)
    shape = K.DenseShape(150, 37, batch=2)
    rng = rng_for("epilogue", epilogue.label)
    x = random_activations(rng, shape.input_shape())
    q = random_weights(rng, shape.weight_shape(), 3)
    acc = K.dense_reference(x, q)
    shift = rng.integers(8, 20, size=37)
    scale = (2.0**20 / max(1, int(np.abs(acc).max()))) * rng.uniform(0.5, 1.5, size=37)
    scale[0] = -scale[0]
    offset = rng.integers(-(2**18), 2**18, size=37) * (1 << shift) // 4 + (1 << (shift - 1))
    args = {"mult": np.round(scale * 2.0**shift).astype(np.int64), "offset": offset.astype(np.int64),
            "shift": shift.astype(np.int64)}
    if epilogue.residual:
        args["residual"] = rng.integers(-(2**21), 2**21, size=acc.shape).astype(np.int32)
    if epilogue.quantize_bits:
        args["quant"] = np.array([int(1.5 * 2 ** (4 + epilogue.quantize_bits)), 1 << 23, 24], dtype=np.int64)
    got = _run(shape, 3, path, x, q, epilogue=epilogue, extra=tuple(args.values()), method=method)
    expected = K.epilogue_reference(epilogue, acc, 1, **args)
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(expected)) > 2  # the test is not vacuous


def test_primfunc_signature_and_relax_call_tir():
    import tvm
    from tvm import relax

    shape = K.DenseShape(100, 37)
    plan = K.plan_lut_dense(shape, 2)
    func = K.lut_dense_primfunc(shape, 2)
    assert [(str(p.dtype), tuple(int(d) for d in p.shape)) for p in func.params] == [
        ("uint8", (1, 100)), ("uint8", plan.weight_shape), ("int32", (1, 37))]
    assert "global_symbol" not in func.attrs
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape.input_shape(), "uint8"))
    w = relax.Var("w", relax.TensorType(plan.weight_shape, "uint8"))
    with builder.function("main", [x, w]):
        fn = builder.add_func(func, "dense_lut")
        with builder.dataflow():
            y = builder.emit_output(builder.emit(relax.call_tir(fn, [x, w], relax.TensorType((1, 37), "int32"))))
        builder.emit_func_output(y)
    vm = relax.VirtualMachine(tvm.compile(builder.get(), target=K.host_target()), tvm.cpu())
    rng = rng_for("relax")
    xv, q = random_activations(rng, shape.input_shape()), random_weights(rng, shape.weight_shape(), 2)
    y = vm["main"](tvm.runtime.tensor(xv), tvm.runtime.tensor(K.pack_lut_weights(q, 2)))
    np.testing.assert_array_equal(y.numpy(), K.dense_reference(xv, q))


def test_errors_say_what_to_pass():
    with pytest.raises(ValueError, match="w_bits in"):
        K.plan_lut_dense(K.DenseShape(64, 64), 5)
    with pytest.raises(ValueError, match="lacks"):
        K.plan_lut_dense(K.DenseShape(64, 64), 2, isa=K.vector_isa("haswell"), path="avx512bw")
    with pytest.raises(ValueError, match="lacks"):
        K.plan_lut_dense(K.DenseShape(64, 64), 2, isa=K.vector_isa("cascadelake"), path="avx512vbmi")
    with pytest.raises(ValueError, match="unknown lookup path"):
        K.plan_lut_dense(K.DenseShape(64, 64), 2, path="avx512")
    with pytest.raises(ValueError, match="unknown lut method"):
        K.plan_lut_dense(K.DenseShape(64, 64), 2, isa=K.vector_isa("znver4"), method="lut")
    for cpu in ("haswell", "skylake-avx512", "x86-64"):  # no zmm vpdpbusd
        with pytest.raises(ValueError, match="needs AVX-512 and AVX512-VNNI"):
            K.plan_lut_dense(K.DenseShape(64, 64), 2, isa=K.vector_isa(cpu), method="unpack")
    with pytest.raises(ValueError, match="too long for the unpack"):
        K.plan_lut_dense(K.DenseShape(65_793, 64), 2, isa=K.vector_isa("znver4"), method="unpack")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        K.pack_lut_weights(np.full((4, 16), 2), 2)
    with pytest.raises(ValueError, match="-1 or \\+1"):
        K.pack_lut_weights(np.zeros((4, 16), dtype=int), 1)


# ------------------------------------------------------------------------------------------
# codegen: each path from its target (LLVM compiles for any mcpu, so these run on any host)


def _assembly(cpu: str, w_bits: int = 2, shape=K.DenseShape(512, 256), method: str | None = None) -> str:
    import tvm

    target = K.make_target(cpu)
    func = K.lut_dense_primfunc(shape, w_bits, isa=K.vector_isa(target), method=method)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    return lib.mod.inspect_source("s")


@pytest.mark.parametrize("cpu, path", [
    ("znver4", "avx512vbmi"), ("icelake-server", "avx512vbmi"), ("sapphirerapids", "avx512vbmi"),
    ("skylake-avx512", "avx512bw"), ("cascadelake", "avx512bw"),  # VNNI without VBMI: no vpermb
    ("haswell", "avx2"), ("alderlake", "avx2"), ("x86-64", "scalar"),
])
def test_lookup_path_follows_the_target(cpu, path):
    assert K.vector_isa(cpu).lut == path


@pytest.mark.parametrize("cpu, w_bits, method", [
    *[(cpu, w, "unpack") for cpu in ("znver4", "icelake-server", "sapphirerapids") for w in (1, 2, 3, 4)],
    ("cascadelake", 2, "lookup"), ("skylake-avx512", 4, "lookup"), ("haswell", 4, "lookup"),
    ("alderlake", 3, "lookup"), ("x86-64", 1, "lookup"),
])
def test_lut_method_follows_the_target_and_bits(cpu, w_bits, method):
    isa = K.vector_isa(cpu)
    assert L.lut_method(isa, w_bits) == method
    assert K.plan_lut_dense(K.DenseShape(9216, 4096), w_bits, isa=isa).method == method


@pytest.mark.parametrize("cpu", ["znver4", "icelake-server"])
@pytest.mark.parametrize("w_bits", [1, 2, 3, 4])
def test_unpack_method_multiplies_codes_with_vpdpbusd_and_no_lookups(cpu, w_bits):
    asm = _assembly(cpu, w_bits)
    fields = sum(len(vector) for vector in L.UNPACK_FIELDS[w_bits])  # vpdpbusd per group of 4 inputs
    assert len(re.findall(r"vpdpbusd\s+%zmm\d+, %zmm\d+, %zmm\d+", asm)) >= L.GROUPS_PER_BLOCK * fields
    assert len(re.findall(r"vpbroadcastd\s+[^\n]*%zmm", asm)) >= L.GROUPS_PER_BLOCK
    assert "vpermb" not in asm and "vpshufb" not in asm and "vpmaddubsw" not in asm
    assert "prefetcht0" not in asm  # UNPACK_PREFETCH_BYTES = 0: the tiles stream linearly


@pytest.mark.parametrize("cpu", ["znver4", "icelake-server"])
@pytest.mark.parametrize("w_bits", [1, 4])
def test_vbmi_path_looks_up_with_vpermb_and_accumulates_with_vpdpbusd(cpu, w_bits):
    asm = _assembly(cpu, w_bits, method="lookup")
    # per block, plane and register: 2 index vectors x (low, high) tables, each one vpermb + one vpdpbusd
    assert len(re.findall(r"vpermb\s+%zmm\d+, %zmm\d+, %zmm\d+", asm)) >= 4 * w_bits * 4
    assert len(re.findall(r"vpdpbusd\s+%zmm\d+, %zmm\d+, %zmm\d+", asm)) >= 4 * w_bits * 4
    assert "prefetcht0" in asm
    assert not re.search(r"vpshufb\s+%zmm", asm) and "vpmaddubsw" not in asm


@pytest.mark.parametrize("cpu", ["haswell", "skylake-avx512", "cascadelake", "x86-64"])
@pytest.mark.parametrize("w_bits", [1, 4])
def test_targets_without_vbmi_and_vnni_get_no_vpermb_or_vpdpbusd(cpu, w_bits):
    asm = _assembly(cpu, w_bits)
    assert "vpermb" not in asm and "vpdpbusd" not in asm


def test_avx512_path_looks_up_64_channels_per_zmm_vpshufb():
    asm = _assembly("skylake-avx512")
    # 4 groups x 2 nibble tables x 2 planes x 2 registers per block, the tables broadcast to every lane
    assert len(re.findall(r"vpshufb\s+%zmm\d+, %zmm\d+, %zmm\d+", asm)) >= 32
    assert re.search(r"vpmaddubsw\s+[^\n]*%zmm", asm) and re.search(r"vbroadcasti32x4\s", asm)
    assert not re.search(r"vpshufb\s+[^\n]*%ymm", asm)


def test_avx2_path_looks_up_32_channels_per_ymm_vpshufb():
    asm = _assembly("haswell")
    assert len(re.findall(r"vpshufb\s+%ymm\d+, %ymm\d+, %ymm\d+", asm)) >= 16
    assert re.search(r"vpmaddubsw\s+[^\n]*%ymm", asm) and "zmm" not in asm


def test_scalar_path_compiles_for_generic_x86_64():
    asm = _assembly("x86-64")
    assert "pshufb" not in asm and "ymm" not in asm and "zmm" not in asm
