"""A small OpenAI-compatible chat-completions server on 127.0.0.1, for tests and benchmarks.

It answers POST /v1/chat/completions like a judge would: the score is taken
from a `[score=N]` marker in the prompt (default 4), as JSON
`{"score": N, "reason": ...}` or, with `style="line"`, as `Score: N` lines.
Behaviour is scripted per request number, so tests can ask for failures:

    with FakeOpenAIServer(delay=0.05, script=[500, "ok"]) as server:   # first request 500, then 200
        ... server.url ...                                              # http://127.0.0.1:PORT/v1
        server.prompts()                                                # prompt texts received, in order

Script actions: "ok", an HTTP status (e.g. 500, 429, 401), "garbage" (a 200
whose reply holds no score), "malformed" (a 200 whose body is not a chat
completion), "hang" (no answer until `hang_seconds` pass or the server stops:
for timeout tests), "trickle" (a valid reply with score 1, one byte every
`trickle_interval` seconds: a server that never stalls long enough for a read
timeout), "drop" (the connection is closed without an answer). Requests past
the script get `default` (itself an action, "ok" unless set); an `[action=X]`
marker in the prompt overrides both, so one record can misbehave whatever the
order of requests. An `[answer=TEXT]` marker (in a prompt without a score
marker) makes the reply TEXT: a model being evaluated, answering what the
test wants. Every request is logged with the Authorization header it
carried.

Other knobs: `retry_after` (the Retry-After header of 429 answers),
`refuse_fields` (answer 400 to a body holding any of these fields, like a
server that does not know `guided_json`), `echo_key` (every reply and error
message repeats the Authorization header it got: a server that leaks the key).

Standalone, for benchmarks:

    python tests/fake_openai_server.py --delay 0.05      # prints the base URL, serves until killed
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SCORE_MARKER = re.compile(r"\[score=(\d+)\]")
ACTION_MARKER = re.compile(r"\[action=(\w+)\]")
ANSWER_MARKER = re.compile(r"\[answer=([^\]]*)\]")  # a model under evaluation answers what the marker says
GARBAGE_REPLY = "I am sorry, but I cannot rate this sample without more context."


@dataclass
class LoggedRequest:
    number: int
    body: dict
    authorization: str | None
    action: Any

    @property
    def prompt(self) -> str:
        content = self.body["messages"][-1]["content"]
        if isinstance(content, str):
            return content
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")

    @property
    def images(self) -> list[str]:
        content = self.body["messages"][-1]["content"]
        if isinstance(content, str):
            return []
        return [part["image_url"]["url"] for part in content if part.get("type") == "image_url"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # hundreds of clients connect at once in the concurrency benchmarks


class FakeOpenAIServer:
    def __init__(self, *, delay: float = 0.0, script: list | None = None, default: Any = "ok", style: str = "json",
                 hang_seconds: float = 30.0, trickle_interval: float = 0.05, retry_after: str = "0",
                 refuse_fields: tuple[str, ...] = (), echo_key: bool = False, port: int = 0):
        self.delay = delay
        self.trickle_interval = trickle_interval
        self.retry_after = retry_after
        self.refuse_fields = refuse_fields
        self.echo_key = echo_key
        self.script = list(script or [])
        self.default = default
        self.style = style
        self.hang_seconds = hang_seconds
        self.requests: list[LoggedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests the server was answering at one moment
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", port), _handler_for(self))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def prompts(self) -> list[str]:
        with self._lock:
            return [request.prompt for request in self.requests]

    # -- called by the handler threads
    def next_action(self, body: dict, authorization: str | None) -> Any:
        with self._lock:
            number = len(self.requests)
            action = self.script[number] if number < len(self.script) else self.default
            refused = [name for name in self.refuse_fields if name in body]
            marker = ACTION_MARKER.search(LoggedRequest(number, body, None, None).prompt)
            if refused:
                action = 400
            elif marker:
                action = int(marker.group(1)) if marker.group(1).isdigit() else marker.group(1)
            self.requests.append(LoggedRequest(number, body, authorization, action))
        return action

    def reply_text(self, body: dict, garbage: bool, authorization: str | None, score: int | None = None) -> str:
        echo = f" You sent {authorization}." if self.echo_key else ""
        if garbage:
            return GARBAGE_REPLY + echo
        match = SCORE_MARKER.search(LoggedRequest(0, body, None, None).prompt)
        answer = ANSWER_MARKER.search(LoggedRequest(0, body, None, None).prompt)
        if answer and not match and score is None:
            return answer.group(1) + echo
        score = score if score is not None else int(match.group(1)) if match else 4
        if self.style == "line":
            return f"Score: {score}\nReason: the fake judge read the marker.{echo}"
        return json.dumps({"score": score, "reason": "The fake judge read the marker." + echo})

    def hang(self) -> None:
        self._stopping.wait(self.hang_seconds)


def _handler_for(fake: FakeOpenAIServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like real servers
        disable_nagle_algorithm = True  # headers and body go out at once, as with real servers

        def do_POST(self) -> None:
            body = self._read_json()
            if body is None:
                self._send(400, {"error": {"message": "body is not JSON"}})
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            authorization = self.headers.get("Authorization")
            action = fake.next_action(body, authorization)
            with fake._lock:
                fake.in_flight += 1
                fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            try:
                self._answer(body, action, authorization)
            finally:
                with fake._lock:
                    fake.in_flight -= 1

        def _answer(self, body: dict, action: Any, authorization: str | None) -> None:
            if fake.delay:
                time.sleep(fake.delay)
            if action == "hang":
                fake.hang()
                action = "ok"
            if action == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if isinstance(action, int):
                headers = {"Retry-After": fake.retry_after} if action == 429 else {}
                echo = f" (you sent {authorization})" if fake.echo_key else ""
                self._send(action, {"error": {"message": f"scripted failure {action}{echo}"}}, headers)
                return
            if action == "malformed":
                self._send(200, {"id": "chatcmpl-fake", "choices": []})
                return
            text = fake.reply_text(body, action == "garbage", authorization, score=1 if action == "trickle" else None)
            reply = {"id": "chatcmpl-fake", "object": "chat.completion", "model": body.get("model"),
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}]}
            if action == "trickle":
                self._trickle(json.dumps(reply).encode())
            else:
                self._send(200, reply)

        def _trickle(self, data: bytes) -> None:
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.flush()
                for position in range(len(data)):
                    if fake._stopping.wait(fake.trickle_interval):
                        return
                    self.wfile.write(data[position:position + 1])
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up: what the test wants
                pass

        def _read_json(self) -> dict | None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                return json.loads(self.rfile.read(length) or b"null")
            except ValueError:
                return None

        def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                pass

        def log_message(self, *args) -> None:  # quiet
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible judge server (tests, benchmarks).")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--style", choices=("json", "line"), default="json")
    args = parser.parse_args(argv)
    server = FakeOpenAIServer(delay=args.delay, port=args.port, style=args.style)
    print(server.url, flush=True)
    try:
        server._server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
