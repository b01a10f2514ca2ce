"""moepath.tracer: the engine-independent core (trace store, pathways, metrics).

Never imports vLLM, Typer or Rich. The reader API::

    from moepath.tracer import Trace
    trace = Trace.open("out/trace")
"""

from .trace import Trace

__all__ = ["Trace"]
