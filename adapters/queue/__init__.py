"""Queue adapters: one module per backend, all implementing :class:`QueueAdapter`."""

from adapters.queue.base import ConsumeOptions, Consumer, Delivery, Entry, Published, QueueAdapter

__all__ = ["ConsumeOptions", "Consumer", "Delivery", "Entry", "Published", "QueueAdapter"]
