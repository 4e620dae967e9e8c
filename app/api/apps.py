"""The two ASGI apps, and `serve`, which runs both listeners and the forwarder."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator

import uvicorn
from fastapi import FastAPI

from app import __version__, loops, tls
from app.access.policy import parse_networks
from app.api import admin, dicomweb, pages, protocol, public
from app.api.admin.deps import admin_error_body, install_admin_errors
from app.api.closing import CloseUnreadBodiesMiddleware
from app.api.errors import install_orthanc_errors, orthanc_error_body
from app.api.guards import CrossSiteGuardMiddleware, HostGuardMiddleware
from app.api.request_ids import RequestIdMiddleware
from app.service import Service
from app.settings import Settings

log = logging.getLogger(__name__)


def _lifespan(
    settings: Settings, service: Service | None
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """Use the given Service, or start (and stop) one of the app's own."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if service is not None:
            app.state.service = service
            yield
            return
        owned = Service(settings)
        await owned.start()
        app.state.service = owned
        try:
            yield
        finally:
            await owned.stop()

    return lifespan


def create_public_app(settings: Settings, service: Service | None = None) -> FastAPI:
    app = FastAPI(
        title="Orthanc Intake (public)",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=_lifespan(settings, service),
    )
    app.router.redirect_slashes = False
    app.add_middleware(CloseUnreadBodiesMiddleware)
    app.add_middleware(
        HostGuardMiddleware, allowed=settings.public_allowed_hosts, error_body=orthanc_error_body
    )
    app.add_middleware(RequestIdMiddleware)
    app.include_router(public.router)
    app.include_router(dicomweb.router)
    app.include_router(pages.router)
    install_orthanc_errors(app)
    return app


def create_admin_app(settings: Settings, service: Service | None = None) -> FastAPI:
    app = FastAPI(
        title="Orthanc Intake admin API",
        version=__version__,
        description=(
            "The admin listener (127.0.0.1 by default). Every route but the health ones "
            "needs an admin: HTTP Basic (name + password) or `Authorization: Bearer oia_…` "
            "(from `orthanc-intake admins token NAME`). Errors are "
            '`{"error": <machine reason>, "detail": <human text>}`.'
        ),
        lifespan=_lifespan(settings, service),
    )
    app.add_middleware(CloseUnreadBodiesMiddleware)
    app.add_middleware(CrossSiteGuardMiddleware, error_body=admin_error_body)
    app.add_middleware(
        HostGuardMiddleware, allowed=settings.admin_allowed_hosts, error_body=admin_error_body
    )
    app.add_middleware(RequestIdMiddleware)
    app.include_router(admin.router)
    install_admin_errors(app)
    return app


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `serve`, which runs two of them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _config(
    app: FastAPI,
    host: str,
    port: int,
    settings: Settings,
    error_body: protocol.ErrorBody,
    context: ssl.SSLContext | None = None,
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        proxy_headers=False,  # X-Forwarded-For is trusted only per configuration
        server_header=False,
        timeout_keep_alive=settings.keep_alive_timeout_seconds,  # type: ignore[arg-type]
        # Our own context (app/tls.py), kept by reference so a renewed certificate can be
        # loaded into it; the protocol adds the client certificate's fingerprint.
        ssl_context_factory=None if context is None else (lambda _config, _default: context),
        http=protocol.protocol(
            protocol.HeaderLimits(
                timeout=settings.header_timeout_seconds,
                max_bytes=settings.max_header_bytes,
                max_count=settings.max_header_count,
            ),
            protocol.ConnectionLimits(
                max_total=settings.max_connections,
                max_per_client=settings.max_connections_per_client,
                exempt=parse_networks(settings.trusted_proxies),
                send_timeout=settings.send_timeout_seconds,
            ),
            error_body,
        ),
    )


def run(settings: Settings) -> None:
    """`serve` on uvloop by default. It was the one clear lever before the forwarder's
    rework (~2.7 ms less CPU per instance); since, the difference is within the noise
    (docs/PERFORMANCE.md). `INTAKE_EVENT_LOOP=asyncio` opts out."""
    with loops.runner(settings.event_loop) as runner:
        runner.run(serve(settings))


def _file_limit(settings: Settings) -> None:
    """Raise the soft descriptor limit to the hard one, and warn when two full listeners
    would still not fit beside what the service itself holds (spool, database, workers)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    needed = 2 * settings.max_connections + _DESCRIPTORS_RESERVED
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "the file limit is %d descriptors, under the %d that INTAKE_MAX_CONNECTIONS=%d "
            "on both listeners needs: raise LimitNOFILE, or lower INTAKE_MAX_CONNECTIONS to "
            "at most %d, or a flood of connections can starve the spool and the database",
            soft,
            needed,
            settings.max_connections,
            max(8, (soft - _DESCRIPTORS_RESERVED) // 2),
        )


# Descriptors the service holds apart from connections: database, spool, workers, logs.
_DESCRIPTORS_RESERVED = 256


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before anything of the service starts: a port that is
    taken ends the service at once (exit 1), never one listener up without the other."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        log.error("cannot listen on %s:%s: %s", host, port, why)
        raise SystemExit(1) from None
    sock.set_inheritable(True)
    return sock


async def serve(settings: Settings) -> None:
    """Run the public and admin listeners and the forwarder until SIGINT/SIGTERM."""
    _file_limit(settings)
    context = tls.make_context(settings) if settings.tls_enabled else None
    public_socket = _listen(settings.public_host, settings.public_port)
    try:
        admin_socket = _listen(settings.admin_host, settings.admin_port)
    except SystemExit:
        public_socket.close()
        raise
    service = Service(settings)
    await service.start()
    public_server = _Server(
        _config(
            create_public_app(settings, service),
            settings.public_host,
            settings.public_port,
            settings,
            orthanc_error_body,
            context,
        )
    )
    admin_server = _Server(
        _config(
            create_admin_app(settings, service),
            settings.admin_host,
            settings.admin_port,
            settings,
            admin_error_body,
        )
    )
    loop = asyncio.get_running_loop()

    def _stop() -> None:
        public_server.should_exit = True
        admin_server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stop)
    watcher: asyncio.Task[None] | None = None
    if context is not None:
        reloader = tls.CertificateReloader(context, settings)
        loop.add_signal_handler(signal.SIGHUP, reloader.reload)
        watcher = asyncio.create_task(reloader.watch(settings.tls_reload_check_seconds))
    else:  # SIGHUP's default would end the service; without TLS there is nothing to reload
        loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP: no TLS certificate to reload")
    log.info("event loop: %s", type(loop).__module__.split(".")[0])  # uvloop or asyncio
    log.info(
        "public listener on %s:%s (%s), admin listener on %s:%s",
        settings.public_host,
        settings.public_port,
        "https" if settings.tls_enabled else "http",
        settings.admin_host,
        settings.admin_port,
    )
    try:
        await asyncio.gather(
            public_server.serve(sockets=[public_socket]), admin_server.serve(sockets=[admin_socket])
        )
    finally:
        if watcher is not None:
            watcher.cancel()
        await service.stop()
