"""PubSub adapters: one module per backend, all implementing :class:`PubSubAdapter`."""

from adapters.pubsub.base import Delivery, PubSubAdapter, Subscription

__all__ = ["Delivery", "PubSubAdapter", "Subscription"]
