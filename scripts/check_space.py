"""Rehearse the Hugging Face Space image without a container engine: what the Dockerfile does, step by step, here.

1. The build context: the files `.dockerignore` lets through, selected by the Docker SDK's own matcher
   (`docker.utils.build.exclude_paths`), copied into a staging folder.
2. The install: a fresh virtual environment (no system packages) and the Dockerfile's `pip install .` of the staged
   package, from the package index; then its assertion that torch is not installed.
3. The container command: the Dockerfile's CMD (`streamlit run app.py ...`) from the staged folder, with the
   Dockerfile's ENV, until its HEALTHCHECK URL answers.
4. Every dashboard page in Debian's chromium (Playwright): the page's title is drawn and no exception or error
   card appears (the Live page must say how to enable itself, since the image has no torch).

Not rehearsed: the base image, the user account and file ownership, Docker's layer cache. Needs network access to
the package index, `pip install docker playwright` here, and /usr/bin/chromium.

Usage: python scripts/check_space.py [--keep DIR]     (prints a JSON summary; exit 0 when every check passed)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = ["overview", "steps", "layers", "probes", "self_correction", "working_memory", "interventions", "ensemble",
         "compare", "live"]


def dockerfile() -> dict:
    """ENV pairs, the RUN command lines, the CMD argument list, the HEALTHCHECK command and the exposed port."""
    text = (REPO / "Dockerfile").read_text()
    lines, buf = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        buf += raw.rstrip("\\").rstrip() + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            if buf.strip():
                lines.append(buf.strip())
            buf = ""
    out = {"env": {}, "run": [], "cmd": None, "health": None, "port": None}
    for line in lines:
        op, _, rest = line.partition(" ")
        if op == "ENV":
            out["env"].update(dict(re.findall(r'(\w+)=("[^"]*"|\S+)', rest)))
        elif op == "RUN":
            out["run"].append(rest)
        elif op == "CMD":
            out["cmd"] = json.loads(rest)
        elif op == "HEALTHCHECK":
            out["health"] = re.search(r"https?://[^'\"]+", rest).group(0)
        elif op == "EXPOSE":
            out["port"] = int(rest.split()[0])
    return out


def stage_context(dest: Path) -> int:
    from docker.utils.build import exclude_paths

    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.lstrip().startswith("#")]
    files = sorted(exclude_paths(str(REPO), patterns))
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return len(files)


def install(stage: Path, venv: Path, runs: list[str]) -> float:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    started = time.perf_counter()
    for command in runs:
        if "pip install" not in command:
            continue  # useradd / mkdir / chown: the container's user account, not rehearsed
        # `--user` installs into the image user's home; here the fresh venv plays that role
        shell = command.replace("pip install --user", f"{py} -m pip install").replace("python -c", f"{py} -c")
        subprocess.run(shell, shell=True, cwd=stage, check=True)
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visit_pages(url: str) -> dict[str, str]:
    from playwright.sync_api import sync_playwright

    problems = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for name in PAGES:
            page.goto(f"{url}/{name}")
            page.wait_for_selector("h1", timeout=90_000)
            page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=90_000)
            errors = page.locator("[data-testid='stException'], [data-testid='stAlertContentError']").all_inner_texts()
            if errors:
                problems[name] = errors[0][:300]
        browser.close()
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", type=Path, help="stage into this folder and keep it (default: a temporary folder)")
    args = p.parse_args()
    spec = dockerfile()
    root = args.keep or Path(tempfile.mkdtemp(prefix="space-"))
    stage, venv = root / "app", root / "venv"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    summary = {"context_files": stage_context(stage), "has_cached_runs": (stage / "cached_runs").is_dir(),
               "has_models": (stage / "models").exists()}
    summary["install_s"] = round(install(stage, venv, spec["run"]), 1)
    port = free_port()
    cmd = [str(venv / "bin" / c) if i == 0 else c for i, c in enumerate(spec["cmd"])]
    cmd[cmd.index("--server.port") + 1] = str(port)
    env = {k: v.strip('"') for k, v in spec["env"].items() if k not in ("PATH", "HOME")}
    env["COS_RUNS_DIR"] = str(stage / "cached_runs")  # the image's /home/user/app/cached_runs
    env = {**{k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}, **env}
    log = open(root / "server.log", "w")
    started = time.perf_counter()
    server = subprocess.Popen(cmd, cwd=stage, env=env, stdout=log, stderr=subprocess.STDOUT)
    health = spec["health"].replace(f":{spec['port']}", f":{port}")
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(health, timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit(f"the app did not answer {health}: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        summary["healthy_after_s"] = round(time.perf_counter() - started, 1)
        summary["page_problems"] = visit_pages(f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()
    torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True)
    summary["torch_in_image"] = torch.returncode == 0
    summary["ok"] = (not summary["page_problems"] and summary["has_cached_runs"] and not summary["has_models"]
                     and not summary["torch_in_image"])
    print(json.dumps(summary, indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
