"""run.json holds no tracking credentials (issue 17): ``prepare_run_dir`` writes the MLflow URI
through ``pipeline.runs.tracking.redact_uri``, while the spec in memory keeps the real URI."""
import json

from pipeline.runs.spec import RunSpec


class _Cfg:
    def dump(self) -> str:
        return "MODEL: {}\n"


def test_run_json_has_no_tracking_credentials(tmp_path):
    """A spec with ``https://user:secret@host/x``: run.json says ``https://host/x`` (worked by hand
    from RFC 3986's ``userinfo@host``) and holds neither "secret" nor "user"; the caller's spec is
    unchanged, and preparing the same directory again (a resume) is accepted. Broken deliberately:
    with run.json written from ``spec`` as given, "secret" was in the file."""
    from pipeline.runs.train import prepare_run_dir

    uri = "https://user:secret@host/x"
    spec = RunSpec(detector="centernet2_agnostic", loss="fedloss", seed=0, scale="smoke",
                   data={"name": "synthetic"}, train={}, eval={}, tracking_uri=uri)
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, spec, _Cfg())
    text = (run_dir / "run.json").read_text()
    assert "secret" not in text and "user:" not in text
    assert json.loads(text)["tracking_uri"] == "https://host/x"
    assert spec.tracking_uri == uri
    prepare_run_dir(run_dir, spec, _Cfg(), starting=False)  # same identity: no error
    assert "secret" not in (run_dir / "run.json").read_text()


def test_job_payloads_carry_no_tracking_credentials(tmp_path, monkeypatch):
    """The JSON submitit writes to slurm-logs/ says ``https://host/x``; the real URI goes to the jobs
    through MLFLOW_TRACKING_URI, which tracking prefers; a URI without credentials and a variable
    the user set are left as they are. Broken deliberately: the payload built from the specs as
    given (the old code) held "secret"."""
    from pipeline.launch import job_payloads
    from pipeline.runs.tracking import tracking_uri

    # Recorded first, so the variable job_payloads sets is removed again after the test.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "recorded")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = "https://user:secret@host/x"
    spec = RunSpec(detector="centernet2_agnostic", loss="fedloss", seed=0, scale="smoke",
                   data={"name": "synthetic"}, train={}, eval={}, tracking_uri=uri)
    payload = job_payloads([(tmp_path / "run", [spec])])
    assert "secret" not in json.dumps(payload)
    assert json.loads(payload[0][0])["tracking_uri"] == "https://host/x"
    assert tracking_uri("https://host/x") == uri  # what a job connects with
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////mine.db")
    job_payloads([(tmp_path / "run", [spec])])
    assert tracking_uri("https://host/x") == "sqlite:////mine.db"
