#!/usr/bin/env bash
# Proves the shared-store path for real: PostgreSQL on loopback, an MLflow tracking server on it,
# and two freqexp workers joining one Optuna study (RDB storage in the same database), 4 trials.
# Reads the runs and trials back, then stops everything it started. Needs root (CI is).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$PWD/.venv/bin/python
PORT_PG=${PORT_PG:-54329}
PORT_ML=${PORT_ML:-5055}
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
WORK=$(mktemp -d /tmp/freqexp-pg.XXXXXX)
chown postgres "$WORK"
MLFLOW_PID=""
cleanup() {
  [ -n "$MLFLOW_PID" ] && kill "$MLFLOW_PID" 2>/dev/null || true
  su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D $WORK/data -m fast stop" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
su postgres -s /bin/sh -c "$PGBIN/initdb -D $WORK/data -A trust -U postgres" >/dev/null
su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D $WORK/data -w -l $WORK/pg.log -o '-p $PORT_PG -k $WORK -c listen_addresses=127.0.0.1' start" >/dev/null
# two databases on the one server: MLflow and Optuna both keep an alembic_version table
su postgres -s /bin/sh -c "$PGBIN/createdb -h 127.0.0.1 -p $PORT_PG mlflow"
su postgres -s /bin/sh -c "$PGBIN/createdb -h 127.0.0.1 -p $PORT_PG optuna"
MLFLOW_DB=postgresql://postgres@127.0.0.1:$PORT_PG/mlflow
DB=postgresql://postgres@127.0.0.1:$PORT_PG/optuna

mkdir -p "$WORK/artifacts" "$WORK/w1" "$WORK/w2"
"$PY" -m mlflow server --backend-store-uri "$MLFLOW_DB" --artifacts-destination "$WORK/artifacts" \
  --host 127.0.0.1 --port "$PORT_ML" --workers 1 >"$WORK/mlflow.log" 2>&1 &
MLFLOW_PID=$!
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT_ML/health" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$PORT_ML/health" >/dev/null || { tail -20 "$WORK/mlflow.log"; exit 1; }
"$PY" -c "import optuna; optuna.create_study(study_name='ci', storage='$DB', direction='maximize')"

worker() {
  (cd "$WORK/$1" && "$PY" -m freqexp --multirun +sweep=optuna dataset=synthetic trainer.max_epochs=1 \
    trainer.progress_bar=false hydra.sweeper.n_trials=2 hydra.sweeper.study_name=ci "hydra.sweeper.storage=$DB" \
    "tracking.uri=http://127.0.0.1:$PORT_ML" tracking.experiment=ci >"$WORK/$1.log" 2>&1)
}
worker w1 & P1=$!
worker w2 & P2=$!
wait $P1 || { tail -30 "$WORK/w1.log"; exit 1; }
wait $P2 || { tail -30 "$WORK/w2.log"; exit 1; }
# pruning on the same stores: a floor no AUROC reaches stops the trial after its first epoch
mkdir -p "$WORK/w3"
(cd "$WORK/w3" && "$PY" -m freqexp --multirun +sweep=optuna_pruned dataset=synthetic trainer.max_epochs=3 \
  trainer.progress_bar=false hydra.sweeper.n_trials=1 hydra.sweeper.study_name=ci_pruned "hydra.sweeper.storage=$DB" \
  sweep.pruner.name=threshold sweep.pruner.lower=1.01 sweep.pruner.n_warmup_steps=1 \
  "tracking.uri=http://127.0.0.1:$PORT_ML" tracking.experiment=ci_pruned >"$WORK/w3.log" 2>&1) || { tail -30 "$WORK/w3.log"; exit 1; }

"$PY" - "$DB" "http://127.0.0.1:$PORT_ML" <<'PYEOF'
import sys, mlflow, optuna
db, uri = sys.argv[1:]
study = optuna.load_study(study_name="ci", storage=db)
states = sorted(t.state.name for t in study.trials)
mlflow.set_tracking_uri(uri)
runs = mlflow.search_runs(experiment_names=["ci"])
checks = {
    "4 Optuna trials COMPLETE in PostgreSQL": states == ["COMPLETE"] * 4,
    "4 MLflow runs FINISHED through the server": len(runs) == 4 and set(runs["status"]) == {"FINISHED"},
    "each trial's value is its run's val/auroc": sorted(round(t.value, 9) for t in study.trials)
        == sorted(round(v, 9) for v in runs["metrics.val/auroc"]),
    "artifacts stored through the server": all(
        any(a.path == "metrics.json" for a in mlflow.MlflowClient(uri).list_artifacts(r)) for r in runs["run_id"]),
}
pruned = optuna.load_study(study_name="ci_pruned", storage=db).trials
pruned_runs = mlflow.search_runs(experiment_names=["ci_pruned"])
checks["a pruned trial is PRUNED in PostgreSQL after epoch 1"] = (
    [t.state.name for t in pruned] == ["PRUNED"] and sorted(pruned[0].intermediate_values) == [1])
checks["its run is KILLED with tags pruned=true, pruned_epoch=1"] = (
    len(pruned_runs) == 1 and pruned_runs["status"].iloc[0] == "KILLED"
    and pruned_runs["tags.pruned"].iloc[0] == "true" and pruned_runs["tags.pruned_epoch"].iloc[0] == "1")
for name, ok in checks.items():
    print(("PASS " if ok else "FAIL ") + name)
failed = sum(not ok for ok in checks.values())
print(f"postgres: {len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PYEOF
