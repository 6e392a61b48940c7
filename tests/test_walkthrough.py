"""README "A first hour with dataengine", run as written (markers ``slow``, ``server``).

The blocks marked ``<!-- walkthrough:N -->`` are taken from README.md and run in a throwaway copy of the project (its
git-tracked files, committed in a fresh git repo) with small params. They run as a newcomer would type them into one
terminal: bash with ``set -euo pipefail``, every block starting at the project root and sourcing what the blocks
before it exported (``source .venv/bin/activate`` in step 1 is what puts ``dataengine`` and ``dvc`` on PATH). The
test replaces only what it cannot do as a person would:

- ``bash scripts/quickstart.sh repro`` runs ``dvc repro`` with the venv on PATH. The venv already exists, so this
  is what quickstart.sh runs too, without its install step;
- the port 8080 of Label Studio becomes a free port (a shared machine or CI may use 8080);
- ``dataengine review open`` serves the App until Ctrl-C, so it runs in the background. Its page and its GraphQL API
  are checked over HTTP, then it gets a Ctrl-C (SIGINT);
- the annotation in Label Studio's web page is made through its API, between push and pull, as
  tests/test_review_labelstudio.py does.

HOME is a temporary folder, so Label Studio's data folder (step 3) and FiftyOne's embedded database are the test's
own, never the user's. The Label Studio server is the one from .venv-labelstudio (tests/labelstudio_server.py finds
it); without it the test skips, or fails under DATAENGINE_REQUIRE_SERVERS=1 as CI runs it.

Runtime: 5.4 to 10.5 min measured on a shared 2-core machine with other jobs running (load average 4 to 6); 3.6 to
6.3 min of CPU time. Most of it is the pipeline, run three times: the repro, the re-run after the review and the
experiment. Starting Label Studio takes about 40 s.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from labelstudio_server import INSTALL_HINT, free_port, label_studio_binary
from test_pipeline import TINY

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- walkthrough:(\d+) -->\n```(bash|python)\n(.*?)```", re.S)
STUDENT = "mobilenet_v3_small"

# Small demo (test_pipeline.TINY) and one-epoch budgets: the whole pipeline runs in 1.5 to 4 min here. Such a teacher
# scores every box near its prior (~0.01), so pseudo_label keeps every box and the filter sends every box it
# does not reject to review; otherwise there would be no review queue to push.
SMALL = {
    **TINY,
    "teacher.model.input_size": 64,
    "teacher.train.epochs": 1,
    "teacher.train.batch_size": 8,
    "teacher.train.warmup_epochs": 0,
    "teacher.train.num_workers": 0,
    "teacher.train.max_train_seconds": 0,
    "teacher.train.eval_every": 1,
    "pseudo_label.batch_size": 8,
    "pseudo_label.tta_scales": [1.0],
    "pseudo_label.score_threshold": 0.0,
    "pseudo_label.max_detections": 20,
    "filter.review_min_probability": 0.0,
    "filter.max_per_image": 10,
    "mine.batch_size": 8,
    "distill.students": {STUDENT: {"model": "mobilenet_v3_small_gfl"}},
    "distill.input_size": 64,
    "distill.epoch_size": 16,
    "distill.train.epochs": 1,
    "distill.train.batch_size": 8,
    "distill.train.warmup_epochs": 0,
    "distill.train.eval_every": 1,
    "export.calibration_images": 4,
    "export.latency_runs": 50,
    "export.latency_warmup": 1,
    "export.max_parity_map_drop": 100.0,  # an untrained student's mAP is noise; parity is tested in test_export.py
}


# ---------------------------------------------------------------------------------------------------------------
# The README, the project copy and the terminal
# ---------------------------------------------------------------------------------------------------------------


def readme_blocks(text: str) -> dict[int, tuple[str, str]]:
    """``{N: (language, code)}`` of the README's ``<!-- walkthrough:N -->`` blocks; a number used twice is refused."""
    blocks: dict[int, tuple[str, str]] = {}
    for match in BLOCK.finditer(text):
        number = int(match.group(1))
        if number in blocks:
            raise ValueError(f"README.md: walkthrough:{number} marks two blocks")
        blocks[number] = (match.group(2), match.group(3))
    return blocks


def copy_project(dest: Path, params: dict, dataset: str, app_port: int) -> Path:
    """The git-tracked files of the working tree in a fresh git repo (one commit), with ``params`` applied."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    doc = yaml.safe_load((dest / "params.yaml").read_text())
    for dotted, value in {**params, "review.dataset_name": dataset, "review.app_port": app_port}.items():
        node = doc
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value  # a key params.yaml leaves at its default is added (the stages refuse unknown keys)
    (dest / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    # What a newcomer's clone has beside the tracked files: the venvs quickstart.sh made, a git identity.
    (dest / ".venv").symlink_to(Path(sys.prefix))
    ls_binary = label_studio_binary()
    if ls_binary == ROOT / ".venv-labelstudio" / "bin" / "label-studio":
        (dest / ".venv-labelstudio").symlink_to(ROOT / ".venv-labelstudio")
    else:  # DATAENGINE_LABEL_STUDIO names a binary elsewhere
        (dest / ".venv-labelstudio" / "bin").mkdir(parents=True)
        (dest / ".venv-labelstudio" / "bin" / "label-studio").symlink_to(ls_binary)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "newcomer@example.com"],
                ["git", "config", "user.name", "Newcomer"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "dataengine, small params"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


class Terminal:
    """One simulated terminal: each block runs in a new bash that sources the previous block's exports.

    Every bash gets a process group of its own; :meth:`close` ends what is left in them (the Label Studio server
    that step 3 starts in the background, anything a failed block left behind).
    """

    def __init__(self, cwd: Path, env: dict[str, str], workdir: Path) -> None:
        self.cwd, self.env = cwd, env
        self.exports = workdir / "exports.sh"
        self.logs = workdir / "blocks"
        self.logs.mkdir()
        self.groups: list[int] = []

    def script(self, code: str) -> str:
        return (f"set -euo pipefail\nif [ -f {shlex.quote(str(self.exports))} ]; then "
                f"source {shlex.quote(str(self.exports))}; fi\ncd {shlex.quote(str(self.cwd))}\n"
                f"{code}\nexport -p > {shlex.quote(str(self.exports))}\n")

    def popen(self, code: str) -> subprocess.Popen:
        # A terminal's Ctrl-C reaches a process whose SIGINT is at its default. A test run started in the background
        # by a non-interactive shell (`nohup bash .ci/run &`) inherits SIGINT *ignored*, and bash cannot un-ignore
        # it, so the App would never see the Ctrl-C below: reset it for the block, as a terminal would have it.
        proc = subprocess.Popen(["bash", "-c", self.script(code)], cwd=self.cwd, env=self.env, text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_default_sigint)
        self.groups.append(proc.pid)
        return proc

    def run(self, name: str, code: str, timeout: float = 600) -> str:
        """Run ``code`` to the end; its output (stdout and stderr), or a failure that shows the block and output."""
        proc = self.popen(code)
        start = time.monotonic()
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"README walkthrough block {name} did not finish in {timeout:.0f} s:\n{code}\n"
                        f"--- output (tail) ---\n{out[-6000:]}")
        (self.logs / f"{name}.log").write_text(f"$ {code}\n{out}\n[exit {proc.returncode}, "
                                               f"{time.monotonic() - start:.1f} s]\n")
        assert proc.returncode == 0, (f"README walkthrough block {name} failed (exit {proc.returncode}):\n{code}\n"
                                      f"--- output (tail) ---\n{out[-6000:]}")
        return out

    def exported(self, variable: str) -> str:
        """A variable as the blocks so far left it exported ("" if unset)."""
        out = subprocess.run(["bash", "-c", f'source {shlex.quote(str(self.exports))}; printf %s "${{{variable}:-}}"'],
                             env=self.env, capture_output=True, text=True, check=True)
        return out.stdout

    def close(self) -> None:
        for group in self.groups:
            _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_group_alive(g) for g in self.groups):
            time.sleep(0.5)
        for group in self.groups:
            _signal_group(group, signal.SIGKILL)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_stopped(proc: subprocess.Popen, reader: "LineReader", timeout: float) -> None:
    """Wait for ``proc`` to exit 0; on a hang, fail with its processes and every thread's stack (SIGUSR1)."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = subprocess.run(["ps", "-eo", "pid,ppid,pgid,stat,etime,args"], capture_output=True, text=True).stdout
        for line in tree.splitlines()[1:]:
            fields = line.split(None, 5)
            if fields[2] == str(proc.pid) and "python" in fields[5]:
                os.kill(int(fields[0]), signal.SIGUSR1)  # dataengine review open dumps its stacks
        time.sleep(5)
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"did not stop within {timeout:.0f} s of Ctrl-C; processes:\n{tree}\noutput and stacks:\n"
                    f"{reader.rest()[-8000:]}")
    assert code == 0, reader.rest()[-4000:]


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


class LineReader:
    """Reads a background process's output in a thread, so the test can wait for a line with a timeout."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                continue
            self.seen.append(line)
            if match := re.search(pattern, line):
                return match
        pytest.fail(f"no line matching {pattern!r} within {timeout:.0f} s; output:\n{''.join(self.seen)[-6000:]}")

    def rest(self) -> str:
        self.thread.join(timeout=30)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)


def _http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def _stages_run(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


# ---------------------------------------------------------------------------------------------------------------
# The walkthrough
# ---------------------------------------------------------------------------------------------------------------


def test_readme_blocks_are_numbered_once_and_in_order():
    text = (ROOT / "README.md").read_text()
    blocks = readme_blocks(text)
    assert sorted(blocks) == list(range(1, 11)), "README walkthrough blocks must be 1..10 (update this test)"
    assert [int(n) for n in re.findall(r"<!-- walkthrough:(\d+) -->", text)] == sorted(blocks)
    assert blocks[1][1].splitlines()[0].startswith("bash scripts/quickstart.sh repro")
    assert blocks[9][0] == "python" and all(lang == "bash" for n, (lang, _) in blocks.items() if n != 9)


@pytest.fixture
def ls_binary():
    binary = label_studio_binary()
    if binary is None:
        if os.environ.get("DATAENGINE_REQUIRE_SERVERS") == "1":
            pytest.fail(f"label-studio not found and DATAENGINE_REQUIRE_SERVERS=1: {INSTALL_HINT}")
        pytest.skip(f"label-studio not installed: {INSTALL_HINT}")
    return binary


@pytest.mark.slow
@pytest.mark.server
def test_first_hour(tmp_path, ls_binary):
    started = time.monotonic()
    blocks = readme_blocks((ROOT / "README.md").read_text())
    dataset = f"dataengine-walkthrough-{uuid.uuid4().hex[:10]}"
    proj = tmp_path / "proj"
    proj.mkdir()
    copy_project(proj, SMALL, dataset, free_port())
    home = tmp_path / "home"
    (home / ".cache" / "matplotlib").mkdir(parents=True)
    import matplotlib

    for cache in Path(matplotlib.get_cachedir()).glob("fontlist-*.json"):  # else a fresh HOME rebuilds it (~20 s)
        shutil.copy2(cache, home / ".cache" / "matplotlib" / cache.name)
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "FIFTYONE_")) and k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HOME=str(home), PATH=path, DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    term = Terminal(proj, env, tmp_path)
    timings: dict[str, float] = {}

    def step(name: str, code: str, **kwargs) -> str:
        t0 = time.monotonic()
        out = term.run(name, code, **kwargs)
        timings[name] = round(time.monotonic() - t0, 1)
        return out

    try:
        # 1. the pipeline, the metrics, the report
        _, code = blocks[1]
        quickstart = "bash scripts/quickstart.sh repro"
        assert code.startswith(quickstart)
        # The venv exists (the copy links to this one), so quickstart.sh would skip its install and run `dvc repro`
        # with the venv on PATH; the test runs that directly. The PATH change stays inside the parentheses, so the
        # README's `source .venv/bin/activate` is still what the next commands need.
        code = code.replace(quickstart, '(export PATH="$PWD/.venv/bin:$PATH"; dvc repro)', 1)
        out = step("1", code)
        for stage in ("prepare", "train_teacher", "pseudo_label", "filter", "review", "rebalance", "mine",
                      f"distill@{STUDENT}", f"baseline@{STUDENT}", f"export@{STUDENT}", "evaluate"):
            assert f"Running stage '{stage}'" in out, stage
        summary = json.loads((proj / "metrics/summary.json").read_text())
        assert {"teacher", "students", "baseline"} <= set(summary) and STUDENT in summary["students"]
        assert {"mAP", "AP50", "mIoU", "gflops"} <= set(summary["students"][STUDENT])
        for name in ("data", "teacher", "pseudo", "review", "rebalance", "mine"):
            assert (proj / f"metrics/{name}.json").is_file(), name
        for name, key in (("teacher", '"scenario_test": {'), ("pseudo", r'"review": \d+')):  # dvc metrics show
            assert re.search(rf'"metrics/{name}.json": {{\s+"data": {{.*{key}', out, re.S), name
        assert "# Scenario test evaluation" in out and f"| {STUDENT} | student |" in out  # cat reports/summary.md
        assert term.exported("VIRTUAL_ENV") == sys.prefix  # source .venv/bin/activate (the copy's link to it)

        # 2. the FiftyOne App: serves until Ctrl-C, so in the background; its page and its API, then Ctrl-C
        t0 = time.monotonic()
        app = term.popen(blocks[2][1])
        reader = LineReader(app)
        url = reader.wait_for(r"FiftyOne App: (http://\S+)", timeout=300).group(1)
        status, page = _http(url)
        assert status == 200 and b"<html" in page.lower()
        query = ("query Q($name: String!) { dataset(name: $name) { name estimatedSampleCount savedViews { name } "
                 "sampleFields { path } } }")
        status, body = _http(url.split("/datasets/")[0] + "/graphql", {"query": query, "variables": {"name": dataset}})
        assert status == 200
        served = json.loads(body)["data"]["dataset"]
        assert served["name"] == dataset and served["estimatedSampleCount"] == sum(  # pool + general train and val
            TINY[f"data.demo.n_{split}"] for split in ("pool", "train", "val"))
        assert {"review_queue", "rejected_confident", "hard_negatives", "mined_hard_negatives"} <= {
            v["name"] for v in served["savedViews"]}
        assert {"accepted", "review", "rejected", "teacher", "segmentation", "uncertainty", "ground_truth"} <= {
            f["path"] for f in served["sampleFields"]}
        _signal_group(app.pid, signal.SIGINT)  # Ctrl-C
        _wait_stopped(app, reader, timeout=180)
        assert "serving until Ctrl-C" in reader.rest() and "App stopped" in reader.rest()
        timings["2"] = round(time.monotonic() - t0, 1)

        # 3. Label Studio on 127.0.0.1 with the README's account and token (first start: migrations)
        port = free_port()
        _, code = blocks[3]
        assert code.count("8080") == 2, "step 3 should name port 8080 twice (URL and --port)"
        out = step("3", code.replace("8080", str(port)), timeout=300)
        assert re.search(r'"status":\s*"UP"', out), out  # curl /health
        ls_url, token = term.exported("LABEL_STUDIO_URL"), term.exported("LABEL_STUDIO_API_KEY")
        assert ls_url == f"http://127.0.0.1:{port}" and re.fullmatch(r"[0-9a-f]{40}", token)
        data_dir = Path(term.exported("LABEL_STUDIO_BASE_DATA_DIR"))
        assert data_dir.is_relative_to(home) and (data_dir / "api-token").read_text().strip() == token

        # 4. push the review queue and the audit sample
        out = step("4", blocks[4][1])
        queue_images = {r["file_name"] for r in json.loads((proj / "data/filtered/review_queue.json").read_text())}
        queue_images |= {r["file_name"] for r in json.loads((proj / "data/filtered/audit.json").read_text())}
        assert queue_images and f"{len(queue_images)} new, 0 updated, 0 unchanged" in out, out
        from label_studio_sdk import LabelStudio

        ls = LabelStudio(base_url=ls_url, api_key=token)
        (project,) = [p for p in ls.projects.list() if p.title == "dataengine review"]
        tasks = sorted((t.model_dump(mode="json") for t in ls.tasks.list(project=project.id, fields="all")),
                       key=lambda t: t["data"]["file_name"])
        assert {t["data"]["file_name"] for t in tasks} == queue_images

        # ... what the reviewer does in the web page: on the first image keep one predicted box, delete the others
        # and draw a missed object; flag the second image as a negative (every box deleted)
        first, second = tasks[0], tasks[1]
        boxes = [r for r in first["predictions"][0]["result"] if r["type"] == "rectanglelabels"]
        assert len(boxes) >= 2
        drawn = {**boxes[0], "id": "drawn1", "value": {**boxes[0]["value"], "x": 10.0, "y": 10.0, "width": 30.0,
                                                         "height": 30.0, "rectanglelabels": ["star"]}}
        ls.annotations.create(id=first["id"], result=[boxes[0], drawn])
        ls.annotations.create(id=second["id"], result=[{"id": "flag1", "type": "choices", "from_name": "flags",
                                                         "to_name": "image", "value": {"choices": ["negative"]}}])

        # 5. pull, and the diff of the decisions file
        decisions = proj / "data/review/decisions.json"
        before = decisions.read_text()
        out = step("5", blocks[5][1])
        doc = json.loads(decisions.read_text())
        assert decisions.read_text() != before
        first_name, second_name = first["data"]["file_name"], second["data"]["file_name"]
        labels = {k: v["decision"] for k, v in doc["labels"].items() if v["file_name"] == first_name}
        assert sorted(labels.values()) == ["accept"] + ["reject"] * (len(boxes) - 1), labels
        assert doc["images"][first_name]["added"] and doc["images"][second_name]["flags"] == ["negative"]
        rejects = sum(v["decision"] == "reject" for v in doc["labels"].values())
        assert f"pulled 2 annotated of {len(tasks)} tasks" in out and f"1 accept, 0 correct, {rejects} reject" in out
        for added in ('"decision": "accept"', '"decision": "reject"', '"negative"', f'"{first_name}#'):  # git diff
            assert re.search(rf'^\+\s*{re.escape(added)}', out, re.M), added

        # 6. dvc status names the stages the decisions feed; dvc repro re-runs them and nothing upstream; commit
        out = step("6", blocks[6][1])
        status_part = out.split("Running stage", 1)[0]
        assert all(f"{s}:" in status_part for s in ("filter", "review", "mine")), status_part
        assert "data/review/decisions.json" in status_part
        ran = _stages_run(out)
        assert {"filter", "review", "mine", f"distill@{STUDENT}", f"export@{STUDENT}", "evaluate"} <= ran, ran
        assert not ran & {"prepare", "train_teacher", "pseudo_label", f"baseline@{STUDENT}"}, ran
        pseudo = json.loads((proj / "metrics/pseudo.json").read_text())
        assert pseudo["reviewed_labels"] == len(doc["labels"]), pseudo["reviewed_labels"]
        review = json.loads((proj / "metrics/review.json").read_text())
        assert review["decisions"]["accept"] == 1 and review["decisions"]["reject"] == rejects
        assert review["decisions"]["added"] == 1 and review["decisions"]["negative"] == 1
        log = subprocess.run(["git", "log", "-1", "--format=%s", "--name-only"], cwd=proj, capture_output=True,
                             text=True, check=True).stdout
        assert log.startswith("review: first decisions") and "data/review/decisions.json" in log
        assert "dvc.lock" in log and "metrics/review.json" in log

        # 7. an experiment, the comparison table and the metrics diff against the commit
        out = step("7", blocks[7][1])
        ran = _stages_run(out)
        assert ran == {f"distill@{STUDENT}", f"export@{STUDENT}", "evaluate"}, ran
        assert re.search(r"^\W*\w+ \[no-rebalance\]", out, re.M), out[-3000:]  # a row of dvc exp show
        # rows of dvc metrics diff (path, key, HEAD, workspace): it lists changed values only, so the keys checked are
        # ones the experiment must change (train_seconds, rounded to 0.1 s, can be equal on a fast machine)
        assert re.search(rf"^metrics/students/{STUDENT}\.json\s+used\.rebalance\s+True\s+False", out, re.M), out[-3000:]
        assert re.search(rf"^metrics/students/{STUDENT}\.json\s+final_losses\.loss\s+[-\d.e]+\s+[-\d.e]+", out,
                         re.M), out[-3000:]
        assert yaml.safe_load((proj / "params.yaml").read_text())["distill"]["rebalance"] is False
        students = json.loads((proj / f"metrics/students/{STUDENT}.json").read_text())
        assert students["used"]["rebalance"] is False

        # 8. dataengine predict -> COCO results
        out = step("8", blocks[8][1])
        results = json.loads((proj / "preds.json").read_text())
        images = sorted((proj / "data/prepared/scenario/test/images").iterdir())
        assert isinstance(results, list) and results and f"{len(results)} results, the first:" in out
        from pycocotools import mask as mask_utils

        for entry in results:
            assert 1 <= entry["image_id"] <= len(images) and 1 <= entry["category_id"] <= 5
            assert entry["file_name"].endswith(images[entry["image_id"] - 1].name)
            if "segmentation" in entry:
                size = TINY["data.demo.image_size"]
                assert mask_utils.decode(entry["segmentation"]).shape == (size, size)
            else:
                *_, w, h = entry["bbox"]
                assert w >= 0 and h >= 0 and 0 <= entry["score"] <= 1
        assert any("segmentation" in e for e in results)

        # 9. the Python snippet
        snippet = tmp_path / "snippet.py"
        snippet.write_text(blocks[9][1])
        out = step("9", f"python {shlex.quote(str(snippet))}")
        assert re.match(r"\s*\[('(circle|square|triangle|star|cross)'(, )?)*\] \[", out), out  # class names, boxes

        # 10. stop Label Studio
        pid = int((data_dir / "server.pid").read_text())
        step("10", blocks[10][1])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.5)
        assert not _pid_alive(pid), "the Label Studio server did not stop"
    finally:
        term.close()
        _stop_fiftyone_db(home)
        _delete_leaked_dataset(dataset)
    print(f"walkthrough: {time.monotonic() - started:.0f} s; per block {timings}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie (exited, not yet reaped) counts as stopped
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


def _delete_leaked_dataset(name: str) -> None:
    """Delete the walkthrough's dataset from this process's FiftyOne database, if it landed there.

    The walkthrough runs under its own HOME, but FiftyOne connects to a ``mongod`` that is already running (the one
    the review tests of this session started) rather than start one for that HOME, so the README's persistent
    dataset would otherwise stay in the developer's database after every run.
    """
    import fiftyone as fo

    if name in fo.list_datasets():
        fo.delete_dataset(name)


def _stop_fiftyone_db(home: Path) -> None:
    """End the embedded MongoDB that FiftyOne started for this test's HOME, if it is still running."""
    marker = str(home / ".fiftyone")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "mongod" in cmdline and marker in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except ProcessLookupError:
                pass
