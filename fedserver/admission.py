"""Admission: who may hold a stream, how many, for how long, and with how many bytes.

gRPC's C core buffers what a peer sends on a stream until the application reads it, and
opens a stream's flow-control window to whatever message size the peer announces (up to the
server's receive limit). Left to itself, anyone who can reach the port opens many streams
that each announce a large message and never finish it, and the coordinator's memory fills
with half-received messages (measured: 0.5 -> 2.9 GB in 20 s from 1,000 such streams, and it
stayed there). The generated handlers make this worse: a unary request is read whole before
any of our code runs, so not even the caller's identity is checked first.

So every Federation method is registered through `guard_handlers`, which reads requests
itself (as raw bytes, as a request stream) and, in this order, before a single request byte is
taken from the stream:

1. identifies the caller from what the call's headers and connection carry (the enrolment
   or session token, the verified client certificate): an unknown caller is refused
   UNAUTHENTICATED and its stream closed, so an anonymous peer never gets a message window;
2. caps the calls a school holds open at once, per method (`[server.limits]
   calls_per_school`): a participant cannot open a thousand Upload streams;
3. reads each request message with a timeout (`request_timeout_s`): a message that does not
   arrive whole in time ends the call, and with it the bytes gRPC held for it;
4. decodes the message itself, so bytes that are not the method's message are refused
   INVALID_ARGUMENT with a message (not UNKNOWN or INTERNAL).

The server's receive limit is one upload chunk plus framing (`max_message_bytes`), not
gRPC's 4 MiB default, and uploads take their payload's bytes from a shared budget
(`upload_memory_bytes`, see fedserver/transfers.py) before they receive it. Together: an
anonymous peer holds nothing, and an enrolled school at most `calls_per_school` x 5 methods x
one message (docs/RELIABILITY.md has the measured figures)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from common.errors import BusyError, FederationError, ProtocolError, RETRY_AFTER_KEY, TooLargeError
from common.logs import get_logger
from common.wire import MAX_CHUNK_BYTES

# One upload chunk, and room for the fields around it (offset, total, and a header message's
# few hundred bytes). No Federation request but an upload chunk comes near this.
MESSAGE_SLACK_BYTES = 64 * 1024
MAX_REQUEST_BYTES = MAX_CHUNK_BYTES + MESSAGE_SLACK_BYTES


class RequestTimeoutError(FederationError):
    """A request message did not arrive whole in time."""

    status = "DEADLINE_EXCEEDED"


@dataclass(frozen=True)
class Limits:
    calls_per_school: int = 4          # concurrent calls one school holds per method
    request_timeout_s: float = 60.0    # a request message (or an upload's next chunk) must arrive within this
    anonymous_calls: int = 16          # calls held at once, per method, by callers nobody identifies (health checks)
    anonymous_timeout_s: float = 5.0   # their request must arrive within this


# The school admitted for the call being handled (set in the call's own task, before its
# handler runs): the servicer asks it instead of identifying the caller a second time.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("schoolfed_caller", default="")

ANONYMOUS = ""   # the caller of a service that needs no identity (grpc.health.v1) from elsewhere ...
LOCAL = "<local>"   # ... and from this machine (a probe of the operator's): a pool strangers cannot spend
REFUSAL_LINES = 20          # refusal lines written per window; past it they are counted ...
REFUSAL_WINDOW_S = 10.0     # ... and summarised once per window


class Admission:
    """Counts the calls each school holds open, per method; identifies before anything is read."""

    def __init__(self, identify: Callable[[str, grpc.aio.ServicerContext], str], limits: Limits,
                 on_refusal: Callable[[str, str, Exception], None] | None = None) -> None:
        self._identify = identify
        self.limits = limits
        self._open: dict[tuple[str, str], int] = defaultdict(int)
        self._on_refusal = on_refusal
        self.log = get_logger("admission")
        self._warned: dict[tuple[str, str], float] = {}   # (school, method) -> last "busy" line (monotonic)
        self._window_start = float("-inf")
        self._window_lines = 0
        self._suppressed: dict[str, int] = {}   # "method status" -> refusals not logged in this window

    def timeout(self, method: str, school: str) -> float | None:
        if school in (ANONYMOUS, LOCAL):
            return self.limits.anonymous_timeout_s
        return None if method == "Session" else self.limits.request_timeout_s

    def held(self, school: str, method: str) -> int:
        return self._open.get((school, method), 0)

    def enter(self, method: str, context: grpc.aio.ServicerContext) -> str:
        school = self._identify(method, context)
        key = (school, method)
        anonymous = school in (ANONYMOUS, LOCAL)
        cap = self.limits.anonymous_calls if anonymous else self.limits.calls_per_school
        if self._open[key] >= cap:
            if anonymous:
                raise BusyError(f"{cap} unauthenticated {method} calls are already open; retry in a moment")
            now = time.monotonic()
            if now - self._warned.get(key, float("-inf")) > 10.0:   # one line per school and method per 10 s
                self._warned[key] = now
                self.log.warning("too many calls from one school", school=school, rpc=method,
                                 open=self._open[key], limit=cap)
            raise BusyError(f"this school already has {self._open[key]} {method} calls open (at most "
                            f"{cap}); finish or cancel one, then retry")
        self._open[key] += 1
        return school

    def leave(self, method: str, school: str) -> None:
        key = (school, method)
        n = self._open.get(key, 0) - 1
        if n > 0:
            self._open[key] = n
        else:
            self._open.pop(key, None)

    async def next_message(self, it: AsyncIterator[bytes], method: str, timeout: float | None) -> bytes | None:
        """The next raw request message, or None at the end of the caller's stream. `timeout`
        None: no limit (a Session's events: its silence timeout ends a stalled one)."""
        if timeout is None:
            return await anext(it, None)
        try:
            async with asyncio.timeout(timeout):   # not wait_for: 3.11's can lose a cancellation
                return await anext(it, None)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"{method}: no complete request message within {timeout:g} s; the call is ended (a school "
                "sends each message at once; check the link)") from None

    async def refuse(self, context: grpc.aio.ServicerContext, method: str, exc: FederationError) -> NoReturn:
        """Abort the call with the error's status; a log line (summarised past REFUSAL_LINES a window)."""
        if self._on_refusal is not None:
            self._on_refusal(method, exc.status, exc)
        now = time.monotonic()
        if now - self._window_start >= REFUSAL_WINDOW_S:
            if self._suppressed:
                self.log.warning("calls refused before their request was read (summary)", window_s=REFUSAL_WINDOW_S,
                                 not_logged=dict(self._suppressed))
            self._window_start, self._window_lines, self._suppressed = now, 0, {}
        if self._window_lines < REFUSAL_LINES:
            self._window_lines += 1
            self.log.warning("rpc refused", rpc=method, status=exc.status, error=str(exc)[:300],
                             peer=_peer_address(context))
        else:
            k = f"{method} {exc.status}"
            self._suppressed[k] = self._suppressed.get(k, 0) + 1
        await context.abort(grpc.StatusCode[exc.status], str(exc), trailing_metadata=retry_metadata(exc))


def retry_metadata(exc: Exception) -> tuple[tuple[str, str], ...]:
    """The retry-after trailer of a refusal the caller may simply repeat (BusyError), else none."""
    if isinstance(exc, BusyError):
        return ((RETRY_AFTER_KEY, str(int(exc.retry_after_s * 1000))),)
    return ()


def anonymous_caller(identify: Callable[[str, grpc.aio.ServicerContext], str]
                     ) -> Callable[[str, grpc.aio.ServicerContext], str]:
    """For a service anyone may call (health): a school that shows its session counts as itself;
    anyone else as LOCAL (this machine) or ANONYMOUS, each a small pool of its own, so strangers
    holding the anonymous pool starve neither schools nor the operator's local probes."""
    def caller(method: str, context: grpc.aio.ServicerContext) -> str:
        try:
            return identify(method, context)
        except FederationError:
            pass
        peer = _peer_address(context)
        if peer.startswith(("ipv4:127.", "ipv6:[::1]", "unix:")):
            return LOCAL
        return ANONYMOUS
    return caller


def _peer_address(context: grpc.aio.ServicerContext) -> str:
    try:
        return str(context.peer())[:100]
    except Exception:   # a call already gone
        return "?"


def _decoder(method: str, deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except FederationError:
            raise
        except Exception as exc:   # protobuf's DecodeError, or whatever a custom deserialiser raises
            raise ProtocolError(f"{method}: the request is not a valid {method} message ({exc}); "
                                "use a school daemon of this coordinator's protocol version") from None
    return decode


def capture_handlers(add_to_server: Callable[[Any, Any], None], servicer: Any) -> tuple[str, dict[str, Any]]:
    """A generated `add_XServicer_to_server`'s service name and handler table, unregistered."""
    captured: dict[str, Any] = {}
    name: list[str] = []

    class _Capture:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
            name.append(service)
            captured.update(handlers)

    add_to_server(servicer, _Capture())
    return name[0], captured


def add_guarded(server: grpc.aio.Server, service: str, handlers: dict[str, Any], admission: Admission) -> None:
    guarded = guard_handlers(handlers, admission)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
    server.add_registered_method_handlers(service, guarded)


def guard_handlers(handlers: dict[str, Any], admission: Admission) -> dict[str, Any]:
    """Each method handler rebuilt as a request-streaming handler of raw bytes that admits the
    caller, then reads and decodes its request(s) under the limits, then calls the original."""
    out: dict[str, Any] = {}
    for method, h in handlers.items():
        decode = _decoder(method, h.request_deserializer)
        if not h.request_streaming and not h.response_streaming:
            out[method] = grpc.stream_unary_rpc_method_handler(
                _unary_unary(method, h.unary_unary, decode, admission), response_serializer=h.response_serializer)
        elif not h.request_streaming:
            out[method] = grpc.stream_stream_rpc_method_handler(
                _unary_stream(method, h.unary_stream, decode, admission), response_serializer=h.response_serializer)
        elif not h.response_streaming:
            out[method] = grpc.stream_unary_rpc_method_handler(
                _stream_unary(method, h.stream_unary, decode, admission), response_serializer=h.response_serializer)
        else:
            out[method] = grpc.stream_stream_rpc_method_handler(
                _stream_stream(method, h.stream_stream, decode, admission), response_serializer=h.response_serializer)
    return out


async def _single(method: str, school: str, it: AsyncIterator[bytes], decode: Callable[[bytes], Any],
                  admission: Admission) -> Any:
    raw = await admission.next_message(it, method, admission.timeout(method, school))
    if raw is None:
        raise ProtocolError(f"{method}: the call ended before its request message arrived")
    return decode(raw)


def _messages(method: str, school: str, it: AsyncIterator[bytes], decode: Callable[[bytes], Any],
              admission: Admission) -> AsyncIterator[Any]:
    timeout = admission.timeout(method, school)

    async def gen() -> AsyncIterator[Any]:
        while True:
            raw = await admission.next_message(it, method, timeout)
            if raw is None:
                return
            yield decode(raw)
    return gen()


async def _admit(method: str, context: grpc.aio.ServicerContext, admission: Admission) -> str:
    """The caller's school, counted against its cap; or the call refused (aborted)."""
    try:
        school = admission.enter(method, context)
    except FederationError as exc:
        await admission.refuse(context, method, exc)
    CALLER.set(school)
    return school


async def _request(method: str, school: str, it: AsyncIterator[bytes], decode: Callable[[bytes], Any],
                   admission: Admission, context: grpc.aio.ServicerContext) -> Any:
    """A unary call's one request, or the call refused (aborted; its slot is the caller's to give back)."""
    try:
        return await _single(method, school, it, decode, admission)
    except FederationError as exc:
        await admission.refuse(context, method, exc)


def _unary_unary(method: str, inner: Callable[..., Awaitable[Any]], decode: Callable[[bytes], Any],
                 admission: Admission) -> Callable[..., Awaitable[Any]]:
    async def behaviour(it: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        school = await _admit(method, context, admission)
        try:
            return await inner(await _request(method, school, it, decode, admission, context), context)
        finally:
            admission.leave(method, school)
    return behaviour


def _stream_unary(method: str, inner: Callable[..., Awaitable[Any]], decode: Callable[[bytes], Any],
                  admission: Admission) -> Callable[..., Awaitable[Any]]:
    async def behaviour(it: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        school = await _admit(method, context, admission)
        try:   # the servicer maps errors raised while it iterates (timeouts, bad bytes) to statuses
            return await inner(_messages(method, school, it, decode, admission), context)
        finally:
            admission.leave(method, school)
    return behaviour


def _unary_stream(method: str, inner: Callable[..., AsyncIterator[Any]], decode: Callable[[bytes], Any],
                  admission: Admission) -> Callable[..., AsyncIterator[Any]]:
    async def behaviour(it: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        school = await _admit(method, context, admission)
        try:
            async for item in inner(await _request(method, school, it, decode, admission, context), context):
                yield item
        finally:
            admission.leave(method, school)
    return behaviour


def _stream_stream(method: str, inner: Callable[..., AsyncIterator[Any]], decode: Callable[[bytes], Any],
                   admission: Admission) -> Callable[..., AsyncIterator[Any]]:
    async def behaviour(it: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        school = await _admit(method, context, admission)
        try:
            async for item in inner(_messages(method, school, it, decode, admission), context):
                yield item
        finally:
            admission.leave(method, school)
    return behaviour


class ByteBudget:
    """Bytes the coordinator holds for requests in progress (uploads' payloads, kept in hand
    from the first chunk to the receipt): taken before the bytes are received, given back
    after. A caller that does not fit waits its turn, first come first served, for at most
    `wait_s`, then is told to retry (RESOURCE_EXHAUSTED); it has sent nothing meanwhile, since
    gRPC's flow control holds its bytes on its side."""

    def __init__(self, capacity: int, wait_s: float) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.used = 0
        self.peak = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            n, fut = self._waiters.pop(0)
            if fut.done():
                continue
            self.used += n
            self.peak = max(self.peak, self.used)
            fut.set_result(None)

    async def acquire(self, n: int, what: str) -> None:
        if n > self.capacity:
            raise TooLargeError(f"{what} needs {n} bytes in hand but the coordinator's budget is {self.capacity} "
                            "([server.limits] upload_memory_mb); the operator must raise it")
        if not self._waiters and self.used + n <= self.capacity:
            self.used += n
            self.peak = max(self.peak, self.used)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.wait_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if fut.done() and not fut.cancelled():   # granted as we gave up: give it back
                self.release(n)
            else:
                fut.cancel()
                self._waiters = [w for w in self._waiters if w[1] is not fut]
                self._grant()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise BusyError(f"the coordinator is receiving {self.used} bytes of other uploads and {what} did not fit "
                            f"within {self.wait_s:g} s; retry in a moment") from None

    def release(self, n: int) -> None:
        self.used -= n
        self._grant()

    @contextlib.asynccontextmanager
    async def hold(self, n: int, what: str) -> AsyncIterator[None]:
        await self.acquire(n, what)
        try:
            yield
        finally:
            self.release(n)
