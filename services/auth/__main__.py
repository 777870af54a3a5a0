"""``python -m services.auth``: run the auth service in the foreground."""

from services.common.app import run_service

from .app import create_app
from .settings import AuthSettings

if __name__ == "__main__":
    run_service(create_app, AuthSettings())
