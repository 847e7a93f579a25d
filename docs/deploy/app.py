"""The app docs/deploy.md runs under gunicorn and uvicorn: FastAPI with the
drop-in port router, configured by DPM_START, DPM_END and DPM_JSON_PATH."""

from api_ports import router as port_router
from fastapi import FastAPI

app = FastAPI()
app.include_router(port_router, prefix="/api/v1")
