"""The JAX backend of ``matq train`` (``--backend jax``, ``pip install 'matq[jax]'``).

:mod:`.fakequant` fake-quantizes weights with the numerics module's codes and a straight-through
estimator, :mod:`.llama` is matq's own Llama-family causal LM (Hugging Face names and safetensors,
no Flax), :mod:`.trainer` the objective, optax, the data-parallel mesh, checkpoints and export.
"""
