"""The HTTP server (`python -m llava_jax.serve`): OpenAI's chat-completions API over the slot engine.

`app.py` builds the FastAPI app, `openai_schema.py` validates requests and turns them into LLaVA
conversations, `metrics.py` writes Prometheus text, `__main__.py` loads the model and runs uvicorn.
Nothing else in llava_jax imports this package (FastAPI and uvicorn are the `serve` extra).
"""
