"""The studio in a real browser: Debian's Chromium driven by Playwright against `python app.py`.

One server (a subprocess with its own STUDIO_HOME) serves every test of this module; each test
opens its own browser context, i.e. its own user with its own local storage. Trainings are a
few steps of batch 1 on the micro model with one sample prompt: the module took 80 s on two CPU
cores that other work was also using (much longer when that work keeps both cores busy).

A missing browser is a failure, not a skip: ./setup.sh installs Debian's chromium (as root)
and playwright (the dev extra). ``STUDIO_CHROMIUM`` points at another Chromium binary;
``STUDIO_UI_SCREENSHOTS=docs/images`` writes the tab screenshots where the README shows them
(by default they go to the test's temporary folder).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = ROOT / "assets" / "samples" / "subject-heart-red"
CHROMIUM = os.environ.get("STUDIO_CHROMIUM", "/usr/bin/chromium")
# the flags this sandbox needs (no GPU, no sandbox as root, no background calls to Google)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TRAIN_S = 300_000  # ms: a training of a few steps with its model load and sample, on cores others use too
STEP_S = 30_000  # ms: anything else

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python app.py --port P` with a fresh STUDIO_HOME: (url, home, log file)."""
    home = tmp_path_factory.mktemp("studio-home")
    port = _free_port()
    log_path = home.parent / "app.log"
    # one torch thread: the browser shares the two cores with the server, and torch's two threads
    # then spin waiting for each other (a 20-step sample took 9 s with two threads, 2 s with one)
    env = {**os.environ, "STUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"app.py did not serve on {url}:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.5)
    yield url, home, log_path
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium under Playwright; a clear failure when either is missing."""
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run ./setup.sh (it installs the dev extra: pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: run ./setup.sh as root (it installs Debian's chromium), "
                    f"or `apt-get install chromium`, or point STUDIO_CHROMIUM at a Chromium binary")
    # expect() waits 5 s by default: too short for a page load on two cores busy with a training
    expect.set_options(timeout=STEP_S)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def new_page(browser, server):
    """Pages of fresh users (each its own context: its own local storage), closed at the end.

    A script error in any page fails the test; the server's log is printed, and shown when a
    test fails.
    """
    contexts, errors = [], []
    start = server[2].stat().st_size

    def open_page():
        ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(STEP_S)
        page.goto(server[0])
        page.get_by_role("tab", name="Train").wait_for()
        return page

    yield open_page
    for ctx in contexts:
        ctx.close()
    with open(server[2], errors="replace") as fh:
        fh.seek(start)
        print("app.py log during this test:\n" + fh.read()[-4000:])
    assert not errors, f"script errors in the page: {errors}"


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("STUDIO_UI_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _fill_training(page, *, name: str, steps: int, sample_set: str | None = None, uploads=None, kind="subject",
                   token: str = "sks") -> None:
    """Fill the Train form for a short run: batch 1, no prior preservation, one sample prompt."""
    from playwright.sync_api import expect

    if uploads is not None:
        page.get_by_label("Upload images").check()
        page.locator("#train-uploads input[type=file]").set_input_files(uploads)
        expect(page.locator("#upload-note")).to_contain_text(f"{len([u for u in uploads if u.suffix != '.txt'])} "
                                                             f"images ready")
    elif sample_set is not None:
        page.locator("#train-sample-set input").fill(sample_set)
        page.keyboard.press("Enter")
    page.get_by_label(kind, exact=True).check()
    page.get_by_label("Adapter name").fill(name)
    page.get_by_label("Trigger word").fill(token)
    page.locator("#train-steps input").fill(str(steps))
    page.locator("#train-advanced").get_by_text("Advanced").click()
    page.locator("#train-batch input").fill("1")
    page.locator("#train-prior input").uncheck()
    page.locator("#train-sample-prompts textarea").fill(f"a {token} shape on a white background")


def _progress(page):
    return page.locator("#train-progress .studio-progress")


def _trained(page) -> None:
    """Wait for the page's training to end, then insist it ended well (a failure shows its message)."""
    from playwright.sync_api import expect

    expect(_progress(page)).to_have_attribute("data-state", re.compile("done|failed|cancelled"), timeout=TRAIN_S)
    expect(page.locator("#train-status")).to_contain_text("Done", timeout=1000)


def _generated(page) -> None:
    """Wait for the page's generation to end, then insist it ended well (a failure shows its message)."""
    from playwright.sync_api import expect

    expect(page.locator("#generate-status")).to_contain_text(re.compile("Done|Failed|Cancelled"), timeout=TRAIN_S)
    expect(page.locator("#generate-status")).to_contain_text("Done", timeout=1000)


def test_train_find_generate(new_page, server, shots):
    """Upload the heart images, train, find the adapter in the library, generate with it at weight 1."""
    from playwright.sync_api import expect

    page = new_page()
    images = sorted(SUBJECT.glob("*.png")) + sorted(SUBJECT.glob("*.txt"))
    _fill_training(page, name="heart", steps=3, uploads=images, token="hrt")
    page.locator("#train-start").click()
    # (the running state itself is checked on a long run in the next test: a 3-step run can end between polls)
    _trained(page)
    expect(_progress(page)).to_have_attribute("data-progress", "1.000")
    expect(page.locator("#train-status")).to_contain_text("step 3/3")
    expect(page.locator("#train-status")).to_contain_text("Added to the library as heart")
    expect(page.locator("#train-samples img")).to_have_count(1)
    page.locator("#train-advanced").get_by_text("Advanced").click()  # folded again, for the picture
    page.screenshot(path=str(shots / "ui-train.png"), full_page=True)

    page.get_by_role("tab", name="Library").click()
    gallery = page.locator("#library-gallery")
    expect(gallery).to_contain_text("heart · hrt (subject)")
    page.locator("#library-search input, #library-search textarea").first.fill("hrt")
    page.keyboard.press("Enter")
    expect(page.locator("#library-summary")).to_contain_text("1 adapter matching")
    gallery.get_by_role("button", name="Thumbnail 1 of 1").click()
    details = page.locator("#library-details")
    expect(details).to_contain_text("hrt")
    expect(details).to_contain_text("lora")
    expect(page.locator("#library-download")).to_be_enabled()
    page.screenshot(path=str(shots / "ui-library.png"), full_page=True)

    page.locator("#library-use").click()  # into the Generate tab's mix, at weight 1
    expect(page.get_by_role("tab", name="Generate")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#generate-mix")).to_contain_text("heart:1")
    page.locator("#generate-prompt textarea").fill("a hrt shape on a black background")
    page.locator("#generate-seed input").fill("7")
    page.locator("#generate-num input[type=number]").fill("2")
    page.locator("#generate-steps input[type=number]").fill("8")
    page.locator("#generate-steps input[type=number]").press("Enter")
    page.locator("#generate-go").click()
    _generated(page)
    expect(page.locator("#generate-gallery img")).to_have_count(2)
    expect(page.locator("#generate-gallery")).to_contain_text("seed 7 · heart:1")
    params = page.locator("#generate-params textarea")
    expect(params).to_have_value(re.compile(r'Steps: 8.*Seed: 7.*Adapters: "heart:1"'))
    page.screenshot(path=str(shots / "ui-generate.png"), full_page=True)

    # the sweep: the same seed at each weight, as a labelled grid and the images of its cells
    page.locator("#generate-num input[type=number]").fill("1")
    page.locator("#generate-num input[type=number]").press("Enter")
    page.get_by_text("Weight sweep and base model").click()
    page.locator("#generate-sweep-weights input, #generate-sweep-weights textarea").first.fill("0, 1")
    page.locator("#generate-sweep").click()
    expect(page.locator("#generate-status")).to_contain_text("sweep heart:1=0,1")  # the new job, not the last
    _generated(page)
    expect(page.locator("#generate-gallery img")).to_have_count(3)
    expect(page.locator("#generate-gallery")).to_contain_text("grid")
    expect(params).to_have_value(re.compile(r'Sweep: "heart:1=0,1"'))
    grids = list((server[1] / "outputs").rglob("*-grid.png"))
    assert len(grids) == 1 and Image.open(grids[0]).width > 2 * 64  # two 64 px columns and the row labels

    # the Jobs tab lists the page's three jobs (training, generation, sweep), newest first
    page.get_by_role("tab", name="Jobs").click()
    expect(page.locator("#jobs-summary")).to_contain_text("3 done")
    table = page.locator("#jobs-table")
    expect(table).to_contain_text("heart")
    expect(table).to_contain_text("generate")
    page.locator("#jobs-pick input").click()
    page.get_by_role("option", name=re.compile(r"^train-.* heart")).click()
    expect(page.locator("#jobs-detail")).to_contain_text("step 3/3")
    expect(page.locator("#jobs-progress .studio-progress")).to_have_attribute("data-progress", "1.000")
    page.wait_for_timeout(600)  # the bar's width animates for 0.4 s
    page.screenshot(path=str(shots / "ui-jobs.png"), full_page=True)


def test_two_users_queue_and_a_reload_reattaches(new_page):
    """Two trainings from two pages run one after the other and both finish; a page reloaded in
    the middle of a run shows that run's progress, and its Cancel stops it."""
    from playwright.sync_api import expect

    first, second = new_page(), new_page()
    _fill_training(first, name="star-a", steps=2, sample_set="subject-star-blue", token="str")
    _fill_training(second, name="star-b", steps=2, sample_set="subject-star-blue", token="stb")
    first.locator("#train-start").click()
    expect(first.locator("#train-status")).to_contain_text("star-a")
    second.locator("#train-start").click()  # while star-a loads its model: it waits its turn
    expect(second.locator("#train-status")).to_contain_text("Queued star-b: next in line")
    expect(_progress(second)).to_have_attribute("data-state", "queued")

    _trained(first)
    expect(first.locator("#train-status")).to_contain_text("step 2/2")
    expect(first.locator("#train-status")).to_contain_text("Added to the library as star-a")
    # a long run, so the reload below happens mid-run however fast the machine: it is cancelled after
    first.locator("#train-steps input").fill("300")
    first.get_by_label("Adapter name").fill("star-long")
    first.locator("#train-start").click()
    expect(first.locator("#train-status")).to_contain_text("star-long")  # queued behind star-b, or started

    _trained(second)
    expect(second.locator("#train-status")).to_contain_text("Added to the library as star-b")
    expect(first.locator("#train-status")).to_contain_text("Running star-long · step", timeout=TRAIN_S)
    first.reload()  # the job id is in the page's local storage: the progress comes back
    status = first.locator("#train-status")
    expect(status).to_contain_text(re.compile(r"Running star-long · step \d+/300 · loss [\d.]+ · ETA"))
    expect(_progress(first)).to_have_attribute("data-state", "running")
    expect(first.locator("#train-cancel")).to_be_enabled()
    first.locator("#train-cancel").click()
    expect(_progress(first)).to_have_attribute("data-state", "cancelled", timeout=TRAIN_S)
    expect(status).to_contain_text(re.compile(r"training cancelled at step \d+/300"))

    second.get_by_role("tab", name="Library").click()
    gallery = second.locator("#library-gallery")
    expect(gallery).to_contain_text("star-a")
    expect(gallery).to_contain_text("star-b")
    expect(gallery).not_to_contain_text("star-long")


def test_bad_uploads_get_a_message(new_page, tmp_path):
    """A text file named .png, a 50 MB image and 500 files: named in the page; the app goes on."""
    from playwright.sync_api import expect

    page = new_page()
    page.get_by_label("Upload images").check()
    upload = page.locator("#train-uploads input[type=file]")
    note = page.locator("#upload-note")

    fake = tmp_path / "holiday.png"
    fake.write_text("this is not an image\n")
    upload.set_input_files([fake])
    expect(note).to_contain_text("0 images ready")
    expect(note).to_contain_text("holiday.png: not an image")
    page.locator("#train-start").click()
    expect(page.locator("#train-status")).to_contain_text("no usable image was uploaded")

    big = tmp_path / "huge.png"
    Image.new("RGB", (8, 8), "red").save(big)
    with open(big, "ab") as fh:  # a valid PNG with 50 MB after its end: PIL still opens it
        fh.truncate(50 * 2**20)
    clear = page.locator("#train-uploads").get_by_role("button", name="Clear")
    clear.click()  # a new upload adds to the list: start over
    upload.set_input_files([big])
    expect(note).to_contain_text("huge.png: 50.0 MB is over the 20 MB limit")

    many = tmp_path / "many"
    many.mkdir()
    tiny = many / "000.png"
    Image.new("RGB", (4, 4), "blue").save(tiny)
    data = tiny.read_bytes()
    for i in range(1, 500):
        (many / f"{i:03d}.png").write_bytes(data)
    clear.click()
    upload.set_input_files(sorted(many.iterdir()))
    expect(note).to_contain_text("50 images ready; 450 files refused", timeout=60_000)
    expect(note).to_contain_text("050.png: more than 50 images; the rest were left out")
    expect(note).to_contain_text("... and 442 more")

    # still answering: another tab loads, and the sample sets still work
    page.get_by_role("tab", name="Library").click()
    expect(page.locator("#library-summary")).not_to_be_empty()
    page.get_by_role("tab", name="Train").click()
    page.get_by_label("Bundled sample set").check()
    expect(page.locator("#train-sample-set")).to_be_visible()
    # another method brings its own defaults, but a number typed by the user stays
    page.locator("#train-steps input").fill("7")
    page.locator("#train-method input").fill("loha")
    page.keyboard.press("Enter")
    expect(page.locator("#train-lr input")).to_have_value("0.002")
    expect(page.locator("#train-steps input")).to_have_value("7")


def test_library_import_rename_download_delete(new_page, tmp_path):
    """An uploaded adapter file joins the library; it can be renamed, downloaded and deleted."""
    import numpy as np
    from playwright.sync_api import expect
    from safetensors.numpy import save_file

    made = tmp_path / "Spiral Style (v1).safetensors"
    save_file({"unet.w.lora_A.weight": np.zeros((2, 4), dtype=np.float32)}, str(made),
              metadata={"studio.method": "lora", "studio.kind": "style", "studio.trigger": "spirl",
                        "studio.base_family": "sd1"})
    junk = tmp_path / "notes.safetensors"
    junk.write_text("not an adapter")
    page = new_page()
    page.get_by_role("tab", name="Library").click()
    page.get_by_text("Import adapter files").click()
    page.locator("#library-import input[type=file]").set_input_files([made, junk])
    summary = page.locator("#library-summary")
    expect(summary).to_contain_text("Imported Spiral_Style_v1")
    expect(page.locator("#library-import-note")).to_contain_text("notes.safetensors: not a readable .safetensors file")
    expect(page.get_by_test_id("toast-text").first).to_contain_text("notes.safetensors")  # and a toast

    page.locator("#library-search input, #library-search textarea").first.fill("spirl")
    page.keyboard.press("Enter")
    page.locator("#library-gallery").get_by_role("button", name="Thumbnail 1 of 1").click()
    expect(page.locator("#library-details")).to_contain_text("Spiral_Style_v1")
    with page.expect_download() as download:
        page.locator("#library-download").click()
    assert Path(download.value.path()).read_bytes() == made.read_bytes()

    page.locator("#library-new-name input, #library-new-name textarea").first.fill("spiral")
    page.locator("#library-rename").click()
    expect(summary).to_contain_text("Renamed Spiral_Style_v1 to spiral")
    expect(page.locator("#library-gallery")).to_contain_text("spiral · spirl (style)")
    page.locator("#library-gallery").get_by_role("button", name="Thumbnail 1 of 1").click()
    page.locator("#library-delete").click()
    page.locator("#library-delete-confirm").click()
    expect(summary).to_contain_text("Deleted spiral")
    expect(summary).to_contain_text("No adapter matches")


def test_serves_no_file_outside_its_folders(server):
    """The file route refuses the checkout, the system, uploads and the library database."""
    url, home, _ = server
    for path in (ROOT / "pyproject.toml", Path("/etc/passwd"), home / "library.sqlite",
                 ROOT / "assets" / "micro" / "studio_micro.json"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}gradio_api/file={path}", timeout=10)
        assert err.value.code in (403, 404), path
    sample = next(iter(sorted(SUBJECT.glob("*.png"))))
    with urllib.request.urlopen(f"{url}gradio_api/file={sample}", timeout=10) as resp:
        assert resp.status == 200 and resp.read()[:4] == b"\x89PNG"
