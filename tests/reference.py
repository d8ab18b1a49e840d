"""Independent float64 computations the engine is checked against: explicit per-example gradients by
autograd one example at a time, input patches by slicing, covariances and dense Kronecker curvature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyTask:
    """Summed cross-entropy; 'sampled' labels are a deterministic shift so tests can reproduce them;
    measurement = minus the summed margin (or the training loss itself with measure_loss)."""

    def __init__(self, measure_loss: bool = False, tracked: list[str] | None = None) -> None:
        self.measure_loss, self.tracked = measure_loss, tracked

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            y = (y + 1) % logits.shape[-1]
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        if self.measure_loss:
            return self.compute_train_loss(batch, model)
        x, y = batch
        logits = model(x)
        correct = logits.gather(1, y[:, None])[:, 0]
        others = logits.masked_fill(F.one_hot(y, logits.shape[-1]).bool(), float("-inf")).logsumexp(-1)
        return -(correct - others).sum()

    def tracked_modules(self):
        return self.tracked


class SeqModel(nn.Module):
    """A linear layer applied to every position of a [B, L, d] input."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)).mean(dim=1))


def make_model(kind: str, dtype=torch.float64) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny model and 32 examples (x, y) for it."""
    torch.manual_seed({"mlp": 0, "cnn": 1, "seq": 2}[kind])
    n = 32
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(n, 6)
    elif kind == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=True),
            nn.Tanh(),
            nn.Conv2d(3, 4, 2, bias=False),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(36, 3),
        )
        x = torch.randn(n, 2, 7, 7)
    else:
        model = SeqModel()
        x = torch.randn(n, 3, 4)
    y = torch.randint(0, 3, (n,))
    return model.to(dtype).eval(), x.to(dtype), y


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def tracked(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def flat_gradient(module: nn.Module, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
    flat = weight_grad.reshape(weight_grad.shape[0], -1)
    return torch.cat([flat, bias_grad[:, None]], 1) if module.bias is not None else flat


def per_example_gradients(model, loss_fn, x, y) -> dict[str, torch.Tensor]:
    """{module: [N, out, in']} by autograd on each example alone."""
    modules = tracked(model)
    out = {name: [] for name in modules}
    for n in range(len(x)):
        loss = loss_fn((x[n : n + 1], y[n : n + 1]), model)
        params = [p for m in modules.values() for p in ([m.weight] + ([m.bias] if m.bias is not None else []))]
        grads = iter(torch.autograd.grad(loss, params))
        for name, m in modules.items():
            w = next(grads)
            b = next(grads) if m.bias is not None else None
            out[name].append(flat_gradient(m, w, b))
    return {name: torch.stack(gs) for name, gs in out.items()}


def patches_by_slicing(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[N, T, in'] input patches built position by position, without unfold."""
    if isinstance(module, nn.Linear):
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    else:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = module.kernel_size, module.stride, module.padding, module.dilation
        xp = F.pad(x, (pw, pw, ph, ph))
        out_h = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
        out_w = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
        rows = []
        for i in range(out_h):
            for j in range(out_w):
                patch = xp[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
                rows.append(patch.reshape(x.shape[0], -1))
        a = torch.stack(rows, 1)
    if module.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], a.shape[1], 1, dtype=a.dtype)], 2)
    return a


def activations_and_output_gradients(model, loss_fn, x, y) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (a [N, T, in'], g [N, T, out])} with g read from retained output gradients."""
    modules = tracked(model)
    inputs, outputs = {}, {}
    handles = []
    for name, m in modules.items():

        def hook(mod, args, output, name=name):
            inputs[name] = args[0].detach()
            output.retain_grad()
            outputs[name] = output

        handles.append(m.register_forward_hook(hook))
    loss_fn((x, y), model).backward()
    for h in handles:
        h.remove()
    model.zero_grad()
    result = {}
    for name, m in modules.items():
        grad = outputs[name].grad
        if isinstance(m, nn.Conv2d):
            g = grad.flatten(2).transpose(1, 2)
        else:
            g = grad.reshape(grad.shape[0], -1, grad.shape[-1])
        result[name] = (patches_by_slicing(m, inputs[name]), g)
    return result


def dense_inverse_damped(strategy: str, factors: dict, module: str, damping: float) -> torch.Tensor:
    """(F + d I)^-1 as a dense matrix over the row-major vec of the module's [out, in'] gradient."""
    lam = factors["lambda_matrix"][module].reshape(-1)
    if strategy == "diagonal":
        dense = torch.diag(lam)
    else:
        basis = torch.kron(factors["gradient_eigenvectors"][module], factors["activation_eigenvectors"][module])
        dense = basis @ torch.diag(lam) @ basis.T
    return torch.linalg.inv(dense + damping * torch.eye(len(lam), dtype=lam.dtype))


def dense_scores(strategy, factors, query_grads, train_grads, damping) -> torch.Tensor:
    """sum over modules of g_q^T (F + d I)^-1 g_n; identity is the plain dot product.
    `damping` is a number or a {module: number} dict."""
    total = 0
    for name, gq in query_grads.items():
        q = gq.reshape(gq.shape[0], -1)
        t = train_grads[name].reshape(train_grads[name].shape[0], -1)
        if strategy == "identity":
            total = total + q @ t.T
        else:
            d = damping[name] if isinstance(damping, dict) else damping
            total = total + q @ dense_inverse_damped(strategy, factors, name, d) @ t.T
    return total


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()
