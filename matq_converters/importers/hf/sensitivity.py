"""Sensitivity for ``matq quantize --calib`` (spec 10.8): how much the model's output cares about
each output feature of each calibrated linear.

Per linear, ``sensitivity[i]`` is the mean over calibration tokens of ``(dL/dy_i)^2``, where ``y`` is
the linear's output and ``L`` a sequence's summed next-token cross-entropy against tokens drawn from
the model's own prediction (so that ``E[g g^T]`` is the Fisher of the output distribution, the Hessian
of the KL divergence to the float model). With the importance (mean ``x_j^2``) it factors the
diagonal Fisher as K-FAC does: a weight error ``dW`` raises the loss per token by about
``0.5 * sum_ij sensitivity_i * importance_j * dW_ij^2``, so budgets compare tensors by what their
errors do to the output.

Layer by layer, as the GPTQ pass: one forward over the layers with the float weights keeps each
layer's input (``layers x tokens x hidden x 4`` bytes: 1 GB for an 8B model at 2,048 tokens), the
final norm and the head give the loss, and a backward pass loads the layers again in reverse order,
one at a time, each recomputed from its kept input with hooks on its linears' outputs. Models
without a final ``norm`` and a language-model head in the folder (encoders) get none.
"""

from __future__ import annotations

import numpy as np

from matq_converters.importers.hf.calibration import LayerPlan, LayerwiseModel, run_layer
from matq_format import progress

__all__ = ["DEFAULT_SENSITIVITY_TOKENS", "layer_sensitivity"]

DEFAULT_SENSITIVITY_TOKENS = 2048
"""Calibration tokens the sensitivity is measured on (the first sequences): a mean over this many
tokens and every output feature moves little, and the kept inputs grow with it."""
SEED = 0
"""The labels are drawn from the model's prediction with this seed, on the CPU: the same bytes each run."""


def layer_sensitivity(model: LayerwiseModel, tokens: np.ndarray, plans: list[LayerPlan]) -> dict[str, np.ndarray]:
    """``{tensor name: float32 [out features]}`` for every planned linear; ``{}`` where the model has
    no final norm and head to measure through. ``tokens``: ``int64 [sequences, seq_len]``."""
    import torch

    head = _head(model)
    needed = [p.index for p in plans if p.linears]
    if head is None or not needed:
        return {}
    first = min(needed)
    ids = torch.from_numpy(np.ascontiguousarray(tokens))
    n_layers = len(model.layers)
    with progress.stage("calibrate: sensitivity (forward, backward)", 2 * n_layers - first, "layer") as done:
        h, extras = model.capture(ids, n_layers - 1)
        kept = []
        with torch.no_grad():
            for i in range(n_layers):
                kept.append(h.detach())
                layer = model.load_layer(i)
                h = run_layer(layer, h, extras[i])
                model.release_layer(i)
                done(1)
        grad = _loss_grad(model, head, h)
        sums: dict[str, torch.Tensor] = {}
        for i in reversed(range(first, n_layers)):  # down to the first layer with a planned linear
            grad = _backward_layer(model, i, kept[i], extras[i], grad, plans[i].linears, sums)
            kept[i] = None
            done(1)
    count = float(ids.numel())
    return {n: (s / count).to(torch.float32).cpu().numpy() for n, s in sums.items()}


def _head(model: LayerwiseModel):
    """(final norm, head weight, logit cap) of a decoder whose folder holds its head (or ties it to
    the embeddings), or None."""
    norm = getattr(model.base, "norm", None)
    if norm is None:
        return None
    names = [n for n in ("lm_head.weight",) if n in model.src.tensors]
    if names:
        import torch

        w = np.asarray(model.src.read(names[0]))
        w = torch.from_numpy(np.array(w.astype(np.float32) if w.dtype.kind == "V" else w, np.float32))
        weight = w.to(model.device)
    elif getattr(model.config, "tie_word_embeddings", False):
        weight = model.base.get_input_embeddings().weight
    else:
        return None
    return norm, weight, getattr(model.config, "final_logit_softcapping", None)


def _loss_grad(model: LayerwiseModel, head, h):
    """d(sum of each sequence's cross-entropy against drawn labels)/d(last hidden state), one
    sequence at a time (the logits of a whole batch would be tokens x vocabulary floats)."""
    import torch

    norm, weight, cap = head
    gen = torch.Generator().manual_seed(SEED)
    grads = []
    for s in range(h.shape[0]):
        x = h[s : s + 1].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = torch.nn.functional.linear(norm(x), weight.detach())[0].float()
            if cap:
                logits = cap * torch.tanh(logits / cap)
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=gen)[:, 0]
            loss = torch.nn.functional.cross_entropy(logits, labels.to(logits.device), reduction="sum")
            (g,) = torch.autograd.grad(loss, x)
        grads.append(g)
    return torch.cat(grads, 0)


def _backward_layer(model: LayerwiseModel, i: int, h, extras, grad, linears: dict[str, str], sums: dict):
    """Layer ``i`` recomputed from its input ``h`` with grad: the summed squared gradient at each
    planned linear's output goes into ``sums``; returns the gradient at the layer's input."""
    import torch

    layer = model.load_layer(i)
    for p in layer.parameters():
        p.requires_grad_(False)
    handles = []

    def hook(name):
        def on_output(module, args, y):
            def on_grad(g):
                g2 = g.detach().reshape(-1, g.shape[-1]).double().square().sum(0)
                sums[name] = sums[name] + g2 if name in sums else g2

            y.register_hook(on_grad)

        return on_output

    for name, path in linears.items():
        handles.append(layer.get_submodule(path).register_forward_hook(hook(name)))
    try:
        x = h.detach().requires_grad_(True)
        with torch.enable_grad():
            out = run_layer(layer, x, extras)
            (g,) = torch.autograd.grad(out, x, grad)
    finally:
        for hd in handles:
            hd.remove()
        model.release_layer(i)
    return g
