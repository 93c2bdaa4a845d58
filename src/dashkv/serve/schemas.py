"""OpenAI request bodies (the fields clients send) and the `dashkv` extension field.

Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send `user`, `logprobs:
false` and the like keep working; fields whose meaning we cannot honour (n > 1) are refused.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import DashKVConfig, parse_budget
from .engine import Mode, Sampling
from .errors import APIError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    dashkv: str | int | float | dict[str, Any] | None = None  # checked by parse_dashkv_field

    def sampling(self) -> Sampling:
        return Sampling(temperature=float(self.temperature), top_p=float(self.top_p),
                        seed=None if self.temperature == 0 else self.seed)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "stop sequences must not be empty", param="stop")
        return tuple(stops)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def check_n(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n={self.n} is not supported: this server returns one choice per request",
                           param="n")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for legacy completions
    echo: bool = False

    def max_new(self) -> int | None:
        return self.max_tokens


def parse_dashkv_field(value: str | int | float | dict[str, Any] | None, default: Mode, base: DashKVConfig) -> Mode:
    """`"dense"`, a budget (`"1/16"`, `512`), or `{"budget": ...}` -> the Mode this request decodes in."""
    if value is None:
        return default
    budget: Any = value
    if isinstance(value, dict):
        unknown = set(value) - {"budget"}
        if unknown or "budget" not in value:
            raise APIError(400, "the dashkv field takes {\"budget\": \"1/16\"} (or a count like 512, or "
                                f"\"dense\"); got keys {sorted(value)}", param="dashkv")
        budget = value["budget"]
    if isinstance(budget, str) and budget.strip().lower() == "dense":
        return Mode(None)
    try:
        parsed = parse_budget(budget)
        replace(base, budget=parsed)  # DashKVConfig's range checks, in one place
    except (ValueError, TypeError) as exc:
        raise APIError(400, f"bad dashkv budget {budget!r}: {exc}; use a fraction like \"1/16\", a token count "
                            "like 512, or \"dense\"", param="dashkv", code="invalid_dashkv") from None
    return Mode(parsed)
