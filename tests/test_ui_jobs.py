"""The Jobs tab: the table of every job, batches of job files from the UI (studio.ui_jobs)."""

from __future__ import annotations

import pytest

from studio import service, ui, ui_jobs
from studio.errors import StudioError


def _wait_train(cfg, on_event=None, cancel=None):
    """A fake training that runs until cancelled (or 5 s)."""
    on_event({"phase": "train", "step": 1, "total": 10, "loss": 0.25})
    cancel.wait(5)
    if cancel.is_set():
        raise service.Cancelled("cancelled")
    return {"out": cfg.out}


def _toml(tmp_path, name, body):
    p = tmp_path / f"{name}.toml"
    p.write_text(body)
    return p


def test_job_files_reads_lines_commas_and_globs(tmp_path):
    a = _toml(tmp_path, "a", "")
    b = _toml(tmp_path, "b", "")
    files, problems = service.job_files(f"{tmp_path}/*.toml\n{a}, {tmp_path}/none.toml\n{tmp_path}/z*.toml\n")
    assert files == [a, b]  # a named twice is one job
    assert problems == [f"{tmp_path}/none.toml: no such job file", f"{tmp_path}/z*.toml: no file matches"]


def test_a_local_batch_joins_the_queue_and_a_bad_file_is_a_failed_row(tmp_path):
    m = service.JobManager(train_fn=_wait_train, register_fn=lambda cfg, result: None)
    good = _toml(tmp_path, "good", f'kind = "subject"\nimages = "{tmp_path}"\nout = "{tmp_path / "o"}"\n')
    bad = _toml(tmp_path, "bad", 'kind = "subject"\nimages = "x"\nbogus = 1\n')
    ids = service.start_batch(m, [good, bad], resume=True)
    assert len(ids) == 2
    first, second = m.status(ids[0]), m.status(ids[1])
    assert first["state"] in ("queued", "running") and first["params"]["resume"] is True
    assert second["state"] == "failed" and "bogus" in second["error"]
    m.cancel(ids[0])
    assert m.wait(ids[0], timeout=10)["state"] == "cancelled"
    with pytest.raises(StudioError, match="no job files"):
        service.start_batch(m, [])
    m.shutdown()


def test_a_bad_cluster_address_fails_before_anything_starts(tmp_path):
    m = service.JobManager(train_fn=_wait_train)
    job = _toml(tmp_path, "j", "")
    with pytest.raises(StudioError, match="expected auto, local"):
        service.start_batch(m, [job], "nowhere")
    assert m.jobs() == []


def test_the_table_lists_local_and_ray_jobs_alike():
    m = service.JobManager(train_fn=_wait_train, register_fn=lambda cfg, result: None)
    ray_row = m.track("train", label="night-3 (Ray local:2)", params={"cluster": "local:2"})
    m.record(ray_row, {"phase": "train", "step": 4, "total": 8, "loss": 0.5, "eta_s": 30})
    batch = m.track("batch", label="batch of 2 on Ray local:2", params={"cluster": "local:2"})
    m.end(batch, "failed", error="some jobs failed")
    rows = ui_jobs.job_rows(m.jobs())
    assert [r[0] for r in rows] == [batch, ray_row]  # newest first
    assert rows[1][1:] == ["night-3", "train", "Ray local:2", "running", "4/8", "0.5000", "30s"]
    assert rows[0][3:5] == ["Ray local:2", "failed"]
    assert ui_jobs.summary(m.jobs()) == "1 running · 1 failed"
    assert ui_jobs.summary([]).startswith("No jobs yet")
    local = {"id": "t", "kind": "train", "label": "heart", "state": "queued", "step": 0, "total": 0}
    assert ui_jobs.where(local) == "here"
    m.shutdown()


def test_the_jobs_tab_shows_rows_and_cancels_a_ray_job(tmp_path):
    m = service.JobManager(train_fn=_wait_train, register_fn=lambda cfg, result: None)
    demo = ui.build_app("micro", manager=m)
    refresh = next(f.fn for f in demo.fns.values() if f.api_name == "jobs_status")
    cancel = next(f.fn for f in demo.fns.values() if f.api_name == "jobs_cancel")
    row = m.track("train", label="night-1 (Ray auto)")
    m.record(row, {"phase": "train", "step": 2, "total": 8, "loss": 0.3})
    summary, table, _, detail, bar, _, button = refresh(row)
    assert summary == "1 running" and table[0][0] == row
    assert "step 2/8" in detail and 'data-state="running"' in bar and button["interactive"] is True
    cancel(row)
    assert m.cancel_requested(row)  # the cluster driver polls this and cancels the Ray task
    m.end(row, "cancelled", error="stopped at step 2")
    *_, button = refresh(row)
    assert button["interactive"] is False
    start = next(f.fn for f in demo.fns.values() if f.api_name == "jobs_batch")
    note, picked = start(f"{tmp_path}/missing.toml", "", False)
    assert note.startswith("**Error:** no job files") and picked is not None
    m.shutdown()
