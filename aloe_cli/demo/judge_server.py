"""The demo's stand-in judge: an OpenAI-compatible server on 127.0.0.1 that grades by rule.

A real run points `aloe score` and `aloe eval --judge` at an LVLM served by vLLM or SGLang. No such
model fits a laptop demo, and a random-weight one replies nonsense, so the demo starts this server
instead and the two commands talk to it through their ordinary `openai` backend (same requests,
same reply parsing, same retries). It answers the two rubrics aloe sends:

- `aloe score`'s sample rubric: the conversation and its image come in the request; the server
  reads the truth back from the pixels (`aloe_cli.demo.rules.check_sample`) and replies
  `{"score": 5 | 1, "reason": ...}` (3 for a question the rule does not know, which the default
  threshold keeps);
- `aloe eval`'s open-answer rubric: question, reference and prediction; it replies
  `{"score": 0 | 0.5 | 1}` from `aloe_cli.demo.rules.grade_open`.

It grades only what a judge is shown (never the generator's `meta` marks), and names itself
`rule-judge (stand-in)` in every reply. Anything else gets a reply without a score, which the
commands count as unparseable rather than guess.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from aloe_cli.demo.rules import check_sample, grade_open

MODEL_NAME = "rule-judge"
_SAMPLE = re.compile(r"\nConversation:\n(?P<conversation>.*)\n\nReply with one line of JSON", re.DOTALL)
_OPEN = re.compile(r"Question: (?P<question>.*)\nReference answer: (?P<reference>.*)\nModel's answer: "
                   r"(?P<prediction>.*)\n\nScore the model's answer:", re.DOTALL)
_IMAGE_MARK = re.compile(r"\[image \d+\]\s*")


def _image(url: str) -> Image.Image | None:
    if not url.startswith("data:") or "," not in url:
        return None
    try:
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    except (ValueError, OSError):
        return None


def grade_request(text: str, image_urls: list[str]) -> dict | None:
    """The verdict for one judge prompt as the JSON object a judge replies, or None for an unknown prompt."""
    sample = _SAMPLE.search(text)
    if sample:
        conversation = sample["conversation"]
        user, _, answer = conversation.rpartition("\nAssistant: ")
        prompt = _IMAGE_MARK.sub("", user.removeprefix("User: "))
        image = _image(image_urls[0]) if image_urls else None
        verdict = check_sample(prompt, answer, image)
        score = verdict.score if verdict.score is not None else 3
        return {"score": score, "reason": f"{verdict.reason} [{MODEL_NAME} (stand-in)]"}
    graded = _OPEN.search(text)
    if graded:
        score = grade_open(graded["reference"].strip(), graded["prediction"].strip())
        return {"score": score, "reason": f"graded by rule [{MODEL_NAME} (stand-in)]"}
    return None


class _Handler(BaseHTTPRequestHandler):
    server_version = "aloe-demo-judge"

    def log_message(self, *args) -> None:  # requests are counted, not logged
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length))
            content = body["messages"][-1]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            self._send(400, {"error": {"message": "not a chat completion request"}})
            return
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        text = "".join(part.get("text", "") for part in parts if part.get("type") == "text")
        images = [part["image_url"]["url"] for part in parts if part.get("type") == "image_url"]
        verdict = grade_request(text, images)
        self.server.requests += 1  # type: ignore[attr-defined]
        reply = json.dumps(verdict) if verdict is not None else "This stand-in judge only knows aloe's rubrics."
        self._send(200, {
            "id": f"demo-{self.server.requests}", "object": "chat.completion", "created": int(time.time()),  # type: ignore[attr-defined]
            "model": MODEL_NAME,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        })

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class RuleJudgeServer:
    """`with RuleJudgeServer() as judge: ... judge.url ...` (http://127.0.0.1:PORT/v1), stopped on exit."""

    def __init__(self):
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.requests = 0  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-judge", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def requests(self) -> int:
        return self._server.requests  # type: ignore[attr-defined]

    def __enter__(self) -> RuleJudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


__all__ = ["MODEL_NAME", "RuleJudgeServer", "grade_request"]
