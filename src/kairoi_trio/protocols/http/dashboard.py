"""The web dashboard at `/`: server-rendered pages over the same actor calls as the API.

    GET  /                   overview: jobs by status, the last hour's charts, runner
                             pools, storage
    GET  /jobs               jobs by id prefix and status, a page at a time (?prefix=
                             &status=&after=)
    GET  /job?id=            one job: times, attempts, outcome, payload preview,
                             schedule and next occurrences, the rule it pairs with
    POST /job/action         run now / re-plan at a time / delete: a confirmation page
                             first, then the command; pause / resume of a recurring
                             job at once (client or admin role)
    GET  /rules, /rule?id=   rules, and a rule with the jobs its pattern matches
    GET  /events             the live events page; its script reads
    GET  /events/stream      the API's Server-Sent Events, authenticated by cookie
    GET/POST /login, POST /logout, GET /static/{name}

Every page is one or a few commands to the command actor (`Api.call`), each
costing the page, not the number of jobs: counts from the counters the store
keeps, lists from the ordered id index (ListJobs with `after`; one sorted index
per status, so a status filter costs the page too), the rule a job pairs with
from the dispatcher's own pattern index (MatchRule).

Authentication: the API's tokens and roles (core/auth.py). A browser cannot send
`Authorization: Bearer` on a navigation, so /login takes the token in a form
and keeps it in a cookie (HttpOnly, SameSite=Strict, Path=/; Secure when the
request came over https). With no token configured everyone is admin, as on
the API. Actions are POST forms carrying a per-session CSRF token (an HMAC of
the cookie's token under a secret made at start-up); with SameSite=Strict that
makes cross-site forms fail. Forms for actions are not rendered at all for a
role that may not run them, and the POST is refused (403) anyway.

Every response carries a Content-Security-Policy without inline script or
style (`default-src 'none'`, scripts and styles from /static only,
`frame-ancestors 'none'`), `X-Content-Type-Options: nosniff`,
`Referrer-Policy: no-referrer` and `Cache-Control: no-store`. Templates are
Jinja2 with autoescape on: every id, payload, outcome and rule field is escaped.
Reference: docs/dashboard.md.
"""

from __future__ import annotations

import hashlib
import hmac
import mimetypes
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

import structlog
import trio
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from kairoi_trio import commands as c
from kairoi_trio.commands import CommandError, ErrorCode
from kairoi_trio.core.auth import Role, TokenTable, permitted
from kairoi_trio.model import Job, Rule, Status, now_us
from kairoi_trio.observability.samples import SAMPLES, MinuteRing
from kairoi_trio.protocols.http import charts, convert
from kairoi_trio.protocols.http.api import HTTP_STATUS, Api

if TYPE_CHECKING:
    from jinja2 import Environment

log = structlog.get_logger(__name__)

HERE = Path(__file__).parent
COOKIE = "kairoi_token"
JOB_PAGE = 50  # jobs per page (?page_size= up to MAX_PAGE)
MAX_PAGE = 200
RULE_PAGE = 100
RULE_JOBS = 20  # jobs shown on a rule's page
PREVIEW_OCCURRENCES = 5
PAYLOAD_PREVIEW_CHARS = 2048  # text payloads shown up to this many characters
PAYLOAD_PREVIEW_BYTES = 256  # binary payloads: a hex dump of this many bytes
STORAGE_INFO_TTL_S = 5.0  # the data directory is listed at most this often

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

# The actions of a job's page, and the command (role) each needs.
ACTIONS: dict[str, type] = {
    "run": c.RunJobNow,
    "replan": c.SetJob,
    "delete": c.DeleteJob,
    "pause": c.PauseJob,
    "resume": c.ResumeJob,
}
# The actions that ask first (pause and resume undo each other: no question).
CONFIRMED = frozenset({"run", "replan", "delete"})
# The jobs list's "previous page": the pages' start tokens travel in the query
# string (`back`, oldest first), at most this many characters of them; older
# ones are dropped (then only "First page" leads back that far).
MAX_BACK_CHARS = 4000


@dataclass(frozen=True)
class PayloadPreview:
    """What a job's page shows of its payload. kind: "empty", "text" (escaped by the
    template, cut at PAYLOAD_PREVIEW_CHARS) or "binary" (hex of the first
    PAYLOAD_PREVIEW_BYTES bytes); truncated: the preview is not the whole payload."""

    size: int
    kind: str
    text: str
    truncated: bool


def payload_preview(payload: bytes) -> PayloadPreview:
    """A safe preview of `payload` (bytes, any content); see PayloadPreview."""
    if not payload:
        return PayloadPreview(0, "empty", "", False)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    else:
        printable = all(ch.isprintable() or ch in "\n\r\t" for ch in text[:PAYLOAD_PREVIEW_CHARS])
        if printable:
            cut = text[:PAYLOAD_PREVIEW_CHARS]
            return PayloadPreview(len(payload), "text", cut, len(cut) < len(text))
    head = payload[:PAYLOAD_PREVIEW_BYTES]
    lines = [
        f"{offset:08x}  {head[offset : offset + 16].hex(' ')}" for offset in range(0, len(head), 16)
    ]
    return PayloadPreview(len(payload), "binary", "\n".join(lines), len(head) < len(payload))


def time_text(us: int | None) -> str:
    """Microseconds since the epoch as `2030-01-01 08:00:00.000000 UTC`; "" for None."""
    if us is None:
        return ""
    return datetime.fromtimestamp(us / 1_000_000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f UTC")


def size_text(size: int | None) -> str:
    """Bytes as `512 B`, `1.5 KiB`, `3.2 MiB`, `1.1 GiB`; "" for None."""
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # unreachable


class Dashboard:
    """The dashboard's routes over `api` (its actor calls) and `auth` (its tokens).

    live: the server's live values (app.py's `_live_values`: "pools" maps a runner
        kind to (queued, running)); None shows no pools.
    storage: a blocking function describing the store, run in a thread at most
        every STORAGE_INFO_TTL_S: {"backend": "log" | "postgres", "bytes": int |
        None, "last_compaction_us": int | None}; None shows nothing.
    samples: the last hour's per-minute ring (observability/samples.py).
    """

    def __init__(
        self,
        api: Api,
        auth: TokenTable,
        *,
        live: Callable[[], Mapping[str, Any]] | None = None,
        storage: Callable[[], Mapping[str, Any]] | None = None,
        samples: MinuteRing = SAMPLES,
    ) -> None:
        self._api = api
        self._auth = auth
        self._live = live
        self._storage = storage
        self._storage_cache: tuple[float, Mapping[str, Any]] | None = None
        self._samples = samples
        self._secret = secrets.token_bytes(32)
        self._env: Environment | None = None  # at the first page (_templates)
        self._static = _load_static(HERE / "static")

    # -- plumbing ------------------------------------------------------------------

    def _templates(self) -> Environment:
        if self._env is None:
            # Jinja2 at the first page, not at every server start (~30 ms of CPU).
            from jinja2 import Environment, FileSystemLoader, select_autoescape

            env = Environment(
                loader=FileSystemLoader(HERE / "templates"),
                autoescape=select_autoescape(default=True, default_for_string=True),
                trim_blocks=True,
                lstrip_blocks=True,
            )
            env.filters["time"] = time_text
            env.filters["size"] = size_text
            env.filters["q"] = lambda value: quote(str(value), safe="")
            env.filters["runner_kind"] = lambda rule: convert.rule_to_json(rule)["runner"]["kind"]
            self._env = env
        return self._env

    def _role(self, request: Request) -> Role | None:
        if not self._auth.required:
            return Role.ADMIN
        token = request.cookies.get(COOKIE)
        return self._auth.role_of(token) if token else None

    def _csrf(self, request: Request) -> str:
        token = request.cookies.get(COOKIE, "")
        return hmac.new(self._secret, b"csrf\0" + token.encode(), hashlib.sha256).hexdigest()

    def _page(
        self, request: Request, template: str, http_status: int = 200, **values: Any
    ) -> Response:
        role = self._role(request)
        html = (
            self._templates()
            .get_template(template)
            .render(
                role=role.value if role is not None else None,
                auth_required=self._auth.required,
                csrf=self._csrf(request),
                can=lambda action: role is not None and permitted(role, ACTIONS[action]),
                path=request.url.path,
                **values,
            )
        )
        return Response(
            html, status_code=http_status, media_type="text/html", headers=dict(SECURITY_HEADERS)
        )

    def _error(self, request: Request, status: int, message: str) -> Response:
        return self._page(request, "error.html", status, status=status, message=message)

    def _guard(self, handler: Callable[[Request, Role], Any]) -> Callable[[Request], Any]:
        """`handler` for a signed-in role (else a redirect to /login), with each
        CommandError shown as an error page of its HTTP status."""

        async def endpoint(request: Request) -> Response:
            role = self._role(request)
            if role is None:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(
                    "/login?" + urlencode({"next": target}),
                    303,
                    headers=dict(SECURITY_HEADERS),
                )
            started = time.perf_counter()
            try:
                response: Response = await handler(request, role)
            except CommandError as error:
                response = self._error(request, HTTP_STATUS.get(error.code, 500), error.message)
            # The page's cost in the server (actor calls and rendering), in ms: what
            # benchmarks/dashboard_bench.py reports, and a browser's network panel shows.
            elapsed_ms = (time.perf_counter() - started) * 1000
            response.headers["server-timing"] = f"app;dur={elapsed_ms:.2f}"
            return response

        return endpoint

    def routes(self) -> list[BaseRoute]:
        """The dashboard's routes, to be given to build_app(extra_routes=...)."""
        g = self._guard
        return [
            Route("/", g(self.overview), methods=["GET"]),
            Route("/jobs", g(self.jobs), methods=["GET"]),
            Route("/job", g(self.job), methods=["GET"]),
            Route("/job/action", g(self.job_action), methods=["POST"]),
            Route("/rules", g(self.rules), methods=["GET"]),
            Route("/rule", g(self.rule), methods=["GET"]),
            Route("/events", g(self.events), methods=["GET"]),
            Route("/events/stream", g(self.event_stream), methods=["GET"]),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/static/{name}", self.static, methods=["GET"]),
        ]

    # -- pages ---------------------------------------------------------------------

    async def overview(self, request: Request, role: Role) -> Response:
        info: c.ServerInfo = await self._api.call(c.GetInfo())
        counts = {status.value: info.jobs_by_status.get(status, 0) for status in Status}
        live = self._live() if self._live is not None else {}
        pools = sorted((live.get("pools") or {}).items())
        series = self._samples.series()
        rates = [
            (
                kind,
                charts.bar_chart(
                    f"jobs {kind} per minute", [b.counts[kind] for b in series], css=kind
                ),
            )
            for kind in ("set", "triggered", "executed", "failed")
        ]
        lateness = charts.bar_chart(
            "mean trigger lateness per minute",
            [b.lateness_mean_s for b in series],
            unit=" s",
            css="lateness",
            digits=3,
        )
        lateness_max = max((b.lateness_max_s for b in series), default=0.0)
        return self._page(
            request,
            "overview.html",
            info=info,
            counts=counts,
            total=sum(counts.values()),
            pools=pools,
            rates=rates,
            lateness=lateness,
            lateness_max=lateness_max,
            storage=await self._storage_info(),
            since=series[0].minute * 60_000_000 if series else None,
        )

    async def _storage_info(self) -> Mapping[str, Any] | None:
        if self._storage is None:
            return None
        cached = self._storage_cache
        now = time.monotonic()
        if cached is None or now - cached[0] > STORAGE_INFO_TTL_S:
            try:
                value = await trio.to_thread.run_sync(self._storage)
            except OSError as error:
                value = {"error": str(error)}
            cached = self._storage_cache = (now, value)
        return cached[1]

    async def jobs(self, request: Request, role: Role) -> Response:
        query = request.query_params
        prefix = query.get("prefix", "")
        status_text = query.get("status") or ""
        status = convert.status_filter(status_text or None)
        limit = convert.page_size(query.get("page_size"), JOB_PAGE, MAX_PAGE)
        after = query.get("after", "")
        back = query.getlist("back")  # the start tokens of the pages before, oldest first
        page: c.JobPage = await self._api.call(
            c.ListJobs(prefix=prefix, status=status, after=after, limit=limit)
        )
        base: dict[str, str] = {"prefix": prefix, "status": status_text}
        if limit != JOB_PAGE:
            base["page_size"] = str(limit)

        def url(start: str, stack: list[str]) -> str:
            pairs = list(base.items())
            if start:
                pairs.append(("after", start))
            pairs += [("back", token) for token in stack]
            return "/jobs?" + urlencode(pairs)

        previous_url = url(back[-1], back[:-1]) if back else None
        return self._page(
            request,
            "jobs.html",
            jobs=page.jobs,
            prefix=prefix,
            status=status_text,
            statuses=[s.value for s in Status],
            after=after,
            first_url=url("", []),
            previous_url=previous_url,
            next_url=url(page.next_after, _bounded_back([*back, after]))
            if page.next_after
            else None,
            deleted=query.get("deleted"),
        )

    async def job(self, request: Request, role: Role) -> Response:
        job_id = request.query_params.get("id", "")
        job: Job = await self._api.call(c.GetJob(job_id))
        occurrences: list[int] = []
        if job.recurrence is not None:
            occurrences = await self._api.call(c.PreviewJob(job.id, PREVIEW_OCCURRENCES))
        rule: Rule | None = await self._api.call(c.MatchRule(job.id))
        return self._page(
            request,
            "job.html",
            job=job,
            schedule=convert.schedule_to_json(job.recurrence) if job.recurrence else None,
            occurrences=occurrences,
            rule=rule,
            payload=payload_preview(job.payload),
            done=request.query_params.get("done"),
        )

    async def job_action(self, request: Request, role: Role) -> Response:
        form = await _form(request)
        job_id = str(form.get("id", ""))
        action = str(form.get("action", ""))
        if action not in ACTIONS:
            return self._error(request, 400, f"unknown action {action!r}")
        if not hmac.compare_digest(str(form.get("csrf", "")), self._csrf(request)):
            return self._error(
                request, 403, "the form is stale or came from another site: reload the page"
            )
        if not permitted(role, ACTIONS[action]):
            return self._error(request, 403, f"a {role.value} token may not {action} jobs")
        job: Job = await self._api.call(c.GetJob(job_id))
        at_text = str(form.get("at", ""))
        at_us: int | None = None
        if action == "replan":
            at_us = _parse_local_utc(at_text)
        if action in CONFIRMED and form.get("confirm") != "yes":
            return self._page(
                request, "confirm.html", job=job, action=action, at_text=at_text, at_us=at_us
            )
        if action == "delete":
            await self._api.call(c.DeleteJob(job.id))
            log.info("dashboard deleted a job", job=job.id, role=role.value)
            return RedirectResponse(
                "/jobs?" + urlencode({"deleted": job.id}), 303, headers=dict(SECURITY_HEADERS)
            )
        if action == "pause":
            await self._api.call(c.PauseJob(job.id))
        elif action == "resume":
            await self._api.call(c.ResumeJob(job.id))
        elif action == "run":
            if job.recurrence is not None:
                await self._api.call(c.RunJobNow(job.id))
            else:  # a one-shot job runs now by being planned now, payload kept
                await self._api.call(c.SetJob(job.id, now_us(), job.payload))
        else:
            assert at_us is not None
            await self._api.call(c.SetJob(job.id, at_us, job.payload))
        log.info("dashboard job action", job=job.id, action=action, role=role.value)
        return RedirectResponse(
            "/job?" + urlencode({"id": job.id, "done": action}), 303, headers=dict(SECURITY_HEADERS)
        )

    async def rules(self, request: Request, role: Role) -> Response:
        query = request.query_params
        prefix = query.get("prefix", "")
        after = query.get("after", "")
        answer: list[Rule] = await self._api.call(c.rule_page(prefix, after, RULE_PAGE))
        rules, next_after = c.next_rules_after(answer, RULE_PAGE)
        return self._page(
            request,
            "rules.html",
            rules=rules,
            prefix=prefix,
            after=after,
            first_url="/rules?" + urlencode({"prefix": prefix}),
            next_url=("/rules?" + urlencode({"prefix": prefix, "after": next_after}))
            if next_after
            else None,
        )

    async def rule(self, request: Request, role: Role) -> Response:
        rule: Rule = await self._api.call(c.GetRule(request.query_params.get("id", "")))
        page: c.JobPage = await self._api.call(c.ListJobs(prefix=rule.pattern, limit=RULE_JOBS))
        return self._page(
            request,
            "rule.html",
            rule=rule,
            described=convert.rule_to_json(rule),
            jobs=page.jobs,
            more=bool(page.next_after),
            jobs_url="/jobs?" + urlencode({"prefix": rule.pattern}),
        )

    async def events(self, request: Request, role: Role) -> Response:
        return self._page(
            request,
            "events.html",
            prefix=request.query_params.get("prefix", ""),
            statuses=[s.value for s in Status],
        )

    async def event_stream(self, request: Request, role: Role) -> Response:
        """The API's event stream (Api.events) for a cookie-authenticated browser:
        EventSource cannot send an Authorization header."""
        return await self._api.events(request)

    # -- sign in -------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        next_url = _local(request.query_params.get("next", "/"))
        if request.method == "GET":
            return self._page(request, "login.html", next_url=next_url, failed=False)
        try:
            form = await _form(request)
        except CommandError as error:
            return self._error(request, 400, error.message)
        token = str(form.get("token", "")).strip()
        next_url = _local(str(form.get("next", "/")))
        if not self._auth.required:
            return RedirectResponse(next_url, 303, headers=dict(SECURITY_HEADERS))
        if not token or self._auth.role_of(token) is None:
            return self._page(request, "login.html", 401, next_url=next_url, failed=True)
        response = RedirectResponse(next_url, 303, headers=dict(SECURITY_HEADERS))
        response.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    async def logout(self, request: Request) -> Response:
        try:
            form = await _form(request)
        except CommandError as error:
            return self._error(request, 400, error.message)
        if not hmac.compare_digest(str(form.get("csrf", "")), self._csrf(request)):
            return self._error(request, 403, "the form is stale: reload the page")
        response = RedirectResponse("/login", 303, headers=dict(SECURITY_HEADERS))
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def static(self, request: Request) -> Response:
        found = self._static.get(request.path_params["name"])
        if found is None:
            return Response(b"not found\n", 404, media_type="text/plain")
        body, media_type = found
        return Response(
            body,
            media_type=media_type,
            headers={"cache-control": "max-age=3600", "x-content-type-options": "nosniff"},
        )


MAX_FORM_BYTES = 512 << 10  # a form carrying the longest id (65,535 bytes), percent-encoded


async def _form(request: Request) -> dict[str, str]:
    """A POSTed `application/x-www-form-urlencoded` body (what the pages' forms send),
    at most MAX_FORM_BYTES (INVALID_ARGUMENT beyond): each field's first value."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise CommandError(ErrorCode.INVALID_ARGUMENT, "form too large")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def _load_static(directory: Path) -> dict[str, tuple[bytes, str]]:
    """Every file of static/ (a few KiB), read once: name -> (bytes, media type)."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file():
            media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            files[path.name] = (path.read_bytes(), media)
    return files


def _bounded_back(stack: list[str]) -> list[str]:
    """The newest tokens of `stack` that fit in MAX_BACK_CHARS (oldest dropped)."""
    size = 0
    for i in range(len(stack) - 1, -1, -1):
        size += len(stack[i]) + 6  # "&back=" (escapes aside)
        if size > MAX_BACK_CHARS:
            return stack[i + 1 :]
    return stack


def _local(target: str) -> str:
    """`target` if it is a path of this site, else "/" (no open redirect to another site)."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _parse_local_utc(text: str) -> int:
    """A form's `YYYY-MM-DDTHH:MM[:SS]` (datetime-local), read as UTC, in µs.
    INVALID_ARGUMENT when it is not such a time."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(
            ErrorCode.INVALID_ARGUMENT, f"not a time: {text[:100]!r} (YYYY-MM-DDTHH:MM, UTC)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


__all__ = ["Dashboard", "Markup", "PayloadPreview", "payload_preview"]
