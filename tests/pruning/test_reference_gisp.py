"""GISP against a deliberately plain re-implementation (DESIGN §2): same removal order in fp32."""

import numpy as np
import torch

from gisp_deploy.data import load_calibration
from gisp_deploy.families import ModelShape
from gisp_deploy.pruning.methods import PruneConfig, prune
from tests.factory import CALIB_TEXT, make_model_dir


def plain_gisp(model, shape, ids, steps, max_sparsity, batch_size, protected):
    """Every weight trainable, HF's own loss, Python loops over structures; no fp32 tricks needed in fp32."""
    hd, hidden, I = shape.head_dim, shape.hidden, shape.intermediate
    total = shape.total_params
    head_cost = (4 if shape.group_size == 1 else 2) * hd * hidden  # MHA: a head takes its k/v rows along
    removed, removed_params, order = set(), 0, []
    heads_left = {(l, g): shape.group_size for l in range(shape.num_layers) for g in range(shape.num_kv_heads)}
    for step in range(1, steps + 1):
        model.zero_grad()
        for b in range(0, len(ids), batch_size):
            x = ids[b:b + batch_size]
            (model(input_ids=x, labels=x).loss * len(x) / len(ids)).backward()
        cands = []
        for l, layer in enumerate(model.model.layers):
            if l in protected:
                continue
            a, m = layer.self_attn, layer.mlp
            for h in range(shape.num_heads):
                r = slice(h * hd, (h + 1) * hd)
                s = (a.q_proj.weight[r] * a.q_proj.weight.grad[r]).abs().sum()
                s += (a.o_proj.weight[:, r] * a.o_proj.weight.grad[:, r]).abs().sum()
                if shape.group_size == 1:
                    s += (a.k_proj.weight[r] * a.k_proj.weight.grad[r]).abs().sum()
                    s += (a.v_proj.weight[r] * a.v_proj.weight.grad[r]).abs().sum()
                cands.append((s.item() / (4 * hd * hidden), l, 0, h))
            for c in range(I):
                s = (m.gate_proj.weight[c] * m.gate_proj.weight.grad[c]).abs().sum()
                s += (m.up_proj.weight[c] * m.up_proj.weight.grad[c]).abs().sum()
                s += (m.down_proj.weight[:, c] * m.down_proj.weight.grad[:, c]).abs().sum()
                cands.append((s.item() / (3 * I), l, 1, c))
        target = max_sparsity * total * step / steps
        for score, l, kind, i in sorted(cands):
            if removed_params >= target:
                break
            if (l, kind, i) in removed:
                continue
            removed.add((l, kind, i))
            order.append((l, kind, i))
            layer = model.model.layers[l]
            with torch.no_grad():
                if kind == 1:
                    removed_params += 3 * hidden
                    layer.mlp.gate_proj.weight[i] = 0
                    layer.mlp.up_proj.weight[i] = 0
                    layer.mlp.down_proj.weight[:, i] = 0
                else:
                    removed_params += head_cost
                    layer.self_attn.q_proj.weight[i * hd:(i + 1) * hd] = 0
                    layer.self_attn.o_proj.weight[:, i * hd:(i + 1) * hd] = 0
                    g = i // shape.group_size
                    heads_left[l, g] -= 1
                    if shape.group_size > 1 and heads_left[l, g] == 0:
                        removed_params += 2 * hd * hidden
    return order


def test_same_order_as_plain_implementation(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("llama-gqa", "llama-mha"):
        path = make_model_dir(tmp_path, name)
        tok = AutoTokenizer.from_pretrained(path)
        calib = load_calibration("lm", tok, [CALIB_TEXT], samples=6, seq_len=24, seed=0)
        cfg = PruneConfig(steps=3, max_sparsity=0.5, protect_first=0.25, protect_last=1, batch_size=4)
        fresh = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
        model = fresh()
        shape = ModelShape.from_config(model.config)
        ours = prune(model, shape, calib, cfg)
        want = plain_gisp(fresh(), shape, calib.input_ids, 3, 0.5, 4, set(cfg.protected_layers(shape.num_layers)))
        got = list(zip(ours.layer[:ours.num_covered].tolist(), ours.kind[:ours.num_covered].tolist(),
                       ours.index[:ours.num_covered].tolist()))
        assert got == want, name
        assert np.all(np.diff(ours.step[:ours.num_covered]) >= 0)
