"""MLflow bookkeeping for one run: the experiment, params (the flattened composed config),
metrics per epoch and final, artifacts, tags, and an honest end status. Uses MlflowClient
rather than mlflow's global active run, so nothing leaks between runs in one process."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

from freqexp.errors import ConfigError

# mlflow imports are deferred: they cost seconds, and a bad config should fail before them.


def quiet_store_migrations() -> None:
    """MLflow logs its database set-up and alembic migrations at INFO on every new store; they
    say nothing a user acts on, so they are kept to warnings."""
    import logging

    for name in ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


quiet_store_migrations()


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite path absolute (relative to the current directory) and create its
    folder; other URIs pass through. The file store is refused: it raises in mlflow 3."""
    if not isinstance(uri, str) or not uri:
        raise ConfigError("tracking.uri", "must be a URI such as sqlite:///outputs/mlflow.db or http://host:5000")
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path != ":memory:":
            p = Path(path) if path.startswith("/") else Path.cwd() / path
            p.parent.mkdir(parents=True, exist_ok=True)
            return "sqlite:///" + str(p)
        return uri
    if "://" not in uri or uri.startswith("file:"):
        raise ConfigError("tracking.uri", f"{uri!r} is a file store, which mlflow 3 rejects; use sqlite:///PATH.db (or an http(s):// or postgresql:// server)")
    check_reachable(uri, "tracking.uri")
    return uri


DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433, "http": 80, "https": 443}


def check_reachable(uri: str, key: str, timeout: float = 3.0) -> None:
    """A server URI whose host does not answer fails now, in one line, instead of after the
    minutes of retries MLflow and SQLAlchemy would spend."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return
    port = parts.port or DEFAULT_PORTS[scheme]
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(key, f"cannot reach {scheme} server at {parts.hostname}:{port} ({e.strerror or e}); start it or fix the URI") from None


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    out: Dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)
    return out


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000 --workers 1"


@contextmanager
def store_lock(uri: str):
    """Serialize opening a sqlite store across processes: MLflow creates and migrates the schema
    on first use, and parallel sweep jobs doing that at once corrupt it."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        yield
        return
    import fcntl

    with open(uri[len("sqlite:///"):] + ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Tracker:
    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        with store_lock(self.uri):  # the client creates (and migrates) the store
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment(experiment)
        self.run_id: Optional[str] = None

    def _artifact_root(self, experiment: str) -> Optional[str]:
        """Beside a local sqlite store, so outputs/ holds the whole record."""
        if self.uri.startswith("sqlite:///") and not self.uri.endswith(":memory:"):
            db = Path(self.uri[len("sqlite:///") :])
            return (db.parent / "artifacts" / experiment).as_uri()
        return None

    def _experiment(self, name: str) -> str:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError("tracking.experiment", f"must be a non-empty name; got {name!r}")
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self._artifact_root(name))
        except Exception:  # another job of the sweep created it first
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def find_finished(self, config_hash: str):
        """The newest FINISHED run of this experiment with this config hash, or None."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.config_hash = '{config_hash}' and attributes.status = 'FINISHED'",
                                       max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def start(self, run_name: str, tags: Mapping[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_artifacts(self, paths: Iterable[os.PathLike | str], subdir: Optional[str] = None) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), artifact_path=subdir)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
