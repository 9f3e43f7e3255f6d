"""Import target for ASGI servers (``app.asgi:app``): settings come from ``PRISM_CONFIG`` and
``PRISM_*`` variables, which ``prism serve`` sets before starting the server's workers."""

import os

from app import logs

logs.configure_from_environment()  # before anything logs

from app.http_app import create_app  # noqa: E402
from app.settings import load_settings  # noqa: E402

settings = load_settings()
if os.environ.get("PRISM_SERVER") == "hypercorn" and settings.auth is not None and settings.auth.mtls is not None:
    from app import hypercorn_tls

    hypercorn_tls.install()  # client certificates reach the app as the ASGI TLS extension

app = create_app(settings)
if os.environ.get("PRISM_SERVER") == "pyvoy":
    from app.pyvoy_receive import SettledReceive

    app = SettledReceive(app)  # receive() waits for the disconnect once the body is read
