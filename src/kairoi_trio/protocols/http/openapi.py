"""The OpenAPI 3.1 document of /api/v1, served at /api/v1/openapi.json.

Written here by hand, next to the routes it describes (api.py `Api.routes`);
tests/e2e/test_http_api.py checks that every served route and method is in it
and that it lists none that is not served.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

from kairoi_trio import __version__

_TIME = {"type": "string", "format": "date-time", "description": "RFC 3339, UTC on output"}
_SECONDS = {"type": "number", "minimum": 0, "description": "seconds"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthenticated"},
    "403": {"$ref": "#/components/responses/PermissionDenied"},
    "429": {"$ref": "#/components/responses/Busy"},
    "503": {"$ref": "#/components/responses/Unavailable"},
}
_NOT_FOUND = {"404": {"$ref": "#/components/responses/NotFound"}}
_CONFLICT = {"409": {"$ref": "#/components/responses/Conflict"}}
_TOO_LARGE = {"413": {"$ref": "#/components/responses/TooLarge"}}

_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "the id, percent-encoded (a / in it as %2F)",
    "schema": {"type": "string", "minLength": 1},
}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_PAGE = [
    _query("prefix", {"type": "string"}, "only ids starting with this"),
    _query(
        "page_size", {"type": "integer", "minimum": 0}, "0 or absent: the default; capped at 1000"
    ),
    _query("page_token", {"type": "string"}, "next_page_token of the previous page"),
]


def _operation(
    operation_id: str,
    summary: str,
    ok: dict[str, Any],
    errors: dict[str, Any],
    *,
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    role: str = "read",
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "description": f"Needs {'an' if role[0] in 'aeiou' else 'a'} {role} token (or better)"
        " when tokens are configured.",
        "responses": {**ok, **_ERRORS, **errors},
    }
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    return operation


def _job_action(operation_id: str, summary: str) -> dict[str, Any]:
    return {
        "post": _operation(
            operation_id,
            summary,
            {"200": _json(_ref("Job"), "the job")},
            {**_NOT_FOUND, **_CONFLICT},
            parameters=[_ID],
            role="client",
        )
    }


def document() -> dict[str, Any]:
    """The whole document, as a JSON-ready dict."""
    schedule = {
        "type": "object",
        "required": ["expression"],
        "properties": {
            "expression": {"type": "string", "description": "cron, @daily, every 15m or PT15M"},
            "time_zone": {"type": "string", "default": "UTC"},
            "start": _nullable(_TIME),
            "end": _nullable(_TIME),
            "max_runs": _nullable({"type": "integer", "minimum": 0}),
            "jitter_s": _SECONDS,
            "misfire": {"enum": ["coalesce", "all", "skip"]},
            "catchup_window_s": _nullable(_SECONDS),
            "overlap": {"enum": ["skip", "buffer_one"]},
            "paused": {"type": "boolean", "readOnly": True},
            "runs": {"type": "integer", "readOnly": True},
            "skipped": {"type": "integer", "readOnly": True},
            "scheduled_at": {**_TIME, "readOnly": True},
        },
    }
    job = {
        "type": "object",
        "required": ["id", "status", "execute_at", "payload", "attempts", "last_outcome"],
        "properties": {
            "id": {"type": "string"},
            "status": {"enum": ["planned", "triggered", "executed", "failed"]},
            "execute_at": _TIME,
            "payload": {"type": "string", "contentEncoding": "base64"},
            "attempts": {"type": "integer"},
            "last_outcome": {"type": "string"},
            "updated_at": _nullable(_TIME),
            "schedule": _nullable(_ref("Schedule")),
        },
    }
    set_job = {
        "type": "object",
        "additionalProperties": False,
        "description": "execute_at for a one-shot job, or schedule for a recurring one",
        "properties": {
            "execute_at": _TIME,
            "payload": {"type": "string", "contentEncoding": "base64"},
            "schedule": _ref("Schedule"),
        },
    }
    runner = {
        "oneOf": [
            {
                "type": "object",
                "required": ["kind", "command"],
                "properties": {"kind": {"const": "shell"}, "command": {"type": "string"}},
            },
            {
                "type": "object",
                "required": ["kind", "dsn"],
                "properties": {
                    "kind": {"const": "amqp"},
                    "dsn": {"type": "string"},
                    "exchange": {"type": "string"},
                    "routing_key": {"type": "string"},
                },
            },
            {
                "type": "object",
                "required": ["kind", "url"],
                "properties": {"kind": {"const": "http"}, "url": {"type": "string"}},
            },
        ]
    }
    policy = {
        "type": "object",
        "properties": {
            "timeout_s": _nullable(_SECONDS),
            "max_attempts": {"type": "integer", "minimum": 1, "maximum": 1000},
            "backoff_initial_s": _SECONDS,
            "backoff_max_s": _SECONDS,
            "stale_after_s": _nullable(_SECONDS),
        },
    }
    rule = {
        "type": "object",
        "required": ["id", "pattern", "runner", "policy"],
        "properties": {
            "id": {"type": "string"},
            "pattern": {"type": "string"},
            "runner": _ref("Runner"),
            "policy": _ref("Policy"),
        },
    }
    set_rule = {
        "type": "object",
        "additionalProperties": False,
        "required": ["pattern", "runner"],
        "properties": {
            "pattern": {"type": "string"},
            "runner": _ref("Runner"),
            "policy": _ref("Policy"),
        },
    }
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    }
    info = {
        "type": "object",
        "properties": {
            "version": {"type": "string"},
            "started_at": _TIME,
            "jobs": {
                "type": "object",
                "properties": {
                    name: {"type": "integer"}
                    for name in ("planned", "triggered", "executed", "failed")
                },
            },
            "rules": {"type": "integer"},
        },
    }

    def page(items: str, schema: str) -> dict[str, Any]:
        return {
            "type": "object",
            "required": [items, "next_page_token"],
            "properties": {
                items: {"type": "array", "items": _ref(schema)},
                "next_page_token": {"type": "string", "description": "empty: the last page"},
            },
        }

    def error_response(description: str) -> dict[str, Any]:
        return _json(_ref("Error"), description)

    paths = {
        "/jobs": {
            "get": _operation(
                "listJobs",
                "Jobs by id prefix and status, in id order",
                {"200": _json(page("jobs", "Job"), "a page of jobs")},
                {},
                parameters=[
                    *_PAGE,
                    _query(
                        "status",
                        {"enum": ["planned", "triggered", "executed", "failed"]},
                        "only jobs in this status",
                    ),
                ],
            )
        },
        "/jobs/{id}": {
            "get": _operation(
                "getJob",
                "One job",
                {"200": _json(_ref("Job"), "the job")},
                _NOT_FOUND,
                parameters=[_ID],
            ),
            "put": _operation(
                "setJob",
                "Create or replace a job (one-shot, or recurring with a schedule)",
                {"200": _json(_ref("Job"), "the job as stored")},
                {**_CONFLICT, **_TOO_LARGE},
                parameters=[_ID],
                body=set_job,
                role="client",
            ),
            "delete": _operation(
                "deleteJob",
                "Delete a job",
                {"204": {"description": "deleted"}},
                {**_NOT_FOUND, **_CONFLICT},
                parameters=[_ID],
                role="client",
            ),
        },
        "/jobs/{id}/pause": _job_action("pauseJob", "Stop a recurring job from firing"),
        "/jobs/{id}/resume": _job_action("resumeJob", "Let a paused recurring job fire again"),
        "/jobs/{id}/run": _job_action("runJobNow", "Run a recurring job once now"),
        "/jobs/{id}/preview": {
            "get": _operation(
                "previewJob",
                "The coming occurrences of a recurring job",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {"occurrences": {"type": "array", "items": _TIME}},
                        },
                        "the occurrences, in order",
                    )
                },
                {**_NOT_FOUND, **_CONFLICT},
                parameters=[
                    _ID,
                    _query(
                        "count", {"type": "integer", "minimum": 1, "maximum": 1000}, "default 5"
                    ),
                ],
            )
        },
        "/rules": {
            "get": _operation(
                "listRules",
                "Rules by id prefix, in id order",
                {"200": _json(page("rules", "Rule"), "a page of rules")},
                {},
                parameters=_PAGE,
            )
        },
        "/rules/{id}": {
            "get": _operation(
                "getRule",
                "One rule",
                {"200": _json(_ref("Rule"), "the rule")},
                _NOT_FOUND,
                parameters=[_ID],
            ),
            "put": _operation(
                "setRule",
                "Create or replace a rule",
                {"200": _json(_ref("Rule"), "the rule as stored")},
                _TOO_LARGE,
                parameters=[_ID],
                body=set_rule,
                role="admin",
            ),
            "delete": _operation(
                "deleteRule",
                "Delete a rule",
                {"204": {"description": "deleted"}},
                _NOT_FOUND,
                parameters=[_ID],
                role="admin",
            ),
        },
        "/info": {
            "get": _operation(
                "getInfo",
                "Version, start time, job counts by status, rule count",
                {"200": _json(info, "the server")},
                {},
            )
        },
        "/events": {
            "get": _operation(
                "watchJobs",
                "Job changes as Server-Sent Events (event: planned, triggered, executed, "
                "failed, deleted; ready once registered; error at the end)",
                {
                    "200": {
                        "description": "an event stream; each data line is a JSON object "
                        '{"type", "job", "at", "snapshot"}',
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    }
                },
                {},
                parameters=[
                    _query("prefix", {"type": "string"}, "only jobs whose id starts with this"),
                    _query("snapshot", {"type": "boolean"}, "first an event per matching job"),
                ],
            )
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "kairoi-trio", "version": __version__, "description": "docs/http-api.md"},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Job": job,
                "Schedule": schedule,
                "Rule": rule,
                "Runner": runner,
                "Policy": policy,
                "Error": error,
            },
            "responses": {
                "BadRequest": error_response(
                    "invalid_argument: a bad id, time, payload, field or query"
                ),
                "Unauthenticated": error_response("unauthenticated: no or unknown token"),
                "PermissionDenied": error_response("permission_denied: the token's role may not"),
                "NotFound": error_response("not_found: no such job or rule"),
                "Conflict": error_response(
                    "failed_precondition: e.g. the job is triggered (a run is in flight)"
                ),
                "TooLarge": error_response("payload_too_large: body above [http] max_body_bytes"),
                "Busy": error_response(
                    "resource_exhausted: the server's queue is full; retry with backoff"
                ),
                "Unavailable": error_response("unavailable: storage writes fail, or shutting down"),
            },
        },
    }


@functools.cache
def document_bytes() -> bytes:
    return orjson.dumps(document())
