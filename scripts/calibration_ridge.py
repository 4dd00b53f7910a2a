"""Held-out relative output error of layer-12 gate_proj/down_proj (b=16) for the Frobenius projection and the
aware fit at several ridges: calibration = 80 self-chat samples, held out = the 100 default prompts.
    python scripts/calibration_ridge.py
"""
import torch, copy
from bcllm.io.models import load_model
from bcllm.fit.calib_text import load_calibration, make_batches, pydoc_samples
from bcllm.fit.closed_form import InputStats, _InputCapture, _rows
from bcllm.ops import circulant
m, tok = load_model("smollm2-135m")
s = load_calibration("self-chat", m, tok, 96, 48, 0, "smollm2-135m")
from bcllm.io.prompts import load_prompts
tr = make_batches(tok, s[:80], 8, 96); te = make_batches(tok, load_prompts(None), 16, 96)
names = ["model.layers.12.mlp.gate_proj", "model.layers.12.mlp.down_proj"]
cap = _InputCapture(m, names)
X = {n: [] for n in names}; XT = {n: [] for n in names}
with torch.no_grad():
    for bs, D in ((tr, X), (te, XT)):
        for b in bs:
            cap.inputs.clear(); m.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            for n in names: D[n].append(_rows(cap.inputs[n], b["attention_mask"]))
for n in names:
    x = torch.cat(X[n]).double(); xt = torch.cat(XT[n]).double()
    W = m.get_submodule(n).weight.detach().double()
    xx = x.T @ x
    ref = xt @ W.T
    def err(c): return ((xt @ circulant.to_dense(c, *W.shape).T - ref).norm() / ref.norm()).item()
    print(n, "frob", err(circulant.project_frobenius(W, 16)))
    for r in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 0):
        print(n, r, err(circulant.fit_aware(W, xx, xx, 16, r)), flush=True)
    print("train-err at 1e-4", ((x @ circulant.to_dense(circulant.fit_aware(W, xx, xx, 16, 1e-4), *W.shape).T - x@W.T).norm()/(x@W.T).norm()).item())
