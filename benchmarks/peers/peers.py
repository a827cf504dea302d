"""Run the same workload on eretes, Celery and RQ in alternating rounds.

Workload (per system, per round):
  * latency: 20 single tasks one after another, each submitted and waited
    for; the median, in ms;
  * throughput: N tasks submitted by 8 client threads, then collected; tasks
    per second from the first submission to the last result.
Every task runs `true` in a subprocess. Prints a JSON object per round and
one with the medians and the ratios (eretes over the peer) at the end.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
THREADS = 8
SINGLES = 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_connect(port):
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def wait_for(what, ready, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def in_threads(count, work):
    """Run work(i) for i in range(count) on THREADS threads."""
    next_index = iter(range(count))
    lock = threading.Lock()
    errors = []

    def worker():
        state = {}
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            try:
                work(i, state)
            except Exception as error:  # reported after the run
                errors.append(error)
                return

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def submit_and_collect(count, submit, collect):
    """Submit `count` tasks from THREADS threads, then collect each result."""
    handles = [None] * count

    def submit_one(i, _state):
        handles[i] = submit()

    in_threads(count, submit_one)
    in_threads(count, lambda i, _state: collect(handles[i]))


def stop_worker(process):
    """SIGTERM, then SIGKILL after 30 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


class Eretes:
    name = "eretes"

    def __init__(self, binary, root):
        self.port = free_port()
        self.process = subprocess.Popen(
            [binary, "agent", "--data-dir", os.path.join(root, "eretes"),
             "--listen", f"127.0.0.1:{self.port}", "--name", "peer"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("eretes agent", lambda: self._ready())
        self.round = 0

    def _ready(self):
        try:
            return self.request("GET", "/readyz")[0] == 200
        except OSError:
            return False

    def request(self, method, path, body=None, conn=None):
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        headers = {"content-type": "application/json"} if body is not None else {}
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if own:
            conn.close()
        return response.status, data

    def _conn(self, state):
        if "conn" not in state:
            state["conn"] = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        return state["conn"]

    def submit(self, task_id, state):
        status, data = self.request("POST", "/v1/tasks", {"id": task_id, "program": "true"}, self._conn(state))
        if status >= 300:
            raise RuntimeError(f"submit {task_id}: {status} {data[:200]!r}")

    def wait(self, task_id, state):
        status, data = self.request("GET", f"/v1/tasks/{task_id}/wait?timeout_s=120", None, self._conn(state))
        view = json.loads(data)
        if status >= 300 or view.get("state") != "done":
            raise RuntimeError(f"task {task_id}: {status} {data[:200]!r}")

    def one(self, i):
        self.round += 1
        task_id = f"l{self.round}-{i}"
        state = {}
        self.submit(task_id, state)
        self.wait(task_id, state)

    def many(self, prefix, count):
        in_threads(count, lambda i, s: self.submit(f"{prefix}-{i}", s))
        in_threads(count, lambda i, s: self.wait(f"{prefix}-{i}", s))

    def stop(self):
        self.process.kill()
        self.process.wait()


class CeleryPeer:
    name = "celery"

    def __init__(self, python, env):
        sys.path.insert(0, HERE)
        import tasks  # noqa: E402 (needs PEERS_REDIS first)

        self.task = tasks.run_true
        self.worker = subprocess.Popen(
            [os.path.join(os.path.dirname(python), "celery"), "-A", "tasks", "worker",
             "--loglevel=WARNING", "--without-gossip", "--without-mingle"],
            cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("a celery worker", lambda: self._ping())

    def _ping(self):
        try:
            return bool(self.task.app.control.ping(timeout=0.5))
        except Exception:
            return False

    def one(self, i):
        self.task.delay().get(timeout=120)

    def many(self, prefix, count):
        submit_and_collect(count, self.task.delay, lambda result: result.get(timeout=120))

    def stop(self):
        stop_worker(self.worker)


class RqPeer:
    name = "rq"

    def __init__(self, python, env, redis_url):
        sys.path.insert(0, HERE)
        import redis
        from rq import Queue, Worker

        import tasks

        self.function = tasks.rq_run_true
        connection = redis.Redis.from_url(redis_url)
        self.queue = Queue("peers", connection=connection)
        self.worker = subprocess.Popen(
            [os.path.join(os.path.dirname(python), "rq"), "worker", "--url", redis_url,
             "--quiet", "peers"],
            cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("an rq worker", lambda: bool(Worker.all(connection=connection)))

    def _wait(self, job):
        deadline = time.monotonic() + 120
        while job.get_status(refresh=True) != "finished":
            if time.monotonic() > deadline or job.get_status() == "failed":
                raise RuntimeError(f"rq job {job.id}: {job.get_status()}")
            time.sleep(0.002)

    def one(self, i):
        self._wait(self.queue.enqueue(self.function))

    def many(self, prefix, count):
        submit_and_collect(count, lambda: self.queue.enqueue(self.function), self._wait)

    def stop(self):
        stop_worker(self.worker)


def measure(system, tasks, round_index):
    latencies = []
    for i in range(SINGLES):
        started = time.perf_counter()
        system.one(i)
        latencies.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    system.many(f"r{round_index}", tasks)
    elapsed = time.perf_counter() - started
    return {"latency_ms": statistics.median(latencies), "tasks_per_s": tasks / elapsed}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--eretes", required=True)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-rq", action="store_true")
    args = parser.parse_args()
    if args.tasks < 1 or args.rounds < 1:
        raise SystemExit("--tasks and --rounds are at least 1")

    root = tempfile.mkdtemp(prefix="eretes-peers-")
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(redis_port),
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", root],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ, PEERS_REDIS=redis_url)
    os.environ["PEERS_REDIS"] = redis_url
    systems = []
    try:
        wait_for("redis", lambda: can_connect(redis_port))
        systems.append(Eretes(args.eretes, root))
        systems.append(CeleryPeer(sys.executable, env))
        if not args.no_rq:
            systems.append(RqPeer(sys.executable, env, redis_url))
        results = {system.name: [] for system in systems}
        for round_index in range(args.rounds):
            # Alternate the order, so that no system always runs first.
            order = systems if round_index % 2 == 0 else list(reversed(systems))
            for system in order:
                outcome = measure(system, args.tasks, round_index)
                results[system.name].append(outcome)
                print(json.dumps({"round": round_index, "system": system.name, **outcome}), flush=True)
        summary = {"tasks": args.tasks, "rounds": args.rounds}
        for name, outcomes in results.items():
            summary[name] = {
                "latency_ms": round(statistics.median(o["latency_ms"] for o in outcomes), 2),
                "tasks_per_s": round(statistics.median(o["tasks_per_s"] for o in outcomes), 1),
            }
        for name in results:
            if name == "eretes":
                continue
            summary[f"eretes_over_{name}"] = {
                "throughput": round(summary["eretes"]["tasks_per_s"] / summary[name]["tasks_per_s"], 2),
                "latency": round(summary["eretes"]["latency_ms"] / summary[name]["latency_ms"], 2),
            }
        print(json.dumps(summary), flush=True)
    finally:
        for system in systems:
            system.stop()
        redis.terminate()
        redis.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
