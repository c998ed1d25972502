"""releq-tvm: ReLeQ bitwidth search grounded in measured TVM bit-serial latency and a Stripes simulator."""

__version__ = "0.1.0"
