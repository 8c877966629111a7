"""The command line on a text-to-image model with a LoRA: generate with prompts, featurize a
captioned image folder (several methods, one pass), attribute generated and foreign images, and
write the report with the prompt, base model and LoRA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffattr.data import save_image
from diffattr.diffusion.model import load_model
from diffattr.testing import tiny_lora_file, tiny_t2i_folder

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a zero digit", "a one digit", "a thick zero", "a thin one", "a zero", "a one"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffattr.cli", "-q", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=600,
    )


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t2i-cli")
    base = tiny_t2i_folder(root / "base")
    lora = tiny_lora_file(load_model(base), root / "lora", rank=2, seed=3)
    data = root / "images"
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        save_image(torch.rand(3, 16, 16, generator=g) * 2 - 1, data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": caption})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    foreign = root / "foreign.png"
    save_image(torch.rand(3, 16, 16, generator=g) * 2 - 1, foreign)
    gen = root / "gen"
    r = run(
        "generate",
        "--model",
        str(base),
        "--lora",
        str(lora),
        "--prompt",
        "a zero digit",
        "--prompt",
        "a thin one",
        "--n",
        "2",
        "--steps",
        "4",
        "--out",
        str(gen),
        cwd=root,
    )
    assert r.returncode == 0, r.stderr
    feats = root / "feats"
    r = run(
        "featurize",
        "--model",
        str(base),
        "--lora",
        str(lora),
        "--data",
        "imagefolder",
        "--data-root",
        str(data),
        "--method",
        "d-trak,das,unlearn,pixel",
        "--option",
        "timesteps=2",
        "--option",
        "proj_dim=64",
        "--option",
        "unlearn:fisher_passes=1",
        "--out",
        str(feats),
        cwd=root,
    )
    assert r.returncode == 0, r.stderr
    return {
        "root": root,
        "base": base,
        "lora": lora,
        "gen": gen,
        "feats": feats,
        "foreign": foreign,
    }


def test_generate_keeps_each_images_prompt(ws) -> None:
    meta = json.loads((ws["gen"] / "sample.json").read_text())
    assert meta["prompts"] == ["a zero digit"] * 2 + ["a thin one"] * 2
    assert len(list(ws["gen"].glob("0*.png"))) == 4


def test_attribute_a_generated_image_with_its_prompt(ws) -> None:
    common = ["--model", str(ws["base"]), "--lora", str(ws["lora"])]
    r = run(
        "attribute",
        *common,
        "--features",
        str(ws["feats"] / "d-trak"),
        "--image",
        str(ws["gen"] / "0002.png"),
        "--top-k",
        "3",
        cwd=ws["root"],
    )
    assert r.returncode == 0, r.stderr
    assert "top-3 training images by d-trak" in r.stdout


def test_a_foreign_image_needs_a_prompt(ws) -> None:
    common = ["--model", str(ws["base"]), "--lora", str(ws["lora"]), "--features"]
    feats = str(ws["feats"] / "das")
    r = run("attribute", *common, feats, "--image", str(ws["foreign"]), cwd=ws["root"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "text-conditional" in r.stderr and "--prompt" in r.stderr
    ok = run(
        "attribute",
        *common,
        feats,
        "--image",
        str(ws["foreign"]),
        "--prompt",
        "a thick zero",
        cwd=ws["root"],
    )
    assert ok.returncode == 0, ok.stderr
    plain = run(
        "attribute",
        *common,
        feats,
        "--image",
        str(ws["foreign"]),
        "--unconditional",
        cwd=ws["root"],
    )
    assert plain.returncode == 0, plain.stderr
    assert ok.stdout != plain.stdout  # the prompt changes the answer


def test_features_of_another_lora_are_refused(ws) -> None:
    r = run(
        "attribute",
        "--model",
        str(ws["base"]),
        "--features",
        str(ws["feats"] / "d-trak"),
        "--image",
        str(ws["gen"] / "0000.png"),
        cwd=ws["root"],
    )
    assert r.returncode == 2 and "model hash" in r.stderr


def test_report_shows_prompt_base_model_and_lora(ws) -> None:
    out = ws["root"] / "report"
    r = run(
        "report",
        "--model",
        str(ws["base"]),
        "--lora",
        str(ws["lora"]),
        "--image",
        str(ws["gen"] / "0001.png"),
        "--methods",
        "d-trak,unlearn,pixel",
        "--features-root",
        str(ws["feats"]),
        "--groups",
        "caption",
        "--no-pdf",
        "--out",
        str(out),
        cwd=ws["root"],
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["query"]["prompt"] == "a zero digit"
    prov = rep["provenance"]
    assert prov["lora_path"] and prov["lora_hash"] and prov["base_hash"] != prov["model_hash"]
    assert rep["groups"]["spec"] == "caption"
    html = (out / "report.html").read_text()
    assert "a zero digit" in html and "LoRA" in html
