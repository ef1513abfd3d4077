"""The OpenAI-compatible request bodies (what the official `openai` client sends), strictly typed, and the
response/chunk builders. Wrong types are a 400 naming the field; OpenAI fields that would change the answer and
that t2ray does not implement (tools, response_format, logprobs, …) are a 400 naming the field, not silently
ignored; other unknown fields are ignored."""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from t2ray.serve.errors import RequestError, bad_request


class Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class T2RayOptions(BaseModel):
    """The optional `t2ray` object of a request: a pass-1 strategy or explicit weights."""

    model_config = ConfigDict(extra="forbid", strict=True)

    strategy: Literal["prompt", "classifier", "nearest", "token", "expert", "mixture", "base"] | None = None
    expert: str | None = None
    mixture: str | None = None
    weights: dict[str, float] | list[float] | None = Field(
        None, description="expert name -> α, or one α per expert in /v1/models order"
    )

    @field_validator("weights")
    @classmethod
    def _finite_non_negative(cls, w):
        if w is None:
            return w
        values = list(w.values()) if isinstance(w, dict) else list(w)
        if not values:
            raise ValueError("weights must not be empty")
        if any(not math.isfinite(v) for v in values):
            raise ValueError("weights must be finite numbers (no NaN/inf)")
        if any(v < 0 for v in values):
            raise ValueError("weights must be >= 0")
        if not any(v > 0 for v in values):
            raise ValueError("weights are all zero; give at least one expert a positive weight")
        return w


class ContentPart(Loose):
    type: Literal["text"]
    text: str


class ChatMessage(Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Loose):
    include_usage: bool = False


# Fields of OpenAI's API that change what comes back; accepted only at their no-op value.
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class CommonRequest(Loose):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM's extension: always generate max_tokens (benchmarks)")
    t2ray: T2RayOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stop

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n is not None and n != 1:
            raise ValueError("only n = 1 is supported")
        return n

    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else ((self.stop,) if isinstance(self.stop, str) else tuple(self.stop))


class ChatRequest(CommonRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, messages):
        if not messages:
            raise ValueError("messages must contain at least one message")
        return messages

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def plain_messages(self) -> list[dict[str, str]]:
        role = {"developer": "system"}
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]

    def question(self) -> str:
        """What pass 1 classifies: the last user message."""
        users = [m.text() for m in self.messages if m.role == "user"]
        return users[-1] if users else self.messages[-1].text()


class CompletionRequest(CommonRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        return prompt

    def token_budget(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate (valid JSON, not text a tokenizer takes)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        return next((p for k, v in value.items() if (p := _lone_surrogate(v, f"{path}.{k}".lstrip(".")))), None)
    elif isinstance(value, list):
        return next((p for i, v in enumerate(value) if (p := _lone_surrogate(v, f"{path}.{i}"))), None)
    return None


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """JSON bytes -> a validated request; a RequestError (400) that names the first bad field otherwise."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(
            f"We could not parse the JSON body of your request ({err}). The body must be a JSON object."
        ) from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    for field, no_op in UNSUPPORTED_FIELDS.items():
        if field in data and data[field] not in no_op:
            raise bad_request(
                f"{field} is not supported by t2ray (it would change the answer); leave it out",
                param=field,
                code="unsupported_parameter",
            )
    bad_text = _lone_surrogate(data)
    if bad_text:
        raise bad_request(f"{bad_text}: text with a lone UTF-16 surrogate (not valid Unicode)", param=bad_text)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-after", "list[", "dict[")))
        what = "missing required field" if first["type"] == "missing" else first["msg"].removeprefix("Value error, ")
        more = f" (and {err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
        raise bad_request(f"{loc or 'body'}: {what}{more}", param=loc or None) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(finals: list[dict]) -> dict:
    """OpenAI's usage of the generations that ended with `finals` (cached: prompt tokens from the prefix cache)."""
    prompt, completion = sum(f["prompt_tokens"] for f in finals), sum(f["completion_tokens"] for f in finals)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(f["cached_tokens"] for f in finals)},
    }


def envelope(rid: str, kind: str, model: str, choices: list[dict], **rest) -> dict:
    """What every response and stream chunk holds: id, object (`kind`), created, model and choices, then `rest`."""
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **rest}


def chat_response(rid: str, model: str, text: str, final: dict, t2ray: dict) -> dict:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": final["finish_reason"],
        "logprobs": None,
    }
    return envelope(
        rid,
        "chat.completion",
        model,
        [choice],
        usage=usage([final]),
        t2ray=t2ray,
    )


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    return envelope(rid, "chat.completion.chunk", model, [choice], **extra)


def completion_response(rid: str, model: str, choices: list[tuple[str, dict, dict]]) -> dict:
    return envelope(
        rid,
        "text_completion",
        model,
        [
            {"index": i, "text": text, "finish_reason": final["finish_reason"], "logprobs": None, "t2ray": info}
            for i, (text, final, info) in enumerate(choices)
        ],
        usage=usage([final for _, final, _ in choices]),
        t2ray=choices[0][2],
    )


def completion_chunk(rid: str, model: str, text: str, finish_reason: str | None = None, **extra) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return envelope(rid, "text_completion", model, [choice], **extra)


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


__all__ = ["ChatRequest", "CompletionRequest", "RequestError", "T2RayOptions", "parse_body"]
