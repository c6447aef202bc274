"""The PyTorch backend of ``matq train``: fake quantization on the device, the loop, DDP/FSDP2, export.

:mod:`.qops` holds the numerics module's formulas as torch operations (bit-exact), :mod:`.fakequant`
the layers, :mod:`.loss` the objective per width, :mod:`.trainer` the loop and :mod:`.export` the
records handed to :func:`matq_train.export.export_records`.
"""
