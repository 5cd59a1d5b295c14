"""The HTTP service as a Starlette application: the routes, reading a request within its limits, and every
refusal as `{"error": "<one line>"}` with a 4xx status (a bug is a 500 in the same form, and is logged).

    GET  /health     200 {"status": "ok"} once the model has answered a warm-up image; 503 while shutting down
    GET  /metadata   classes (id2label), input size, runtime, device, batching settings and counts, limits
    POST /predict    the image -> serving.protocol's answer (JSON segments, or a PNG)

Ray Serve's ingress takes a Starlette request too: serving/ray_serving.py answers it with `answer_predict`.
"""

import asyncio
import contextlib
import logging

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from segformer.inference import NonFiniteLogits

from .batcher import Batcher, QueueFull
from .protocol import BadRequest, Limits, body_kind, decode_image, parse_options
from .segmenter import PLAIN_IMAGE

log = logging.getLogger("serve")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_body(request: Request, limit: int, said: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit` bytes, whatever its Content-Length claims; the
    error says the service's limit for an image, `said`."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"the body is {declared} bytes; this service takes images of at most {said}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"the body is over {limit} bytes; this service takes images of at most {said}")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_request(request: Request, limits: Limits, *, default_mode: str):
    """(the image's bytes, Options) of a POST /predict, or a BadRequest."""
    options = parse_options(list(request.query_params.multi_items()), request.headers.get("accept"),
                            default_mode=default_mode)
    kind = body_kind(request.headers.get("content-type"))
    form_bytes = 64 * 1024 if kind == "multipart" else 0  # a form's own bytes on top of the image's
    body = await read_body(request, limits.max_bytes + form_bytes, limits.max_bytes)
    if kind == "raw":
        return body, options
    replay = Request(request.scope, receive=replaying(body))  # the form parser reads the body we hold
    try:
        async with replay.form(max_files=1, max_fields=8) as form:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise BadRequest(400, f"the multipart form has no file field 'image' (fields: "
                                      f"{', '.join(form.keys()) or 'none'})")
            return await upload.read(), options
    except HTTPException as e:  # a malformed form
        raise BadRequest(400, f"the multipart form cannot be read: {e.detail}") from None


def replaying(body: bytes):
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    return receive


async def answer_predict(request: Request, segmenter, limits: Limits, submit) -> Response:
    """A POST /predict answered: `await submit(mode, image)` gives the image's prediction (the batcher's,
    or Ray Serve's batch); every refusal is a JSON error with its 4xx (503: full, or out of memory)."""
    try:
        data, options = await read_request(request, limits, default_mode=segmenter.default_mode)
        segmenter.check_mode(options.mode)
        image = await asyncio.to_thread(decode_image, data, limits)
    except BadRequest as e:
        return error(e.status, str(e))
    try:
        prediction = await submit(options.mode, image)
    except QueueFull as e:
        return error(503, str(e))
    except NonFiniteLogits as e:  # no answer made of NaN: this image, not the service
        return error(422, f"this image: {e}")
    except (MemoryError, torch.OutOfMemoryError):  # this image alone: the others in its batch were answered
        return error(503, f"out of memory for this {image.width} x {image.height} image in mode={options.mode}; "
                          f"send a smaller image, or mode=resize")
    body = await asyncio.to_thread(segmenter.respond, prediction, image, options)
    return Response(body, media_type=options.media_type)


def build_app(segmenter, batcher: Batcher, limits: Limits) -> Starlette:
    """The service: `batcher` runs `segmenter.predict` on gathered requests."""
    state = {"ready": False}

    async def health(request):
        if not (state["ready"] and batcher.alive):
            return error(503, "the model is not answering (starting or shutting down)")
        return JSONResponse({"status": "ok"})

    async def metadata(request):
        return JSONResponse({**segmenter.metadata(), "batching": {**batcher.settings(), **batcher.stats()},
                             "limits": limits.describe()})

    async def predict(request):
        return await answer_predict(request, segmenter, limits, batcher.submit)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        # the first forward pass (allocations, kernels) before the first client's
        await batcher.submit(segmenter.default_mode, PLAIN_IMAGE)
        batcher.sizes.clear()
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.stop()

    async def not_found(request, exc):
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}; the service has "
                                      f"GET /health, GET /metadata and POST /predict")

    async def bug(request, exc):
        log.exception("a request failed", exc_info=exc)
        return error(500, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")

    routes = [Route("/health", health, methods=["GET"]), Route("/metadata", metadata, methods=["GET"]),
              Route("/predict", predict, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found, Exception: bug})
