"""The agent's OpenAPI 3.1 document, derived from the pydantic models in runtime.agent.schemas.

This module owns ``GET /openapi.json`` and its checked-in copy ``runtime/agent/openapi.json``
(for readers, client generators and API review). Regenerate the copy after changing a route or a
schema, and check it in CI::

    python -m runtime.agent.openapi           # rewrite runtime/agent/openapi.json
    python -m runtime.agent.openapi --check   # exit 1 if the file is stale

The test suite fails when the served document and the file differ.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from runtime.agent import schemas
from runtime.agent.models import ModelsReport, ModelStatus

__all__ = ["OPENAPI_PATH", "build_openapi", "render_openapi"]

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
API_VERSION = "1.0.0"
REF = "#/components/schemas/{model}"


class _Components:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def ref(self, model: type[BaseModel], mode: str = "serialization") -> dict[str, str]:
        schema = model.model_json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
        for name, definition in schema.pop("$defs", {}).items():
            self.schemas.setdefault(name, definition)
        self.schemas[model.__name__] = schema
        return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(components: _Components, *statuses: int) -> dict[str, Any]:
    error = components.ref(schemas.ErrorResponse)
    descriptions = {
        400: "Invalid request: malformed JSON, a wrong type or value (``param`` names it), an "
        "unsupported parameter, or a prompt too long for the context.",
        401: "Missing or invalid API key.",
        403: "The tenant may not use this model or pool (admin routes: the node has no fleet "
        "token).",
        404: "Unknown model.",
        413: "Request body larger than the node's limit.",
        429: "A tenant quota or monthly budget is exceeded (the message names it; code "
        "insufficient_quota when the fleet's monthly budget is spent); see Retry-After.",
        500: "Unexpected server error (details are in the server log only).",
        503: "Model loading (the node starting), being unloaded, failed to load, or not "
        "loadable now (the memory budget is held by busy models), node draining, overloaded (a "
        "sheddable request the fleet cannot serve in time), no instance able to take the "
        "request, or the peers it was forwarded to failed; see Retry-After.",
    }
    out: dict[str, Any] = {}
    for status in statuses:
        entry: dict[str, Any] = {"description": descriptions[status], "content": _json(error)}
        if status in (429, 503):
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer"},
                }
            }
        out[str(status)] = entry
    return out


def _completion_operation(
    components: _Components,
    summary: str,
    request: type[BaseModel],
    response: type[BaseModel],
    chunk: type[BaseModel],
    operation_id: str,
) -> dict[str, Any]:
    chunk_ref = components.ref(chunk)
    return {
        "operationId": operation_id,
        "summary": summary,
        "parameters": [
            {
                "name": "X-Priority",
                "in": "header",
                "required": False,
                "description": "SLO class name; defaults to the tenant's. A class more important "
                "than the tenant's max_priority is capped to it; the class used is returned in "
                "X-Fleetform-Priority.",
                "schema": {"type": "string"},
            },
            {
                "name": "X-Fleetform-Hops",
                "in": "header",
                "required": False,
                "description": "Between agents only: forwards so far. Needs "
                "X-Fleetform-Fleet-Token; such a request is not charged to the tenant's quota "
                "again (its origin charged it).",
                "schema": {"type": "integer", "minimum": 1},
            },
            {
                "name": "X-Fleetform-Fleet-Token",
                "in": "header",
                "required": False,
                "description": "Between agents only: the fleet token authenticating a forward.",
                "schema": {"type": "string"},
            },
            {
                "name": "X-Fleetform-Tried",
                "in": "header",
                "required": False,
                "description": "Between agents only: comma-separated instances already tried.",
                "schema": {"type": "string"},
            },
            {
                "name": "X-Fleetform-Version",
                "in": "header",
                "required": False,
                "description": "Between agents only (with X-Fleetform-Hops): the model variant "
                "a rollout's split sent the request to. A node whose slot for the model holds "
                "another variant serves that one and says so in the response header.",
                "schema": {"type": "string"},
            },
            {
                "name": "X-Fleetform-Shadow",
                "in": "header",
                "required": False,
                "description": "Between agents only (with X-Fleetform-Hops): 1 for a shadow "
                "copy of a request (shadow rollout), served but never billed.",
                "schema": {"type": "string", "enum": ["1"]},
            },
        ],
        "requestBody": {
            "required": True,
            "content": _json(components.ref(request, mode="validation")),
        },
        "responses": {
            "200": {
                "description": "The completion; with ``stream: true`` a text/event-stream of "
                "``data: <chunk JSON>`` events ending with ``data: [DONE]``.",
                "headers": {
                    "X-Fleetform-Priority": {
                        "description": "SLO class the request ran in.",
                        "schema": {"type": "string"},
                    },
                    "X-Request-Id": {"schema": {"type": "string"}},
                    "X-Fleetform-Served-By": {
                        "description": "Node that generated the completion (the request may "
                        "have been forwarded to a peer).",
                        "schema": {"type": "string"},
                    },
                    "X-Fleetform-Version": {
                        "description": "Model variant that generated the completion (under a "
                        "rollout, the version the traffic split chose).",
                        "schema": {"type": "string"},
                    },
                },
                "content": {
                    **_json(components.ref(response)),
                    "text/event-stream": {
                        "schema": {
                            "type": "string",
                            "description": f"Server-sent events, each carrying a "
                            f"{chunk.__name__} ({chunk_ref['$ref']}).",
                        }
                    },
                },
            },
            **_errors(components, 400, 401, 403, 404, 413, 429, 500, 503),
        },
    }


def _model_name_parameter() -> dict[str, Any]:
    return {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "A model of this node (its config's model or one of its models).",
        "schema": {"type": "string"},
    }


@functools.cache
def _build() -> str:
    c = _Components()
    text_plain = {"text/plain": {"schema": {"type": "string"}}}
    health = c.ref(schemas.HealthStatus)
    paths: dict[str, Any] = {
        "/v1/chat/completions": {
            "post": _completion_operation(
                c,
                "Chat completion (OpenAI-compatible)",
                schemas.ChatCompletionRequest,
                schemas.ChatCompletion,
                schemas.ChatCompletionChunk,
                "createChatCompletion",
            )
        },
        "/v1/completions": {
            "post": _completion_operation(
                c,
                "Text completion (OpenAI-compatible)",
                schemas.CompletionRequest,
                schemas.Completion,
                schemas.CompletionChunk,
                "createCompletion",
            )
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "summary": "Models this node serves that the caller may use",
                "responses": {
                    "200": {
                        "description": "Model list",
                        "content": _json(c.ref(schemas.ModelList)),
                    },
                    **_errors(c, 401, 500),
                },
            }
        },
        "/v1/usage": {
            "get": {
                "operationId": "getUsage",
                "summary": "The calling tenant's usage and quota state on this node",
                "responses": {
                    "200": {"description": "Usage", "content": _json(c.ref(schemas.UsageReport))},
                    **_errors(c, 401, 500),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness: the process answers",
                "security": [],
                "responses": {"200": {"description": "Alive", "content": _json(health)}},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness: model loaded and not draining",
                "security": [],
                "responses": {
                    "200": {"description": "Ready", "content": _json(health)},
                    "503": {"description": "Loading, draining or failed", "content": _json(health)},
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {"200": {"description": "Exposition format", "content": text_plain}},
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {"description": "OpenAPI 3.1", "content": _json({"type": "object"})}
                },
            }
        },
        "/admin/drain": {
            "post": {
                "operationId": "drain",
                "summary": "Start draining (e.g. on a spot interruption notice); needs the fleet "
                "token",
                "requestBody": {
                    "required": False,
                    "content": _json(c.ref(schemas.DrainRequest, mode="validation")),
                },
                "responses": {
                    "202": {
                        "description": "Draining",
                        "content": _json(c.ref(schemas.DrainStatus)),
                    },
                    **_errors(c, 400, 401, 403, 413, 500),
                },
            }
        },
        "/admin/models": {
            "get": {
                "operationId": "listModelSlots",
                "summary": "Every model this node can hold, with its state (unloaded, loading, "
                "ready, draining), memory and requests; needs the fleet token",
                "responses": {
                    "200": {
                        "description": "The node's models and memory",
                        "content": _json(c.ref(ModelsReport)),
                    },
                    **_errors(c, 401, 403, 500),
                },
            }
        },
        "/admin/models/{name}/load": {
            "post": {
                "operationId": "loadModel",
                "summary": "Load a model now, unloading idle models if the memory budget needs "
                "it; answers once it is loaded. Needs the fleet token",
                "parameters": [_model_name_parameter()],
                "responses": {
                    "200": {"description": "Loaded", "content": _json(c.ref(ModelStatus))},
                    **_errors(c, 401, 403, 404, 500, 503),
                },
            }
        },
        "/admin/models/{name}/unload": {
            "post": {
                "operationId": "unloadModel",
                "summary": "Unload a model: new requests for it get 503, those in flight finish "
                "(aborted after deadline_s, default the node's drain_timeout_s), then its memory "
                "is freed; answers once it is unloaded. Needs the fleet token",
                "parameters": [_model_name_parameter()],
                "requestBody": {
                    "required": False,
                    "content": _json(c.ref(schemas.DrainRequest, mode="validation")),
                },
                "responses": {
                    "200": {"description": "Unloaded", "content": _json(c.ref(ModelStatus))},
                    **_errors(c, 400, 401, 403, 404, 413, 500, 503),
                },
            }
        },
    }
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "Fleetform agent",
            "version": API_VERSION,
            "description": "OpenAI-compatible inference on one Fleetform node, with tenant "
            "quotas, priority classes, overload shedding, usage and metrics.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(c.schemas.items())),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A tenant API key (the fleet token for /admin routes).",
                }
            },
        },
    }
    return json.dumps(document, indent=2, sort_keys=False) + "\n"


def render_openapi() -> str:
    """The document as the text of ``openapi.json``."""
    return _build()


def build_openapi() -> dict[str, Any]:
    """The document as a (fresh) dict."""
    return json.loads(_build())  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate runtime/agent/openapi.json")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render_openapi()
    current = OPENAPI_PATH.read_text(encoding="utf-8") if OPENAPI_PATH.exists() else ""
    if args.check:
        if current != text:
            print(f"{OPENAPI_PATH} is stale: run python -m runtime.agent.openapi", file=sys.stderr)
            return 1
        return 0
    if current != text:
        OPENAPI_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {OPENAPI_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
