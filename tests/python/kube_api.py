"""The pod part of a Kubernetes API server, for the agent's pod enrolment tests.

No kube-apiserver can be installed from the registries the tests reach, so this serves the
one resource the agent and the signer read, with the API's real wire behaviour: HTTPS, bearer
tokens (re-read from a file for every request, so a test can rotate them), `GET /api/v1/pods`
and `GET /api/v1/namespaces/<ns>/pods` with field selectors (`=`, `==`, `!=` on the fields
the real API lets pods be selected by; any other field is `400 field label not supported`) and
equality `labelSelector`s, and watches from a `resourceVersion` streamed as chunked JSON lines
(ADDED, MODIFIED, DELETED, BOOKMARK), with `410 Gone` as an ERROR event when the version is
older than the retained history.

A plain-HTTP control port on loopback lets the test change the pods:
  PUT    /pods          a pod object (JSON); ADDED or MODIFIED
  DELETE /pods/<uid>    DELETED
  POST   /compact       forget the event history (the next resumed watch gets 410)
  POST   /drop-watches  end every open watch (as an API server restart would)
  POST   /stall         hold every API request without an answer (a hung API server)
  POST   /unstall       answer again (held requests go on)
  GET    /requests      the request lines the API port saw (JSON list)

Usage: kube_api.py PORT --control-port N --cert F --key F --token-file F
"""

import argparse
import copy
import json
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

lock = threading.Condition()
pods = {}  # uid -> pod
events = []  # (resourceVersion:int, type, pod)
state = {"version": 100, "oldest": 100, "generation": 0, "stalled": False}
requests_seen = []


def bump(kind, pod):
    state["version"] += 1
    pod = copy.deepcopy(pod)
    pod.setdefault("metadata", {})["resourceVersion"] = str(state["version"])
    events.append((state["version"], kind, pod))
    lock.notify_all()
    return pod


# The pod fields the real API server selects by (pkg/registry/core/pod: ToSelectableFields).
POD_FIELDS = {
    "metadata.name": lambda p: p.get("metadata", {}).get("name", ""),
    "metadata.namespace": lambda p: p.get("metadata", {}).get("namespace", ""),
    "spec.nodeName": lambda p: p.get("spec", {}).get("nodeName", ""),
    "spec.restartPolicy": lambda p: p.get("spec", {}).get("restartPolicy", ""),
    "spec.schedulerName": lambda p: p.get("spec", {}).get("schedulerName", ""),
    "spec.serviceAccountName": lambda p: p.get("spec", {}).get("serviceAccountName", ""),
    "spec.hostNetwork": lambda p: "true" if p.get("spec", {}).get("hostNetwork") else "false",
    "status.phase": lambda p: p.get("status", {}).get("phase", ""),
    "status.podIP": lambda p: p.get("status", {}).get("podIP", ""),
    "status.nominatedNodeName": lambda p: p.get("status", {}).get("nominatedNodeName", ""),
}


class BadSelector(Exception):
    pass


def matches(pod, namespace, fields, labels):
    if namespace is not None and pod.get("metadata", {}).get("namespace") != namespace:
        return False
    for field, equal, value in fields:
        if (POD_FIELDS[field](pod) == value) != equal:
            return False
    have = pod.get("metadata", {}).get("labels", {}) or {}
    return all(have.get(k) == v for k, v in labels.items())


def parse_selectors(query):
    fields = []
    for term in query.get("fieldSelector", [""])[0].split(","):
        if not term:
            continue
        if "!=" in term:
            field, value = term.split("!=", 1)
            equal = False
        elif "=" in term:
            field, value = term.split("==", 1) if "==" in term else term.split("=", 1)
            equal = True
        else:
            raise BadSelector(f"invalid selector: '{term}'; can't understand '{term}'")
        if field not in POD_FIELDS:
            raise BadSelector(f'field label not supported: {field}')
        fields.append((field, equal, value))
    labels = {}
    for label in query.get("labelSelector", [""])[0].split(","):
        if "=" in label:
            key, value = label.split("=", 1)
            labels[key.strip()] = value.strip()
    return fields, labels


class Api(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    token_file = None

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def chunk(self, obj):
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self):
        with lock:
            requests_seen.append(self.path)
            while state["stalled"]:
                lock.wait()
        with open(Api.token_file) as f:
            token = f.read().strip()
        if self.headers.get("authorization") != f"Bearer {token}":
            return self.reply(401, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "message": "Unauthorized", "reason": "Unauthorized",
                                    "code": 401})
        url = urllib.parse.urlparse(self.path)
        parts = url.path.split("/")
        if url.path == "/api/v1/pods":
            namespace = None
        elif len(parts) == 6 and parts[:4] == ["", "api", "v1", "namespaces"] \
                and parts[4] and parts[5] == "pods":
            namespace = urllib.parse.unquote(parts[4])
        else:
            return self.reply(404, {"kind": "Status", "code": 404, "message": "not found"})
        query = urllib.parse.parse_qs(url.query)
        try:
            fields, labels = parse_selectors(query)
        except BadSelector as problem:
            return self.reply(400, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "message": str(problem), "reason": "BadRequest",
                                    "code": 400})
        if query.get("watch", ["0"])[0] not in ("1", "true"):
            with lock:
                items = [copy.deepcopy(p) for p in pods.values()
                         if matches(p, namespace, fields, labels)]
                version = state["version"]
            return self.reply(
                200,
                {"kind": "PodList", "apiVersion": "v1",
                 "metadata": {"resourceVersion": str(version)}, "items": items},
            )
        since = int(query.get("resourceVersion", ["0"])[0] or 0)
        timeout = int(query.get("timeoutSeconds", ["300"])[0])
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + timeout
        with lock:
            generation = state["generation"]
            if since < state["oldest"]:
                self.chunk({"type": "ERROR", "object": {
                    "kind": "Status", "code": 410, "reason": "Expired",
                    "message": f"too old resource version: {since} ({state['oldest']})"}})
                self.wfile.write(b"0\r\n\r\n")
                return
        sent = since
        while True:
            with lock:
                pending = [e for e in events if e[0] > sent]
                if not pending:
                    lock.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                    pending = [e for e in events if e[0] > sent]
                dropped = state["generation"] != generation
            if dropped or time.monotonic() >= deadline:
                self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True
                return
            for version, kind, pod in pending:
                sent = version
                if matches(pod, namespace, fields, labels):
                    self.chunk({"type": kind, "object": pod})
            if not pending and query.get("allowWatchBookmarks", ["false"])[0] == "true":
                self.chunk({"type": "BOOKMARK", "object": {
                    "kind": "Pod", "metadata": {"resourceVersion": str(sent)}}})


class Control(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        length = int(self.headers.get("content-length", "0"))
        return json.loads(self.rfile.read(length) or b"null")

    def do_PUT(self):
        pod = self.body()
        with lock:
            uid = pod["metadata"]["uid"]
            kind = "MODIFIED" if uid in pods else "ADDED"
            pods[uid] = bump(kind, pod)
        self.reply(200, {"type": kind, "resourceVersion": pods[uid]["metadata"]["resourceVersion"]})

    def do_DELETE(self):
        uid = self.path.rsplit("/", 1)[-1]
        with lock:
            pod = pods.pop(uid, None)
            if pod is not None:
                bump("DELETED", pod)
        self.reply(200 if pod else 404, {"deleted": pod is not None})

    def do_POST(self):
        with lock:
            if self.path == "/compact":
                events.clear()
                state["oldest"] = state["version"] + 1
            elif self.path == "/drop-watches":
                state["generation"] += 1
                lock.notify_all()
            elif self.path == "/stall":
                state["stalled"] = True
            elif self.path == "/unstall":
                state["stalled"] = False
                lock.notify_all()
            else:
                return self.reply(404, {})
        self.reply(200, {})

    def do_GET(self):
        with lock:
            seen = list(requests_seen)
        self.reply(200, seen)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--token-file", required=True)
    args = parser.parse_args()
    Api.token_file = args.token_file
    control = ThreadingHTTPServer(("127.0.0.1", args.control_port), Control)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    api = ThreadingHTTPServer(("127.0.0.1", args.port), Api)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    api.socket = context.wrap_socket(api.socket, server_side=True)
    api.daemon_threads = True
    api.serve_forever()


if __name__ == "__main__":
    main()
