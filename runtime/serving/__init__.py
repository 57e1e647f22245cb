"""HTTP serving: the app and its endpoints (`app`), the request bodies (`schemas`) and the CPU
workers with the load reporter (`workers`). Nothing happens at import time."""

from runtime.serving.app import create_app, uvicorn_config
from runtime.serving.schemas import EventsBody, PredictBody, to_engine_request
from runtime.settings import ServerSettings

__all__ = ["EventsBody", "PredictBody", "ServerSettings", "create_app", "to_engine_request", "uvicorn_config"]
