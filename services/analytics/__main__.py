"""``python -m services.analytics``: run the analytics service in the foreground."""

from services.common.app import run_service

from .app import create_app
from .settings import AnalyticsSettings

if __name__ == "__main__":
    run_service(create_app, AnalyticsSettings())
