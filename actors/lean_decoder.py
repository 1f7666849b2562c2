"""`LeanDecoder`: the decoding forward of a Qwen2- or Llama-style model, for the transformers engine.

Why: on a small model a decoding step of transformers' forward is almost all fixed cost. On the
embedded 1M-parameter model one step of 32 rows took ~4.5 ms of which the arithmetic is ~0.5 ms:
the rest is the modules' Python (output capturing, config lookups, mask building, the
DynamicCache's concatenations). This is the same arithmetic written as the dozen tensor calls per
layer it is, on the model's own parameters (so `load_state_dict` into the model updates it too),
with a key/value cache allocated once for the whole response budget.

The arithmetic, per layer l (x the hidden state of each new position, [rows, s, d]):

    a   = RMSNorm_l(x)                       RMSNorm(x) = w * x / sqrt(mean(x^2) + eps), in float32
    q, k, v = a Wq + bq, a Wk + bk, a Wv + bv    heads of head_dim; k, v have num_key_value_heads
    q, k = rope(q, pos), rope(k, pos)        q cos(pos) + rotate_half(q) sin(pos), the model's own
                                             rotary tables (`model.model.rotary_emb`)
    K[:, :, slot], V[:, :, slot] = k, v      the cache: slots 0..P-1 the prompt, P + t token t
    o   = softmax(q K^T / sqrt(head_dim) + mask) V    grouped-query attention (`enable_gqa`)
    x   = x + o Wo (+ bo)
    x   = x + (silu(b Wg) * (b Wu)) Wd,  b = RMSNorm'_l(x)

then logits = RMSNorm_final(x_last) W_head (+ b_head). The mask lets a position see the cache slots
that hold its own row's real tokens at or before it: left padding is never attended to. A padding
position of the prompt sees itself too, so that its (unused) state stays finite rather than the
NaN of a softmax over nothing, which would reach real positions through 0 * NaN in the cache.

`supports(model)` says why a model is not one of these (another attention, extra norms such as
Qwen3's q/k norms, a sliding window, scaled or dynamic rope, logit scaling...): the engine then
uses transformers' forward. tests/unit/actors/test_lean_decoder.py checks the logits against
transformers' forward, left padding and shared prompts included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MODEL_TYPES = ("qwen2", "llama")
LAYER_PARAMS = {
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
}


def supports(model: Any) -> str:
    """'' when `model` (a transformers causal LM) can decode here, else why not."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in MODEL_TYPES:
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not one of {MODEL_TYPES}"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "a sliding-window layer"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"rope_type {rope.get('rope_type', rope.get('type'))!r}"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    for key in ("logit_scale", "final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            return f"config.{key}"
    base = model.base_model
    for i, layer in enumerate(base.layers):
        extra = {n for n, _ in layer.named_parameters()} - LAYER_PARAMS
        if extra:
            return f"layer {i} has {sorted(extra)[:3]}"
    if getattr(model.get_output_embeddings(), "weight", None) is None:
        return "no output embedding"
    return ""


class LeanDecoder:
    """`start` (the prompts once, their cache repeated for `copies` rows each) then `step` per new
    token; each returns the last position's logits, [rows, vocab]. One decoding at a time."""

    def __init__(self, model: Any):
        why = supports(model)
        if why:
            raise ValueError(f"LeanDecoder cannot run this model: {why}")
        cfg = model.config
        base = model.base_model
        self.embed, self.norm = base.embed_tokens.weight, base.norm
        self.head = model.get_output_embeddings()
        self.rotary = base.rotary_emb
        self.eps = float(cfg.rms_norm_eps)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.layers = base.layers
        self.scale = float(getattr(self.layers[0].self_attn, "scaling", self.head_dim ** -0.5))

    def start(self, ids: "torch.Tensor", mask: "torch.Tensor", positions: "torch.Tensor", copies: int,
              budget: int) -> "torch.Tensor":
        """Prefill `ids[::copies]` (left-padded [rows, P], `mask` 1 on real tokens, `positions`
        their places) and make a cache of P + budget slots for every row."""
        import torch

        rows, p = ids.shape
        self.next_slot = p
        first = slice(None, None, copies)
        dev, dtype = ids.device, self.embed.dtype
        self._cos, self._sin = self.rotary(self.embed[:1], torch.arange(p + budget, device=dev)[None])
        self._keep = torch.zeros(rows, p + budget, dtype=torch.bool, device=dev)
        self._keep[:, :p] = mask.bool()
        shape = (rows, self.kv_heads, p + budget, self.head_dim)
        self._k = [torch.empty(shape, dtype=dtype, device=dev) for _ in self.layers]
        self._v = [torch.empty(shape, dtype=dtype, device=dev) for _ in self.layers]
        keep = self._keep[first, :p]
        causal = torch.ones(p, p, dtype=torch.bool, device=dev).tril()
        sees = (causal[None] & keep[:, None, :]) | torch.eye(p, dtype=torch.bool, device=dev)[None]
        x = self._forward(torch.nn.functional.embedding(ids[first], self.embed), positions[first],
                          sees[:, None], slice(0, p), copies)
        return self._logits(x).repeat_interleave(copies, dim=0)

    def step(self, tokens: "torch.Tensor", positions: "torch.Tensor") -> "torch.Tensor":
        """One new token per row ([rows]) at `positions` ([rows]): its logits."""
        import torch

        slot = self.next_slot
        self.next_slot += 1
        self._keep[:, slot] = True
        sees = self._keep[:, None, None, :slot + 1]
        x = self._forward(torch.nn.functional.embedding(tokens[:, None], self.embed), positions[:, None],
                          sees, slice(slot, slot + 1), 1)
        return self._logits(x)

    def _forward(self, x: "torch.Tensor", positions: "torch.Tensor", sees: "torch.Tensor", slots: slice,
                 copies: int) -> "torch.Tensor":
        import torch
        from torch.nn.functional import linear, scaled_dot_product_attention, silu

        b, s, _ = x.shape
        cos, sin = self._cos[0][positions][:, None], self._sin[0][positions][:, None]  # [b, 1, s, hd]
        for layer, k_cache, v_cache in zip(self.layers, self._k, self._v):
            att, mlp = layer.self_attn, layer.mlp
            a = self._rms(x, layer.input_layernorm)
            q = linear(a, att.q_proj.weight, att.q_proj.bias).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k = linear(a, att.k_proj.weight, att.k_proj.bias).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            v = linear(a, att.v_proj.weight, att.v_proj.bias).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            k_cache[:, :, slots] = k.repeat_interleave(copies, dim=0) if copies > 1 else k
            v_cache[:, :, slots] = v.repeat_interleave(copies, dim=0) if copies > 1 else v
            if slots.start == 0:  # the prefill: its prompt rows attend among themselves
                keys, values = k, v
            else:
                keys, values = k_cache[:, :, :slots.stop], v_cache[:, :, :slots.stop]
            o = scaled_dot_product_attention(q, keys, values, attn_mask=sees, scale=self.scale,
                                             enable_gqa=self.kv_heads != self.heads)
            x = x + linear(o.transpose(1, 2).reshape(b, s, -1), att.o_proj.weight, att.o_proj.bias)
            m = self._rms(x, layer.post_attention_layernorm)
            x = x + linear(silu(linear(m, mlp.gate_proj.weight)) * linear(m, mlp.up_proj.weight), mlp.down_proj.weight)
        return x

    def _rms(self, x: "torch.Tensor", norm: Any) -> "torch.Tensor":
        import torch

        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + getattr(norm, "variance_epsilon", self.eps))
        return norm.weight * h.to(x.dtype)

    def _logits(self, x: "torch.Tensor") -> "torch.Tensor":
        from torch.nn.functional import linear

        last = self._rms(x[:, -1], self.norm)
        return linear(last, self.head.weight, getattr(self.head, "bias", None))


def _rotate_half(x: "torch.Tensor") -> "torch.Tensor":
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
