"""SoMeData task files: reading, label-option extraction, task families and answer parsing.

A task file is a JSON list of ``{"text_input", "text_output", "image"}`` records (extra keys are
ignored), read by `somelvlm.tasks.records` (its one error policy: a bad record is reported with
FILE:LINE, skipped and counted in `TaskFile.problems`). Sample ids are 0-based record positions. A sample is a *classification* sample when its prompt lists label options, otherwise a
*generation* sample; a file is one or the other (a file mixing both is rejected).

Option lists are recognised in two forms (the option text itself is comma-separated):

* a bracket list ``[a, b, c]`` on a line whose text before ``[`` (at most 80 characters) contains
  an options cue word (option, choice, choose, select, pick, answer, candidate, label) and whose
  text after ``]`` is only punctuation, e.g. ``Choices: [true, false]``, ``Pick your answer from
  [male, female].``, ``Constraint: Only choose one word as the output from [true, false]``. When
  several lines qualify, the last one wins, so brackets inside the post text are not mistaken for
  the options;
* a plain list on the last line after a colon, where the text before the colon contains a cue
  word and ends in "from", "following", or a cue noun (optionally + "are"/"is"), e.g. ``Pick
  your answer from: positive, neutral, or negative.`` (split on commas and "or"; at most five
  words per option).

A list must hold at least two distinct options.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..tasks.records import Columns, Problems, Task, read_tasks

TaskKind = Literal["classification", "generation"]

# Dataset name (the file name before "_test") -> task family. A `_g` (generation) or `_id` variant
# shares the family of its classification twin; unknown datasets fall back to "other".
FAMILIES: dict[str, str] = {
    "4chans": "hate",
    "hatefulmemes": "hate",
    "mmhs": "hate",
    "fakenewsnet": "misinformation",
    "mvsa_single": "sentiment",
    "mvsa_multiple": "sentiment",
    "tumemo": "sentiment",
    "tweet_cele": "ideology",
    "tweet_leg": "ideology",
    "pan": "social_factors",
    "hashtag_choice": "social_factors",
    "domain_explain": "explanation",
    "personality_explain": "explanation",
    "hashtag_gen": "hashtag_generation",
}
OTHER_FAMILY = "other"

_CUE = re.compile(r"\b(?:options?|choices?|choose|select|pick|answers?|candidates?|labels?)\b", re.IGNORECASE)
_BRACKET_LINE = re.compile(
    r"^(?P<prefix>[^\n\[\]]{0,80}?)\[(?P<items>[^\n\[\]]*)\][\s.,;:!?'\"]*$", re.MULTILINE
)
_PLAIN_CUE_END = re.compile(
    r"\b(?:from|following|options?|choices?|answers?|candidates?|labels?)(?:\s+(?:are|is))?\s*$", re.IGNORECASE
)
_PLAIN_LINE = re.compile(r"^(?P<prefix>[^\n:]{0,80}):\s*(?P<items>[^\n:\[\]]+?)[\s.]*$")
_QUOTES = "'\"`‘’“”"
_MAX_PLAIN_OPTION_WORDS = 5


# SoMeData ids are record positions: an id column name no record has.
COLUMNS = Columns(id="", prompt="text_input", reference="text_output")


@dataclass(frozen=True)
class TaskFile:
    """A parsed task file. `name` is the JSON file name, which prediction lines refer to;
    `options[id]` are the label options of sample `id` (None for generation samples)."""

    name: str
    path: Path
    kind: TaskKind
    family: str
    samples: tuple[Task, ...]
    options: dict[int, tuple[str, ...] | None] = field(default_factory=dict)
    problems: tuple[str, ...] = ()  # "FILE:LINE: why" of the records left out


def extract_options(prompt: str) -> tuple[str, ...] | None:
    """The label options listed in a prompt, or None when it lists none (a generation prompt)."""
    for match in reversed(list(_BRACKET_LINE.finditer(prompt))):
        if _CUE.search(match["prefix"]):
            options = _split_options(match["items"].split(","))
            if options:
                return options
    lines = prompt.strip().splitlines()
    match = _PLAIN_LINE.match(lines[-1].strip()) if lines else None
    if match and _CUE.search(match["prefix"]) and _PLAIN_CUE_END.search(match["prefix"]):
        items = re.split(r",\s*(?:or\s+)?|\s+or\s+", match["items"])
        if all(len(item.split()) <= _MAX_PLAIN_OPTION_WORDS for item in items):
            return _split_options(items)
    return None


def _split_options(items: list[str]) -> tuple[str, ...] | None:
    options = [item.strip().strip(_QUOTES).strip() for item in items]
    unique = tuple(dict.fromkeys(o for o in options if o))
    return unique if len(unique) >= 2 else None


def dataset_name(file_name: str) -> str:
    """`PAN_test_g.json` -> `PAN`: the file stem before `_test` (or without a `_g`/`_id` suffix)."""
    stem = Path(file_name).stem
    head, sep, _ = stem.partition("_test")
    return head if sep else re.sub(r"_(?:g|id)$", "", stem)


def family_of(file_name: str) -> str:
    """The task family of a file name (see `FAMILIES`). A dataset name that starts with a known
    one followed by a non-letter (`MMHS150K_test.json`) takes the longest such match; anything
    else is "other"."""
    name = dataset_name(file_name).casefold()
    prefixes = [key for key in FAMILIES if re.match(re.escape(key) + r"(?![a-z])", name)]
    return FAMILIES[max(prefixes, key=len)] if prefixes else OTHER_FAMILY


def load_task(path: str | Path, images_root: str | Path | None = None) -> TaskFile:
    """Read one task file (images relative to `images_root`, default: its folder); a bad record is
    reported and skipped. Raises FileNotFoundError/ValueError with the file named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    problems = Problems()
    samples = tuple(read_tasks(path, images_root, COLUMNS, problems, fmt="json", need_reference=True))
    options = {s.id: extract_options(s.prompt) for s in samples}
    return TaskFile(path.name, path, _kind(path, options), family_of(path.name), samples, options,
                    tuple(problems.lines()))


def _kind(path: Path, options: dict[int, tuple[str, ...] | None]) -> TaskKind:
    samples = list(options)
    without = [i for i, o in options.items() if o is None]
    if not without:
        return "classification" if samples else "generation"
    if len(without) == len(samples):
        return "generation"
    raise ValueError(
        f"{path}: {len(samples) - len(without)} of {len(samples)} prompts list label options but "
        f"samples {without[:5]} do not; a file must be all classification or all generation"
    )


def load_tasks(data: str | Path, images_root: str | Path | None = None) -> list[TaskFile]:
    """Read a task file, or every `*.json` file directly inside a folder (sorted by name)."""
    data = Path(data)
    if data.is_dir():
        files = sorted(data.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"no *.json task files directly inside {data}")
        return [load_task(f, images_root) for f in files]
    return [load_task(data, images_root)]


def normalize(text: str) -> str:
    """Casefold, NFKC, every non-word character (punctuation, '#', ...) becomes a space."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w]", " ", text).split())


def parse_answer(answer: str, options: tuple[str, ...] | list[str]) -> str | None:
    """Map a free-text answer to one of `options`, or None when it is unparseable.

    Rules, in order: (1) the stripped answer equals an option exactly; (2) otherwise both are
    normalized (see `normalize`) and the option that occurs earliest in the answer as a whole
    word sequence wins, the longest option on a tie at the same position ("female" is not
    "male", "NotHate" is not "Hate", "#desert" is not "#desserts"). Negations are not
    understood: "not hateful" selects "hateful". Options that normalize to nothing (only
    punctuation or emoji) are matched by rule (1) only.
    """
    text = answer.strip()
    if text in options:
        return text
    padded = f" {normalize(text)} "
    best: tuple[int, int, str] | None = None
    for option in options:
        norm = normalize(option)
        pos = padded.find(f" {norm} ") if norm else -1
        if pos >= 0 and (best is None or (pos, -len(norm)) < best[:2]):
            best = (pos, -len(norm), option)
    return best[2] if best else None
