"""The HTTP API: OpenAI-compatible chat, durable feedback, adapters, health and metrics.

`create_app` assembles it: middleware (`middleware`), one error body and its handlers
(`errors`), and one router per feature (`routes/`), whose routes are thin: they validate with
pydantic (`schemas`), reach the runtime through `deps`, and leave the mapping of domain errors
to status codes to `errors`. The /dashboard pages are the `dashboard` package.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from claas import __version__
from claas.api.dashboard import routes as dashboard
from claas.api.deps import Tokenizing
from claas.api.errors import add_exception_handlers
from claas.api.middleware import Metrics, add_middleware
from claas.api.openapi import document_limits
from claas.api.routes import adapters, claas_compat, feedback, openai, system
from claas.runtime import Runtime

__all__ = ["create_app"]

serve_logger = logging.getLogger("claas.serve")


def create_app(runtime: Runtime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.queue.start()  # and its purge of expired rollouts, every purge interval
        app.state.ready = True
        serve_logger.info("claas ready: serving %s", runtime.base_model, extra=runtime.facts())
        try:
            yield
        finally:
            app.state.ready = False
            await runtime.queue.stop()
            if runtime.inference is not None:
                await runtime.inference.aclose()
            serve_logger.info("claas stopped")

    app = FastAPI(
        title="claas",
        version=__version__,
        summary="Continual learning as a service: chat, give feedback, the adapter learns.",
        lifespan=lifespan,
    )
    metrics = Metrics(runtime)
    runtime.queue.on_trained = lambda request, seconds: metrics.train_seconds.observe(seconds)
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.tokenizing = Tokenizing(runtime)
    app.state.ready = False

    document_limits(app, runtime)
    add_middleware(app, runtime, metrics)
    add_exception_handlers(app)
    dashboard.add_login_redirect(app)
    app.include_router(openai.router)
    app.include_router(feedback.router)
    app.include_router(adapters.router)
    app.include_router(claas_compat.router)
    app.include_router(dashboard.router)
    app.include_router(system.router)
    return app
