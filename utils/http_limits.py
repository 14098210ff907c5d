"""Connection limits for api_demo.py's uvicorn server: a cap on open connections and a deadline
for each request's headers, so slow or idle clients cannot exhaust the server.

Used through `utils.api_app.server_settings(config)`, which passes `LimitedH11Protocol` to
uvicorn as its `http` protocol; with InferConfig's defaults from uvicorn's command line too:
`uvicorn api_demo:app --http utils.http_limits:LimitedH11Protocol --limit-concurrency 64`.
Hand-written because uvicorn has neither: its
`limit_concurrency` answers 503 only once a request's headers are complete (a connection
that never finishes them is never counted), and its keep-alive timer starts only after a
first response and is cancelled by any byte received, so a client that opens a connection
and sends nothing, or one header byte every few seconds, holds it for ever (issue #12: 500
half-open connections all stayed open, idle ones were still open after 150 s).
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from config import InferConfig


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus: at most `max_connections` open connections (later ones are
    closed at once), and `header_timeout` seconds to deliver each request's headers, counted
    from the connection's opening or the previous response (later, the connection is closed)."""

    def __init__(self, *args, max_connections: int = InferConfig.max_connections,
                 header_timeout: float = InferConfig.header_timeout, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        # self.connections is shared by every connection of the server (uvicorn's ServerState).
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.logger.warning("refused a connection: %d open, the limit is %d (max_connections)",
                                len(self.connections) - 1, self.max_connections)
            transport.close()
            return
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a request's headers are in: its deadline is met
            self._cancel_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_deadline()  # the next request on this keep-alive connection

    def connection_lost(self, exc) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_timed_out(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
