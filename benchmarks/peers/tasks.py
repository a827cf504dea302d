"""The peers' task: run `true` in a subprocess, as an eretes process task does."""

import os
import subprocess

from celery import Celery

app = Celery("peers", broker=os.environ["PEERS_REDIS"], backend=os.environ["PEERS_REDIS"])


@app.task
def run_true():
    return subprocess.run(["true"], check=False).returncode


def rq_run_true():
    return subprocess.run(["true"], check=False).returncode
