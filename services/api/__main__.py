"""`python -m services.api`: serve the HTTP API."""
import uvicorn

from services.api.app import create_app
from shared.config import get_settings
from shared.observability import setup_logging

if __name__ == "__main__":
    setup_logging("api")
    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_level="warning",
                timeout_graceful_shutdown=10)
