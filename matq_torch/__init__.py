"""A matq checkpoint as a transformers model served at any width, switched in place.

``load(path, bits=4)`` builds the model of the checkpoint's carried config and keeps, for every
quantized tensor, its bit-planes (1 byte per weight for all 8), scales and zero points as buffers of
the module that owns it, beside the one float weight it serves now. ``model.matq.switch(bits=2)``
(or ``plan=``, ``extra_precision=``) unpacks the planes that width needs with the C kernel and
writes the dequantized weights into the existing parameters: no reload, ties kept, ``generate``
works at once.
"""

from .loader import LoadError, MatqWeights, load

__all__ = ["LoadError", "MatqWeights", "load"]
