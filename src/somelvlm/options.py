"""Decoding options: LAVIS's defaults, their validation, and their home in a model folder.

`GenerationOptions` is the one options type of `generate`, `rank`-free decoding paths, the batch
job, `eval`, the server and every CLI command; its field defaults are LAVIS
`Blip2VicunaInstruct.generate`'s (the only copy of them). A model folder stores them in
`generation_config.json`, which `GenerationOptions.load` reads back.

LAVIS semantics (transformers 4.33): `max_length` and `min_length` count a dummy start token, so
at most `max_length - 1 = 255` new tokens are produced and `min_length=1` is a no-op; explicit
`max_new_tokens` / `min_new_tokens` win over them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class GenerationOptions:
    """How answers are decoded. Defaults: LAVIS (5 beams, max_length 256, repetition penalty 1.5)."""

    num_beams: int = 5
    max_length: int = 256
    min_length: int = 1
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    repetition_penalty: float = 1.5
    length_penalty: float = 1.0
    do_sample: bool = False
    top_p: float = 0.9
    top_k: int = 50  # transformers 4.33's default, which LAVIS sampling used
    temperature: float = 1.0
    num_return_sequences: int = 1
    seed: int | None = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "options", ignore_unknown: bool = False
                  ) -> "GenerationOptions":
        """Build from a mapping; an unknown key is an error (naming `source`) unless `ignore_unknown`."""
        known = set(cls.names())
        unknown = sorted(set(data) - known)
        if unknown and not ignore_unknown:
            raise ValueError(f"{source}: unknown generation option(s) {unknown}; known: {sorted(known)}")
        values = {k: v for k, v in data.items() if k in known}
        for f in fields(cls):
            if f.name in values:
                values[f.name] = _coerce(f.name, values[f.name], f.type, source)
        return cls(**values)

    def replace(self, **changes: Any) -> "GenerationOptions":
        """A copy with `changes` (validated like `from_dict`: unknown names are errors)."""
        return GenerationOptions.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- model folders --------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path) -> "GenerationOptions":
        """The defaults stored in `folder/generation_config.json` (LAVIS's when the file is absent),
        validated (an error names the file). Keys that are not decoding options (token ids, notes)
        are ignored."""
        path = Path(folder) / GENERATION_CONFIG
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        options = cls.from_dict(data, source=str(path), ignore_unknown=True)
        try:
            return options.validate()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_generation_config(self, eos_id: int, pad_id: int, bos_id: int) -> dict[str, Any]:
        """What a model folder's `generation_config.json` holds: these options plus LAVIS's ids."""
        return {**{k: v for k, v in self.to_dict().items() if v is not None}, "bos_token_id": bos_id,
                "eos_token_id": eos_id, "pad_token_id": pad_id,
                "decoder_start_note": "LLM prompts start with id 2 ('</s>'), as in LAVIS"}

    # -- derived --------------------------------------------------------------------------------
    def new_token_limits(self) -> tuple[int, int]:
        """`(max_new_tokens, min_new_tokens)`: LAVIS's lengths count the dummy start token."""
        max_new = self.max_length - 1 if self.max_new_tokens is None else self.max_new_tokens
        min_new = max(self.min_length - 1, 0) if self.min_new_tokens is None else self.min_new_tokens
        return max_new, min_new

    @property
    def greedy(self) -> bool:
        """Sampling at temperature 0 means greedy decoding (argmax), as in most serving APIs."""
        return not self.do_sample or self.temperature == 0

    def validate(self, max_positions: int | None = None, prompt_tokens: int = 0) -> "GenerationOptions":
        """Raise one clear ValueError for a nonsensical option; returns self.

        `max_positions` (the LLM's position limit) bounds the new tokens plus `prompt_tokens`."""
        def bad(msg: str) -> None:
            raise ValueError(f"invalid generation option: {msg}")

        if self.num_beams < 1:
            bad(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_return_sequences < 1:
            bad(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            bad(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        if self.num_beams == 1 and self.num_return_sequences > 1 and self.greedy:
            bad(f"num_return_sequences={self.num_return_sequences} with greedy decoding would repeat one "
                "answer; use do_sample or num_beams")
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value):
                bad(f"{name} must be a finite number, got {value}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        max_new, min_new = self.new_token_limits()
        if max_new < 1:
            bad(f"nothing to generate: max_new_tokens={max_new} (max_length counts a dummy start token)")
        if min_new < 0:
            bad(f"min_new_tokens must be >= 0, got {min_new}")
        if min_new > max_new:
            bad(f"the minimum length ({min_new} new tokens) is above the maximum ({max_new})")
        if max_positions is not None and prompt_tokens + max_new > max_positions:
            room = max_positions - prompt_tokens
            bad(f"max_new_tokens={max_new} with a {prompt_tokens}-token input exceeds the model's "
                f"{max_positions} positions (at most {max(room, 0)} new tokens fit)")
        return self


def _coerce(name: str, value: Any, annotation: Any, source: str) -> Any:
    """Check a JSON/CLI value against the field type (`int`, `float`, `bool`, optionally None)."""
    text = str(annotation)
    if value is None and "None" in text:
        return None
    kind = bool if text.startswith("bool") else int if text.startswith("int") else float
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{source}: generation option {name!r} must be {kind.__name__}, got {value!r}")
