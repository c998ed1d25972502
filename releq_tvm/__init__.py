"""releq-tvm: ReLeQ bitwidth search grounded in measured TVM bit-serial latency and a Stripes simulator.

The Python API (:mod:`releq_tvm.api`) is exported here and imported on first use, so
``import releq_tvm`` stays cheap (no torch, TVM or simulator)::

    import releq_tvm
    found = releq_tvm.search(model, train, val, input_shape=(1, 28, 28), episodes=20)
    built = releq_tvm.compile(model, found.w_bits, input_shape=(1, 28, 28))
    stripes = releq_tvm.simulate(model, found.w_bits, input_shape=(1, 28, 28))
"""

import importlib
import sys
import types

__version__ = "0.1.0"

#: The names of :mod:`releq_tvm.api` that ``releq_tvm.<name>`` gives.
_API = ("search", "compile", "simulate", "SearchResult", "CompileResult", "SimulateResult")

__all__ = ["__version__", *_API]


def _api(name: str):
    return getattr(importlib.import_module("releq_tvm.api"), name)


def __getattr__(name: str):
    if name in _API:
        return _api(name)
    raise AttributeError(f"module 'releq_tvm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


class _CallableStage(types.ModuleType):
    """The subpackage ``releq_tvm.search`` or ``releq_tvm.compile``, callable as the API function of its name."""

    def __call__(self, *args, **kwargs):
        return _api(self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    # Why: importing the subpackage releq_tvm.compile (or .search) sets the package attribute of
    # that name to the subpackage, which would hide the API function releq_tvm.compile. The
    # subpackage is made callable instead, so both `releq_tvm.compile(model, bits)` and
    # `releq_tvm.compile.load_compiled` work whichever was touched first.
    def __setattr__(self, name, value):
        if name in ("search", "compile") and type(value) is types.ModuleType:
            value.__class__ = _CallableStage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
