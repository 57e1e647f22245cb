"""The LLM scheduler: continuous batching of routed work over llama.cpp contexts.

`Scheduler` is the interface the engine uses; `LLMScheduler` decodes in this process and
`RemoteScheduler` in a child process. Admission is judged in `admission`; a batch is planned in
`planning`, decoded in `execution` and recorded by the scheduler (plan -> execute -> record)."""

from runtime.scheduling.admission import WorkEstimate, queue_full, saturation
from runtime.scheduling.config import SchedulerSettings
from runtime.scheduling.jobs import Admission, ItemState, JobHandle
from runtime.scheduling.local import LLMScheduler, Pausable
from runtime.scheduling.process import RemoteScheduler
from runtime.scheduling.protocol import Scheduler, SchedulerObserver

__all__ = [
    "Admission",
    "ItemState",
    "JobHandle",
    "LLMScheduler",
    "Pausable",
    "RemoteScheduler",
    "Scheduler",
    "SchedulerObserver",
    "SchedulerSettings",
    "WorkEstimate",
    "queue_full",
    "saturation",
]
