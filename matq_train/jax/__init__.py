"""The JAX backend of ``matq train`` (``--backend jax``, ``pip install 'matq[jax]'``).

:mod:`.fakequant` fake-quantizes weights with the numerics module's codes and a straight-through
estimator; :mod:`.decoder` (Llama, Mistral, Qwen2, Gemma 2) and :mod:`.bert` (BERT masked LM) are
matq's own models on Hugging Face names and safetensors (no Flax), built from :mod:`.layers` and
chosen by :mod:`.models`; :mod:`.trainer` holds the objective, optax, the mesh, checkpoints and export.
"""
