"""The OpenAPI 3.1 description of the chunk API, served at /openapi.json.

tus and the IETF draft are specified elsewhere and described by their own headers; this
covers the JSON API, whose shapes are this server's own.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from uploadsrv import __version__

from .chunks import PATH

_PROBLEM = {"$ref": "#/components/responses/Problem"}
_SESSION_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
}
_COUNT = {"type": "integer", "minimum": 0}


def _json(schema: str, description: str) -> dict[str, object]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


SPEC: dict[str, object] = {
    "openapi": "3.1.0",
    "info": {
        "title": "uploadsrv chunk API",
        "version": __version__,
        "description": (
            "Upload a file as numbered chunks (1-based), in any order and in parallel. Each chunk "
            "is stored once: the same bytes again succeed without effect, other bytes get 409. "
            "Complete assembles the chunks into one upload, downloadable at `upload_url` like any "
            "tus or IETF-draft upload. Errors are application/problem+json (RFC 9457)."
        ),
    },
    "paths": {
        PATH: {
            "post": {
                "summary": "Create a chunk session",
                "operationId": "createSession",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewSession"}}},
                },
                "responses": {
                    "201": {
                        **_json("Session", "The session; Location is its URL"),
                        "headers": {"Location": {"schema": {"type": "string"}}},
                    },
                    "400": _PROBLEM,
                    "413": _PROBLEM,
                },
            }
        },
        PATH + "{id}": {
            "parameters": [_SESSION_ID],
            "get": {
                "summary": "Status: stored chunks, bytes, fraction, missing ranges, expiry",
                "operationId": "getSession",
                "responses": {"200": _json("Session", "The session"), "404": _PROBLEM, "410": _PROBLEM},
            },
            "delete": {
                "summary": "Abort: delete the session and its stored chunks",
                "operationId": "abortSession",
                "responses": {"204": {"description": "Deleted"}, "404": _PROBLEM},
            },
        },
        PATH + "{id}/{n}": {
            "parameters": [
                _SESSION_ID,
                {"name": "n", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}},
            ],
            "put": {
                "summary": "Store chunk n",
                "description": (
                    "The body is the chunk's bytes: `chunk_size` of them, fewer only for the last "
                    "chunk. With `Content-Digest: sha-256=:...:` or `Content-MD5` the bytes are "
                    "verified and a mismatch stores nothing. A body cut off stores nothing."
                ),
                "operationId": "putChunk",
                "parameters": [
                    {"name": "Content-Digest", "in": "header", "schema": {"type": "string"}},
                    {"name": "Content-MD5", "in": "header", "schema": {"type": "string"}},
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                    },
                },
                "responses": {
                    "201": _json("Chunk", "Stored"),
                    "200": _json("Chunk", "Already stored with the same bytes; nothing changed"),
                    "400": _PROBLEM,
                    "404": _PROBLEM,
                    "409": _PROBLEM,
                    "410": _PROBLEM,
                    "413": _PROBLEM,
                    "423": _PROBLEM,
                    "503": _PROBLEM,
                    "507": _PROBLEM,
                },
            },
        },
        PATH + "{id}/complete": {
            "parameters": [_SESSION_ID],
            "post": {
                "summary": "Assemble the chunks into the finished upload (idempotent)",
                "operationId": "completeSession",
                "responses": {
                    "200": _json("Completed", "Complete; Location is the finished upload"),
                    "409": {
                        "description": "Chunks are missing; `missing` lists them as ranges",
                        "content": {
                            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                        },
                    },
                    "400": _PROBLEM,
                    "404": _PROBLEM,
                },
            },
        },
        PATH + "{id}/events": {
            "parameters": [_SESSION_ID],
            "get": {
                "summary": "Server-Sent Events of the session",
                "description": (
                    "`status` (the session, first), then `chunk` for each chunk stored, and one of "
                    "`completed`, `expired` or `aborted`, after which the stream ends."
                ),
                "operationId": "sessionEvents",
                "responses": {
                    "200": {
                        "description": "An event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "404": _PROBLEM,
                },
            },
        },
    },
    "components": {
        "schemas": {
            "NewSession": {
                "type": "object",
                "required": ["size"],
                "properties": {
                    "size": {**_COUNT, "description": "Total bytes of the file"},
                    "chunk_size": {
                        "type": "integer",
                        "minimum": 1,
                        "description": "A wish, adjusted (S3: 5 MiB or more; 10,000 chunks at most)",
                    },
                    "metadata": {"type": "object", "additionalProperties": {"type": ["string", "null"]}},
                    "sha256": {
                        "type": "string",
                        "pattern": "^[0-9a-f]{64}$",
                        "description": "Whole file, checked on completion",
                    },
                },
            },
            "Chunk": {
                "type": "object",
                "properties": {"number": {"type": "integer"}, "size": _COUNT, "sha256": {"type": "string"}},
            },
            "Session": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "url": {"type": "string", "format": "uri"},
                    "state": {"enum": ["incomplete", "complete"]},
                    "size": _COUNT,
                    "chunk_size": {"type": "integer"},
                    "chunk_count": _COUNT,
                    "chunk_url_template": {
                        "type": "string",
                        "description": "Replace {n} with the chunk number",
                    },
                    "complete_url": {"type": "string", "format": "uri"},
                    "events_url": {"type": "string", "format": "uri"},
                    "upload_url": {"type": "string", "format": "uri"},
                    "metadata": {"type": "object"},
                    "sha256": {"type": ["string", "null"]},
                    "expires_at": {"type": ["string", "null"], "format": "date-time"},
                    "chunks_stored": _COUNT,
                    "bytes_stored": _COUNT,
                    "fraction": {"type": "number", "minimum": 0, "maximum": 1},
                    "missing": {
                        "type": "array",
                        "items": {
                            "type": "array",
                            "items": {"type": "integer"},
                            "minItems": 2,
                            "maxItems": 2,
                        },
                        "description": "Missing chunk numbers as inclusive [first, last] ranges",
                    },
                    "chunks": {"type": "array", "items": {"$ref": "#/components/schemas/Chunk"}},
                },
            },
            "Completed": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "state": {"const": "complete"},
                    "size": _COUNT,
                    "sha256": {"type": ["string", "null"]},
                    "upload_url": {"type": "string", "format": "uri"},
                },
            },
            "Problem": {
                "type": "object",
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                },
            },
        },
        "responses": {
            "Problem": {
                "description": "An error (RFC 9457)",
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
            }
        },
    },
}


async def endpoint(request: Request) -> JSONResponse:
    return JSONResponse(SPEC)
