"""Serving a SegFormer: what the HTTP service (serve.py), the web demo (app.py) and the Ray deployment
(serving/ray_serving.py) share, so that the three answer alike.

    protocol.py  a request's image and options in, the answer out (the Hugging Face Inference API's
                 image-segmentation JSON, or a PNG), every refusal a `BadRequest` with its HTTP status
    batcher.py   dynamic batching: concurrent requests gathered into one forward pass

Like data/ and training/, this folder runs from the checkout beside the library; the web frameworks it is
used with (Starlette, Gradio, Ray) are optional extras (pyproject.toml: serve, demo, ray).
"""
