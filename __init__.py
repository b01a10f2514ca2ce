"""moepath: routing tracer for Mixture-of-Experts LLMs inside vLLM.

The repository root is the ``moepath`` package (see ``[tool.setuptools]`` in
pyproject.toml): ``tracer/`` is ``moepath.tracer`` (engine-independent core),
``patches/`` is ``moepath.patches`` (the vLLM plugin), ``cli/`` is
``moepath.cli`` (the ``moepath`` command).
"""

__version__ = "0.1.0"
