"""An A2A agent (the real `a2a-sdk`, JSON-RPC over HTTP, v1.0 with v0.3 compatibility on the
same endpoint) for the end-to-end tests.

Usage: a2a_shout_server.py PORT
Skill "shout": answers a message with a task whose artifact is the text in capitals, streamed
one word per artifact chunk (100 ms apart), then completes with the
status message "shouted N words". The agent card, at /.well-known/agent-card.json, offers
JSON-RPC in protocol versions 1.0 and 0.3 at http://127.0.0.1:PORT/.
"""

import asyncio
import sys

import uvicorn
from a2a.helpers.proto_helpers import new_task, new_text_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    TaskState,
)
from starlette.applications import Starlette


class ShoutExecutor(AgentExecutor):
    async def execute(self, context: RequestContext, event_queue) -> None:
        words = context.get_user_input().split()
        task = context.current_task or new_task(
            context.task_id,
            context.context_id,
            TaskState.TASK_STATE_SUBMITTED,
            history=[context.message],
        )
        await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.start_work()
        for index, word in enumerate(words):
            await updater.add_artifact(
                [new_text_part(word.upper())],
                artifact_id="shouted",
                name="shouted",
                append=index > 0,
                last_chunk=index == len(words) - 1,
            )
            await asyncio.sleep(0.1)
        await updater.complete(
            new_text_message(
                f"shouted {len(words)} words", context_id=task.context_id, task_id=task.id
            )
        )

    async def cancel(self, context: RequestContext, event_queue) -> None:
        raise NotImplementedError


def main() -> None:
    port = int(sys.argv[1])
    url = f"http://127.0.0.1:{port}/"
    card = AgentCard(
        name="shouter",
        description="Repeats what it is told, louder.",
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0"),
            AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="0.3"),
        ],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[
            AgentSkill(
                id="shout",
                name="shout",
                description="Answers in capitals, one word at a time.",
                tags=["echo"],
                examples=["hello there"],
            )
        ],
    )
    handler = DefaultRequestHandler(
        agent_executor=ShoutExecutor(), task_store=InMemoryTaskStore(), agent_card=card
    )
    app = Starlette(
        routes=create_agent_card_routes(card)
        + create_jsonrpc_routes(handler, "/", enable_v0_3_compat=True)
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


main()
