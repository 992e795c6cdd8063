"""``stepsmith search`` then ``stepsmith eval`` through the CLI on every saved tiny pipeline folder (SD1.5, SDXL,
SD3, Flux, DiT; random weights, safetensors): each folder reloads from disk (tokenizers included), the searched
table records the conditioning it was searched under, and eval scores that table against the teacher.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from schedules.cli import main

torch.set_num_threads(1)

# per folder: conditioning flags, and the sizes the table must record (None: class-conditional, no image size)
TEXT = ["--height", "16", "--width", "16"]
CASES = {
    "sd": (["--negative-prompt", "dog", "--guidance", "3"], (16, 16)),
    "sdxl": (["--negative-prompt", "dog", "--guidance", "3"], (16, 16)),
    "sd3": (["--negative-prompt", "dog", "--guidance", "3"], (16, 16)),
    # a Flux without guidance embedding runs true CFG, which needs a negative prompt
    "flux": (["--negative-prompt", "dog", "--guidance", "3"], (16, 16)),
    "dit": (["--classes", "0,1", "--guidance", "3"], None),
}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "p.txt"
    p.write_text("a cat\ncat dog\n")
    return p


@pytest.mark.parametrize("which", list(CASES))
def test_search_then_eval_on_a_saved_folder(request, which, prompts_file, tmp_path, capsys):
    folder = request.getfixturevalue(f"{which}_folder")
    flags, size = CASES[which]
    cond = [*flags, *(["--prompts", str(prompts_file), *TEXT] if size else [])]
    model = ["--model", str(folder), *cond]
    table = tmp_path / "dp.json"
    assert main(["search", *model, "--nfe", "2", "--samples", "2", "--grid", "6", "--no-progress",
                 "--out", str(table)]) == 0
    saved = json.loads(table.read_text())
    assert saved["nfe"] == 2 and len(saved["sigmas"]) == 3
    c = saved["conditioning"]
    assert c["guidance"] == 3.0
    if size:
        assert c["negative"] == "dog" and (c["height"], c["width"]) == size
    else:
        assert c["kind"] == "class" and c["classes"] == [0, 1] and c["null_class"] == 1000  # DiT's null label
    capsys.readouterr()

    out = tmp_path / "eval"
    assert main(["eval", *model, "--tables", str(table), "--metric", "teacher", "--num", "2", "--teacher-steps", "3",
                 "--grid", "2", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metric"] == "teacher"
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "teacher" and report["num"] == 2
    assert report["model_info"]["conditioning"]["kind"] == ("prompt" if size else "class")
    assert report["model_info"]["conditioning"]["guidance"] == 3.0
    [row] = report["results"]
    assert row["source"] == str(table) and row["nfe"] == 2 and row["model_calls"] == 2
    assert row["sigmas"] == pytest.approx(saved["sigmas"])  # the searched table, sampled as written
    # latent MSE to the 3-step Heun teacher on the same noises: a 2-step Euler sampler is not it
    assert row["value"] == row["extra"]["teacher_mse"] > 0
    assert report["teacher"]["steps"] == 3 and (out / report["teacher"]["grid"]).is_file()
    assert "dp" in (out / "report.md").read_text()
    with Image.open(out / row["grid"]) as grid:  # VAE-decoded 16×16 RGB images (Flux: unpacked first), not latents
        assert grid.mode == "RGB" and min(grid.size) >= 16


def test_flux_true_cfg_without_a_negative_prompt_names_the_flag(flux_folder, prompts_file, tmp_path, capsys):
    out = tmp_path / "dp.json"
    rc = main(["search", "--model", str(flux_folder), "--prompts", str(prompts_file), "--guidance", "3", *TEXT,
               "--nfe", "2", "--samples", "2", "--grid", "6", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()  # --no-progress: no loading bars of diffusers / transformers
    assert rc == 2 and not out.exists() and len(err) == 1
    assert "true CFG (--guidance 3) needs a negative prompt (--negative-prompt;" in err[0]
