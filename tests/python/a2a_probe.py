"""An A2A client (the real `a2a-sdk`) for the end-to-end tests: fetches the agent card of
a2a_shout_server.py, sends a message and a streaming message in the protocol version asked
for, and prints one JSON line with what happened, so the Rust test can assert on it.

Usage: a2a_probe.py BASE_URL VERSION TEXT
VERSION: 1.0 (SendMessage, SendStreamingMessage) or 0.3 (message/send, message/stream); the
client keeps only the card's JSON-RPC interface of that version.
The report has the card, the JSON-RPC methods the client put on the wire, and for "send" and
"stream" either the outcome or the error the client raised.
"""

import asyncio
import json
import sys
import time
import uuid

import httpx
from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
from a2a.helpers.proto_helpers import get_artifact_text, get_message_text
from a2a.types.a2a_pb2 import Message, Part, Role, SendMessageRequest, TaskState


def outcome_of(events: list) -> dict:
    """Summarises the StreamResponse events of one call."""
    kinds, chunks, arrivals, state, status_text = [], [], [], None, None
    for event, arrived in events:
        kind = event.WhichOneof("payload")
        kinds.append(kind)
        if kind == "task":
            state = TaskState.Name(event.task.status.state)
            chunks += [get_artifact_text(artifact) for artifact in event.task.artifacts]
            if event.task.status.HasField("message"):
                status_text = get_message_text(event.task.status.message)
        elif kind == "artifact_update":
            chunks.append(get_artifact_text(event.artifact_update.artifact))
            arrivals.append(arrived)
        elif kind == "status_update":
            state = TaskState.Name(event.status_update.status.state)
            if event.status_update.status.HasField("message"):
                status_text = get_message_text(event.status_update.status.message)
        elif kind == "message":
            status_text = get_message_text(event.message)
    return {
        "kinds": kinds,
        "chunks": chunks,
        "state": state,
        "status_text": status_text,
        # How long the artifact chunks took to arrive, first to last (the server paces them).
        "chunk_spread": (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0,
    }


async def call(factory: ClientFactory, card, text: str) -> dict:
    client = factory.create(card)
    request = SendMessageRequest(
        message=Message(
            role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[Part(text=text)]
        )
    )
    events = []
    try:
        async for event in client.send_message(request):
            events.append((event, time.monotonic()))
        return {"ok": True, **outcome_of(events)}
    except Exception as error:  # the test asserts on the message
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}


async def main() -> None:
    base_url, version, text = sys.argv[1], sys.argv[2], sys.argv[3]
    report: dict = {"methods": []}

    async def record(request: httpx.Request) -> None:
        if request.method == "POST":
            report["methods"].append(json.loads(request.content).get("method"))

    async with httpx.AsyncClient(
        trust_env=False, timeout=20, event_hooks={"request": [record]}
    ) as http:
        card = await A2ACardResolver(http, base_url).get_agent_card()
        report["card"] = {
            "name": card.name,
            "skills": [skill.id for skill in card.skills],
            "versions": [interface.protocol_version for interface in card.supported_interfaces],
        }
        chosen = [i for i in card.supported_interfaces if i.protocol_version == version]
        del card.supported_interfaces[:]
        card.supported_interfaces.extend(chosen)
        for action, streaming in (("send", False), ("stream", True)):
            factory = ClientFactory(ClientConfig(streaming=streaming, httpx_client=http))
            report[action] = await call(factory, card, text)
    print(json.dumps(report), flush=True)


asyncio.run(main())
