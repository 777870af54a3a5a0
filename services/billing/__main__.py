"""``python -m services.billing``: run the billing service in the foreground."""

from services.common.app import run_service

from .app import create_app
from .settings import BillingSettings

if __name__ == "__main__":
    run_service(create_app, BillingSettings())
