"""Serving SoMeLVLM: an OpenAI-compatible HTTP server with dynamic batching (`somelvlm serve`,
extra `somelvlm[serve]`) and a Gradio demo (`somelvlm demo`, extra `somelvlm[demo]`).

Modules: `errors` (the client-error type), `images` (where request images may come from and how
they are checked), `protocol` (OpenAI request/response shapes), `batcher` (the model's worker and
features cache), `app` (the FastAPI routes), `demo` (the Gradio page), `cli` (both subcommands).
Only `cli` is imported by the core command line; FastAPI and Gradio load when a command needs them.
"""
