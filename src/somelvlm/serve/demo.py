"""`somelvlm demo`: a Gradio page to try SoMeLVLM on a post, with or without an image.

Pick a SoMeData task template (their wording is copied from the SoMeData test files) or ask
freely; the answer streams in (greedy), or comes at the end with LAVIS's beam search. For
classification templates the page shows the label options and the option parsed from the answer
(`somelvlm.evaluate.tasks.parse_answer`, the rule `somelvlm eval` scores with)."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

import gradio as gr

from ..evaluate.tasks import extract_options, parse_answer
from ..processing import SAMPLE_IMAGE, asset_path

FREE = "Free prompt (the post is the instruction)"
# SoMeData templates: the test files' wording with the post as {post} (file named after each).
TEMPLATES: dict[str, str] = {
    "Hate speech (HatefulMemes)": "This image is associated with the following caption: '{post}'.\n"
                                  "Does this combination exhibits any elements of hate speech?\nChoices: [true, false]",
    "Sentiment (MVSA_Single)": "Given the image and the following caption, specify which sentiment dose this "
                               "combination convey?\nCaption: '{post}'.\nAvailable answers: [positive, neutral, negative].",
    "Misinformation (FakeNewsNet)": "This news including an image is associated with the following caption:\n{post}"
                                    "\n\nQuestion: Is this news true or false?\nChoices: [true, false]",
    "Ideology (Tweet_leg)": "This image is posted by a politician and is associated with the following caption: "
                            "'{post}'.\nWhat ideology does the politician belong to? Left or right?\n"
                            "Select your answer from [left, right].",
    "Hashtags (hashtag_gen)": "You are an expert in Social Media. Try to summarize three hashtags which begin with # "
                              "that can best describe the image and its caption: '{post}'.",
    "Explanation (domain_explain)": "This image is associated with the following caption by a user.\ncaption: {post}"
                                    "\nWhat field does the user belong to? Explain it in one sentence.",
}
RANDOM_WEIGHTS_WARNING = ("**Warning: this is the built-in `tiny` model with RANDOM weights — its answers are "
                          "meaningless.** Start the demo with `--model DIR` (a converted SoMeLVLM folder) for real answers.")
EXAMPLE_POST = "when you insult a liberal intentionally"


def build_prompt(task: str, post: str) -> str:
    """The instruction sent to the model: the task template around the post, or the post itself."""
    post = (post or "").strip()
    if not post:
        raise gr.Error("type a post (or a question) first")
    return post if task == FREE else TEMPLATES[task].format(post=post)


def parsed_options(prompt: str, answer: str) -> str:
    """Markdown: the label options of a classification prompt and the one parsed from the answer."""
    options = extract_options(prompt)
    if not options:
        return "*Generation task: no label options to parse.*"
    parsed = parse_answer(answer, options)
    shown = ", ".join(f"`{o}`" for o in options)
    return f"**Options:** {shown}  \n**Parsed answer:** " + (f"`{parsed}`" if parsed else "*unparseable*")


def in_one_thread(pieces: Callable[[], Iterator[str]]) -> Iterator[str]:
    """Iterate `pieces()` on one worker thread and re-yield its items here. Gradio resumes a
    generator on varying threads, but the decoder's `torch.inference_mode` is thread-local."""
    out: queue.Queue = queue.Queue()
    done = object()

    def work() -> None:
        try:
            for piece in pieces():
                out.put(piece)
            out.put(done)
        except Exception as e:  # handed to the caller's thread
            out.put(e)

    threading.Thread(target=work, daemon=True).start()
    while (item := out.get()) is not done:
        if isinstance(item, Exception):
            raise item
        yield item


def build_demo(model: Any, random_weights: bool = False, max_new_tokens: int = 64) -> gr.Blocks:
    """The Gradio app around a loaded `SoMeLVLM`; its endpoint `/answer` streams (answer, parsed)."""

    def answer(image: str | None, task: str, post: str, beam_search: bool, max_tokens: float
               ) -> Iterator[tuple[str, str, str]]:
        prompt = build_prompt(task, post)
        limit = int(max_tokens)
        text = ""
        try:
            if beam_search:
                text = model.generate(images=image, prompts=[prompt], max_new_tokens=limit)[0]
            else:
                for piece in in_one_thread(lambda: model.generate_stream(image, prompt, num_beams=1,
                                                                         max_new_tokens=limit)):
                    text += piece
                    yield prompt, text, ""
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from None
        yield prompt, text, parsed_options(prompt, text)

    with gr.Blocks(title="SoMeLVLM demo", analytics_enabled=False) as demo:  # no calls home
        gr.Markdown("# SoMeLVLM\nSocial-media posts, with or without an image: pick a SoMeData task or ask freely.")
        if random_weights:
            gr.Markdown(RANDOM_WEIGHTS_WARNING, elem_id="random-weights-warning")
        with gr.Row():
            with gr.Column():
                image = gr.Image(str(asset_path(SAMPLE_IMAGE)), type="filepath", image_mode=None,
                                 label="Image (optional; clear it for a text-only post)",
                                 sources=["upload", "clipboard"])
                task = gr.Dropdown([FREE, *TEMPLATES], value=next(iter(TEMPLATES)), label="Task")
                post = gr.Textbox(value=EXAMPLE_POST, lines=4, label="Post / caption")
                beam = gr.Checkbox(value=False, label="Beam search (LAVIS defaults; the answer appears at the end)")
                tokens = gr.Slider(1, 255, value=max_new_tokens, step=1, label="Max new tokens")
                run = gr.Button("Answer", variant="primary", elem_id="answer-button")
            with gr.Column():
                prompt = gr.Textbox(label="Prompt sent to the model", lines=5, interactive=False)
                out = gr.Textbox(label="Answer", lines=6, interactive=False, elem_id="answer")
                parsed = gr.Markdown(elem_id="parsed")
        run.click(answer, [image, task, post, beam, tokens], [prompt, out, parsed], api_name="answer")
    return demo
