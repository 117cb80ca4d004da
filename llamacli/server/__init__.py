"""`llamacli serve`: an OpenAI-compatible HTTP server with continuous batching across requests.

`openai` translates the API to requests and events back (pure), `worker` is the one engine thread, `app` is the
HTTP side (FastAPI + SSE on uvicorn), `metrics` the Prometheus counters. Import the modules themselves.
"""
