"""PubSub adapters: one module per backend, all implementing :class:`PubSubAdapter` and all
delivering through :class:`Subscription`'s bounded buffer."""

from adapters.pubsub.base import Delivery, Overflow, PubSubAdapter, Subscription

__all__ = ["Delivery", "Overflow", "PubSubAdapter", "Subscription"]
