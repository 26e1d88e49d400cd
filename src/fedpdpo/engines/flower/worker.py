"""A long-lived ClientApp process for a SuperNode started with ``--isolation process``: the model stays loaded.

In Flower 1.42 a SuperNode hands each message to a fresh ``flwr-clientapp`` process (started by
``flower-superexec``), which serves that one message and exits, so every message pays the process start, the
imports and fedpdpo's model build. With ``flower-supernode --isolation process`` the SuperNode starts nothing and
waits for an outside process to take its tasks over the Runtime API. :func:`serve_tasks` is that process: it does
what ``flower-superexec`` and ``flwr-clientapp`` do together (acquire the next ClientApp task, pull its message,
context, run and FAB, run the ClientApp the FAB names, push the reply and the context back), in a loop, in one
process. fedpdpo's ClientApp keeps its model and tokenized data per process (``client_app._CACHE``), so they are
built once per node and run config, not once per message.

The task protocol is Flower's own (the helpers of ``flwr.supernode.runtime.run_clientapp``); only the loop and the
failure handling differ: a failed task is reported as an error reply and the process carries on with the next one.
``AcquireTask`` is signed with the SuperNode's SuperExec secret when one is given, so no other local process can
take the node's tasks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedpdpo.errors import first_line

log = logging.getLogger(__name__)

#: The Runtime API method the SuperExec secret protects (as Flower's own SuperExec signs it).
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"


def _client(address: str, interceptors: list) -> RuntimeHttpClient:
    """A Runtime API client that retries a few lost connections and otherwise raises.

    Not Flower's ``make_simple_http_retry_invoker``: written for one-message processes, it answers an expired task
    token (HTTP 401) by SIGINTing its own process, which here would stop the node instead of ending one task.
    """
    retry = RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=5),
        recoverable_exceptions=(httpx.TransportError,),
        max_tries=5,
        max_time=60.0,
    )
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the Runtime API listens on 127.0.0.1 only (fedpdpo node sets --host)
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=retry,
    )


def _heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Flower's task heartbeat, minus its reaction to a cancelled task (it SIGINTs the process, which here would
    stop the node): the task's reply is then refused by the SuperNode, and the loop goes on."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(request)
        except httpx.HTTPError:
            return False  # retried with backoff by HeartbeatSender
        return True

    return beat


def run_task(address: str, token: str) -> None:
    """Serve one ClientApp task: pull its message, run the ClientApp its FAB names, push reply and context."""
    client = _client(
        address, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)]
    )
    heartbeat = HeartbeatSender(_heartbeat(client))
    heartbeat.start()
    message: Message | None = None
    reply: Message | None = None
    context: Context | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, run, fab = pull_task_input(client)
        install_from_fab(fab.content, skip_prompt=True)  # a no-op once this FAB is installed
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        client_app = load(run.fab_id, run.fab_version, fab.hash_str)
        reply = client_app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # a bug or a foreign app: report it to the server, keep serving
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
        if not isinstance(exc, LoadClientAppError):
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        log.exception("the ClientApp failed on a message")
        details = f"{type(exc).__name__}: {first_line(exc)}"
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=status, details=details)
        finally:
            heartbeat.stop()
            client.close()


def serve_tasks(
    address: str,
    stop: threading.Event,
    secret: bytes | None = None,
    poll: float = 0.2,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Take the SuperNode's ClientApp tasks one after the other until ``stop`` is set or ``alive()`` is false."""
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_TASK}))
    acquirer = _client(address, interceptors)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    try:
        while not stop.is_set() and alive():
            try:
                res = acquirer.AcquireTask(request)
            except httpx.HTTPError:  # the SuperNode is starting, or has stopped (alive() tells)
                stop.wait(poll)
                continue
            if not (res.HasField("task") and res.token):
                stop.wait(poll)
                continue
            try:
                run_task(address, res.token)
            except httpx.HTTPError as exc:  # the task expired or the SuperNode went away mid-task: Flower's own
                log.warning("a ClientApp task could not be completed: %s", first_line(exc))  # expiry handling applies
    finally:
        acquirer.close()
