"""A gRPC server (the real `grpcio`, HTTP/2 cleartext) for the end-to-end tests. The service is
written with generic handlers and raw-bytes messages, so no protoc step is needed.

Usage: grpc_echo_server.py PORT
Service echo.Echo:
  Say (unary)             -> b"echo:" + request; sets the trailer x-echo-trailer: done
  Count (server stream)   request = ASCII n -> n messages b"0" .. b"n-1"
  Chat (bidi stream)      each message -> b"chat:" + message, as it arrives
  Slow (unary)            request = ASCII seconds; sleeps that long (or until cancelled)
  Forbidden (unary)       policy should keep callers away from it
  Stats (unary)           -> JSON: calls per method, deadlines seen by Slow (seconds left)
"""

import json
import sys
import threading
import time
from concurrent import futures

import grpc

calls: dict = {}
slow_deadlines: list = []
lock = threading.Lock()


def count(method: str) -> None:
    with lock:
        calls[method] = calls.get(method, 0) + 1


def say(request: bytes, context) -> bytes:
    count("Say")
    context.set_trailing_metadata((("x-echo-trailer", "done"),))
    return b"echo:" + request


def count_up(request: bytes, context):
    count("Count")
    for index in range(int(request.decode())):
        yield str(index).encode()


def chat(requests, context):
    count("Chat")
    for message in requests:
        yield b"chat:" + message


def slow(request: bytes, context) -> bytes:
    count("Slow")
    with lock:
        slow_deadlines.append(context.time_remaining())
    deadline = time.monotonic() + float(request.decode())
    while time.monotonic() < deadline and context.is_active():
        time.sleep(0.05)
    return b"slept"


def forbidden(request: bytes, context) -> bytes:
    count("Forbidden")
    return b"you should not see this"


def stats(request: bytes, context) -> bytes:
    with lock:
        return json.dumps({"calls": calls, "slow_deadlines": slow_deadlines}).encode()


HANDLERS = {
    "Say": grpc.unary_unary_rpc_method_handler(say),
    "Count": grpc.unary_stream_rpc_method_handler(count_up),
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
    "Slow": grpc.unary_unary_rpc_method_handler(slow),
    "Forbidden": grpc.unary_unary_rpc_method_handler(forbidden),
    "Stats": grpc.unary_unary_rpc_method_handler(stats),
}


if __name__ == "__main__":
    port = int(sys.argv[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", HANDLERS),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()
