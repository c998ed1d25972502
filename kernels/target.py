"""The x86 LLVM target the kernels are built for.

TVM 0.27 only accepts a target as a dict (``{"kind": "llvm", "mtriple": ..., "mcpu": ...}``);
a target string and ``mcpu=native`` fail. :func:`host_target` asks LLVM which CPU it runs on
(``znver3`` on a Zen 3 machine) so nothing here hard-codes a CPU name; :func:`make_target`
turns whatever a caller passes into a checked x86 target, or raises a one-line ``ValueError``.
Plans read the vector unit (lanes, registers, int8 instruction) from :func:`vector_isa`; the
kernels stay correct on any x86-64 CPU.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass

import tvm
from tvm.target import codegen

#: The triple we build for. LLVM reports the host triple of the toolchain TVM was built with
#: (e.g. ``x86_64-conda-linux-gnu``); the plain form is what TVM's x86 code paths expect.
X86_TRIPLE = "x86_64-linux-gnu"

_X86_MACHINES = {"x86_64", "amd64", "x64"}


def host_cpu_name() -> str:
    """The LLVM name of this machine's CPU (e.g. ``"znver3"``), or ``"x86-64"`` if LLVM cannot tell."""
    name = str(codegen.llvm_get_system_cpu())
    if not name or name == "generic" or not codegen.llvm_is_valid_cpu(name, X86_TRIPLE):
        return "x86-64"
    return name


def host_target() -> tvm.target.Target:
    """An LLVM target for the CPU this process runs on.

    Raises ``ValueError`` on a non-x86 host: the kernels and their schedules are x86 only.
    """
    machine = platform.machine().lower()
    if machine not in _X86_MACHINES:
        raise ValueError(
            f"releq_tvm.kernels builds for x86-64 only; this host is {platform.machine()!r}. "
            "Run on an x86-64 machine or pass an explicit x86 target"
        )
    return tvm.target.Target({"kind": "llvm", "mtriple": X86_TRIPLE, "mcpu": host_cpu_name()})


def make_target(spec: str | dict | tvm.target.Target | None = None) -> tvm.target.Target:
    """A checked x86 LLVM target from a loose description.

    ``spec`` may be ``None``, ``"host"`` or ``"native"`` (this machine), an LLVM x86 CPU name
    (``"znver3"``, ``"skylake"``), a JSON object string or dict in TVM's target form, or a
    ``tvm.target.Target``. Anything that is not an x86-64 LLVM target raises ``ValueError``
    with one line saying what was given and what to pass instead.
    """
    if spec is None:
        return host_target()
    if isinstance(spec, tvm.target.Target):
        return _check_x86(spec, repr(str(spec)))
    if isinstance(spec, str):
        text = spec.strip()
        if text in ("", "host", "native", "llvm"):
            return host_target()
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"target {spec!r} is not valid JSON ({err.msg}); pass e.g. "
                                 '{"kind": "llvm", "mcpu": "znver3"}') from None
        elif codegen.llvm_is_valid_cpu(text, X86_TRIPLE):
            return tvm.target.Target({"kind": "llvm", "mtriple": X86_TRIPLE, "mcpu": text})
        else:
            raise ValueError(
                f"unsupported target {spec!r}: pass 'host', an x86 CPU name such as 'znver3' or "
                "'skylake', or a dict {'kind': 'llvm', 'mcpu': ...}"
            )
    if not isinstance(spec, dict):
        raise ValueError(f"target must be None, a str, a dict or a tvm Target; got {type(spec).__name__}")
    config = dict(spec)
    if config.get("kind", "llvm") != "llvm":
        raise ValueError(f"unsupported target kind {config.get('kind')!r}: these kernels need kind 'llvm' on x86-64")
    config["kind"] = "llvm"
    config.setdefault("mtriple", X86_TRIPLE)
    if config.get("mcpu") in (None, "native", "host"):
        config["mcpu"] = host_cpu_name()
    try:
        target = tvm.target.Target(config)
    except Exception as err:  # TVM raises its own error types for malformed configs
        raise ValueError(f"TVM rejected target {config!r}: {str(err).splitlines()[0]}") from None
    return _check_x86(target, repr(spec))


def _check_x86(target: tvm.target.Target, given: str) -> tvm.target.Target:
    if target.kind.name != "llvm":
        raise ValueError(
            f"unsupported target {given}: these kernels need an LLVM x86-64 target, not {target.kind.name!r}"
        )
    triple = str(target.attrs.get("mtriple", "") or X86_TRIPLE)
    if not triple.startswith(("x86_64", "amd64")):
        raise ValueError(f"unsupported target {given}: triple {triple!r} is not x86-64; these kernels are x86 only")
    mcpu = str(target.attrs.get("mcpu", "") or "")
    if mcpu and not codegen.llvm_is_valid_cpu(mcpu, X86_TRIPLE):
        raise ValueError(
            f"unsupported target {given}: LLVM does not know x86 CPU {mcpu!r} (try 'znver3', 'skylake' or 'host')"
        )
    return target


def target_has_avx2(target: tvm.target.Target) -> bool:
    """Whether LLVM will emit AVX2 for ``target`` (the fast popcount path needs it)."""
    return "avx2" in set(codegen.llvm_get_cpu_features(target))


@dataclass(frozen=True)
class VectorIsa:
    """What a kernel plan needs to know of a target's vector unit; the one place the ISA is read.

    Plans take a :class:`VectorIsa` (from :func:`vector_isa`), never a CPU name, so a new CPU
    needs no code: LLVM reports its features for any ``mcpu`` on any host.
    """

    #: ``"avx512-vpopcntdq"`` (zmm, native 64-bit vector popcount), ``"avx2"`` (ymm, popcount as a
    #: vpshufb nibble lookup) or ``"x86-64"`` (no AVX2: correct, slow)
    name: str
    #: uint64 lanes of one register: the bit-serial output-channel vector
    uint64_lanes: int
    #: vector registers the register tile may use
    registers: int
    #: the int8 dot product: ``"avx512-vnni"`` (vpdpbusd on zmm), ``"avx-vnni"`` (vpdpbusd on
    #: ymm), or ``"pmaddwd"`` (AVX2 vpmaddwd on int16)
    int8: str
    #: the lookup-table kernels' table lookup: ``"avx512vbmi"`` (vpermb on 64-byte tables and
    #: vpdpbusd: AVX512-VBMI and AVX512-VNNI), ``"avx512bw"`` (vpshufb on zmm, 64 output channels
    #: per lookup), ``"avx2"`` (vpshufb on ymm, 32) or ``"scalar"`` (plain loads, no AVX2). On the
    #: ``"avx512vbmi"`` path the lut plans unpack the codes in registers and multiply them with
    #: vpdpbusd instead of looking them up (``releq_tvm.kernels.lut.lut_method``)
    lut: str = "scalar"

    @property
    def int32_lanes(self) -> int:
        """int32 lanes of the int8 kernel's accumulator register."""
        return 16 if self.int8 == "avx512-vnni" else 8


def vector_isa(target: tvm.target.Target | None = None) -> VectorIsa:
    """The :class:`VectorIsa` of ``target`` (default: this host), from LLVM's feature list."""
    target = make_target(target) if not isinstance(target, tvm.target.Target) else target
    features = set(codegen.llvm_get_cpu_features(target))
    if "avx512vnni" in features and "avx512f" in features:
        int8 = "avx512-vnni"
    elif "avxvnni" in features:
        int8 = "avx-vnni"
    else:
        int8 = "pmaddwd"
    if {"avx512f", "avx512bw", "avx512vbmi", "avx512vnni"} <= features:
        lut = "avx512vbmi"
    elif {"avx512f", "avx512bw"} <= features:
        lut = "avx512bw"
    else:
        lut = "avx2" if "avx2" in features else "scalar"
    if {"avx512f", "avx512vpopcntdq"} <= features:
        return VectorIsa("avx512-vpopcntdq", 8, 32, int8, lut)
    if "avx2" in features:
        return VectorIsa("avx2", 4, 16, int8, lut)
    return VectorIsa("x86-64", 4, 16, int8, lut)


def tvm_threads() -> int:
    """Threads TVM's runtime pool runs parallel loops on: ``TVM_NUM_THREADS`` when set, else half the
    logical CPUs on x86 (TVM assumes two hyperthreads per core), at least 1. Computed, not asked of
    the runtime: asking creates the pool, which fixes its size before a caller can set the variable."""
    env = os.environ.get("TVM_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // 2)


def pin_tvm_threads() -> int:
    """Set ``TVM_NUM_THREADS`` to :func:`tvm_threads` when it is unset; return the thread count.

    TVM reads the variable not only when it creates its runtime pool (the pool's size) but on
    every parallel loop: with one thread it runs the loop inline, without the variable it goes
    through the pool's launch and synchronisation even when the pool has a single thread. On this
    2-vCPU AMD EPYC that launch cost ResNet-20's int8 build 0.25-0.3 ms of 0.70-0.75 ms per image
    (0.44-0.49 ms with the variable set, measured side by side in one process). Everything here
    that runs TVM code (timing, compiled networks, kernels) calls this first; a deployment
    should set ``TVM_NUM_THREADS`` to its thread count too (README).
    """
    threads = tvm_threads()
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    return threads


@dataclass(frozen=True)
class CacheSizes:
    """Data cache sizes of this host in bytes: ``l1d`` and ``l2`` per core, ``l3`` as shared by core 0."""

    l1d: int
    l2: int
    l3: int


#: What :func:`cache_sizes` assumes where the OS does not say: a common x86 server core today.
FALLBACK_CACHES = CacheSizes(l1d=32 << 10, l2=1 << 20, l3=32 << 20)


def _size_bytes(text: str) -> int:
    """``"32K"`` / ``"1024K"`` / ``"32M"`` (sysfs cache sizes) in bytes; 0 when unreadable."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text.rstrip("KMG")
    return int(digits) * scale if digits.isdigit() else 0


def cache_sizes() -> CacheSizes:
    """The data caches of the CPU this process runs on, from Linux sysfs, else ``os.sysconf``, else
    :data:`FALLBACK_CACHES` for a level neither reports. Timing asks it which layers' weights
    stay in cache from one call to the next (``releq_tvm.compile.layers``)."""
    found: dict[int, int] = {}
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            with open(os.path.join(path, "level")) as level, open(os.path.join(path, "type")) as kind, \
                    open(os.path.join(path, "size")) as size:
                if kind.read().strip() in ("Data", "Unified"):
                    found[int(level.read())] = _size_bytes(size.read())
    except (OSError, ValueError):
        pass
    for level, name in ((1, "SC_LEVEL1_DCACHE_SIZE"), (2, "SC_LEVEL2_CACHE_SIZE"), (3, "SC_LEVEL3_CACHE_SIZE")):
        if not found.get(level):
            try:
                found[level] = max(0, int(os.sysconf(name)))
            except (OSError, ValueError):
                found[level] = 0
    return CacheSizes(l1d=found[1] or FALLBACK_CACHES.l1d, l2=found[2] or FALLBACK_CACHES.l2,
                      l3=found[3] or FALLBACK_CACHES.l3)
