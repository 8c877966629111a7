"""`diffattr report` end to end on a tiny model trained on an image folder whose class names carry
markup (``<script>alert(1)``): files, schema, numbers, headless Chromium rendering, PDF pages, and
one-line errors for bad input.

Chromium (Debian ``chromium``) and poppler (``pdfinfo``) are system packages that ``make install``
/ ``make test`` install (as root with apt-get). The tests install nothing themselves, so the
module's report is the same whichever test builds it first. Where either program is absent the
tests that need it are skipped, saying how to install it; where Chromium is present the report
must have its PDF (a missing one fails).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffattr.cli import main
from diffattr.config import DataConfig
from diffattr.data import load_dataset
from diffattr.data.dataset import ImageDataset
from diffattr.data.images import export_dataset, save_image
from diffattr.demo import QUERY_INDEX
from diffattr.report.render import FORMATS, find_chromium, run_chromium
from diffattr.resources import resource
from diffattr.testing import TINY_UNET

XSS_CLASS = "<script>alert(1)"  # a folder name cannot hold "/", so no closing tag here
XSS_GROUP = "<script>alert(2)</script>"  # the --groups csv test carries the full tag
METHODS = ["d-trak", "pixel", "unet-features", "journey-trak"]


def tiny_config(root: Path) -> dict:
    return {
        "seed": 0,
        "data": {"source": "imagefolder", "root": str(root), "size": 8},
        "model": {**TINY_UNET, "attention_head_dim": 4},
        "scheduler": {"num_train_timesteps": 100},
        "train": {"steps": 4, "batch_size": 8, "lr_warmup_steps": 1, "checkpoint_every": 4},
        "sample": {"num_inference_steps": 4},
    }


def write_image_folder(root: Path) -> None:
    """24 digits (8x8) as an image folder with class names that are markup."""
    digits = load_dataset(DataConfig(source="digits-2", size=8, limit=24))
    export_dataset(
        ImageDataset(
            name="xss",
            images=digits.images,
            ids=digits.ids,
            labels=digits.labels,
            class_names=[XSS_CLASS, "<i>one"],
        ),
        root,
        progress=False,
    )


def run(*args: str) -> int:
    return main(["-q", *args])


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    write_image_folder(root / "images")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(root / "images")))
    run_dir = root / "run" / "model"
    assert run("train", "--config", str(cfg), "--out", str(run_dir)) == 0
    gen = root / "run" / "generated"
    n = str(QUERY_INDEX + 1)  # the demo's query index must exist (last test)
    assert (
        run("generate", "--model", str(run_dir), "--n", n, "--steps", "4", "--out", str(gen)) == 0
    )
    feats = root / "run" / "features"
    # Small options for the gradient methods; pixel and unet-features are left to the report to
    # build (with their defaults).
    small = ["--proj-dim", "64", "--batch-size", "8"]
    assert run("featurize", "--model", str(run_dir), "--method", "d-trak", "--timesteps", "2",
               *small, "--out", str(feats / "d-trak")) == 0  # fmt: skip
    assert run("featurize", "--model", str(run_dir), "--method", "journey-trak", *small,
               "--option", "query_draws=1", "--out", str(feats / "journey-trak")) == 0  # fmt: skip
    out = root / "out"
    code = run("report", "--model", str(run_dir), "--image", str(gen / "0001.png"),
               "--methods", ",".join(METHODS), "--groups", "class", "--top-k", "5",
               "--out", str(out))  # fmt: skip
    assert code == 0
    return {"root": root, "model": run_dir, "gen": gen, "feats": feats, "out": out, "cfg": cfg}


@pytest.fixture(scope="module")
def report(ws) -> dict:
    return json.loads((ws["out"] / "report.json").read_text())


# ------------------------------------------------------------------------------------ content


def test_report_json_validates_against_the_shipped_schema(report):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(resource("assets", "report_schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(report, schema)
    assert report["schema_version"] == 1


def test_report_has_every_section(report, ws):
    assert [m["name"] for m in report["methods"]] == METHODS
    built = {m["name"]: m["built"] for m in report["methods"]}
    assert built == {"d-trak": False, "pixel": True, "unet-features": True, "journey-trak": False}
    assert (ws["feats"] / "unet-features" / "diffattr.json").exists()  # built and kept
    for m in report["methods"]:
        assert len(m["top"]) == 5 and [t["rank"] for t in m["top"]] == [1, 2, 3, 4, 5]
        assert {t["group"] for t in m["top"]} <= {XSS_CLASS, "<i>one"}
        assert all(t["source"].endswith(".png") for t in m["top"])  # the training file
        shares = [g["share"] for g in m["groups"]["rows"]]
        if m["groups"]["positive_mass"] > 0:
            assert abs(sum(shares) - 1.0) < 1e-6
        else:  # e.g. pixel cosines of a barely trained model's sample are all negative
            assert not shares and "no positive score" in m["groups"]["note"]
    pixel = next(m for m in report["methods"] if m["name"] == "pixel")
    assert pixel["stability"]["exact"] and "exact" in pixel["stability"]["text"]
    dtrak = next(m for m in report["methods"] if m["name"] == "d-trak")
    assert not dtrak["stability"]["exact"] and dtrak["groups"]["rows"][0]["half_shares"]
    names = [s["name"] for s in report["near_copy"]["signals"]]
    assert names == ["pixel_rms", "pixel_cosine", "phash", "embedding_cosine:unet-features"]
    assert len(report["agreement"]["pairs"]) == 6  # 4 methods
    assert report["journey"]["method"] == "journey-trak" and report["journey"]["series"]
    assert len(report["journey"]["series"][0]["values"]) == len(report["journey"]["timesteps"])
    assert (
        report["quality"]["relation"] == "none" and "No evaluation" in report["quality"]["message"]
    )
    assert (
        report["provenance"]["model_hash"]
        == json.loads((ws["model"] / "diffattr.json").read_text())["model_hash"]
    )
    for key in ("load", "near_copy", "groups", "score:d-trak", "render_html", "total"):
        assert report["timing"][key] >= 0


class _Text(HTMLParser):
    """Visible text of a page (no style / script content, no attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("style", "script", "title")

    def handle_endtag(self, tag):
        self._skip -= tag in ("style", "script", "title")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def _allowed_numbers(obj) -> set[str]:
    """Number tokens of every JSON value as any report filter (or str) renders it."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out |= set(NUMBER.findall(str(k))) | _allowed_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= _allowed_numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        for text in [str(obj), *(f(obj) for f in FORMATS.values())]:
            out |= set(NUMBER.findall(text))
    elif obj is not None:
        out |= set(NUMBER.findall(str(obj)))
    return out


def test_every_number_on_the_page_is_in_the_json(ws, report):
    parser = _Text()
    parser.feed((ws["out"] / "report.html").read_text())
    shown = NUMBER.findall(" ".join(parser.parts))
    assert len(shown) > 100
    allowed = _allowed_numbers(report)
    missing = sorted(set(shown) - allowed)
    assert not missing, f"numbers on the page that report.json lacks: {missing[:20]}"


def test_html_is_self_contained(ws):
    html = (ws["out"] / "report.html").read_text()
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert "http://" not in html and "https://" not in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in html and "<script" not in html  # the class name is escaped
    assert "&lt;script&gt;alert(1)" in html


# ------------------------------------------------------------------------- rendering (Chromium)


def _missing(what: str, package: str) -> str:
    return (
        f"{what} not found: `make install` (or `make test`) installs it as root with apt-get; "
        f"otherwise: sudo apt-get install {package}"
    )


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = find_chromium()
    if exe is None:
        pytest.skip(_missing("Chromium", "chromium"))
    return exe


def test_chromium_loads_the_page_without_errors_or_requests(ws, chromium, tmp_path):
    page = (ws["out"] / "report.html").resolve().as_uri()
    proc = run_chromium(["--enable-logging=stderr", "--v=0", "--dump-dom", page], chromium)
    dom = proc.stdout
    # Console messages (a CSP violation = a blocked request, a script error) are logged as CONSOLE.
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    assert "Refused to" not in proc.stderr
    assert "<script" not in dom.lower()  # no script element: the markup class name stayed text
    assert "&lt;script&gt;alert(1)" in dom
    shot = tmp_path / "shot.png"
    run_chromium(
        ["--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,3000", page], chromium
    )
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1200, 3000)
        grey = np.asarray(img.convert("L"), dtype=np.float64)
    assert grey.std() > 20  # not blank: text, tables and thumbnails
    assert (grey < 128).mean() > 0.01


def test_csv_groups_with_markup_are_shown_as_text(ws, chromium, tmp_path):
    groups = tmp_path / "groups.csv"
    ids = load_dataset(
        DataConfig(source="imagefolder", root=str(ws["root"] / "images"), size=8)
    ).ids
    groups.write_text(
        "id,group\n" + "".join(f"{i},{XSS_GROUP if i % 2 else 'even'}\n" for i in ids.tolist())
    )
    out = tmp_path / "rep"
    code = run("report", "--model", str(ws["model"]), "--image", str(ws["gen"] / "0000.png"),
               "--methods", "pixel", "--groups", f"csv:{groups}", "--no-pdf", "--out", str(out))  # fmt: skip
    assert code == 0 and not (out / "report.pdf").exists()
    data = json.loads((out / "report.json").read_text())
    assert {r["group"] for r in data["methods"][0]["groups"]["rows"]} == {XSS_GROUP, "even"}
    proc = run_chromium(["--dump-dom", (out / "report.html").resolve().as_uri()], chromium)
    assert "<script" not in proc.stdout.lower() and "&lt;/script&gt;" in proc.stdout


def test_pdf_has_a_page_per_method(ws, report, chromium):
    # Chromium is here, so the module's report (built before any test) must have printed its PDF.
    outputs = report["outputs"]
    if outputs["pdf"] is None:
        pytest.fail(f"no report.pdf although Chromium is at {chromium}: {outputs['pdf_note']}")
    pdf = ws["out"] / outputs["pdf"]
    assert outputs["pdf"] == "report.pdf" and pdf.stat().st_size > 1000
    if shutil.which("pdfinfo") is None:
        pytest.skip(_missing("pdfinfo", "poppler-utils"))
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    pages = int(re.search(r"Pages:\s+(\d+)", info).group(1))
    assert pages >= len(report["methods"]) + 2  # summary page(s) + one per method + provenance


# ------------------------------------------------------------------------------ bad input


def _report_args(ws, out: Path, **over: str) -> list[str]:
    args = {"--model": str(ws["model"]), "--image": str(ws["gen"] / "0000.png"),
            "--methods": "pixel", "--out": str(out)}  # fmt: skip
    args.update(over)
    return ["report", "--no-pdf", *[x for kv in args.items() for x in kv]]


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"--image": "nowhere.png"}, "nowhere.png: image file not found"),
        ({"--methods": "pixel,nosuch"}, "'nosuch' is unknown"),
        ({"--methods": "pixel,ggda"}, "ggda scores groups, not images"),
        ({"--groups": "kmeans:x"}, "K must be an integer"),
        ({"--eval": "no-eval-here"}, "no results.json"),
    ],
)
def test_bad_input_is_one_line_error(ws, tmp_path, caplog, over, message):
    out = tmp_path / "rep"
    assert run(*_report_args(ws, out, **over)) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage()
    assert not (out / "report.json").exists()


def test_wrong_image_size_is_refused(ws, tmp_path, caplog):
    big = tmp_path / "big.png"
    save_image(torch.zeros(1, 16, 16), big)
    assert run(*_report_args(ws, tmp_path / "rep", **{"--image": str(big)})) == 2
    assert "is 16x16 (WxH), expected 8x8" in caplog.text


def test_features_of_another_model_are_refused(ws, tmp_path, caplog):
    cfg = yaml.safe_load(ws["cfg"].read_text())
    cfg["seed"] = 1
    other_cfg = tmp_path / "other.yaml"
    other_cfg.write_text(yaml.safe_dump(cfg))
    other = tmp_path / "other" / "model"
    assert run("train", "--config", str(other_cfg), "--out", str(other)) == 0
    args = _report_args(ws, tmp_path / "rep", **{"--model": str(other)})
    assert run(*args, "--features-root", str(ws["feats"])) == 2
    assert "model hash" in caplog.text


def test_journey_is_skipped_for_an_image_without_trajectory(ws, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(ws["gen"] / "0000.png", plain / "query.png")
    out = tmp_path / "rep"
    args = _report_args(
        ws, out, **{"--image": str(plain / "query.png"), "--methods": "pixel,journey-trak"}
    )
    assert run(*args, "--features-root", str(ws["feats"])) == 0
    data = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in data["methods"]] == ["pixel"] and data["journey"] is None
    assert data["skipped_methods"][0]["method"] == "journey-trak"


def test_report_command_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--image", "--methods", "--groups", "--features-root", "--eval"):
        assert option in text
