"""Service implementations: proto in, proto out, no knowledge of any transport.

Each class names the proto service it implements in ``SERVICE`` and defines one coroutine
(or async generator, for server streams) per RPC, taking ``(request, call)``.
"""
