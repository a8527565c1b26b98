"""An independent numpy forward pass over the tensors of a GGUF file, as llama.cpp computes it.

Reads the file with `gguf.GGUFReader`, dequantizes every tensor with `gguf.quants`, and runs the
llama / granite_swa graph in float64: interleaved RoPE (llama.cpp's pairing), GQA, per-layer
sliding windows (0 <= i - j < W), SwiGLU, tied or separate output. llama.cpp's CPU matmuls
round the activations to the weight's "vec_dot" type before multiplying (Q8_0 blocks of 32 for
Q4_0/Q5_0/Q8_0 weights, Q8_K blocks of 256 for K-quants, F16/BF16 for half-precision
weights); `round_activations=True` reproduces that, so quantized files of the test models can
be checked to 1e-3. It does not carry over to every model: on SmolLM2-135M a Q8_0 file in
llama.cpp differs from this rounding model by 0.33 logits at the first position (an F16 KV
cache alone moves it by 0.29), so real models are compared by KL divergence and top-1 instead.
`adapter=` applies a LoRA adapter GGUF as llama.cpp does at load time: each targeted matmul
gains `alpha / rank * B (A x)`, computed in F32 on the unrounded activations.
"""

from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
_Q8_0_WEIGHTS = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}
_Q8_K_WEIGHTS = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}


class GGUFModel:
    def __init__(self, path, adapter=None):
        reader = gguf.GGUFReader(path)
        self.arch = _field(reader, "general.architecture")
        get = lambda key: _field(reader, f"{self.arch}.{key}")  # noqa: E731
        self.num_layers = int(get("block_count"))
        self.num_heads = int(get("attention.head_count"))
        self.num_kv_heads = int(get("attention.head_count_kv"))
        self.head_dim = int(get("attention.key_length") or get("embedding_length") // self.num_heads)
        self.eps = float(get("attention.layer_norm_rms_epsilon"))
        self.theta = float(get("rope.freq_base"))
        self.window = int(get("attention.sliding_window")) if self.arch == "granite_swa" else None
        pattern = get("attention.sliding_window_pattern") if self.arch == "granite_swa" else None
        self.window_layers = [bool(w) for w in pattern] if pattern is not None else [False] * self.num_layers
        self.weights, self.types = {}, {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
            self.weights[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64)
            self.types[t.name] = Q(t.tensor_type)
        self.lora = _read_adapter(adapter) if adapter else {}

    def logits(self, ids: list[int], round_activations: bool = True) -> np.ndarray:
        """[T, V] logits of one sequence."""
        W = self.weights
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim

        def linear(x, name):
            y = (round_activations_for(self.types[name], x) if round_activations else x) @ W[name].T
            if name in self.lora:
                scale, a_RI, b_OR = self.lora[name]
                y = y + scale * (x @ a_RI.T) @ b_OR.T
            return y

        def rms(x, name):
            return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * W[name]

        T = len(ids)
        pos = np.arange(T)
        h = W["token_embd.weight"][ids]
        for layer in range(self.num_layers):
            p = f"blk.{layer}."
            a = rms(h, p + "attn_norm.weight")
            q = _rope(linear(a, p + "attn_q.weight").reshape(T, N, H), pos, self.theta)
            k = _rope(linear(a, p + "attn_k.weight").reshape(T, K, H), pos, self.theta)
            v = linear(a, p + "attn_v.weight").reshape(T, K, H)
            k, v = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)
            scores = np.einsum("inh,jnh->nij", q, k) / np.sqrt(H)
            allowed = pos[:, None] >= pos[None, :]
            if self.window_layers[layer]:
                allowed &= pos[:, None] - pos[None, :] < self.window
            scores = np.where(allowed, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            attn = np.einsum("nij,jnh->inh", probs, v).reshape(T, N * H)
            h = h + linear(attn, p + "attn_output.weight")
            m = rms(h, p + "ffn_norm.weight")
            gate = linear(m, p + "ffn_gate.weight")
            h = h + linear(gate / (1 + np.exp(-gate)) * linear(m, p + "ffn_up.weight"), p + "ffn_down.weight")
        out = "output.weight" if "output.weight" in W else "token_embd.weight"
        return linear(rms(h, "output_norm.weight"), out)


def _read_adapter(path) -> dict:
    """{base tensor name: (alpha / rank, A [rank, in], B [out, rank])} of a LoRA adapter GGUF."""
    reader = gguf.GGUFReader(path)
    alpha = float(_field(reader, "adapter.lora.alpha"))
    tensors = {t.name: t.data.reshape(tuple(int(d) for d in reversed(t.shape))).astype(np.float64)
               for t in reader.tensors}
    out = {}
    for name, a_RI in tensors.items():
        if name.endswith(".lora_a"):
            base = name[: -len(".lora_a")]
            out[base] = (alpha / a_RI.shape[0], a_RI, tensors[base + ".lora_b"])
    return out


def round_activations_for(weight_type: Q, x: np.ndarray) -> np.ndarray:
    """x as llama.cpp's CPU backend rounds it before a matmul with weights of `weight_type`."""
    if weight_type in _Q8_0_WEIGHTS:
        return _q8_0(x)
    if weight_type in _Q8_K_WEIGHTS:
        return _q8_k(x)
    if weight_type == Q.F16:
        return x.astype(np.float16).astype(np.float64)
    if weight_type == Q.BF16:
        return gguf.quants.dequantize(gguf.quants.quantize(x.astype(np.float32), Q.BF16), Q.BF16)
    return x


def _q8_0(x):
    """ggml's quantize_row_q8_0 (x86 SIMD form), in float32: blocks of 32, q = rint(x * 127 / amax),
    scale amax / 127 stored as f16."""
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(blocks * inv)
    d = (amax / np.float32(127)).astype(np.float16)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


def _q8_k(x):
    """ggml's quantize_row_q8_K: blocks of 256, scale from the signed extreme, f32 scale."""
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, 256)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    iscale = np.divide(np.float32(-127), extreme, out=np.zeros_like(extreme), where=extreme != 0)
    q = np.minimum(127, np.rint(iscale * blocks))
    d = np.divide(np.float32(1), iscale, out=np.zeros_like(iscale), where=iscale != 0)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


def _rope(x_TNH, pos, theta):
    H = x_TNH.shape[-1]
    angle = pos[:, None] * theta ** (-np.arange(0, H, 2) / H)  # [T, H/2]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    even, odd = x_TNH[..., 0::2], x_TNH[..., 1::2]
    out = np.empty_like(x_TNH)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value
