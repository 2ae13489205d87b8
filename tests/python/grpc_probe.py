"""A gRPC client (the real `grpcio`, HTTP/2 cleartext) for the end-to-end tests: calls the
echo.Echo service of grpc_echo_server.py (unary, server streaming, bidirectional ping-pong, a
method policy forbids, a slow method under a deadline) and prints one JSON line with what
happened, so the Rust test can assert on it.

Usage: grpc_probe.py HOST:PORT [SLOW_DEADLINE]
SLOW_DEADLINE: the deadline of the call to Slow (which sleeps 5 s), in seconds (default 1), or
"none" for a call without a deadline.
"""

import json
import queue
import sys
import time

import grpc

TIMEOUT = 15.0
CHAT_ROUNDS = 50


def rpc_error(error: grpc.RpcError) -> dict:
    return {"code": error.code().name, "details": error.details()}


def main() -> None:
    target = sys.argv[1]
    slow_deadline = sys.argv[2] if len(sys.argv) > 2 else "1"
    slow_timeout = None if slow_deadline == "none" else float(slow_deadline)
    report: dict = {}
    options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
    with grpc.insecure_channel(target, options=options) as channel:
        say = channel.unary_unary("/echo.Echo/Say")
        response, call = say.with_call(b"hello", timeout=TIMEOUT)
        report["say"] = {
            "response": response.decode(),
            "code": call.code().name,
            "trailers": {key: value for key, value in call.trailing_metadata()},
        }

        count = channel.unary_stream("/echo.Echo/Count")
        stream = count(b"100", timeout=TIMEOUT)
        report["count"] = {
            "messages": [message.decode() for message in stream],
            "code": stream.code().name,
        }

        # Ping-pong: each message is sent only after the answer to the previous one arrived,
        # so a proxy that held back either direction of the stream would stall the call.
        chat = channel.stream_stream("/echo.Echo/Chat")
        outbox: queue.Queue = queue.Queue()

        def requests():
            while True:
                message = outbox.get()
                if message is None:
                    return
                yield message

        outbox.put(b"0")
        answers = []
        replies = chat(requests(), timeout=TIMEOUT)
        for reply in replies:
            answers.append(reply.decode())
            if len(answers) == CHAT_ROUNDS:
                outbox.put(None)
            else:
                outbox.put(str(len(answers)).encode())
        report["chat"] = {"messages": answers, "code": replies.code().name}

        forbidden = channel.unary_unary("/echo.Echo/Forbidden")
        try:
            forbidden(b"please", timeout=TIMEOUT)
            report["forbidden"] = {"code": "OK"}
        except grpc.RpcError as error:
            report["forbidden"] = rpc_error(error)

        slow = channel.unary_unary("/echo.Echo/Slow")
        started = time.monotonic()
        try:
            slow(b"5", timeout=slow_timeout)
            report["slow"] = {"code": "OK"}
        except grpc.RpcError as error:
            report["slow"] = rpc_error(error)
        report["slow"]["seconds"] = time.monotonic() - started

        stats = channel.unary_unary("/echo.Echo/Stats")
        report["server"] = json.loads(stats(b"", timeout=TIMEOUT))
    print(json.dumps(report), flush=True)


main()
