"""Import target for ASGI servers (``app.asgi:app``): settings come from ``PRISM_CONFIG`` and
``PRISM_*`` variables, which ``prism serve`` sets before starting the server's workers."""

from app.http_app import create_app
from app.settings import load_settings

app = create_app(load_settings())
