# train.compile: torch.compile the backbone and decoders in place (itpn_d2/engine/compile.py).
# Off by default: compilation costs minutes up front and pays only on long runs; measure with
# tools/benchmark.py --compile first. Every config that builds `train` sets
# `train.compile = train_compile`, so the keys below can be overridden on the command line.
from itpn_d2.engine.compile import DEFAULT_COMPILE_MODULES

train_compile = dict(
    enabled=False,
    modules=list(DEFAULT_COMPILE_MODULES),  # dotted submodule paths; missing ones are skipped
    options=dict(backend="inductor", mode=None, dynamic=None, fullgraph=False),  # torch.compile's
)
