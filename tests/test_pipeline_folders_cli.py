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


def test_max_sequence_length_reaches_the_pipeline_and_the_table(sd3_folder, flux_folder, prompts_file, tmp_path,
                                                                 capsys):
    """--max-sequence-length (Flux schnell runs at 256, the pipeline default is 512) builds the adapter at that T5
    length, and the table records it: its fingerprint differs from the default's, and pipeline_kwargs warns when
    the pipeline is called at another length."""
    from diffusers import StableDiffusion3Pipeline

    from schedules import load_table, pipeline_kwargs
    from schedules.adapters import load_model
    from schedules.conditioning import Conditioning

    base = ["search", "--prompts", str(prompts_file), "--negative-prompt", "dog", "--guidance", "3", *TEXT,
            "--nfe", "2", "--samples", "2", "--grid", "6", "--no-progress"]  # dp: baselines record no conditioning
    tables = {}
    for length in (None, 8):
        out = tmp_path / f"sd3-{length}.json"
        flag = [] if length is None else ["--max-sequence-length", str(length)]
        assert main([*base, "--model", str(sd3_folder), *flag, "--out", str(out)]) == 0
        tables[length] = json.loads(out.read_text())["conditioning"]
    assert tables[None]["max_sequence_length"] == 256  # StableDiffusion3Pipeline's own default, recorded
    assert tables[8]["max_sequence_length"] == 8
    assert tables[8]["fingerprint"] != tables[None]["fingerprint"]

    cond = Conditioning(prompts=("a cat",), negative="dog", guidance=3.0, height=16, width=16)
    short = load_model(str(flux_folder), conditioning=cond, pipeline_options={"max_sequence_length": 8})
    assert short.condition_kwargs.cond["encoder_hidden_states"].shape[1] == 8  # the T5 embeddings the call sees
    assert short.model_kwargs["txt_ids"].shape[0] == 8

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    table = load_table(tmp_path / "sd3-8.json")
    with pytest.warns(UserWarning, match=r"max_sequence_length 256 \(table: 8\)"):
        kw = pipeline_kwargs(table, pipe, max_sequence_length=256)
    assert kw["max_sequence_length"] == 256
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipeline_kwargs(table, pipe, max_sequence_length=8)["max_sequence_length"] == 8
    capsys.readouterr()


@pytest.mark.parametrize("which, flags, says", [
    ("sd", ["--max-sequence-length", "8"], "takes no --max-sequence-length (only SD3 and Flux pipelines encode"),
    ("flux", ["--true-cfg-scale", "2"], "its guidance IS true CFG — give it as --guidance, not --true-cfg-scale"),
    (None, ["--max-sequence-length", "8"], "--max-sequence-length is an option of SD3 / Flux pipeline folders"),
])
def test_pipeline_options_a_model_does_not_take_are_refused(request, which, flags, says, prompts_file, tmp_path,
                                                            capsys):
    model = ["--model", "builtin:digits-flow"] if which is None else \
        ["--model", str(request.getfixturevalue(f"{which}_folder")), "--prompts", str(prompts_file), *TEXT,
         "--negative-prompt", "dog"]
    out = tmp_path / "t.json"
    rc = main(["search", *model, *flags, "--method", "uniform", "--nfe", "2", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists() and len(err) == 1
    assert says in err[0]
