"""Function-preserving transforms that move weights closer to block-circulant (docs/DESIGN.md section 6).

A checkpoint's channel order is arbitrary, and a block-circulant fit depends on it. Two
reorderings leave the dense model's function exactly unchanged and cost nothing at inference:

- hidden: per decoder layer, permute the MLP's intermediate channels (rows of gate_proj and
  up_proj, columns of down_proj) and rescale them (up_proj rows by s, down_proj columns by 1/s;
  act(gate) * up is linear in up);
- residual: one permutation of the residual stream for the whole model (embedding and LM head
  columns, every norm weight on the stream, columns of the linears that read it, rows of those
  that write it). RMS norms are invariant to a permutation, so nothing needs folding, and it
  holds for every architecture, Gemma3's sandwich norms included. A general rotation would need
  the norm weights folded first and is not exact under Gemma3's post-norms; not built.

The search alternates the activation-aware circulant fit (circulant.fit_aware) with a linear
assignment of channels to positions (scipy.optimize.linear_sum_assignment) and, for hidden
channels, a closed-form rescaling, keeping a step only when the exact objective falls:

    J = sum over the compressed projections of ||(W - C) X||^2 / ||W X||^2

(C the aware fit, X the projection's calibration inputs). Low-rank fits are invariant to both
transforms, so only block-circulant students use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .closed_form import input_stats
from ..ops.circulant import fit_aware, to_dense
from ..errors import InputError
from ..surgery import decoder_layers

KINDS = ("none", "hidden", "residual", "both")
MLP = ("gate_proj", "up_proj", "down_proj")
READ = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")   # linears that read the residual stream
WRITE = ("o_proj", "down_proj")                                 # linears that write it


@dataclass
class Transform:
    """residual: (hidden,) position p of the residual stream holds original channel residual[p];
    hidden: {layer: (perm, scale)}, position p of that MLP's intermediate channels holds original
    channel perm[p], multiplied by scale[p] (up_proj row) and divided by it (down_proj column)."""

    residual: torch.Tensor | None = None
    hidden: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    history: dict = field(default_factory=dict)  # objective per search iteration (for the record)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {} if self.residual is None else {"transform.residual": self.residual}
        for layer, (perm, scale) in self.hidden.items():
            out[f"transform.hidden.{layer}.perm"] = perm
            out[f"transform.hidden.{layer}.scale"] = scale
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Transform":
        t = cls(residual=tensors.get("transform.residual"))
        for name, value in tensors.items():
            parts = name.split(".")
            if parts[:2] == ["transform", "hidden"] and parts[3] == "perm":
                t.hidden[int(parts[2])] = (value, tensors[f"transform.hidden.{parts[2]}.scale"])
        return t


# ---------------------------------------------------------------- applying a transform (exact)

def _mlp(layer: nn.Module) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP):
        raise InputError("transforms need gated MLPs with dense gate_proj, up_proj and down_proj linears "
                         "(Llama, Qwen2, Mistral, Gemma); apply them before compressing", "transform")
    return mlp


@torch.no_grad()
def permute_hidden_(mlp: nn.Module, perm: torch.Tensor, scale: torch.Tensor) -> None:
    """Reorder and rescale one gated MLP's intermediate channels in place; same function."""
    gate, up, down = (getattr(mlp, n) for n in MLP)
    perm, scale = perm.to(gate.weight.device), scale.to(gate.weight.device, gate.weight.dtype)
    gate.weight.copy_(gate.weight[perm])
    up.weight.copy_(up.weight[perm] * scale[:, None])
    down.weight.copy_(down.weight[:, perm] / scale[None, :])
    if gate.bias is not None:
        gate.bias.copy_(gate.bias[perm])
    if up.bias is not None:
        up.bias.copy_(up.bias[perm] * scale)


def _residual_params(model: nn.Module, hidden: int) -> tuple[list, list, list]:
    """(vectors, read weights, written linears) on the residual stream: every norm weight of size
    `hidden`, the embedding and LM head, and the decoder layers' reading and writing linears."""
    prefix, layers = decoder_layers(model)
    vectors, reads, writes = [], [], []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and last in READ and name.startswith(prefix + "."):
            reads.append(module.weight)
        elif isinstance(module, nn.Linear) and last in WRITE and name.startswith(prefix + "."):
            writes.append(module)
        elif "norm" in last.lower() and isinstance(w, torch.Tensor) and w.shape == (hidden,):
            vectors.append(w)
    heads = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
             if m is not None}  # a tied head is the embedding: permuted once
    return vectors, reads + list(heads.values()), writes


@torch.no_grad()
def permute_residual_(model: nn.Module, perm: torch.Tensor) -> None:
    """Reorder the residual stream's channels in place; same function (norms are permutation invariant)."""
    hidden = model.get_input_embeddings().weight.shape[1]
    if perm.shape != (hidden,) or not torch.equal(perm.sort().values.cpu(), torch.arange(hidden)):
        raise InputError(f"the residual permutation must be a permutation of {hidden} channels", "transform")
    vectors, reads, writes = _residual_params(model, hidden)
    if sum(1 for w in reads if w.shape[0] != hidden) < 2 or not writes:
        raise InputError("could not find the linears on this model's residual stream (expected q/k/v/o_proj "
                         "and gate/up/down_proj); residual transforms support Llama-style decoders", "transform")
    p = perm.to(vectors[0].device if vectors else reads[0].device)
    for v in vectors:
        v.copy_(v[p])
    for w in reads:
        w.copy_(w[:, p])
    for m in writes:
        m.weight.copy_(m.weight[p])
        if m.bias is not None:
            m.bias.copy_(m.bias[p])


def apply_transform_(model: nn.Module, transform: Transform) -> nn.Module:
    """Apply a found (or loaded) transform to a dense model, in place."""
    if transform.residual is not None:
        permute_residual_(model, transform.residual)
    _, layers = decoder_layers(model)
    for layer, (perm, scale) in transform.hidden.items():
        permute_hidden_(_mlp(layers[layer]), perm, scale)
    return model


# ---------------------------------------------------------------- the objective and its search

@dataclass
class MLPData:
    """One gated MLP as the search sees it, in the current channel order (float64 weights):
    w = (gate, up, down); sx, sh: second moments of the inputs of gate/up and of down over all
    calibration tokens; x: a sample of MLP input rows (float32) for the exact objective."""

    w: tuple
    sx: torch.Tensor
    sh: torch.Tensor
    x: torch.Tensor
    act: object
    block_size: int

    def permute_hidden(self, sigma: torch.Tensor, t: torch.Tensor | None = None) -> "MLPData":
        """Intermediate position p takes current channel sigma[p], then is rescaled by t[p]."""
        t = torch.ones(len(sigma), dtype=torch.float64) if t is None else t
        g, u, d = self.w
        w = (g[sigma], u[sigma] * t[:, None], d[:, sigma] / t[None, :])
        return MLPData(w, self.sx, self.sh[sigma][:, sigma] * t[:, None] * t[None, :], self.x, self.act,
                       self.block_size)

    def permute_stream(self, sigma: torch.Tensor) -> "MLPData":
        """Residual position p takes current channel sigma[p]."""
        g, u, d = self.w
        return MLPData((g[:, sigma], u[:, sigma], d[sigma]), self.sx[sigma][:, sigma], self.sh,
                       self.x[:, sigma], self.act, self.block_size)

    def fits(self, ridge: float) -> tuple:
        """Dense (gate, up, down) of the activation-aware block-circulant fits."""
        return tuple(circulant_dense(m, xx, self.block_size, ridge) for m, xx in zip(self.w, (self.sx, self.sx, self.sh)))

    def forward(self, w: tuple) -> torch.Tensor:
        g, u, d = (m.float() for m in w)
        return (self.act(self.x @ g.T) * (self.x @ u.T)) @ d.T

    def error(self, fits: tuple) -> float:
        """The exact objective: relative output error^2 of the MLP with all three fits, on the sample."""
        y = self.forward(self.w)
        return float((self.forward(fits) - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))

    def sensitivity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per intermediate channel, the output energy per unit of squared error of gate's and
        up's row: ||down column||^2 E[(u act'(g))^2] and ||down column||^2 E[act(g)^2]."""
        x = self.x.to(torch.float64)
        g, u = x @ self.w[0].T, x @ self.w[1].T
        with torch.enable_grad():
            g_ = g.detach().requires_grad_()
            a = self.act(g_)
            slope, = torch.autograd.grad(a.sum(), g_)
        col = (self.w[2] ** 2).sum(0)
        return col * (u * slope).pow(2).mean(0), col * a.detach().pow(2).mean(0)


def circulant_dense(w: torch.Tensor, xx: torch.Tensor, block_size: int, ridge: float) -> torch.Tensor:
    """The activation-aware block-circulant fit of W on inputs with second moment xx, as a dense float64 matrix."""
    return to_dense(fit_aware(w, xx, xx, block_size, ridge), *w.shape).to(torch.float64)


def _row_costs(w: torch.Tensor, c: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """cost[k, p] = (w_k - c_p) xx (w_k - c_p)^T: row k of W placed where C has row p."""
    wx, cx = w @ xx, c @ xx
    return (wx * w).sum(1)[:, None] + (cx * c).sum(1)[None, :] - 2 * wx @ c.T


def _column_costs(w: torch.Tensor, c: torch.Tensor, diag: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """cost[k, p] ~ xx_kk sum_r weight_r (w[r, k] - c[r, p])^2: column k placed at p (cross terms of
    xx left out; the search keeps a step only if the exact objective falls)."""
    wr, cr = w * row_weight[:, None], c * row_weight[:, None]
    sq = (wr * w).sum(0)[:, None] + (cr * c).sum(0)[None, :] - 2 * wr.T @ c
    return diag[:, None] * sq


def _assign(cost: torch.Tensor) -> torch.Tensor:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    sigma = torch.empty(cost.shape[0], dtype=torch.long)
    sigma[torch.as_tensor(cols)] = torch.as_tensor(rows)  # new position p holds current position sigma[p]
    return sigma


def _hidden_costs(mlp: MLPData, fits: tuple, kg: torch.Tensor, ku: torch.Tensor) -> torch.Tensor:
    """cost[k, p]: the output error of intermediate channel k placed at position p, fits held fixed;
    kg, ku: mlp.sensitivity()."""
    return (kg[:, None] * _row_costs(mlp.w[0], fits[0], mlp.sx) + ku[:, None] * _row_costs(mlp.w[1], fits[1], mlp.sx)
            + _column_costs(mlp.w[2], fits[2], mlp.sh.diagonal(), torch.ones(mlp.w[2].shape[0], dtype=torch.float64)))


SCALE_GRID = torch.exp(torch.linspace(-1.5, 1.5, 31, dtype=torch.float64))  # factors e^-1.5 .. e^1.5, 1 included


def _rescale(mlp: MLPData, fits: tuple, ku: torch.Tensor) -> torch.Tensor:
    """Per channel, the factor t (on SCALE_GRID) minimising, fits held fixed, the up row's output
    error k_up ||(t u - c_u) X||^2 / t^2 plus the down column's sh_pp ||w_d - t c_d||^2
    (ku: mlp.sensitivity()[1])."""
    _, u, d = mlp.w
    _, cu, cd = fits
    ux, cx = u @ mlp.sx, cu @ mlp.sx
    uu, uc, cc = (ux * u).sum(1), (ux * cu).sum(1), (cx * cu).sum(1)
    s = mlp.sh.diagonal()
    ww, wc, dd = (d * d).sum(0), (d * cd).sum(0), (cd * cd).sum(0)
    t = SCALE_GRID[:, None]
    f = ku * (uu - 2 * uc / t + cc / t ** 2) + s * (ww - 2 * t * wc + t ** 2 * dd)
    return SCALE_GRID[f.argmin(0)]


def search_hidden(mlp: MLPData, ridge: float = 1e-4, iters: int = 8, rescale: bool = True,
                  tol: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, list[float], MLPData]:
    """(perm, scale, objective per accepted step, the MLP in its new order) for one MLP: alternate
    the aware fit with a linear assignment of intermediate channels (and a rescaling); a step is
    kept only when the exact objective (MLPData.error) falls by more than `tol` relatively."""
    m = mlp.w[0].shape[0]
    perm, scale = torch.arange(m), torch.ones(m, dtype=torch.float64)
    fits = mlp.fits(ridge)
    history = [mlp.error(fits)]
    for _ in range(iters):
        kg, ku = mlp.sensitivity()
        sigma = _assign(_hidden_costs(mlp, fits, kg, ku))
        new = mlp.permute_hidden(sigma)
        # a channel's sensitivity moves with it: ku[sigma] is the permuted MLP's, not recomputed
        t = _rescale(new, fits, ku[sigma]) if rescale else torch.ones(m, dtype=torch.float64)
        new = new.permute_hidden(torch.arange(m), t)
        new_fits = new.fits(ridge)
        value = new.error(new_fits)
        if value >= history[-1] * (1 - tol):
            break
        mlp, fits, perm, scale = new, new_fits, perm[sigma], scale[sigma] * t
        history.append(value)
    return perm, scale.float(), history, mlp


def search_residual(mlps: list[MLPData], ridge: float = 1e-4, iters: int = 8,
                    tol: float = 1e-3, progress: bool = False) -> tuple[torch.Tensor, list[float], list[MLPData]]:
    """(perm, objective per accepted step, the MLPs in the new order) for one residual-stream
    permutation shared by all `mlps`; the objective is the sum of their MLPData.error."""
    fits = [m.fits(ridge) for m in mlps]
    history, perm = [sum(m.error(f) for m, f in zip(mlps, fits))], torch.arange(mlps[0].sx.shape[0])
    for _ in tqdm(range(iters), desc="residual permutation", disable=not progress, leave=False):
        cost = 0
        for m, (cg, cu, cd) in zip(mlps, fits):
            kg, ku = m.sensitivity()
            energy = float(((m.w[2] @ m.sh) * m.w[2]).sum())  # the MLP's output energy: costs become relative
            cost = cost + (_column_costs(m.w[0], cg, m.sx.diagonal(), kg) + _column_costs(m.w[1], cu, m.sx.diagonal(), ku)
                           + _row_costs(m.w[2], cd, m.sh)) / energy
        sigma = _assign(cost)
        new = [m.permute_stream(sigma) for m in mlps]
        new_fits = [m.fits(ridge) for m in new]
        value = sum(m.error(f) for m, f in zip(new, new_fits))
        if value >= history[-1] * (1 - tol):
            break
        mlps, fits, perm = new, new_fits, perm[sigma]
        history.append(value)
    return perm, history, mlps


def mlp_data(model: nn.Module, block_sizes: dict[int, int], batches, rows: int = 4096,
             progress: bool = True) -> list[MLPData]:
    """MLPData of the MLPs of the layers in `block_sizes` {layer: block size} of the dense `model`
    on calibration `batches`."""
    layers = list(block_sizes)
    prefix, blocks = decoder_layers(model)
    mlps = [_mlp(blocks[i]) for i in layers]
    names = [f"{prefix}.{i}.mlp.{n}" for i in layers for n in ("gate_proj", "down_proj")]
    stats = input_stats(model, names, batches, progress, keep_rows=rows)
    return [MLPData(tuple(getattr(m, n).weight.detach().to(torch.float64) for n in MLP),
                    stats[f"{prefix}.{i}.mlp.gate_proj"].xx, stats[f"{prefix}.{i}.mlp.down_proj"].xx,
                    stats[f"{prefix}.{i}.mlp.gate_proj"].rows, m.act_fn, block_sizes[i])
            for i, m in zip(layers, mlps)]


def find_transform(model: nn.Module, batches, block_sizes: dict[int, int], kind: str, ridge: float = 1e-4,
                   iters: int = 8, progress: bool = True) -> Transform:
    """Search the transform `kind` (hidden, residual or both) for the MLPs of the layers in
    `block_sizes` {layer: block size} compressed block-circulant, on calibration `batches` of
    the (dense) `model`."""
    if kind not in KINDS:
        raise InputError(f"unknown transform {kind!r}; allowed: {', '.join(KINDS)}", "transform")
    transform = Transform()
    if kind == "none":
        return transform
    layers = list(block_sizes)
    mlps = mlp_data(model, block_sizes, batches, progress=progress)
    if kind in ("residual", "both"):
        transform.residual, transform.history["residual"], mlps = search_residual(mlps, ridge, iters,
                                                                                   progress=progress)
    if kind in ("hidden", "both"):
        for layer, mlp in zip(tqdm(layers, desc="hidden permutation", disable=not progress, leave=False), mlps):
            perm, scale, history, _ = search_hidden(mlp, ridge, iters)
            transform.hidden[layer] = (perm, scale)
            transform.history[f"hidden.{layer}"] = history
    return transform
