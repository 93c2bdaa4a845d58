"""Asymmetric hash encoders: a key encoder per (layer, KV head), a query encoder per (layer, query head).

Keys are encoded once, when they enter the cache, and the b-bit sign codes are reused at every later
step; queries are encoded once per step and never stored, so they keep a real-valued projection
(DESIGN §1-2). Both maps are small head-wise MLPs (depth 1 = linear). `HashEncoders` holds the set for a
whole model and round-trips through safetensors with metadata that pins it to the model it fits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from . import __version__
from .codes import check_bits, pack_bits
from .errors import DashKVError
from .fsutil import swap_into_place

FORMAT = "dashkv-encoders"
FORMAT_VERSION = 1
WEIGHTS_NAME = "encoders.safetensors"
CONFIG_NAME = "encoders.json"
DEFAULT_ENCODERS_DIR = Path(__file__).parent / "data" / "encoders"
SHAPE_FIELDS = ("model_type", "num_layers", "num_q_heads", "num_kv_heads", "head_dim")


class EncoderFileError(DashKVError, ValueError):
    """An encoder directory is missing, truncated, corrupt or not a dashkv encoder file."""


class EncoderMismatchError(DashKVError, ValueError):
    """Encoders were calibrated for a model of another shape."""


class EncoderFingerprintError(EncoderMismatchError):
    """Encoders were calibrated on another model's attention weights (same shape, other weights)."""


FINGERPRINT_METHOD = "qk-signs-v1"
_FINGERPRINT_SAMPLES = 4096
_log = logging.getLogger(__name__)


def attention_fingerprint(model: Any, layers: Iterable[int]) -> str:
    """A digest of the attention weights encoders are calibrated on: sha256 over the signs of a fixed
    strided sample (4096 elements) of q_proj and k_proj weights of each layer in `layers`, with shapes.

    Why signs of a sample: cheap (a few thousand elements per layer, whatever the model size); the same
    for a model loaded in fp32, bf16 or fp16 (casts never flip a sign; the sample is cast to fp16 first so
    underflow is the same too); and a fine-tune or another checkpoint of the same shape flips the signs
    of its smallest weights, so it does not match.
    """
    import numpy as np

    wanted = sorted(int(i) for i in layers)
    found: dict[int, Any] = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if idx in wanted and hasattr(m, "q_proj") and hasattr(m, "k_proj") and idx not in found:
            found[idx] = m
    h = hashlib.sha256(FINGERPRINT_METHOD.encode())
    for i in wanted:
        m = found.get(i)
        if m is None:
            h.update(f"{i}:missing;".encode())
            continue
        for name in ("q_proj", "k_proj"):
            w = getattr(m, name).weight.detach()
            flat = w.reshape(-1)
            sample = flat[:: max(1, flat.numel() // _FINGERPRINT_SAMPLES)][:_FINGERPRINT_SAMPLES]
            signs = (sample.to(torch.float16) > 0).cpu().numpy()
            h.update(f"{i}:{name}:{tuple(w.shape)};".encode())
            h.update(np.packbits(signs).tobytes())
    return h.hexdigest()


class HeadwiseMLP(nn.Module):
    """One small MLP per head, evaluated for all heads at once: (B, H, N, d_in) -> (B, H, N, d_out)."""

    def __init__(self, heads: int, d_in: int, d_out: int, hidden: int = 0, depth: int = 1, bias: bool = True):
        super().__init__()
        if depth not in (1, 2):
            raise ValueError(f"encoder depth must be 1 (linear) or 2 (one hidden layer), got {depth}")
        if depth == 2 and hidden < 1:
            raise ValueError("a depth-2 encoder needs hidden >= 1")
        self.heads, self.d_in, self.d_out, self.hidden, self.depth = heads, d_in, d_out, hidden, depth
        dims = [d_in, d_out] if depth == 1 else [d_in, hidden, d_out]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            w = torch.empty(heads, a, b)
            nn.init.normal_(w, std=1.0 / math.sqrt(a))
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(heads, b), requires_grad=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, heads, n, _ = x.shape
        # (H, B*N, d) batched matmul: one baddbmm per layer of the MLP (2x faster than einsum for the
        # one-token decode step, where this runs once per layer and token)
        h = x.transpose(0, 1).reshape(heads, bsz * n, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b.to(h.dtype)[:, None, :], h, w.to(h.dtype))
            if i < len(self.weights) - 1:
                h = torch.nn.functional.gelu(h)
        return h.reshape(heads, bsz, n, -1).transpose(0, 1)


class LayerEncoders(nn.Module):
    """The encoders of one attention layer, plus a per-query-head temperature.

    `log_scale` maps the relaxed similarity <tanh f_q(q), c_k> to attention logits; calibration
    learns it with the KL objective, and the adaptive critical set uses it to estimate attention mass.
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, bits: int, hidden: int, depth: int,
                 bias: bool = True):
        super().__init__()
        self.query = HeadwiseMLP(num_q_heads, head_dim, bits, hidden, depth, bias)
        self.key = HeadwiseMLP(num_kv_heads, head_dim, bits, hidden, depth, bias)
        self.log_scale = nn.Parameter(torch.zeros(num_q_heads))


class HashEncoders(nn.Module):
    """All layers' encoders for one model, with the metadata that says which model they fit."""

    def __init__(self, shape: Mapping[str, Any], bits: int, layers: Iterable[int], *, hidden: int = 0,
                 depth: int = 1, kind: str = "learned", bias: bool = True, meta: Mapping[str, Any] | None = None):
        super().__init__()
        check_bits(bits)
        missing = [f for f in SHAPE_FIELDS if f not in shape]
        if missing:
            raise ValueError(f"model shape lacks {missing}")
        self.shape = {f: shape[f] for f in SHAPE_FIELDS}
        self.bits, self.hidden, self.depth, self.kind, self.bias = bits, hidden, depth, kind, bias
        self.layer_ids = tuple(sorted(int(i) for i in layers))
        bad = [i for i in self.layer_ids if not 0 <= i < self.shape["num_layers"]]
        if bad:
            raise ValueError(f"layers {bad} outside the model's {self.shape['num_layers']} layers")
        self.meta: dict[str, Any] = dict(meta or {})
        s = self.shape
        self.layers = nn.ModuleDict({
            str(i): LayerEncoders(s["num_q_heads"], s["num_kv_heads"], s["head_dim"], bits, hidden, depth, bias)
            for i in self.layer_ids
        })
        self.requires_grad_(False)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def simhash(cls, shape: Mapping[str, Any], bits: int, layers: Iterable[int], seed: int = 0) -> "HashEncoders":
        """SimHash baseline: random Gaussian hyperplanes shared by a KV head's keys and its queries."""
        enc = cls(shape, bits, layers, depth=1, kind="simhash", bias=False)
        g = torch.Generator().manual_seed(seed)
        group = shape["num_q_heads"] // shape["num_kv_heads"]
        for layer in enc.layers.values():
            w = torch.randn(shape["num_kv_heads"], shape["head_dim"], bits, generator=g)
            layer.key.weights[0].data.copy_(w)
            layer.query.weights[0].data.copy_(w.repeat_interleave(group, dim=0))
        return enc

    @classmethod
    def for_default_model(cls, bits: int = 64) -> "HashEncoders":
        """The encoders shipped with dashkv for the default model (SmolLM2-135M-Instruct)."""
        d = DEFAULT_ENCODERS_DIR / f"smollm2-135m-b{bits}"
        if not d.is_dir():
            have = sorted(p.name for p in DEFAULT_ENCODERS_DIR.glob("smollm2-135m-b*")) if DEFAULT_ENCODERS_DIR.is_dir() else []
            raise EncoderFileError(
                f"no shipped encoders for the default model at {bits} bits (shipped: {', '.join(have) or 'none'}); "
                "calibrate them with `dashkv calibrate`")
        return cls.from_pretrained(d)

    # ---- use -------------------------------------------------------------------------------------
    def has_layer(self, layer_idx: int) -> bool:
        return str(layer_idx) in self.layers

    def project_keys(self, layer_idx: int, keys: torch.Tensor) -> torch.Tensor:
        """Real-valued key projections (B, Hkv, N, b) — calibration uses them relaxed (tanh)."""
        return self.layers[str(layer_idx)].key(keys)

    def encode_keys(self, layer_idx: int, keys: torch.Tensor) -> torch.Tensor:
        """Packed key codes (B, Hkv, N, b/64) int64: computed once per token, stored in the cache."""
        return pack_bits(self.project_keys(layer_idx, keys.float()) > 0)

    def project_queries(self, layer_idx: int, queries: torch.Tensor) -> torch.Tensor:
        """Real-valued query projections (B, Hq, Q, b): the asymmetric side, never stored."""
        return self.layers[str(layer_idx)].query(queries.float())

    def logit_scale(self, layer_idx: int) -> torch.Tensor:
        return self.layers[str(layer_idx)].log_scale.exp()

    # ---- compatibility ---------------------------------------------------------------------------
    @property
    def calibrated_length(self) -> int | None:
        """Context length (tokens) the encoders were calibrated on, if recorded."""
        value = self.meta.get("calibrated_context", self.meta.get("seq_len"))
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    @property
    def fingerprint(self) -> str | None:
        """`attention_fingerprint` of the model the encoders were calibrated on, if recorded."""
        fp = self.meta.get("attention_fingerprint")
        return fp if isinstance(fp, str) else None

    def check_compatible(self, model_or_shape: Any, bits: int | None = None, *, allow_mismatch: bool = False) -> None:
        """Raise EncoderMismatchError naming every field where these encoders and the model differ.

        Shapes must match. Given a model (not just a shape), the attention fingerprint must match too,
        unless `allow_mismatch` (EncoderFingerprintError otherwise). Encoders saved before fingerprints
        existed are accepted with one warning per process. SimHash encoders fit any model of the shape.
        """
        shape = _shape_dict(model_or_shape)
        diffs = [f"{f}: encoders {self.shape[f]!r} vs model {shape[f]!r}"
                 for f in SHAPE_FIELDS if f in shape and shape[f] != self.shape[f]]
        if bits is not None and bits != self.bits:
            diffs.append(f"bits: encoders {self.bits} vs config {bits}")
        name = self.meta.get("model_name", "another model")
        if diffs:
            raise EncoderMismatchError(
                f"these encoders were calibrated for {name} and do not fit this model ("
                + "; ".join(diffs) + "). Calibrate encoders for it with `dashkv calibrate`.")
        if self.kind == "simhash" or not isinstance(model_or_shape, nn.Module):
            return
        if self.fingerprint is None:
            from ._logging import warn_once

            warn_once(_log, ("no-fingerprint", name),
                      "dashkv: encoders for %s carry no attention fingerprint (saved by an older dashkv); "
                      "cannot check they were calibrated on this model's weights", name)
            return
        ours = attention_fingerprint(model_or_shape, self.layer_ids)
        if ours != self.fingerprint and not allow_mismatch:
            raise EncoderFingerprintError(
                f"these encoders were calibrated on the attention weights of {name}, not this model's "
                f"(attention_fingerprint: encoders {self.fingerprint[:16]}... vs model {ours[:16]}..., "
                f"{FINGERPRINT_METHOD} over q_proj/k_proj of layers {list(self.layer_ids)}): same shape, other "
                "weights (a fine-tune, the base model, another checkpoint). Calibrate encoders for it with "
                "`dashkv calibrate`, or pass allow_mismatch=True to use them anyway.")

    # ---- persistence -----------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dashkv_version": __version__,
            "model": self.shape, "bits": self.bits, "layers": list(self.layer_ids), "hidden": self.hidden,
            "depth": self.depth, "kind": self.kind, "bias": self.bias, "meta": self.meta,
        }

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = True,
                        dtype: torch.dtype | None = None) -> Path:
        """Write encoders.safetensors + encoders.json atomically (a temp dir renamed into place).

        dtype (e.g. torch.float16) stores the weights in that dtype (half the size for shipped files);
        `from_pretrained` loads them back into float32 parameters.
        """
        from safetensors.torch import save_file

        out = Path(directory)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        config = self.config_dict()
        tensors = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-encoders-", dir=out.parent))
        try:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"dashkv": json.dumps(config)})
            config["sha256"] = _sha256(tmp / WEIGHTS_NAME)
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            swap_into_place(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "HashEncoders":
        """Load and validate; every failure names the file and what is wrong with it."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        if not d.is_dir():
            raise EncoderFileError(f"encoder directory {d} does not exist")
        cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise EncoderFileError(f"{p} is missing: {d} is not a dashkv encoder directory")
        try:
            config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EncoderFileError(f"{cfg_path} is not valid JSON ({e})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise EncoderFileError(f"{cfg_path} is not a dashkv encoder file (format != {FORMAT!r})")
        if config.get("format_version", 0) > FORMAT_VERSION:
            raise EncoderFileError(
                f"{cfg_path} has format_version {config['format_version']}; this dashkv reads <= {FORMAT_VERSION}")
        digest = config.get("sha256")
        if digest and _sha256(w_path) != digest:
            raise EncoderFileError(f"{w_path} is corrupt or truncated (checksum does not match {cfg_path})")
        try:
            tensors = load_file(str(w_path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise EncoderFileError(f"{w_path} is corrupt or truncated ({e})") from None
        try:
            enc = cls(config["model"], int(config["bits"]), config["layers"], hidden=int(config["hidden"]),
                      depth=int(config["depth"]), kind=config.get("kind", "learned"),
                      bias=bool(config.get("bias", True)), meta=config.get("meta", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise EncoderFileError(f"{cfg_path} has invalid fields ({e})") from None
        expected = enc.state_dict()
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise EncoderFileError(f"{w_path} does not match {cfg_path}: missing {missing[:4]}, unexpected {extra[:4]}")
        for k, v in tensors.items():
            if v.shape != expected[k].shape:
                raise EncoderFileError(
                    f"{w_path}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        enc.load_state_dict(tensors)
        return enc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shape_dict(model_or_shape: Any) -> dict[str, Any]:
    if isinstance(model_or_shape, Mapping):
        return dict(model_or_shape)
    if hasattr(model_or_shape, "to_dict") and all(hasattr(model_or_shape, f) for f in SHAPE_FIELDS):
        return {f: getattr(model_or_shape, f) for f in SHAPE_FIELDS}
    from .models import model_shape  # a transformers model or config

    s = model_shape(model_or_shape)
    return {f: getattr(s, f) for f in SHAPE_FIELDS}
