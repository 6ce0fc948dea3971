"""tuspyserver (a FastAPI router, from PyPI) as its README sets it up: the benchmark's
other Python peer. `TUSPY_DIR` names its data directory; uvicorn serves `app`."""

import os

from fastapi import FastAPI
from tuspyserver import create_tus_router

app = FastAPI()
app.include_router(create_tus_router(prefix="files", files_dir=os.environ["TUSPY_DIR"]))
