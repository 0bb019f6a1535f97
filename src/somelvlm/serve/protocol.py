"""OpenAI chat-completions requests and responses, and how they map onto SoMeLVLM.

A request becomes one instruction (the text parts of its system and user messages, joined by
newlines), at most one image, and `GenerationOptions`: fields the request leaves out keep the
server's defaults (LAVIS's: 5 beams, up to 255 new tokens, repetition penalty 1.5). OpenAI's
`temperature > 0` or `top_p` switch to nucleus sampling with one beam; `temperature: 0` is greedy.
somelvlm extensions: `num_beams`, `top_k`, `repetition_penalty`, `length_penalty`, `min_tokens`.
Unknown fields are errors (400), never silently ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..generation import check_lengths
from ..options import GenerationOptions
from .errors import RequestError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Union[TextPart, ImagePart]]]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """`POST /v1/chat/completions` body (OpenAI's fields this server implements, plus extensions)."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    # somelvlm extensions (LAVIS decoding options)
    num_beams: int | None = Field(default=None, ge=1, le=16)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    length_penalty: float | None = None
    min_tokens: int | None = Field(default=None, ge=0)


@dataclass(frozen=True)
class Instruction:
    """What the model is asked: the prompt text and the image's `image_url` (None: plain text)."""

    prompt: str
    image_url: str | None


def instruction(request: ChatCompletionRequest) -> Instruction:
    """The single-turn instruction of `messages` (InstructBLIP answers one instruction about one image)."""
    texts: list[str] = []
    images: list[str] = []
    for i, message in enumerate(request.messages):
        if message.role == "assistant":
            raise RequestError("assistant messages are not supported: SoMeLVLM answers single-turn "
                               "instructions", param=f"messages[{i}]", code="unsupported_message")
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        for part in parts:
            if isinstance(part, TextPart):
                texts.append(part.text)
            else:
                images.append(part.image_url.url)
    if len(images) > 1:
        raise RequestError(f"{len(images)} images in one request: SoMeLVLM takes at most one image",
                           param="messages", code="too_many_images")
    prompt = "\n".join(t for t in texts if t)
    if not prompt.strip():
        raise RequestError("the messages contain no text", param="messages", code="empty_prompt")
    return Instruction(prompt, images[0] if images else None)


def generation_options(request: ChatCompletionRequest, defaults: GenerationOptions) -> GenerationOptions:
    """`defaults` with the request's fields applied (see the module doc); validation errors are 400s."""
    changes: dict[str, Any] = {"num_return_sequences": request.n}
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None:
        changes["max_new_tokens"] = max_tokens
    if request.min_tokens is not None:
        changes["min_new_tokens"] = request.min_tokens
    if request.temperature == 0:
        changes.update(do_sample=False, num_beams=1)
    elif request.temperature is not None or request.top_p is not None:
        changes.update(do_sample=True, num_beams=1)
        if request.temperature is not None:
            changes["temperature"] = request.temperature
    for name in ("top_p", "top_k", "seed", "num_beams", "repetition_penalty", "length_penalty"):
        value = getattr(request, name)
        if value is not None:
            changes[name] = value
    try:
        return defaults.replace(**changes)
    except ValueError as e:
        raise RequestError(str(e), code="invalid_option") from None


def check_fits(model: Any, options: GenerationOptions, prompt: str, has_image: bool) -> None:
    """400 when an option is nonsense or the prompt plus the answer cannot fit the LLM's positions
    (`generation.check_lengths`, the rule `generate` applies)."""
    try:
        check_lengths(model, options.validate(), [prompt], [has_image])
    except ValueError as e:
        too_long = "too long" in str(e) or "exceeds" in str(e)
        raise RequestError(str(e), param="messages" if too_long else None,
                           code="context_length_exceeded" if too_long else "invalid_option") from None


# ------------------------------------------------------------------------------------------------
# Responses
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """One generated choice: its text, its length in tokens and why it stopped ("stop" / "length")."""

    text: str
    tokens: int
    finish_reason: str


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, answers: list[Answer]) -> dict[str, int]:
    completion = sum(a.tokens for a in answers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def completion(cid: str, model: str, prompt_tokens: int, answers: list[Answer]) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": a.text}, "logprobs": None,
                     "finish_reason": a.finish_reason} for i, a in enumerate(answers)],
        "usage": usage(prompt_tokens, answers),
    }


def chunk(cid: str, model: str, index: int, delta: dict[str, Any], finish_reason: str | None = None,
          created: int | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created or int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(cid: str, model: str, prompt_tokens: int, answers: list[Answer]) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [], "usage": usage(prompt_tokens, answers)}
