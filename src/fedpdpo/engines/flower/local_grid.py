"""A Flower ``Grid`` served inside this process: each message is handled at once by the ClientApp of its node.

It runs the very same ServerApp and ClientApp code as the Ray simulation and the SuperLink deployment,
synchronously, deterministically and without starting Ray (seconds instead of tens of seconds), which makes it the
fast path for testing the Flower apps and for measuring what a Flower client sends. Each virtual node has its own
``Context`` whose node config holds ``partition-id`` and ``num-partitions``, as in Flower's simulation engine, or the
node config given for it (e.g. a node holding its own data file: ``client-id``, ``data-path``, ``state-dir``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


def _copy_content(content: RecordDict) -> RecordDict:
    """A copy that a ClientApp (or a mod) may change without touching the server's message, as on the wire."""
    records: dict = {k: ArrayRecord(array_dict=dict(r)) for k, r in content.array_records.items()}
    records |= {k: MetricRecord(dict(r)) for k, r in content.metric_records.items()}
    records |= {k: ConfigRecord({n: copy.copy(v) for n, v in r.items()}) for k, r in content.config_records.items()}
    return RecordDict(records)


class LocalGrid(Grid):
    def __init__(
        self,
        client_app: Callable[[Message, Context], Message],
        num_nodes: int,
        run_id: int = 1,
        node_configs: list[dict[str, Any]] | None = None,
    ) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        # what Flower's ServerApp runtime sets before calling the app; Message() reads it
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        # node ids are arbitrary in Flower; offsetting them keeps node id and partition id from being confused
        self.contexts = {
            1000 + i: Context(
                run_id=run_id,
                node_id=1000 + i,
                node_config=node_configs[i] if node_configs else {"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            self.replies[msg.metadata.message_id] = self._deliver(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def _deliver(self, msg: Message) -> Message:
        """Run the node's ClientApp on a copy (as if it came over the wire); an exception becomes an error reply."""
        msg = Message(metadata=copy.copy(msg.metadata), content=_copy_content(msg.content))
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # what Flower's runtimes do with a raising ClientApp
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=msg)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
