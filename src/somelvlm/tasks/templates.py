"""Prompt templates with SoMeData's wording (`--task NAME`): a post's text becomes a full prompt.

Each template is the prompt of a SoMeData multimodal test set (named in `SOURCES`) with the post's
caption replaced by `{text}`, so a plain table of posts is asked exactly what the model was tuned on.
"""

from __future__ import annotations

TEMPLATES: dict[str, str] = {
    "hate": "This image is associated with the following caption: '{text}'.\n"
            "Does this combination exhibits any elements of hate speech?\nChoices: [true, false]",
    "sentiment": "Given the image and the following caption, specify which sentiment dose this combination "
                 "convey?\nCaption: '{text}'.\nAvailable answers: [positive, neutral, negative].",
    "misinformation": "This news including an image is associated with the following caption:\n{text}\n\n"
                      "Question: Can the authenticity of this article be verified?\nPossible answers: [true, false]",
    "gender": "This image and the following caption are from the same user: '{text}'\n"
              "Is the user likely to be male or female?\nPick your answer from [male, female].",
    "ideology": "This image is posted by a politician and is associated with the following caption: '{text}'.\n"
                "What ideology does the politician belong to? Left or right?\nSelect your answer from [left, right].",
    "domain": "This image is associated with the following caption by a user.\ncaption: {text}\n"
              "What field does the user belong to? Explain it in one sentence.",
    "personality": "This image is associated with the following caption by an Instagram user.\ncaption: {text}\n"
                   "What's the personality of this user according to the post?\n"
                   "Constraints: First give the personality and explain it in one sentence.",
    "hashtags": "You are an expert in Social Media. Try to summarize three hashtags which begin with # that can "
                "best describe the image and its caption: '{text}'.",
}

SOURCES: dict[str, str] = {
    "hate": "HatefulMemes_test.json", "sentiment": "MVSA_Single_test.json",
    "misinformation": "FakeNewsNet_test.json", "gender": "PAN_test.json", "ideology": "Tweet_leg_test.json",
    "domain": "domain_explain_test.json", "personality": "personality_explain_test.json",
    "hashtags": "hashtag_gen_test.json",
}


def template(name: str) -> str:
    """The template called `name`; ValueError listing the known ones otherwise."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown --task {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def fill(name: str, text: str) -> str:
    """The prompt of template `name` around a post's `text`."""
    return template(name).format(text=text)


def describe() -> str:
    """One line per template for `--help`."""
    return "; ".join(f"{name} ({SOURCES[name].removesuffix('_test.json')})" for name in TEMPLATES)
