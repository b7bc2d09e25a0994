"""The Jobs tab: every job of the studio in one table (training, generation, batches, Ray jobs).

A batch of job files starts here as `studio batch` does, on this machine (the jobs join the
studio's queue) or on a Ray cluster (`--cluster`): each Ray job then gets a row like a local
one, with its step, loss, ETA, messages and result, and can be cancelled from here.
"""

from __future__ import annotations

from typing import Any

from studio import service
from studio.errors import StudioError
from studio.ui import UIContext, _select_handler, cancel_job, job_log, job_markdown, panel, progress_html

COLUMNS = ["id", "job", "kind", "where", "state", "step", "loss", "ETA / took"]
ACTIVE = ("queued", "running")


def where(st: dict[str, Any]) -> str:
    """Where a job runs: this studio's queue, or the Ray cluster its params name (Ray jobs and batches)."""
    cluster = (st.get("params") or {}).get("cluster")
    return f"Ray {cluster}" if cluster else "here"


def job_rows(jobs: list[dict[str, Any]]) -> list[list[Any]]:
    """The table: newest first, one row a job."""
    rows = []
    for st in reversed(jobs):
        step = f"{st['step']}/{st['total']}" if st.get("total") else (st.get("phase") or "")
        loss = f"{st['loss']:.4f}" if st.get("loss") is not None else ""
        if st["state"] == "running" and st.get("total"):
            timing = service.format_eta(st.get("eta_s"))
        elif st.get("elapsed_s") is not None and st["state"] not in ACTIVE:
            timing = service.format_eta(st["elapsed_s"])
        else:
            timing = ""
        label = st.get("label") or st["kind"]
        rows.append([st["id"], label.split(" (Ray ")[0], st["kind"], where(st), st["state"], step, loss, timing])
    return rows


def summary(jobs: list[dict[str, Any]]) -> str:
    """One line: how many jobs are running, queued, done, failed."""
    if not jobs:
        return "No jobs yet: start one in the Train or Generate tab, or a batch below."
    counts: dict[str, int] = {}
    for st in jobs:
        counts[st["state"]] = counts.get(st["state"], 0) + 1
    return " · ".join(f"{n} {state}" for state, n in counts.items())


@panel("jobs", "Jobs", order=40)
def _jobs_panel(ctx: UIContext) -> None:
    import gradio as gr

    private = {"api_visibility": "private"}
    head = gr.Markdown(summary(ctx.manager.jobs()), elem_id="jobs-summary")
    table = gr.Dataframe(headers=COLUMNS, value=job_rows(ctx.manager.jobs()) or None, interactive=False,
                         wrap=True, elem_id="jobs-table")
    with gr.Row():
        picked = gr.Dropdown(label="Job", choices=[], value=None, allow_custom_value=True, elem_id="jobs-pick",
                             scale=3)
        cancel = gr.Button("Cancel job", variant="stop", interactive=False, elem_id="jobs-cancel", scale=1)
    detail = gr.Markdown("", elem_id="jobs-detail")
    bar = gr.HTML(progress_html(None), elem_id="jobs-progress")
    log_box = gr.Textbox(label="Log", lines=8, max_lines=16, interactive=False, autoscroll=True,
                         elem_id="jobs-log")
    with gr.Accordion("Run a batch of job files", open=False, elem_id="jobs-batch"):
        gr.Markdown("Job files are TOML files of `studio train` fields (see docs/training.md), paths on the "
                    "studio's machine. Without a cluster they join this studio's queue, one after another. "
                    "With one (`local:2` starts Ray here with two workers; `auto`, `ray://HOST:PORT` join a "
                    "running cluster; see docs/CLUSTER.md) they run as Ray tasks, and their adapters land in "
                    "the library as each finishes.")
        files = gr.Textbox(label="Job files (one a line; globs such as jobs/*.toml)", lines=3,
                           elem_id="jobs-files")
        with gr.Row():
            cluster = gr.Textbox(label="Ray cluster (empty: this machine's queue)", value="",
                                 placeholder="local:2, auto or ray://head:10001", elem_id="jobs-cluster")
            resume = gr.Checkbox(label="Resume jobs from their checkpoints", value=False, elem_id="jobs-resume")
        start = gr.Button("Start batch", variant="primary", elem_id="jobs-start")
        batch_note = gr.Markdown("", elem_id="jobs-batch-note")
    timer = gr.Timer(2.0, active=True)  # the whole table each tick: every 2 s keeps a loaded machine responsive

    def choices(jobs: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(f"{st['id']} {st.get('label') or st['kind']} ({st['state']})", st["id"]) for st in reversed(jobs)]

    def refresh(jid: str | None):
        jobs = ctx.manager.jobs()
        st = next((j for j in jobs if j["id"] == jid), None)
        return (summary(jobs), job_rows(jobs) or None, gr.Dropdown(choices=choices(jobs), value=jid),
                job_markdown(st) if st else "", progress_html(st), job_log(st),
                gr.update(interactive=bool(st and st["state"] in ACTIVE)))

    views = [head, table, picked, detail, bar, log_box, cancel]
    timer.tick(refresh, [picked], views, show_progress="hidden", concurrency_limit=None, api_name="jobs_status")
    # .input, not .change: refresh sets the dropdown itself, and .change would fire on that, again and again
    picked.input(refresh, [picked], views, show_progress="hidden", **private)

    @_select_handler
    def on_row(evt: Any):
        row = evt.row_value if evt is not None else None
        return row[0] if row else gr.skip()

    table.select(on_row, None, picked, show_progress="hidden", **private).then(
        refresh, [picked], views, show_progress="hidden", **private)

    def on_cancel(jid: str | None):
        cancel_job(ctx.manager, jid)
        return refresh(jid)

    cancel.click(on_cancel, [picked], views, show_progress="hidden", concurrency_limit=None, api_name="jobs_cancel")

    def on_start(text: str, address: str, resume_: bool):
        found, problems = service.job_files(text)
        for p in problems:
            gr.Warning(p)
        try:
            ids = service.start_batch(ctx.manager, found, address.strip(), resume=bool(resume_))
        except StudioError as exc:
            gr.Warning(str(exc))
            return f"**Error:** {exc}", gr.skip()
        where_ = f"on Ray `{address.strip()}`" if address.strip() else "in this studio's queue"
        note = f"Started {len(found)} job file{'s' if len(found) != 1 else ''} {where_}."
        if problems:
            note += " Skipped: " + "; ".join(problems)
        return note, ids[0]

    start.click(on_start, [files, cluster, resume], [batch_note, picked], concurrency_limit=None,
                api_name="jobs_batch").then(refresh, [picked], views, show_progress="hidden", **private)
    ctx.on_load(refresh, [picked], views)
