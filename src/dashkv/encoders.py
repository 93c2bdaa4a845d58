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
from .codes import check_bits, key_code_bits, pack_bits
from .errors import DashKVError
from .fsutil import swap_into_place

FORMAT = "dashkv-encoders"
FORMAT_VERSION = 3  # the newest this version reads; 2 = multi-bit key levels, 3 = PQ codes (sign codes stay 1)
KINDS = ("learned", "simhash", "pq")  # pq: product-quantised key codes (`dashkv.pq`)
MAX_KEY_LEVELS = 8
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
    """One small MLP per head, evaluated for all heads at once: (B, H, N, d_in) -> (B, H, N, d_out).

    depth 1 is linear; depth D > 1 has D - 1 hidden GELU layers of width `hidden` (the paper's query
    encoder is depth 3: d -> 256 -> 256 -> b)."""

    MAX_DEPTH = 4

    def __init__(self, heads: int, d_in: int, d_out: int, hidden: int = 0, depth: int = 1, bias: bool = True):
        super().__init__()
        if not isinstance(depth, int) or not 1 <= depth <= self.MAX_DEPTH:
            raise ValueError(f"encoder depth must be 1 (linear) .. {self.MAX_DEPTH}, got {depth}")
        if depth > 1 and hidden < 1:
            raise ValueError(f"a depth-{depth} encoder needs hidden >= 1")
        self.heads, self.d_in, self.d_out, self.hidden, self.depth = heads, d_in, d_out, hidden, depth
        dims = [d_in] + [hidden] * (depth - 1) + [d_out]
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
                 bias: bool = True, query_hidden: int | None = None, query_depth: int | None = None,
                 key_bits: int | None = None):
        super().__init__()
        qd = depth if query_depth is None else query_depth
        qh = hidden if query_hidden is None else query_hidden
        self.query = HeadwiseMLP(num_q_heads, head_dim, bits, qh, qd, bias)
        self.key = HeadwiseMLP(num_kv_heads, head_dim, bits if key_bits is None else key_bits, hidden, depth, bias)
        self.log_scale = nn.Parameter(torch.zeros(num_q_heads))


class HashEncoders(nn.Module):
    """All layers' encoders for one model, with the metadata that says which model they fit.

    `depth`/`hidden` shape the key encoders (and the query encoders unless `query_depth`/`query_hidden`
    say otherwise): keys are encoded at every cached token, so they stay linear by default, while a
    query MLP costs once per step and the fused kernels read only its real-valued output."""

    def __init__(self, shape: Mapping[str, Any], bits: int, layers: Iterable[int], *, hidden: int = 0,
                 depth: int = 1, kind: str = "learned", bias: bool = True, meta: Mapping[str, Any] | None = None,
                 query_depth: int | None = None, query_hidden: int | None = None, key_levels: int = 1):
        super().__init__()
        check_bits(bits)
        if not isinstance(key_levels, int) or not 1 <= key_levels <= MAX_KEY_LEVELS or bits % key_levels:
            raise ValueError(f"key_levels must be an integer in 1..{MAX_KEY_LEVELS} dividing bits ({bits}), "
                             f"got {key_levels!r}")
        if key_levels > 1 and kind in ("simhash", "pq"):
            raise ValueError(f"{kind} encoders take no key levels: key_levels must be 1")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.key_levels = key_levels
        missing = [f for f in SHAPE_FIELDS if f not in shape]
        if missing:
            raise ValueError(f"model shape lacks {missing}")
        self.shape = {f: shape[f] for f in SHAPE_FIELDS}
        self.bits, self.hidden, self.depth, self.kind, self.bias = bits, hidden, depth, kind, bias
        self.query_depth = depth if query_depth is None else int(query_depth)
        self.query_hidden = hidden if query_hidden is None else int(query_hidden)
        self.layer_ids = tuple(sorted(int(i) for i in layers))
        bad = [i for i in self.layer_ids if not 0 <= i < self.shape["num_layers"]]
        if bad:
            raise ValueError(f"layers {bad} outside the model's {self.shape['num_layers']} layers")
        self.meta: dict[str, Any] = dict(meta or {})
        s = self.shape
        if kind == "pq":  # product-quantised key codes: maps and centroids, no MLPs
            from .pq import PQLayer

            self.hidden, self.depth, self.query_depth, self.query_hidden = 0, 1, 1, 0
            self.layers = nn.ModuleDict({str(i): PQLayer(s["num_q_heads"], s["num_kv_heads"], s["head_dim"], bits)
                                         for i in self.layer_ids})
            self.requires_grad_(False)
            return
        self.layers = nn.ModuleDict({
            str(i): LayerEncoders(s["num_q_heads"], s["num_kv_heads"], s["head_dim"], bits, hidden, depth, bias,
                                  self.query_hidden, self.query_depth, bits // key_levels)
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
        """Real-valued key projections (B, Hkv, N, b / key_levels) — calibration uses them relaxed."""
        self._no_projection("project_keys")
        return self.layers[str(layer_idx)].key(keys)

    def encode_keys(self, layer_idx: int, keys: torch.Tensor) -> torch.Tensor:
        """Packed key codes (B, Hkv, N, b/64) int64: computed once per token, stored in the cache."""
        if self.kind == "pq":
            from .pq import encode_keys

            return encode_keys(self.layers[str(layer_idx)], keys)
        fast = self._fast_linear(layer_idx, "key", keys)
        if fast is not None:
            from .kernels.cpu import encode_linear_cpu

            return encode_linear_cpu(keys, *fast, levels=self.key_levels)
        return pack_bits(key_code_bits(self.project_keys(layer_idx, keys.float()), self.key_levels))

    def project_queries(self, layer_idx: int, queries: torch.Tensor) -> torch.Tensor:
        """Real-valued query projections (B, Hq, Q, b): the asymmetric side, never stored."""
        self._no_projection("project_queries")
        fast = self._fast_linear(layer_idx, "query", queries)
        if fast is not None:
            from .kernels.cpu import linear_heads_cpu

            return linear_heads_cpu(queries, *fast)
        return self.layers[str(layer_idx)].query(queries.float())

    def _no_projection(self, what: str) -> None:
        if self.kind == "pq":
            raise ValueError(f"{what}: PQ key codes have no real-valued projection; their scores come from the "
                             "query's tables (`dashkv.pq.query_tables`), read by the probability group score")

    def query_tables(self, layer_idx: int, queries: torch.Tensor) -> torch.Tensor:
        """PQ codes: (B, Hq, d) queries -> (B, Hq, b/8 * 256) float32 score tables (`dashkv.pq`)."""
        if self.kind != "pq":
            raise ValueError(f"query_tables is for PQ codes (kind='pq'); these encoders are {self.kind!r}")
        from .pq import query_tables

        return query_tables(self.layers[str(layer_idx)], queries, self.shape["num_kv_heads"])

    def pq_arrays(self, layer_idx: int):
        """PQ codes: float32 numpy (query maps transposed (Hkv, d_in, d_out), centroids (Hkv, P, s, 256)) for the fused CPU
        kernel, which builds the tables itself; cached per layer (re-read if a tensor changed in place)."""
        layer = self.layers[str(layer_idx)]
        cache = self.__dict__.setdefault("_pq_arrays", {})
        hit = cache.get(layer_idx)
        if hit is not None and hit[0] is layer.query_map and hit[1] == layer.query_map._version \
                and hit[2] is layer.books and hit[3] == layer.books._version:
            return hit[4]
        arrays = (layer.query_map.detach().float().transpose(1, 2).contiguous().numpy(),
                  layer.books.detach().float().transpose(2, 3).contiguous().numpy())
        cache[layer_idx] = (layer.query_map, layer.query_map._version, layer.books, layer.books._version, arrays)
        return arrays

    def pq_key_arrays(self, layer_idx: int):
        """PQ codes: float32 numpy (key maps (Hkv, d, d), centroids (Hkv, P, 256, s), their squared norms
        (Hkv, P, 256)) for the compiled encoder of a decode step's keys; cached like `pq_arrays`."""
        layer = self.layers[str(layer_idx)]
        cache = self.__dict__.setdefault("_pq_key_arrays", {})
        hit = cache.get(layer_idx)
        if hit is not None and hit[0] is layer.key_map and hit[1] == layer.key_map._version \
                and hit[2] is layer.books and hit[3] == layer.books._version:
            return hit[4]
        books = layer.books.detach().float().contiguous()
        arrays = (layer.key_map.detach().float().contiguous().numpy(), books.numpy(),
                  (books * books).sum(-1).contiguous().numpy())
        cache[layer_idx] = (layer.key_map, layer.key_map._version, layer.books, layer.books._version, arrays)
        return arrays

    _FAST_MAX_TOKENS = 8  # decode steps: a compiled loop beats a batched matmul's dispatch below this

    def _fast_linear(self, layer_idx: int, side: str, x: torch.Tensor):
        """float32 (weight, bias) numpy arrays of a linear encoder for the compiled CPU path of a decode
        step's few tokens, or None (MLP encoders, long inputs, other devices: torch serves those).
        Cached per layer and side; a parameter changed in place (its version counter moved) is re-read."""
        depth = self.query_depth if side == "query" else self.depth
        if depth != 1 or self.kind == "pq" or x.device.type != "cpu" or x.shape[-2] > self._FAST_MAX_TOKENS or x.dim() != 4:
            return None
        cache = self.__dict__.setdefault("_fast_weights", {})
        hit = cache.get((layer_idx, side))
        if hit is not None and hit[0]._version == hit[1] and hit[2]._version == hit[3]:
            return hit[4]
        try:
            import dashkv.kernels.cpu  # noqa: F401  (numba present?)
        except ImportError:
            return None
        mlp = getattr(self.layers[str(layer_idx)], side)
        w, b = mlp.weights[0], mlp.biases[0]
        arrays = (w.detach().float().contiguous().numpy(), b.detach().float().contiguous().numpy())
        cache[(layer_idx, side)] = (w, w._version, b, b._version, arrays)
        return arrays

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
            "format": FORMAT, "format_version": 3 if self.kind == "pq" else 1 if self.key_levels == 1 else 2, "dashkv_version": __version__,
            "model": self.shape, "bits": self.bits, "layers": list(self.layer_ids), "hidden": self.hidden,
            "depth": self.depth, "query_hidden": self.query_hidden, "query_depth": self.query_depth,
            "kind": self.kind, "bias": self.bias, "meta": self.meta,
        } | ({"key_levels": self.key_levels} if self.key_levels > 1 else {})  # sign-code files stay as before

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

    @staticmethod
    def stored_bits(directory: str | os.PathLike) -> int | None:
        """The code length an encoder directory declares (its encoders.json), or None where that cannot be
        read: what a command's --bits defaults to with --encoders (`from_pretrained` validates the rest)."""
        try:
            bits = json.loads((Path(directory) / CONFIG_NAME).read_text()).get("bits")
        except (OSError, ValueError, AttributeError):
            return None
        return bits if isinstance(bits, int) and not isinstance(bits, bool) else None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "HashEncoders":
        """Load and validate; every failure is an EncoderFileError naming the file and what is wrong.

        The weights' sha256 (in encoders.json, written by every `save_pretrained`) is required: it is the
        only thing that can tell flipped bits in tensor data from real weights. The configuration in
        encoders.json must equal the copy embedded in the (checksummed) weights file, so an edited or
        corrupted encoders.json is caught too. Fields are type- and range-checked, and the parameter count
        they imply must match the file before anything is allocated.
        """
        from safetensors import SafetensorError, safe_open

        d = Path(directory)
        if not d.is_dir():
            raise EncoderFileError(f"encoder directory {d} does not exist")
        cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise EncoderFileError(f"{p} is missing: {d} is not a dashkv encoder directory")
        try:
            config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise EncoderFileError(f"{cfg_path} is not valid JSON ({e})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise EncoderFileError(f"{cfg_path} is not a dashkv encoder file (format != {FORMAT!r})")
        version = config.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
            raise EncoderFileError(f"{cfg_path} has format_version {version!r}; this dashkv reads <= {FORMAT_VERSION}")
        digest = config.get("sha256")
        if not isinstance(digest, str):
            raise EncoderFileError(f"{cfg_path} has no weights checksum (sha256), so {w_path} cannot be verified; "
                                   "re-save the encoders with HashEncoders.save_pretrained")
        if _sha256(w_path) != digest:
            raise EncoderFileError(f"{w_path} is corrupt or truncated (checksum does not match {cfg_path})")
        try:
            with safe_open(str(w_path), framework="pt") as f:
                embedded = (f.metadata() or {}).get("dashkv")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as e:
            raise EncoderFileError(f"{w_path} is corrupt or truncated ({e})") from None
        try:
            embedded = json.loads(embedded) if isinstance(embedded, str) else None
        except (json.JSONDecodeError, RecursionError):
            embedded = None
        ours = {k: v for k, v in config.items() if k != "sha256"}
        if embedded != ours:
            diff = sorted(set(ours) ^ set(embedded)) if isinstance(embedded, dict) else ["(no dashkv metadata)"]
            if isinstance(embedded, dict):
                diff += sorted(k for k in set(ours) & set(embedded) if ours[k] != embedded[k])
            raise EncoderFileError(f"{cfg_path} does not match the configuration embedded in {w_path} "
                                   f"(fields {diff[:6]}): one of them was edited or is corrupt")
        fields = _checked_fields(config, cfg_path)
        expected = _expected_shapes(**fields)
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise EncoderFileError(f"{w_path} does not match {cfg_path}: missing {missing[:4]}, unexpected {extra[:4]}")
        for k, v in tensors.items():
            if tuple(v.shape) != expected[k]:
                raise EncoderFileError(f"{w_path}: tensor {k} has shape {tuple(v.shape)}, expected {expected[k]}")
            if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
                raise EncoderFileError(f"{w_path}: tensor {k} is not finite floating point ({v.dtype})")
        try:
            enc = cls(fields["shape"], fields["bits"], fields["layers"], hidden=fields["hidden"],
                      depth=fields["depth"], kind=fields["kind"], bias=fields["bias"], meta=config.get("meta", {}),
                      query_depth=fields["query_depth"], query_hidden=fields["query_hidden"],
                      key_levels=fields["key_levels"])
            enc.load_state_dict({k: v.float() for k, v in tensors.items()})
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise EncoderFileError(f"{cfg_path} has invalid fields ({e})") from None
        enc.weights_sha256 = digest  # which weights these are (evaluation rows record it)
        return enc


_MAX_DIM = 1 << 16


def _checked_fields(config: dict, path: Path) -> dict[str, Any]:
    """The constructor arguments in `config`, type- and range-checked (EncoderFileError naming the field)."""

    def bad(name: str, why: str) -> EncoderFileError:
        return EncoderFileError(f"{path} has an invalid field {name}: {why}")

    def integer(value: Any, name: str, lo: int, hi: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise bad(name, f"{value!r} is not an integer in [{lo}, {hi}]")
        return value

    model = config.get("model")
    if not isinstance(model, dict) or any(f not in model for f in SHAPE_FIELDS):
        raise bad("model", f"must be an object with {', '.join(SHAPE_FIELDS)}")
    if not isinstance(model["model_type"], str):
        raise bad("model.model_type", "must be a string")
    shape = {"model_type": model["model_type"]}
    for f in SHAPE_FIELDS[1:]:
        shape[f] = integer(model[f], f"model.{f}", 1, _MAX_DIM)
    if shape["num_q_heads"] % shape["num_kv_heads"]:
        raise bad("model", "num_q_heads must be a multiple of num_kv_heads")
    bits = integer(config.get("bits"), "bits", 64, _MAX_DIM)
    if bits % 64:
        raise bad("bits", f"{bits} is not a multiple of 64")
    layers = config.get("layers")
    if not isinstance(layers, list) or not layers:
        raise bad("layers", "must be a non-empty list of layer indices")
    layers = [integer(i, "layers[]", 0, shape["num_layers"] - 1) for i in layers]
    if len(set(layers)) != len(layers):
        raise bad("layers", "has duplicates")
    depth = integer(config.get("depth"), "depth", 1, HeadwiseMLP.MAX_DEPTH)
    hidden = integer(config.get("hidden"), "hidden", 1 if depth > 1 else 0, _MAX_DIM)
    # files written before query encoders could differ from key encoders have neither field
    query_depth = integer(config.get("query_depth", depth), "query_depth", 1, HeadwiseMLP.MAX_DEPTH)
    query_hidden = integer(config.get("query_hidden", hidden), "query_hidden", 1 if query_depth > 1 else 0, _MAX_DIM)
    kind = config.get("kind", "learned")
    if kind not in KINDS:
        raise bad("kind", f"{kind!r} is not one of {', '.join(KINDS)}")
    if kind == "pq" and shape["head_dim"] % (bits // 8):
        raise bad("bits", f"PQ codes cut head_dim {shape['head_dim']} into bits / 8 = {bits // 8} sub-spaces")
    bias = config.get("bias", True)
    if not isinstance(bias, bool):
        raise bad("bias", f"{bias!r} is not true/false")
    if not isinstance(config.get("meta", {}), dict):
        raise bad("meta", "must be an object")
    key_levels = integer(config.get("key_levels", 1), "key_levels", 1, MAX_KEY_LEVELS)  # older files: sign codes
    if bits % key_levels:
        raise bad("key_levels", f"{key_levels} does not divide bits ({bits})")
    if key_levels > 1 and kind in ("simhash", "pq"):
        raise bad("key_levels", f"{kind} encoders take no key levels (key_levels 1)")
    return dict(shape=shape, bits=bits, layers=layers, hidden=hidden, depth=depth, kind=kind, bias=bias,
                query_depth=query_depth, query_hidden=query_hidden, key_levels=key_levels)


def _expected_shapes(shape: dict[str, Any], bits: int, layers: list[int], hidden: int, depth: int, kind: str,
                     bias: bool, query_depth: int, query_hidden: int, key_levels: int = 1) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of encoders with these fields, computed without allocating them."""
    out: dict[str, tuple[int, ...]] = {}
    d, hq, hkv = shape["head_dim"], shape["num_q_heads"], shape["num_kv_heads"]
    if kind == "pq":
        from .pq import expected_shapes

        return {f"layers.{i}.{k}": v for i in layers for k, v in expected_shapes(hq, hkv, d, bits).items()}
    sides = {"query": (hq, [d] + [query_hidden] * (query_depth - 1) + [bits]),
             "key": (hkv, [d] + [hidden] * (depth - 1) + [bits // key_levels])}
    for i in layers:
        for side, (heads, dims) in sides.items():
            for j, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
                out[f"layers.{i}.{side}.weights.{j}"] = (heads, a, b)
                out[f"layers.{i}.{side}.biases.{j}"] = (heads, b)
        out[f"layers.{i}.log_scale"] = (hq,)
    return out


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
