"""The compile target: the host x86 CPU by default, or what ``--target`` says, checked in one place.

Accepted forms of ``--target``: nothing / ``host`` (this machine, LLVM names the CPU, e.g.
``znver3``); an x86 CPU name (``skylake``); ``kind/mcpu`` (``llvm/znver3``); a TVM-style
string (``llvm -mcpu=znver3``); or a JSON dict (``{"kind": "llvm", "mcpu": "znver3"}``).
Anything that is not an x86-64 LLVM target (aarch64, cuda, ...) is a :class:`ReleqError`
with one line, because the bit-serial kernels are written for x86.
"""

from __future__ import annotations

import functools
import json
import os
import re

import tvm

from releq_tvm.errors import ReleqError
from releq_tvm.kernels.target import cache_sizes, tvm_threads
from releq_tvm.machine import cpu_model


def resolve_target(spec: str | dict | tvm.target.Target | None = None) -> tvm.target.Target:
    """A checked x86-64 LLVM target (the host CPU when ``spec`` is None)."""
    from releq_tvm.kernels.target import make_target

    if isinstance(spec, str):
        text = spec.strip()
        if "/" in text and not text.startswith("{"):
            kind, _, mcpu = text.partition("/")
            spec = {"kind": kind.strip(), "mcpu": mcpu.strip()} if mcpu.strip() else {"kind": kind.strip()}
        elif " " in text and not text.startswith("{"):
            parts = text.split()
            config: dict = {"kind": parts[0]}
            for part in parts[1:]:
                match = re.fullmatch(r"-+(\w+)=(\S+)", part)
                if not match:
                    raise ReleqError(f"--target {spec!r}: cannot read {part!r}; use e.g. 'llvm -mcpu=znver3' or a JSON dict")
                config[match.group(1)] = match.group(2)
            spec = config
        elif text and not text.startswith("{") and text not in ("host", "native", "llvm"):
            # a bare word: an x86 CPU name, or a target kind such as cuda / aarch64
            from tvm.target import codegen

            from releq_tvm.kernels.target import X86_TRIPLE

            if not codegen.llvm_is_valid_cpu(text, X86_TRIPLE):
                raise ReleqError(
                    f"unsupported target {text!r}: the bit-serial kernels need an x86-64 CPU; pass 'host', "
                    "an x86 CPU name such as 'znver3', or '{\"kind\": \"llvm\", \"mcpu\": ...}'"
                )
    if isinstance(spec, str) and spec.strip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ReleqError(f"--target {spec!r} is not valid JSON ({exc.msg}); pass e.g. "
                             '{"kind": "llvm", "mcpu": "znver3"}') from None
    if isinstance(spec, dict):
        # checked before TVM sees it: LLVM logs a multi-line complaint for a foreign triple
        kind, triple = spec.get("kind", "llvm"), str(spec.get("mtriple", "x86_64"))
        if kind != "llvm" or not triple.startswith(("x86_64", "amd64")):
            raise ReleqError(
                f"unsupported target {json.dumps(spec)}: the bit-serial kernels need kind 'llvm' on x86-64 "
                "(omit --target to use this machine's CPU)"
            )
    try:
        return make_target(spec)
    except ValueError as exc:
        raise ReleqError(str(exc).splitlines()[0]) from None


def target_dict(target: tvm.target.Target) -> dict:
    """The JSON-able dict form of ``target`` (kind, mtriple, mcpu), as written in manifests."""
    out = {"kind": target.kind.name}
    for key in ("mtriple", "mcpu", "mattr"):
        value = target.attrs.get(key)
        if value:
            out[key] = list(value) if key == "mattr" else str(value)
    return out


def machine_info(target: tvm.target.Target) -> dict:
    """What a measured latency depends on: CPU model, LLVM CPU name, TVM version, core count, and the
    cache sizes that decide which layers are timed with cold weights (``compile.layers``)."""
    caches = cache_sizes()
    return {
        "cpu_model": cpu_model(),
        "target": target_dict(target),
        "tvm": tvm.__version__,
        "cores": os.cpu_count(),
        "threads": tvm_threads(),
        "caches_kib": {"l1d": caches.l1d >> 10, "l2": caches.l2 >> 10, "l3": caches.l3 >> 10},
    }


@functools.lru_cache(maxsize=1)
def kernels_fingerprint() -> str:
    """Short hash of the kernel sources: a latency measured with other kernel code is stale."""
    import hashlib
    from importlib import resources

    digest = hashlib.sha256()
    root = resources.files("releq_tvm.kernels")
    for name in sorted(p.name for p in root.iterdir() if p.name.endswith(".py")):
        digest.update(name.encode())
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:12]


def file_safe(text: str) -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9._-]`` replaced by one ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def machine_key(target: tvm.target.Target) -> str:
    """A file-name-safe key of (CPU model, target CPU, TVM version, threads) for on-disk latency caches."""
    info = machine_info(target)
    return file_safe(f"{info['cpu_model']}-{info['target'].get('mcpu', 'generic')}-tvm{info['tvm']}-t{info['threads']}")


def describe_target(target: tvm.target.Target) -> str:
    return json.dumps(target_dict(target), sort_keys=True)
