"""A local OpenAI-compatible captioning endpoint that knows ONLY lensforge's synthetic scenes.

It answers `POST /v1/chat/completions` (and the Files and Batch APIs) like OpenAI's gpt-4.1 family, so the offline
demo, the tests and the benchmark run through exactly the same `openai` client code as a real run. It is not a
vision model: it parses each image back into a scene with `scenes.parse` and writes the caption with
`scenes.describe`, at the density the prompt asks for. Any other image gets whatever the parser makes of it
(often an empty scene: "No objects on a plain white background."). Faults (429, 500, timeouts, malformed bodies,
refusals, truncation, empty answers) and latency are injected on demand, seeded and scriptable.

    lensforge serve-captioner --port 8001 --latency-s 0.2 --rate-429 0.05
    handle, base_url = start_endpoint(api_key="sk-test", script=["429", "ok"])   # tests: a background thread
    OpenAI(base_url=base_url, api_key="sk-test").chat.completions.create(...)
    handle.stop()

Modules: describe_request (request → caption → chat.completion), faults (settings and seeded draws), batches
(Files + Batch API), app (aiohttp routes), server (threads and the CLI's blocking serve).
"""

from captioning.endpoint.app import DEFAULT_MODELS, KEY_HEADER, make_app
from captioning.endpoint.faults import OUTCOMES, Faults
from captioning.endpoint.server import EndpointHandle, serve, start_endpoint

__all__ = ["DEFAULT_MODELS", "KEY_HEADER", "OUTCOMES", "EndpointHandle", "Faults", "make_app", "serve",
           "start_endpoint"]
