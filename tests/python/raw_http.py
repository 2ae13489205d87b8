"""A raw HTTP/1.1 client for tests that need bytes no library sends: pipelined requests,
malformed heads, a client that leaves mid-request.

Usage: raw_http.py HOST:PORT STEPS_JSON

STEPS_JSON is a list of steps, each run in order on one connection:
  {"send": "...",            bytes to send (latin-1), all in one write
   "responses": n,           responses to read next; each is printed as "STATUS BODY"
                             (a chunked body's trailers follow as " trailers:NAME: VALUE,...")
   "read_until": "text",     read until the text has arrived, then print "got TEXT"
   "sleep": seconds,         pause before the next step
   "expect_close": true,     read until the peer closes, then print "closed"
   "leave": true}            close the connection and stop
"""

import json
import socket
import sys
import time

host, port = sys.argv[1].rsplit(":", 1)
steps = json.loads(sys.argv[2])
sock = socket.create_connection((host, int(port)), timeout=20)
pending = b""


def fill():
    global pending
    data = sock.recv(65536)
    if not data:
        raise EOFError
    pending += data


def take_line():
    global pending
    while b"\r\n" not in pending:
        fill()
    line, pending = pending.split(b"\r\n", 1)
    return line


def take(count):
    global pending
    while len(pending) < count:
        fill()
    data, pending = pending[:count], pending[count:]
    return data


def response():
    status = take_line().decode("latin-1").split(" ")[1]
    headers = {}
    while True:
        line = take_line().decode("latin-1")
        if not line:
            break
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    body = b""
    suffix = ""
    if "content-length" in headers:
        body = take(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        trailers = []
        while True:
            size = int(take_line().split(b";")[0], 16)
            if size == 0:
                while True:
                    line = take_line()
                    if not line:
                        break
                    trailers.append(line.decode("latin-1"))
                break
            body += take(size)
            take(2)
        if trailers:
            suffix = " trailers:" + ",".join(trailers)
    return f"{status} {body.decode('latin-1')}{suffix}"


for step in steps:
    if "send" in step:
        sock.sendall(step["send"].encode("latin-1"))
    for _ in range(step.get("responses", 0)):
        print(response(), flush=True)
    if "read_until" in step:
        while step["read_until"].encode("latin-1") not in pending:
            fill()
        print("got " + step["read_until"], flush=True)
    if step.get("sleep"):
        time.sleep(step["sleep"])
    if step.get("expect_close"):
        try:
            while True:
                fill()
        except (EOFError, ConnectionResetError):
            print("closed", flush=True)
    if step.get("leave"):
        sock.close()
        break
