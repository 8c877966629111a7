"""Every shell command of README.md runs as written, so the guide cannot drift from the code.

The commands of every ```sh / ```bash / ```shell / ```console block (console: the ``$ `` lines)
run in README order, each in its own ``bash -c``, from a temporary working directory laid out like
the repository root after ``make demo``: ``configs/`` (copied), ``assets/``, ``Makefile``,
``pyproject.toml``, ``constraints.txt``, ``scripts/`` and ``.venv`` (links). They depend on each
other as a user's session does (``train`` before ``generate`` before ``featurize`` ...), so run
the module as a whole. Nothing is skipped; what the test changes, and why:

* **Tiny settings.** ``configs/digits2.yaml`` and ``configs/eval/digits2.yaml`` in the working
  directory are tiny stand-ins (:data:`TINY_TRAIN`, :data:`TINY_EVAL`) for the files the README
  names, so the commands themselves run unchanged (likewise the text-to-image demo's LoRA config,
  :func:`tiny_styles_lora`, and ``configs/eval/t2i-digit-styles.yaml``: its smoke config); ``make demo`` gets
  ``DEMO_ARGS="--retrain --config configs/digits2.yaml"`` (retrain the tiny stand-in instead of
  featurizing with the shipped demo model, which takes minutes); ``diffattr demo
  --text-to-image`` gets ``--config`` naming the workspace's tiny LoRA config (the demo reads the
  checkout's otherwise).
* **make.** ``make test`` would run this test again (recursion): it is checked with
  ``make -n test``. Every ``make`` runs with ``-o .venv/.diffattr-installed -o system-packages``,
  so the test never reinstalls the venv or calls apt-get.
* **A user's own files** are created here: ``my_digit.png`` and ``my_folder/`` (PNGs of the tiny
  model's size), ``~/data/cifar-10-batches-py`` (a fake CIFAR-10 in the official format, ``HOME``
  is a temporary folder) and a tiny random CLIP checkpoint replacing
  ``/path/to/clip-vit-base-patch32``.

Environment: ``.venv/bin`` first on ``PATH``, ``OMP_NUM_THREADS=1``, ``HF_HUB_OFFLINE=1``.
Each command must exit 0 and leave the files it promises (:func:`promises`); a command the test
knows no promise for fails, so a new README command needs a line here.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from diffattr.data.fixtures import write_cifar10_fixture
from diffattr.testing import tiny_clip_folder, tiny_t2i_folder

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV = Path(sys.prefix)  # the venv running the tests (make test: .venv)
SHELL_BLOCKS = {"sh", "bash", "shell", "console"}
# Recipes make must not run inside a test: the venv install and the apt-get of system packages.
MAKE_OLD = ["-o", ".venv/.diffattr-installed", "-o", "system-packages"]
DEMO_ARGS = "--retrain --config configs/digits2.yaml"
T2I_DEMO_CONFIG = "configs/t2i-digit-styles-lora.yaml"  # the workspace's tiny stand-in
COMMAND_TIMEOUT_S = 300

# A UNet of two plain blocks (no attention: half the featurization time of the attention one),
# 16x16 like the demo model, so data sets are read at the model's size, not their native 8x8.
# 50 training timesteps because `diffattr generate` samples with 50 steps by default; every
# gradient method then uses all of its (at most 50) timesteps. 24 images: enough for `ggda`'s
# 20 k-means groups.
TINY_UNET = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}
TINY_TRAIN = {
    "seed": 0,
    "data": {"source": "digits-2", "size": 16, "limit": 24},
    "model": TINY_UNET,
    "scheduler": {"num_train_timesteps": 50},
    "train": {"steps": 4, "batch_size": 16, "lr_warmup_steps": 1, "checkpoint_every": 2},
    "sample": {"sampler": "ddim", "num_inference_steps": 4},
}
_EVAL_METHOD = {"timesteps": 2, "proj_dim": 64, "batch_size": 16}
TINY_EVAL = {
    "experiment": {
        "seed": 0,
        "data": {"source": "digits-2", "size": 8, "limit": 24},
        "model": {**TINY_UNET, "sample_size": 8},
        "scheduler": {"num_train_timesteps": 50},
        "train": {"steps": 4, "batch_size": 16, "lr_warmup_steps": 1, "checkpoint_every": 2},
        "sample": {"sampler": "ddim", "num_inference_steps": 4},
    },
    "subsets": {"num_subsets": 4, "alpha": 0.5, "seeds_per_subset": 1, "seed": 0},
    "queries": {"held_out": 2, "generated": 2, "seed": 0},
    "ground_truth": {"timesteps": 5, "noise_draws": 1, "seed": 0},
    "methods": {
        "pixel": {},
        "trak": dict(_EVAL_METHOD),
        "d-trak": dict(_EVAL_METHOD),
        "das": dict(_EVAL_METHOD),
        "journey-trak": {"proj_dim": 64, "batch_size": 16},
    },
    "counterfactual": {"enabled": False},
    "lds": {"bootstrap": 50, "seed": 0, "level": 0.95},
    "workers": 1,
}
STAND_INS = {
    "/path/to/clip-vit-base-patch32": "{clip}",
    "/path/to/stable-diffusion-v1-5": "{sd}",  # a tiny StableDiffusionPipeline folder
}
STYLES = ("post_impressionism", "ukiyo_e")  # ~/artbench-256/{train,test}/<style>/ stand-ins


def tiny_styles_lora() -> dict[str, Any]:
    """configs/t2i-digit-styles-lora.yaml (the text-to-image demo's LoRA on the shipped base)
    with 24 images and 4 steps."""
    cfg = yaml.safe_load((ROOT / "configs" / "t2i-digit-styles-lora.yaml").read_text())
    cfg["data"]["limit"] = 24
    cfg["train"].update(steps=4, batch_size=8, lr_warmup_steps=1, checkpoint_every=2)
    return cfg


def tiny_lora_config() -> dict[str, Any]:
    """configs/t2i-lora-example.yaml at the tiny pipeline's 16 px, 2 steps, rank 2, fp32."""
    cfg = yaml.safe_load((ROOT / "configs" / "t2i-lora-example.yaml").read_text())
    cfg["lora"]["rank"] = 2
    for key in ("limit", "selection", "selection_seed"):
        cfg["data"].pop(key, None)
    cfg["data"]["size"] = 16
    cfg["train"].update(
        epochs=None, steps=2, batch_size=4, mixed_precision="no", checkpoint_every=2, log_every=1
    )
    return cfg


# --------------------------------------------------------------------------- README parsing
@dataclass(frozen=True)
class Command:
    line: int  # README line of the command's first line
    text: str  # as written: continuation lines joined, comment stripped

    @property
    def id(self) -> str:
        words = re.sub(r"[^A-Za-z0-9.,=_/-]+", "-", self.text.replace(".venv/bin/", ""))
        return f"L{self.line}-{words[:60].strip('-')}"


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """``(info string, line of the first content line, lines)`` of every fenced block."""
    blocks, current, lang, start = [], None, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```(.*)$", line)
        if current is None and fence:
            info = fence.group(1).strip().lower().split()
            current, lang, start = [], info[0] if info else "", n + 1
        elif current is not None and fence and not fence.group(1).strip():
            blocks.append((lang, start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def strip_comment(line: str) -> str:
    """``line`` without its shell comment (a ``#`` outside quotes, at the start or after a blank)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[Command]:
    out = []
    for lang, start, lines in fenced_blocks(text):
        if lang not in SHELL_BLOCKS:
            continue
        pending, first = "", 0
        for n, raw in enumerate(lines, start):
            line = raw
            if lang == "console":
                if not (line.startswith("$ ") or pending):
                    continue
                line = line[2:] if line.startswith("$ ") and not pending else line
            if not pending:
                first = n
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            cmd = strip_comment(pending + line).strip()
            pending = ""
            if cmd:
                out.append(Command(first, cmd))
    return out


COMMANDS = readme_commands(README.read_text())


# --------------------------------------------------------------------------- promises
def _after(argv: list[str], flag: str, default: str | None = None) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else default


def _subcommand(argv: list[str]) -> list[str]:
    """The words after ``diffattr`` (or ``-m diffattr.cli``), global flags dropped."""
    for i, word in enumerate(argv):
        if Path(word).name == "diffattr" or word == "diffattr.cli":
            return [w for w in argv[i + 1 :] if w not in ("-q", "--quiet", "-v", "--verbose")]
    return []


def chromium_present() -> bool:
    from diffattr.report.render import find_chromium

    return find_chromium() is not None


def promises(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(paths that must exist, strings stdout must contain)`` after ``argv`` ran."""
    if argv[0] in ("source", "."):
        return [], []
    if argv[0] == "make":
        if "test" in argv:
            return [], ["pytest"]
        if "demo" in argv:
            out = "runs/demo"
            for word in argv:
                if word.startswith("DEMO_OUT="):
                    out = word.split("=", 1)[1]
            report = [f"{out}/report/report.html", f"{out}/report/report.json"]
            if chromium_present():
                report.append(f"{out}/report/report.pdf")
            generated = [f"{out}/generated/{i:04d}.png" for i in (0, 3, 15)]
            features = [f"{out}/features/{m}/diffattr.json" for m in ("d-trak", "das")]
            return [*report, *generated, *features, f"{out}/model/diffattr.json"], []
    sub = _subcommand(argv)
    if not sub:
        raise AssertionError(f"no promise known for {shlex.join(argv)!r}: add one to promises()")
    out = _after(sub, "--out")
    if sub[0] in ("--help", "-h"):
        return [], ["featurize", "attribute", "report"]
    if sub[0] == "methods":
        return [], ["d-trak", "das", "unlearn"]
    if sub[:2] == ["data", "list"]:
        return [], ["digits-2", "cifar2"]
    if sub[:2] == ["data", "inspect"]:
        return [], ['"n"', "data_hash"]
    if sub[:2] == ["data", "export"]:
        return [f"{out}/**/*.png"], []
    if sub[0] == "train" and "t2i-lora" in (_after(sub, "--config") or ""):
        return [f"{out}/pytorch_lora_weights.safetensors", f"{out}/diffattr.json"], []
    if sub[0] == "train":
        return [f"{out}/model_index.json", f"{out}/diffattr.json", f"{out}/unet"], []
    if sub[0] == "generate":
        n = int(_after(sub, "--n", "16"))
        names = [f"{i:04d}.png" for i in range(n)] + ["grid.png", "sample.json"]
        return [f"{out}/{name}" for name in names], []
    if sub[0] == "featurize":
        methods = _after(sub, "--method", "").split(",")
        if len(methods) == 1:
            return [f"{out}/diffattr.json"], []
        return [f"{out}/{m}/diffattr.json" for m in methods], []
    if sub[0] == "attribute":
        files = [] if out is None else [f"{out}/{n}" for n in ("scores.safetensors", "top_k.csv")]
        return files, ["top-"]
    if sub[0] == "report":
        files = [f"{out}/report.html", f"{out}/report.json"]
        if chromium_present() and "--no-pdf" not in sub:
            files.append(f"{out}/report.pdf")
        return files, ["near copy"]
    if sub[0] == "demo":
        out = out or ("runs/demo-t2i" if "--text-to-image" in sub else "runs/demo")
        report = [f"{out}/report/report.html", f"{out}/report/report.json"]
        model = "lora/pytorch_lora_weights.safetensors" if "--text-to-image" in sub else "model"
        return [*report, f"{out}/generated/0003.png", f"{out}/{model}"], ["Next:"]
    if sub[0] == "evaluate":
        methods = _after(sub, "--methods", "").split(",")
        return [f"{out}/comparison.md", f"{out}/results.json"], methods
    raise AssertionError(f"no promise known for {shlex.join(argv)!r}: add one to promises()")


# --------------------------------------------------------------------------- the workspace
def _png(path: Path, size: int, seed: int) -> None:
    """A grey digit-like ring of ``size`` x ``size`` pixels."""
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    ring = np.exp(-(((xx / 0.6) ** 2 + (yy / 0.8) ** 2 - 0.6) ** 2) / 0.05)
    noise = np.random.default_rng(seed).normal(0, 0.05, ring.shape)
    pixels = np.clip((ring + noise) * 255, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("readme")
    work, home = tmp / "work", tmp / "home"
    shutil.copytree(ROOT / "configs", work / "configs")
    (work / "configs" / "digits2.yaml").write_text(yaml.safe_dump(TINY_TRAIN))
    (work / "configs" / "eval" / "digits2.yaml").write_text(yaml.safe_dump(TINY_EVAL))
    for name in ("assets", "scripts", "Makefile", "pyproject.toml", "constraints.txt"):
        (work / name).symlink_to(ROOT / name)
    (work / ".venv").symlink_to(VENV)
    size = TINY_TRAIN["model"]["sample_size"]
    _png(work / "my_digit.png", size, 0)
    for i in range(2):
        _png(work / "my_folder" / f"digit{i}.png", size, i + 1)
    write_cifar10_fixture(home / "data", n_per_batch=4)
    clip = tiny_clip_folder(tmp / "clip-vit-base-patch32")
    sd = tiny_t2i_folder(tmp / "stable-diffusion-v1-5")
    (work / "configs" / "t2i-lora-example.yaml").write_text(yaml.safe_dump(tiny_lora_config()))
    (work / "configs" / "t2i-digit-styles-lora.yaml").write_text(yaml.safe_dump(tiny_styles_lora()))
    # The text-to-image evaluation: its smoke test (a base trained for a few steps, 4 subsets).
    shutil.copy(
        ROOT / "configs" / "eval" / "t2i-digit-styles-smoke.yaml",
        work / "configs" / "eval" / "t2i-digit-styles.yaml",
    )
    rng = np.random.default_rng(7)
    for split, style in ((sp, st) for sp in ("train", "test") for st in STYLES):
        for i in range(3 if split == "train" else 1):
            path = home / "artbench-256" / split / style / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    # Run as a user's shell would, also when this test runs inside `make test`: the outer make's
    # MAKEFLAGS / MAKELEVEL would make `make demo` a sub-make that prints "make[1]: Leaving
    # directory" after the demo's own last lines.
    inherited = ("VIRTUAL_ENV", "PYTHONPATH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update(
        PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        HOME=str(home),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MPLBACKEND="Agg",
    )
    return {"work": work, "home": home, "clip": clip, "sd": sd, "env": env}


def as_run(cmd: Command, ws: dict) -> str:
    """The command line the test runs for ``cmd``: stand-ins and make's test-only flags."""
    text = cmd.text
    for written, stand_in in STAND_INS.items():
        text = text.replace(written, stand_in.format(**{k: str(v) for k, v in ws.items()}))
    argv = shlex.split(text)
    if argv and argv[0] == "make":
        targets = [w for w in argv[1:] if not w.startswith("-") and "=" not in w]
        if "test" in targets:  # running the suite from inside the suite would recurse
            return shlex.join(["make", "-n", *MAKE_OLD, *argv[1:]])
        extra = [] if any(w.startswith("DEMO_ARGS=") for w in argv) else [f"DEMO_ARGS={DEMO_ARGS}"]
        return shlex.join(["make", *MAKE_OLD, *argv[1:], *extra])
    if _subcommand(argv)[:1] == ["demo"] and "--text-to-image" in argv and "--config" not in argv:
        # The demo reads its LoRA config from the checkout: point it at the tiny stand-in.
        return f"{text} --config {T2I_DEMO_CONFIG}"
    return text


def run(line: str, ws: dict) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        ["bash", "-c", line],
        cwd=ws["work"],
        env=ws["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a timeout kills torchrun's workers too
    )
    try:
        stdout, stderr = proc.communicate(timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {COMMAND_TIMEOUT_S} s: {line}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(line, proc.returncode, stdout, stderr)


def check_demo_plumbing(ws: dict) -> None:
    """Fail at once, not after minutes of real training, where `make demo` cannot take the tiny
    settings yet (DEMO_ARGS / --retrain)."""
    makefile = (ws["work"] / "Makefile").read_text()
    assert "DEMO_ARGS" in makefile, "the Makefile does not pass DEMO_ARGS to `diffattr demo`"
    res = run("diffattr demo --help", ws)
    assert res.returncode == 0 and "--retrain" in res.stdout, (
        "`diffattr demo` has no --retrain option, so `make demo` cannot run on the tiny config:\n"
        + res.stdout[-2000:]
        + res.stderr[-2000:]
    )


# --------------------------------------------------------------------------- the tests
def test_readme_has_the_commands_of_a_guide():
    texts = [c.text for c in COMMANDS]
    assert "make demo" in texts and "make test" in texts
    for sub in ("train", "generate", "featurize", "attribute", "report", "evaluate"):
        assert any(re.search(rf"\bdiffattr(\.cli)? {sub}\b", t) for t in texts), sub
    assert any(t.startswith(("accelerate launch", "torchrun")) for t in texts)


def test_commands_are_extracted_as_a_shell_reads_them():
    text = "\n".join(
        [
            "```sh",
            "make demo   # a comment",
            "diffattr report --model m \\",
            "    --out 'r#1/'  # the out folder",
            "# a whole-line comment",
            "```",
            "```console",
            "$ diffattr methods",
            "d-trak  D-TRAK: ...",
            "```",
            "```python",
            "print('not a shell command')",
            "```",
        ]
    )
    assert readme_commands(text) == [
        Command(2, "make demo"),
        Command(3, "diffattr report --model m      --out 'r#1/'"),
        Command(8, "diffattr methods"),
    ]


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) < 250, "README.md is a guide: measured tables go to docs/"
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: link to a missing file {target}"
            if anchor and file.suffix == ".md":
                assert anchor in heading_slugs(file), f"{page.name}: no heading #{anchor} in {path}"


def heading_slugs(page: Path) -> set[str]:
    """GitHub's anchors of ``page``'s headings (lower case, punctuation dropped, blanks -> -)."""
    slugs = set()
    for line in page.read_text().splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            slugs.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return slugs


def test_python_blocks_compile_and_import():
    """The Python tour runs the commands' tiny model in minutes of d-trak; here it must at least
    compile and every name it imports must exist."""
    blocks = fenced_blocks(README.read_text())
    python = [(n, "\n".join(lines)) for lang, n, lines in blocks if lang == "python"]
    assert python, "README.md has no Python block"
    for n, code in python:
        tree = ast.parse(code, filename=f"README.md:{n}")
        imports = [s for s in tree.body if isinstance(s, ast.Import | ast.ImportFrom)]
        exec(compile(ast.Module(body=imports, type_ignores=[]), f"README.md:{n}", "exec"), {})


@pytest.mark.slow
@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command_runs_as_written(cmd: Command, workspace: dict) -> None:
    line = as_run(cmd, workspace)
    argv = shlex.split(line)
    if argv[0] == "make" and "demo" in argv:
        check_demo_plumbing(workspace)
    res = run(line, workspace)
    assert res.returncode == 0, (
        f"README.md line {cmd.line} failed (exit {res.returncode}): {line}\n"
        f"--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-5000:]}"
    )
    paths, printed = promises(argv)
    work = workspace["work"]
    for pattern in paths:
        found = list(work.glob(pattern)) if "*" in pattern else [work / pattern]
        assert found and all(p.exists() for p in found), f"line {cmd.line}: {pattern} missing"
    for text in printed:
        assert text in res.stdout, f"line {cmd.line}: {text!r} not printed\n{res.stdout[-2000:]}"
    if argv[0] == "make" and "demo" in argv:
        # One report (the copyright report), and the printout ends with what to run next.
        assert not (work / "runs" / "demo" / "report.html").exists(), "a second, older report"
        last = [ln for ln in res.stdout.splitlines() if ln.strip()][-3:]
        assert len(last) == 3 and all("diffattr" in ln for ln in last), last
