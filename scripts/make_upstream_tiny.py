"""Write a tiny random ReLU llama in upstream PowerInfer's exact GGUF layout (reference/powerinfer.md 2), with
predictors that are perfect by construction. Independent of powerinfer's own writer, so reading it tests our
loader against the layout upstream's converters produce:

  magic PWRI (a GGUF v3 written normally, then the magic patched); predictor tensors first (the HF converter
  yields them first), then the model; 2-D tensors f16, 1-D f32; `blk.N.ffn_down_t.weight` (down_proj
  transposed, one row per neuron) instead of ffn_down; `blk.N.fc1.weight` [2 n_ff, d] and `blk.N.fc2.weight`
  [n_ff, 2 n_ff]; `powerinfer.sparse_threshold` = 0.

Perfect predictors: the predictor reads the residual x before the FFN norm, and gate(norm(x)) = (G * w) x / rms(x)
with w the norm weight, so fc1 = [G * w; -(G * w)] and fc2 = [I, -I] give logits a = (G * w) x, whose sign is
the gate's: logit >= 0 predicts exactly the neurons whose ReLU gate fires (up to f16 rounding at a ~ 0).

    python scripts/make_upstream_tiny.py -o /tmp/tiny.powerinfer.gguf
"""
from __future__ import annotations

import argparse

import numpy as np
from gguf import GGUFWriter


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-ff", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    d, ff, L, V, n_head, n_kv = args.d_model, args.n_ff, args.layers, args.vocab, 4, 2
    hd = d // n_head

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float16)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    layers = []
    for _ in range(L):
        layers.append(dict(attn_norm=norm(d), q=mat(n_head * hd, d), k=mat(n_kv * hd, d), v=mat(n_kv * hd, d),
                           o=mat(d, n_head * hd), ffn_norm=norm(d), gate=mat(ff, d), up=mat(ff, d),
                           down=mat(d, ff)))
    w = GGUFWriter(args.output, "llama")
    w.add_name("tiny-powerinfer")
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_float32("powerinfer.sparse_threshold", 0.0)
    for i, p in enumerate(layers):  # predictors first
        g = p["gate"].astype(np.float32) * p["ffn_norm"][None, :]
        w.add_tensor(f"blk.{i}.fc1.weight", np.concatenate([g, -g]).astype(np.float16))
        eye = np.eye(ff, dtype=np.float32)
        w.add_tensor(f"blk.{i}.fc2.weight", np.concatenate([eye, -eye], axis=1).astype(np.float16))
    w.add_tensor("token_embd.weight", rng.standard_normal((V, d)).astype(np.float16))
    for i, p in enumerate(layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", p["attn_norm"])
        w.add_tensor(b + "attn_q.weight", p["q"])
        w.add_tensor(b + "attn_k.weight", p["k"])
        w.add_tensor(b + "attn_v.weight", p["v"])
        w.add_tensor(b + "attn_output.weight", p["o"])
        w.add_tensor(b + "ffn_norm.weight", p["ffn_norm"])
        w.add_tensor(b + "ffn_gate.weight", p["gate"])
        w.add_tensor(b + "ffn_up.weight", p["up"])
        w.add_tensor(b + "ffn_down_t.weight", np.ascontiguousarray(p["down"].T))
    w.add_tensor("output_norm.weight", norm(d))
    w.add_tensor("output.weight", mat(V, d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(args.output, "r+b") as fh:
        fh.write(b"PWRI")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
