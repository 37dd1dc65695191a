"""A typed client for the kairoi-trio scheduler's gRPC API (kairoi.v1.Scheduler).

`Client` is synchronous (also the one to use from Trio, via trio.to_thread);
`AsyncClient` is the same API on grpc.aio, for asyncio code.
"""

from kairoi_client._async import AsyncClient, AsyncJobWatch
from kairoi_client._sync import Client, JobWatch
from kairoi_client._types import (
    AmqpRunner,
    BulkResult,
    EventType,
    FailedPrecondition,
    HttpRunner,
    InvalidArgument,
    Job,
    JobEvent,
    JobStatus,
    KairoiError,
    Misfire,
    NewJob,
    NotFound,
    Overlap,
    ResourceExhausted,
    Rule,
    RulePolicy,
    Schedule,
    ServerInfo,
    SetJobResult,
    ShellRunner,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "AmqpRunner",
    "AsyncClient",
    "AsyncJobWatch",
    "BulkResult",
    "Client",
    "EventType",
    "FailedPrecondition",
    "HttpRunner",
    "InvalidArgument",
    "Job",
    "JobEvent",
    "JobStatus",
    "JobWatch",
    "KairoiError",
    "Misfire",
    "NewJob",
    "NotFound",
    "Overlap",
    "ResourceExhausted",
    "Rule",
    "RulePolicy",
    "Schedule",
    "ServerInfo",
    "SetJobResult",
    "ShellRunner",
    "Unauthenticated",
    "Unavailable",
]
