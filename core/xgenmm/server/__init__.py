"""OpenAI-compatible HTTP server over the shared engine (`xgenmm serve`). Needs the `server` extra (FastAPI, uvicorn,
prometheus_client)."""

from .app import build_app
from .config import API_KEY_ENV, ServerConfig
from .errors import OpenAIError
from .runner import BackgroundServer, free_port, run_server

__all__ = ["API_KEY_ENV", "BackgroundServer", "OpenAIError", "ServerConfig", "build_app", "free_port", "run_server"]
